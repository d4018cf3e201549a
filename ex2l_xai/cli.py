"""The ``ex2l`` command line: ``train``, ``evaluate``, ``demo`` (and ``audit``, ``figures`` added by the
analysis layer).

Each sub-command is one function decorated with :func:`command`, which adds its sub-parser and sets the handler;
adding a sub-command is adding one such function. Any :class:`~ex2l_xai.errors.Ex2lError` becomes one line
``ex2l: error: <message>`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ex2l_xai.errors import Ex2lError

log = logging.getLogger("ex2l_xai.cli")

Handler = Callable[[argparse.Namespace], int | None]
Adder = Callable[[argparse._SubParsersAction], None]
COMMANDS: list[Adder] = []

DEMO_ALGORITHMS = ("erm", "groupdro", "ex2l")
#: The demo: the pretrained regime (EfficientNet-Lite0 with ImageNet weights) on the calibrated benchmark
#: (m2m_hard_salient, where the methods' numbers and maps can differ; on plain m2m_hard every method sits at the
#: floor), at half the `pretrained` preset's data and 3 of its 6 epochs so `make demo` stays within 5 minutes on
#: 2 cores (docs/quickstart.md has the measured times).
DEMO_PRESET = "pretrained"
DEMO_OVERRIDES = ("data.options.per_group=150", "data.options.test_per_group=100", "train.epochs=3")


def command(adder: Adder) -> Adder:
    """Register a function that adds one sub-parser (and ``set_defaults(func=handler)``) to ``ex2l``."""
    COMMANDS.append(adder)
    return adder


def build_parser() -> argparse.ArgumentParser:
    """The ``ex2l`` parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="ex2l", description="eXplaining to Learn: train, evaluate and audit classifiers for spurious reliance."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for adder in COMMANDS:
        adder(sub)
    return parser


def _version() -> str:
    from ex2l_xai import __version__

    return __version__


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings and errors only")


