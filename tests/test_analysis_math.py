"""Numerical tests of analysis.mmd, analysis.probes and analysis.localization (values, not only shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from analysis.localization import (
    cam_mass_in_mask,
    cam_overlap,
    gaming_warnings,
    localization_summary,
    pointing_game,
    zero_cam_share,
)
from analysis.mmd import DOMAINBED_GAMMAS, median_heuristic_bandwidth, mmd2, mmd_env, permutation_test
from analysis.probes import leakage, probe

# ----------------------------------------------------------------------------------------------- mmd


def _direct_mmd2(x: np.ndarray, y: np.ndarray, *, sigma: float | None, unbiased: bool) -> float:
    """Textbook O(n^2) MMD^2 in numpy: Gaussian with sigma, or DomainBed's sum of kernels when sigma is None."""

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        if sigma is None:
            return sum(np.exp(-g * d) for g in DOMAINBED_GAMMAS)
        return np.exp(-d / (2 * sigma**2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    if unbiased:
        return (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean()
        )
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


@pytest.fixture(scope="module")
def small_xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 4)), rng.normal(size=(45, 4)) * 0.3 + 0.2


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("kernel", ["gaussian", "multi"])
def test_mmd2_matches_direct_computation(small_xy, unbiased: bool, kernel: str) -> None:
    x, y = small_xy
    sigma = median_heuristic_bandwidth(x, y) if kernel == "gaussian" else None
    got = mmd2(x, y, unbiased=unbiased, kernel=kernel, block_size=16)
    want = _direct_mmd2(x, y, sigma=sigma, unbiased=unbiased)
    assert got == pytest.approx(want, abs=1e-6)
    if kernel == "gaussian":  # an explicit bandwidth is used as given
        assert mmd2(x, y, bandwidth=0.7, unbiased=unbiased) == pytest.approx(
            _direct_mmd2(x, y, sigma=0.7, unbiased=unbiased), abs=1e-6
        )


def test_median_heuristic_definition(small_xy) -> None:
    x, y = small_xy
    z = np.concatenate([x, y])
    d = ((z[:, None] - z[None]) ** 2).sum(-1)[np.triu_indices(len(z), 1)]
    assert median_heuristic_bandwidth(x, y) == pytest.approx(np.sqrt(np.median(d) / 2), rel=1e-10)
    # the subsample is seeded: same seed, same value
    big = np.random.default_rng(1).normal(size=(500, 3))
    a = median_heuristic_bandwidth(big, max_samples=100, seed=3)
    assert a == median_heuristic_bandwidth(big, max_samples=100, seed=3)
    # for N(0, I_d), ||a - b||^2 / 2 ~ chi2(d), so sigma^2 = median(||a - b||^2) / 2 -> median of chi2(3)
    assert a == pytest.approx(np.sqrt(stats.chi2.median(3)), rel=0.1)


def test_blockwise_equals_single_block_and_accepts_tensors(small_xy) -> None:
    x, y = small_xy
    for kernel in ("gaussian", "multi"):
        whole = mmd2(x, y, kernel=kernel, block_size=10_000)
        for bs in (1, 3, 17):
            assert mmd2(x, y, kernel=kernel, block_size=bs) == pytest.approx(whole, abs=1e-10)
    assert mmd2(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)) == pytest.approx(
        mmd2(x, y), abs=1e-5
    )


def test_mmd2_same_vs_shifted_distribution() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = mmd2(x, y)
    shifted = mmd2(x, y + 1.0)
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert shifted > 20 * abs(same)


def test_permutation_test_pvalues() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(80, 5)), rng.normal(size=(70, 5))
    p_shift = permutation_test(x, y + 0.8, n_permutations=99, seed=0)
    p_same = permutation_test(x, y, n_permutations=99, seed=0)
    assert p_shift == pytest.approx(0.01)  # no permutation beats the observed statistic
    assert p_same > 0.1
    # chunked permutations (tiny block and chunk sizes) give the same p-value for the same seed
    assert permutation_test(x, y, n_permutations=99, seed=0, block_size=7) == pytest.approx(p_same)


