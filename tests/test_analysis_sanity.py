"""The CAM sanity check (cascading randomisation): an explanation that ignores the weights fails it, Grad-CAM of a
trained small CNN passes it; the cascade order, the step counts, the rank correlation and the default CAM layer of
any nn.Module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import spearmanr
from torch import nn

from analysis.modules import cascade_modules, find_cam_layer, module_path, random_copy, randomize_
from analysis.sanity import cam_sanity, cascade_counts, rank_correlation
from ex2l_xai.data import get_dataset
from ex2l_xai.train import dataset_kwargs, load_run_model


@pytest.fixture(scope="module")
def erm_run(analysis_runs) -> Path:
    """The 1-epoch ERM run of the analysis tests (a small CNN on the tiny synthetic benchmark; shared)."""
    return analysis_runs("erm")


def image_gradient(_model: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    """A "CAM" that never looks at the model: the magnitude of the image's own spatial gradient (an edge map)."""
    g = x.mean(1)
    gx = (g[:, :, 1:] - g[:, :, :-1]).abs()[:, :-1, :]
    gy = (g[:, 1:, :] - g[:, :-1, :]).abs()[:, :, :-1]
    return gx + gy


def test_rank_correlation_matches_scipy_and_handles_constant_maps() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 4, 4)), rng.random((5, 4, 4))
    b[1] = a[1] * 3 + 1  # same ranking
    b[2] = -a[2]  # reversed
    b[3] = 0.0  # an all-zero map: no ranking
    rho = rank_correlation(a, b)
    assert rho[1] == pytest.approx(1.0) and rho[2] == pytest.approx(-1.0) and rho[3] == 0.0
    for i in (0, 4):
        assert rho[i] == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel()).statistic)


def test_cascade_counts_grow_geometrically_to_all() -> None:
    assert cascade_counts(9, 4) == [1, 2, 4, 9]
    assert cascade_counts(100, 5) == [1, 3, 10, 32, 100]
    assert cascade_counts(1, 5) == [1] and cascade_counts(3, 1) == [3]
    assert cascade_counts(3, 6) == [1, 2, 3]


class OutOfOrder(nn.Module):
    """Registers its head first and a confounder head it never uses for the label: the cascade must follow the
    forward pass (conv, then head) and leave the confounder head out."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.conf_head = nn.Linear(8, 2)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        z = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(z), self.conf_head(z)


def test_cascade_follows_the_forward_pass_from_the_output_end() -> None:
    x = torch.rand(2, 3, 12, 12)
    assert cascade_modules(OutOfOrder(), x) == ["head", "bn", "conv"]
    from ex2l_xai.models import TwoHeadNet

    dual = TwoHeadNet("small_cnn", 4, 6, architecture="dual", width=4)
    order = cascade_modules(dual, x)
    assert order[0] == "label_head" and order[-1] == "backbone.layer1.0"
    assert not any(p.startswith(("conf_", "conf_backbone")) for p in order)  # not on the label's path


def test_default_cam_layer_of_any_module() -> None:
    x = torch.rand(2, 3, 64, 64)
    resnet = torchvision.models.resnet18(num_classes=3)
    assert find_cam_layer(resnet, x) is resnet.layer4
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    assert module_path(seq, find_cam_layer(seq, x)) == "0"  # the feature block global pooling reads
    timm = pytest.importorskip("timm")
    eff = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    assert find_cam_layer(eff, x) is eff.bn2  # 1x1 head convolution + batch norm + ReLU6: the pooled map
    assert cascade_modules(eff, x)[:3] == ["classifier", "bn2", "conv_head"]


def test_randomize_reinitialises_in_place_and_random_copy_leaves_the_original() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.fill_(3.0)
        bn.running_mean.fill_(2.0)
    randomize_(bn)
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.running_mean, torch.zeros(4))
    with pytest.warns(FutureWarning):  # torch.jit.script's deprecation notice
        script = torch.jit.script(nn.Linear(5, 5))  # no reset_parameters: drawn from N(0, std^2)
    before = script.weight.detach().clone()
    randomize_(script)
    after = script.weight.detach()
    assert not torch.equal(after, before)
    assert abs(float(after.std()) - float(before.std())) < 0.5 * float(before.std())
    model = OutOfOrder()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clone = random_copy(model, seed=1)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(clone.conv.weight, model.conv.weight)


def test_a_weight_blind_map_fails_and_gradcam_of_a_trained_cnn_passes(erm_run: Path) -> None:
    model, config = load_run_model(erm_run)
    ds = get_dataset(config.data.name, "test", **dataset_kwargs(config))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blind = cam_sanity(model, ds, max_samples=16, steps=4, cam_fn=image_gradient).summary
    assert blind["passes"] is False and "do NOT depend" in blind["verdict"]
    for step in blind["steps"]:  # the map cannot change: similarity 1 at every step
        assert step["spearman"] == pytest.approx(1.0) and step["ssim"] == pytest.approx(1.0)
    res = cam_sanity(model, ds, max_samples=16, steps=4, seed=0)
    s = res.summary
    assert s["passes"] is True and "depend on the weights" in s["verdict"]
    assert s["layer"] == "backbone.layer4" and s["n_modules"] == 9  # 4 conv-BN stages and the label head
    assert [st["randomized"]["n_modules"] for st in s["steps"]] == [1, 2, 4, 9]
    assert s["steps"][0]["randomized"]["last"] == "label_head"
    assert s["steps"][-1]["spearman"] < 0.5 and s["steps"][-1]["randomized"]["last"] == "backbone.layer1.0"
    assert s["n"] + s["n_zero_original"] == 16
    assert len(res.example["steps"]) == 4 and res.example["trained"].shape == (32, 32)
    for k, v in model.state_dict().items():  # the audited model itself is untouched
        assert torch.equal(v, state[k]), k


def test_sanity_figure_plots_the_measured_curves(erm_run: Path) -> None:
    from analysis.causal_plots import sanity_figure

    model, config = load_run_model(erm_run)
    ds = get_dataset(config.data.name, "test", **dataset_kwargs(config))
    res = cam_sanity(model, ds, max_samples=8, steps=3)
    blind = cam_sanity(model, ds, max_samples=8, steps=3, cam_fn=image_gradient)
    fig = sanity_figure([("gradcam", res), ("edges", blind)])
    ax_r, ax_s = fig.axes[:2]
    for line, r in zip(ax_r.lines, (res, blind), strict=False):
        np.testing.assert_allclose(line.get_ydata(), [1.0] + [s["spearman"] for s in r.summary["steps"]])
    for line, r in zip(ax_s.lines, (res, blind), strict=False):
        np.testing.assert_allclose(line.get_ydata(), [1.0] + [s["ssim"] for s in r.summary["steps"]])
    assert [t.get_text() for t in ax_r.get_xticklabels()] == ["trained"] + [
        str(s["randomized"]["n_modules"]) for s in res.summary["steps"]]
    maps = [ax for ax in fig.axes[2:] if ax.images]
    assert len(maps) == 2 * (2 + len(res.summary["steps"]))  # image, trained CAM, one per step; per model
    trained = res.example["trained"]
    np.testing.assert_allclose(maps[1].images[0].get_array(), trained / trained.max())
