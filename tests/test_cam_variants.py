"""The Grad-CAM family (ex2l_xai.cam_variants, grad_cam(variant=...)), Score-CAM and their reference values.

Analytic values on a hand-built network whose gradient at the CAM layer is known and varies over space, the
closed form over a pooling + linear head, gradcheck through every variant, and equality with pytorch-grad-cam
1.5.7 (the field's reference implementation) on a torchvision ResNet-18 and a timm ViT-tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ex2l_xai.cam import grad_cam, head_cams
from ex2l_xai.cam_score import channel_masks, score_cam
from ex2l_xai.cam_variants import VARIANTS, variant_map
from ex2l_xai.errors import Ex2lError
from ex2l_xai.models import TwoHeadNet

# A (1, 2, 1, 2): channel 0 = [1, 2], channel 1 = [3, 1]; logit 0 = 1·A0(p0) - 1·A0(p1) + 2·A1(p0) + 1·A1(p1),
# so the gradient at the layer is G0 = [1, -1], G1 = [2, 1] (S0 = 3, S1 = 4):
#   gradcam   w = (0, 1.5)                                   -> 1.5·A1            = [4.5, 1.5]
#   hirescam  Σ_k G_k A_k                                    = [1 + 6, -2 + 1]    = [7, -1] -> ReLU [7, 0]
#   layercam  Σ_k ReLU(G_k) A_k                              = [1 + 6, 0 + 1]     = [7, 1]
#   xgradcam  w = ((1 - 2)/3, (6 + 1)/4) = (-1/3, 7/4)       -> [59/12, 13/12]
#   gradcam++ a = g²/(2g² + S g³): ch0 (1/5, -1), ch1 (4/40, 1/6); w = Σ ReLU(g) a = (1/5, 2/10 + 1/6 = 11/30)
#             -> 0.2·[1, 2] + 11/30·[3, 1]                     = [1.3, 23/30]
ANALYTIC = {
    "gradcam": [4.5, 1.5],
    "hirescam": [7.0, 0.0],
    "layercam": [7.0, 1.0],
    "xgradcam": [59 / 12, 13 / 12],
    "gradcam++": [1.3, 23 / 30],
}
SIGNED_HIRES = [7.0, -1.0]


def _linear_net() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    layer = nn.Identity()
    head = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    net = nn.Sequential(layer, nn.Flatten(), head)
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 1.0]]]])
    return net, layer, x


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_gives_its_hand_computed_map(variant: str) -> None:
    net, layer, x = _linear_net()
    cam = grad_cam(net, layer, x, 0, variant=variant)
    assert cam.shape == (1, 1, 2)
    torch.testing.assert_close(cam[0, 0], torch.tensor(ANALYTIC[variant]), rtol=0, atol=1e-5)


def test_relu_false_gives_the_signed_map_and_default_is_gradcam() -> None:
    net, layer, x = _linear_net()
    signed = grad_cam(net, layer, x, 0, variant="hirescam", relu=False)
    torch.testing.assert_close(signed[0, 0], torch.tensor(SIGNED_HIRES))
    torch.testing.assert_close(grad_cam(net, layer, x, 0), grad_cam(net, layer, x, 0, variant="gradcam"), rtol=0, atol=0)


def test_unknown_variant_is_named() -> None:
    net, layer, x = _linear_net()
    with pytest.raises(Ex2lError, match=r"variant: expected one of .*'layercam'.*got 'gradcam\+'"):
        grad_cam(net, layer, x, 0, variant="gradcam+")  # type: ignore[arg-type]
    with pytest.raises(Ex2lError, match="captum"):
        grad_cam(net, layer, x, 0, variant="hirescam", backend="captum")


def _smooth_net() -> tuple[nn.Module, nn.Module]:
    """conv -> softplus (the CAM layer's output is positive) -> conv -> tanh -> pool -> linear: the gradient at
    the layer depends on the input, so the CAM's derivative needs the second-order terms."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Softplus())
    net = nn.Sequential(layer, nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(3, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net, layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_through_each_variant(variant: str) -> None:
    net, layer = _smooth_net()
    x = torch.randn(2, 2, 4, 4, dtype=torch.double, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return grad_cam(net, layer, inp, [0, 1], variant=variant, create_graph=True, relu=False)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    # and the map reaches the weights after the layer (what a penalty trains)
    cam = fn(x)
    (g,) = torch.autograd.grad(cam.pow(2).sum(), net[1].weight)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_closed_form_over_pooling_and_linear_equals_autograd(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over GAP + linear the gradient is W[t]/(h w) everywhere, so every variant has a closed form; it must give the
    autograd path's maps and gradients, and (autograd disabled) it must be what `auto` uses."""
    torch.manual_seed(0)
    model = TwoHeadNet("small_cnn", 3, 2, width=4).double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.double)
    y, c = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 1, 1])
    ref = head_cams(model, model.cam_layers(), x, [y, c], relu=False, method="autograd", variant=variant)
    (g_ref,) = torch.autograd.grad(sum(cm.pow(2).sum() for cm in ref.cams), model.label_head.weight)

    import ex2l_xai.cam as cam_mod

    def no_autograd(*_a: object, **_k: object) -> None:
        raise AssertionError("autograd path used")

    monkeypatch.setattr(cam_mod, "_head_cam", no_autograd)
    fast = head_cams(model, model.cam_layers(), x, [y, c], relu=False, method="auto", variant=variant)
    (g_fast,) = torch.autograd.grad(sum(cm.pow(2).sum() for cm in fast.cams), model.label_head.weight)
    for a, b in zip(fast.cams, ref.cams, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-12)


def test_variants_differ_where_the_gradient_varies() -> None:
    """Sanity of the test above: at layer3 of the small CNN (a conv block after it) the variants are different maps."""
    torch.manual_seed(0)
    model = TwoHeadNet("small_cnn", 3, 0, width=4, cam_layer="layer3")
    x = torch.rand(2, 3, 32, 32)
    maps = {v: grad_cam(lambda t: model(t).label, model.backbone.layer3, x, 1, variant=v, relu=False) for v in VARIANTS}
    for v in VARIANTS[1:]:
        assert not torch.allclose(maps[v], maps["gradcam"], atol=1e-6), v


def test_variant_map_rejects_mismatched_shapes() -> None:
    with pytest.raises(Ex2lError, match="differ in shape"):
        variant_map(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 4))


# ---- Score-CAM ------------------------------------------------------------------------------------------------
def test_channel_masks_are_minmax_scaled_aligned_corner_upsamples() -> None:
    a = torch.tensor([[[0.0, 2.0], [4.0, 6.0]]])
    m = channel_masks(a, (3, 3))
    # aligned corners: the corners keep their values, the centre is the mean of the four: (0, 1/3, 2/3, 1) grid
    expected = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]]) / 6
    torch.testing.assert_close(m, expected, rtol=0, atol=1e-6)


