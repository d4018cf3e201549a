"""The run folder (a contract of docs/architecture.md): :class:`RunFolder`, the one reader and writer of its files
(their names and plain reads and writes come from :class:`~ex2l_xai.runfiles.RunFiles`), the checks before a run
starts or resumes in it, the payload of ``best.pt``, ``results.json``, and loading a finished run. Every file is
written through :mod:`ex2l_xai.fileio`.

The functions ``load_run_config``, ``load_best``, ``load_run``, ``load_run_model``, ``read_metrics`` and
``check_same_config`` are the same operations on a path, kept for their callers."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ex2l_xai.backbones import vit_image_size
from ex2l_xai.config import Config, config_from_dict, config_to_dict, dump_config
from ex2l_xai.errors import ConfigError, TrainingError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.runfiles import RUN_FILES, RunFiles, read_jsonl
from ex2l_xai.train.builders import EVAL_SPLITS, build_model, resolve_device
from ex2l_xai.values import SELECTION_METRIC, SELECTION_MINIMISES

__all__ = [
    "RUN_FILES",
    "RunFiles",
    "RunFolder",
    "best_payload",
    "check_same_config",
    "load_best",
    "load_run",
    "load_run_config",
    "load_run_model",
    "read_metrics",
    "results_of",
    "selection_key",
    "selection_score",
    "summary_line",
    "truncate_metrics",
]

_IGNORED_ON_RESUME = (("train", "quiet"), ("train", "device"))


class RunFolder(RunFiles):
    """A run folder: every file of :class:`~ex2l_xai.runfiles.RunFiles` (names, metrics, checkpoints, results,
    ``done``) and the typed reads: the run's :class:`~ex2l_xai.config.Config` and its selected model.

    >>> run = RunFolder("runs/demo/erm")
    >>> run.is_done(), run.read_results()["test"]["worst_group_acc"]   # doctest: +SKIP
    >>> model, config, payload = run.load_model("cpu")                   # doctest: +SKIP
    """

    def read_config(self) -> Config:
        """The :class:`Config` of ``config.yaml``."""
        raw = self.read_config_dict()
        try:
            return config_from_dict(raw)
        except ConfigError as exc:
            raise TrainingError(f"{self.config_file}: the run's configuration is not valid ({exc})") from exc

    def write_config(self, config: Config) -> None:
        """Write ``config.yaml``: the resolved configuration."""
        self.write_config_text(dump_config(config))

    def check_config(self, config: Config) -> None:
        """TrainingError unless ``config.yaml`` equals ``config`` (``train.quiet`` and ``train.device`` aside);
        the message names the first differing key."""
        old = config_to_dict(self.read_config())
        a, b = _comparable(old), _comparable(config_to_dict(config))
        diff = sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))
        if diff:
            k = diff[0]
            raise TrainingError(
                f"{self.path}: this run folder was started with another configuration ({k}: "
                f"{a.get(k, '<missing>')!r} there, {b.get(k, '<missing>')!r} now"
                f"{f', and {len(diff) - 1} more keys' if len(diff) > 1 else ''}); use another --out or delete the "
                "folder"
            )

    def load_model(self, device: str | torch.device = "cpu") -> tuple[TwoHeadNet, Config, dict[str, Any]]:
        """The selected model in eval mode on ``device``, the run's config and the rest of the ``best.pt``
        payload; the network is built by the same builder as in training
        (:func:`~ex2l_xai.train.build_model`)."""
        config = self.read_config()
        payload = self.load_best()
        model = build_model(config, payload["n_labels"], payload["n_confounders"],
                            conf_head=payload["n_confounders"], initial_weights=False,
                            image_size=vit_image_size(payload["model"]))
        model.load_state_dict(payload.pop("model"))
        dev = resolve_device(device) if isinstance(device, str) else device
        return model.to(dev).eval(), config, payload


# ---- the same operations on a path (kept for their callers) -------------------------------------------------
def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a last line cut by a kill is dropped); [] without the file. ``path`` is
    the run folder or the file itself."""
    path = Path(path)
    return RunFolder(path).read_metrics() if path.is_dir() else read_jsonl(path)


def truncate_metrics(path: str | os.PathLike[str], last_epoch: int) -> None:
    """Keep the records of epochs up to ``last_epoch`` in the ``metrics.jsonl`` file ``path``."""
    RunFolder(Path(path).parent).truncate_metrics(last_epoch)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    flat = _flatten(d)
    for section, key in _IGNORED_ON_RESUME:
        flat.pop(f"{section}.{key}", None)
    return flat


