"""The audit's extraction batch on a CPU: the default (``analysis.extract.batch_for``: a fixed number of pixels,
32 images at 128 px) against other batch sizes, in one process.

A two-head EfficientNet-Lite0 (random init, eval mode, CAMs at ``layer4``) extracts the label CAM at y and at ŷ,
the confounder CAM at c, the logits and the latent of the same test images of the built-in benchmark (decoded once,
in memory, before timing) at each batch size; each size is timed as the median of ``--repeats`` runs after a
warm-up, in an interleaved order so that drifts in the machine's speed hit every size alike. The outputs at every
size are checked against the default's (max abs difference printed). The last line printed is one JSON object
with each size's seconds and its ratio to the default's.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/extract_batch.py              # 400 images at 128 px
    OMP_WAIT_POLICY=PASSIVE python benchmarks/extract_batch.py --samples 96 # under a minute here
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from analysis.extract import batch_for, extract
from ex2l_xai.data import get_dataset
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.train import CachedDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 64, 128], help="batch sizes besides the default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    per = max(8, -(-args.samples // 4))  # the test split: 4 groups x test_per_group images
    base = get_dataset("synthetic", "test", image_size=args.image_size, per_group=8, test_per_group=per,
                       challenge="m2m_hard")
    dataset = CachedDataset(torch.utils.data.Subset(base, range(min(args.samples, len(base)))))
    for attr in ("label_names", "confounder_names", "env_names", "n_labels", "n_confounders"):
        setattr(dataset, attr, getattr(base, attr))
    torch.manual_seed(0)
    model = TwoHeadNet("efficientnet_lite0", base.n_labels, base.n_confounders, pretrained="none").eval()
    auto = batch_for(None, "cpu", (args.image_size, args.image_size))
    sizes = [auto, *[s for s in args.sizes if s != auto]]
    print(f"CAM extraction by batch size, {len(dataset)} test images at {args.image_size} px, EfficientNet-Lite0 "
          f"(two heads), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; default batch {auto}")
    ref = extract(model, dataset, batch_size=auto)
    for s in sizes:  # warm-up, and the outputs compared with the default's
        ext = extract(model, dataset, batch_size=s)
        diff = max(float(np.abs(getattr(ext, k) - getattr(ref, k)).max())
                   for k in ("cams_true", "cams_pred", "cams_conf", "latents", "logits"))
        print(f"batch {s:4d}: max |diff| to the default's outputs {diff:.1e}")
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(args.repeats):
        for s in sizes:
            t = time.perf_counter()
            extract(model, dataset, batch_size=s)
            times[s].append(time.perf_counter() - t)
    med = {s: float(np.median(v)) for s, v in times.items()}
    for s in sizes:
        print(f"batch {s:4d}{' (default)' if s == auto else '          '}: {med[s]:6.2f} s, "
              f"{1000 * med[s] / len(dataset):6.1f} ms an image, {med[s] / med[auto]:.2f}x the default's time")
    print(json.dumps({"benchmark": "extract_batch", "n": len(dataset), "image_size": args.image_size,
                      "threads": args.threads, "default_batch": auto,
                      "seconds": {str(s): round(v, 4) for s, v in med.items()},
                      "ratio_to_default": {str(s): round(v / med[auto], 4) for s, v in med.items()}}))


if __name__ == "__main__":
    main()
