"""Faithfulness metrics (analysis/faithfulness.py) on a planted model whose decision is a known region: the true map
beats a random map, which beats the inverted map; ROAD's noisy linear imputation is exact on linear images, touches
every colour channel (Quantus #75) and moves the score (Quantus #333)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from analysis.faithfulness import (
    auc,
    baseline_images,
    centre_maps,
    faithfulness,
    noisy_linear_impute,
    pixel_ranks,
    random_maps,
)
from ex2l_xai.errors import Ex2lError

SIZE = 32


class Quadrant(nn.Module):
    """Class 1's logit is 40 x (energy of channel 0 in the top-left quadrant - 0.125), class 0's is 0: the decision
    uses the top-left quadrant's texture only (energy = mean of (x - 0.5)²; 0.25 for binary noise, 0 when the
    pixels are replaced by a blur, the mean colour, or imputed from their neighbours)."""

    def forward(self, x: Tensor) -> Tensor:
        q = x[:, 0, : SIZE // 2, : SIZE // 2]
        energy = ((q - 0.5) ** 2).mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(energy), 40 * (energy - 0.125)], 1)


def _images(n: int = 6) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand((n, 3, SIZE, SIZE), generator=g) > 0.5).float()


def _true_map(n: int) -> Tensor:
    m = torch.zeros(n, 8, 8)
    m[:, :4, :4] = 1.0
    return m


@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_true_map_beats_random_beats_inverted(baseline: str) -> None:
    x = _images()
    model = Quadrant()
    target = model(x).argmax(1)
    assert bool((target == 1).all())
    res = {name: faithfulness(model, x, m, target, steps=10, baseline=baseline, seed=0).summary()
           for name, m in (("true", _true_map(len(x))), ("random", random_maps(len(x), (8, 8), seed=3)),
                           ("inverted", 1.0 - _true_map(len(x))))}
    margin = 0.15  # analytic: deletion AUC ~0.15 / ~0.5 / ~0.85; ROAD MoRF ~0.15 / ~0.6 / ~0.9
    for lo, hi in (("true", "random"), ("random", "inverted")):
        assert res[lo]["deletion_auc"] + margin < res[hi]["deletion_auc"], res
        assert res[lo]["insertion_auc"] > res[hi]["insertion_auc"] + margin, res
        assert res[lo]["road_morf"] + margin < res[hi]["road_morf"], res
        assert res[lo]["road_lerf"] > res[hi]["road_lerf"] + margin, res


def test_imputation_reproduces_a_linear_gradient_in_every_channel() -> None:
    ys, xs = np.mgrid[0:12, 0:10].astype(np.float64)
    img = np.stack([0.1 + 0.05 * ys + 0.02 * xs, 0.9 - 0.03 * xs, 0.2 + 0.04 * ys])
    removed = np.zeros((12, 10), bool)
    removed[3:8, 2:7] = True  # a 5x5 hole away from the border: the 8-neighbour mean is exact for linear images
    removed[1, 8] = True
    got = noisy_linear_impute(img, removed, noise=0.0)
    np.testing.assert_allclose(got, img, atol=1e-10)
    # with noise, each channel of each removed pixel moves (Quantus #75: one channel perturbed), the rest do not
    noisy = noisy_linear_impute(img, removed, noise=0.01, rng=np.random.default_rng(0))
    diff = np.abs(noisy - img)
    assert (diff[:, removed] > 0).all() and (diff[:, ~removed] == 0).all()
    # an image that is not smooth changes where pixels are removed, in all three channels
    rough = np.random.default_rng(1).random((3, 12, 10))
    changed = np.abs(noisy_linear_impute(rough, removed, noise=0.0) - rough)[:, removed].mean(axis=1)
    assert (changed > 0.05).all()


def test_imputation_at_the_border_normalises_the_weights() -> None:
    img = np.full((1, 4, 4), 0.7)
    removed = np.zeros((4, 4), bool)
    removed[0, 0] = removed[3, 2] = True  # a corner (3 neighbours) and an edge pixel (5)
    np.testing.assert_allclose(noisy_linear_impute(img, removed, noise=0.0), img, atol=1e-12)
    with pytest.raises(Ex2lError, match="every pixel"):
        noisy_linear_impute(img, np.ones((4, 4), bool))


def test_road_is_not_identically_zero_and_moves_with_the_map() -> None:
    x = _images(4)
    model = Quadrant()
    target = model(x).argmax(1)
    res = faithfulness(model, x, _true_map(4), target, steps=8, seed=0)
    assert res.morf.shape == (4, 5) and res.lerf.shape == (4, 5)
    assert res.morf.std() > 0.01 and res.morf.max() > 0.1  # Quantus #333: ROAD always 0
    assert res.deletion.shape == (4, 9) and np.allclose(res.deletion[:, 0], res.insertion[:, -1])
    assert np.allclose(res.deletion[:, 0], torch.softmax(model(x), 1)[:, 1].numpy(), atol=1e-6)


def test_helpers() -> None:
    ranks = pixel_ranks(torch.tensor([[[0.0, 2.0], [1.0, 2.0]]]), (2, 2), seed=0)
    assert sorted(ranks[0, [1, 3]].tolist()) == [0, 1] and ranks[0, 2] == 2 and ranks[0, 0] == 3
    flat = pixel_ranks(torch.zeros(1, 4, 4), (4, 4), seed=0)[0]
    assert sorted(flat.tolist()) == list(range(16)) and flat.tolist() != list(range(16))  # ties: random order
    c = centre_maps(2, (5, 5))
    assert c.shape == (2, 5, 5) and c[0].argmax() == 12 and c[0, 0, 0] < c[0, 1, 1] < c[0, 2, 2]
    r = random_maps(2, (3, 3), seed=1)
    assert torch.equal(r, random_maps(2, (3, 3), seed=1)) and not torch.equal(r[0], r[1])
    np.testing.assert_allclose(auc(np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.5, 1.0])), 0.75)
    x = _images(2)
    m = baseline_images(x, "mean")
    assert torch.allclose(m[:, :, 3, 5], x.mean(dim=(2, 3)))
    b = baseline_images(x, "blur")
    assert b.shape == x.shape and b.std() < x.std() / 2
    with pytest.raises(Ex2lError, match="faith_baseline"):
        baseline_images(x, "zeros")


def test_road_shares_one_factorisation_between_equal_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    import analysis.faithfulness as faith

    x = _images(4)
    model = Quadrant()
    target = model(x).argmax(1)
    seen = []
    real = faith.noisy_linear_impute

    def counting(image, removed, **kw):
        seen.append(image.shape[0])
        return real(image, removed, **kw)

    monkeypatch.setattr(faith, "noisy_linear_impute", counting)
    shared = faith.road(model, x, pixel_ranks(centre_maps(4, (8, 8)), (SIZE, SIZE)), target, percentages=(30,),
                        noise=0.0)
    assert seen == [12, 12]  # MoRF and LeRF: one system each for the 4 images x 3 channels
    one = [faith.road(model, x[i:i + 1], pixel_ranks(centre_maps(1, (8, 8)), (SIZE, SIZE)), target[i:i + 1],
                      percentages=(30,), noise=0.0)["morf"][0, 0] for i in range(4)]
    np.testing.assert_allclose(shared["morf"][:, 0], one, atol=1e-5)


class _Energy(nn.Module):
    """(B, 1, 8, 8): the texture energy (x - 0.5)² of channel 0, averaged over 4x4 cells."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool2d((x[:, :1] - 0.5) ** 2, 4)


