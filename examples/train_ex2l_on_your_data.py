"""Train ERM and eX2L on your own data: a folder of images plus a CSV (the ``csv`` dataset).

The CSV has one row per image: ``path`` (relative to the folder), ``label``, ``confounder`` (the spurious
attribute you know of, e.g. the background or the hospital), optional ``env`` and ``split`` (train/val/test).
This script first writes such a folder (images drawn by the built-in benchmark, so it runs anywhere), then
trains both algorithms through the Python API and prints the per-group test accuracy.

    python examples/train_ex2l_on_your_data.py --out runs/my_data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ex2l_xai.config import load_config
from ex2l_xai.data import get_dataset
from ex2l_xai.train import train


def write_csv_folder(root: Path, per_group: int = 40, image_size: int = 32) -> Path:
    """Write images and ``metadata.csv`` in the csv layout; returns the CSV path."""
    rows = []
    for split, source in (("train", "train"), ("val", "val"), ("test", "test")):
        ds = get_dataset("synthetic", source, challenge="m2m_hard", per_group=per_group, image_size=image_size,
                         minority_fraction=0.1)
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            img, _ = ds.render_numpy(i)
            path = f"{split}/{i:05d}.png"
            Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(root / path)
            rows.append({"path": path, "label": int(ds.labels[i]), "confounder": int(ds.confounders[i]),
                         "env": int(ds.envs[i]), "split": split})
    csv = root / "metadata.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/my_data")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(args.out)
    csv = write_csv_folder(out / "data", per_group=args.per_group)

    results = {}
    for algorithm in ("erm", "ex2l"):
        config = load_config("quick", [
            "data.name=csv",
            f"data.root={out / 'data'}",
            f"data.options={{csv: {csv}, image_size: 32}}",
            f"algorithm.name={algorithm}",
            f"train.epochs={args.epochs}",
        ])
        results[algorithm] = train(config, out / algorithm, quiet=True)

    print(f"{'group':24} " + " ".join(f"{a:>12}" for a in results))
    groups = sorted(set().union(*(r["test"]["per_group"] for r in results.values())))
    for g in groups:
        cells = []
        for r in results.values():
            cell = r["test"]["per_group"].get(g)
            cells.append(f"{cell['acc']:7.2f} (n={cell['n']})" if cell else f"{'-':>12}")
        print(f"{g:24} " + " ".join(cells))
    for a, r in results.items():
        print(f"{a}: test average {r['test']['avg_acc']:.3f}, worst group {r['test']['worst_group_acc']:.3f}")
    return results


if __name__ == "__main__":
    main()
