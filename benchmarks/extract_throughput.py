"""Throughput of CAM extraction: ``analysis.extract`` (batched, one forward per batch) vs a per-sample Captum loop.

Both paths compute the same outputs for every sample of the built-in synthetic benchmark's test split (64 px):
the label-head Grad-CAM at the true label y and at the prediction ŷ, the confounder-head Grad-CAM at the true
confounder c, the logits and the latent, with a two-head network (random init, eval mode) of backbone
``small_cnn`` (width 32) and ``resnet18``:

  batched      ``analysis.extract.extract(model, dataset, batch_size=B)``: per batch ONE forward pass and three
               gradients of the same graph (``ex2l_xai.cam.head_cams``)
  captum loop  per sample: a forward pass for the prediction and latent, then ``captum.attr.LayerGradCam``
               ``.attribute`` three times (y, ŷ, c), each with its own forward and backward pass

Same process, same samples (decoded once, in memory, before timing), same threads; the CAMs of the two paths are
checked to agree (max abs difference printed). After a warm-up with the same shapes, the batched pass is timed as
the median of 3 runs and the loop once over all samples (it repeats one shape n times). The last line printed is
one JSON object.

    python benchmarks/extract_throughput.py            # 256 samples per model
    python benchmarks/extract_throughput.py --quick    # 64 samples per model, under a minute here
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from captum.attr import LayerGradCam

from analysis.extract import extract
from ex2l_xai.data import get_dataset
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.train import CachedDataset


def captum_loop(model: TwoHeadNet, dataset: CachedDataset) -> dict[str, np.ndarray]:
    lay_y, lay_c = model.cam_layers()
    label_cam = LayerGradCam(lambda x: model(x).label, lay_y)
    conf_cam = LayerGradCam(lambda x: model(x).confounder, lay_c)
    out: dict[str, list[np.ndarray]] = {"true": [], "pred": [], "conf": [], "latent": []}
    for i in range(len(dataset)):
        s = dataset[i]
        x = s["image"][None]
        with torch.no_grad():
            o = model(x)
        pred = int(o.label.argmax(1))
        out["latent"].append(o.latent.numpy())
        out["true"].append(label_cam.attribute(x, target=s["label"], relu_attributions=True)[:, 0].detach().numpy())
        out["pred"].append(label_cam.attribute(x, target=pred, relu_attributions=True)[:, 0].detach().numpy())
        out["conf"].append(conf_cam.attribute(x, target=s["confounder"], relu_attributions=True)[:, 0]
                           .detach().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def bench(backbone: str, dataset: CachedDataset, batch_size: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = TwoHeadNet(backbone, dataset.n_labels, dataset.n_confounders, width=32).eval()
    n = len(dataset)
    extract(model, dataset, batch_size=batch_size)  # warm-up of both paths, with the shapes timed below
    captum_loop(model, CachedList(dataset, warmup))

    times = []
    for _ in range(3):  # the batched pass is short: the median of 3 (the loop averages over its n samples)
        t = time.perf_counter()
        ext = extract(model, dataset, batch_size=batch_size)
        times.append(time.perf_counter() - t)
    t_batched = float(np.median(times))
    t = time.perf_counter()
    ref = captum_loop(model, dataset)
    t_loop = time.perf_counter() - t
    diff = max(
        float(np.abs(ext.cams_true - ref["true"]).max()),
        float(np.abs(ext.cams_pred - ref["pred"]).max()),
        float(np.abs(ext.cams_conf - ref["conf"]).max()),
        float(np.abs(ext.latents - ref["latent"]).max()),
    )
    return {
        "n": n,
        "batched_images_per_s": n / t_batched,
        "captum_loop_images_per_s": n / t_loop,
        "speedup": t_loop / t_batched,
        "batched_s": t_batched,
        "captum_loop_s": t_loop,
        "max_abs_diff": diff,
    }


class CachedList:
    """The first ``n`` samples of a cached dataset (for the warm-up of the loop)."""

    def __init__(self, dataset: CachedDataset, n: int) -> None:
        self.samples = dataset.samples[:n]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 samples per model instead of 256")
    p.add_argument("--samples", type=int, default=None, help="samples per model (overrides --quick)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.samples or (64 if args.quick else 256)
    per = max(8, -(-n // 4))  # the synthetic test split holds 4 groups x test_per_group images
    base = get_dataset("synthetic", "test", image_size=args.image_size, per_group=8, test_per_group=per)
    dataset = CachedDataset(torch.utils.data.Subset(base, range(min(n, len(base)))))
    for attr in ("label_names", "confounder_names", "env_names", "n_labels", "n_confounders"):
        setattr(dataset, attr, getattr(base, attr))
    print(f"CAM extraction throughput, {len(dataset)} test images at {args.image_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("outputs per image: label CAM at y and at ŷ, confounder CAM at c, logits, latent")
    results = {}
    for backbone in ("small_cnn", "resnet18"):
        r = bench(backbone, dataset, args.batch_size, warmup=min(8, len(dataset)))
        results[backbone] = r
        print(f"{backbone:<10} batched {r['batched_images_per_s']:8.1f} img/s | captum per-sample loop "
              f"{r['captum_loop_images_per_s']:7.1f} img/s | speed-up {r['speedup']:5.1f}x | "
              f"max |diff| {r['max_abs_diff']:.1e}")
    print(json.dumps({"benchmark": "extract_throughput", "image_size": args.image_size, "threads": args.threads,
                      "batch_size": args.batch_size, **{k: {kk: round(vv, 6) for kk, vv in v.items()}
                                                          for k, v in results.items()}}))


if __name__ == "__main__":
    main()
