"""Statistics over seeds: mean ± std, and paired differences with a bootstrap interval.

Runs of one benchmark with the same seed share the data order and the head initialisation, so a method is
compared with a baseline seed by seed: d_s = metric(method, s) - metric(baseline, s) over the seeds both ran; the
interval is scipy's percentile bootstrap of the mean of d over those seeds (resampling seeds with replacement).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap

__all__ = ["PairedDiff", "mean_std", "paired_difference"]


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and v == v]


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values (NaN, 0 for none)."""
    vals = _finite(values)
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


@dataclass(frozen=True)
class PairedDiff:
    """Mean paired difference over ``n`` common seeds, its 95 % bootstrap interval [low, high], the per-seed
    differences, and the share of seeds where the method is ahead."""

    mean: float
    low: float
    high: float
    n: int
    diffs: tuple[float, ...]
    wins: float

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0."""
        return self.n > 1 and (self.low > 0 or self.high < 0)


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float], *, resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> PairedDiff:
    """Paired difference method - baseline over the seeds both have (dicts seed -> value); with fewer than two
    common seeds, or all differences equal, the interval is the mean itself."""
    common = sorted(s for s in method if s in baseline and method[s] == method[s] and baseline[s] == baseline[s])
    d = np.array([method[s] - baseline[s] for s in common], dtype=np.float64)
    if len(d) == 0:
        nan = float("nan")
        return PairedDiff(nan, nan, nan, 0, (), nan)
    mean = float(d.mean())
    if len(d) < 2 or np.all(d == d[0]):
        low = high = mean
    else:
        res = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                        rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedDiff(mean, low, high, len(d), tuple(float(x) for x in d), float(np.mean(d > 0)))