class PlantedCNN(nn.Module):
    """Quadrant's decision through a CAM layer: class 1's logit reads the top-left 4x4 cells of the energy map."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = _Energy()

    def forward(self, x: Tensor) -> Tensor:
        tl = self.energy(x)[:, 0, :4, :4].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(tl), 40 * (tl - 0.125)], 1)


def test_the_audit_check_ranks_variants_against_chance(tmp_path) -> None:
    """In the audit: HiResCAM (gradient x activation) finds the top-left quadrant and beats the random map and the
    centre prior by 0.15; Grad-CAM's map is flat here (one channel: its weight times an energy map that is the same
    everywhere), so it reads as chance."""
    from torch.utils.data import TensorDataset

    from analysis.audit import AuditTarget, audit_one
    from analysis.settings import AuditSettings

    x = _images(8)
    target = AuditTarget(model=PlantedCNN(), dataset=TensorDataset(x, torch.ones(8, dtype=torch.long)),
                         confounders=np.arange(8) % 2, name="planted")
    s = AuditSettings(max_samples=None, faith_samples=8, cam_variants=("hirescam", "gradcam"), faith_steps=8)
    res = audit_one(target, s, checks=["faithfulness"])
    f = res.entry["faithfulness"]
    assert list(f) == ["hirescam", "gradcam"] and res.entry["layer"] == "energy"
    hi, gc = f["hirescam"], f["gradcam"]
    assert hi["random"] == gc["random"] and hi["centre"] == gc["centre"]  # chance is computed once per model
    for base in ("random", "centre"):
        assert hi["deletion_auc"] + 0.15 < hi[base]["deletion_auc"], f
        assert hi["insertion_auc"] > hi[base]["insertion_auc"] + 0.15, f
        assert hi["road_morf"] + 0.15 < hi[base]["road_morf"], f
        assert hi["road_lerf"] > hi[base]["road_lerf"] + 0.15, f
    assert abs(gc["deletion_auc"] - gc["random"]["deletion_auc"]) < 0.15
    assert hi["n"] == 8 and len(hi["curves"]["cam"]["deletion"]) == 9
    off = audit_one(target, s.replace(faithfulness=False), checks=["faithfulness"])
    assert off.entry["faithfulness"] == {"available": False, "reason": "skipped (faithfulness=False)"}


def _dense_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The imputation system written out pixel by pixel and solved densely: the reference of the sparse solve."""
    from analysis.faithfulness import NEIGHBOURS

    c, h, w = image.shape
    idx = [(r, q) for r in range(h) for q in range(w) if removed[r, q]]
    pos = {p: i for i, p in enumerate(idx)}
    a, b = np.zeros((len(idx), len(idx))), np.zeros((len(idx), c))
    for i, (r, q) in enumerate(idx):
        for (dr, dq), wt in NEIGHBOURS:
            rr, qq = r + dr, q + dq
            if 0 <= rr < h and 0 <= qq < w:
                a[i, i] += wt
                if (rr, qq) in pos:
                    a[i, pos[rr, qq]] -= wt
                else:
                    b[i] += wt * image[:, rr, qq]
    out = image.copy()
    out[:, removed] = np.linalg.solve(a, b).T
    return out


