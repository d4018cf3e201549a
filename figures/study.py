"""The eX2L studies of docs/results.md: which settings of the penalty work, measured on the built-in benchmark.

Each study is a sweep file, ``figures/sweeps/<regime>.yaml`` (data, not code: preset, benchmarks, methods, seeds;
see :mod:`studylib.regimes`), with its own tables and section of docs/results.md:

* ``calibrated`` (docs/results.md's first section): the paper's regime on the benchmark calibrated to the
  paper's ERM (``m2m_hard_salient``), 10 seeds for the headline methods, paired differences with bootstrap
  intervals;
* ``budget``: the calibrated study's ERM and channel variants again at twice its budget (12 epochs);
* ``inferred``: GroupDRO and the paper's form on confounders inferred from ERM's latents;
* ``pretrained``: EfficientNet-Lite0 with ImageNet weights (the ``pretrained`` preset) on m2m_hard, o2o_hard and
  the minority variant, ERM, GroupDRO, the eX2L variants and the baselines of DomainBed and SubpopBench;
* ``scratch``: the first study, a small CNN trained from scratch (the ``quick`` preset's network, 64 px).

Every configuration is a run folder ``<root>/<benchmark>/<method>/seed<k>``; a folder with ``done`` is skipped,
an unfinished one resumes, so the sweep can be stopped and restarted at will. Methods that start from another run
(``init_from``) run in a second wave. After training, each run gets ``study_metrics.json``: on the test split, the
share of all-zero label CAMs, the share of label-CAM mass inside the object mask, the overlap of the label and
confounder CAMs, and the decision-level leak::

    python figures/study.py all --regime calibrated --jobs 2 --threads 1 --md docs/results.md
    python figures/study.py run --regime calibrated --jobs 2              # train what is missing (resumable)
    python figures/study.py report --regime calibrated --md docs/results.md   # tables; rewrite the section
    python figures/study.py run --only 'erm$' --seeds 0                   # a subset
    python figures/study.py measure --regime calibrated --force           # diagnostics again (the audit's checks)

Model selection, as DomainBed: within a run the epoch is chosen on the training-distribution validation split
(``val``: worst-group accuracy, ties broken by the lower validation cross-entropy); the tables add the epoch the
worst-group validation cross-entropy picks and the *oracle*, re-chosen on ``oracle_val`` (a split drawn from the
test environments, disjoint from test). eX2L's default is the variant with the best mean validation worst-group
accuracy over the regime's ``choose_on`` benchmarks, ties broken by the validation cross-entropy; the oracle choice
is reported beside it, labelled as such. Test numbers never choose anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from studylib.aggregate import collect  # noqa: E402
from studylib.docs import rewrite_section  # noqa: E402
from studylib.regimes import load_regimes  # noqa: E402
from studylib.runner import launch_runs  # noqa: E402
from studylib.tables import outcome, render  # noqa: E402

from ex2l_xai.fileio import atomic_write_json  # noqa: E402
from ex2l_xai.launch import LAUNCHERS, LaunchOptions  # noqa: E402

REGIMES = load_regimes()


def cmd_run(args: argparse.Namespace) -> int:
    """Train what is missing through the chosen launcher (ex2l_xai.launch); failed runs resume next time."""
    options = LaunchOptions(
        launcher=args.launcher, workers=args.jobs, partition=args.partition, gpus_per_job=args.gpus,
        tasks_per_job=args.tasks_per_job, cpus_per_task=args.cpus, mem_gb=args.mem_gb, time_min=args.time,
        array_parallelism=args.array_parallelism, slurm_args=dict(kv.split("=", 1) for kv in args.slurm_arg),
        start_method="spawn" if args.device != "cpu" else "fork",  # no fork after CUDA init
    )
    return launch_runs(REGIMES[args.regime], Path(args.root), options, seeds=args.seeds, only=args.only,
                       threads=args.threads, extra=args.set, device=args.device,
                       log_dir=Path(args.log_dir) if args.log_dir else None)


def cmd_measure(args: argparse.Namespace) -> int:
    """(Re)measure the diagnostics of every finished run: those without them, or all with --force."""
    import torch
    from studylib.measure import measure_run
    from studylib.runner import DIAGNOSTICS, run_dir

    from ex2l_xai.fileio import atomic_write_json
    from ex2l_xai.runfiles import RunFiles

    torch.set_num_threads(args.threads)
    regime, root = REGIMES[args.regime], Path(args.root)
    for b in regime.benchmarks:
        for m in regime.methods_of(b):
            for s in regime.seeds_of(m):
                out = run_dir(root, b, m, s)
                if RunFiles(out).is_done() and (args.force or not (out / DIAGNOSTICS).exists()):
                    atomic_write_json(out / DIAGNOSTICS, measure_run(out), indent=1)
                    logging.getLogger("study").info("measured %s", out)
    return 0


def cmd_default(args: argparse.Namespace) -> int:
    """eX2L's default chosen on validation across studies (``--from REGIME=ROOT`` or ``REGIME=SUMMARY.json``,
    repeatable; later sources add to or replace the methods of earlier ones)."""
    import json

    from studylib.tables import choose_default

    merged: dict[str, dict] = {}
    for spec in args.sources:
        name, _, src = spec.partition("=")
        if name not in REGIMES or not src:
            raise SystemExit(f"--from {spec!r}: expected REGIME=ROOT or REGIME=SUMMARY.json, REGIME one of {sorted(REGIMES)}")
        path = Path(src)
        table = json.loads(path.read_text()) if path.suffix == ".json" else collect(path, REGIMES[name])
        for bench, rows in table.items():
            merged.setdefault(name, {}).setdefault(bench, {}).update(rows)
    choice, scores = choose_default([(merged[n], REGIMES[n]) for n in merged])
    for m, sc in sorted(scores.items(), key=lambda kv: (-kv[1]["score"], kv[1]["val_nll"])):
        print(f"{m:22s} mean val WGA {100 * sc['score']:.1f}  mean val CE {sc['val_nll']:.5f}  over {sc['benchmarks']}")
    print(f"chosen on validation: {choice}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Aggregate the finished runs, print the tables, write summary.json and (with --md) the docs section."""
    import json

    regime = REGIMES[args.regime]
    root = Path(args.root)
    table = collect(root, regime, args.seeds)
    for path in args.add or []:  # rows of methods this root lacks, from a summary of the same configurations
        summary = json.loads(Path(path).read_text())
        for b in regime.benchmarks:
            for m in regime.methods_of(b):
                recs = summary.get(b, {}).get(m)
                if recs and m not in table.get(b, {}):
                    table.setdefault(b, {})[m] = [r for r in recs if args.seeds is None or r["seed"] in args.seeds]
    text = render(table, regime)
    if regime.baselines:
        text = f"**Outcome.** {outcome(table, regime)}\n\n{text}"
    atomic_write_json(root / "summary.json", table, indent=1)
    if args.md:
        rewrite_section(Path(args.md), regime.markers, text)
    print(text)
    return 0


