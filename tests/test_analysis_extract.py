"""analysis.extract, overlays and embeddings: CAMs equal Captum's, plain torchvision models, seeded subsamples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from helpers import png_pixels, rendered, same_picture

from analysis.embeddings import MIN_SAMPLES, embed, embedding_figure
from analysis.extract import (
    CPU_PIXELS,
    DEVICE_BATCH,
    Extraction,
    batch_for,
    extract,
    random_copy,
    subsample_indices,
)
from analysis.overlays import cam_overlay, display_image, gradcam_grid, select_rows
from ex2l_xai.data import get_dataset
from ex2l_xai.errors import Ex2lError
from ex2l_xai.train import load_run_model


@pytest.fixture(scope="session")
def ex2l_run(analysis_runs) -> Path:
    """A finished 1-epoch eX2L run (two heads) on the tiny synthetic benchmark; shared by the analysis tests."""
    return analysis_runs("ex2l")


@pytest.fixture(scope="module")
def tiny_test() -> object:
    return get_dataset("synthetic", "test", image_size=32, per_group=8, test_per_group=8)


def captum_cam(forward, layer, x: torch.Tensor, target: np.ndarray) -> np.ndarray:
    attr = LayerGradCam(forward, layer).attribute(x, target=torch.as_tensor(target), relu_attributions=True)
    return attr.squeeze(1).detach().numpy()


def images(dataset, indices: np.ndarray) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in indices])


def test_run_folder_cams_equal_captum(ex2l_run: Path) -> None:
    ext = extract(ex2l_run, "test", batch_size=7)  # batches of 7: the batched path must not mix samples
    model, config = load_run_model(ex2l_run)
    ds = get_dataset(config.data.name, "test", **config.data.options)
    assert len(ext) == len(ds) and ext.name == "eX2L" and ext.meta["algorithm"] == "ex2l"
    x = images(ds, ext.indices)
    lay_y, lay_c = model.cam_layers()
    with torch.no_grad():
        out = model(x)
    np.testing.assert_allclose(ext.latents, out.latent.numpy(), atol=1e-5)
    np.testing.assert_allclose(ext.logits, out.label.numpy(), atol=1e-5)
    np.testing.assert_allclose(ext.conf_logits, out.confounder.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ext.preds, out.label.argmax(1).numpy())
    np.testing.assert_array_equal(ext.labels, ds.labels[ext.indices])
    np.testing.assert_array_equal(ext.confounders, ds.confounders[ext.indices])
    np.testing.assert_array_equal(ext.envs, ds.envs[ext.indices])

    def label_fn(t: torch.Tensor) -> torch.Tensor:
        return model(t).label

    def conf_fn(t: torch.Tensor) -> torch.Tensor:
        return model(t).confounder

    for got, fn, layer, target in (
        (ext.cams_true, label_fn, lay_y, ext.labels),
        (ext.cams_pred, label_fn, lay_y, ext.preds),
        (ext.cams_conf, conf_fn, lay_c, ext.confounders),
    ):
        ref = captum_cam(fn, layer, x, target)
        assert got.shape == ref.shape == (len(ds), 4, 4)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert ext.masks is not None and ext.masks.shape == (len(ds), 32, 32) and ext.masks.dtype == bool
    np.testing.assert_array_equal(ext.masks, images_masks(ds, ext.indices))


def images_masks(dataset, indices: np.ndarray) -> np.ndarray:
    return np.stack([dataset[int(i)]["mask"][0].numpy() > 0.5 for i in indices])


def test_plain_torchvision_resnet18(tiny_test) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ext = extract(model, tiny_test, layer=model.layer4, max_samples=12, seed=3, batch_size=5)
    assert model.training, "the caller's train/eval mode must be restored"
    for k, v in model.state_dict().items():  # evaluated in eval mode: BatchNorm statistics untouched
        assert torch.equal(v, before[k]), k
    assert ext.latents.shape == (12, 512) and ext.logits.shape == (12, 4)
    assert ext.conf_logits is None and ext.cams_conf is None
    assert ext.meta["latent"] == "input of fc" and ext.meta["layer"] == "layer4"
    model.eval()
    x = images(tiny_test, ext.indices)
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
        logits = model(x)
    np.testing.assert_allclose(ext.latents, feats.numpy(), atol=1e-5)
    np.testing.assert_allclose(ext.logits, logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(ext.cams_true, captum_cam(model, model.layer4, x, ext.labels), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ext.cams_pred, captum_cam(model, model.layer4, x, ext.preds), atol=1e-5, rtol=0)
    # the other latent options
    pooled = extract(model, tiny_test, layer="layer4", latent_fn="pool", indices=ext.indices, cams=False)
    np.testing.assert_allclose(pooled.latents, ext.latents, atol=1e-5)
    assert pooled.cams_true is None
    fc_in = extract(model, tiny_test, latent_fn=model.fc, indices=ext.indices, cams=False)  # default layer: layer4
    np.testing.assert_allclose(fc_in.latents, ext.latents, atol=1e-5)

    def body(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.Sequential(*list(model.children())[:-1])(t)

    called = extract(model, tiny_test, latent_fn=body, indices=ext.indices, cams=False)
    np.testing.assert_allclose(called.latents, ext.latents, atol=1e-5)


def test_subsample_is_seeded_and_stratified(tiny_test) -> None:
    a = subsample_indices(tiny_test, 16, seed=0)
    assert np.array_equal(a, subsample_indices(tiny_test, 16, seed=0))
    assert not np.array_equal(a, subsample_indices(tiny_test, 16, seed=1))
    assert np.all(np.diff(a) > 0)
    groups = tiny_test.group_ids
    present = np.unique(groups)
    counts = np.bincount(groups[a], minlength=groups.max() + 1)[present]
    full = np.bincount(groups, minlength=groups.max() + 1)[present]
    np.testing.assert_allclose(counts / counts.sum(), full / full.sum(), atol=1 / 16 + 1e-9)
    assert (counts >= 1).all()
    assert subsample_indices(tiny_test, None).size == len(tiny_test)
    assert subsample_indices(tiny_test, 10_000).size == len(tiny_test)
    with pytest.raises(Ex2lError, match="max_samples"):
        subsample_indices(tiny_test, 0)


def test_default_batch_is_sized_by_pixels_on_cpu_and_does_not_change_the_numbers(tiny_test) -> None:
    """No batch size: CPU_PIXELS pixels a batch on a CPU (32 images at 128 px, 512 at 32 px), DEVICE_BATCH
    elsewhere; a given size wins. The extraction records what it used and its values do not depend on it."""
    assert batch_for(None, "cpu", (128, 128)) == CPU_PIXELS // (128 * 128) == 32
    assert batch_for(None, "cpu", (224, 224)) == CPU_PIXELS // (224 * 224) == 10
    assert batch_for(None, "cpu", (4000, 4000)) == 1
    assert batch_for(None, "cuda", (128, 128)) == DEVICE_BATCH
    assert batch_for(7, "cpu", (128, 128)) == 7
    with pytest.raises(Ex2lError, match="batch_size"):
        batch_for(0, "cpu", (32, 32))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    auto = extract(model, tiny_test, max_samples=24)
    small = extract(model, tiny_test, max_samples=24, batch_size=5)
    assert auto.meta["batch_size"] == CPU_PIXELS // (32 * 32) and small.meta["batch_size"] == 5
    np.testing.assert_allclose(auto.logits, small.logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(auto.cams_true, small.cams_true, rtol=1e-4, atol=1e-5)


def test_extract_errors(tiny_test) -> None:
    with pytest.raises(Ex2lError, match="needs a dataset object|a split name needs a run folder"):
        extract(torchvision.models.resnet18(num_classes=4), "test")
    with pytest.raises(Ex2lError, match=r"no module with a \(B, C, h, w\) output"):
        extract(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)), tiny_test)
    with pytest.raises(Ex2lError, match="not a module path"):
        extract(torchvision.models.resnet18(num_classes=4), tiny_test, layer="layer9")
    with pytest.raises(Ex2lError, match="expected a run folder or a torch.nn.Module"):
        extract(42, tiny_test)  # type: ignore[arg-type]


def test_random_copy_is_a_seeded_reinitialisation() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
    state = torch.get_rng_state()
    a, b = random_copy(model, seed=5), random_copy(model, seed=5)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left as it was"
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.fc.weight, model.fc.weight)
    assert torch.equal(model.fc.weight, torch.ones_like(model.fc.weight)), "the original must be untouched"
    assert not torch.equal(random_copy(model, seed=6).conv1.weight, a.conv1.weight)


# ---- overlays and embeddings -----------------------------------------------------------------------------------
def fake_extraction(preds: list[int], name: str = "m", cams: bool = True) -> Extraction:
    labels = np.asarray([0, 0, 0, 1, 1, 1, 0, 1])
    confs = np.asarray([0, 0, 1, 0, 1, 1, 1, 0])
    n = len(labels)
    rng = np.random.default_rng(0)
    maps = rng.random((n, 4, 4)).astype(np.float32) if cams else None
    return Extraction(
        latents=rng.normal(size=(n, 5)).astype(np.float32), logits=np.zeros((n, 2), np.float32), conf_logits=None,
        preds=np.asarray(preds), labels=labels, confounders=confs, envs=np.zeros(n, np.int64),
        indices=np.arange(n), masks=None, cams_true=maps, cams_pred=maps, cams_conf=None,
        label_names=["cat", "dog"], confounder_names=["grass", "sand"], env_names=["e0"], name=name,
    )


def test_select_rows_rules() -> None:
    # model A: group cat/sand (labels 0, conf 1: indices 2, 6) all wrong, everything else right
    a = fake_extraction([0, 0, 1, 1, 1, 1, 1, 1], "A")
    b = fake_extraction([0, 0, 0, 1, 1, 1, 0, 0], "B")
    rows = select_rows([a, b], "worst_groups", n_rows=5, seed=0)
    # one sample per group, worst group first; round-robin over the 4 groups, so the worst one comes twice
    assert rows[0] in (2, 6) and set(rows.tolist()) >= {2, 6} and len(set(rows.tolist())) == 5
    dis = select_rows([a, b], "disagreement", n_rows=3, seed=0)
    # disagreements: 2, 6 (A wrong, B right) first, then 7 (B wrong)
    assert set(dis[:2].tolist()) == {2, 6} and dis[2] == 7
    r1, r2 = select_rows([a], "random", 4, seed=1), select_rows([a], "random", 4, seed=1)
    assert np.array_equal(r1, r2) and len(set(r1.tolist())) == 4
    with pytest.raises(Ex2lError, match="rule"):
        select_rows([a], "best")


def test_cam_overlay_and_display() -> None:
    img = np.full((8, 8, 3), 0.5)
    over, up = cam_overlay(img, np.asarray([[0.0, 2.0], [0.0, 0.0]]), alpha=0.5)
    assert up.shape == (8, 8) and up.max() == pytest.approx(1.0) and up.min() >= 0
    assert over.shape == (8, 8, 3) and 0 <= over.min() and over.max() <= 1
    _, zero = cam_overlay(img, np.zeros((2, 2)))
    assert not zero.any()

    class Normalised:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    x = torch.zeros(3, 4, 4)
    np.testing.assert_allclose(display_image(x, Normalised()), 0.5)
    np.testing.assert_allclose(display_image(torch.full((3, 4, 4), 9.0)), 1.0)


def test_gradcam_grid_draws_the_overlays_it_claims(ex2l_run: Path, tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    ext = extract(ex2l_run, "test")
    model, config = load_run_model(ex2l_run)
    ds = get_dataset(config.data.name, "test", **config.data.options)
    other = Extraction(**{**ext.__dict__, "name": "copy", "preds": (ext.preds + 1) % 4})
    png = tmp_path / "grid.png"
    rows = ext.indices[[0, 5, 9]]
    fig = gradcam_grid([ext, other], ds, png, rows=rows, show_conf=True, dpi=80)
    axes = [ax for ax in fig.axes if ax.images][: 3 * 5]
    assert len(fig.axes) == 3 * 5 + 1  # input + 2 models with a confounder column each, and the colour bar
    assert "max-normalised" in fig.axes[-1].get_ylabel()
    for r, idx in enumerate(rows):
        i = int(np.flatnonzero(ext.indices == idx)[0])
        img = display_image(ds[int(idx)]["image"], ds)
        cells = axes[5 * r: 5 * r + 5]
        np.testing.assert_allclose(cells[0].images[0].get_array(), img)  # the input itself
        for ax, maps in ((cells[1], ext.cams_true), (cells[2], ext.cams_conf), (cells[3], other.cams_true)):
            np.testing.assert_allclose(ax.images[0].get_array(), cam_overlay(img, maps[i])[0])
        for ax, e in ((cells[1], ext), (cells[3], other)):  # title colour says right (green) or wrong (red)
            assert ax.title.get_color() == ("#1a7f37" if e.preds[i] == e.labels[i] else "#c62828")
            assert f"ŷ={e.label_names[e.preds[i]]}" in ax.get_title()
        assert ("zero CAM" in cells[1].get_title()) == (not np.any(ext.cams_true[i] > 0))
    same_picture(png_pixels(png), rendered(fig))  # the PNG holds this figure, at the figure's size
    assert matplotlib.get_backend() == backend, "a library function must not switch the user's backend"


def test_embedding_figure_plots_the_embedding(ex2l_run: Path, tmp_path: Path) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figs = matplotlib.get_backend(), plt.get_fignums()
    ext = extract(ex2l_run, "test", cams=False)
    emb = embed(ext.latents, seed=0, n_epochs=30, n_neighbors=5)
    assert emb.shape == (len(ext), 2) and np.isfinite(emb).all()
    np.testing.assert_allclose(emb, embed(ext.latents, seed=0, n_epochs=30, n_neighbors=5))  # seeded
    umap_png = tmp_path / "umap.png"
    fig = embedding_figure([ext], [emb], umap_png, colour_by=("label", "confounder", "env"), mmd=[0.0123], dpi=60)
    assert len(fig.axes) == 3
    for ax, names, values in zip(fig.axes, (ext.label_names, ext.confounder_names, ext.env_names),
                                 (ext.labels, ext.confounders, ext.envs), strict=True):
        pts = ax.collections[0].get_offsets()
        order = np.random.default_rng(0).permutation(len(ext))
        np.testing.assert_allclose(np.asarray(pts), emb[order])  # every point where the embedding puts it
        colours = ax.collections[0].get_facecolors()[:, :3]
        for v in np.unique(values):  # one colour per value, a different one for each value
            assert len({tuple(np.round(c, 4)) for c in colours[values[order] == v]}) == 1
        assert len({tuple(np.round(c, 4)) for c in colours}) == len(np.unique(values))
        legend = [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
        assert not legend or legend == [names[v] for v in np.unique(values)]
    assert "MMD$_{env}$ = 0.0123" in fig.axes[0].texts[0].get_text()
    same_picture(png_pixels(umap_png), rendered(fig))
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figs, "no pyplot figure, no backend switch"


def test_embed_refuses_tiny_input_and_labels_pca(tmp_path: Path) -> None:
    with pytest.raises(Ex2lError, match=f"at least {MIN_SAMPLES} samples"):
        embed(np.zeros((MIN_SAMPLES - 1, 3)))
    with pytest.raises(Ex2lError, match="NaN"):
        embed(np.full((20, 3), np.nan))
    e = fake_extraction([0] * 8)
    fig = embedding_figure([e], None, tmp_path / "pca.png", method="pca", colour_by=("label",))
    assert "PCA" in fig.get_suptitle()
    assert fig.axes[0].get_xlabel() == "PCA 1"
