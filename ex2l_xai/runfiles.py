"""The files of a run folder (a contract of docs/architecture.md): their names, and every read and write of them.

:class:`RunFiles` is the one place that spells ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, ``best.pt``,
``results.json`` and ``done``; everything it writes goes through :mod:`ex2l_xai.fileio` (atomic replaces, fsynced
appends). It handles plain data only (YAML text, JSON records, torch payloads), so the lowest modules may use it
(:mod:`ex2l_xai.models` for ``model.init_from``, :mod:`ex2l_xai.launch` for a sweep's ``done`` test).
:class:`ex2l_xai.train.rundir.RunFolder` adds the typed reads on top: the :class:`~ex2l_xai.config.Config` of
``config.yaml`` and the selected model rebuilt from ``best.pt``.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from ex2l_xai.errors import TrainingError
from ex2l_xai.fileio import append_line, atomic_save, atomic_write, atomic_write_json

__all__ = ["RUN_FILES", "RunFiles", "read_jsonl"]


class RunFiles:
    """The files of the run folder ``path`` (which need not exist yet).

    Reads raise :class:`~ex2l_xai.errors.TrainingError` naming the file and what was expected; writes are
    atomic. ``os.fspath(RunFiles(p))`` is the folder, so it goes wherever a path does.
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    BEST = "best.pt"
    RESULTS = "results.json"
    DONE = "done"
    NAMES = (CONFIG, METRICS, CHECKPOINT, BEST, RESULTS, DONE)
    """Every file a finished run folder holds, in the order the contract lists them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFiles) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ---- names -------------------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        """``config.yaml``: the resolved configuration."""
        return self.path / self.CONFIG

    @property
    def metrics_file(self) -> Path:
        """``metrics.jsonl``: one JSON record per evaluation."""
        return self.path / self.METRICS

    @property
    def checkpoint_file(self) -> Path:
        """``checkpoint.pt``: the latest state, for resume."""
        return self.path / self.CHECKPOINT

    @property
    def best_file(self) -> Path:
        """``best.pt``: the selected model and what rebuilds and names it."""
        return self.path / self.BEST

    @property
    def results_file(self) -> Path:
        """``results.json``: the finished run's metrics."""
        return self.path / self.RESULTS

    @property
    def done_file(self) -> Path:
        """``done``: the empty marker written last."""
        return self.path / self.DONE

    # ---- state -------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether a run was started here (the folder holds ``config.yaml``)."""
        return self.config_file.is_file()

    def is_done(self) -> bool:
        """Whether the run finished (``done`` is there)."""
        return self.done_file.exists()

    def has_checkpoint(self) -> bool:
        """Whether there is a checkpoint to resume from."""
        return self.checkpoint_file.exists()

    def create(self) -> None:
        """Create the folder (and its parents) if missing."""
        self.path.mkdir(parents=True, exist_ok=True)

    def clear_progress(self) -> None:
        """Remove ``metrics.jsonl`` and ``best.pt`` (a run that starts from epoch 0 again)."""
        self.metrics_file.unlink(missing_ok=True)
        self.best_file.unlink(missing_ok=True)

    # ---- config.yaml ---------------------------------------------------------------------------------------------
    def read_config_dict(self) -> dict[str, Any]:
        """``config.yaml`` as a raw dict (not validated)."""
        path = self.config_file
        if not path.is_file():
            raise TrainingError(f"{self.path}: no {self.CONFIG}; expected a run folder written by `ex2l train`")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise TrainingError(f"{path}: cannot read it ({exc})") from exc
        except yaml.YAMLError as exc:
            raise TrainingError(f"{path}: invalid YAML ({exc})".replace("\n", " ")) from exc
        if not isinstance(raw, dict):
            raise TrainingError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        return raw

    def write_config_text(self, text: str) -> None:
        """Write ``config.yaml`` (YAML text)."""
        atomic_write(self.config_file, text)

    # ---- metrics.jsonl -------------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (a last line cut by a kill is dropped); [] without the file."""
        return read_jsonl(self.metrics_file)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one evaluation record (fsynced)."""
        append_line(self.metrics_file, record)

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep the records of epochs up to ``last_epoch`` (those of later, unfinished epochs go)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    # ---- checkpoint.pt and best.pt -------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``checkpoint.pt``."""
        atomic_save(self.checkpoint_file, partial(torch.save, state))

    def load_checkpoint(self) -> dict[str, Any]:
        """The ``checkpoint.pt`` dict, on the CPU (RNG states stay there)."""
        try:
            return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingError(
                f"{self.checkpoint_file}: cannot resume from this checkpoint ({_one_line(exc)}); delete it to "
                "restart"
            ) from exc

    def save_best(self, payload: dict[str, Any]) -> None:
        """Write ``best.pt``."""
        atomic_save(self.best_file, partial(torch.save, payload))

    def load_best(self) -> dict[str, Any]:
        """The ``best.pt`` payload, on the CPU."""
        path = self.best_file
        if not path.is_file():
            raise TrainingError(f"{self.path}: no {self.BEST}; the run has not finished an evaluated epoch")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingError(f"{path}: cannot load ({_one_line(exc)})") from exc

    # ---- results.json and done -----------------------------------------------------------------------------------
    def read_results(self, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """The ``results.json`` dict; None when it is missing and ``missing_ok``."""
        path = self.results_file
        if not path.is_file():
            if missing_ok:
                return None
            raise TrainingError(f"{self.path}: no {self.RESULTS}; expected a finished run folder (written by "
                                "`ex2l train`)")
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{path}: cannot read {self.RESULTS} ({exc})") from exc
        if not isinstance(results, dict):
            raise TrainingError(f"{path}: expected a JSON object, got {type(results).__name__}")
        return results

    def finish(self, results: dict[str, Any]) -> None:
        """Write ``results.json``, then the ``done`` marker (last: a folder with ``done`` is complete)."""
        atomic_write_json(self.results_file, results)
        atomic_write(self.done_file, "")


RUN_FILES = RunFiles.NAMES


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (the CLI prints an error as one line)."""
    return " ".join(str(exc).split())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a last line cut by a kill is dropped, with any after it); [] without
    the file."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: dropped, the epoch is redone
                break
    return out
