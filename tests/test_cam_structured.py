"""The structured CAM path (ex2l_xai.cam_structured) is the same function as autograd's, and falls back safely."""

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ex2l_xai import cam_structured
from ex2l_xai.cam import head_cams
from ex2l_xai.cam_structured import CamTail, supports
from ex2l_xai.errors import Ex2lError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.penalties import similarity


class TinyResNet(nn.Module):
    """A user model that describes its tails: every kind of unit the walker knows, at toy widths."""

    def __init__(self, tail: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.cam = BasicBlock(4, 4)
        ds = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.tail = tail or nn.Sequential(
            BasicBlock(4, 6, stride=2, downsample=ds),
            Bottleneck(6, 3, downsample=nn.Sequential(nn.Conv2d(6, 12, 1, bias=False), nn.BatchNorm2d(12))),
            nn.Sequential(nn.Conv2d(12, 5, 3, padding=2, dilation=2, bias=True), nn.Identity()),
            nn.BatchNorm2d(5),
            nn.ReLU(inplace=True),
        )
        self.head_y = nn.Linear(5, 3)
        self.head_c = nn.Linear(5, 4)

    def cam_layers(self) -> tuple[nn.Module, nn.Module]:
        return self.cam, self.cam

    def cam_tails(self) -> tuple[CamTail, CamTail]:
        return CamTail((self.tail,), self.head_y), CamTail((self.tail,), self.head_c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.tail(self.cam(self.stem(x))).mean((2, 3))
        return self.head_y(z), self.head_c(z)


def _perturb_bn(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype)
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


def _loss_and_grads(model: nn.Module, x, y, c, target, method: str):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = head_cams(
        model, model.cam_layers(), x, [target, c], relu=[target != "all", True], method=method
    )
    label_cam = res.cams[0][:, 1] if target == "all" else res.cams[0]
    loss = (
        similarity(F.relu(label_cam), res.cams[1], "dice", "max").mean()
        + (label_cam**2).mean()
        + F.cross_entropy(res.logits[0], y)
        + F.cross_entropy(res.logits[1], c)
    )
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    model.load_state_dict(state)  # undo the running-statistics update, so both methods see the same model
    return res.cams, grads


def _assert_same(model: nn.Module, x, y, c, target) -> None:
    cams_a, grads_a = _loss_and_grads(model, x, y, c, target, "autograd")
    cams_s, grads_s = _loss_and_grads(model, x, y, c, target, "structured")
    for a, s in zip(cams_a, cams_s, strict=True):
        torch.testing.assert_close(s, a, rtol=1e-10, atol=1e-12)
    for a, s in zip(grads_a, grads_s, strict=True):
        torch.testing.assert_close(s, a, rtol=1e-9, atol=1e-12)


CASES = [
    ("resnet18", "layer4", "shared"),
    ("resnet18", "layer3", "shared"),
    ("resnet18", "layer3", "dual"),
    ("resnet18", "layer2", "shared"),
    ("resnet50", "layer3", "shared"),
]


@pytest.mark.parametrize(("backbone", "layer", "arch"), CASES)
@pytest.mark.parametrize("train", [True, False])
def test_structured_equals_autograd_on_resnets(backbone: str, layer: str, arch: str, train: bool) -> None:
    torch.manual_seed(0)
    model = TwoHeadNet(backbone, 3, 4, architecture=arch, cam_layer=layer).double().train(train)
    _perturb_bn(model)
    x = torch.randn(3, 3, 48, 48, dtype=torch.float64)  # odd map sizes: 12, 6, 3, 2 (stride-2 output padding)
    y, c = torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1])
    for target in (y, "pred", "all"):
        _assert_same(model, x, y, c, target)


@pytest.mark.parametrize("train", [True, False])
def test_structured_equals_autograd_on_every_unit_kind(train: bool) -> None:
    torch.manual_seed(0)
    model = TinyResNet().double().train(train)
    _perturb_bn(model)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    y, c = torch.tensor([0, 2, 1, 1]), torch.tensor([3, 0, 1, 2])
    for target in (y, "all"):
        _assert_same(model, x, y, c, target)


