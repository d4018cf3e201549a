"""Audit a model on a bare folder of images (DIR/<class>/<image>, no CSV, no confounder labels).

Nobody labelled what might confound the classes, so the audit discovers it: per class it clusters the images in
the model's own latent (the class's decision direction projected out) into slices, and reports the slices where the
model fails, the features it weighs that single those slices out (spuriosity), and slices.csv (a slice per image).

In practice: ``ex2l audit --model resnet18 --weights mine.pt --data my_images --out audit``. Here the folder is
written from the built-in benchmark (its backgrounds are the hidden confounder) and the ResNet-18 is random, so the
script runs anywhere.

    python examples/audit_an_image_folder.py --out runs/audit_folder
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from ex2l_xai.cli import main as ex2l
from ex2l_xai.data import get_dataset


def write_folder(root: Path, per_group: int, size: int) -> int:
    """The benchmark's test images as root/<class>/<n>.png (no CSV: the backgrounds stay unlabelled)."""
    ds = get_dataset("synthetic", "test", challenge="m2m_hard", per_group=per_group, test_per_group=per_group,
                     image_size=size)
    for i in range(len(ds)):
        s = ds[i]
        path = root / ds.label_names[s["label"]] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((s["image"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    return len(ds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/audit_folder")
    ap.add_argument("--per-group", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    out = Path(args.out)
    n = write_folder(out / "images", args.per_group, args.size)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), out / "model.pt")  # your checkpoint here
    rc = ex2l(["audit", "--model", "resnet18", "--weights", str(out / "model.pt"), "--data", str(out / "images"),
               "--image-size", str(args.size), "--out", str(out / "audit"), "--interventions", "0",
               "--sanity-samples", "4", "--sanity-steps", "2", "--umap-epochs", "50", "--quiet"])
    if rc != 0:
        return rc
    with open(out / "audit" / "slices.csv") as f:
        rows = list(csv.DictReader(f))
    print(f"{n} images, {len(rows)} rows in slices.csv; the worst slices (accuracy gap to their class):")
    import json

    entry = json.loads((out / "audit" / "audit.json").read_text())["runs"][0]
    for s in entry["slices"][:3]:
        print(f"  {s['label_name']}/slice {s['slice']}: {s['size']} images, accuracy {s['acc']:.2f} "
              f"({s['gap']:+.2f} vs its class)")
    print(f"slices per class: {entry['discovery']['k']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
