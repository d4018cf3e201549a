"""The two-head network (label head + confounder head) over the backbones of :mod:`ex2l_xai.backbones`.

``TwoHeadNet(...)(x)`` returns a :class:`TwoHeadOutput` whose first two entries are the label and confounder
logits, so it plugs straight into :func:`ex2l_xai.cam.head_cams` with ``model.cam_layers()``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ex2l_xai.backbones import BACKBONES, STAGES, Backbone, build_backbone
from ex2l_xai.cam_structured import CamTail
from ex2l_xai.errors import ConfigError
from ex2l_xai.runfiles import RunFiles

log = logging.getLogger(__name__)

Architecture = Literal["shared", "dual"]

__all__ = [
    "BACKBONES",
    "Backbone",
    "FrozenPrefixCache",
    "TwoHeadNet",
    "TwoHeadOutput",
    "build_backbone",
    "weights_digest",
]


class TwoHeadOutput(NamedTuple):
    """Label logits (B, n_labels), confounder logits (B, n_confounders) or None, pooled latent (B, D)."""

    label: Tensor
    confounder: Tensor | None
    latent: Tensor


class FrozenPrefixCache:
    """Outputs of a frozen prefix, addressed by the prefix's weights (:func:`weights_digest`) and the content of
    each input image (a 128-bit BLAKE2b digest of its bytes, shape and dtype), so it can never return another
    image's features, nor those of other weights. Each missing image is computed alone (batch of one), so a cached
    value does not depend on which batch first asked for it: a run is the same function of its data whether or
    not it was resumed. Stops growing past ``limit_bytes`` (then computes).

    A :class:`TwoHeadNet` built with ``cache_frozen`` owns one (there is no cache of the process). Several models
    may be given the same one (``TwoHeadNet(prefix_cache=...)``; the demo's three models, built from the same
    ImageNet weights, then compute each image's prefix once); as entries name their weights, sharing is always
    safe. A deep copy of a model shares its cache instead of copying it (``__deepcopy__`` returns the cache)."""

    def __init__(self, limit_bytes: int = 4 << 30) -> None:
        self.store: dict[bytes, Tensor] = {}
        self.limit_bytes = limit_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(x: Tensor) -> bytes:
        """Digest of one image (C, H, W)."""
        data = x.detach().contiguous().cpu().numpy().tobytes()
        tag = f"{tuple(x.shape)}{x.dtype}".encode()
        return hashlib.blake2b(data + tag, digest_size=16).digest()

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor, weights: bytes = b"") -> Tensor:
        """``fn(x)`` image by image, each looked up first under ``weights`` (the digest of the weights ``fn``
        computes with) and the image's digest."""
        keys = [weights + self.key(xi) for xi in x]
        out: list[Tensor] = []
        for i, k in enumerate(keys):
            hit = self.store.get(k)
            if hit is None:
                self.misses += 1
                with torch.no_grad():
                    hit = fn(x[i : i + 1])[0]
                if self.nbytes + hit.numel() * hit.element_size() <= self.limit_bytes:
                    self.store[k] = hit
                    self.nbytes += hit.numel() * hit.element_size()
            else:
                self.hits += 1
            out.append(hit.to(x.device))
        return torch.stack(out)

    def clear(self) -> None:
        """Forget every stored output."""
        self.store.clear()
        self.nbytes = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenPrefixCache:
        return self


def weights_digest(modules: list[nn.Module]) -> bytes:
    """Digest of the module types and the names, shapes and values of the parameters and buffers of ``modules``
    (non-persistent buffers included: an input normalisation changes the outputs as much as a weight)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str([type(m).__name__ for m in modules]).encode())
    for i, m in enumerate(modules):
        for name, t in (*m.named_parameters(), *m.named_buffers()):
            t = t.detach().contiguous().cpu()
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()


class TwoHeadNet(nn.Module):
    """A label head and (optionally) a confounder head over one shared backbone or two backbones.

    Parameters
    ----------
    backbone : ``small_cnn``, ``resnet18``, ``resnet50``, ``efficientnet_lite0`` or ``vit_tiny``
        (:mod:`ex2l_xai.backbones`).
    n_labels, n_confounders : head sizes; ``n_confounders=0`` builds no confounder head.
    architecture : ``shared`` (both heads read one backbone) or ``dual`` (a backbone per head; a network without a
        confounder head has one backbone either way).
    cam_layer : module path inside the backbone where CAMs are taken (``layer4``, ``layer3``, ``layer4.1``, ...).
    pretrained : see :func:`~ex2l_xai.backbones.build_backbone`.
    freeze : ``none``, or the last stage of a frozen prefix (``stem``, ``layer1``, ``layer2``, ``layer3``): those
        stages keep their weights (no gradient) and their batch norms stay in eval mode, also under ``train()``.
        With ``dual``, two backbones whose frozen stages hold the same weights (both ImageNet-initialised) share
        them, so the prefix is computed once for both.
    cache_frozen : keep the frozen prefix's output of every image seen (:class:`FrozenPrefixCache`): each later
        pass over the same image skips the prefix. For datasets that fit in memory and yield the same tensor for
        an image every epoch (no random augmentation); the prefix is computed normally when the input requires
        grad or a hook watches a frozen module.
    prefix_cache : the cache to use with ``cache_frozen`` (default: a new one, this model's own); give several
        models one cache to compute each image's prefix once across them.
    init_from : a run folder, its ``best.pt``, or a TwoHeadNet state dict: weights to start from after
        ``pretrained`` (every label-branch key must be there; confounder-branch keys are taken where present).
    image_size : the input size a ``vit_tiny`` backbone's position embeddings are made for (others ignore it).
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
        freeze: str = "none",
        cache_frozen: bool = False,
        init_from: str | None = None,
        prefix_cache: FrozenPrefixCache | None = None,
        image_size: int = 224,
    ) -> None:
        super().__init__()
        if architecture not in ("shared", "dual"):
            raise ConfigError(f"model.architecture: expected shared or dual, got {architecture!r}")
        freeze_points = ("none", *STAGES[:-1])
        if freeze not in freeze_points:
            raise ConfigError(f"model.freeze: expected one of {list(freeze_points)}, got {freeze!r}")
        # without a confounder head there is nothing for a second backbone to serve: dual falls back to one
        self.architecture = architecture if n_confounders > 0 else "shared"
        self.cam_layer_name = cam_layer
        self.freeze = freeze
        self.n_frozen = 0 if freeze == "none" else STAGES.index(freeze) + 1
        self.backbone = build_backbone(backbone, pretrained, width, image_size)
        self.conf_backbone = (
            build_backbone(backbone, pretrained, width, image_size) if self.architecture == "dual" else None
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.label_head = nn.Linear(self.backbone.out_dim, n_labels)
        self.conf_head = nn.Linear(self.backbone.out_dim, n_confounders) if n_confounders > 0 else None
        try:
            self.backbone.get_submodule(cam_layer)
        except AttributeError as exc:
            raise ConfigError(
                f"model.cam_layer: {cam_layer!r} is not a module of {backbone}; try layer4, layer3, layer2 or layer1"
            ) from exc
        root = cam_layer.split(".")[0]
        if root in STAGES and STAGES.index(root) < self.n_frozen:
            raise ConfigError(
                f"model.cam_layer={cam_layer!r} lies in the frozen prefix (model.freeze={freeze!r}): a penalty there "
                "could not move it; freeze fewer stages or take the CAM later"
            )
        if self.n_frozen and not self._frozen_parameters():
            raise ConfigError(
                f"model.freeze={freeze!r} freezes nothing: {backbone}'s stages up to {freeze} have no parameters "
                f"(its stem is {type(self.backbone.stem).__name__}); freeze a later stage or none"
            )
        if init_from:
            self._init_from(init_from)
        self._tied = False
        self._cache: FrozenPrefixCache | None = None
        if cache_frozen and self.n_frozen:
            self._cache = prefix_cache if prefix_cache is not None else FrozenPrefixCache()
        # per backbone: the (storage, version) of each frozen tensor and the weights' digest computed from them
        self._digests: dict[int, tuple[tuple, bytes]] = {}
        for p in self._frozen_parameters():
            p.requires_grad_(False)
        self._tie_frozen()
        self.train()

    # ---- frozen prefix -------------------------------------------------------------------------------------
    def _bodies(self) -> list[Backbone]:
        return [b for b in (self.backbone, self.conf_backbone) if b is not None]

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for b in self._bodies() for m in b.stages()[: self.n_frozen]]

    def _frozen_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._frozen_modules() for p in m.parameters()]

    def _tie_frozen(self) -> None:
        """Let the confounder backbone use the label backbone's frozen stages when they hold the same weights."""
        cb = self.conf_backbone
        if cb is None or not self.n_frozen or self._tied:
            return
        for name in STAGES[: self.n_frozen]:
            a, b = getattr(self.backbone, name).state_dict(), getattr(cb, name).state_dict()
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                return
        for name in STAGES[: self.n_frozen]:
            setattr(cb, name, getattr(self.backbone, name))
        self._tied = True

    def train(self, mode: bool = True) -> TwoHeadNet:
        """As ``nn.Module.train``, but the frozen stages stay in eval mode."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        return self

    @property
    def prefix_cache(self) -> FrozenPrefixCache | None:
        """The cache of the frozen prefix's outputs (``cache_frozen``), or None."""
        return self._cache

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``; the frozen prefix's weights are hashed again (cached outputs are
        looked up by the loaded weights) and equal frozen stages re-tied."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._digests.clear()
        self._tie_frozen()
        return result

    def _prefix(self, body: Backbone, x: Tensor) -> Tensor:
        n = self.n_frozen
        hooked = any(m._forward_hooks or m._forward_pre_hooks for s in body.stages()[:n] for m in s.modules())
        if self._cache is None or x.requires_grad or hooked:
            return body(x, stop=n)
        modules = [body.input_norm, *body.stages()[:n]]
        # any in-place change of a frozen weight or buffer (an optimizer, an init, a copy_) bumps its version:
        # the weights are then hashed again, so the cache never serves outputs of the old ones
        versions = tuple((t.data_ptr(), t._version) for m in modules for t in (*m.parameters(), *m.buffers()))
        entry = self._digests.get(id(body))
        if entry is None or entry[0] != versions:
            entry = self._digests[id(body)] = (versions, weights_digest(modules))
        return self._cache(lambda xi: body(xi, stop=n), x, entry[1])

    def _features(self, body: Backbone, x: Tensor, prefix: Tensor | None) -> Tensor:
        if not self.n_frozen:
            return body(x)
        h = prefix if prefix is not None else self._prefix(body, x)
        return body(h, start=self.n_frozen)

    # ---- weights from a finished run -----------------------------------------------------------------------
    def _init_from(self, source: str) -> None:
        path = Path(source)
        if path.is_dir():
            path = RunFiles(path).best_file
        if not path.is_file():
            raise ConfigError(f"model.init_from: {path} is not a file (expected a run folder, its best.pt or a state dict)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"model.init_from: cannot read {path} ({exc})") from exc
        state = payload.get("model", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"model.init_from: {path} holds no state dict (expected best.pt of a run)")
        own = self.state_dict()
        label_keys = [k for k in own if k.startswith(("backbone.", "label_head."))]
        missing = [k for k in label_keys if k not in state]
        if missing:
            raise ConfigError(f"model.init_from: {path} lacks {len(missing)} label-branch keys, e.g. {missing[:3]}")
        wrong = [k for k in label_keys if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise ConfigError(
                f"model.init_from: {path}: {k} has shape {tuple(state[k].shape)}, this model {tuple(own[k].shape)}"
            )
        taken = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        super().load_state_dict(taken, strict=False)
        log.info("model.init_from: %d of %d tensors from %s", len(taken), len(own), path)

    # ---- CAM plumbing --------------------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        """Width of the pooled latent."""
        return self.backbone.out_dim

    @property
    def num_prefix_tokens(self) -> int | None:
        """The class/register tokens of the backbone's token layers (a transformer backbone), else None: what the
        CAM functions drop when a CAM layer outputs tokens (:mod:`ex2l_xai.cam_layers`)."""
        return self.backbone.num_prefix_tokens

    def cam_layers(self) -> tuple[nn.Module, nn.Module]:
        """The CAM layer of the label head and of the confounder head (one module when shared)."""
        label_layer = self.backbone.get_submodule(self.cam_layer_name)
        conf_body = self.conf_backbone if self.conf_backbone is not None else self.backbone
        return label_layer, conf_body.get_submodule(self.cam_layer_name)

    def cam_tails(self) -> tuple[CamTail | None, CamTail | None]:
        """What follows each head's CAM layer (the later stages, global average pooling, the head), for the
        structured CAM path of :func:`ex2l_xai.cam.head_cams`; an entry is None without that head or for a CAM
        layer inside a stage (e.g. ``layer4.1``). :func:`~ex2l_xai.cam.head_cams` checks the description against
        the recorded forward pass before it uses it."""
        stages = STAGES[1:]
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
        """Both heads from one pass (two backbones when ``dual``; a tied frozen prefix computed once)."""
        prefix = self._prefix(self.backbone, x) if self.n_frozen else None
        latent = self.pool(self._features(self.backbone, x, prefix)).flatten(1)
        label = self.label_head(latent)
        conf = None
        if self.conf_head is not None:
            if self.conf_backbone is None:
                conf_latent = latent
            else:
                shared = prefix if self._tied else None
                conf_latent = self.pool(self._features(self.conf_backbone, x, shared)).flatten(1)
            conf = self.conf_head(conf_latent)
        return TwoHeadOutput(label, conf, latent)
