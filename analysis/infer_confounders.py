"""Inferred confounders: a first-stage model's representation, clustered beside the label, as training groups.

Where the data has no confounder labels, GroupDRO has no groups and eX2L's confounder head has nothing to learn.
A first stage (a run folder, e.g. a few epochs of ERM) infers them, as GEORGE (Sohoni et al. 2020) infers
subclasses from an ERM model's features; unlike GEORGE's per-class clusters, the clusters here are *shared across
classes*, because eX2L's confounder head predicts one attribute (the background) for every class:

1. the latents ``z`` (the label head's input) lose the label head's row space (the span of ``W[y] - mean_k W[k]``,
   ``K - 1`` directions: everything the logits read), and each class's mean is subtracted (fitted on ``train``), so
   what is left is what the model encodes *beside* the label;
2. PCA to at most ``dims`` components (one common scale), fitted on ``train``;
3. a Gaussian mixture (diagonal covariances) for every ``k`` in ``k_min..k_max``, the lowest BIC wins (or a given
   ``k``); every split is assigned by the mixture fitted on ``train``; clusters are numbered by size on ``train``.

The result is a confounder table (:mod:`ex2l_xai.data.inferred`): ``ex2l train --set data.confounders=FILE`` trains
GroupDRO on (label, inferred confounder) groups and eX2L's head on the inferred confounder. Where the data has
true confounders, the agreement is scored (adjusted Rand index and normalised mutual information of the inferred
confounder against the true one, and of the (label, inferred) groups against the true groups).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.slices import head_weights
from ex2l_xai.errors import Ex2lError

__all__ = ["ConfounderModel", "fit_confounders", "infer_confounders", "score_inferred", "write_inferred"]

METHOD = "gmm-bic, label head's row space and class means removed"


@dataclass
class ConfounderModel:
    """A fitted inference: ``basis`` (D, r) orthonormal label directions removed, ``class_means`` {class: (D,)},
    ``pca`` and ``scale`` the reduction, ``gmm`` the mixture, ``order`` cluster -> id (by size on the fit set),
    ``k`` the number of clusters and ``bic`` {k: BIC}."""

    basis: np.ndarray
    class_means: dict[int, np.ndarray]
    pca: Any
    scale: float
    gmm: Any
    order: np.ndarray
    k: int
    bic: dict[int, float] = field(default_factory=dict)

    def features(self, latents: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The reduced features the mixture clusters (label directions and class means removed, PCA, scaled)."""
        z = np.asarray(latents, dtype=np.float64)
        z = z - (z @ self.basis) @ self.basis.T
        centre = np.stack([self.class_means.get(int(y), np.zeros(z.shape[1])) for y in labels]) if len(z) else z
        return self.pca.transform(z - centre) / self.scale

    def predict(self, latents: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The inferred confounder id of every sample (0 = the largest cluster on the fit set)."""
        return self.order[self.gmm.predict(self.features(latents, labels))].astype(np.int64)


def _label_basis(weights: np.ndarray) -> np.ndarray:
    """Orthonormal basis (D, r) of the span of the head's rows minus their mean (what the logits' differences read)."""
    w = np.asarray(weights, dtype=np.float64)
    u, s, vt = np.linalg.svd(w - w.mean(0), full_matrices=False)
    keep = s > 1e-9 * (s.max() if s.size else 1.0)
    return vt[keep].T


def fit_confounders(latents: np.ndarray, labels: np.ndarray, weights: np.ndarray, *, k: int | None = None,
                    k_min: int = 2, k_max: int = 8, dims: int = 8, seed: int = 0) -> ConfounderModel:
    """Fit the inference of the module's docstring on one split's ``latents`` (N, D), ``labels`` (N,) and the
    label head's ``weights`` (K, D); ``k`` fixes the number of clusters, else BIC chooses in ``k_min..k_max``."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    z = np.asarray(latents, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or z.shape[0] != labels.shape[0]:
        raise Ex2lError(f"infer confounders: latents {z.shape} and labels {labels.shape} do not match "
                        "(expected (N, D), (N,))")
    ks = [int(k)] if k is not None else list(range(int(k_min), int(k_max) + 1))
    if not ks or ks[0] < 2 or ks[-1] > z.shape[0]:
        raise Ex2lError(f"infer confounders: expected 2 <= k <= {z.shape[0]} (the samples), got "
                        f"{k if k is not None else f'{k_min}..{k_max}'}")
    basis = _label_basis(weights)
    zp = z - (z @ basis) @ basis.T
    means = {int(y): zp[labels == y].mean(0) for y in np.unique(labels)}
    centred = zp - np.stack([means[int(y)] for y in labels])
    pca = PCA(n_components=min(dims, z.shape[0] - 1, z.shape[1]), random_state=seed).fit(centred)
    x = pca.transform(centred)
    scale = float(x.std()) or 1.0
    x = x / scale
    best, bics = None, {}
    for kk in ks:
        gmm = GaussianMixture(kk, covariance_type="diag", n_init=2, random_state=seed, reg_covar=1e-4).fit(x)
        bics[kk] = float(gmm.bic(x))
        if best is None or bics[kk] < bics[best[0]]:
            best = (kk, gmm)
    kk, gmm = best
    sizes = np.bincount(gmm.predict(x), minlength=kk)
    order = np.empty(kk, dtype=np.int64)
    order[np.argsort(-sizes, kind="stable")] = np.arange(kk)
    return ConfounderModel(basis=basis, class_means=means, pca=pca, scale=scale, gmm=gmm, order=order, k=kk,
                           bic=bics)


