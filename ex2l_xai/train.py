"""The trainer: loop, evaluation every epoch, model selection, atomic checkpoints, resume, run-folder logs.

``train(config, out_dir)`` writes DESIGN.md's run folder::

    config.yaml     the resolved configuration
    metrics.jsonl   one JSON object per evaluation: epoch, step, lr, loss (parts averaged over the epoch),
                    stats (the algorithm's epoch statistics), val, test[, oracle_val] (metrics dicts), seconds
    checkpoint.pt   latest state for resume (model + algorithm buffers, optimizer, scheduler, RNG states, best)
    best.pt         the selected model: {"model": state_dict, "epoch", "score", "selection", ...}
    results.json    {"algorithm", "dataset", "seed", "selection", "selected_epoch", "val", "test", ...}
    done            empty marker, written last

Both ``.pt`` files are written atomically and load with ``torch.load(..., weights_only=True)``. Rerunning on a
folder without ``done`` resumes from ``checkpoint.pt``; the shuffling of epoch ``e`` and every RNG the epoch uses
are seeded from ``(seed, e)``, so a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ex2l_xai.algorithms import Algorithm, TrainInfo, build_algorithm
from ex2l_xai.config import Config, config_from_dict, config_to_dict, dump_config
from ex2l_xai.data import get_dataset
from ex2l_xai.errors import ConfigError, Ex2lError, TrainingError
from ex2l_xai.fileio import append_line, atomic_save, atomic_write, atomic_write_json
from ex2l_xai.metrics import group_metrics
from ex2l_xai.models import TwoHeadNet

log = logging.getLogger(__name__)

__all__ = [
    "RUN_FILES",
    "build_datasets",
    "build_model",
    "evaluate",
    "load_run_model",
    "resolve_device",
    "seed_everything",
    "train",
]

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt", "results.json", "done")
EVAL_SPLITS = ("val", "test", "oracle_val")
_IGNORED_ON_RESUME = (("train", "quiet"), ("train", "device"))
_SELECTION_KEY = {"val_worst_group_acc": "worst_group_acc", "val_avg_acc": "avg_acc"}


# ---- set-up --------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint32)[0])


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


class CachedDataset(Dataset):
    """Every sample of ``dataset`` decoded once, kept in memory; other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.samples = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def dataset_kwargs(config: Config) -> dict[str, Any]:
    """Options passed to :func:`ex2l_xai.data.get_dataset` (``data.options`` plus ``data.root``)."""
    kwargs = dict(config.data.options)
    if config.data.root is not None:
        kwargs["root"] = config.data.root
    return kwargs


def _splits_of(config: Config) -> tuple[str, ...]:
    from ex2l_xai.data import DATASETS, SPLITS

    splits = getattr(DATASETS[config.data.name], "splits", SPLITS)
    return ("train", *[s for s in EVAL_SPLITS if s in splits])


def build_datasets(config: Config) -> dict[str, Any]:
    """``train``, ``val``, ``test`` (and ``oracle_val`` where the dataset has it), cached if ``data.cache``."""
    out: dict[str, Any] = {}
    for split in _splits_of(config):
        ds = get_dataset(config.data.name, split, **dataset_kwargs(config))
        out[split] = CachedDataset(ds) if config.data.cache else ds
    return out


def build_model(config: Config, n_labels: int, n_confounders: int) -> TwoHeadNet:
    """The two-head network of ``config``, with a confounder head only if the algorithm needs one."""
    head = n_confounders if config.params().needs_confounder_head() else 0
    m = config.model
    return TwoHeadNet(
        m.backbone,
        n_labels,
        head,
        architecture=m.architecture,  # type: ignore[arg-type]
        cam_layer=m.cam_layer,
        pretrained=m.pretrained,
        width=m.width,
        freeze=m.freeze,
        cache_frozen=m.cache_frozen,
        init_from=m.init_from,
    )