def test_structured_equals_captum_float32() -> None:
    torch.manual_seed(0)
    model = TwoHeadNet("resnet18", 3, 4, cam_layer="layer3").train()
    x = torch.randn(4, 3, 64, 64)
    y, c = torch.tensor([0, 2, 1, 1]), torch.tensor([3, 0, 1, 2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = head_cams(model, model.cam_layers(), x, [y, c], method="structured", create_graph=False)
    layer = model.cam_layers()[0]
    for i, (target, head) in enumerate([(y, "label"), (c, "confounder")]):
        model.load_state_dict(state)
        ref = LayerGradCam(lambda inp, h=head: getattr(model(inp), h), layer).attribute(
            x, target=target, relu_attributions=True
        )
        torch.testing.assert_close(res.cams[i], ref.squeeze(1).detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_penalty_through_structured_cams(train: bool) -> None:
    torch.manual_seed(0)
    model = TinyResNet().double().train(train)
    _perturb_bn(model)
    x0 = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    y, c = torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1])
    conv = model.tail[0].conv2  # a weight the penalty reaches only through the CAM weights alpha

    def penalty(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        old = conv.weight
        try:
            del conv.weight
            conv.weight = w
            res = head_cams(model, model.cam_layers(), x, [y, c], method="structured", relu=False)
        finally:
            del conv.weight
            conv.weight = old
        # signed maps and a smooth similarity: no ReLU kink, and no all-zero map that hides a wrong gradient
        return similarity(res.cams[0], res.cams[1], "pearson", "none").sum()

    w0 = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(penalty, (x0.requires_grad_(), w0), eps=1e-6, atol=1e-6)


def test_penalty_gradient_reaches_tail_weights_and_heads() -> None:
    model = TwoHeadNet("resnet18", 3, 4, cam_layer="layer3").train()
    x = torch.randn(4, 3, 64, 64)
    res = head_cams(model, model.cam_layers(), x, [torch.tensor([0, 1, 2, 0]), torch.tensor([3, 2, 1, 0])])
    similarity(res.cams[0], res.cams[1]).mean().backward()
    for p in (model.backbone.layer4[1].conv2.weight, model.label_head.weight, model.conf_head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_mode_hooks_and_exception() -> None:
    model = TwoHeadNet("resnet18", 3, 4, cam_layer="layer3").eval()
    head_cams(model, model.cam_layers(), torch.randn(2, 3, 32, 32), [0, 1], method="structured")
    assert not model.training and _no_hooks(model)
    with pytest.raises(Ex2lError, match="target"):
        head_cams(model, model.cam_layers(), torch.randn(2, 3, 32, 32), [0, 9], method="structured")
    assert not model.training and _no_hooks(model)


def test_unknown_units_fall_back_to_autograd() -> None:
    torch.manual_seed(0)
    odd = TinyResNet(tail=nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.GELU()))
    assert not supports(odd.cam_tails()[0])
    x, y, c = torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([2, 3])
    auto = head_cams(odd, odd.cam_layers(), x, [y, c], create_graph=False)
    ref = head_cams(odd, odd.cam_layers(), x, [y, c], create_graph=False, method="autograd")
    torch.testing.assert_close(auto.cams[0], ref.cams[0])
    with pytest.raises(Ex2lError, match="structured"):
        head_cams(odd, odd.cam_layers(), x, [y, c], method="structured")
    # a plain callable, or other layers than the model's own, take the autograd path too
    net = TwoHeadNet("resnet18", 3, 4, cam_layer="layer3")
    with pytest.raises(Ex2lError, match="structured"):
        head_cams(lambda i: net(i), net.cam_layers(), torch.randn(2, 3, 32, 32), [0, 1], method="structured")
    with pytest.raises(Ex2lError, match="structured"):
        head_cams(net, [net.backbone.layer2] * 2, torch.randn(2, 3, 32, 32), [0, 1], method="structured")
    nested = TwoHeadNet("resnet18", 3, 4, cam_layer="layer4.0")
    assert nested.cam_tails() == (None, None)


def test_in_place_change_of_a_recorded_tensor_is_never_used() -> None:
    """A ReLU mask the walker would read is overwritten later in the forward pass: the structured path refuses
    (clear error), and ``auto`` hands over to autograd, which refuses with its own error, as it always did."""
    torch.manual_seed(0)
    model = TinyResNet(tail=nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(inplace=True), nn.Identity()))
    model.tail[2].register_forward_hook(lambda m, i, o: o.mul_(2.0))  # bumps the ReLU output's version
    assert supports(model.cam_tails()[0])
    x, y, c = torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([2, 3])
    with pytest.raises(Ex2lError, match="recorded forward pass"):
        head_cams(model, model.cam_layers(), x, [y, c], method="structured")
    for method in ("auto", "autograd"):
        with pytest.raises(RuntimeError, match="inplace operation"):
            head_cams(model, model.cam_layers(), x, [y, c], method=method)


def test_all_heads_of_a_shared_tail_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both heads' and all classes' cotangents go through the tail together: one product per convolution."""
    model = TwoHeadNet("resnet18", 3, 4, cam_layer="layer3").eval()
    seen: list[tuple[int, int]] = []
    orig = cam_structured._conv_vjp

    def counting(conv: nn.Conv2d, g: torch.Tensor, in_hw) -> torch.Tensor:
        seen.append((g.shape[0], g.shape[1]))
        return orig(conv, g, in_hw)

    monkeypatch.setattr(cam_structured, "_conv_vjp", counting)
    head_cams(model, model.cam_layers(), torch.randn(2, 3, 64, 64), ["all", torch.tensor([1, 2])], create_graph=False)
    # layer4: block 2 (two convs) and block 1's second conv; block 1's first conv and downsample use spatial sums
    assert seen == [(3 + 1, 2)] * 3


@pytest.mark.parametrize(
    ("k", "stride", "padding", "dilation", "hw"),
    [(3, 1, 1, 1, 2), (3, 1, 1, 1, 3), (3, 2, 1, 1, 4), (3, 1, 2, 2, 3), (1, 2, 0, 1, 3), (3, 1, 0, 1, 4)],
)
def test_conv_input_products_equal_autograd(k: int, stride: int, padding: int, dilation: int, hw: int) -> None:
    """Both products of a convolution's input gradient (kernels and per-tap) and both gradients of each."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, k, stride=stride, padding=padding, dilation=dilation, bias=False).double()
    x = torch.randn(4, 3, hw, hw, dtype=torch.float64)
    out_hw = conv(x).shape[2:]
    g = torch.randn(4, 5, *out_hw, dtype=torch.float64, requires_grad=True)
    u = torch.randn_like(x)
    # reference: autograd's input gradient of conv2d, differentiated again
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(conv(xr), xr, g, create_graph=True)
    ref_g, ref_w = torch.autograd.grad((ref * u).sum(), [g, conv.weight])
    conf = (conv.stride, conv.padding, conv.dilation)
    for fn in (cam_structured._ConvInputVJP, cam_structured._TapConvInputVJP):
        out = fn.apply(g, conv.weight, (hw, hw), conf)
        torch.testing.assert_close(out, ref)
        got_g, got_w = torch.autograd.grad((out * u).sum(), [g, conv.weight])
        torch.testing.assert_close(got_g, ref_g)
        torch.testing.assert_close(got_w, ref_w)


def test_autocast_takes_the_autograd_path() -> None:
    model = TwoHeadNet("resnet18", 3, 4, cam_layer="layer3").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(Ex2lError, match="autocast"):
            head_cams(model, model.cam_layers(), x, [0, 1], method="structured")
        auto = head_cams(model, model.cam_layers(), x, [0, 1], create_graph=False)
        ref = head_cams(model, model.cam_layers(), x, [0, 1], create_graph=False, method="autograd")
    torch.testing.assert_close(auto.cams[0], ref.cams[0])


def test_method_validation() -> None:
    model = TwoHeadNet("resnet18", 3, 4)
    with pytest.raises(Ex2lError, match="method"):
        head_cams(model, model.cam_layers(), torch.randn(1, 3, 32, 32), [0, 0], method="magic")  # type: ignore[arg-type]


# ---- the closed form at a CAM layer that feeds global pooling + a linear head (ex2l_xai.cam_heads) ------------
class PlainNet(nn.Module):
    """No declarations: a conv trunk, then whatever ``head`` does with the last map."""

    def __init__(self, head: str = "gap") -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)
        self.mlp = nn.Linear(5, 5)
        self.drop = nn.Dropout(0.5)
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        a = self.trunk(x)
        if self.head == "gap":
            z = self.pool(a).flatten(1)
        elif self.head == "mean":
            z = a.mean((2, 3))
        elif self.head == "max":
            z = a.amax((2, 3))
        elif self.head == "scaled":
            z = 2.0 * self.pool(a).flatten(1)
        elif self.head == "mlp":
            z = torch.relu(self.mlp(self.pool(a).flatten(1)))
        elif self.head == "dropout":
            z = self.drop(self.pool(a).flatten(1))
        elif self.head == "other_map":
            z = self.pool(a * a).flatten(1)
        else:
            raise ValueError(self.head)
        return (self.fc(z),)


