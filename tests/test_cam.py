"""Grad-CAM parity with Captum, differentiability, the one-forward two-head path, hooks and modes."""

import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from torch import nn

from ex2l_xai.cam import cam_from_activations, grad_cam, head_cams, upsample
from ex2l_xai.errors import Ex2lError
from ex2l_xai.penalties import similarity


class TinyCNN(nn.Module):
    def __init__(self, n_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act2 = nn.Tanh()
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


class TwoHead(nn.Module):
    """A shared backbone with a label head and a confounder head, or two backbones (dual)."""

    def __init__(self, dual: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh())
        self.body_c = (
            nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh())
            if dual
            else self.body
        )
        self.head_y = nn.Linear(6, 3)
        self.head_c = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.body(x)
        b = a if self.body_c is self.body else self.body_c(x)
        return self.head_y(a.mean((2, 3))), self.head_c(b.mean((2, 3)))


def _captum(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True).squeeze(1).detach()


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=5)


@pytest.mark.parametrize("layer_name", ["layer4", "layer3"])
@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("backend", ["fused", "captum"])
def test_parity_resnet18(layer_name: str, train_mode: bool, backend: str) -> None:
    model = _resnet18().train(train_mode)
    layer = getattr(model, layer_name)
    x = torch.randn(4, 3, 64, 64)
    target = torch.tensor([0, 3, 1, 4])
    ref = _captum(model, layer, x, target)
    cam = grad_cam(model, layer, x, target, backend=backend)
    assert cam.shape == ref.shape == (4, *({"layer4": (2, 2), "layer3": (4, 4)}[layer_name]))
    assert ref.abs().max() > 0
    torch.testing.assert_close(cam, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "captum"])
def test_parity_tiny_cnn_per_sample_target(backend: str) -> None:
    model = TinyCNN()
    x = torch.randn(5, 3, 8, 8)
    target = [2, 0, 1, 1, 0]
    ref = _captum(model, model.conv2, x, torch.tensor(target))
    torch.testing.assert_close(grad_cam(model, model.conv2, x, target, backend=backend), ref, atol=1e-5, rtol=1e-5)
    # a different target per sample really changes the map (the test would catch a shared target)
    assert not torch.allclose(ref, _captum(model, model.conv2, x, torch.zeros(5, dtype=torch.long)))


def test_grad_cam_analytic_linear_head() -> None:
    """For a linear head over global-average-pooled features, Grad-CAM is W[target] · A / (h w), ReLU'd."""
    model = TinyCNN().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    acts = torch.tanh(model.conv2(torch.tanh(model.conv1(x))))
    w = model.fc.weight.detach()
    expected = torch.relu(torch.einsum("k,bkhw->bhw", w[1], acts) / 36.0)
    for backend in ("fused", "captum"):
        torch.testing.assert_close(grad_cam(model, model.act2, x, 1, backend=backend), expected.detach())