def _build_optimizer(config: Config, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(config: Config, epoch: int) -> float:
    """Multiplier of ``optim.lr`` during epoch ``epoch`` (0-based): linear warm-up, then the schedule."""
    s, total = config.schedule, config.train.epochs
    if epoch < s.warmup_epochs:
        return (epoch + 1) / (s.warmup_epochs + 1)
    t = epoch - s.warmup_epochs
    if s.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / max(1, total - s.warmup_epochs)))
    if s.name == "step":
        return s.gamma ** (t // s.step_size)
    return 1.0


def _build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(epoch: int) -> float:
        return lr_factor(config, epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _loader(config: Config, dataset: Any, *, shuffle: bool, seed: int | None, device: torch.device) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size if shuffle else config.data.eval_batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=config.data.num_workers,
        worker_init_fn=_worker_init if config.data.num_workers > 0 else None,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


# ---- evaluation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_split(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Predicted labels, labels and confounders over a loader (``model(x)`` returns label logits or an output
    whose first entry is)."""
    was_training = model.training
    model.eval()
    preds, labels, confs = [], [], []
    try:
        for batch in loader:
            out = model(batch["image"].to(device))
            logits = out if isinstance(out, Tensor) else out[0]
            preds.append(logits.argmax(1).cpu())
            labels.append(batch["label"])
            confs.append(batch["confounder"])
    finally:
        model.train(was_training)
    return {
        "pred": torch.cat(preds).numpy(),
        "label": torch.cat(labels).numpy(),
        "confounder": torch.cat(confs).numpy(),
    }


def split_metrics(model: nn.Module, loader: DataLoader, dataset: Any, device: torch.device) -> dict[str, Any]:
    """DESIGN.md's metrics dict ``M`` of ``model`` on one split."""
    p = predict_split(model, loader, device)
    groups = p["label"] * dataset.n_confounders + p["confounder"]
    return group_metrics(p["pred"], p["label"], groups, dataset.groups)


class _Predictor(nn.Module):
    """``algorithm.predict`` as a module, for :func:`predict_split`."""

    def __init__(self, algorithm: Algorithm) -> None:
        super().__init__()
        self.algorithm = algorithm

    def forward(self, x: Tensor) -> Tensor:
        return self.algorithm.predict(x)


# ---- run-folder files (written through ex2l_xai.fileio) -------------------------------------------------
def _read_metrics(path: Path) -> list[dict[str, Any]]:
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


# ---- RNG state (plain types only, so weights_only loading works) --------------------------------------------
def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- config checks -------------------------------------------------------------------------------------------
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


def _check_same_config(path: Path, config: Config) -> None:
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


# ---- the loop ------------------------------------------------------------------------------------------------
def _selection_score(config: Config, record: dict[str, Any]) -> float:
    score = float(record["val"][_SELECTION_KEY[config.train.selection]])
    return -math.inf if math.isnan(score) else score


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train(config: Config, out_dir: str | os.PathLike[str], *, quiet: bool = False) -> dict[str, Any]:
    """Train ``config`` into the run folder ``out_dir`` and return its ``results.json`` as a dict.

    A folder with ``done`` is skipped (its results are returned); a folder with ``checkpoint.pt`` is resumed.
    Both require the folder's ``config.yaml`` to match ``config`` (``train.quiet`` and ``train.device`` aside).

    Parameters
    ----------
    config : Config
        The configuration (see :func:`ex2l_xai.config.load_config`).
    out_dir : path
        The run folder (created if missing).
    quiet : bool
        No progress bars; per-epoch summaries at DEBUG instead of INFO level.

    Raises
    ------
    TrainingError
        On a non-finite loss (the last good checkpoint is kept), or a folder started with another config.
    """
    out = Path(out_dir)
    quiet = quiet or config.train.quiet
    level = logging.DEBUG if quiet else logging.INFO
    name = config.algorithm_name
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.yaml"
    if cfg_file.exists():
        _check_same_config(cfg_file, config)
    if (out / "done").exists():
        try:
            results = json.loads((out / "results.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"{out}: marked done but results.json is unreadable ({exc})") from exc
        log.log(level, "%s: already done, skipped (%s)", out, name)
        return results
    atomic_write(cfg_file, dump_config(config))

    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = config.train.deterministic
        torch.backends.cudnn.benchmark = not config.train.deterministic
    seed = config.seed
    seed_everything(seed)
    datasets = build_datasets(config)
    train_set = datasets["train"]
    counts = [int(c) for c in train_set.group_counts()]
    info = TrainInfo(train_set.n_labels, train_set.n_confounders, train_set.n_groups, counts)
    torch.manual_seed(seed)
    model = build_model(config, train_set.n_labels, train_set.n_confounders)
    algorithm = build_algorithm(name, model, config.params(), info).to(device)
    optimizer = _build_optimizer(config, algorithm.parameters())
    scheduler = _build_scheduler(config, optimizer)
    predictor = _Predictor(algorithm)
    eval_splits = [s for s in EVAL_SPLITS if s in datasets]
    eval_loaders = {s: _loader(config, datasets[s], shuffle=False, seed=None, device=device) for s in eval_splits}

    first_epoch, step, elapsed = 0, 0, 0.0
    best: dict[str, Any] | None = None  # {"epoch", "score", "record"}
    ckpt_file, metrics_file, best_file = out / "checkpoint.pt", out / "metrics.jsonl", out / "best.pt"
    if ckpt_file.exists():
        try:
            ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)  # RNG states stay on the CPU
            algorithm.load_state_dict(ckpt["algorithm"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except Ex2lError:
            raise
        except Exception as exc:
            raise TrainingError(f"{ckpt_file}: cannot resume from this checkpoint ({exc}); delete it to restart") from exc
        _set_rng_state(ckpt["rng"])
        first_epoch, step, elapsed, best = ckpt["epoch"], ckpt["step"], ckpt["elapsed"], ckpt["best"]
        kept = [r for r in _read_metrics(metrics_file) if r.get("epoch", 0) <= first_epoch]
        atomic_write(metrics_file, "".join(json.dumps(r) + "\n" for r in kept))
        log.log(level, "%s: resuming %s after epoch %d", out, name, first_epoch)
    else:
        metrics_file.unlink(missing_ok=True)
        best_file.unlink(missing_ok=True)

    epochs = config.train.epochs
    show_bar = not quiet and sys.stderr.isatty()
    for epoch in range(first_epoch, epochs):
        t0 = time.time()
        random.seed(_epoch_seed(seed, epoch, 1))
        np.random.seed(_epoch_seed(seed, epoch, 2))
        torch.manual_seed(_epoch_seed(seed, epoch, 3))
        loader = _loader(config, train_set, shuffle=True, seed=seed * 1000 + epoch, device=device)
        lr = optimizer.param_groups[0]["lr"]
        algorithm.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(loader, desc=f"{name} epoch {epoch + 1}/{epochs}", disable=not show_bar, leave=False)
        for batch in bar:
            batch = _to_device(batch, device)
            loss, parts = algorithm.loss(batch, epoch)
            if not torch.isfinite(loss.detach()):
                kept_msg = (
                    f"the last good checkpoint (epoch {epoch}) is kept in {ckpt_file}"
                    if ckpt_file.exists()
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"non-finite loss ({float(loss.detach())}) at epoch {epoch + 1}, step {step + 1} "
                    f"(batch {n_batches + 1}) of {out}; training stopped, {kept_msg}; try a lower optim.lr "
                    "or train.grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(algorithm.parameters(), config.train.grad_clip)
            optimizer.step()
            step += 1
            n_batches += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if show_bar:
                bar.set_postfix(loss=f"{parts.get('loss', float(loss.detach())):.3f}")
        bar.close()
        scheduler.step()
        stats = {k: float(v) for k, v in algorithm.epoch_stats().items()}
        done_epoch = epoch + 1
        if done_epoch % config.train.eval_every == 0 or done_epoch == epochs:
            record: dict[str, Any] = {
                "epoch": done_epoch,
                "step": step,
                "lr": lr,
                "loss": {k: v / max(1, n_batches) for k, v in sums.items()},
                "stats": stats,
            }
            for split in eval_splits:
                record[split] = split_metrics(predictor, eval_loaders[split], datasets[split], device)
            score = _selection_score(config, record)
            if best is None or score > best["score"]:
                best = {"epoch": done_epoch, "score": score, "record": record}
                payload = _best_payload(config, algorithm.model, train_set, best)
                atomic_save(best_file, partial(torch.save, payload))
            record["seconds"] = time.time() - t0
            append_line(metrics_file, record)
            log.log(level, "%s", _summary(name, done_epoch, epochs, record))
        elapsed += time.time() - t0
        checkpoint = {
            "epoch": done_epoch,
            "step": step,
            "elapsed": elapsed,
            "algorithm": algorithm.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "best": best,
        }
        atomic_save(ckpt_file, partial(torch.save, checkpoint))

    assert best is not None  # the last epoch is always evaluated
    rec = best["record"]
    results: dict[str, Any] = {
        "algorithm": name,
        "dataset": config.data.name,
        "seed": seed,
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
    atomic_write_json(out / "results.json", results)
    (out / "done").touch()
    log.log(level, "%s: done in %.1f s (selected epoch %d)", out, elapsed, best["epoch"])
    return results


def _best_payload(config: Config, model: TwoHeadNet, train_set: Any, best: dict[str, Any]) -> dict[str, Any]:
    return {
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


def _summary(name: str, epoch: int, epochs: int, r: dict[str, Any]) -> str:
    text = f"{name} epoch {epoch}/{epochs}: loss {r['loss'].get('loss', float('nan')):.3f}"
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


def load_run_model(run_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[TwoHeadNet, Config]:
    """The selected model of a run folder (``best.pt``), in eval mode, and the run's config."""
    config = load_run_config(run_dir)
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise TrainingError(f"{run_dir}: no best.pt; the run has not finished an evaluated epoch")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: cannot load ({exc})") from exc
    m = config.model
    model = TwoHeadNet(
        m.backbone,
        payload["n_labels"],
        payload["n_confounders"],
        architecture=m.architecture,  # type: ignore[arg-type]
        cam_layer=m.cam_layer,
        pretrained="none",
        width=m.width,
        freeze=m.freeze,
    )
    model.load_state_dict(payload["model"])
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval(), config


def evaluate(
    run_dir: str | os.PathLike[str], split: str = "test", *, device: str = "auto", batch_size: int | None = None
) -> dict[str, Any]:
    """Metrics dict ``M`` of a run's selected model (``best.pt``) on ``split`` of its dataset."""
    dev = resolve_device(device)
    model, config = load_run_model(run_dir, dev)
    dataset = get_dataset(config.data.name, split, **dataset_kwargs(config))
    if batch_size is not None:
        config.data.eval_batch_size = batch_size
    loader = _loader(config, dataset, shuffle=False, seed=None, device=dev)
    return split_metrics(model, loader, dataset, dev)
