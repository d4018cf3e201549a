"""The synthetic renderer draws a sample's own object on any background, exactly; the interventional reliance test
(analysis.interventions) on hand-built models that read only the background or only the object."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis.interventions import background_prior, interventions
from ex2l_xai.data import BACKGROUNDS, get_dataset
from ex2l_xai.errors import DataError


@pytest.fixture(scope="module")
def ds():
    return get_dataset("synthetic", "test", challenge="m2m_hard", image_size=48, per_group=4, test_per_group=6)


def test_own_background_reproduces_the_sample(ds) -> None:
    for i in range(0, len(ds), 5):
        img, mask = ds.render_on_background(i, int(ds.confounders[i]))
        s = ds[i]
        np.testing.assert_array_equal(img, s["image"].numpy())
        np.testing.assert_array_equal(mask, s["mask"][0].numpy() > 0.5)


def test_same_object_pixel_for_pixel_on_every_background(ds) -> None:
    for i in (0, 7, len(ds) - 1):
        own = ds[i]
        inside = own["mask"][0].numpy() > 0.5
        assert 0.02 < inside.mean() < 0.3
        for b in range(len(BACKGROUNDS)):
            img, mask = ds.render_on_background(i, b)
            np.testing.assert_array_equal(mask, inside)  # the object's footprint does not move
            np.testing.assert_array_equal(img[:, inside], own["image"].numpy()[:, inside])
            alone, empty = ds.render_on_background(i, b, draw_object=False)
            assert not empty.any()
            # outside the mask the swapped image IS that background; inside, the background alone differs
            np.testing.assert_array_equal(img[:, ~inside], alone[:, ~inside])
            assert np.abs(img[:, inside] - alone[:, inside]).mean() > 0.05
            assert alone.dtype == np.float32 and np.abs(alone * 255 - np.round(alone * 255)).max() < 1e-3
        # different backgrounds really differ outside the object
        a, _ = ds.render_on_background(i, 0)
        b, _ = ds.render_on_background(i, 4)
        assert np.abs(a[:, ~inside] - b[:, ~inside]).mean() > 0.1


def test_render_on_background_rejects_unknown_background(ds) -> None:
    with pytest.raises(DataError, match="background=6"):
        ds.render_on_background(0, 6)


# ---- the interventional test on planted models ----------------------------------------------------------------

GREYS = (0.2, 0.5, 0.8)  # background level of confounder 0, 1, 2
COLOURS = torch.eye(3)  # object colour of label 0, 1, 2: pure red, green, blue


class Squares(torch.utils.data.Dataset):
    """Label = the colour of an 8x8 square at a random place; confounder = the grey level of the background, equal
    to the label for 90% of the samples; masks exact."""

    label_names = ["red", "green", "blue"]
    confounder_names = env_names = ["dark", "mid", "light"]
    has_masks = True

    def __init__(self, n: int = 150, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 3, n)
        self.confounders = np.where(rng.random(n) < 0.9, self.labels, rng.integers(0, 3, n))
        self.pos = rng.integers(0, 16, (n, 2))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        img = torch.full((3, 24, 24), GREYS[self.confounders[i]])
        mask = torch.zeros(1, 24, 24)
        r, c = self.pos[i]
        mask[:, r: r + 8, c: c + 8] = 1
        img = img * (1 - mask) + COLOURS[self.labels[i]][:, None, None] * mask
        return {"image": img, "label": int(self.labels[i]), "confounder": int(self.confounders[i]),
                "env": int(self.confounders[i]), "index": i, "mask": mask}


class GreyReader(nn.Module):
    """Reads only the background: the brightest grey pixel (min over channels: 0 on the pure-coloured object),
    mapped to the label whose background that grey is."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = nn.Parameter(torch.tensor(GREYS), requires_grad=False)

    def forward(self, x):
        v = x.min(1).values.flatten(1).max(1).values
        return -(v[:, None] - self.levels[None]).abs()