def _count_autograd(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    orig = torch.autograd.grad

    def counting(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("head", ["gap", "mean"])
def test_closed_form_is_taken_and_equals_autograd(head: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proven pooling + linear: no autograd call, same CAMs and the same penalty gradients as autograd."""
    torch.manual_seed(0)
    net = PlainNet(head).double()
    layer = net.trunk[2]
    x, t = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    calls = _count_autograd(monkeypatch)
    res = head_cams(net, [layer], x, [t], method="structured")
    assert calls[0] == 0
    loss = res.cams[0].pow(2).sum()
    grads = torch.autograd.grad(loss, [net.fc.weight, net.trunk[0].weight])
    ref = head_cams(net, [layer], x, [t], method="autograd")
    ref_grads = torch.autograd.grad(ref.cams[0].pow(2).sum(), [net.fc.weight, net.trunk[0].weight])
    torch.testing.assert_close(res.cams[0], ref.cams[0], rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    # "all" and "pred" targets too
    for target in ("all", "pred"):
        a = head_cams(net, [layer], x, [target], create_graph=False)
        b = head_cams(net, [layer], x, [target], create_graph=False, method="autograd")
        torch.testing.assert_close(a.cams[0], b.cams[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head", ["max", "scaled", "mlp", "dropout", "other_map"])
def test_anything_but_pooling_and_linear_falls_back_to_autograd(head: str) -> None:
    """Each of these breaks the closed form's premise: the probe must refuse, and auto must equal autograd."""
    torch.manual_seed(0)
    net = PlainNet(head).double().train()
    layer = net.trunk[2]
    x, t = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    with pytest.raises(Ex2lError, match="structured"):
        head_cams(net, [layer], x, [t], method="structured")
    torch.manual_seed(1)
    auto = head_cams(net, [layer], x, [t], create_graph=False)
    torch.manual_seed(1)
    ref = head_cams(net, [layer], x, [t], create_graph=False, method="autograd")
    torch.testing.assert_close(auto.cams[0], ref.cams[0])


class LyingResNet(TinyResNet):
    """Declares the TinyResNet tails but feeds its label head a doubled latent: the declaration is wrong."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.tail(self.cam(self.stem(x))).mean((2, 3))
        return self.head_y(2.0 * z), self.head_c(z)


def test_a_wrong_tail_declaration_cannot_give_wrong_cams() -> None:
    """Before the run-time check, a model declaring a ResNet tail but changing its head got wrong CAMs silently."""
    torch.manual_seed(0)
    model = LyingResNet().double().eval()
    x, y, c = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor([2, 3])
    auto = head_cams(model, model.cam_layers(), x, [y, c], create_graph=False)
    ref = head_cams(model, model.cam_layers(), x, [y, c], create_graph=False, method="autograd")
    torch.testing.assert_close(auto.cams[0], ref.cams[0])
    torch.testing.assert_close(auto.cams[1], ref.cams[1])
    with pytest.raises(Ex2lError, match="structured"):
        head_cams(model, model.cam_layers(), x, [y, c], method="structured")


def test_closed_form_on_torchvision_and_efficientnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain torchvision ResNet-18 (avgpool + fc) and TwoHeadNet's EfficientNet-Lite0 at layer4 take the closed
    form, and it equals autograd."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([1, 4])
    calls = _count_autograd(monkeypatch)
    res = head_cams(lambda i: (tv(i),), [tv.layer4], x, [t], create_graph=False)  # a lambda: nothing to probe
    assert calls[0] == 1
    res = head_cams(_Tuple(tv), [tv.layer4], x, [t], create_graph=False)
    assert calls[0] == 1  # the module: proven, no autograd call
    ref = head_cams(_Tuple(tv), [tv.layer4], x, [t], create_graph=False, method="autograd")
    torch.testing.assert_close(res.cams[0], ref.cams[0], rtol=1e-4, atol=1e-5)
    net = TwoHeadNet("efficientnet_lite0", 3, 4, architecture="dual").eval()
    x, y, c = torch.rand(2, 3, 64, 64), torch.tensor([0, 2]), torch.tensor([3, 1])
    calls[0] = 0
    res = head_cams(net, net.cam_layers(), x, [y, c], create_graph=False)
    assert calls[0] == 0
    ref = head_cams(net, net.cam_layers(), x, [y, c], create_graph=False, method="autograd")
    for a, b in zip(res.cams, ref.cams, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Tuple(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net(x),)


def test_penalty_gradients_are_bit_reproducible_on_two_threads() -> None:
    """The same step twice gives the same gradient bits. The rows W[target] were once taken by advanced indexing,
    whose backward adds repeated rows through index_put_ in a varying order on a multi-threaded CPU: eX2L runs
    of the same configuration then differed in the sixth digit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        net = PlainNet("gap").train()
        net.trunk[2] = nn.Conv2d(6, 1280, 1)  # EfficientNet-Lite0's width at layer4
        net.fc = nn.Linear(1280, 4)
        layer = net.trunk[2]
        x, t = torch.randn(64, 3, 4, 4), torch.randint(0, 4, (64,))
        grads = []
        for _ in range(10):
            res = head_cams(net, [layer], x, [t], method="structured")
            (g,) = torch.autograd.grad(res.cams[0].pow(2).sum(), [net.fc.weight])
            grads.append(g)
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.set_num_threads(threads)
