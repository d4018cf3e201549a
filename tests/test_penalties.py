"""CAM similarity measures: known values, symmetry, scale invariance, zero-map safety, gradients."""

import pytest
import torch

from ex2l_xai.errors import Ex2lError
from ex2l_xai.penalties import KINDS, NORMS, normalize, similarity, ssim


def _maps(b: int = 3, h: int = 7, w: int = 7) -> torch.Tensor:
    return torch.rand(b, h, w) + 0.05


@pytest.mark.parametrize("norm", ["max", "sum", "minmax", "none", "softmax"])
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "product"])
def test_identical_maps_score_one(kind: str, norm: str) -> None:
    a = _maps()
    torch.testing.assert_close(similarity(a, a.clone(), kind, norm), torch.ones(3), atol=1e-5, rtol=0)


def test_product_is_the_mean_pixel_product() -> None:
    """Singh et al.'s overlap is not a normalised similarity: identical maps score mean(a²), not 1."""
    a = _maps()
    torch.testing.assert_close(similarity(a, a.clone(), "product", "none"), (a * a).flatten(1).mean(1))
    ones = torch.ones(2, 3, 3)
    torch.testing.assert_close(similarity(ones, ones, "product", "none"), torch.ones(2))


@pytest.mark.parametrize("norm", ["max", "sum", "none"])
@pytest.mark.parametrize("kind", ["dice", "iou", "cosine"])
def test_disjoint_maps_score_zero(kind: str, norm: str) -> None:
    a = torch.zeros(2, 6, 6)
    b = torch.zeros(2, 6, 6)
    a[:, :3] = torch.rand(2, 3, 6) + 0.1
    b[:, 3:] = torch.rand(2, 3, 6) + 0.1
    torch.testing.assert_close(similarity(a, b, kind, norm), torch.zeros(2), atol=1e-7, rtol=0)


def test_known_values() -> None:
    a = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # one pixel in common out of two each: dice = 2*1/(2+2) = 0.5, iou = 1/(2+2-1) = 1/3, cosine = 1/2
    torch.testing.assert_close(similarity(a, b, "dice", "none"), torch.tensor([0.5]))
    torch.testing.assert_close(similarity(a, b, "iou", "none"), torch.tensor([1 / 3]))
    torch.testing.assert_close(similarity(a, b, "cosine", "none"), torch.tensor([0.5]))
    # centred: a - 0.5 = [.5,.5,-.5,-.5], b - 0.5 = [.5,-.5,.5,-.5] -> orthogonal
    torch.testing.assert_close(similarity(a, b, "pearson", "none"), torch.tensor([0.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(similarity(a, 1 - a, "pearson", "none"), torch.tensor([-1.0]))


def test_ssim_global_formula_small_map() -> None:
    a = torch.tensor([[[0.2, 0.9], [0.4, 0.1]]])
    b = torch.tensor([[[0.3, 0.5], [0.8, 0.0]]])
    fa, fb = a.flatten(), b.flatten()
    ma, mb = fa.mean(), fb.mean()
    va, vb = fa.var(unbiased=False), fb.var(unbiased=False)
    cov = ((fa - ma) * (fb - mb)).mean()
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    torch.testing.assert_close(ssim(a, b), expected.reshape(1))


def test_ssim_windowed_detects_structure() -> None:
    a = _maps(2, 16, 16)
    noisy = (a + 0.3 * torch.randn_like(a)).clamp_min(0)
    s_same, s_noisy, s_other = ssim(a, a), ssim(a, noisy), ssim(a, _maps(2, 16, 16))
    assert torch.all(s_same > 0.999) and torch.all(s_noisy < s_same) and torch.all(s_other < s_noisy)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_symmetry(kind: str, norm: str) -> None:
    a, b = _maps(), _maps()
    torch.testing.assert_close(similarity(a, b, kind, norm), similarity(b, a, kind, norm))


@pytest.mark.parametrize("norm", ["max", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_positive_scale_invariance(kind: str, norm: str) -> None:
    a, b = _maps(), _maps()
    torch.testing.assert_close(similarity(3.7 * a, 0.2 * b, kind, norm), similarity(a, b, kind, norm), atol=1e-5, rtol=1e-5)


def test_scale_matters_without_normalisation() -> None:
    a, b = _maps(), _maps()
    assert not torch.allclose(similarity(3.7 * a, b, "dice", "none"), similarity(a, b, "dice", "none"))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_maps_finite_value_and_gradient(kind: str, norm: str) -> None:
    pre = torch.cat([-torch.rand(1, 5, 5), torch.randn(1, 5, 5)]).requires_grad_(True)  # ReLU kills map 0
    a = torch.relu(pre)
    b = torch.relu(torch.randn(2, 5, 5))
    z = torch.zeros(2, 5, 5, requires_grad=True)
    for x, y in ((a, b), (z, z), (z, b)):
        s = similarity(x, y, kind, norm)
        assert torch.isfinite(s).all()
    s = similarity(a, b, kind, norm).sum() + similarity(z, z, kind, norm).sum()
    s.backward()
    assert torch.isfinite(pre.grad).all() and torch.isfinite(z.grad).all()
    if kind in ("dice", "iou", "cosine") and norm != "softmax":
        assert similarity(z, b, kind, norm).abs().max() < 1e-6  # an all-zero CAM meets these penalties


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_similarity(kind: str, norm: str) -> None:
    a = (torch.rand(2, 4, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    b = (torch.rand(2, 4, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: similarity(x, y, kind, norm), (a, b), eps=1e-6, atol=1e-5)


def test_normalize_values() -> None:
    a = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])
    torch.testing.assert_close(normalize(a, "max").amax(), torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(a, "sum").sum(), torch.tensor(1.0), atol=1e-6, rtol=0)
    mm = normalize(a, "minmax")
    torch.testing.assert_close(mm.flatten(), torch.tensor([0.0, 2 / 3, 1 / 3, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize(a, "softmax").sum(), torch.tensor(1.0))


def test_bad_arguments() -> None:
    a = _maps()
    with pytest.raises(Ex2lError, match="kind"):
        similarity(a, a, "l2")
    with pytest.raises(Ex2lError, match="norm"):
        similarity(a, a, "dice", "l1")
    with pytest.raises(Ex2lError, match="shape"):
        similarity(a, a[:2])
