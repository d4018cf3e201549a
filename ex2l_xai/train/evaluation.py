"""Evaluation: predictions over a split, docs/architecture.md's metrics dict ``M``, and the evaluation of a trained
algorithm on every evaluation split in one function (what the trainer calls after an evaluated epoch).

Under DDP each rank predicts its share of a split (positions ``rank, rank + world, ...``, see
:func:`~ex2l_xai.train.loaders.eval_loader`) and the predictions of all ranks are gathered back into the split's
order before any metric is taken: every rank computes the metrics of the whole split."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ex2l_xai import distributed
from ex2l_xai.algorithms import Algorithm
from ex2l_xai.config import Config
from ex2l_xai.metrics import add_group_nll, group_metrics
from ex2l_xai.train.builders import build_split, resolve_device
from ex2l_xai.train.loaders import eval_loader
from ex2l_xai.train.rundir import RunFolder

__all__ = ["Predictor", "evaluate", "evaluate_algorithm", "predict_split", "split_metrics"]


def _interleave(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rank r's arrays hold positions r, r + world, ... of the split: put them back in the split's order."""
    world = len(parts)
    out = {}
    for key in parts[0]:
        n = sum(len(p[key]) for p in parts)
        full = np.empty(n, dtype=parts[0][key].dtype)
        for r, p in enumerate(parts):
            full[r::world] = p[key]
        out[key] = full
    return out


@torch.no_grad()
def predict_split(
    model: nn.Module, loader: DataLoader, device: torch.device, *, gather: bool = False
) -> dict[str, np.ndarray]:
    """Predicted labels, labels, confounders and the per-sample cross-entropy of the label (``nll``) over a
    loader (``model(x)`` returns label logits or an output whose first entry is); the model's train/eval mode is
    restored afterwards. With ``gather`` under DDP, ``loader`` is this rank's share of the split and the result
    is the whole split's, in order (every rank must call it)."""
    was_training = model.training
    model.eval()
    preds, labels, confs, nlls = [], [], [], []
    try:
        for batch in loader:
            out = model(batch["image"].to(device))
            logits = out if isinstance(out, Tensor) else out[0]
            preds.append(logits.argmax(1).cpu())
            labels.append(batch["label"])
            confs.append(batch["confounder"])
            target = torch.as_tensor(batch["label"], device=logits.device)
            nlls.append(F.cross_entropy(logits.float(), target, reduction="none").cpu())
    finally:
        model.train(was_training)
    cat = {
        "pred": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
        "label": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        "confounder": torch.cat(confs) if confs else torch.zeros(0, dtype=torch.long),
        "nll": torch.cat(nlls) if nlls else torch.zeros(0),
    }
    out = {k: v.numpy() for k, v in cat.items()}
    if gather and distributed.is_active():
        out = _interleave(distributed.all_gather_objects(out))
    return out


def split_metrics(
    model: nn.Module, loader: DataLoader, dataset: Any, device: torch.device, *, gather: bool = False
) -> dict[str, Any]:
    """docs/architecture.md's metrics dict ``M`` of ``model`` over ``loader`` (samples of ``dataset``), plus ``nll``: the mean
    cross-entropy of the label (model selection breaks ties of the validation accuracy with it); ``gather``: see
    :func:`predict_split`."""
    p = predict_split(model, loader, device, gather=gather)
    groups = p["label"] * dataset.n_confounders + p["confounder"]
    metrics = group_metrics(p["pred"], p["label"], groups, dataset.groups)
    metrics["nll"] = float(p["nll"].mean()) if len(p["nll"]) else float("nan")
    add_group_nll(metrics, p["nll"], groups, dataset.groups)
    return metrics



class Predictor(nn.Module):
    """``algorithm.predict`` as a module, for :func:`predict_split`."""

    def __init__(self, algorithm: Algorithm) -> None:
        super().__init__()
        self.algorithm = algorithm

    def forward(self, x: Tensor) -> Tensor:
        return self.algorithm.predict(x)


def evaluate_algorithm(
    algorithm: Algorithm,
    config: Config,
    datasets: dict[str, Any],
    splits: Sequence[str],
    device: torch.device,
    loaders: dict[str, DataLoader] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics dict of ``algorithm`` on each of ``splits``, on the samples it did not fit on
    (:meth:`~ex2l_xai.algorithms.Algorithm.evaluation_subset`); ``loaders`` are reused for whole splits. Under
    DDP every rank predicts its share and gets the metrics of the whole split."""
    predictor = Predictor(algorithm)
    rank, world = distributed.rank(), distributed.world_size()
    out = {}
    for split in splits:
        subset = algorithm.evaluation_subset(split)
        if subset is None and loaders is not None and split in loaders:
            loader = loaders[split]
        else:
            loader = eval_loader(config, datasets[split], device=device, indices=subset, rank=rank, world=world)
        out[split] = split_metrics(predictor, loader, datasets[split], device, gather=True)
    return out


def evaluate(
    run_dir: str | os.PathLike[str], split: str = "test", *, device: str = "auto", batch_size: int | None = None
) -> dict[str, Any]:
    """Metrics dict ``M`` of a run's selected model (``best.pt``) on ``split`` of its dataset (on the samples
    its results were taken on, where the algorithm fitted on part of the split: DFR's ``val``)."""
    dev = resolve_device(device)
    model, config, payload = RunFolder(run_dir).load_model(dev)
    dataset = build_split(config, split)
    if batch_size is not None:
        config.data.eval_batch_size = batch_size
    subset = payload.get("evaluation_subsets", {}).get(split)
    return split_metrics(model, eval_loader(config, dataset, device=dev, indices=subset), dataset, dev)
