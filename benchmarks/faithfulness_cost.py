"""Cost of the audit's faithfulness checks per image beside one Grad-CAM pass over the same images.

The demo's regime: a TwoHeadNet over EfficientNet-Lite0 (random init) at 128x128 px, CPU. Measured side by side
in one run, on the same N images (default 240), in batches of 64:

  gradcam       one Grad-CAM pass: the label CAM at the predicted class (ModelAdapter.cams), as the extraction
                computes it
  faithfulness  what the audit's faithfulness check computes for one CAM variant: the CAM, then deletion +
                insertion (10 steps, blurred baseline) and ROAD (MoRF + LeRF at 10/30/50/70/90 %) of the CAM, of
                a random map and of a centre prior (analysis.faithfulness.faithfulness)

Prints seconds per image of each and their ratio; the last line is one JSON object.

    python benchmarks/faithfulness_cost.py            # 240 images
    python benchmarks/faithfulness_cost.py --n 16     # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from analysis.adapter import ModelAdapter
from analysis.faithfulness import centre_maps, faithfulness, random_maps
from ex2l_xai.models import TwoHeadNet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="images (default 240)")
    ap.add_argument("--size", type=int, default=128, help="image side in px (default 128, the demo's)")
    ap.add_argument("--batch", type=int, default=64, help="images per forward pass (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TwoHeadNet("efficientnet_lite0", 4, 6).eval()
    x = torch.rand(args.n, 3, args.size, args.size)
    adapter = ModelAdapter(model)
    adapter.bind(x[:2])
    bs = args.batch
    adapter.cams(x[:2], adapter.logits(x[:2]).argmax(1))  # warm-up (first-call costs), untimed

    t = time.perf_counter()
    target = torch.cat([adapter.logits(x[i:i + bs]).argmax(1) for i in range(0, args.n, bs)])
    cams = torch.cat([adapter.cams(x[i:i + bs], target[i:i + bs]) for i in range(0, args.n, bs)])
    t_cam = time.perf_counter() - t

    t = time.perf_counter()
    cams2 = torch.cat([adapter.cams(x[i:i + bs], target[i:i + bs]) for i in range(0, args.n, bs)])
    shape = tuple(cams2.shape[-2:])
    parts = {}
    for name, maps in (("cam", cams2), ("random", random_maps(args.n, shape, 0)),
                       ("centre", centre_maps(args.n, shape))):
        res = faithfulness(adapter.logits, x, maps, target, steps=10, baseline="blur", batch_size=bs)
        parts[name] = res.summary()
    t_faith = time.perf_counter() - t
    assert torch.equal(cams, cams2)

    out = {"n": args.n, "size": args.size, "threads": args.threads, "gradcam_s_per_image": t_cam / args.n,
           "faithfulness_s_per_image": t_faith / args.n, "faithfulness_over_gradcam": t_faith / t_cam,
           "machine": platform.processor() or platform.machine(), "metrics": parts}
    print(f"{args.n} images, {args.size} px, {args.threads} threads, EfficientNet-Lite0 (random init)")
    print(f"  one Grad-CAM pass   {1000 * t_cam / args.n:9.1f} ms/image")
    print(f"  faithfulness checks {1000 * t_faith / args.n:9.1f} ms/image  ({t_faith / t_cam:.1f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