def test_mmd_env_is_mean_of_pairs_and_reports_pvalues() -> None:
    rng = np.random.default_rng(3)
    lat = np.concatenate([rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) + 0.5, rng.normal(size=(30, 6))])
    envs = np.repeat([0, 1, 2], [50, 40, 30])
    perm = rng.permutation(len(envs))  # interleaved environments
    lat, envs = lat[perm], envs[perm]
    res = mmd_env(lat, envs, block_size=16, n_permutations=49)
    sigma = res["bandwidth"]
    assert sigma == pytest.approx(median_heuristic_bandwidth(lat))
    assert [p["envs"] for p in res["pairs"]] == [[0, 1], [0, 2], [1, 2]]
    for pair in res["pairs"]:
        a, b = pair["envs"]
        want = mmd2(lat[envs == a], lat[envs == b], bandwidth=sigma)
        assert pair["mmd2"] == pytest.approx(want, abs=1e-10)
        assert 0 < pair["p_value"] <= 1
    assert res["mmd_env"] == pytest.approx(np.mean([p["mmd2"] for p in res["pairs"]]), abs=1e-12)
    by_pair = {tuple(p["envs"]): p["p_value"] for p in res["pairs"]}
    assert by_pair[(0, 1)] == pytest.approx(0.02) and by_pair[(0, 2)] > 0.05
    # one environment only: no value, a reason, no crash
    lone = mmd_env(lat, np.zeros(len(lat), dtype=int))
    assert lone["mmd_env"] is None and "reason" in lone


# -------------------------------------------------------------------------------------------- probes


def test_probe_finds_planted_confounder_and_sits_at_chance_otherwise() -> None:
    rng = np.random.default_rng(4)
    n, d = 1500, 20
    c = rng.integers(0, 3, n)
    z = rng.normal(size=(n, d))
    z[:, :3] += 4.0 * np.eye(3)[c]  # confounder planted linearly
    found = probe(z, c, seed=0)
    assert found["balanced_acc"] >= 0.95
    assert found["chance"] == pytest.approx(1 / 3)
    null = probe(rng.normal(size=(n, d)), c, seed=0)
    assert abs(null["balanced_acc"] - null["chance"]) < 0.1


def test_probe_skips_gracefully() -> None:
    z = np.random.default_rng(5).normal(size=(12, 3))
    res = probe(z, np.array([0] * 9 + [1] * 3), cv=5)
    assert res["balanced_acc"] is None and res["chance"] == 0.5 and "reason" in res
    # a class too rare for the folds is dropped, the rest is probed
    res = probe(np.random.default_rng(6).normal(size=(40, 3)), np.array([0] * 20 + [1] * 18 + [2] * 2))
    assert res["balanced_acc"] is not None and res["dropped_classes"] == [2] and res["chance"] == 0.5


def test_within_label_probe_separates_label_explained_confounder() -> None:
    """Confounder agrees with the label 90% of the time but is independent of the latents within a label."""
    rng = np.random.default_rng(7)
    n = 2000
    y = rng.integers(0, 2, n)
    c = np.where(rng.random(n) < 0.1, 1 - y, y)
    z = rng.normal(size=(n, 16))
    z[:, 0] += 4.0 * y  # the latents encode the label only
    logits = np.stack([-z[:, 0], z[:, 0]], 1)
    res = leakage(z, y, c, logits=logits, random_latents=rng.normal(size=(n, 8)))
    assert res["confounder_probe_acc"] > 0.8  # overall: the label's shadow
    assert abs(res["within_label_acc"] - 0.5) < 0.1  # within label: nothing leaks
    assert res["within_label_chance"] == 0.5 and res["chance"] == 0.5
    assert set(res["confounder_within_label"]["per_label"]) == {0, 1}
    assert res["label"]["balanced_acc"] > 0.95
    assert abs(res["random_within_label_acc"] - 0.5) < 0.1
    assert res["logit_leak_overall"] > 0.8 and abs(res["logit_leak"] - 0.5) < 0.1

    # now plant the confounder inside each label: the within-label probe finds it
    z2 = z.copy()
    z2[:, 1] += 4.0 * c
    res2 = leakage(z2, y, c)
    assert res2["within_label_acc"] > 0.95
    assert res2["random"] is None and res2["logit_leak"] is None


def test_leakage_label_with_single_confounder_value() -> None:
    rng = np.random.default_rng(8)
    y = np.repeat([0, 1], 100)
    c = np.where(y == 0, 0, rng.integers(0, 2, 200))  # label 0 never varies in c
    res = leakage(rng.normal(size=(200, 5)), y, c)
    per = res["confounder_within_label"]["per_label"]
    assert per[0]["balanced_acc"] is None and "reason" in per[0]
    assert per[1]["balanced_acc"] is not None
    assert res["confounder_within_label"]["n_labels_probed"] == 1
    assert res["within_label_acc"] == pytest.approx(per[1]["balanced_acc"])


