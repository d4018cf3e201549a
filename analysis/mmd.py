"""Maximum mean discrepancy (MMD) between samples and across environments, in bounded memory.

Definitions (see ``docs/auditing_metrics.md``):

* Gaussian kernel ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``; with no bandwidth given, the median heuristic
  ``sigma^2 = median(||a - b||^2) / 2`` over the distinct pairs of a seeded random subsample (at most
  ``max_bandwidth_samples`` points) of the pooled sample.
* ``kernel="multi"``: DomainBed's MMD kernel, ``k(a, b) = sum_g exp(-g ||a - b||^2)`` for
  ``g in (0.001, 0.01, 0.1, 1, 10, 100, 1000)`` (a sum, not a mean; no bandwidth).
* Unbiased estimate (U-statistic, diagonal terms excluded) or biased one (V-statistic, all terms).

Kernel matrices are never materialised: sums are accumulated over ``block_size x block_size`` tiles in
float64, so memory is O(block_size^2 + block_size * d) on top of the input, whatever the sample size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from analysis import AnalysisError

logger = logging.getLogger(__name__)

__all__ = [
    "DOMAINBED_GAMMAS",
    "median_heuristic_bandwidth",
    "mmd2",
    "mmd_env",
    "permutation_test",
]

#: DomainBed's multi-bandwidth kernel: sum of exp(-gamma * squared distance) over these gammas.
DOMAINBED_GAMMAS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_BLOCK_SIZE = 1024
_KERNELS = ("gaussian", "multi")
# Permutation indicators are processed in chunks of at most this many float64 entries (64 MiB).
_PERM_CHUNK_ENTRIES = 8_000_000

ArrayLike = Any  # numpy array or torch tensor of shape (n, d)
KernelFn = Callable[[torch.Tensor], torch.Tensor]


def _as_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """Return a 2-D floating CPU tensor sharing memory with ``x`` where possible (no float64 copy)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.device.type != "cpu":
        t = t.cpu()
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise AnalysisError(f"{name}: expected a 2-D array (n_samples, n_features), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _sq_dists(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of two float64 blocks, clamped at 0."""
    d = torch.addmm(a_sq[:, None] + b_sq[None, :], a, b.T, beta=1.0, alpha=-2.0)
    return d.clamp_min_(0.0)


def _kernel_fn(kernel: str, bandwidth: float | None) -> tuple[KernelFn, float]:
    """Kernel as a function of squared distances, and its value at distance 0."""
    if kernel == "gaussian":
        if bandwidth is None or not bandwidth > 0 or not math.isfinite(bandwidth):
            raise AnalysisError(f"bandwidth: expected a positive finite number, got {bandwidth!r}")
        scale = -1.0 / (2.0 * bandwidth * bandwidth)
        return (lambda d: d.mul_(scale).exp_()), 1.0
    if kernel == "multi":

        def multi(d: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(d)
            for g in DOMAINBED_GAMMAS:
                out.add_(torch.exp(d * (-g)))
            return out

        return multi, float(len(DOMAINBED_GAMMAS))
    raise AnalysisError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")


def _blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + block_size, n)) for i in range(0, n, block_size)]


