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
Every perturbed image of every map and step goes through one queue (:class:`Forwards`), forwarded in batches of
:func:`forward_batch` images; the intact images and the baselines are forwarded once for all maps
(:func:`faithfulness_maps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ex2l_xai.errors import Ex2lError

__all__ = ["BASELINES", "CPU_PIXELS", "NEIGHBOURS", "ROAD_PERCENTAGES", "FaithResult", "Forwards", "auc",
           "baseline_images", "centre_maps", "deletion_insertion", "faithfulness", "faithfulness_maps",
           "forward_batch", "noisy_linear_impute", "pixel_ranks", "random_maps", "road"]

BASELINES = ("blur", "mean")
ROAD_PERCENTAGES = (10, 30, 50, 70, 90)
#: pixels per forward pass on a CPU (:func:`forward_batch`): 16 images at 128 px
CPU_PIXELS = 16 * 128 * 128
#: (row offset, column offset), weight: the 8-neighbourhood of noisy linear imputation (Rong et al. 2022)
NEIGHBOURS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, 0), 1 / 6), ((1, 0), 1 / 6), ((0, -1), 1 / 6), ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((1, 1), 1 / 12),
)
Predict = Callable[[Tensor], Tensor]
Key = TypeVar("Key")  # the names of the maps of faithfulness_maps


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


def forward_batch(x: Tensor) -> int:
    """Images per forward pass for ``x`` (B, C, H, W): on a CPU ``CPU_PIXELS`` pixels (16 images at 128 px: on the
    2-core development machine EfficientNet-Lite0 takes 5-6 ms an image in batches of 8-16 and 16-20 ms in batches
    of 64-128, where the activations no longer stay in cache); elsewhere 64."""
    if x.device.type != "cpu":
        return 64
    return max(1, CPU_PIXELS // (int(x.shape[-2]) * int(x.shape[-1])))


class Forwards:
    """The probability of each queued image's target class, in forward passes of ``batch_size`` images over all
    that is queued (images, steps and maps alike), without gradients; on a CPU the input is channels-last (5.5
    against 8 ms an image for EfficientNet-Lite0, measured), or plain if the model refuses it.

    :meth:`add` queues images and says where their probabilities will be; :meth:`probs` runs what is left;
    ``seconds`` is the time spent in the forward passes."""

    def __init__(self, predict: Predict, target: Tensor, batch_size: int | None = None) -> None:
        self.predict, self.target, self.batch_size = predict, target, batch_size
        self.queue: list[tuple[Tensor, Tensor]] = []
        self.queued = self.count = 0
        self.done: list[Tensor] = []
        self.channels_last = True
        self.seconds = 0.0

    def add(self, x: Tensor, rows: Tensor | None = None) -> slice:
        """Queue the images ``x`` of the targets' ``rows`` (default: all, in order); returns their slice of
        :meth:`probs`."""
        if self.batch_size is None:
            self.batch_size = forward_batch(x)
        self.queue.append((x, self.target if rows is None else self.target[rows]))
        self.queued += len(x)
        start, self.count = self.count, self.count + len(x)
        while self.queued >= self.batch_size:
            self._run(self.batch_size)
        return slice(start, self.count)

    def probs(self) -> Tensor:
        """(count,) every queued image's probability, on the CPU."""
        if self.queued:
            self._run(self.queued)
        return torch.cat(self.done) if self.done else torch.zeros(0)

    def _run(self, n: int) -> None:
        xs, ts, got = [], [], 0
        while got < n:
            x, t = self.queue[0]
            k = min(n - got, len(x))
            xs.append(x[:k])
            ts.append(t[:k])
            got += k
            if k == len(x):
                self.queue.pop(0)
            else:
                self.queue[0] = (x[k:], t[k:])
        self.queued -= n
        x, t = torch.cat(xs), torch.cat(ts)
        start = time.perf_counter()
        with torch.no_grad():
            logits = self._forward(x)
            self.done.append(torch.softmax(logits.float(), 1).gather(1, t[:, None])[:, 0].cpu())
        self.seconds += time.perf_counter() - start

    def _forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.device.type == "cpu" and x.dim() == 4:
            try:
                return self.predict(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError:  # a model that views its input as contiguous
                self.channels_last = False
        return self.predict(x)


def _queue_steps(fw: Forwards, x: Tensor, ranks: Tensor, baseline: Tensor, steps: int, *,
                 insertion: bool) -> list[slice]:
    """Queue steps 1..steps-1 of the deletion curve (the first k/steps of the pixels in ``ranks``' order replaced
    by ``baseline``) or of the insertion curve (those pixels revealed on it) on ``fw``."""
    b, _, h, w = x.shape
    rk = ranks.to(x.device).reshape(b, 1, h, w)
    out = []
    for k in range(1, steps):
        removed = rk < int(round(k / steps * h * w))
        out.append(fw.add(torch.where(removed, x, baseline) if insertion else torch.where(removed, baseline, x)))
    return out


def _curves(probs: Tensor, slices: list[slice]) -> np.ndarray:
    return torch.stack([probs[s] for s in slices], 1).numpy()


def deletion_insertion(predict: Predict, x: Tensor, ranks: Tensor, target: Tensor, *, steps: int = 10,
                       baseline: Tensor, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (B, steps+1): the probability of ``target`` after replacing (deletion) or
    revealing (insertion) the first k/steps of the pixels in ``ranks``' order, k = 0..steps (forward passes of
    ``batch_size`` images, default :func:`forward_batch`)."""
    fw = Forwards(predict, target, batch_size)
    intact, blank = fw.add(x), fw.add(baseline)  # steps 0 and ``steps``: once for both curves
    dele = [intact, *_queue_steps(fw, x, ranks, baseline, steps, insertion=False), blank]
    ins = [blank, *_queue_steps(fw, x, ranks, baseline, steps, insertion=True), intact]
    probs = fw.probs()
    return _curves(probs, dele), _curves(probs, ins)


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
    rhs = np.zeros((n, c), order="F")
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
    # symmetric and diagonally dominant: LU without pivoting is stable, and a minimum-degree ordering of A + A^T
    # factorises it in 17 ms against COLAMD's 27 ms (128 px, 10-90 % removed; benchmarks/faithfulness_cost.py)
    lu = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    # SuperLU's solve slows 5x per right-hand side past 4 of them (measured): solve them 4 at a time
    sol = np.concatenate([lu.solve(rhs[:, i:i + 4]) for i in range(0, c, 4)], axis=1)
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


def _road(fw: Forwards, x: Tensor, ranks: Tensor, percentages: tuple[int, ...], noise: float,
          seed: int) -> dict[str, list[slice]]:
    """Queue ROAD's imputed images on ``fw``: per percentage, MoRF then LeRF; the noise drawn in that order from
    one generator seeded by ``seed`` (so a map's numbers do not depend on what else is queued)."""
    b, _, h, w = x.shape
    n_pix = h * w
    bad = [p for p in percentages if not 0 < p < 100]
    if bad:
        raise Ex2lError(f"road percentages: expected values in (0, 100), got {bad[0]}")
    imgs = x.detach().cpu().numpy()
    rk = ranks.cpu().numpy().reshape(b, h, w)
    rng = np.random.default_rng(seed)
    res: dict[str, list[slice]] = {"morf": [], "lerf": []}
    for p in percentages:
        k = int(round(p / 100 * n_pix))
        for order, removed in (("morf", rk < k), ("lerf", rk >= n_pix - k)):
            imputed = np.empty_like(imgs)
            for group in _same_masks(removed):  # one factorisation per distinct mask (the centre prior: one)
                planes = imgs[group].reshape(-1, h, w)
                imputed[group] = noisy_linear_impute(planes, removed[group[0]], noise=noise,
                                                     rng=rng).reshape(imgs[group].shape)
            res[order].append(fw.add(torch.from_numpy(imputed).to(x.device)))
    return res


def road(predict: Predict, x: Tensor, ranks: Tensor, target: Tensor, *,
         percentages: tuple[int, ...] = ROAD_PERCENTAGES, noise: float = 0.01, seed: int = 0,
         batch_size: int | None = None) -> dict[str, np.ndarray]:
    """ROAD: ``morf`` and ``lerf`` (B, len(percentages)), the probability of ``target`` after imputing the most
    (least) relevant p % of the pixels in ``ranks``' order (forward passes of ``batch_size`` images, default
    :func:`forward_batch`)."""
    fw = Forwards(predict, target, batch_size)
    queued = _road(fw, x, ranks, percentages, noise, seed)
    probs = fw.probs()
    return {k: _curves(probs, v) for k, v in queued.items()}


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


def faithfulness_maps(predict: Predict, x: Tensor, maps: dict[Key, Tensor | np.ndarray], target: Tensor, *,
                      steps: int = 10, baseline: str = "blur", percentages: tuple[int, ...] = ROAD_PERCENTAGES,
                      noise: float = 0.01, seed: int = 0, batch_size: int | None = None) -> dict[Key, FaithResult]:
    """:func:`faithfulness` of several maps of the same images (e.g. a CAM, a random map and a centre prior), by
    name: the intact images and the baselines go through the model once for all of them, and each forward pass
    of ``batch_size`` images (default :func:`forward_batch`) takes whatever is queued, of any map and step. Each
    map's numbers equal its own :func:`faithfulness` call's."""
    if not 1 <= steps <= 1000:
        raise Ex2lError(f"faith_steps: expected a positive number of steps, got {steps}")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    ranks: dict[Key, Tensor] = {}
    for name, m in maps.items():
        m_t = torch.as_tensor(np.asarray(m)) if not isinstance(m, Tensor) else m
        if m_t.dim() != 3 or m_t.shape[0] != x.shape[0]:
            raise Ex2lError(f"maps[{name!r}]: expected (B={x.shape[0]}, h, w), got shape {tuple(m_t.shape)}")
        ranks[name] = pixel_ranks(m_t.detach().cpu(), size, seed)
    base = baseline_images(x, baseline)
    fw = Forwards(predict, target, batch_size)
    intact, blank = fw.add(x), fw.add(base)  # the curves' end points: once for every map
    queued = {name: ([intact, *_queue_steps(fw, x, r, base, steps, insertion=False), blank],
                     [blank, *_queue_steps(fw, x, r, base, steps, insertion=True), intact],
                     _road(fw, x, r, percentages, noise, seed)) for name, r in ranks.items()}
    probs = fw.probs()
    fractions = np.linspace(0.0, 1.0, steps + 1)
    return {name: FaithResult(_curves(probs, dele), _curves(probs, ins), _curves(probs, rd["morf"]),
                              _curves(probs, rd["lerf"]), fractions, tuple(percentages))
            for name, (dele, ins, rd) in queued.items()}


def faithfulness(predict: Predict, x: Tensor, maps: Tensor | np.ndarray, target: Tensor, *, steps: int = 10,
                 baseline: str = "blur", percentages: tuple[int, ...] = ROAD_PERCENTAGES, noise: float = 0.01,
                 seed: int = 0, batch_size: int | None = None) -> FaithResult:
    """Deletion, insertion and ROAD of ``maps`` (B, h, w) for the images ``x`` (B, C, H, W) at class ``target``
    (B,) under ``predict`` (images -> logits); forward passes of ``batch_size`` images (default
    :func:`forward_batch`)."""
    return faithfulness_maps(predict, x, {"map": maps}, target, steps=steps, baseline=baseline,
                             percentages=percentages, noise=noise, seed=seed, batch_size=batch_size)["map"]
