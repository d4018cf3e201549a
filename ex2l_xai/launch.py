"""Launching many runs (a sweep, a study) on local processes or through submitit: SLURM, or submitit's ``local``
and ``debug`` executors (for trying a sweep on one machine).

A sweep is a list of waves of :class:`Job` (a later wave may start from the runs of an earlier one, e.g.
``model.init_from``); each wave is submitted once the one before it has finished. A job whose ``skip_if`` file
exists (its run folder's ``done``) is not submitted; any other job calls a training function that resumes its
run folder where it stopped, so relaunching a sweep after a crash, a kill or a SLURM preemption (submitit requeues
preempted or timed-out jobs through :meth:`Task.checkpoint`) only trains what is left. A failed job does not stop
the others; it is reported in :class:`LaunchReport` with its error and the path of its log.

Launchers (:data:`LAUNCHERS`):

- ``local``: a pool of ``workers`` local processes (``concurrent.futures``); a failed job's traceback is
  written to ``<log_dir>/<job name>.err``.
- ``slurm``: one SLURM job array per wave (``submitit.AutoExecutor``), with ``partition``, ``gpus_per_job``,
  ``time_min``, ``array_parallelism`` and extra ``#SBATCH`` options; logs in ``<log_dir>/<job id>_<task>_log.err``
  (and ``.out``). With
  ``tasks_per_job`` > 1 (default: one task per GPU) each run is one DDP run over its tasks.
- ``submitit-local``: submitit's local executor (each job a subprocess of this machine, same log files).
- ``debug``: submitit's debug executor (jobs run one after the other in this process; a failure opens pdb).

submitit is optional (``pip install submitit``, or the ``cluster`` extra); it is imported only by the launchers
that use it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ex2l_xai.errors import ConfigError, Ex2lError
from ex2l_xai.fileio import atomic_write

log = logging.getLogger("ex2l_xai.launch")

__all__ = [
    "LAUNCHERS",
    "Job",
    "JobFailure",
    "LaunchError",
    "LaunchOptions",
    "LaunchReport",
    "Task",
    "TrainRun",
    "launch",
    "make_executor",
    "require_submitit",
    "submitit_parameters",
    "train_jobs",
]

LAUNCHERS = ("local", "slurm", "submitit-local", "debug")
"""The launchers :func:`launch` knows."""
_SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}


class LaunchError(Ex2lError):
    """Jobs of a sweep failed; the message names each one and its log."""


def require_submitit() -> ModuleType:
    """The ``submitit`` module, or a ConfigError saying how to install it."""
    try:
        import submitit
    except ImportError as exc:
        raise ConfigError(
            "the slurm, submitit-local and debug launchers need submitit: pip install submitit "
            "(or pip install 'ex2l-xai[cluster]')"
        ) from exc
    return submitit


@dataclass
class LaunchOptions:
    """How to launch a sweep (see the module docstring); ``slurm_args`` are extra ``#SBATCH`` options
    (``{"account": "...", "qos": "...", "constraint": "..."}``)."""

    launcher: str = "local"
    workers: int = 1
    partition: str | None = None
    gpus_per_job: int = 0
    tasks_per_job: int | None = None
    cpus_per_task: int = 4
    mem_gb: int | None = None
    time_min: int = 240
    array_parallelism: int = 32
    slurm_args: dict[str, str] = field(default_factory=dict)
    start_method: str | None = None

    @property
    def tasks(self) -> int:
        """Processes per job: ``tasks_per_job``, else one per GPU (at least one)."""
        return self.tasks_per_job if self.tasks_per_job is not None else max(1, self.gpus_per_job)

    def validate(self) -> None:
        """ConfigError for a value out of range, naming the option."""
        checks = [
            ("launcher", self.launcher in LAUNCHERS, f"one of {list(LAUNCHERS)}"),
            ("workers", self.workers >= 1, ">= 1"),
            ("gpus_per_job", self.gpus_per_job >= 0, ">= 0"),
            ("tasks_per_job", self.tasks_per_job is None or self.tasks_per_job >= 1, ">= 1"),
            ("cpus_per_task", self.cpus_per_task >= 1, ">= 1"),
            ("mem_gb", self.mem_gb is None or self.mem_gb >= 1, ">= 1"),
            ("time_min", self.time_min >= 1, ">= 1"),
            ("array_parallelism", self.array_parallelism >= 1, ">= 1"),
            ("start_method", self.start_method in (None, "fork", "spawn", "forkserver"), "fork, spawn or forkserver"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"launch option {key}: expected {what}, got {getattr(self, key)!r}")
        if self.launcher == "local" and self.tasks > 1:
            raise ConfigError(
                f"launch option tasks_per_job={self.tasks}: the local launcher runs one process per job; for a DDP "
                "run per job use submitit-local or slurm (or torchrun for one run)"
            )


@dataclass(frozen=True)
class Job:
    """One job: ``fn(*args)`` (picklable: a module-level function or a callable object), named ``name`` (its
    log's name), skipped when the file ``skip_if`` exists."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    skip_if: str | None = None

    def is_done(self) -> bool:
        """Whether the ``skip_if`` file exists."""
        return self.skip_if is not None and Path(self.skip_if).exists()


@dataclass(frozen=True)
class JobFailure:
    """A failed job: its name, the last line of its error, and the log that holds the whole of it."""

    name: str
    error: str
    log: str


@dataclass
class LaunchReport:
    """What :func:`launch` did: job names finished, skipped (already done) and failed."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[JobFailure] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        """LaunchError naming every failed job and its log."""
        if self.failed:
            lines = "; ".join(f"{f.name}: {f.error} (log: {f.log})" for f in self.failed)
            raise LaunchError(f"{len(self.failed)} of {len(self.failed) + len(self.finished)} jobs failed: {lines}")


@dataclass(frozen=True)
class TrainRun:
    """Train one configuration (a :func:`~ex2l_xai.config.config_to_dict` dict) into the run folder ``out``
    (resuming it), with ``threads`` torch threads when given: the callable a sweep of ``ex2l train`` runs
    submits. Returns the run's ``results.json`` dict."""

    config: dict[str, Any]
    out: str
    threads: int | None = None

    def __call__(self) -> dict[str, Any]:
        import torch

        from ex2l_xai.config import config_from_dict
        from ex2l_xai.train import train

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return train(config_from_dict(self.config), self.out, quiet=True)


def train_jobs(runs: Mapping[str, tuple[Any, str | os.PathLike[str]]], threads: int | None = None) -> list[Job]:
    """One :class:`Job` per ``name -> (Config, run folder)``, skipped when the folder is ``done``."""
    from ex2l_xai.config import config_to_dict
    from ex2l_xai.runfiles import RunFiles

    return [
        Job(name, TrainRun(config_to_dict(config), str(Path(out).resolve()), threads),
            skip_if=str(RunFiles(Path(out).resolve()).done_file))
        for name, (config, out) in runs.items()
    ]


class Task:
    """What a submitit job runs: ``fn(*args)``, inside the process group of the job's tasks when it has several
    (one DDP run: rank 0 writes the run folder; the result is rank 0's). ``checkpoint`` makes submitit requeue
    the same task when SLURM preempts it or its time runs out; the run then resumes from its checkpoint."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...] = ()) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        import submitit

        from ex2l_xai import distributed

        env = submitit.JobEnvironment()
        if env.num_tasks <= 1:
            return self.fn(*self.args)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with distributed.process_group(backend):
            return self.fn(*self.args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue this task unchanged (submitit's preemption hook): the run resumes where it stopped."""
        import submitit

        return submitit.helpers.DelayedSubmission(Task(self.fn, self.args))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name).strip("_") or "job"


