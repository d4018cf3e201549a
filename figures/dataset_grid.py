"""Grid of built-in synthetic samples: one row per Spawrious challenge, one column per class and environment.

Each cell shows one image with its object mask outlined, titled with its background. Usage::

    python figures/dataset_grid.py --out docs/img/datasets_grid.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from ex2l_xai.data import CHALLENGES, get_dataset  # noqa: E402
from ex2l_xai.fileio import atomic_save  # noqa: E402


def draw(out: Path, image_size: int = 64, seed: int = 0) -> Path:
    """Draw the grid to ``out`` (PNG) and return the path."""
    envs = ["train_env1", "train_env2", "test"]
    classes = ["bulldog", "dachshund", "labrador", "corgi"]
    fig, axes = plt.subplots(len(CHALLENGES), len(classes) * len(envs), figsize=(15, 8.6), squeeze=False)
    for r, challenge in enumerate(CHALLENGES):
        opts = {"challenge": challenge, "per_group": 12, "image_size": image_size, "seed": seed}
        splits = {0: get_dataset("synthetic", "train", **opts), 2: get_dataset("synthetic", "test", **opts)}
        splits[1] = splits[0]
        for c, cls in enumerate(classes):
            for e, env in enumerate(envs):
                ax = axes[r, c * len(envs) + e]
                ds = splits[e]
                t = ds.table
                i = int(t.index[(t["label"] == c) & (t["env"] == e)][0])
                sample = ds[i]
                ax.imshow(sample["image"].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.contour(sample["mask"][0].numpy(), levels=[0.5], colors="white", linewidths=0.7)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(ds.confounder_names[sample["confounder"]], fontsize=7, pad=2)
                if r == 0:
                    ax.text(
                        0.5,
                        1.32,
                        f"{cls}\n{env}",
                        transform=ax.transAxes,
                        ha="center",
                        va="bottom",
                        fontsize=7.5,
                        weight="bold" if e == 0 else None,
                    )
                if c == 0 and e == 0:
                    ax.set_ylabel(challenge, fontsize=9, weight="bold")
    fig.suptitle(
        "Built-in synthetic benchmark: one sample per class x environment (title: background; "
        "white: object mask)",
        fontsize=10,
        y=0.995,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.965), h_pad=0.9, w_pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    buf.seek(0)
    # a 256-colour palette keeps the noisy textures' PNG small enough for the repository
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    atomic_save(out, lambda f: small.save(f, format="png", optimize=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img/datasets_grid.png"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(draw(args.out, args.image_size, args.seed))


if __name__ == "__main__":
    main()