def _launcher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher (ex2l_xai.launch; see docs/scaling.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local processes (default), slurm (submitit), submitit-local or debug")
    g.add_argument("--log-dir", default=None, help="job logs (default <root>/logs)")
    g.add_argument("--partition", default=None, help="slurm: partition")
    g.add_argument("--gpus", type=int, default=0, help="slurm: GPUs per run (one DDP task per GPU)")
    g.add_argument("--tasks-per-job", type=int, default=None,
                   help="processes per run (default: one per GPU, else 1); > 1 trains each run with DDP")
    g.add_argument("--cpus", type=int, default=4, help="slurm: CPUs per task")
    g.add_argument("--mem-gb", type=int, default=None, help="slurm: memory per node")
    g.add_argument("--time", type=int, default=240, help="slurm: minutes per job (preempted or timed-out "
                   "jobs are requeued and resume)")
    g.add_argument("--array-parallelism", type=int, default=32, help="slurm: jobs of a wave's array running at once")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: an extra #SBATCH option, e.g. account=lab (repeatable)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "all", "measure"):
        p = sub.add_parser(name)
        p.add_argument("--regime", choices=sorted(REGIMES), default="calibrated", help="which study (a sweep file)")
        p.add_argument("--root", default=None, help="where the run folders live (default runs/study/<regime>)")
        p.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="only these seeds (default: each method's own, as its sweep file says)")
        p.add_argument("--quiet", action="store_true")
        if name in ("run", "all"):
            p.add_argument("--jobs", type=int, default=1, help="runs in parallel (local launcher: processes)")
            p.add_argument("--threads", type=int, default=1, help="torch threads per run")
            p.add_argument("--only", default="", help="regex on '<benchmark>/<method>'")
            p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (tests: tiny runs)")
            p.add_argument("--device", default="cpu", help="train.device of every run (cpu, cuda, auto)")
            _launcher_args(p)
        if name in ("report", "all"):
            p.add_argument("--md", default="", help="rewrite the regime's study section of this markdown file")
            p.add_argument("--add", action="append", metavar="SUMMARY.json",
                           help="rows of methods the root lacks, from another study's summary.json of the same "
                           "configurations (e.g. the pretrained study's, for the inferred study's true-confounder "
                           "rows; repeatable)")
        if name == "measure":
            p.add_argument("--force", action="store_true", help="measure runs that have diagnostics too")
            p.add_argument("--threads", type=int, default=1, help="torch threads")
    d = sub.add_parser("default", help="eX2L's default chosen on validation across studies")
    d.add_argument("--from", dest="sources", action="append", required=True, metavar="REGIME=ROOT|SUMMARY.json")
    args = ap.parse_args(argv)
    if args.cmd == "default":
        return cmd_default(args)
    if args.root is None:
        args.root = str(ROOT / "runs" / "study" / args.regime)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "report":
        return cmd_report(args)
    if args.cmd == "measure":
        return cmd_measure(args)
    failed = cmd_run(args)  # all: train what is missing, then write the tables (of what finished)
    return cmd_report(args) or failed


if __name__ == "__main__":
    sys.exit(main())