def _take(t: torch.Tensor, idx: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``t`` (or of ``t[idx]``, gathered per tile so no copy of ``t`` is made), as float64."""
    rows = t[r0:r1] if idx is None else t[idx[r0:r1]]
    return rows.to(torch.float64)


def _kernel_sum(
    a: torch.Tensor,
    b: torch.Tensor | None,
    kfn: KernelFn,
    block_size: int,
    a_idx: torch.Tensor | None = None,
    b_idx: torch.Tensor | None = None,
) -> float:
    """Sum of k(a_i, b_j) over all pairs; with ``b is None`` the sum over i != j of k(a_i, a_j).

    ``a_idx``/``b_idx`` select rows of ``a``/``b`` (gathered tile by tile). Only upper-triangular tiles are
    computed in the symmetric case; diagonal entries are excluded exactly (not subtracted), so the
    U-statistic does not depend on the rounding of ||a_i - a_i||^2.
    """
    sym = b is None
    other, o_idx = (a, a_idx) if sym else (b, b_idx)
    n_a = a.shape[0] if a_idx is None else a_idx.shape[0]
    n_b = other.shape[0] if o_idx is None else o_idx.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    rows = _blocks(n_a, block_size)
    cols = rows if sym else _blocks(n_b, block_size)
    for bi, (r0, r1) in enumerate(rows):
        ai = _take(a, a_idx, r0, r1)
        ai_sq = ai.pow(2).sum(1)
        for bj, (c0, c1) in enumerate(cols):
            if sym and bj < bi:
                continue
            if sym and bj == bi:
                k = kfn(_sq_dists(ai, ai, ai_sq, ai_sq))
                k.fill_diagonal_(0.0)
                total += k.sum()
                continue
            bt = _take(other, o_idx, c0, c1)
            k = kfn(_sq_dists(ai, bt, ai_sq, bt.pow(2).sum(1)))
            total += (2.0 if sym else 1.0) * k.sum()
    return float(total)


def median_heuristic_bandwidth(*samples: ArrayLike, max_samples: int = 2000, seed: int = 0) -> float:
    """Median-heuristic Gaussian bandwidth ``sigma`` of the pooled sample.

    ``sigma^2 = median(||a - b||^2) / 2`` over all distinct pairs of a seeded random subsample of at most
    ``max_samples`` points of the pooled sample, so that ``k(a, b) = exp(-||a - b||^2 / median)``.

    Parameters
    ----------
    *samples : arrays of shape (n_i, d), pooled.
    max_samples : subsample size cap (bounds the cost at ``max_samples^2 / 2`` distances).
    seed : seed of the subsample.

    Returns
    -------
    float
        ``sigma``; if the median squared distance is 0 (over half the pairs identical), the mean of the
        positive squared distances is used instead, and 1.0 if all points coincide (both logged).
    """
    mats = [_as_matrix(s, f"samples[{i}]") for i, s in enumerate(samples)]
    n_total = sum(m.shape[0] for m in mats)
    if n_total < 2:
        raise AnalysisError(f"median heuristic: need at least 2 pooled samples, got {n_total}")
    if n_total > max_samples:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n_total, generator=gen)[:max_samples].sort().values
        offsets = np.cumsum([0] + [m.shape[0] for m in mats])
        parts = []
        for i, m in enumerate(mats):
            sel = idx[(idx >= offsets[i]) & (idx < offsets[i + 1])] - int(offsets[i])
            parts.append(m[sel].to(torch.float64))
        pooled = torch.cat(parts)
    else:
        pooled = torch.cat([m.to(torch.float64) for m in mats])
    pair_d = torch.pdist(pooled).pow_(2)  # squared distances of the distinct pairs, condensed
    med = float(np.median(pair_d.numpy()))
    if med <= 0.0:
        pos = pair_d[pair_d > 0]
        if pos.numel() == 0:
            logger.warning("median heuristic: all %d points coincide; using bandwidth 1.0", pooled.shape[0])
            return 1.0
        med = float(pos.mean())
        logger.warning("median heuristic: median squared distance is 0; using the mean positive one")
    return math.sqrt(med / 2.0)


def _resolve_bandwidth(
    kernel: str, bandwidth: float | None, samples: Sequence[torch.Tensor], max_samples: int, seed: int
) -> float | None:
    if kernel == "multi":
        if bandwidth is not None:
            raise AnalysisError("bandwidth: not used by kernel='multi' (DomainBed's fixed gammas); pass None")
        return None
    if bandwidth is None:
        return median_heuristic_bandwidth(*samples, max_samples=max_samples, seed=seed)
    return float(bandwidth)


def _combine(sxx: float, syy: float, sxy: float, m: int, n: int, k0: float, unbiased: bool) -> float:
    """MMD^2 from off-diagonal within sums and the cross sum."""
    if unbiased:
        return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)
    return (sxx + m * k0) / (m * m) + (syy + n * k0) / (n * n) - 2.0 * sxy / (m * n)


def _check_sizes(m: int, n: int, unbiased: bool) -> None:
    need = 2 if unbiased else 1
    if m < need or n < need:
        raise AnalysisError(
            f"mmd2: each sample needs at least {need} rows for the {'unbiased' if unbiased else 'biased'} "
            f"estimate, got {m} and {n}"
        )


def mmd2(
    x: ArrayLike,
    y: ArrayLike,
    *,
    bandwidth: float | None = None,
    unbiased: bool = True,
    kernel: str = "gaussian",
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_bandwidth_samples: int = 2000,
    seed: int = 0,
) -> float:
    """Squared MMD between two samples.

    Parameters
    ----------
    x, y : arrays (numpy or torch) of shape (m, d) and (n, d).
    bandwidth : Gaussian ``sigma``; None = median heuristic on the pooled sample. Must be None for "multi".
    unbiased : U-statistic (diagonal excluded; can be slightly negative) if True, else V-statistic.
    kernel : "gaussian" or "multi" (DomainBed's sum of seven Gaussians).
    block_size : tile size of the blockwise computation (memory ~ 3 * 8 * block_size^2 bytes).
    max_bandwidth_samples, seed : subsample cap and seed of the median heuristic.

    Returns
    -------
    float
        The MMD^2 estimate.
    """
    xt, yt = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xt.shape[1] != yt.shape[1]:
        raise AnalysisError(f"mmd2: x has {xt.shape[1]} features and y has {yt.shape[1]}; expected equal")
    m, n = xt.shape[0], yt.shape[0]
    _check_sizes(m, n, unbiased)
    bw = _resolve_bandwidth(kernel, bandwidth, [xt, yt], max_bandwidth_samples, seed)
    kfn, k0 = _kernel_fn(kernel, bw)
    sxx = _kernel_sum(xt, None, kfn, block_size)
    syy = _kernel_sum(yt, None, kfn, block_size)
    sxy = _kernel_sum(xt, yt, kfn, block_size)
    return _combine(sxx, syy, sxy, m, n, k0, unbiased)


def _permutation_stats(
    z: torch.Tensor,
    z_idx: torch.Tensor | None,
    m: int,
    indicators: torch.Tensor,
    kfn: KernelFn,
    k0: float,
    unbiased: bool,
    block_size: int,
) -> torch.Tensor:
    """MMD^2 for every split given by the columns of ``indicators`` (N, P) (1 = first sample).

    Uses K0 = pooled kernel matrix with zero diagonal, never stored: each tile is computed once and
    multiplied into the indicators, ``sxx = u' K0 u``, ``sxy = u' K0 (1 - u)``, ``syy = 1' K0 1 - 2 sxy - sxx``.
    """
    n_all = indicators.shape[0]
    n = n_all - m
    kw = torch.zeros_like(indicators)
    k_row_sum = torch.zeros(n_all, dtype=torch.float64)
    blocks = _blocks(n_all, block_size)
    for bi, (r0, r1) in enumerate(blocks):
        zi = _take(z, z_idx, r0, r1)
        zi_sq = zi.pow(2).sum(1)
        for bj, (c0, c1) in enumerate(blocks):
            if bj < bi:
                continue
            if bj == bi:
                k = kfn(_sq_dists(zi, zi, zi_sq, zi_sq))
                k.fill_diagonal_(0.0)
            else:
                zj = _take(z, z_idx, c0, c1)
                k = kfn(_sq_dists(zi, zj, zi_sq, zj.pow(2).sum(1)))
            kw[r0:r1] += k @ indicators[c0:c1]
            k_row_sum[r0:r1] += k.sum(1)
            if bj != bi:
                kw[c0:c1] += k.T @ indicators[r0:r1]
                k_row_sum[c0:c1] += k.sum(0)
    total = k_row_sum.sum()
    sxx = (indicators * kw).sum(0)
    sxy = (indicators * k_row_sum[:, None]).sum(0) - sxx  # u' K0 1 - u' K0 u
    syy = total - 2.0 * sxy - sxx
    if unbiased:
        return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)
    return (sxx + m * k0) / (m * m) + (syy + n * k0) / (n * n) - 2.0 * sxy / (m * n)


def _permutation_pvalue(
    z: torch.Tensor,
    z_idx: torch.Tensor | None,
    m: int,
    kfn: KernelFn,
    k0: float,
    unbiased: bool,
    n_permutations: int,
    seed: int,
    block_size: int,
) -> tuple[float, float]:
    """p-value and observed MMD^2 for the split (first ``m`` rows of the pooled sample) vs the rest."""
    if n_permutations < 1:
        raise AnalysisError(f"n_permutations: expected a positive integer, got {n_permutations}")
    n_all = z.shape[0] if z_idx is None else z_idx.shape[0]
    n = n_all - m
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, _PERM_CHUNK_ENTRIES // n_all - 1)
    observed = 0.0
    exceed = 0
    done = 0
    first = True
    while done < n_permutations:
        p = min(chunk, n_permutations - done)
        cols = []
        if first:  # column 0: the observed split, computed from the same kernel tiles
            cols.append(torch.cat([torch.ones(m), torch.zeros(n)]).double())
        for _ in range(p):
            u = torch.zeros(n_all, dtype=torch.float64)
            u[torch.randperm(n_all, generator=gen)[:m]] = 1.0
            cols.append(u)
        stats = _permutation_stats(z, z_idx, m, torch.stack(cols, 1), kfn, k0, unbiased, block_size)
        if first:
            observed = float(stats[0])
            stats = stats[1:]
            first = False
        # A tiny relative tolerance makes permutations that reproduce the observed split count as ties.
        tol = 1e-12 * max(1.0, abs(observed))
        exceed += int((stats >= observed - tol).sum())
        done += p
    return (1.0 + exceed) / (1.0 + n_permutations), observed


def permutation_test(
    x: ArrayLike,
    y: ArrayLike,
    *,
    n_permutations: int = 200,
    seed: int = 0,
    bandwidth: float | None = None,
    unbiased: bool = True,
    kernel: str = "gaussian",
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_bandwidth_samples: int = 2000,
) -> float:
    """Permutation-test p-value of H0: x and y come from the same distribution, with MMD^2 as statistic.

    The bandwidth (median heuristic on the pooled sample when None) is fixed once and shared by all
    permutations. p = (1 + #{permuted MMD^2 >= observed}) / (1 + n_permutations). Each kernel tile of the
    pooled sample is computed once per chunk of permutations (all permutations in one chunk unless
    N * n_permutations exceeds 8e6), so the cost is about one pooled kernel pass plus O(N^2 * P) products.

    Parameters
    ----------
    x, y : arrays of shape (m, d) and (n, d).
    n_permutations : number of random relabelings.
    seed : seed of the permutations (and of the bandwidth subsample).
    bandwidth, unbiased, kernel, block_size, max_bandwidth_samples : as in :func:`mmd2`.

    Returns
    -------
    float
        The p-value, in ``[1 / (1 + n_permutations), 1]``.
    """
    xt, yt = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xt.shape[1] != yt.shape[1]:
        raise AnalysisError(f"permutation_test: x has {xt.shape[1]} features and y has {yt.shape[1]}")
    _check_sizes(xt.shape[0], yt.shape[0], unbiased)
    bw = _resolve_bandwidth(kernel, bandwidth, [xt, yt], max_bandwidth_samples, seed)
    kfn, k0 = _kernel_fn(kernel, bw)
    z = torch.cat([xt, yt]) if xt.dtype == yt.dtype else torch.cat([xt.double(), yt.double()])
    p, _ = _permutation_pvalue(z, None, xt.shape[0], kfn, k0, unbiased, n_permutations, seed, block_size)
    return p


def mmd_env(
    latents: ArrayLike,
    envs: ArrayLike,
    *,
    bandwidth: float | None = None,
    unbiased: bool = True,
    kernel: str = "gaussian",
    block_size: int = DEFAULT_BLOCK_SIZE,
    n_permutations: int = 0,
    seed: int = 0,
    max_bandwidth_samples: int = 2000,
) -> dict[str, Any]:
    """Mean squared MMD over all pairs of environments present.

    One bandwidth (median heuristic on all latents when None) is used for every pair, so pair values are
    comparable. Within-environment kernel sums are computed once per environment, not once per pair.
    Environments with fewer than 2 samples (unbiased) are skipped with a warning.

    Parameters
    ----------
    latents : array (N, d). envs : integer array (N,) of environment ids.
    n_permutations : if > 0, also a permutation-test p-value per pair (same bandwidth, seeded).
    bandwidth, unbiased, kernel, block_size, seed, max_bandwidth_samples : as in :func:`mmd2`.

    Returns
    -------
    dict
        ``mmd_env`` (float, or None with ``reason`` when fewer than two usable environments), ``pairs``
        (list of ``{"envs": [a, b], "n": [n_a, n_b], "mmd2": float[, "p_value": float]}``), ``envs``
        (ids used), ``bandwidth`` (sigma, None for "multi"), ``kernel``, ``unbiased``, ``n_permutations``.
    """
    z = _as_matrix(latents, "latents")
    e = np.asarray(envs.detach().cpu() if isinstance(envs, torch.Tensor) else envs).reshape(-1)
    if e.shape[0] != z.shape[0]:
        raise AnalysisError(f"mmd_env: latents has {z.shape[0]} rows but envs has {e.shape[0]} entries")
    out: dict[str, Any] = {
        "mmd_env": None,
        "pairs": [],
        "envs": [],
        "bandwidth": None,
        "kernel": kernel,
        "unbiased": unbiased,
        "n_permutations": int(n_permutations),
    }
    need = 2 if unbiased else 1
    groups: dict[Any, torch.Tensor] = {}  # env id -> row indices (tiles are gathered; latents not copied)
    for env in np.unique(e):
        idx = np.flatnonzero(e == env)
        if idx.size < need:
            logger.warning("mmd_env: environment %s has %d sample(s); skipped", env, idx.size)
            continue
        groups[env.item() if hasattr(env, "item") else env] = torch.as_tensor(idx)
    out["envs"] = list(groups)
    if len(groups) < 2:
        out["reason"] = f"need at least two environments with >= {need} samples, got {len(groups)}"
        logger.warning("mmd_env: %s", out["reason"])
        return out
    bw = _resolve_bandwidth(kernel, bandwidth, [z], max_bandwidth_samples, seed)
    out["bandwidth"] = bw
    kfn, k0 = _kernel_fn(kernel, bw)
    within = {env: _kernel_sum(z, None, kfn, block_size, a_idx=idx) for env, idx in groups.items()}
    keys = list(groups)
    values = []
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            ia, ib = groups[a], groups[b]
            na, nb = int(ia.shape[0]), int(ib.shape[0])
            sab = _kernel_sum(z, z, kfn, block_size, a_idx=ia, b_idx=ib)
            val = _combine(within[a], within[b], sab, na, nb, k0, unbiased)
            pair: dict[str, Any] = {"envs": [a, b], "n": [na, nb], "mmd2": val}
            if n_permutations > 0:
                pair["p_value"], _ = _permutation_pvalue(
                    z, torch.cat([ia, ib]), na, kfn, k0, unbiased, n_permutations, seed, block_size
                )
            out["pairs"].append(pair)
            values.append(val)
    out["mmd_env"] = float(np.mean(values))
    return out
