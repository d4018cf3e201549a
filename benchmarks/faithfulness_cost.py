"""Cost of the audit's faithfulness checks per image beside one Grad-CAM pass over the same images.

The demo's regime: a TwoHeadNet over EfficientNet-Lite0 (random init) at 128x128 px, CPU. Measured side by side
in one run, on the same N images (default 240):

  gradcam    one Grad-CAM pass: the label CAM at the predicted class (ModelAdapter.cams), as the extraction
             computes it, in batches of --batch images
  shared     the pixel ranks of the three maps, the baseline images and the forward passes of the intact images
             and the baselines (the curves' end points, once for all maps)
  deletion   the deletion curves' steps 1..K-1 of three maps: the CAM, a random map and a centre prior
  insertion  the same for insertion
  road       ROAD of the three maps: noisy linear imputation (one sparse LU per image, percentage and order; one
             per percentage and order for the centre prior, which every image shares) and the forward passes
             (printed apart: "of which forwards")

Each part is what analysis.faithfulness.faithfulness_maps does for it (the same queue, Forwards, flushed at the end
of each part), so their sum is the check's cost for one CAM variant besides the CAM itself. Prints seconds per
image of each part and the total's ratio to the Grad-CAM pass; the last line is one JSON object.

OpenMP waits passively (OMP_WAIT_POLICY=PASSIVE, as ``ex2l`` sets it, unless the environment sets it): spinning
OpenMP threads made the forward passes 3-12x slower on the 2-core machine while other processes used it.

    python benchmarks/faithfulness_cost.py            # 240 images, 10 steps
    python benchmarks/faithfulness_cost.py --n 16     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np


def _parts(adapter: Any, x: Any, cams: Any, target: Any, steps: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds of each part of the faithfulness checks of the CAM, a random map and a centre prior (what
    ``faithfulness_maps`` does, part by part), and each map's summary."""
    from analysis import faithfulness as fa

    shape = tuple(cams.shape[-2:])
    maps = {"cam": cams, "random": fa.random_maps(len(x), shape, 0), "centre": fa.centre_maps(len(x), shape)}
    size = (int(x.shape[-2]), int(x.shape[-1]))
    fw = fa.Forwards(adapter.logits, target)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    ranks = {k: fa.pixel_ranks(m, size, 0) for k, m in maps.items()}
    base = fa.baseline_images(x, "blur")
    intact, blank = fw.add(x), fw.add(base)
    fw.probs()
    seconds["shared"] = time.perf_counter() - t
    queued: dict[str, dict[str, Any]] = {}
    for part, insertion in (("deletion", False), ("insertion", True)):
        t = time.perf_counter()
        queued[part] = {k: fa._queue_steps(fw, x, r, base, steps, insertion=insertion) for k, r in ranks.items()}
        fw.probs()
        seconds[part] = time.perf_counter() - t
    t, before = time.perf_counter(), fw.seconds
    road = {k: fa._road(fw, x, r, fa.ROAD_PERCENTAGES, 0.01, 0) for k, r in ranks.items()}
    probs = fw.probs()
    seconds["road"] = time.perf_counter() - t
    seconds["road_forwards"] = fw.seconds - before  # of which forward passes; the rest is the imputation
    fractions = np.linspace(0.0, 1.0, steps + 1)
    summaries = {k: fa.FaithResult(fa._curves(probs, [intact, *queued["deletion"][k], blank]),
                                   fa._curves(probs, [blank, *queued["insertion"][k], intact]),
                                   fa._curves(probs, road[k]["morf"]), fa._curves(probs, road[k]["lerf"]),
                                   fractions, fa.ROAD_PERCENTAGES).summary() for k in maps}
    return seconds, summaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="images (default 240)")
    ap.add_argument("--size", type=int, default=128, help="image side in px (default 128, the demo's)")
    ap.add_argument("--steps", type=int, default=10, help="steps of deletion and insertion (default 10)")
    ap.add_argument("--batch", type=int, default=16, help="images per Grad-CAM pass (default 16: the fastest on "
                    "the development machine; the faithfulness checks choose their own, forward_batch)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
    import torch

    from analysis.adapter import ModelAdapter
    from ex2l_xai.models import TwoHeadNet

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
    seconds, summaries = _parts(adapter, x, cams, target, args.steps)
    total = sum(v for k, v in seconds.items() if k != "road_forwards")

    per = {k: v / args.n for k, v in seconds.items()}
    out = {"n": args.n, "size": args.size, "steps": args.steps, "threads": args.threads,
           "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "gradcam_s_per_image": t_cam / args.n,
           "s_per_image": per, "faithfulness_s_per_image": total / args.n, "faithfulness_over_gradcam": total / t_cam,
           "machine": platform.processor() or platform.machine(), "metrics": summaries}
    print(f"{args.n} images, {args.size} px, {args.steps} steps, {args.threads} threads, EfficientNet-Lite0 "
          "(random init); the CAM, a random map and a centre prior")
    print(f"  one Grad-CAM pass   {1000 * t_cam / args.n:9.1f} ms/image")
    for k, v in per.items():
        name = "  of which forwards" if k == "road_forwards" else k
        print(f"  {name:<19} {1000 * v:9.1f} ms/image")
    print(f"  faithfulness total  {1000 * total / args.n:9.1f} ms/image  ({total / t_cam:.1f}x the Grad-CAM pass)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
