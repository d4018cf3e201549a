"""Transformer CAM layers (ex2l_xai.cam_layers): tokens and channels-last maps as (B, C, h, w), the automatic
choice of a transformer's CAM layer, and CAMs taken at token layers (grad_cam, head_cams, Score-CAM)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ex2l_xai.cam import grad_cam, head_cams
from ex2l_xai.cam_layers import auto_reshape, tokens_to_map, transformer_cam_layer
from ex2l_xai.cam_score import score_cam
from ex2l_xai.cam_variants import VARIANTS
from ex2l_xai.errors import Ex2lError
from ex2l_xai.models import TwoHeadNet


def test_tokens_to_map_drops_the_prefix_and_lays_patches_row_major() -> None:
    # token t carries the value t in channel 0 and 10 t in channel 1; token 0 is the class token
    t = torch.arange(5.0)
    tokens = torch.stack([t, 10 * t], dim=1)[None]  # (1, 5, 2)
    m = tokens_to_map(tokens, 1)
    assert m.shape == (1, 2, 2, 2)
    assert m[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert m[0, 1].tolist() == [[10.0, 20.0], [30.0, 40.0]]
    # inferred: 5 = 2² + 1 prefix token; 20 tokens = 4² + 4 (class + 3 registers)
    assert torch.equal(tokens_to_map(tokens), m)
    assert tokens_to_map(torch.zeros(1, 20, 3)).shape == (1, 3, 4, 4)
    assert tokens_to_map(torch.zeros(1, 12, 3), 0, grid=(3, 4)).shape == (1, 3, 3, 4)


def test_tokens_that_cannot_form_a_grid_name_reshape() -> None:
    with pytest.raises(Ex2lError, match="reshape="):
        tokens_to_map(torch.zeros(1, 13, 2), 1)  # 12 patches, no square
    with pytest.raises(Ex2lError, match="reshape="):
        tokens_to_map(torch.zeros(1, 100 + 20, 2))  # 120 = 10² + 20: too many to be prefix tokens


def test_auto_reshape_by_layout() -> None:
    class Declares(nn.Module):
        num_prefix_tokens = 2

    class Nhwc(nn.Module):
        output_fmt = "NHWC"

    tokens = torch.arange(2 * 11 * 3.0).view(2, 11, 3)  # 2 prefix + 9 patches
    assert torch.equal(auto_reshape(Declares(), nn.Identity())(tokens), tokens_to_map(tokens, 2))
    nhwc = torch.rand(2, 4, 5, 3)
    assert torch.equal(auto_reshape(nn.Module(), nn.LayerNorm(3))(nhwc), nhwc.permute(0, 3, 1, 2))
    assert torch.equal(auto_reshape(Nhwc(), nn.Identity())(nhwc), nhwc.permute(0, 3, 1, 2))
    nchw = torch.rand(2, 3, 4, 5)
    assert auto_reshape(Nhwc(), nn.Conv2d(3, 3, 1))(nchw) is nchw  # a conv inside a Swin is NCHW
    assert auto_reshape(nn.Module(), nn.Identity())(nchw) is nchw


def _token_net() -> tuple[nn.Module, nn.Module]:
    """Tokens (B, 1 + 4, 2) from a 2x2 'image' of 2 channels; the head reads the patch tokens linearly, so the
    gradient at each patch token is the head's weight for it: the CAM is known."""

    class Net(nn.Module):
        num_prefix_tokens = 1

        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Identity()
            self.head = nn.Linear(10, 2, bias=False)
            with torch.no_grad():
                self.head.weight.zero_()
                # class 0 reads channel 0 of patch 0 (weight 2) and channel 1 of patch 3 (weight -1)
                self.head.weight[0, 2 * 1 + 0] = 2.0
                self.head.weight[0, 2 * 4 + 1] = -1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cls = torch.ones(x.shape[0], 1, 2)
            tokens = torch.cat([cls, x.flatten(2).transpose(1, 2)], 1)  # (B, 5, 2)
            return self.head(self.layer(tokens).flatten(1))

    net = Net()
    return net, net.layer


