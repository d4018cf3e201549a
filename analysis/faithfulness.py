"""Faithfulness of saliency maps: does the map show what the decision uses? Arrays and tensors only.

* **Deletion / insertion** (Petsiuk et al. 2018): the image's pixels are replaced by a baseline (deletion) or
  revealed on it (insertion) in the map's order, most relevant first, in ``steps`` equal steps; the curve is the
  probability of the class the model predicts on the intact image, its AUC the trapezoid rule over the fraction
  of pixels removed (or revealed), in [0, 1]. A faithful map gives a low deletion AUC and a high insertion AUC.
* **ROAD** (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods"): the
  removed pixels are imputed by *noisy linear imputation* instead of a constant, so a removal carries no
  information through its shape: every removed pixel equals the weighted mean of its 8 neighbours (weight 1/6
  for the 4 direct, 1/12 for the 4 diagonal neighbours, normalised by the weight of the neighbours inside the
  image), a sparse linear system over all removed pixels solved at once (``scipy.sparse``; all channels share
  the matrix), plus Gaussian noise (sd ``noise``) on the imputed values. MoRF removes the most relevant p % first
  (low = faithful), LeRF the least relevant p % (high = faithful); each is the mean probability over the
  percentages.

Every metric is also computed for a **random map** (uniform noise at the map's own resolution, seeded) and for a
**centre prior** (a Gaussian centred on the image, sd a quarter of its side), so a number reads against chance.
A pixel's relevance is the map upsampled bilinearly to the image; ties are broken in a seeded random order.
Everything is batched: one forward pass per step over a chunk of images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ex2l_xai.errors import Ex2lError

__all__ = ["BASELINES", "NEIGHBOURS", "ROAD_PERCENTAGES", "FaithResult", "auc", "baseline_images",
           "centre_maps", "deletion_insertion", "faithfulness", "noisy_linear_impute", "pixel_ranks",
           "random_maps", "road"]

BASELINES = ("blur", "mean")
ROAD_PERCENTAGES = (10, 30, 50, 70, 90)
#: (row offset, column offset), weight: the 8-neighbourhood of noisy linear imputation (Rong et al. 2022)
NEIGHBOURS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, 0), 1 / 6), ((1, 0), 1 / 6), ((0, -1), 1 / 6), ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((1, 1), 1 / 12),
)
Predict = Callable[[Tensor], Tensor]


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    m = maps.float()
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def pixel_ranks(maps: Tensor | np.ndarray, size: tuple[int, int], seed: int = 0) -> Tensor:
    """(B, H*W) rank of every pixel, 0 = most relevant: ``maps`` (B, h, w) upsampled bilinearly to ``size`` and
    sorted in decreasing order, ties (a flat or all-zero map) in a random order seeded by ``seed`` (the same for
    every map, so equal maps give equal ranks)."""
    m = _upsample(torch.as_tensor(np.asarray(maps) if not isinstance(maps, Tensor) else maps), size)
    flat = m.reshape(m.shape[0], -1).cpu().numpy()
    tie = np.random.default_rng(seed).random(flat.shape[1])  # one tie-break for all: equal maps, equal ranks
    ranks = np.empty(flat.shape, dtype=np.int64)
    for b, row in enumerate(flat):
        order = np.lexsort((tie, -row))  # last key first: relevance, then the random tie-break
        ranks[b, order] = np.arange(row.size)
    return torch.from_numpy(ranks)


def random_maps(n: int, shape: tuple[int, int], seed: int = 0) -> Tensor:
    """(n, h, w) uniform noise, seeded: the chance map, at the explained map's own resolution."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


def centre_maps(n: int, shape: tuple[int, int]) -> Tensor:
    """(n, h, w) a Gaussian centred on the image (sd a quarter of each side): the centre prior."""
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float32) - (h - 1) / 2) / max(h / 4, 1e-6)
    xs = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2) / max(w / 4, 1e-6)
    g = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return g.expand(n, h, w).clone()