# ---- train ---------------------------------------------------------------------------------------------------
@command
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one run into a run folder (resumes an unfinished one); under torchrun, one DDP run",
        description="Train one run into a run folder; rerunning on an unfinished folder resumes it. Started by "
        "`torchrun --nproc_per_node N -m ex2l_xai.cli train ...` it trains with DistributedDataParallel over the "
        "N processes (gloo on the CPU, nccl on CUDA; data.batch_size is the global batch; rank 0 writes the folder).",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE_OR_PRESET",
                   help="a YAML file or a preset: quick, spawrious_m2m_hard, waterbirds")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set algorithm.name=erm --set train.epochs=5 (repeatable)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the run folder")
    _add_common(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ex2l_xai import distributed
    from ex2l_xai.config import load_config
    from ex2l_xai.train import resolve_device, train

    config = load_config(args.config, args.overrides)
    # under torchrun (WORLD_SIZE > 1): one DDP run over the processes, gloo on the CPU, nccl on CUDA
    backend = "nccl" if resolve_device(config.train.device).type == "cuda" else "gloo"
    with distributed.process_group(backend):
        results = train(config, args.out, quiet=args.quiet)
        if distributed.is_main():
            title = f"{args.out} (test metrics of the selected epoch)"
            print(_format_table([_row(results["algorithm"], results)], title=title))
    return 0


# ---- evaluate ------------------------------------------------------------------------------------------------
@command
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a run's selected model (best.pt) on a split")
    p.add_argument("run", metavar="RUN", help="a run folder written by `ex2l train`")
    p.add_argument("--split", default="test", help="train, val, test (synthetic also oracle_val); default test")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the metrics dict as JSON instead of a table")
    _add_common(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ex2l_xai.train import evaluate

    m = evaluate(args.run, args.split, device=args.device)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    lines = [f"{args.run} on {args.split}: average {m['avg_acc']:.4f}, mean group {m['mean_group_acc']:.4f}, "
             f"worst group {m['worst_group_acc']:.4f}", f"{'group':<28}{'acc':>8}{'n':>8}"]
    lines += [f"{g:<28}{v['acc']:>8.4f}{v['n']:>8d}" for g, v in m["per_group"].items()]
    print("\n".join(lines))
    return 0


# ---- demo ----------------------------------------------------------------------------------------------------
@command
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="ERM, GroupDRO and eX2L fine-tuned from ImageNet weights on the built-in benchmark, a comparison "
        "table and the audit report"
    )
    p.add_argument("--out", "-o", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    _add_common(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ex2l_xai.config import load_config
    from ex2l_xai.models import FrozenPrefixCache
    from ex2l_xai.train import train

    start = time.time()
    out = Path(args.out)
    rows, run_dirs = [], []
    cache = FrozenPrefixCache()  # the three models start from the same ImageNet weights: one prefix per image
    for name in DEMO_ALGORITHMS:
        config = load_config(DEMO_PRESET, [*DEMO_OVERRIDES, *args.overrides, f"algorithm.name={name}"])
        run_dir = out / name
        log.info("demo: training %s into %s", name, run_dir)
        results = train(config, run_dir, quiet=args.quiet, prefix_cache=cache)
        rows.append(_row(name, results))
        run_dirs.append(run_dir)
    train_seconds = time.time() - start
    title = ("demo: synthetic m2m_hard_salient (calibrated), EfficientNet-Lite0 (ImageNet) fine-tuned, test metrics "
             "of the selected epoch")
    print(_format_table(rows, title=title))
    print(f"training + evaluation wall time: {train_seconds:.0f} s")
    _demo_report(run_dirs, out)
    print(f"total wall time: {time.time() - start:.0f} s; runs in {out}")
    return 0


def _demo_report(run_dirs: Sequence[Path], out: Path) -> None:
    """THE demo's single call site of the audit report (``analysis.report.demo_report``): ``<out>/report``."""
    from analysis.report import demo_report

    start = time.time()
    path = demo_report(list(run_dirs), out / "report")
    print(f"audit report ({time.time() - start:.0f} s): {path}")


def _row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    return {
        "algorithm": name,
        "val_avg": results["val"]["avg_acc"],
        "val_wga": results["val"]["worst_group_acc"],
        "test_avg": results["test"]["avg_acc"],
        "test_wga": results["test"]["worst_group_acc"],
        "epoch": results["selected_epoch"],
        "seconds": results.get("wall_seconds", float("nan")),
    }


def _format_table(rows: list[dict[str, Any]], title: str = "") -> str:
    head = f"{'algorithm':<12}{'test avg':>10}{'test WGA':>10}{'val avg':>10}{'val WGA':>10}{'epoch':>7}{'time':>8}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['algorithm']:<12}{r['test_avg']:>10.3f}{r['test_wga']:>10.3f}{r['val_avg']:>10.3f}"
            f"{r['val_wga']:>10.3f}{r['epoch']:>7d}{r['seconds']:>7.0f}s"
        )
    return "\n".join(lines)


# ---- audit and figures (the analysis layer) ------------------------------------------------------------------
@command
def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="audit runs, or models trained elsewhere, for spurious reliance: report.html, audit.json, "
        "figures/",
        description="Audit run folders (RUN ...) and/or models trained elsewhere (--model ... --data DIR): "
        "accuracy per group, background swaps, Grad-CAMs, their sanity check and faithfulness, latent space, "
        "leakage probes.")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders written by `ex2l train` (the first model is "
                   "the reference of the gaming warnings, e.g. ERM)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    g = p.add_argument_group("models trained elsewhere (repeat --model to compare several)")
    g.add_argument("--model", action="append", default=[], metavar="SPEC",
                   help="torchvision:NAME or a torchvision name (resnet18), timm:NAME, or a TorchScript file "
                   "(torchscript:PATH)")
    g.add_argument("--weights", action="append", default=[], metavar="FILE",
                   help="state dict (torch.save(model.state_dict())) of each torchvision/timm --model, in order")
    g.add_argument("--pretrained", action="store_true", help="timm:NAME and torchvision models: the library's own "
                   "pretrained weights (downloaded or from its cache; with their own classes) instead of --weights")
    g.add_argument("--name", action="append", default=[], metavar="NAME", help="display name of each --model")
    g.add_argument("--data", metavar="DIR", help="the images: DIR/<class>/<image> (ImageFolder; no CSV needed) or "
                   "any folder with a CSV that has a label column")
    g.add_argument("--csv", metavar="FILE", help="per image: path, [label,] [confounder][, env][, mask][, split] "
                   "(default DIR/metadata.csv; without it, DIR/<class>/<image> with no confounder: the audit groups "
                   "by the slices it discovers)")
    g.add_argument("--skip-unreadable", action="store_true", help="skip image files that are missing or cannot "
                   "be decoded (their count is logged) instead of stopping at the first")
    g.add_argument("--image-size", type=int, default=224, metavar="N", help="images are resized to N x N "
                   "(default 224)")
    g.add_argument("--normalize", default="auto", metavar="STATS",
                   help="input normalisation the models expect (images are read in [0, 1]): auto (default: "
                   "ImageNet's mean/std for torchvision models and TorchScript files, a timm model's own), "
                   "imagenet, none, MEAN,STD or M1,M2,M3,S1,S2,S3")
    g.add_argument("--layer", metavar="PATH", help="module path of the CAM layer (default: found automatically, "
                   "e.g. layer4 of a ResNet)")
    g.add_argument("--num-classes", type=int, metavar="N", help="model outputs (default: the data's labels)")
    p.add_argument("--split", default=None,
                   help="split to audit: of the runs' dataset (default test); of --data's CSV when it has a split "
                   "column (default test; without one every row)")
    p.add_argument("--segmentations", metavar="DIR", help="Waterbirds runs: CUB-200-2011's segmentations/ "
                   "folder, as object masks (background swaps, CAM-in-object)")
    _add_settings(p)
    _add_common(p)
    p.set_defaults(func=_cmd_audit)


#: The options of ``ex2l audit`` that are fields of ``analysis.settings.AuditSettings`` (flag, default and help
#: come from the field; none is written out here).
AUDIT_OPTIONS = ("max_samples", "intervention_samples", "sanity_samples", "sanity_steps", "seed", "device", "rule",
                 "n_rows", "umap_epochs", "cam_variants", "faithfulness", "faith_steps", "faith_samples",
                 "faith_baseline")


def _add_settings(p: argparse.ArgumentParser, names: tuple[str, ...] = AUDIT_OPTIONS) -> None:
    """Add the audit options ``names`` to ``p``, built from ``AuditSettings``'s fields (imported lazily)."""
    from analysis.settings import cli_options

    for opt in cli_options(names):
        p.add_argument(opt.flag, **opt.kwargs)


def _settings(args: argparse.Namespace, names: tuple[str, ...] = AUDIT_OPTIONS, **fixed: Any) -> Any:
    """The ``AuditSettings`` of parsed options (0 means None where the field says so) and ``fixed`` values."""
    from analysis.settings import AuditSettings, cli_options

    values = {o.name: o.value(getattr(args, o.name)) for o in cli_options(names)}
    return AuditSettings(**values, **fixed)


def _audit_items(args: argparse.Namespace) -> list[Any]:
    """The run folders and the models trained elsewhere that ``ex2l audit`` was given, as audit items."""
    from analysis.audit import AuditTarget
    from analysis.loading import external_targets

    if not args.runs and not args.model:
        raise Ex2lError("audit: give run folders (RUN ...) or models trained elsewhere (--model SPEC --data DIR)")
    items: list[Any] = [AuditTarget(model=r, segmentations=args.segmentations) if args.segmentations else r
                        for r in args.runs]
    if args.model:
        if not args.data:
            raise Ex2lError("--model: needs --data DIR (the images to audit it on, with their CSV)")
        items += external_targets(args.model, args.weights, data=args.data, csv=args.csv, names=args.name,
                                  split=args.split, image_size=args.image_size, normalize=args.normalize,
                                  layer=args.layer, num_classes=args.num_classes, device=args.device or "cpu",
                                  skip_unreadable=args.skip_unreadable, pretrained=args.pretrained)
    elif args.weights or args.data or args.name or args.skip_unreadable or args.pretrained:
        raise Ex2lError("--weights/--data/--name/--skip-unreadable/--pretrained: only with --model")
    return items


def _cmd_audit(args: argparse.Namespace) -> int:
    from analysis.report import audit

    split = args.split or "test"
    res = audit(_audit_items(args), args.out, _settings(args, split=split), quiet=args.quiet)
    head = (f"{'model':<16}{'avg acc':>9}{'WGA':>8}{'BG-gap':>8}{'only BG':>9}{'CAM ok':>8}{'MMD_env':>10}"
            f"{'leak(z)':>9}{'leak(logit)':>12}{'CAM in obj':>12}")
    lines = [f"audit of {len(res['runs'])} model(s) on {split}", head, "-" * len(head)]

    def f(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in res["runs"]:
        lk, iv, ok = r["leakage"], r.get("interventions") or {}, r.get("cam_sanity_passes")
        lines.append(f"{r['name'][:15]:<16}{f(r['avg_acc']):>9}{f(r['worst_group_acc']):>8}{f(iv.get('bg_gap')):>8}"
                     f"{f(iv.get('only_bg_acc')):>9}{'n/a' if ok is None else 'yes' if ok else 'NO':>8}"
                     f"{f(r['mmd_env'], '.4f'):>10}{f(lk['within_label_acc']):>9}{f(lk['logit_leak']):>12}"
                     f"{f(r['cam_in_mask']):>12}")
    lines += [f"warning: {w}" for w in res["warnings"]]
    lines.append(f"report: {res['report']}")
    print("\n".join(lines))
    return 0


@command
def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer-confounders", help="infer the confounders of a run's data from its model: a table to train "
        "GroupDRO or eX2L on (--set data.confounders=FILE)",
        description="Cluster a finished run's latents beside the label (the label head's directions and the class "
        "means removed; a Gaussian mixture, k by BIC) into confounders shared across classes, for the splits "
        "given (fitted on the first). Writes FILE (split, index, confounder, label) and FILE.json (k, BIC and, "
        "where the data has confounders, ARI/NMI against them). Train on it with "
        "`ex2l train ... --set data.confounders=FILE` (docs/training.md, 'Inferred confounders').")
    p.add_argument("run", metavar="RUN", help="the first stage: a run folder written by `ex2l train` (e.g. ERM)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the confounder table to write (CSV)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], metavar="SPLIT",
                   help="splits to label, the first one fitted (default: train val; the test split keeps its "
                   "true confounders for evaluation)")
    p.add_argument("--k", type=int, default=None, help="number of confounders (default: chosen by BIC)")
    p.add_argument("--k-max", type=int, default=8, help="largest k that BIC considers (default 8; from 2)")
    p.add_argument("--dims", type=int, default=8, help="PCA components clustered (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of PCA and the mixture (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    _add_common(p)
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from analysis.infer_confounders import infer_confounders, write_inferred

    frames, report = infer_confounders(args.run, splits=tuple(args.splits), k=args.k, k_max=args.k_max,
                                       dims=args.dims, seed=args.seed, device=args.device)
    out = write_inferred(args.out, frames, report)
    lines = [f"{out}: k = {report['k']} confounders (BIC over {min(report['bic'])}..{max(report['bic'])}), "
             f"fitted on {report['fitted_on']}"]
    for s, e in report["splits"].items():
        score = (f", ARI {e['ari']:.3f}, NMI {e['nmi']:.3f} (groups: ARI {e['group_ari']:.3f})" if "ari" in e
                 else " (no true confounders to score against)")
        lines.append(f"  {s}: {e['n']} samples, sizes {e['sizes']}{score}")
    print("\n".join(lines))
    return 0


FIGURE_OPTIONS = ("max_samples", "seed")


@command
def _add_figures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", help="the paper's Figs. 1-3 and results table from run folders")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `ex2l train`")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--only", default="fig1,fig2,fig3,table", help="comma-separated subset of fig1,fig2,fig3,table")
    p.add_argument("--split", default="test", help="split to draw and tabulate (default test)")
    _add_settings(p, FIGURE_OPTIONS)
    _add_common(p)
    p.set_defaults(func=_cmd_figures)


def _cmd_figures(args: argparse.Namespace) -> int:
    from analysis.paper import paper_figures

    which = [w.strip() for w in args.only.split(",") if w.strip()]
    written = paper_figures(args.runs, args.out, _settings(args, FIGURE_OPTIONS, split=args.split), which=which)
    print("\n".join(f"{k}: {v}" for k, v in written.items()))
    return 0


# ---- entry point ---------------------------------------------------------------------------------------------
def _setup_logging(quiet: bool) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_ex2l", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._ex2l = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    level = logging.WARNING if quiet else logging.INFO
    root.setLevel(level)
    logging.getLogger("ex2l_xai").setLevel(level)
    logging.getLogger("analysis").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ex2l`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status (2 on an Ex2lError,
    printed as one line on stderr; argparse exits with 2 itself on a usage error).

    Before anything else it asks OpenMP to wait passively (``OMP_WAIT_POLICY=PASSIVE``, unless the environment
    sets it): OpenMP threads that spin while waiting make CPU training 10-50x slower when other processes share
    the cores, and waiting passively costs little on an idle machine. OpenMP reads the variable when torch is
    first loaded, which the commands do lazily, after this point; importing this module sets nothing."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except Ex2lError as exc:
        print(f"ex2l: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ex2l: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