def check_same_config(path: str | os.PathLike[str], config: Config) -> None:
    """:meth:`RunFolder.check_config` of the run folder whose ``config.yaml`` is ``path``."""
    RunFolder(Path(path).parent).check_config(config)


# ---- selection, best.pt, results.json ------------------------------------------------------------------------
def selection_score(config: Config, record: dict[str, Any]) -> float:
    """The model-selection score of an evaluation record (-inf for NaN)."""
    score = float(record["val"].get(SELECTION_METRIC[config.train.selection], math.nan))
    if config.train.selection in SELECTION_MINIMISES:
        score = -score
    return -math.inf if math.isnan(score) else score


def selection_key(config: Config, record: dict[str, Any]) -> tuple[float, float]:
    """What model selection maximises: the selection score, then, among equal scores, the lower validation
    cross-entropy (``nll``). A training-distribution validation split often scores 100 % at several epochs (the
    spurious feature alone fits it); the cross-entropy still tells the epochs apart. Records without ``nll``
    (older runs) rank below any with it, and among themselves keep the earliest epoch."""
    nll = float(record["val"].get("nll", math.nan))
    return selection_score(config, record), -math.inf if math.isnan(nll) else -nll


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def best_payload(
    config: Config,
    model: TwoHeadNet,
    train_set: Any,
    best: dict[str, Any],
    evaluation_subsets: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """What ``best.pt`` holds: the selected model's state dict and what is needed to rebuild and name it;
    ``evaluation_subsets`` (split -> indices) where the algorithm's metrics leave samples out."""
    payload = {
        "model": _cpu_state(model),
        "epoch": best["epoch"],
        "score": best["score"],
        "selection": config.train.selection,
        "algorithm": config.algorithm_name,
        "n_labels": int(train_set.n_labels),
        "n_confounders": int(model.conf_head.out_features) if model.conf_head is not None else 0,
        "label_names": list(train_set.label_names),
        "confounder_names": list(train_set.confounder_names),
        "group_names": list(train_set.groups),
        "config": config_to_dict(config),
    }
    if evaluation_subsets:
        payload["evaluation_subsets"] = evaluation_subsets
    return payload


def results_of(config: Config, best: dict[str, Any], epochs: int, elapsed: float) -> dict[str, Any]:
    """The ``results.json`` dict of a finished run from its best record."""
    rec = best["record"]
    results: dict[str, Any] = {
        "algorithm": config.algorithm_name,
        "dataset": config.data.name,
        "seed": config.seed,
        "selection": config.train.selection,
        "selected_epoch": best["epoch"],
        "val": rec["val"],
        "test": rec["test"],
    }
    if "oracle_val" in rec:
        results["oracle_val"] = rec["oracle_val"]
    results["epochs"] = epochs
    results["stats"] = rec.get("stats", {})
    if "zero_cam_share" in results["stats"]:
        results["zero_cam_share"] = results["stats"]["zero_cam_share"]
    results["wall_seconds"] = elapsed  # training + evaluation time, summed over resumes
    return results


def summary_line(name: str, epoch: int, epochs: int, r: dict[str, Any]) -> str:
    """One log line of an evaluated epoch."""
    stage = f" [{r['stage']}]" if "stage" in r else ""
    text = f"{name}{stage} epoch {epoch}/{epochs}: loss {r['loss'].get('loss', float('nan')):.3f}"
    for split in EVAL_SPLITS:
        if split in r:
            text += f" | {split} avg {r[split]['avg_acc']:.3f} wga {r[split]['worst_group_acc']:.3f}"
    if "zero_cam_share" in r["stats"]:
        text += f" | zero-CAM {r['stats']['zero_cam_share']:.2f}"
    return text + f" | {r['seconds']:.1f} s"


# ---- loading a finished run ----------------------------------------------------------------------------------
def load_run_config(run_dir: str | os.PathLike[str]) -> Config:
    """The :class:`Config` of a run folder (its ``config.yaml``): :meth:`RunFolder.read_config`."""
    return RunFolder(run_dir).read_config()


def load_best(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``best.pt`` payload of a run folder: :meth:`RunFiles.load_best`."""
    return RunFolder(run_dir).load_best()


def load_run(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[TwoHeadNet, Config, dict]:
    """The selected model of a run folder in eval mode, its config and the rest of its ``best.pt`` payload:
    :meth:`RunFolder.load_model`."""
    return RunFolder(run_dir).load_model(device)


def load_run_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[TwoHeadNet, Config]:
    """The selected model of a run folder (``best.pt``), in eval mode, and the run's config."""
    model, config, _ = RunFolder(run_dir).load_model(device)
    return model, config
