"""Shared command-line handling of the figure scripts (``figures/fig*.py``, ``figures/table_results.py``).

Each script is ``python figures/<script>.py RUN [RUN ...] --out FILE [options]`` and regenerates one artefact of
the paper from run folders written by ``ex2l train`` (the built-in benchmark, Spawrious or Waterbirds alike).
The work is done by :func:`analysis.audit.paper_figures`; ``ex2l figures RUN... --out DIR`` makes all four at once.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ex2l_xai.errors import Ex2lError


def parser(description: str, out_help: str, *, umap: bool = False, grid: bool = False) -> argparse.ArgumentParser:
    """The common arguments: runs, --out, --split, --max-samples, --seed (+ UMAP or grid options)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `ex2l train`")
    p.add_argument("--out", "-o", required=True, type=Path, help=out_help)
    p.add_argument("--split", default="test", help="split of the runs' dataset (default test)")
    if umap or grid:
        p.add_argument("--names", default=None, help="comma-separated display names (default: the algorithms)")
        p.add_argument("--max-samples", type=int, default=2000, metavar="N",
                       help="seeded, group-stratified subsample (default 2000; 0 = all)")
        p.add_argument("--seed", type=int, default=0, help="seed of the subsample, rows and UMAP (default 0)")
        p.add_argument("--device", default=None, help="cpu (default) or cuda")
        p.add_argument("--dpi", type=int, default=130, help="resolution of the PNG (default 130)")
    if umap:
        p.add_argument("--umap-epochs", type=int, default=None, help="UMAP epochs (default: UMAP's)")
    if grid:
        p.add_argument("--rule", default="worst_groups", choices=("worst_groups", "disagreement", "random"),
                       help="how rows are chosen (default worst_groups: the first run's worst groups)")
        p.add_argument("--rows", type=int, default=6, help="number of rows (default 6)")
        p.add_argument("--cam", default="true", choices=("true", "pred"),
                       help="label CAM at the true label y (default) or at the prediction")
        p.add_argument("--show-conf", action="store_true", help="add each confounder head's CAM (at c)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    return p


def run(artefact: str, args: argparse.Namespace) -> int:
    """Make one artefact (``fig1``, ``fig2``, ``fig3`` or ``table``) into ``args.out``; errors as one line."""
    from analysis.audit import paper_figures

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    names = [n.strip() for n in args.names.split(",")] if getattr(args, "names", None) else None
    kwargs = {"split": args.split, "names": names}
    for key in ("seed", "device", "dpi"):
        if hasattr(args, key):
            kwargs[key] = getattr(args, key)
    if hasattr(args, "max_samples"):
        kwargs["max_samples"] = args.max_samples or None
    if hasattr(args, "umap_epochs"):
        kwargs["umap_epochs"] = args.umap_epochs
    if hasattr(args, "rule"):
        kwargs.update(rule=args.rule, n_rows=args.rows, cam=args.cam, show_conf=args.show_conf)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            written = paper_figures(args.runs, tmp, which=[artefact], **kwargs)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(written[artefact]), args.out)
    except Ex2lError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


def main(artefact: str, p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    return run(artefact, p.parse_args(argv))