def test_score_cam_matches_its_definition_on_a_tiny_model() -> None:
    """A 1x1-conv layer with two channels whose maps are known; the head reads the masked input linearly, so each
    channel's score is computed by hand: s_k = Σ_p v(p) x(p) M_k(p)."""
    layer = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    head = nn.Linear(4, 2, bias=False)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with torch.no_grad():
        head.weight.copy_(torch.stack([v, -v]))
    net = nn.Sequential(nn.Identity(), nn.Flatten(), head)

    def forward(x: torch.Tensor) -> torch.Tensor:
        layer(x)  # the CAM layer sees the input; the decision reads the input directly
        return net(x)

    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # A_0 = x, A_1 = -x; masks: minmax(x) = (0, 1/3, 2/3, 1), minmax(-x) = (1, 2/3, 1/3, 0)
    m0 = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    s0 = float((v * x.flatten() * m0).sum())
    s1 = float((v * x.flatten() * m0.flip(0)).sum())
    w = torch.softmax(torch.tensor([s0, s1]), 0)
    expected = torch.relu(w[0] * x[0, 0] - w[1] * x[0, 0])
    for bs in (1, 2, 64):
        got = score_cam(forward, layer, x, 0, batch_size=bs)
        torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)


def test_score_cam_equals_pytorch_grad_cam_on_a_small_cnn() -> None:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()
    layer = net[3]
    x = torch.rand(2, 3, 16, 16)
    ours = score_cam(net, layer, x, [2, 0], batch_size=7)
    ref = ScoreCAM(net, [layer])
    targets = [ClassifierOutputTarget(2), ClassifierOutputTarget(0)]
    ref.activations_and_grads(x)
    acts = ref.activations_and_grads.activations[0].numpy()
    theirs = np.maximum(ref.get_cam_image(x, layer, targets, acts, None, False), 0)
    ref.activations_and_grads.release()
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=1e-4, atol=1e-4 * float(np.abs(theirs).max()))


