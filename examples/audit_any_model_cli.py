"""Audit a model trained by a plain PyTorch script, from the command line, without writing audit code.

Part 1 is any training script: a torchvision ResNet-18 trained with ImageNet-normalised inputs on images of an
ImageFolder tree (``data/<class>/<image>.png``), saved with ``torch.save(model.state_dict(), "model.pt")``. The
images come from the built-in benchmark's training distribution, where each class sits on its own backgrounds, so
the model has a background to lean on.

Part 2 is the audit: a CSV naming each test image's background (the confounder) and object mask, then

    ex2l audit --model resnet18 --weights OUT/model.pt --data OUT/test --csv OUT/test/audit.csv \\
        --image-size 64 --out OUT/audit

(run here through ``ex2l_xai.cli.main``, the same code as the ``ex2l`` command). ``--normalize`` is left at
``auto``: ImageNet's statistics for a torchvision model, as the training script used.

    python examples/audit_any_model_cli.py --out runs/audit_any_model
"""

from __future__ import annotations

import argparse
import csv
import shlex
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from ex2l_xai.cli import main as ex2l
from ex2l_xai.data import get_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_tree(dataset, root: Path, with_csv: bool) -> None:
    """PNG files root/<class>/<n>.png (and their masks, and root/audit.csv naming each file's background)."""
    rows = []
    for i in range(len(dataset)):
        s = dataset[i]
        rel = f"{dataset.label_names[s['label']]}/{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(s["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / rel)
        if with_csv:  # masks live beside the tree (a folder inside it would read as one more class)
            mask = f"../{root.name}_masks/{i:04d}.png"
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((s["mask"][0].numpy() * 255).astype(np.uint8)).save(root / mask)
            rows.append({"path": rel, "confounder": dataset.confounder_names[s["confounder"]], "mask": mask})
    if with_csv:
        with open(root / "audit.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "confounder", "mask"])
            writer.writeheader()
            writer.writerows(rows)


def train_plain(train_dir: Path, steps: int, size: int) -> torch.nn.Module:
    """Part 1: a plain PyTorch training script (no ex2l-xai)."""
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize((size, size)),
                                         torchvision.transforms.ToTensor(),
                                         torchvision.transforms.Normalize(MEAN, STD)])
    data = torchvision.datasets.ImageFolder(str(train_dir), transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(data.classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/audit_any_model")
    ap.add_argument("--per-group", type=int, default=60, help="training images per class and environment")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the plain script")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--interventions", type=int, default=120)
    args = ap.parse_args(argv)
    out = Path(args.out)

    data = {"challenge": "o2o_easy", "image_size": args.size, "per_group": args.per_group,
            "test_per_group": max(6, args.per_group // 2)}
    write_tree(get_dataset("synthetic", "train", **data), out / "train", with_csv=False)
    write_tree(get_dataset("synthetic", "val", **data), out / "test", with_csv=True)  # training distribution
    model = train_plain(out / "train", args.steps, args.size)
    torch.save(model.state_dict(), out / "model.pt")  # what a training script leaves behind

    argv_audit = ["audit", "--model", "resnet18", "--weights", str(out / "model.pt"), "--data", str(out / "test"),
                  "--csv", str(out / "test" / "audit.csv"), "--image-size", str(args.size), "--out",
                  str(out / "audit"), "--interventions", str(args.interventions), "--name", "my ResNet-18",
                  "--quiet"]
    print("$ ex2l " + " ".join(shlex.quote(a) for a in argv_audit))
    return ex2l(argv_audit)


if __name__ == "__main__":
    raise SystemExit(main())
