"""Linear-probe leakage: how much confounder information a linear read-out finds in latents or logits.

A probe is ``StandardScaler -> LogisticRegression(lbfgs, class_weight="balanced")`` scored by stratified
k-fold cross-validated balanced accuracy (chance = 1 / number of classes). See ``docs/auditing_metrics.md``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analysis import AnalysisError

logger = logging.getLogger(__name__)

__all__ = ["leakage", "probe"]

DEFAULT_MAX_SAMPLES = 5000
DEFAULT_MAX_ITER = 300


def _np(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if ndim == 2 and arr.ndim == 1:
        arr = arr[:, None]
    if ndim == 1:
        arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    if arr.ndim != ndim:
        raise AnalysisError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    return arr


def _skipped(reason: str, n_samples: int, n_classes: int) -> dict[str, Any]:
    logger.info("probe skipped: %s", reason)
    return {
        "balanced_acc": None,
        "std": None,
        "chance": 1.0 / n_classes if n_classes > 0 else None,
        "n_samples": int(n_samples),
        "n_classes": int(n_classes),
        "reason": reason,
    }


def probe(
    features: Any,
    target: Any,
    *,
    cv: int = 5,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    C: float = 1.0,
) -> dict[str, Any]:
    """Cross-validated linear probe of ``target`` from ``features``.

    Classes with fewer than ``cv`` samples are dropped first (they cannot be stratified); then at most
    ``max_samples`` rows are drawn at random (seeded) before cross-validation. Never raises on too little
    data: returns ``balanced_acc = None`` with a ``reason``.

    Parameters
    ----------
    features : array (n, d). target : integer array (n,).
    cv : number of stratified folds (shuffled with ``seed``).
    seed : seed of the subsample and the folds.
    max_iter : lbfgs iterations of the logistic regression. max_samples : subsample cap (None = all).
    C : inverse L2 regularisation strength.

    Returns
    -------
    dict
        ``balanced_acc`` (mean over folds) and ``std`` (over folds), ``chance`` (1 / n_classes),
        ``n_samples`` (rows used), ``n_eligible`` (rows of the kept classes before the subsample),
        ``n_classes``, ``dropped_classes`` (classes with < cv samples); when skipped, ``balanced_acc``
        and ``std`` are None, ``chance`` is 1 / (classes present) and ``reason`` says why.
    """
    x = _np(features, "features", 2).astype(np.float64, copy=False)
    y = _np(target, "target", 1)
    if x.shape[0] != y.shape[0]:
        raise AnalysisError(f"probe: features has {x.shape[0]} rows but target has {y.shape[0]} entries")
    if not np.isfinite(x).all():
        raise AnalysisError("probe: features contain NaN or inf values")
    classes, counts = np.unique(y, return_counts=True)
    dropped = [c.item() for c, k in zip(classes, counts, strict=True) if k < cv]
    keep_classes = classes[counts >= cv]
    if len(keep_classes) < 2:
        return _skipped(
            f"fewer than 2 classes with >= {cv} samples (counts: "
            f"{dict(zip(classes.tolist(), counts.tolist(), strict=True))})",
            y.shape[0],
            len(classes),
        )
    idx = np.flatnonzero(np.isin(y, keep_classes))
    n_eligible = int(idx.size)
    rng = np.random.default_rng(seed)
    if max_samples is not None and idx.size > max_samples:
        idx = np.sort(rng.choice(idx, size=max_samples, replace=False))
    xs, ys = x[idx], y[idx]
    present, present_counts = np.unique(ys, return_counts=True)
    if len(present) < 2 or present_counts.min() < cv:
        return _skipped(
            f"after subsampling to {idx.size} rows a class has < {cv} samples", idx.size, len(present)
        )
    chance = 1.0 / len(present)
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", class_weight="balanced"),
    )
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        scores = cross_val_score(model, xs, ys, cv=folds, scoring="balanced_accuracy", error_score="raise")
    return {
        "balanced_acc": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "chance": chance,
        "n_samples": int(idx.size),
        "n_eligible": n_eligible,
        "n_classes": int(len(present)),
        "dropped_classes": dropped,
    }


def _within(features: np.ndarray, labels: np.ndarray, target: np.ndarray, **kw: Any) -> dict[str, Any]:
    """Probe ``target`` separately inside each label; sample-weighted mean over the labels probed."""
    per_label: dict[Any, dict[str, Any]] = {}
    accs, chances, weights = [], [], []
    for lab in np.unique(labels):
        sel = labels == lab
        res = probe(features[sel], target[sel], **kw)
        res["n_label"] = int(sel.sum())
        per_label[lab.item()] = res
        if res["balanced_acc"] is not None:
            accs.append(res["balanced_acc"])
            chances.append(res["chance"])
            weights.append(res["n_eligible"])
    out: dict[str, Any] = {"balanced_acc": None, "chance": None, "n_labels_probed": len(accs)}
    if accs:
        w = np.asarray(weights, dtype=np.float64)
        out["balanced_acc"] = float(np.average(accs, weights=w))
        out["chance"] = float(np.average(chances, weights=w))
    else:
        out["reason"] = "no label has >= 2 confounder values with enough samples each"
    out["per_label"] = per_label
    return out


def leakage(
    latents: Any,
    labels: Any,
    confounders: Any,
    *,
    logits: Any = None,
    random_latents: Any = None,
    cv: int = 5,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> dict[str, Any]:
    """Confounder leakage of a model's latents (and logits), next to chance and a random-network baseline.

    Parameters
    ----------
    latents : array (n, d) of the model's pooled features. labels, confounders : integer arrays (n,).
    logits : optional array (n, k) of the model's label logits (the decision-level leak).
    random_latents : optional array (n, d') of a randomly initialised copy of the network on the same data.
    cv, seed, max_iter, max_samples : passed to :func:`probe` (each probe subsamples to ``max_samples``).

    Returns
    -------
    dict
        Headline numbers ``confounder_probe_acc`` (confounder from latents, overall), ``chance`` (its chance),
        ``within_label_acc`` / ``within_label_chance`` (the leak that matters), ``random_within_label_acc``,
        ``logit_leak`` (confounder from logits, within label) and ``logit_leak_overall``: each None when not
        computable. Details: ``confounder`` (probe dict), ``confounder_within_label`` (``balanced_acc``,
        ``chance``, ``n_labels_probed``, ``per_label``), ``label`` (label from latents), ``random`` and
        ``logits`` (each ``{"confounder", "confounder_within_label"}`` or None).
    """
    z = _np(latents, "latents", 2)
    y = _np(labels, "labels", 1)
    c = _np(confounders, "confounders", 1)
    if not (z.shape[0] == y.shape[0] == c.shape[0]):
        raise AnalysisError(
            f"leakage: latents ({z.shape[0]}), labels ({y.shape[0]}) and confounders ({c.shape[0]}) "
            "must have the same number of rows"
        )
    kw: dict[str, Any] = {"cv": cv, "seed": seed, "max_iter": max_iter, "max_samples": max_samples}

    def both(feats: np.ndarray) -> dict[str, Any]:
        return {"confounder": probe(feats, c, **kw), "confounder_within_label": _within(feats, y, c, **kw)}

    main = both(z)
    out: dict[str, Any] = {
        "confounder": main["confounder"],
        "confounder_within_label": main["confounder_within_label"],
        "label": probe(z, y, **kw),
        "random": None,
        "logits": None,
    }
    for name, extra in (("random", random_latents), ("logits", logits)):
        if extra is None:
            continue
        arr = _np(extra, name if name == "logits" else "random_latents", 2)
        if arr.shape[0] != z.shape[0]:
            raise AnalysisError(f"leakage: {name} has {arr.shape[0]} rows, expected {z.shape[0]}")
        out[name] = both(arr)
    out["confounder_probe_acc"] = out["confounder"]["balanced_acc"]
    out["chance"] = out["confounder"]["chance"]
    out["within_label_acc"] = out["confounder_within_label"]["balanced_acc"]
    out["within_label_chance"] = out["confounder_within_label"]["chance"]
    out["random_within_label_acc"] = (
        out["random"]["confounder_within_label"]["balanced_acc"] if out["random"] else None
    )
    out["logit_leak"] = out["logits"]["confounder_within_label"]["balanced_acc"] if out["logits"] else None
    out["logit_leak_overall"] = out["logits"]["confounder"]["balanced_acc"] if out["logits"] else None
    return out