# ---- pytorch-grad-cam parity --------------------------------------------------------------------------------
def _reference_raw(cls: type, model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int],
                   reshape: object = None) -> np.ndarray:
    """pytorch-grad-cam's map before its min-max scaling and resize: its own hooks, backward and
    ``get_cam_image``, then the ReLU its ``compute_cam_per_layer`` applies (np.maximum(cam, 0))."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cls(model=model, target_layers=[layer], reshape_transform=reshape)
    targets = [ClassifierOutputTarget(k) for k in classes]
    outputs = cam.activations_and_grads(x)
    model.zero_grad()
    sum(t(o) for t, o in zip(targets, outputs, strict=True)).backward()
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    raw = np.maximum(cam.get_cam_image(x, layer, targets, acts, grads, False), 0)
    cam.activations_and_grads.release()
    return raw


def _reference_classes() -> dict[str, type]:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "xgradcam": XGradCAM,
            "layercam": LayerCAM}


def _assert_relative(ours: torch.Tensor, theirs: np.ndarray) -> None:
    """1e-4 relative to each entry, with an absolute floor of 1e-4 of the map's largest value (entries near zero
    carry float32 round-off of the sum that is large relative to themselves)."""
    ref = torch.from_numpy(theirs).to(ours.dtype)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_pytorch_grad_cam_on_resnet18(variant: str) -> None:
    import torchvision
    from pytorch_grad_cam.utils.image import scale_cam_image

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 96, 96)
    classes = [3, 7]
    ours = grad_cam(model, model.layer4, x, classes, variant=variant)
    _assert_relative(ours, _reference_raw(_reference_classes()[variant], model, model.layer4, x, classes))
    # their final output is the map min-max scaled and resized (per layer), then min-max scaled again (over the
    # mean of the layers): the same two steps on ours give it
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    full = _reference_classes()[variant](model=model, target_layers=[model.layer4])(
        x, [ClassifierOutputTarget(k) for k in classes]
    )
    np.testing.assert_allclose(scale_cam_image(scale_cam_image(ours.numpy(), (96, 96))), full, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_equals_pytorch_grad_cam_on_vit_tiny(variant: str) -> None:
    """Their documented ViT recipe: the last block's norm1, class token dropped, 14x14 grid; ours reshapes the
    tokens by itself (the model declares num_prefix_tokens = 1)."""
    import timm

    from ex2l_xai.cam_layers import transformer_cam_layer

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    name, layer = transformer_cam_layer(model)
    assert name == "blocks.11.norm1" and layer is model.blocks[-1].norm1
    x = torch.rand(2, 3, 224, 224)
    classes = [5, 900]

    def their_reshape(t: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam's tutorial transform
        r = t[:, 1:, :].reshape(t.size(0), 14, 14, t.size(2))
        return r.transpose(2, 3).transpose(1, 2)

    ours = grad_cam(model, layer, x, classes, variant=variant)
    assert ours.shape == (2, 14, 14)
    _assert_relative(ours, _reference_raw(_reference_classes()[variant], model, layer, x, classes, their_reshape))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "gradcam"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_structured_tail_gives_each_variant_as_autograd(variant: str, train_mode: bool) -> None:
    """Below the last block the structured path returns the whole gradient map for the variants that need it:
    the same maps and parameter gradients as autograd (float64), for both heads over a shared tail."""
    from test_cam_structured import TinyResNet, _perturb_bn

    torch.manual_seed(0)
    model = TinyResNet().double().train(train_mode)
    _perturb_bn(model)
    x = torch.rand(4, 3, 8, 8, dtype=torch.double)
    y, c = torch.tensor([0, 1, 2, 0]), torch.tensor([3, 0, 1, 2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = {}
    for method in ("autograd", "structured"):
        model.load_state_dict(state)
        res = head_cams(model, model.cam_layers(), x, [y, c], relu=False, method=method, variant=variant)
        loss = sum((cm**2).mean() for cm in res.cams)
        got[method] = (res.cams, torch.autograd.grad(loss, list(model.parameters()), materialize_grads=True))
    for a, s in zip(got["autograd"][0], got["structured"][0], strict=True):
        torch.testing.assert_close(s, a, rtol=1e-10, atol=1e-12)
    for a, s in zip(got["autograd"][1], got["structured"][1], strict=True):
        torch.testing.assert_close(s, a, rtol=1e-8, atol=1e-11)
