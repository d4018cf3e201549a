"""Slice discovery and spuriosity ranking: functions of arrays (latents, logits, labels), no model.

**Slices.** Per class ``y``, the class's images are clustered in the model's own latent with the class's decision
direction projected out: ``d_y = W[y] - mean_k W[k]`` (the label head's row for ``y`` minus the mean row; for two
classes this is half the difference of the rows, the one direction the logit margin reads). What is left is what the
model encodes *beside* the class. The projected latents are centred and reduced by PCA (at most ``dims``
components, one common scale: per-feature standardisation would shrink a far-apart axis to the size of the noise
axes) and clustered by scikit-learn's ``GaussianMixture`` (diagonal covariances: the PCA components are
uncorrelated) for every ``k`` in ``1..k_max`` (each slice must be able to hold ``min_size`` images); the ``k`` of
the lowest BIC wins, so a class without hidden structure keeps one slice (``k = 1``) instead of being split.

``W`` is the least-squares fit of the logits on the latents (:func:`head_weights`): exact when the latent is the
head's input (run folders, a model whose last module is a ``Linear``), with its R^2 reported otherwise.

**Spuriosity** (after Moayeri et al., 2023). Per class, the ``m`` latent features the head weighs most
(``W[y, j] * mean activation of j over the class``) are the candidates; a candidate is flagged as spurious when it
separates the class's worst slice from the rest of the class (absolute Cohen's d >= ``d_min``) or, where an
off-object score is given (the share of the feature's activation map outside the object mask), when that share
exceeds ``off_min`` (the audit: the background's area, the share a uniform map would have). Candidates are listed
flagged first, then by off-object share where it is measured, else by separation. An image's spuriosity is the
mean of its flagged features' activations, each standardised over the class and oriented so that high means "like
the rest of the class" (a feature higher in the worst slice, d >= ``d_min``, counts negatively: a high score has the
cue the worst slice lacks); the spurious gap is the accuracy of the class's top spuriosity quartile minus its bottom
quartile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ex2l_xai.errors import Ex2lError

__all__ = ["SliceResult", "Spuriosity", "discover_slices", "head_weights", "project_out", "score_slices",
           "slice_table", "spuriosity"]

METHOD = "gmm-bic"


def head_weights(latents: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, float]:
    """(W, R^2): the (K, D) weights of the least-squares fit ``logits ~ latents @ W.T + b`` and its R^2 (1.0 when
    the latent is the label head's input)."""
    z = np.asarray(latents, dtype=np.float64)
    out = np.asarray(logits, dtype=np.float64)
    x = np.hstack([z, np.ones((z.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(x, out, rcond=None)
    resid = out - x @ coef
    total = ((out - out.mean(0)) ** 2).sum()
    r2 = 1.0 - float((resid ** 2).sum() / total) if total > 0 else 1.0
    return coef[:-1].T, r2


def project_out(latents: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """``latents`` with their component along ``direction`` removed (unchanged for a zero direction)."""
    d = np.asarray(direction, dtype=np.float64)
    norm = np.linalg.norm(d)
    z = np.asarray(latents, dtype=np.float64)
    if norm == 0:
        return z
    d = d / norm
    return z - np.outer(z @ d, d)


def _cluster(z: np.ndarray, k_max: int, min_size: int, dims: int, seed: int) -> tuple[np.ndarray, dict[int, float]]:
    """GMM-BIC clustering of one class's (projected) latents: (slice ids ordered by size, {k: BIC})."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    n = z.shape[0]
    if n < 2 * min_size or not (z.std(0) > 0).any():
        return np.zeros(n, dtype=np.int64), {1: 0.0}
    pca = PCA(n_components=min(dims, n - 1, z.shape[1]), random_state=seed).fit(z)
    var = pca.explained_variance_
    x = pca.transform(z)[:, var > 1e-9 * var.max()]  # the projected-out direction has no variance: dropped
    x = x / x.std()  # one scale for every component: the geometry (which axis is far apart) is kept
    bics: dict[int, float] = {}
    best, best_labels = np.inf, np.zeros(n, dtype=np.int64)
    for k in range(1, min(k_max, n // min_size) + 1):
        gmm = GaussianMixture(k, covariance_type="diag", n_init=2, random_state=seed, reg_covar=1e-4).fit(x)
        bics[k] = float(gmm.bic(x))
        labels = gmm.predict(x)
        if bics[k] < best and np.bincount(labels, minlength=k).min() >= min(min_size, n):
            best, best_labels = bics[k], labels
    sizes = np.bincount(best_labels)
    order = np.argsort(-sizes, kind="stable")  # slice 0 = the largest
    remap = np.empty_like(order)
    remap[order] = np.arange(order.size)
    ids = remap[best_labels]
    _, ids = np.unique(ids, return_inverse=True)
    return ids.astype(np.int64), bics


@dataclass
class SliceResult:
    """Slices of every class: ``slices`` (N,) slice id within the image's class; ``k`` {class: number of slices};
    ``bic`` {class: {k: BIC}}; ``table`` one record per slice (:func:`slice_table`); ``head_r2`` the R^2 of the
    head fit; ``scores`` the ground-truth agreement (:func:`score_slices`) or None."""

    slices: np.ndarray
    k: dict[int, int]
    bic: dict[int, dict[int, float]]
    table: list[dict[str, Any]] = field(default_factory=list)
    head_r2: float = 1.0
    scores: dict[str, Any] | None = None

    def global_ids(self) -> tuple[np.ndarray, list[str]]:
        """One id per (class, slice) and its name ``"<class>/slice <s>"`` (classes in order)."""
        pairs = sorted({(int(r["label"]), int(r["slice"])) for r in self.table})
        index = {p: i for i, p in enumerate(pairs)}
        ids = np.asarray([index[(int(y), int(s))] for y, s in zip(self._labels, self.slices, strict=True)])
        return ids.astype(np.int64), [f"{y}/slice {s}" for y, s in pairs]

    _labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)


def discover_slices(latents: np.ndarray, logits: np.ndarray, labels: np.ndarray, preds: np.ndarray, *,
                    k_max: int = 6, min_size: int = 5, dims: int = 8, seed: int = 0,
                    weights: np.ndarray | None = None) -> SliceResult:
    """The slices of every class (the module's method) with their table (size, accuracy, confidence, share, gap).

    ``weights``: the label head's (K, D) rows; default :func:`head_weights` of ``latents`` and ``logits``."""
    z = np.asarray(latents, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or z.shape[0] != labels.shape[0]:
        raise Ex2lError(f"slices: latents {z.shape} and labels {labels.shape} do not match (expected (N, D), (N,))")
    if k_max < 1 or min_size < 1:
        raise Ex2lError(f"slices: k_max and min_size must be >= 1, got {k_max}, {min_size}")
    w, r2 = (np.asarray(weights, dtype=np.float64), 1.0) if weights is not None else head_weights(z, logits)
    slices = np.zeros(labels.shape[0], dtype=np.int64)
    ks: dict[int, int] = {}
    bics: dict[int, dict[int, float]] = {}
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        direction = w[y] - w.mean(0) if y < w.shape[0] else np.zeros(z.shape[1])
        ids, bic = _cluster(project_out(z[idx], direction), k_max, min_size, dims, seed)
        slices[idx] = ids
        ks[int(y)], bics[int(y)] = int(ids.max()) + 1, bic
    res = SliceResult(slices=slices, k=ks, bic=bics, head_r2=r2, _labels=labels)
    res.table = slice_table(slices, labels, preds, logits)
    return res


def slice_table(slices: np.ndarray, labels: np.ndarray, preds: np.ndarray, logits: np.ndarray
                ) -> list[dict[str, Any]]:
    """One record per (class, slice): ``label``, ``slice``, ``size``, ``acc``, ``confidence`` (mean softmax
    probability of the predicted class), ``share`` (of the class), ``class_acc``, ``gap`` (``acc - class_acc``);
    ranked by ``gap``, worst first."""
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    conf = (p / p.sum(1, keepdims=True)).max(1)
    correct = np.asarray(preds) == np.asarray(labels)
    rows = []
    for y in np.unique(labels):
        in_y = labels == y
        class_acc = float(correct[in_y].mean())
        for s in np.unique(slices[in_y]):
            m = in_y & (slices == s)
            rows.append({"label": int(y), "slice": int(s), "size": int(m.sum()), "acc": float(correct[m].mean()),
                         "confidence": float(conf[m].mean()), "share": float(m.sum() / in_y.sum()),
                         "class_acc": class_acc, "gap": float(correct[m].mean()) - class_acc})
    return sorted(rows, key=lambda r: (r["gap"], r["label"], r["slice"]))


def score_slices(slices: np.ndarray, labels: np.ndarray, confounders: np.ndarray, preds: np.ndarray
                 ) -> dict[str, Any]:
    """Agreement of the slices with the true confounders: ``ari_per_class`` / ``nmi_per_class`` (within each class),
    ``ari`` / ``nmi`` over every image (the (class, slice) pairs against the (class, confounder) groups),
    ``ari_class_mean`` / ``nmi_class_mean`` (class-size-weighted means), and ``true_worst_group_acc`` (the lowest
    accuracy of a (class, confounder) group present)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, slices, conf = (np.asarray(a, dtype=np.int64) for a in (labels, slices, confounders))
    ari, nmi, sizes = {}, {}, {}
    for y in np.unique(labels):
        m = labels == y
        ari[int(y)] = float(adjusted_rand_score(conf[m], slices[m]))
        nmi[int(y)] = float(normalized_mutual_info_score(conf[m], slices[m]))
        sizes[int(y)] = int(m.sum())
    n_conf = int(conf.max()) + 1 if conf.size else 1
    n_slice = int(slices.max()) + 1 if slices.size else 1
    groups, pairs = labels * n_conf + conf, labels * n_slice + slices
    correct = np.asarray(preds) == labels
    worst = min(float(correct[groups == g].mean()) for g in np.unique(groups))
    total = sum(sizes.values())
    return {"ari": float(adjusted_rand_score(groups, pairs)), "nmi": float(normalized_mutual_info_score(groups, pairs)),
            "ari_per_class": ari, "nmi_per_class": nmi,
            "ari_class_mean": sum(ari[y] * sizes[y] for y in ari) / total,
            "nmi_class_mean": sum(nmi[y] * sizes[y] for y in nmi) / total,
            "true_worst_group_acc": worst}


@dataclass
class Spuriosity:
    """The ranking: ``scores`` (N,) spuriosity of every image (NaN in a class without a flagged feature);
    ``classes`` one record per class: ``candidates`` (feature, weight x mean activation, separation d, off-object
    share or None, flagged), ``flagged`` features, ``top_acc`` / ``bottom_acc`` (top and bottom spuriosity
    quartile) and ``gap`` (their difference)."""

    scores: np.ndarray
    classes: dict[int, dict[str, Any]]


def _cohen_d(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or b.size < 2:
        return 0.0
    pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0


def spuriosity(latents: np.ndarray, labels: np.ndarray, preds: np.ndarray, slices: np.ndarray,
               weights: np.ndarray, worst_slice: dict[int, int], *, m: int = 5, d_min: float = 0.8,
               off_object: dict[int, np.ndarray] | None = None,
               off_min: float | dict[int, float] = 0.5) -> Spuriosity:
    """The spuriosity ranking of the module's docstring. ``worst_slice`` {class: its worst slice};
    ``off_object`` {class: (D,) share of each feature's activation map outside the object} where masks exist;
    ``off_min``: the share above which a feature is off the object (one number, or one per class: the audit passes
    the background's area, the share of a uniform map)."""
    z = np.asarray(latents, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    correct = np.asarray(preds) == labels
    scores = np.full(labels.shape[0], np.nan)
    classes: dict[int, dict[str, Any]] = {}
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        zy = z[idx]
        contrib = weights[y] * zy.mean(0)
        top = np.argsort(-contrib, kind="stable")[:m]
        worst = slices[idx] == worst_slice.get(int(y), -1)
        off = None if off_object is None or int(y) not in off_object else np.asarray(off_object[int(y)])
        cands = []
        for j in top:
            d = _cohen_d(zy[worst, j], zy[~worst, j]) if worst.any() and (~worst).any() else 0.0
            share = None if off is None or not np.isfinite(off[j]) else float(off[j])
            bar = off_min.get(int(y), 0.5) if isinstance(off_min, dict) else off_min
            flag = abs(d) >= d_min or (share is not None and share > bar)
            cands.append({"feature": int(j), "contribution": float(contrib[j]), "separation": d,
                          "off_object": share, "flagged": bool(flag)})
        cands.sort(key=lambda c: (not c["flagged"],
                                  -(c["off_object"] if c["off_object"] is not None else abs(c["separation"]))))
        flagged = [c["feature"] for c in cands if c["flagged"]]
        rec: dict[str, Any] = {"candidates": cands, "flagged": flagged, "top_acc": None, "bottom_acc": None,
                               "gap": None}
        if flagged:
            sd = zy[:, flagged].std(0)
            sign = np.asarray([-1.0 if c["separation"] >= d_min else 1.0 for c in cands if c["flagged"]])
            s = (sign * (zy[:, flagged] - zy[:, flagged].mean(0)) / np.where(sd > 0, sd, 1.0)).mean(1)
            scores[idx] = s
            order = np.argsort(-s, kind="stable")
            q = max(1, idx.size // 4)
            rec["top_acc"] = float(correct[idx[order[:q]]].mean())
            rec["bottom_acc"] = float(correct[idx[order[-q:]]].mean())
            rec["gap"] = rec["top_acc"] - rec["bottom_acc"]
        classes[int(y)] = rec
    return Spuriosity(scores=scores, classes=classes)
