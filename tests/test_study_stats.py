"""The study's statistics on cases with known answers."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))  # figures/ scripts import studylib so
from studylib.stats import mean_std, paired_difference  # noqa: E402


def test_mean_std_skips_missing_values() -> None:
    assert mean_std([0.1, None, 0.3, float("nan")]) == (pytest.approx(0.2), pytest.approx(math.sqrt(0.02)), 2)
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    m, s, n = mean_std([])
    assert math.isnan(m) and math.isnan(s) and n == 0


def test_paired_difference_pairs_by_seed_and_ignores_unpaired_seeds() -> None:
    method = {0: 0.5, 1: 0.6, 2: 0.7, 7: 0.9}
    base = {0: 0.4, 1: 0.5, 2: 0.5, 3: 0.0}
    d = paired_difference(method, base)
    assert d.n == 3 and d.diffs == pytest.approx((0.1, 0.1, 0.2))
    assert d.mean == pytest.approx(0.4 / 3)
    # the bootstrap mean of three values lies between their min and max
    assert 0.1 - 1e-12 <= d.low <= d.mean <= d.high <= 0.2 + 1e-12
    assert d.excludes_zero() and d.wins == 1.0


def test_bootstrap_interval_of_two_differences_is_their_range() -> None:
    """Two differences, 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th
    and 97.5th percentiles are 0 and 1, and the interval does not exclude 0."""
    d = paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.0})
    assert (d.low, d.mean, d.high) == (pytest.approx(0.0), pytest.approx(0.5), pytest.approx(1.0))
    assert not d.excludes_zero() and d.wins == 0.5


def test_constant_or_single_differences_have_a_point_interval() -> None:
    d = paired_difference({0: 0.75, 1: 0.5}, {0: 0.25, 1: 0.0})
    assert d.low == d.high == 0.5 and d.excludes_zero()
    one = paired_difference({0: 0.3}, {0: 0.1})
    assert one.n == 1 and one.low == one.high == pytest.approx(0.2) and not one.excludes_zero()


def test_budget_is_where_the_mean_validation_ce_stops_improving_by_min_delta() -> None:
    import calibrate

    # mean curve 0.05, 0.01, 0.004, 0.0035, 0.0034, 0.001: epochs 4 and 5 improve by < 1e-3, so it stops at 3
    curves = [[0.06, 0.012, 0.005, 0.004, 0.0038, 0.001], [0.04, 0.008, 0.003, 0.003, 0.003, 0.001]]
    assert calibrate.budget(curves) == 3
    assert calibrate.budget([[0.5, 0.4, 0.3, 0.2]]) == 4  # never stops: the last epoch
    assert calibrate.budget([[0.5, 0.6, 0.7, 0.1]], patience=2) == 1  # two epochs without improvement