def baseline_images(x: Tensor, kind: str = "blur") -> Tensor:
    """What removed pixels become in deletion/insertion: ``blur`` (a Gaussian blur of the image, sd 1/45 of its
    side, at least 1 px: RISE's 11-px kernel, sd 5, at 224 px) or ``mean`` (the image's mean colour)."""
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if kind != "blur":
        raise Ex2lError(f"faith_baseline: expected one of {', '.join(BASELINES)}, got {kind!r}")
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(1.0, min(x.shape[-2:]) / 45)
    k = min(2 * int(np.ceil(2 * sigma)) + 1, (min(x.shape[-2:]) // 2) * 2 - 1)
    return gaussian_blur(x, kernel_size=[max(k, 1)] * 2, sigma=[sigma] * 2)


def auc(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under ``curve`` (..., K+1) over ``fractions`` (K+1,) by the trapezoid rule."""
    return np.trapezoid(curve, fractions, axis=-1)


def _probs(predict: Predict, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """Probability of ``target`` under ``predict`` (logits), in chunks, without gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = predict(x[i:i + batch_size])
            out.append(torch.softmax(logits.float(), 1).gather(1, target[i:i + batch_size, None])[:, 0])
    return torch.cat(out).cpu()


def deletion_insertion(predict: Predict, x: Tensor, ranks: Tensor, target: Tensor, *, steps: int = 10,
                       baseline: Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (B, steps+1): the probability of ``target`` after replacing (deletion) or
    revealing (insertion) the first k/steps of the pixels in ``ranks``' order, k = 0..steps (one forward pass per
    step over the whole batch)."""
    b, _, h, w = x.shape
    n_pix = h * w
    rk = ranks.to(x.device).reshape(b, 1, h, w)
    intact, blank = _probs(predict, x, target, batch_size), _probs(predict, baseline, target, batch_size)
    dele, ins = [intact], [blank]  # k = 0 and k = steps are the intact image and the baseline: computed once
    for k in range(1, steps):
        removed = rk < int(round(k / steps * n_pix))
        dele.append(_probs(predict, torch.where(removed, baseline, x), target, batch_size))
        ins.append(_probs(predict, torch.where(removed, x, baseline), target, batch_size))
    dele.append(blank)
    ins.append(intact)
    return torch.stack(dele, 1).numpy(), torch.stack(ins, 1).numpy()


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, *, noise: float = 0.01,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """ROAD's noisy linear imputation of ``image`` (C, H, W) at the pixels where ``removed`` (H, W) is True: all
    channels (or the channels of several images sharing the mask, stacked) at once (one sparse system, C
    right-hand sides), Gaussian noise of sd ``noise`` on the imputed
    values (0: none). The other pixels are returned unchanged."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    c, h, w = image.shape
    if removed.shape != (h, w):
        raise Ex2lError(f"removed: expected a ({h}, {w}) mask, got {removed.shape}")
    flat = image.reshape(c, -1).astype(np.float64)
    idx = np.flatnonzero(removed)
    out = image.astype(np.float64, copy=True).reshape(c, -1)
    n = idx.size
    if n == 0:
        return out.reshape(image.shape).astype(image.dtype)
    if n == h * w:
        raise Ex2lError("noisy linear imputation: every pixel is removed; nothing to impute from")
    pos = np.full(h * w, -1, dtype=np.int64)
    pos[idx] = np.arange(n)
    r, col = np.divmod(idx, w)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [], [], []
    for (dr, dc), wt in NEIGHBOURS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        i = np.flatnonzero(inside)
        j = rr[inside] * w + cc[inside]
        diag[i] += wt
        unknown = pos[j] >= 0
        rows.append(i[unknown])
        cols.append(pos[j[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        rhs[i[~unknown]] += wt * flat[:, j[~unknown]].T  # each i once per direction: no duplicate indices
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    a = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    sol = splu(a).solve(rhs)
    if noise > 0:
        sol = sol + (rng or np.random.default_rng(0)).normal(0.0, noise, sol.shape)
    out[:, idx] = sol.T
    return out.reshape(image.shape).astype(image.dtype)


def _same_masks(masks: np.ndarray) -> list[np.ndarray]:
    """Indices of the images that share a mask, one array per distinct mask."""
    groups: dict[bytes, list[int]] = {}
    for i, m in enumerate(masks):
        groups.setdefault(np.packbits(m).tobytes(), []).append(i)
    return [np.asarray(g) for g in groups.values()]


def road(predict: Predict, x: Tensor, ranks: Tensor, target: Tensor, *,
         percentages: tuple[int, ...] = ROAD_PERCENTAGES, noise: float = 0.01, seed: int = 0,
         batch_size: int = 64) -> dict[str, np.ndarray]:
    """ROAD: ``morf`` and ``lerf`` (B, len(percentages)), the probability of ``target`` after imputing the most
    (least) relevant p % of the pixels in ``ranks``' order (one forward pass per percentage and order)."""
    b, _, h, w = x.shape
    n_pix = h * w
    imgs = x.detach().cpu().numpy()
    rk = ranks.cpu().numpy().reshape(b, h, w)
    rng = np.random.default_rng(seed)
    res: dict[str, list[Tensor]] = {"morf": [], "lerf": []}
    for p in percentages:
        if not 0 < p < 100:
            raise Ex2lError(f"road percentages: expected values in (0, 100), got {p}")
        k = int(round(p / 100 * n_pix))
        for order, removed in (("morf", rk < k), ("lerf", rk >= n_pix - k)):
            imputed = np.empty_like(imgs)
            for group in _same_masks(removed):  # one factorisation per distinct mask (the centre prior: one)
                planes = imgs[group].reshape(-1, h, w)
                imputed[group] = noisy_linear_impute(planes, removed[group[0]], noise=noise,
                                                     rng=rng).reshape(imgs[group].shape)
            res[order].append(_probs(predict, torch.from_numpy(imputed).to(x.device), target, batch_size))
    return {k: torch.stack(v, 1).numpy() for k, v in res.items()}


@dataclass
class FaithResult:
    """Faithfulness of one kind of map on a batch: per-image curves and their summaries."""

    deletion: np.ndarray
    insertion: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    fractions: np.ndarray
    percentages: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """``deletion_auc``, ``insertion_auc`` (means over images of the curves' AUC), ``road_morf``,
        ``road_lerf`` (means over images and percentages)."""
        return {"deletion_auc": float(auc(self.deletion, self.fractions).mean()),
                "insertion_auc": float(auc(self.insertion, self.fractions).mean()),
                "road_morf": float(self.morf.mean()), "road_lerf": float(self.lerf.mean())}

    def curves(self) -> dict[str, list[float]]:
        """The mean curves: ``deletion``, ``insertion`` (over the fractions), ``road_morf``, ``road_lerf`` (over
        the percentages)."""
        return {"deletion": self.deletion.mean(0).tolist(), "insertion": self.insertion.mean(0).tolist(),
                "road_morf": self.morf.mean(0).tolist(), "road_lerf": self.lerf.mean(0).tolist()}


def faithfulness(predict: Predict, x: Tensor, maps: Tensor | np.ndarray, target: Tensor, *, steps: int = 10,
                 baseline: str = "blur", percentages: tuple[int, ...] = ROAD_PERCENTAGES, noise: float = 0.01,
                 seed: int = 0, batch_size: int = 64) -> FaithResult:
    """Deletion, insertion and ROAD of ``maps`` (B, h, w) for the images ``x`` (B, C, H, W) at class ``target``
    (B,) under ``predict`` (images -> logits)."""
    if not 1 <= steps <= 1000:
        raise Ex2lError(f"faith_steps: expected a positive number of steps, got {steps}")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    maps_t = torch.as_tensor(np.asarray(maps)) if not isinstance(maps, Tensor) else maps
    if maps_t.dim() != 3 or maps_t.shape[0] != x.shape[0]:
        raise Ex2lError(f"maps: expected (B={x.shape[0]}, h, w), got shape {tuple(maps_t.shape)}")
    ranks = pixel_ranks(maps_t.detach().cpu(), size, seed)
    base = baseline_images(x, baseline)
    dele, ins = deletion_insertion(predict, x, ranks, target, steps=steps, baseline=base, batch_size=batch_size)
    rd = road(predict, x, ranks, target, percentages=percentages, noise=noise, seed=seed, batch_size=batch_size)
    return FaithResult(dele, ins, rd["morf"], rd["lerf"], np.linspace(0.0, 1.0, steps + 1), tuple(percentages))
