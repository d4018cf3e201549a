"""Shared command-line handling of the figure scripts (``figures/fig*.py``, ``figures/table_results.py``).

Each script is ``python figures/<script>.py RUN [RUN ...] --out FILE [options]`` and regenerates one artefact of
the paper from run folders written by ``ex2l train`` (the built-in benchmark, Spawrious or Waterbirds alike).
The work is done by :func:`analysis.paper.paper_figures`; ``ex2l figures RUN... --out DIR`` makes all four at once.
The options that are audit settings (subsample, seed, device, UMAP epochs, the grid's rule and rows) are built from
:class:`analysis.settings.AuditSettings`'s fields, defaults included.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from analysis.settings import AuditSettings, cli_options
from ex2l_xai.errors import Ex2lError

COMMON = ("max_samples", "seed", "device")


def parser(description: str, out_help: str, *, umap: bool = False, grid: bool = False) -> argparse.ArgumentParser:
    """The common arguments: runs, --out, --split, --max-samples, --seed (+ UMAP or grid options)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `ex2l train`")
    p.add_argument("--out", "-o", required=True, type=Path, help=out_help)
    p.add_argument("--split", default="test", help="split of the runs' dataset (default test)")
    names = COMMON + (("umap_epochs",) if umap else ()) + (("rule", "n_rows") if grid else ())
    if umap or grid:
        p.add_argument("--names", default=None, help="comma-separated display names (default: the algorithms)")
        for opt in cli_options(names):
            p.add_argument(opt.flag, **opt.kwargs)
        p.add_argument("--dpi", type=int, default=130, help="resolution of the PNG (default 130)")
    if grid:
        p.add_argument("--cam", default="true", choices=("true", "pred"),
                       help="label CAM at the true label y (default) or at the prediction")
        p.add_argument("--show-conf", action="store_true", help="add each confounder head's CAM (at c)")
    p.set_defaults(setting_names=names if umap or grid else ())
    p.add_argument("--quiet", "-q", action="store_true", help="warnings and errors only")
    return p


def run(artefact: str, args: argparse.Namespace) -> int:
    """Make one artefact (``fig1``, ``fig2``, ``fig3`` or ``table``) into ``args.out``; errors as one line."""
    from analysis.paper import paper_figures

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    names = [n.strip() for n in args.names.split(",")] if getattr(args, "names", None) else None
    values = {o.name: o.value(getattr(args, o.name)) for o in cli_options(args.setting_names)}
    kwargs = {"names": names}
    if hasattr(args, "dpi"):
        kwargs["dpi"] = args.dpi
    if hasattr(args, "cam"):
        kwargs.update(cam=args.cam, show_conf=args.show_conf)
    try:
        settings = AuditSettings(split=args.split, **values)
        with tempfile.TemporaryDirectory() as tmp:
            written = paper_figures(args.runs, tmp, settings, which=[artefact], **kwargs)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(written[artefact]), args.out)
    except Ex2lError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


def main(artefact: str, p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    return run(artefact, p.parse_args(argv))
