"""Slice discovery and spuriosity ranking on planted latents whose answer is known (analysis/slices.py)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.slices import discover_slices, head_weights, project_out, score_slices, spuriosity


def _head(z: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = z @ w.T
    return logits, logits.argmax(1)


def _planted(seed: int = 0, n: int = 120):
    """Class 0: two clusters apart along feature 2 (orthogonal to the head); class 1: one Gaussian blob.
    The head reads feature 0 (class 0) and feature 1 (class 1) only."""
    rng = np.random.default_rng(seed)
    d = 6
    z0 = rng.normal(0, 1, (n, d)) + np.array([4, 0, 0, 0, 0, 0])
    hidden = (np.arange(n) % 2).astype(np.int64)
    z0[:, 2] += np.where(hidden == 1, 8.0, -8.0)
    z1 = rng.normal(0, 1, (n, d)) + np.array([0, 4, 0, 0, 0, 0])
    z = np.vstack([z0, z1])
    labels = np.repeat([0, 1], n)
    conf = np.concatenate([hidden, rng.integers(0, 2, n)])
    w = np.zeros((2, d))
    w[0, 0], w[1, 1] = 1.0, 1.0
    return z, labels, conf, w


def test_head_weights_recover_a_linear_head_exactly():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 4))
    w = rng.normal(size=(3, 4))
    fit, r2 = head_weights(z, z @ w.T + 0.5)
    assert r2 == pytest.approx(1.0)
    np.testing.assert_allclose(fit, w, atol=1e-8)


def test_project_out_removes_the_direction_and_keeps_the_rest():
    z = np.array([[3.0, 4.0], [1.0, -2.0]])
    out = project_out(z, np.array([2.0, 0.0]))
    np.testing.assert_allclose(out, [[0.0, 4.0], [0.0, -2.0]])


def test_two_hidden_clusters_are_found_and_a_blob_is_not_split():
    z, labels, conf, w = _planted()
    logits, preds = _head(z, w)
    res = discover_slices(z, logits, labels, preds, seed=0)
    assert res.k[0] == 2
    assert res.k[1] == 1  # one Gaussian blob: no hidden structure, one slice
    sc = score_slices(res.slices, labels, conf, preds)
    assert sc["ari_per_class"][0] > 0.95
    assert sc["nmi_per_class"][0] > 0.9
    assert res.head_r2 == pytest.approx(1.0)
    sizes = {(r["label"], r["slice"]): r["size"] for r in res.table}
    assert sizes == {(0, 0): 60, (0, 1): 60, (1, 0): 120}


def test_a_split_along_the_class_direction_alone_is_not_reported():
    """Class 0's two clusters differ only along the head's own direction for class 0: projected out, no slices."""
    rng = np.random.default_rng(3)
    n = 120
    z0 = rng.normal(0, 1, (n, 4))
    z0[:, 0] += np.where(np.arange(n) % 2 == 1, 10.0, 2.0)
    z1 = rng.normal(0, 1, (n, 4))
    z1[:, 0] -= 6.0
    z = np.vstack([z0, z1])
    labels = np.repeat([0, 1], n)
    w = np.zeros((2, 4))
    w[0, 0], w[1, 0] = 1.0, -1.0
    logits, preds = _head(z, w)
    res = discover_slices(z, logits, labels, preds, seed=0)
    assert res.k[0] == 1
    # without the projection the same data would be split: the test can fail
    res_unprojected = discover_slices(z, logits, labels, preds, seed=0, weights=np.zeros_like(w))
    assert res_unprojected.k[0] == 2


def test_slice_table_ranks_by_the_accuracy_gap():
    slices = np.array([0, 0, 1, 1, 0, 0])
    labels = np.array([0, 0, 0, 0, 1, 1])
    preds = np.array([0, 0, 1, 1, 1, 1])
    logits = np.zeros((6, 2))
    res_table = __import__("analysis.slices", fromlist=["slice_table"]).slice_table(slices, labels, preds, logits)
    assert (res_table[0]["label"], res_table[0]["slice"], res_table[0]["acc"]) == (0, 1, 0.0)
    assert res_table[0]["gap"] == pytest.approx(-0.5)
    assert res_table[0]["confidence"] == pytest.approx(0.5)
    assert res_table[0]["share"] == pytest.approx(0.5)


def test_score_slices_true_worst_group():
    labels = np.array([0, 0, 0, 0])
    conf = np.array([0, 0, 1, 1])
    preds = np.array([0, 0, 0, 1])
    sc = score_slices(np.array([0, 0, 1, 1]), labels, conf, preds)
    assert sc["ari"] == pytest.approx(1.0) and sc["nmi"] == pytest.approx(1.0)
    assert sc["true_worst_group_acc"] == pytest.approx(0.5)


def test_spuriosity_ranks_the_planted_spurious_feature_first():
    """Class 0 is read by a core feature (0) and a spurious one (1) that is off in the minority slice, where the
    model errs; feature 2 is weighed but equal in both slices."""
    rng = np.random.default_rng(5)
    n = 200
    minority = np.arange(n) < 50
    z = np.abs(rng.normal(1.0, 0.2, (n, 4)))
    z[:, 1] = np.where(minority, 0.1, 2.0) + rng.normal(0, 0.1, n)
    labels = np.zeros(n, dtype=np.int64)
    preds = np.where(minority & (np.arange(n) % 5 != 0), 1, 0)
    w = np.array([[1.0, 1.5, 1.2, 0.0], [0.0, 0.0, 0.0, 1.0]])
    sp = spuriosity(z, labels, preds, minority.astype(np.int64), w, {0: 1}, m=3)
    rec = sp.classes[0]
    assert rec["candidates"][0]["feature"] == 1
    assert rec["flagged"] == [1]
    # the top quartile (spurious cue present) is all correct; the bottom quartile (minority) mostly wrong
    assert rec["top_acc"] == pytest.approx(1.0)
    assert rec["bottom_acc"] == pytest.approx(0.2, abs=0.05)
    assert rec["gap"] == pytest.approx(0.8, abs=0.05)
    assert np.all(sp.scores[minority].max() < sp.scores[~minority].min())


def test_spuriosity_with_off_object_shares_flags_by_mask():
    rng = np.random.default_rng(6)
    z = np.abs(rng.normal(1, 0.3, (40, 3)))
    labels = np.zeros(40, dtype=np.int64)
    w = np.array([[1.0, 1.0, 1.0]])
    sp = spuriosity(z, labels, labels, np.zeros(40, dtype=np.int64), w, {0: 0}, m=3,
                    off_object={0: np.array([0.1, 0.9, 0.3])})
    assert sp.classes[0]["flagged"] == [1]
    assert sp.classes[0]["candidates"][0]["feature"] == 1


def test_off_object_shares_of_a_channel_map():
    """A 1x1 conv whose channel 0 reads the object's red and channel 1 the background's blue; the latent is their
    global average pool (the fc input): channel 0 lies entirely on the object, channel 1 entirely off it."""
    import torch
    from torch import nn

    from analysis.adapter import ModelAdapter
    from analysis.datasets import AuditDataset
    from analysis.extract import extract
    from analysis.slice_maps import off_object_shares

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[0, 0] = 1.0
                self.conv.weight[1, 2] = 1.0
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    n = 8
    images = torch.zeros(n, 3, 8, 8)
    masks = np.zeros((n, 8, 8))
    masks[:, 2:6, 2:6] = 1
    images[:, 0, 2:6, 2:6] = 1.0
    images[:, 2] = 1.0 - torch.as_tensor(masks, dtype=torch.float32)
    labels = torch.tensor([0, 1] * (n // 2))
    ds = AuditDataset(torch.utils.data.TensorDataset(images, labels), confounders=np.zeros(n, dtype=np.int64),
                      masks=list(masks))
    model = Net().eval()
    adapter = ModelAdapter(model, layer=model.conv)
    ext = extract(adapter, ds, cams=False)
    shares, base, how = off_object_shares(adapter, ds, ext)
    for y in (0, 1):
        np.testing.assert_allclose(shares[y], [0.0, 1.0], atol=1e-6)
        assert base[y] == pytest.approx(48 / 64)  # the background's area: a uniform map's share
    assert "conv" in how
    # a latent that is not the CAM layer's pool: no maps, a reason
    other = ModelAdapter(model, layer=model.conv, latent_fn=lambda x: torch.ones(x.shape[0], 2))
    ext2 = extract(other, ds, cams=False)
    assert off_object_shares(other, ds, ext2)[0] is None
    # the per-class bar: 0.9 off the object is not spurious where the background is 95 % of the image
    z = np.ones((4, 2))
    sp = spuriosity(z, np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64),
                    np.ones((1, 2)), {0: 0}, m=2, off_object={0: np.array([0.9, 0.97])}, off_min={0: 0.95})
    assert sp.classes[0]["flagged"] == [1]


def test_spuriosity_orients_a_feature_higher_in_the_worst_slice():
    """The flagged feature is HIGHER in the worst slice: a high spuriosity still means 'like the rest of the class'."""
    rng = np.random.default_rng(7)
    n = 80
    minority = np.arange(n) < 20
    z = np.abs(rng.normal(1.0, 0.1, (n, 2)))
    z[:, 1] = np.where(minority, 3.0, 1.0) + rng.normal(0, 0.1, n)
    labels = np.zeros(n, dtype=np.int64)
    preds = np.where(minority, 1, 0)
    sp = spuriosity(z, labels, preds, minority.astype(np.int64), np.ones((2, 2)), {0: 1}, m=2)
    assert sp.classes[0]["flagged"] == [1] and sp.classes[0]["candidates"][0]["separation"] > 0.8
    assert sp.scores[minority].max() < sp.scores[~minority].min()
    assert sp.classes[0]["gap"] == pytest.approx(1.0)