@pytest.mark.parametrize("backend", ["fused", "captum"])
def test_gradcheck_cam(backend: str) -> None:
    model = TinyCNN(width=3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(inp: torch.Tensor) -> torch.Tensor:
        return grad_cam(model, model.conv2, inp, [0, 2], backend=backend, create_graph=True, relu=False)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("backend", "kind"),
    [("captum", "dice"), ("fused", "dice"), ("fused", "iou"), ("fused", "ssim"), ("fused", "cosine"), ("fused", "pearson")],
)
def test_gradcheck_penalty_through_cams(backend: str, kind: str) -> None:
    model = TinyCNN(width=3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(inp: torch.Tensor) -> torch.Tensor:
        a = grad_cam(model, model.conv2, inp, [0, 1], backend=backend, create_graph=True, relu=False)
        b = grad_cam(model, model.conv2, inp, [2, 2], backend=backend, create_graph=True, relu=False)
        return similarity(a.exp(), b.exp(), kind=kind, norm="sum")

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_fused_create_graph_gradient_matches_captum() -> None:
    """The gradient of a penalty on the CAM w.r.t. the parameters is the same through both backends."""
    model = TinyCNN(width=5).double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    grads = []
    for backend in ("fused", "captum"):
        model.zero_grad()
        cam = grad_cam(model, model.conv2, x, [0, 1, 2], backend=backend, create_graph=True)
        (cam**2).sum().backward()
        grads.append(torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dual", [False, True])
def test_head_cams_one_forward_equals_captum(dual: bool) -> None:
    model = TwoHead(dual=dual)
    calls = {"n": 0}
    model.body.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x = torch.randn(4, 3, 7, 7)
    y, c = torch.tensor([0, 1, 2, 0]), torch.tensor([3, 2, 1, 0])
    res = head_cams(model, [model.body, model.body_c], x, [y, c])
    assert calls["n"] == 1  # ONE forward pass for both CAMs
    ref_y = LayerGradCam(lambda inp: model(inp)[0], model.body).attribute(x, target=y, relu_attributions=True)
    ref_c = LayerGradCam(lambda inp: model(inp)[1], model.body_c).attribute(x, target=c, relu_attributions=True)
    torch.testing.assert_close(res.cams[0].detach(), ref_y.squeeze(1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.cams[1].detach(), ref_c.squeeze(1).detach(), atol=1e-5, rtol=1e-5)
    assert res.logits[0].shape == (4, 3) and res.logits[1].shape == (4, 4)


@pytest.mark.parametrize("dual", [False, True])
def test_penalty_gradient_reaches_backbones(dual: bool) -> None:
    model = TwoHead(dual=dual)
    x = torch.randn(4, 3, 7, 7)
    res = head_cams(model, [model.body, model.body_c], x, [torch.tensor([0, 1, 2, 0]), torch.tensor([3, 2, 1, 0])])
    penalty = similarity(res.cams[0], res.cams[1]).mean()
    assert penalty.item() > 0
    penalty.backward(retain_graph=True)
    backbones = [model.body] + ([model.body_c] if dual else [])
    for body in backbones:
        g = torch.cat([p.grad.flatten() for p in body.parameters()])
        assert g.abs().sum() > 0
    # and the loss of the forward pass can still be backpropagated (graph kept)
    model.zero_grad()
    nn.functional.cross_entropy(res.logits[0], torch.tensor([0, 1, 2, 0])).backward()


def test_head_cams_targets_pred_all_none() -> None:
    model = TwoHead()
    x = torch.randn(3, 3, 6, 6)
    res = head_cams(model, [model.body, model.body], x, ["pred", "all"], create_graph=False)
    pred = res.logits[0].argmax(1)
    torch.testing.assert_close(res.cams[0], grad_cam(lambda i: model(i)[0], model.body, x, pred))
    assert res.cams[1].shape == (3, 4, 6, 6)
    for k in range(4):
        torch.testing.assert_close(res.cams[1][:, k], grad_cam(lambda i: model(i)[1], model.body, x, k))
    res = head_cams(model, [model.body, model.body], x, [None, 1], create_graph=False)
    assert res.cams[0] is None and res.cams[1].shape == (3, 6, 6)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("backend", ["fused", "captum"])
def test_mode_and_hooks_untouched(training: bool, backend: str) -> None:
    model = _resnet18().train(training)
    grad_cam(model, model.layer4, torch.randn(2, 3, 32, 32), 1, backend=backend)
    assert model.training is training and _no_hooks(model)


@pytest.mark.parametrize("training", [False, True])
def test_hooks_removed_after_exception(training: bool) -> None:
    model = TwoHead().train(training)

    def broken(inp: torch.Tensor) -> torch.Tensor:
        model(inp)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(broken, model.body, torch.randn(2, 3, 5, 5), 0)
    with pytest.raises(RuntimeError, match="boom"):
        head_cams(broken, [model.body, model.body], torch.randn(2, 3, 5, 5), [0, 0])
    with pytest.raises(Ex2lError, match="target"):
        grad_cam(model, model.body, torch.randn(2, 3, 5, 5), [0, 1, 2])
    assert model.training is training and _no_hooks(model)


def test_frozen_model_and_no_grad_context() -> None:
    model = TinyCNN()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        cam = grad_cam(model, model.conv2, x, [0, 1])
    ref = _captum(model, model.conv2, x, torch.tensor([0, 1]))
    torch.testing.assert_close(cam, ref)


def test_bad_target_and_layer_errors() -> None:
    model = TinyCNN()
    with pytest.raises(Ex2lError, match=r"\[0, 3\)"):
        grad_cam(model, model.conv2, torch.randn(2, 3, 5, 5), [0, 7])
    with pytest.raises(Ex2lError, match="not called"):
        grad_cam(model, nn.Conv2d(3, 3, 1), torch.randn(2, 3, 5, 5), 0)
    with pytest.raises(Ex2lError, match="backend"):
        grad_cam(model, model.conv2, torch.randn(2, 3, 5, 5), 0, backend="nope")


def test_cam_from_activations_signed_vs_relu() -> None:
    acts = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(5, 3)
    scores = torch.einsum("bkhw,ck->bc", acts, w) / 16
    signed = cam_from_activations(acts, scores, [1, 4], relu=False, retain_graph=True)
    expected = torch.einsum("bkhw,bk->bhw", acts, w[[1, 4]]) / 16
    torch.testing.assert_close(signed, expected.detach())
    torch.testing.assert_close(cam_from_activations(acts, scores, [1, 4]), signed.clamp_min(0))


def test_upsample_constant_and_shape() -> None:
    cam = torch.full((2, 3, 3), 0.5)
    up = upsample(cam, (12, 12))
    assert up.shape == (2, 12, 12)
    torch.testing.assert_close(up, torch.full((2, 12, 12), 0.5))
