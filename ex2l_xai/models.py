"""Backbones and the two-head network (label head + confounder head).

``TwoHeadNet(...)(x)`` returns a :class:`TwoHeadOutput` whose first two entries are the label and confounder
logits, so it plugs straight into :func:`ex2l_xai.cam.head_cams` with ``model.cam_layers()``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torchvision
from torch import Tensor, nn

from ex2l_xai.cam_structured import CamTail
from ex2l_xai.errors import ConfigError

log = logging.getLogger(__name__)

BACKBONES = ("small_cnn", "resnet18", "resnet50")
Architecture = Literal["shared", "dual"]

__all__ = ["BACKBONES", "Backbone", "TwoHeadNet", "TwoHeadOutput", "build_backbone"]


class TwoHeadOutput(NamedTuple):
    """Label logits (B, n_labels), confounder logits (B, n_confounders) or None, pooled latent (B, D)."""

    label: Tensor
    confounder: Tensor | None
    latent: Tensor


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """A convolutional feature extractor with named stages ``layer1`` ... ``layer4``.

    ``forward`` returns the feature maps of ``layer4`` (B, out_dim, h, w); ``out_dim`` is their channel count.
    """

    def __init__(self, stem: nn.Module, layers: list[nn.Module], out_dim: int) -> None:
        super().__init__()
        self.stem = stem
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _small_cnn(width: int = 32) -> Backbone:
    """Four conv-BN-ReLU stages (width, 2w, 4w, 4w), max-pooled after the first three: a 64 px image gives
    8×8 maps at ``layer4`` (a 32 px one 4×4). Fast on a CPU."""
    w = width
    layers = [_block(3, w, True), _block(w, 2 * w, True), _block(2 * w, 4 * w, True), _block(4 * w, 4 * w, False)]
    return Backbone(nn.Identity(), layers, 4 * w)


def _load_imagenet(name: str) -> dict[str, Tensor]:
    weights = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}[name]
    enum = getattr(torchvision.models, weights).DEFAULT
    try:
        return enum.get_state_dict(progress=False)
    except Exception as exc:  # no network and no cache: say what to do
        raise ConfigError(
            f"model.pretrained=imagenet: could not load torchvision's {weights}.DEFAULT for {name} ({exc}); "
            f"put the file in torch's cache ({torch.hub.get_dir()}/checkpoints) or give a state-dict path"
        ) from exc


def build_backbone(name: str, pretrained: str = "none", width: int = 32) -> Backbone:
    """Build ``small_cnn``, ``resnet18`` or ``resnet50``.

    ``pretrained``: ``none`` (random init), ``imagenet`` (torchvision's default weights, from torch's cache or
    downloaded; a clear error otherwise) or a path to a local state dict (of a torchvision ResNet or of the
    backbone itself).
    """
    if name == "small_cnn":
        if pretrained not in ("none", "", None) and not Path(str(pretrained)).is_file():
            raise ConfigError(f"model.pretrained={pretrained!r}: small_cnn has no ImageNet weights; use none or a path")
        backbone = _small_cnn(width)
    elif name in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, name)(weights=None)
        if pretrained == "imagenet":
            net.load_state_dict(_load_imagenet(name))
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        backbone = Backbone(stem, [net.layer1, net.layer2, net.layer3, net.layer4], net.fc.in_features)
    else:
        raise ConfigError(f"model.backbone: expected one of {BACKBONES}, got {name!r}")
    if pretrained not in ("none", "imagenet", "", None):
        _load_local(backbone, Path(str(pretrained)))
    return backbone


def _load_local(backbone: Backbone, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"model.pretrained: {path} is not a file (expected none, imagenet or a state-dict path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.pretrained: cannot read state dict {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: {path} holds a {type(state).__name__}, expected a state dict")
    # a torchvision ResNet's keys (conv1.*, bn1.*) map onto the stem (stem.0.*, stem.1.*)
    renamed = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith("conv1."):
            k = "stem.0." + k[len("conv1.") :]
        elif k.startswith("bn1."):
            k = "stem.1." + k[len("bn1.") :]
        if not k.startswith("fc."):
            renamed[k] = v
    missing, unexpected = backbone.load_state_dict(renamed, strict=False)
    if missing:
        raise ConfigError(f"model.pretrained: {path} lacks {len(missing)} backbone keys, e.g. {missing[:3]}")
    if unexpected:
        log.warning("model.pretrained: ignored %d keys of %s, e.g. %s", len(unexpected), path, unexpected[:3])


class TwoHeadNet(nn.Module):
    """A label head and (optionally) a confounder head over one shared backbone or two backbones.

    Parameters
    ----------
    backbone : ``small_cnn``, ``resnet18`` or ``resnet50``.
    n_labels, n_confounders : head sizes; ``n_confounders=0`` builds no confounder head.
    architecture : ``shared`` (both heads read one backbone) or ``dual`` (a backbone per head; a network without a
        confounder head has one backbone either way).
    cam_layer : module path inside the backbone where CAMs are taken (``layer4``, ``layer3``, ...).
    pretrained : see :func:`build_backbone`.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        n_labels: int = 4,
        n_confounders: int = 0,
        *,
        architecture: Architecture = "shared",
        cam_layer: str = "layer4",
        pretrained: str = "none",
        width: int = 32,
    ) -> None:
        super().__init__()
        if architecture not in ("shared", "dual"):
            raise ConfigError(f"model.architecture: expected shared or dual, got {architecture!r}")
        # without a confounder head there is nothing for a second backbone to serve: dual falls back to one
        self.architecture = architecture if n_confounders > 0 else "shared"
        self.cam_layer_name = cam_layer
        self.backbone = build_backbone(backbone, pretrained, width)
        self.conf_backbone = build_backbone(backbone, pretrained, width) if self.architecture == "dual" else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.label_head = nn.Linear(self.backbone.out_dim, n_labels)
        self.conf_head = nn.Linear(self.backbone.out_dim, n_confounders) if n_confounders > 0 else None
        for name in {cam_layer}:
            try:
                self.backbone.get_submodule(name)
            except AttributeError as exc:
                raise ConfigError(
                    f"model.cam_layer: {name!r} is not a module of {backbone}; try layer4, layer3, layer2 or layer1"
                ) from exc

    @property
    def latent_dim(self) -> int:
        """Width of the pooled latent."""
        return self.backbone.out_dim

    def cam_layers(self) -> tuple[nn.Module, nn.Module]:
        """The CAM layer of the label head and of the confounder head (one module when shared)."""
        label_layer = self.backbone.get_submodule(self.cam_layer_name)
        conf_body = self.conf_backbone if self.conf_backbone is not None else self.backbone
        return label_layer, conf_body.get_submodule(self.cam_layer_name)

    def cam_tails(self) -> tuple[CamTail | None, CamTail | None]:
        """What follows each head's CAM layer (the later stages, global average pooling, the head), for the
        structured CAM path of :func:`ex2l_xai.cam.head_cams`; an entry is None without that head or for a CAM
        layer inside a stage (e.g. ``layer4.1``)."""
        stages = ("layer1", "layer2", "layer3", "layer4")
        if self.cam_layer_name not in stages:
            return None, None

        def after(body: Backbone) -> tuple[nn.Module, ...]:
            return tuple(getattr(body, n) for n in stages[stages.index(self.cam_layer_name) + 1 :])

        label = CamTail(after(self.backbone), self.label_head)
        if self.conf_head is None:
            return label, None
        conf_body = self.conf_backbone if self.conf_backbone is not None else self.backbone
        return label, CamTail(after(conf_body), self.conf_head)

    def forward(self, x: Tensor) -> TwoHeadOutput:
        """Both heads from one pass (two backbones when ``dual``)."""
        latent = self.pool(self.backbone(x)).flatten(1)
        label = self.label_head(latent)
        conf = None
        if self.conf_head is not None:
            conf_latent = latent if self.conf_backbone is None else self.pool(self.conf_backbone(x)).flatten(1)
            conf = self.conf_head(conf_latent)
        return TwoHeadOutput(label, conf, latent)
