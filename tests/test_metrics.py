import math

import numpy as np
import pytest
import torch

from ex2l_xai.metrics import add_group_nll, group_metrics

NAMES = ["a/x", "a/y", "b/x", "b/y"]


def test_group_metrics_hand_computed() -> None:
    # group 0: 3 samples, 2 right; group 1: 1 sample, 0 right; group 2: absent; group 3: 4 samples, 4 right
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    groups = [0, 0, 0, 1, 3, 3, 3, 3]
    preds = [0, 0, 1, 1, 1, 1, 1, 1]
    m = group_metrics(preds, labels, groups, NAMES)
    assert set(m) == {"avg_acc", "mean_group_acc", "worst_group_acc", "per_group"}
    assert m["avg_acc"] == pytest.approx(6 / 8)
    assert m["per_group"] == {
        "a/x": {"acc": pytest.approx(2 / 3), "n": 3},
        "a/y": {"acc": 0.0, "n": 1},
        "b/y": {"acc": 1.0, "n": 4},
    }
    assert list(m["per_group"]) == ["a/x", "a/y", "b/y"]  # group-id order, absent group left out
    assert m["mean_group_acc"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert m["worst_group_acc"] == 0.0
    assert isinstance(m["per_group"]["a/x"]["n"], int)


def test_group_metrics_accepts_tensors_and_arrays() -> None:
    preds = torch.tensor([1, 0, 1])
    labels = np.array([1, 1, 1])
    groups = torch.tensor([2, 2, 3])
    m = group_metrics(preds, labels, groups, NAMES)
    assert m["avg_acc"] == pytest.approx(2 / 3)
    assert m["worst_group_acc"] == pytest.approx(0.5)
    assert m["mean_group_acc"] == pytest.approx(0.75)
    assert all(0.0 <= v["acc"] <= 1.0 for v in m["per_group"].values())


def test_group_metrics_empty_and_bad_input() -> None:
    m = group_metrics([], [], [], NAMES)
    assert math.isnan(m["avg_acc"]) and math.isnan(m["worst_group_acc"]) and m["per_group"] == {}
    with pytest.raises(ValueError, match="length"):
        group_metrics([0, 1], [0], [0, 0], NAMES)
    with pytest.raises(ValueError, match="groups"):
        group_metrics([0], [0], [7], NAMES)


def test_group_nll_and_its_worst() -> None:
    """Per-group mean cross-entropy and the worst (highest) over the groups present."""
    m = group_metrics([0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 3, 3], NAMES)
    add_group_nll(m, np.array([0.1, 0.3, 2.0, 1.0]), np.array([0, 0, 3, 3]), NAMES)
    assert m["per_group"]["a/x"]["nll"] == pytest.approx(0.2)
    assert m["per_group"]["b/y"]["nll"] == pytest.approx(1.5)
    assert m["worst_group_nll"] == pytest.approx(1.5)


def test_selection_on_worst_group_nll_minimises_it() -> None:
    from ex2l_xai.config import load_config
    from ex2l_xai.train.rundir import selection_key

    config = load_config("quick", ["train.selection=val_worst_group_nll"])
    low, high = ({"val": {"worst_group_nll": v, "nll": 0.1}} for v in (0.2, 0.9))
    assert selection_key(config, low) > selection_key(config, high)
