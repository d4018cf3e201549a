"""Backbones, the two-head network, pretrained loading and its errors."""

import pytest
import torch
import torchvision

from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet, build_backbone


@pytest.mark.parametrize("arch", ["shared", "dual"])
def test_two_head_shapes_and_cam_layers(arch: str) -> None:
    net = TwoHeadNet("small_cnn", 4, 6, architecture=arch, width=8)
    out = net(torch.randn(3, 3, 32, 32))
    assert out.label.shape == (3, 4) and out.confounder.shape == (3, 6) and out.latent.shape == (3, 32)
    ly, lc = net.cam_layers()
    assert (ly is lc) == (arch == "shared")


def test_no_confounder_head() -> None:
    net = TwoHeadNet("small_cnn", 4, 0, width=8)
    assert net(torch.randn(2, 3, 32, 32)).confounder is None


def test_signed_cam_sums_to_logit_minus_bias() -> None:
    """With a linear head on globally pooled layer4 maps, the signed Grad-CAM sums to the logit minus the bias."""
    from ex2l_xai.cam import grad_cam

    net = TwoHeadNet("small_cnn", 4, 0, width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    target = torch.tensor([0, 2, 3])
    cam = grad_cam(lambda i: net(i).label, net.cam_layers()[0], x, target, relu=False)
    logits = net(x).label.detach()
    expected = logits.gather(1, target[:, None])[:, 0] - net.label_head.bias.detach()[target]
    torch.testing.assert_close(cam.flatten(1).sum(1), expected, atol=1e-5, rtol=1e-5)


def test_resnet_backbone_matches_torchvision_features(tmp_path) -> None:
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    net = TwoHeadNet("resnet18", 2, 0, pretrained=str(path)).eval()
    x = torch.rand(2, 3, 64, 64)  # images in [0, 1]: the backbone applies ImageNet's normalisation itself
    normalised = torchvision.transforms.functional.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    feats = torch.nn.Sequential(*list(ref.children())[:-2])(normalised)
    torch.testing.assert_close(net.backbone(x), feats)
    torch.testing.assert_close(net(x).latent, feats.mean((2, 3)))


def test_pretrained_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        build_backbone("resnet18", str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt"):
        build_backbone("resnet18", str(bad))
    with pytest.raises(ConfigError, match="small_cnn has no ImageNet"):
        build_backbone("small_cnn", "imagenet")

    def offline(*_a, **_k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.DEFAULT.__class__, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="ResNet18_Weights.*cache"):
        build_backbone("resnet18", "imagenet")


def test_bad_names() -> None:
    with pytest.raises(ConfigError, match="model.backbone"):
        TwoHeadNet("vgg", 2, 0)
    with pytest.raises(ConfigError, match="model.cam_layer"):
        TwoHeadNet("small_cnn", 2, 0, cam_layer="layer9")
    with pytest.raises(ConfigError, match="model.architecture"):
        TwoHeadNet("small_cnn", 2, 3, architecture="triple")


def test_dual_without_confounder_head_is_one_backbone() -> None:
    net = TwoHeadNet("small_cnn", 4, 0, architecture="dual", width=8)
    assert net.conf_backbone is None and net.architecture == "shared"
