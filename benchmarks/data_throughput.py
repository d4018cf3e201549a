"""Throughput of the built-in synthetic dataset: images per second through a DataLoader with 0 and 2 workers.

Also times a training step of a small CNN on the same batches, side by side in the same run, to show whether
the data pipeline can keep up. Usage::

    python benchmarks/data_throughput.py [--image-size 64] [--batch-size 64] [--seconds 3]

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from ex2l_xai.data import get_dataset


def images_per_second(loader: DataLoader, seconds: float) -> float:
    """Iterate ``loader`` (restarting as needed) for about ``seconds`` after one warm-up batch."""
    it = iter(loader)
    next(it)  # warm-up: workers start, texture bank built
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def small_cnn_images_per_second(batch: dict, seconds: float) -> float:
    """Training images per second of a 4-block CNN (forward + backward + SGD step) on one fixed batch."""
    net = nn.Sequential(
        *[
            m
            for c_in, c_out in ((3, 16), (16, 32), (32, 64), (64, 64))
            for m in (nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))
        ],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 4),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = batch["image"], batch["label"]
    nn.functional.cross_entropy(net(x), y).backward()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--per-group", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()

    ds = get_dataset("synthetic", "train", per_group=args.per_group, image_size=args.image_size)
    results: dict[str, float] = {}
    start = time.perf_counter()
    n = min(len(ds), 2000)
    for i in range(n):
        ds[i]
    results["getitem"] = n / (time.perf_counter() - start)
    print(f"__getitem__ loop, one process: {results['getitem']:.0f} images/s")
    for workers in (0, 2):
        loader = DataLoader(
            ds, batch_size=args.batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )
        results[f"workers_{workers}"] = ips = images_per_second(loader, args.seconds)
        print(f"DataLoader num_workers={workers}: {ips:.0f} images/s")
    batch = next(iter(DataLoader(ds, batch_size=args.batch_size, shuffle=True)))
    results["small_cnn_train"] = small_cnn_images_per_second(batch, args.seconds)
    print(f"small CNN training step (same run, for scale): {results['small_cnn_train']:.0f} images/s")
    print(
        json.dumps(
            {
                "benchmark": "data_throughput",
                "dataset": "synthetic",
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "images_per_s": {k: round(v, 1) for k, v in results.items()},
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