def test_imputation_equals_the_dense_solve_on_holes_at_the_border() -> None:
    """The sparse LU (minimum-degree ordering, no pivoting, right-hand sides 4 at a time) against the dense solve:
    random masks, a large contiguous hole that touches two borders, a hole that leaves one pixel, 10 channels."""
    rng = np.random.default_rng(0)
    img = rng.random((10, 20, 17))
    hole = np.zeros((20, 17), bool)
    hole[:14, 3:] = True  # touches the top and right borders
    one_left = np.ones((20, 17), bool)
    one_left[19, 0] = False
    for removed in (rng.random((20, 17)) < 0.3, rng.random((20, 17)) < 0.9, hole, one_left):
        np.testing.assert_allclose(noisy_linear_impute(img, removed, noise=0.0), _dense_imputation(img, removed),
                                   atol=1e-9)


class _ViewsItsInput(nn.Module):
    """Quadrant's decision through ``x.view``: refuses channels-last input."""

    def forward(self, x: Tensor) -> Tensor:
        return Quadrant()(x.view(x.shape[0], -1).view(x.shape))


def test_maps_share_forward_passes_without_changing_a_number() -> None:
    """Several maps at once (any forward batch size, across maps and steps) give each map's own numbers, also for
    a model that refuses channels-last input."""
    from analysis.faithfulness import Forwards, faithfulness_maps

    x = _images(5)
    target = Quadrant()(x).argmax(1)
    maps = {"true": _true_map(5), "random": random_maps(5, (8, 8), seed=3), "centre": centre_maps(5, (8, 8))}
    alone = {k: faithfulness(Quadrant(), x, m, target, steps=8, batch_size=5) for k, m in maps.items()}
    for model, bs in ((Quadrant(), 1), (Quadrant(), 7), (Quadrant(), None), (_ViewsItsInput(), 3)):
        together = faithfulness_maps(model, x, maps, target, steps=8, batch_size=bs)
        for k, r in alone.items():
            for part in ("deletion", "insertion", "morf", "lerf"):
                np.testing.assert_allclose(getattr(together[k], part), getattr(r, part), atol=1e-6)
    fw = Forwards(_ViewsItsInput(), target, 4)
    assert fw.add(x) == slice(0, 5) and fw.add(x[:2], torch.tensor([3, 4])) == slice(5, 7)
    assert not fw.channels_last and torch.allclose(fw.probs()[5:], fw.probs()[3:5])