def score_inferred(inferred: np.ndarray, labels: np.ndarray, confounders: np.ndarray) -> dict[str, float]:
    """Agreement with the true confounders: ``ari`` / ``nmi`` of the inferred confounder against the true one,
    ``group_ari`` / ``group_nmi`` of the (label, inferred) groups against the (label, true) groups."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    inferred, labels, conf = (np.asarray(a, dtype=np.int64) for a in (inferred, labels, confounders))
    groups = labels * (int(conf.max()) + 1) + conf
    pairs = labels * (int(inferred.max()) + 1) + inferred
    return {"ari": float(adjusted_rand_score(conf, inferred)), "nmi": float(normalized_mutual_info_score(conf, inferred)),
            "group_ari": float(adjusted_rand_score(groups, pairs)),
            "group_nmi": float(normalized_mutual_info_score(groups, pairs))}


def infer_confounders(run: str | os.PathLike[str], *, splits: tuple[str, ...] = ("train", "val"),
                      k: int | None = None, k_min: int = 2, k_max: int = 8, dims: int = 8, seed: int = 0,
                      device: str = "cpu", batch_size: int | None = None) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Infer the confounders of ``splits`` of a run's dataset from the run's selected model (fitted on the first
    split). Returns per split a frame (``index``, ``confounder``, ``label``) and a report (method, k, BIC and, where
    the data has confounders, :func:`score_inferred` per split)."""
    from analysis.extract import extract

    if not splits:
        raise Ex2lError("infer confounders: expected at least one split (the first one is fitted)")
    exts = {s: extract(run, s, cams=False, device=device, batch_size=batch_size) for s in splits}
    first = exts[splits[0]]
    weights, r2 = head_weights(first.latents, first.logits)
    model = fit_confounders(first.latents, first.labels, weights, k=k, k_min=k_min, k_max=k_max, dims=dims,
                            seed=seed)
    frames: dict[str, pd.DataFrame] = {}
    report: dict[str, Any] = {"method": METHOD, "run": str(run), "fitted_on": splits[0], "k": model.k,
                              "bic": model.bic, "head_r2": r2, "dims": dims, "seed": seed, "splits": {}}
    for s, ext in exts.items():
        ids = model.predict(ext.latents, ext.labels)
        frames[s] = pd.DataFrame({"index": ext.indices, "confounder": ids, "label": ext.labels})
        entry: dict[str, Any] = {"n": int(ids.size), "sizes": np.bincount(ids, minlength=model.k).tolist()}
        if len(set(ext.confounder_names)) > 1:
            entry.update(score_inferred(ids, ext.labels, ext.confounders))
        report["splits"][s] = entry
    return frames, report


def write_inferred(path: str | os.PathLike[str], frames: dict[str, pd.DataFrame], report: dict[str, Any]) -> Path:
    """Write the confounder table at ``path`` and its report beside it (``<path>.json``), each atomically."""
    from ex2l_xai.data.inferred import write_confounders
    from ex2l_xai.fileio import atomic_write_json

    out = write_confounders(path, frames)
    atomic_write_json(f"{out}.json", report, indent=1)
    return out
