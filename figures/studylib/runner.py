"""Which run folders of a study are missing, and training them through :mod:`ex2l_xai.launch`.

Every configuration is a run folder ``<root>/<benchmark>/<method>/seed<k>`` trained with ``ex2l_xai.train``; a
folder with ``done`` (and its diagnostics) is skipped, an unfinished one resumes. Methods that start from another
run (``init_from``) or train on the confounders another run infers (``confounders_from``: the table is written
into that run's folder, :data:`INFERRED`, the first time it is needed) run in a second wave, after that run."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ex2l_xai.runfiles import RunFiles
from studylib.regimes import Regime

log = logging.getLogger("study")
DIAGNOSTICS = "study_metrics.json"
"""The per-run diagnostics file written next to the run folder's own files."""
INFERRED = "inferred_confounders.csv"
"""The confounder table a first-stage run infers (``ex2l infer-confounders``), in its own folder."""


def run_dir(root: Path, bench: str, method: str, seed: int) -> Path:
    """The run folder of one configuration."""
    return root / bench / method / f"seed{seed}"


def overrides_for(regime: Regime, bench: str, method: str, seed: int, extra: Sequence[str] = (),
                  root: Path | None = None) -> list[str]:
    """The ``--set`` overrides of one configuration (on top of the regime's preset); ``extra`` last. A method
    that starts from another run gets ``model.init_from`` pointing at that run's folder under ``root``."""
    start = []
    if method in regime.init_from:
        if root is None:
            raise ValueError(f"{method} starts from {regime.init_from[method]}: pass the study root")
        start = [f"model.init_from={run_dir(root, bench, regime.init_from[method], seed)}"]
    if method in regime.confounders_from:
        if root is None:
            raise ValueError(f"{method} trains on {regime.confounders_from[method]}'s confounders: pass the study root")
        start = [f"data.confounders={run_dir(root, bench, regime.confounders_from[method], seed) / INFERRED}"]
    return [*regime.base, *regime.benchmarks[bench].overrides, *regime.methods[method].overrides, *start,
            f"seed={seed}", *extra]


def train_one(regime: Regime, bench: str, method: str, seed: int, root: str, threads: int,
              extra: tuple[str, ...] = (), device: str = "cpu", measure: Callable[[Path], dict] | None = None
              ) -> tuple[str, float, str]:
    """Worker: train (or resume / skip) one configuration, then measure it with ``measure`` (default
    :func:`studylib.measure.measure_run`; passed in so a job pickled by value needs no ``studylib`` import)."""
    import torch

    torch.set_num_threads(threads)
    from ex2l_xai.config import load_config
    from ex2l_xai.fileio import atomic_write_json
    from ex2l_xai.train import train

    if measure is None:
        from studylib.measure import measure_run as measure

    out = run_dir(Path(root), bench, method, seed)
    t0 = time.time()
    if method in regime.confounders_from:
        ensure_inferred(run_dir(Path(root), bench, regime.confounders_from[method], seed))
    config = load_config(regime.preset, overrides_for(regime, bench, method, seed, extra, Path(root)))
    config.train.device = device
    train(config, out, quiet=True)
    if not (out / DIAGNOSTICS).exists():
        atomic_write_json(out / DIAGNOSTICS, measure(out), indent=1)
    return f"{bench}/{method}/seed{seed}", time.time() - t0, ""


def ensure_inferred(first: Path) -> Path:
    """The confounder table inferred from the finished run ``first`` (written once, into its folder)."""
    table = first / INFERRED
    if not table.exists():
        from analysis.infer_confounders import infer_confounders, write_inferred

        frames, report = infer_confounders(first)
        write_inferred(table, frames, report)
    return table


def finished(root: Path, bench: str, method: str, seed: int) -> bool:
    """Whether a configuration is trained and measured."""
    out = run_dir(root, bench, method, seed)
    return RunFiles(out).is_done() and (out / DIAGNOSTICS).exists()


def jobs_of(regime: Regime, root: Path, seeds: Sequence[int] | None = None, only: str = ""
            ) -> list[list[tuple[str, str, int]]]:
    """The configurations still to run, in waves: a method that starts from another run comes after it.
    Seed-major within a wave, so a sweep cut short still covers every configuration; ``seeds`` (default: each
    method's own) restricts the seeds, never extends a method's."""
    top = max(len(regime.seeds_of(m)) for m in regime.methods)
    todo = [
        (b, m, s)
        for s in range(top)
        for b in regime.benchmarks
        for m in regime.methods_of(b)
        if s in regime.seeds_of(m) and (seeds is None or s in seeds)
        and (not only or re.search(only, f"{b}/{m}")) and not finished(root, b, m, s)
    ]
    first = [j for j in todo if regime.needs(j[1]) is None]
    second = [j for j in todo if regime.needs(j[1]) is not None]
    for b, m, s in second:  # what a second-wave run starts from must run too, even outside --only
        dep = (b, regime.needs(m), s)
        if dep not in first and not finished(root, *dep):
            first.append(dep)
    return [w for w in (first, second) if w]


def launch_runs(regime: Regime, root: Path, options: object, *, seeds: Sequence[int] | None = None, only: str = "",
                threads: int = 1, extra: Sequence[str] = (), device: str = "cpu", log_dir: Path | None = None) -> int:
    """Train what is missing, wave by wave, through ``ex2l_xai.launch`` with ``options`` (a ``LaunchOptions``);
    failed runs are logged with their log files (they resume at the next call). Returns 1 if any failed."""
    import studylib.measure
    from ex2l_xai.launch import Job, launch

    waves = jobs_of(regime, root, seeds, only)
    total = sum(len(w) for w in waves)
    jobs = [[Job(f"{b}/{m}/seed{s}", train_one, (regime, b, m, s, str(root), threads, tuple(extra), device,
                                               studylib.measure.measure_run),
                 skip_if=str(run_dir(root, b, m, s) / DIAGNOSTICS)) for b, m, s in wave] for wave in waves]
    log.info("%d configurations to run in %s", total, root)
    t0 = time.time()
    report = launch(jobs, options, log_dir or root / "logs", name=f"study-{regime.name}",
                    by_value=[sys.modules[train_one.__module__], sys.modules["studylib.regimes"], studylib.measure])
    for f in report.failed:
        log.error("%s failed: %s (log: %s)", f.name, f.error, f.log)
    log.info("study: %d runs in %.0f s, %d failed", total, time.time() - t0, len(report.failed))
    return 1 if report.failed else 0