# -------------------------------------------------------------------------------------- localization


def _half_mask(b: int = 1, size: int = 16) -> torch.Tensor:
    m = torch.zeros(b, size, size)
    m[:, :, : size // 2] = 1.0
    return m


def test_cam_mass_in_mask_values() -> None:
    mask = _half_mask(3)
    cams = torch.zeros(3, 16, 16)
    cams[0, 4:8, 2:6] = 1.0  # inside
    cams[1, 4:8, 10:14] = 2.0  # outside
    cams[2] = 0.7  # uniform: half of the mass on the half mask
    got = cam_mass_in_mask(cams, mask)
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.5])
    # low-resolution CAMs are upsampled bilinearly (align_corners=False) to the mask size first
    low = torch.zeros(2, 4, 4)
    low[0, 1, 1] = 1.0  # support after x4 upsampling: pixels 2..9 in each axis
    low[1] = 1.0
    mask2 = torch.zeros(2, 16, 16)
    mask2[:, :12, :12] = 1.0
    got2 = cam_mass_in_mask(low, mask2)
    assert got2[0] == pytest.approx(1.0)
    assert got2[1] == pytest.approx(144 / 256)


def test_all_zero_cam_is_nan_and_excluded() -> None:
    cams = torch.zeros(2, 8, 8)
    cams[0, :, :4] = 1.0
    mask = _half_mask(2, 8)
    got = cam_mass_in_mask(cams, mask)
    assert got[0] == 1.0 and torch.isnan(got[1])
    assert zero_cam_share(cams) == 0.5
    assert zero_cam_share(torch.full((4, 3, 3), 1e-9), atol=1e-6) == 1.0
    summary = localization_summary(cams, mask)
    assert summary["cam_in_mask"] == 1.0 and summary["zero_cam_share"] == 0.5
    assert summary["pointing_game"] == 1.0 and summary["n_nonzero"] == 1


def test_pointing_game_values_and_tolerance() -> None:
    mask = _half_mask(3)  # object = columns 0..7
    cams = torch.zeros(3, 16, 16)
    cams[0, 5, 3] = 1.0  # max on the object
    cams[1, 5, 12] = 1.0  # max 5 px right of the object's edge (column 7)
    hits = pointing_game(cams, mask)
    assert hits.dtype == torch.bool and hits.tolist() == [True, False, False]  # all-zero CAM: a miss
    assert pointing_game(cams, mask, tolerance=5.0).tolist() == [True, True, False]
    assert pointing_game(cams, mask, tolerance=4.9).tolist() == [True, False, False]


def test_cam_overlap_and_summary() -> None:
    a = torch.zeros(3, 8, 8)
    b = torch.zeros(3, 8, 8)
    a[0, :4] = 1.0
    b[0, :4] = 3.0  # identical up to scale (max-normalised)
    a[1, :4] = 1.0
    b[1, 4:] = 1.0  # disjoint
    a[2, :4] = 1.0  # b[2] all-zero
    ov = cam_overlap(a, b)
    assert ov[0] == pytest.approx(1.0, abs=1e-6)
    assert ov[1] == pytest.approx(0.0) and ov[2] == pytest.approx(0.0)
    s = localization_summary(a, conf_cams=b)
    assert s["cam_overlap_n"] == 2 and s["cam_overlap"] == pytest.approx(0.5, abs=1e-6)
    assert s["cam_in_mask"] is None and s["conf_zero_cam_share"] == pytest.approx(1 / 3)


def test_gaming_warnings() -> None:
    rows = [
        {"name": "ERM", "cam_in_mask": 0.40, "logit_leak": 0.60},
        {"name": "eX2L-clean", "cam_in_mask": 0.70, "logit_leak": 0.58},  # looks at the object, leaks less
        {"name": "eX2L-gamed", "cam_in_mask": 0.70, "logit_leak": 0.75},  # looks at the object, leaks more
        {"name": "GroupDRO", "cam_in_mask": 0.41, "logit_leak": 0.80},  # leaks more, CAM unchanged
        {"name": "no-masks", "cam_in_mask": None, "logit_leak": 0.9},
    ]
    warns = gaming_warnings(rows)
    assert len(warns) == 1 and warns[0].startswith("eX2L-gamed") and "ERM" in warns[0]
    assert gaming_warnings(rows, reference="eX2L-clean") == []  # same CAM share as the gamed row
    assert gaming_warnings(rows, cam_rise=0.5) == []