def _last_line(text: str) -> str:
    """The error line of a traceback or of submitit's failure message (whose tail lists the log paths)."""
    text = text.split("You can check full logs")[0]
    lines = [s.strip() for s in text.splitlines()]
    lines = [s for s in lines if s and not set(s) <= {"-"} and not s.startswith("- ")]
    return lines[-1] if lines else "failed without a message"


def _run_local(job: Job, log_dir: str) -> tuple[bool, str]:
    """A local worker: run the job; on an exception write its traceback to ``<log_dir>/<name>.err`` and return
    (False, the error's last line) instead of raising it (an exception may not pickle back)."""
    try:
        job.fn(*job.args)
        return True, ""
    except BaseException as exc:  # noqa: BLE001 - any failure of the job is reported, never lost
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        atomic_write(Path(log_dir) / f"{_safe(job.name)}.err", text)
        return False, _last_line(f"{type(exc).__name__}: {exc}")


def _launch_local(jobs: Sequence[Job], options: LaunchOptions, log_dir: Path, report: LaunchReport) -> None:
    method = options.start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=ctx) as pool:
        futures = {pool.submit(_run_local, job, str(log_dir)): job for job in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                ok, error = fut.result()
            except BaseException as exc:  # noqa: BLE001 - the worker died (killed, out of memory)
                ok, error = False, f"worker process died: {type(exc).__name__}: {exc}"
                atomic_write(log_dir / f"{_safe(job.name)}.err", error + "\n")
            if ok:
                report.finished.append(job.name)
                log.info("%s finished", job.name)
            else:
                failure = JobFailure(job.name, error, str(log_dir / f"{_safe(job.name)}.err"))
                report.failed.append(failure)
                log.error("%s failed: %s (log: %s)", job.name, failure.error, failure.log)


def submitit_parameters(options: LaunchOptions, name: str) -> dict[str, Any]:
    """The ``AutoExecutor.update_parameters`` arguments of ``options`` (generic ones, and ``slurm_*`` ones that
    the local and debug executors ignore)."""
    params: dict[str, Any] = {"timeout_min": options.time_min, "tasks_per_node": options.tasks, "name": name}
    if options.gpus_per_job:
        params["gpus_per_node"] = options.gpus_per_job
    if options.launcher == "slurm":
        params.update(cpus_per_task=options.cpus_per_task, nodes=1, slurm_array_parallelism=options.array_parallelism)
        if options.mem_gb is not None:
            params["mem_gb"] = options.mem_gb
        if options.partition:
            params["slurm_partition"] = options.partition
        if options.slurm_args:
            params["slurm_additional_parameters"] = dict(options.slurm_args)
    return params


def make_executor(options: LaunchOptions, log_dir: str | os.PathLike[str], name: str = "ex2l") -> Any:
    """The ``submitit.AutoExecutor`` of a submitit launcher, its logs in ``log_dir``."""
    submitit = require_submitit()
    executor = submitit.AutoExecutor(folder=str(log_dir), cluster=_SUBMITIT_CLUSTER[options.launcher])
    executor.update_parameters(**submitit_parameters(options, name))
    return executor


def _launch_submitit(
    jobs: Sequence[Job], options: LaunchOptions, log_dir: Path, report: LaunchReport, name: str
) -> None:
    executor = make_executor(options, log_dir, name)
    with executor.batch():  # one job array per wave on SLURM
        handles = [executor.submit(Task(job.fn, job.args)) for job in jobs]
    for job, handle in zip(jobs, handles, strict=True):
        try:
            handle.results()  # every task's (a DDP job has several)
        except Exception as exc:  # noqa: BLE001 - reported with the job's log, never swallowed
            failure = JobFailure(job.name, _last_line(str(exc)), str(handle.paths.stderr))
            report.failed.append(failure)
            log.error("%s failed (job %s): %s (log: %s)", job.name, handle.job_id, failure.error, failure.log)
        else:
            report.finished.append(job.name)
            log.info("%s finished (job %s)", job.name, handle.job_id)


def launch(
    waves: Sequence[Sequence[Job]],
    options: LaunchOptions,
    log_dir: str | os.PathLike[str],
    *,
    name: str = "ex2l",
    by_value: Iterable[ModuleType] = (),
) -> LaunchReport:
    """Run the jobs of each wave (skipping those already done), one wave after the other, and report.

    Parameters
    ----------
    waves : list of lists of Job
    options : LaunchOptions
    log_dir : path
        Where logs go: failed local jobs' ``.err`` files, submitit's folders of job logs and pickles.
    name : str
        The SLURM job name.
    by_value : modules
        Modules a job's function lives in that a job's interpreter cannot import (a script run as a file):
        pickled by value (``cloudpickle.register_pickle_by_value``) for the submitit launchers.

    Returns
    -------
    LaunchReport
        Finished, skipped and failed jobs (call ``raise_if_failed()`` to turn failures into a LaunchError).
    """
    options.validate()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if options.launcher != "local":
        require_submitit()
        import cloudpickle

        for module in by_value:
            if module.__name__ != "__main__":
                cloudpickle.register_pickle_by_value(module)
    report = LaunchReport()
    for i, wave in enumerate(waves):
        done = [job.is_done() for job in wave]
        pending = [job for job, d in zip(wave, done, strict=True) if not d]
        report.skipped += [job.name for job, d in zip(wave, done, strict=True) if d]
        if not pending:
            continue
        log.info("wave %d: %d jobs through the %s launcher", i + 1, len(pending), options.launcher)
        if options.launcher == "local":
            _launch_local(pending, options, log_dir, report)
        else:
            _launch_submitit(pending, options, log_dir, report, name)
    return report
