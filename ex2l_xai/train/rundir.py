"""The run folder (a contract of docs/architecture.md): its files, the checks before a run starts or resumes in it, the
payload of ``best.pt``, ``results.json``, and loading a finished run. Every file is written through
:mod:`ex2l_xai.fileio`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ex2l_xai.backbones import vit_image_size
from ex2l_xai.config import SELECTION_METRIC, Config, config_from_dict, config_to_dict
from ex2l_xai.errors import ConfigError, TrainingError
from ex2l_xai.fileio import atomic_write
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.train.builders import EVAL_SPLITS, build_model, resolve_device

__all__ = [
    "RUN_FILES",
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

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "results.json", "done")
_IGNORED_ON_RESUME = (("train", "quiet"), ("train", "device"))


# ---- metrics.jsonl -------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a last line cut by a kill is dropped); [] without the file."""
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


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep the records of epochs up to ``last_epoch`` (those of later, unfinished epochs go)."""
    kept = [r for r in read_metrics(path) if r.get("epoch", 0) <= last_epoch]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


# ---- config.yaml ---------------------------------------------------------------------------------------------
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


def check_same_config(path: Path, config: Config) -> None:
    """TrainingError unless the run folder's ``config.yaml`` (``path``) equals ``config`` (``train.quiet`` and
    ``train.device`` aside); the message names the first differing key."""
    try:
        old_raw = yaml.safe_load(path.read_text()) or {}
        old = config_to_dict(config_from_dict(old_raw))
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingError(f"{path}: cannot read the run's configuration ({exc})".replace("\n", " ")) from exc
    except ConfigError as exc:
        raise TrainingError(f"{path}: the run's configuration is no longer valid ({exc})") from exc
    a, b = _comparable(old), _comparable(config_to_dict(config))
    diff = sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))
    if diff:
        k = diff[0]
        raise TrainingError(
            f"{path.parent}: this run folder was started with another configuration ({k}: "
            f"{a.get(k, '<missing>')!r} there, {b.get(k, '<missing>')!r} now"
            f"{f', and {len(diff) - 1} more keys' if len(diff) > 1 else ''}); use another --out or delete the folder"
        )


# ---- selection, best.pt, results.json ------------------------------------------------------------------------
def selection_score(config: Config, record: dict[str, Any]) -> float:
    """The model-selection score of an evaluation record (-inf for NaN)."""
    score = float(record["val"][SELECTION_METRIC[config.train.selection]])
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
    """The :class:`Config` of a run folder (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no config.yaml; expected a run folder written by `ex2l train`")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainingError(f"{path}: invalid YAML ({exc})".replace("\n", " ")) from exc
    return config_from_dict(raw)


def load_best(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``best.pt`` payload of a run folder."""
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no best.pt; the run has not finished an evaluated epoch")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: cannot load ({exc})") from exc


def load_run(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[TwoHeadNet, Config, dict]:
    """The selected model of a run folder in eval mode, its config and the rest of its ``best.pt`` payload;
    the network is built by the same builder as in training (:func:`~ex2l_xai.train.build_model`)."""
    config = load_run_config(run_dir)
    payload = load_best(run_dir)
    model = build_model(config, payload["n_labels"], payload["n_confounders"], conf_head=payload["n_confounders"],
                        initial_weights=False, image_size=vit_image_size(payload["model"]))
    model.load_state_dict(payload.pop("model"))
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval(), config, payload


def load_run_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[TwoHeadNet, Config]:
    """The selected model of a run folder (``best.pt``), in eval mode, and the run's config."""
    model, config, _ = load_run(run_dir, device)
    return model, config
