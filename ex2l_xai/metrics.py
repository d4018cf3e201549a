"""Average, mean-group, worst-group and per-group accuracy, and per-group cross-entropy (docs/architecture.md's
metrics dict ``M``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["add_group_nll", "group_metrics"]


def _as_int_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of ints, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def group_metrics(preds: Any, labels: Any, groups: Any, group_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall and per group.

    Parameters
    ----------
    preds, labels, groups : 1-D int arrays or tensors of the same length
        Predicted class, true class and group id (index into ``group_names``) of every sample.
    group_names : sequence of str
        Name of every group id.

    Returns
    -------
    dict
        ``{"avg_acc", "mean_group_acc", "worst_group_acc", "per_group": {name: {"acc", "n"}}}``: fractions in
        [0, 1]; ``avg_acc`` is plain sample accuracy; the mean and worst are over the groups present (n > 0),
        and ``per_group`` lists only those groups, in group-id order. With no samples every accuracy is NaN.
    """
    p = _as_int_array(preds, "preds")
    y = _as_int_array(labels, "labels")
    g = _as_int_array(groups, "groups")
    if not (len(p) == len(y) == len(g)):
        raise ValueError(f"preds, labels and groups differ in length: {len(p)}, {len(y)}, {len(g)}")
    n_groups = len(group_names)
    if len(g) and (g.min() < 0 or g.max() >= n_groups):
        raise ValueError(f"groups: ids must be in [0, {n_groups}), got {g.min()}..{g.max()}")
    correct = (p == y).astype(np.float64)
    counts = np.bincount(g, minlength=n_groups)
    hits = np.bincount(g, weights=correct, minlength=n_groups)
    per_group: dict[str, dict[str, Any]] = {}
    accs = []
    for gid, name in enumerate(group_names):
        n = int(counts[gid])
        if n > 0:
            acc = float(hits[gid] / n)
            per_group[str(name)] = {"acc": acc, "n": n}
            accs.append(acc)
    nan = float("nan")
    return {
        "avg_acc": float(correct.mean()) if len(correct) else nan,
        "mean_group_acc": float(np.mean(accs)) if accs else nan,
        "worst_group_acc": float(min(accs)) if accs else nan,
        "per_group": per_group,
    }


def add_group_nll(metrics: dict[str, Any], nll: Any, groups: Any, group_names: Sequence[str]) -> None:
    """Add the label cross-entropy per group (``per_group[g]["nll"]``) and its worst, the highest over the groups
    present (``worst_group_nll``): the selection signal that still tells epochs apart when a
    training-distribution validation split's worst-group accuracy saturates at 100 %."""
    nll, groups = np.asarray(nll, dtype=np.float64), _as_int_array(groups, "groups")
    worst = float("nan")
    for gid, name in enumerate(group_names):
        entry = metrics["per_group"].get(str(name))
        if entry is not None:
            entry["nll"] = float(nll[groups == gid].mean())
            worst = entry["nll"] if worst != worst else max(worst, entry["nll"])
    metrics["worst_group_nll"] = worst