def test_grad_cam_at_a_token_layer_by_hand() -> None:
    net, layer = _token_net()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])  # (1, 2, 2, 2)
    # hirescam: Σ_k g_k(p) A_k(p): patch 0 -> 2 · 1 = 2, patch 3 -> -1 · 8 = -8 (ReLU 0), others 0
    hires = grad_cam(net, layer, x, 0, variant="hirescam", relu=False)
    assert hires[0].tolist() == [[2.0, 0.0], [0.0, -8.0]]
    # gradcam: w = mean_p g = (2/4, -1/4): 0.5 A_0 - 0.25 A_1
    expected = 0.5 * x[0, 0] - 0.25 * x[0, 1]
    torch.testing.assert_close(grad_cam(net, layer, x, 0, relu=False)[0], expected)
    # an explicit reshape overrides the automatic one (here: the same rule, transposed grid)
    t = grad_cam(net, layer, x, 0, variant="hirescam", relu=False,
                 reshape=lambda z: tokens_to_map(z, 1).transpose(2, 3))
    assert t[0].tolist() == [[2.0, 0.0], [0.0, -8.0]]  # symmetric positions: the diagonal stays


def test_transformer_cam_layer_picks_the_last_norm1() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert transformer_cam_layer(vit) == ("blocks.11.norm1", vit.blocks[11].norm1)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2)
    name, layer = transformer_cam_layer(swin)
    assert name == "layers.3.blocks.1.norm1" and layer is swin.layers[3].blocks[1].norm1
    with pytest.raises(Ex2lError, match="no transformer CAM layer"):
        transformer_cam_layer(nn.Sequential(nn.Linear(2, 2)))


def test_swin_channels_last_cam_equals_the_permuted_reference() -> None:
    """Swin's norm1 outputs (B, h, w, C): the automatic permute gives the CAM the explicit one gives, and it has
    the stage's grid."""
    import timm

    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=2).eval()
    _, layer = transformer_cam_layer(swin)
    x = torch.rand(2, 3, 64, 64)
    auto = grad_cam(swin, layer, x, [1, 2], variant="layercam")
    explicit = grad_cam(swin, layer, x, [1, 2], variant="layercam", reshape=lambda z: z.permute(0, 3, 1, 2))
    assert auto.shape == (2, 2, 2)
    assert torch.equal(auto, explicit) and auto.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_cams_at_a_vit_token_layer_equals_grad_cam(variant: str) -> None:
    torch.manual_seed(0)
    model = TwoHeadNet("vit_tiny", 3, 2, image_size=32, cam_layer="layer4.2.norm1").eval()
    x = torch.rand(2, 3, 32, 32)
    y, c = torch.tensor([0, 2]), torch.tensor([1, 0])
    res = head_cams(model, model.cam_layers(), x, [y, c], variant=variant, create_graph=False)
    ref_y = grad_cam(lambda t: model(t).label, model.cam_layers()[0], x, y, variant=variant, reshape=None)
    torch.testing.assert_close(res.cams[0], ref_y, rtol=1e-5, atol=1e-7)
    assert res.cams[0].shape == (2, 2, 2)


def test_score_cam_at_a_token_layer() -> None:
    """Score-CAM reshapes tokens as grad_cam does: (B, h, w) at the patch grid, a softmax-weighted channel sum."""
    torch.manual_seed(0)
    model = TwoHeadNet("vit_tiny", 3, 0, image_size=32, cam_layer="layer4.2.norm1").eval()
    layer = model.cam_layers()[0]
    x = torch.rand(1, 3, 32, 32)
    cam = score_cam(lambda t: model(t).label, layer, x, 1, batch_size=96, relu=False)
    assert cam.shape == (1, 2, 2)
    # the weights sum to one: the map lies within the channel-wise min and max of the tokens' map
    acts = {}
    def keep(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
        acts["a"] = tokens_to_map(o.detach(), 1)

    h = layer.register_forward_hook(keep)
    model(x)
    h.remove()
    a = acts["a"][0]
    assert torch.all(cam[0] <= a.amax(0) + 1e-5) and torch.all(cam[0] >= a.amin(0) - 1e-5)