class ColourReader(nn.Module):
    """Reads only the object: the most saturated channel anywhere (grey backgrounds have no saturation)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x):
        return self.scale * (x - x.min(1, keepdim=True).values).flatten(2).max(2).values


def test_composite_background_reader_has_a_large_bg_gap() -> None:
    ds = Squares()
    prior = np.eye(3)  # in training, each colour sat on its own grey
    res = interventions(GreyReader(), ds, max_samples=None, prior=prior, seed=1).summary
    own = float(np.mean(ds.labels == ds.confounders))
    assert res["method"] == "composite" and res["n"] == len(ds)
    assert res["original_acc"] == pytest.approx(own) and res["only_bg_acc"] == pytest.approx(own)
    assert res["mixed_same_acc"] == 1.0  # the object always lands on its own class's grey
    assert res["only_fg_acc"] == pytest.approx(np.mean(ds.labels == 0))  # black reads as the darkest grey
    assert 0.2 < res["mixed_rand_acc"] < 0.47  # a random one of three greys (150 draws)
    assert res["bg_gap"] == pytest.approx(1.0 - res["mixed_rand_acc"]) and res["bg_gap"] > 0.5
    # the prediction follows the background: it flips exactly when the drawn grey differs from the original's
    sub = interventions(GreyReader(), ds, indices=np.flatnonzero(ds.labels == ds.confounders), prior=prior,
                        seed=1).summary
    assert sub["flip_rate"] == pytest.approx(1.0 - sub["mixed_rand_acc"])


def test_composite_object_reader_has_no_bg_gap() -> None:
    ds = Squares()
    res = interventions(ColourReader(), ds, max_samples=None, prior=np.eye(3), seed=1).summary
    for v in ("original", "only_fg", "mixed_same", "mixed_rand"):
        assert res[f"{v}_acc"] == 1.0, v
    assert res["bg_gap"] == 0.0 and res["flip_rate"] == 0.0
    assert res["only_bg_acc"] == pytest.approx(np.mean(ds.labels == 0))  # no object: every logit 0, argmax 0


# ---- the exact (renderer) method ---------------------------------------------------------------------------------
FRAME = 3


class FrameColour(nn.Module):
    """Reads only the background: the mean colour of a 3-pixel frame (the object keeps clear of the border),
    the nearest background prototype, and the label that background went with in training."""

    def __init__(self, prototypes: torch.Tensor, assoc: np.ndarray, n_labels: int) -> None:
        super().__init__()
        self.protos = nn.Parameter(prototypes, requires_grad=False)
        onehot = torch.full((len(assoc), n_labels), -1e6)
        onehot[torch.arange(len(assoc)), torch.as_tensor(assoc)] = 0.0
        self.register_buffer("assoc", onehot)

    def forward(self, x):
        frame = torch.ones_like(x[0, 0], dtype=torch.bool)
        frame[FRAME:-FRAME, FRAME:-FRAME] = False
        colour = x[:, :, frame].mean(2)
        d = -torch.cdist(colour, self.protos)  # (B, n_backgrounds)
        return (d[:, :, None] + self.assoc[None]).max(1).values


class OutlineCount(nn.Module):
    """Reads only the object: the number of outline pixels (exactly 15/255 grey, a colour no background has),
    bucketed into a class."""

    def __init__(self) -> None:
        super().__init__()
        self.edges = nn.Parameter(torch.tensor([0.0, 40.0, 55.0, 70.0]), requires_grad=False)

    def forward(self, x):
        outline = ((x - 15 / 255).abs() < 0.5 / 255).all(1).flatten(1).sum(1).float()
        return -(outline[:, None] - self.edges[None]).abs()


@pytest.fixture(scope="module")
def o2o():
    opts = {"challenge": "o2o_easy", "image_size": 32, "per_group": 20, "test_per_group": 8}
    train = get_dataset("synthetic", "train", **opts)
    val = get_dataset("synthetic", "val", **opts)  # the training distribution: class i on its own background
    return train, val


def test_exact_background_reader_matches_the_planted_table(o2o) -> None:
    train, val = o2o
    n_bg = len(BACKGROUNDS)
    protos = torch.stack([
        torch.from_numpy(np.stack([train.render_on_background(i, b, draw_object=False)[0] for i in range(12)]))
        .mean(0)[:, torch.ones(32, 32).bool() & ~_inner(32)].mean(1) for b in range(n_bg)])
    prior = background_prior(train.labels, train.confounders, 4, n_bg)
    assoc = prior.argmax(0)  # the label each background went with most in training (desert, jungle, dirt, snow)
    model = FrameColour(protos, assoc, 4)
    res = interventions(model, val, max_samples=None, prior=prior, n_examples=2)
    s, on_bg = res.summary, res.preds["on_background"]
    np.testing.assert_array_equal(on_bg, np.broadcast_to(assoc, on_bg.shape))  # it reads the background only
    y, c = val.labels, val.confounders
    hit = assoc[None, :] == y[:, None]  # (N, n_bg): right on background b
    assert s["method"] == "exact" and s["n"] == len(val) and s["n_forward"] == len(val) * (n_bg + 2)
    assert s["original_acc"] == pytest.approx(hit[np.arange(len(y)), c].mean())
    assert s["only_bg_acc"] == pytest.approx(s["original_acc"])
    assert s["mixed_same_acc"] == pytest.approx((prior[y] * hit).sum(1).mean())
    assert s["mixed_rand_acc"] == pytest.approx(hit.mean())
    assert s["bg_gap"] == pytest.approx(s["mixed_same_acc"] - s["mixed_rand_acc"]) and s["bg_gap"] > 0.6
    assert s["only_bg_acc"] > 0.9
    flips = assoc[None, :] != assoc[c][:, None]
    others = np.arange(n_bg)[None, :] != c[:, None]
    assert s["flip_rate"] == pytest.approx(flips[others].mean())
    table = s["per_class_background"]
    for lab, name in enumerate(val.label_names):
        for b, bg in enumerate(BACKGROUNDS):
            assert table[name]["acc"][bg] == float(assoc[b] == lab), (name, bg)
        assert table[name]["train_share"][BACKGROUNDS[int(np.argmax(prior[lab]))]] > 0.9
    assert len(res.examples) == 2 and res.examples[0]["images"]["original"].shape == (32, 32, 3)
    np.testing.assert_array_equal(res.examples[0]["images"]["original"],
                                  val[int(res.examples[0]["index"])]["image"].permute(1, 2, 0).numpy())


def test_exact_object_reader_ignores_every_background(o2o) -> None:
    _, val = o2o
    res = interventions(OutlineCount(), val, max_samples=24)
    s, on_bg = res.summary, res.preds["on_background"]
    assert (on_bg == on_bg[:, :1]).all()  # the same prediction on all six backgrounds
    assert s["flip_rate"] == 0.0 and s["bg_gap"] == 0.0
    assert s["mixed_same_acc"] == pytest.approx(s["original_acc"]) == pytest.approx(s["mixed_rand_acc"])
    assert s["only_fg_acc"] == pytest.approx(s["original_acc"])  # the object alone: the same outline


def test_interventions_without_masks_say_why() -> None:
    class NoMask(Squares):
        has_masks = False

        def __getitem__(self, i: int) -> dict:
            s = super().__getitem__(i)
            s.pop("mask")
            return s

    res = interventions(ColourReader(), NoMask(n=10))
    assert res.summary["available"] is False and "no object masks" in res.summary["reason"]
    with pytest.raises(Exception, match="exact"):
        interventions(ColourReader(), Squares(n=10), method="exact")


def _inner(size: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[FRAME:-FRAME, FRAME:-FRAME] = True
    return m


def test_intervention_figure_shows_each_version_and_prediction(o2o) -> None:
    from analysis.causal_plots import VARIANT_TITLES, intervention_figure
    from analysis.interventions import VARIANTS

    _, val = o2o
    a = interventions(OutlineCount(), val, max_samples=12, n_examples=2)
    b = interventions(ColourReader(), val, max_samples=12, n_examples=2)
    fig = intervention_figure([("outline", a), ("colour", b)], val.label_names)
    axes = fig.axes
    assert len(axes) == 2 * len(VARIANTS)
    for r, ex in enumerate(a.examples):
        for j, v in enumerate(VARIANTS):
            ax = axes[r * len(VARIANTS) + j]
            np.testing.assert_array_equal(ax.images[0].get_array(), np.clip(ex["images"][v], 0, 1))
            assert ax.get_title().startswith(VARIANT_TITLES[v])
            texts = [(t.get_text(), t.get_color()) for t in ax.texts]
            for (name, res), (text, colour) in zip((("outline", a), ("colour", b)), texts, strict=True):
                p = res.examples[r]["preds"][v]
                assert text == f"{name}: {val.label_names[p]}"
                assert colour == ("#1a7f37" if p == ex["label"] else "#c62828")
