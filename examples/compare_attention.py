"""Compare where ERM, GroupDRO and eX2L look: three run folders -> a Fig. 1 style grid of Grad-CAMs.

    ex2l demo --out runs/demo        # or your own `ex2l train ... --out DIR` runs on one dataset
    python examples/compare_attention.py runs/demo/erm runs/demo/groupdro runs/demo/ex2l --out attention.png

Rows are test images from the groups where the first run does worst; each cell shows the label CAM at the
true class over the image, titled with the true label y, the prediction ŷ and the background c; the last
column is the eX2L confounder head's own CAM.
"""

from __future__ import annotations

import argparse

from analysis.extract import extract
from analysis.overlays import gradcam_grid
from ex2l_xai.train import build_datasets, load_run_config


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders written by `ex2l train` (one dataset)")
    ap.add_argument("--out", default="attention.png")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--rule", default="worst_groups", choices=["worst_groups", "disagreement", "random"])
    ap.add_argument("--max-samples", type=int, default=400)
    args = ap.parse_args(argv)

    test = build_datasets(load_run_config(args.runs[0]))["test"]  # the dataset the first run was tested on
    extractions = [extract(run, test, max_samples=args.max_samples) for run in args.runs]
    gradcam_grid(extractions, test, args.out, rule=args.rule, n_rows=args.rows, show_conf=True)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
