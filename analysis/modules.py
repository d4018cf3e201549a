"""Finding one's way around any ``nn.Module``: module paths, the default CAM layer, the modules that feed the label
logits in the order the forward pass runs them, and re-initialising a module's weights.

These work for torchvision ResNets, small ``nn.Sequential`` CNNs, timm EfficientNets, ex2l-xai's ``TwoHeadNet``,
TorchScript models (through :class:`analysis.scripted.ScriptedClassifier`) and models wrapped by
:class:`analysis.loading.Normalized`. A *wrapper* (any module with an ``inner`` attribute and ``is_wrapper =
True``) is transparent: module paths are read and written relative to the model it wraps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = [
    "FeaturePoint",
    "as_logits",
    "cascade_modules",
    "feature_points",
    "find_cam_layer",
    "module_path",
    "prepare_input",
    "random_copy",
    "randomize_",
    "resolve_module",
    "scripted_of",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any chain of wrappers (``is_wrapper = True`` with an ``inner`` module)."""
    while getattr(model, "is_wrapper", False):
        model = model.inner
    return model


def scripted_of(model: nn.Module) -> Any:
    """The :class:`~analysis.scripted.ScriptedClassifier` in ``model``'s wrapper chain, or None."""
    while getattr(model, "is_wrapper", False):
        if callable(getattr(type(model), "with_activation", None)):
            return model
        model = model.inner
    return None


def prepare_input(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` as the innermost model receives it: each wrapper's ``prepare`` (a normalisation), outermost first."""
    while getattr(model, "is_wrapper", False):
        prepare = getattr(model, "prepare", None)
        if callable(prepare):
            x = prepare(x)
        model = model.inner
    return x


def as_logits(out: Any) -> Tensor:
    """Label logits of a model output: a tensor, the first entry of a tuple/list, or an object's ``.label``."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    label = getattr(out, "label", None)
    if isinstance(label, Tensor):
        return label
    raise Ex2lError(
        f"forward_fn must return label logits (B, n_classes) or a sequence whose first entry is, got {type(out).__name__}"
    )


def resolve_module(model: nn.Module, spec: nn.Module | str, what: str) -> nn.Module:
    """``spec`` itself when it is a module, else the module at that dotted path (relative to a wrapped model)."""
    if isinstance(spec, nn.Module):
        return spec
    base = unwrap(model)
    modules = dict(base.named_modules())  # (TorchScript modules have no get_submodule)
    if spec in modules:
        return modules[spec]
    paths = [p for p in modules if p and p.count(".") == 0]
    raise Ex2lError(
        f"{what}: {spec!r} is not a module path of {type(base).__name__} (top-level modules: "
        f"{', '.join(paths[:12]) or 'none'})"
    )


def module_path(model: nn.Module, module: nn.Module | None) -> str:
    """Dotted path of ``module`` inside ``model`` (relative to a wrapped model); ``<model>`` for the model."""
    if module is None:
        return ""
    base = unwrap(model)
    for path, m in base.named_modules():
        if m is module:
            return path or "<model>"
    return type(module).__name__


# ---- what the forward pass runs --------------------------------------------------------------------------------
@dataclass
class FeaturePoint:
    """One module's output in a probe forward pass: its path, output shape, and whether the label logits depend
    on it (a gradient path exists). ``order`` is the position at which the module finished."""

    path: str
    shape: tuple[int, ...]
    connected: bool
    order: int


def _probe_input(model: nn.Module, example: Tensor) -> Tensor:
    dev = next((p.device for p in model.parameters()), example.device)
    return example[:2].detach().to(dev).clone().requires_grad_(True)


def feature_points(model: nn.Module, example: Tensor, forward_fn: Callable[[Tensor], Any] | None = None
                   ) -> list[FeaturePoint]:
    """Every module's tensor output in one forward pass of (the first two images of) ``example``, in the order the
    modules finish, with whether the label logits depend on it. Runs in eval mode (restored after), with the input
    requiring grad so that frozen weights do not cut the gradient path.

    A container that returns its last child's output (``layer4`` returning ``layer4.1``'s) is listed right after
    that child, with the same values.
    """
    inner = unwrap(model)
    scripted = scripted_of(model)
    if scripted is not None:  # a TorchScript model reads them from its graph
        was_training = model.training
        model.eval()
        try:
            return scripted.feature_points(prepare_input(model, _probe_input(model, example)))
        finally:
            model.train(was_training)
    outputs: list[tuple[str, Tensor]] = []

    def hook_for(path: str) -> Callable[..., Any]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
            if isinstance(out, Tensor) and out.requires_grad:
                clone = out.clone()  # in-place ops later in the pass cannot change what we measure
                outputs.append((path, clone))
                return clone
            return None

        return hook

    handles = [m.register_forward_hook(hook_for(p)) for p, m in inner.named_modules() if p]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = (forward_fn or model)(_probe_input(model, example))
            logits = as_logits(out)
            tensors = [t for _, t in outputs]
            grads = torch.autograd.grad(logits.sum(), tensors, allow_unused=True) if tensors else []
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [FeaturePoint(path, tuple(t.shape), g is not None, i)
            for i, ((path, t), g) in enumerate(zip(outputs, grads, strict=True))]


def _is_spatial(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[2] * shape[3] > 1


def find_cam_layer(model: nn.Module, example: Tensor | None = None) -> nn.Module:
    """The default CAM layer of a classifier.

    A model with ``cam_layers()`` (ex2l-xai's TwoHeadNet) names its own. With an ``example`` batch: the last
    module, in the order the forward pass finishes them, whose output is a (B, C, h, w) map with h·w > 1 that the
    label logits depend on. Modules finish after their children, so when a container returns its last child's map
    this is the container: ``layer4`` of a ResNet, ``bn2`` (batch norm + activation) of a timm EfficientNet, the
    ``features`` block of a ``Sequential`` CNN: the map global pooling reads. Without an example: ``model.layer4``
    when it exists, else the last ``Conv2d``.
    """
    base = unwrap(model)
    own = getattr(base, "cam_layers", None)
    if callable(own):
        return own()[0]
    if example is not None:
        spatial = [p for p in feature_points(model, example) if p.connected and _is_spatial(p.shape)]
        if not spatial:
            raise Ex2lError(
                f"layer: {type(base).__name__} has no module with a (B, C, h, w) output (h·w > 1) that its logits "
                "depend on; pass layer= (the module, or its path, to take CAMs at)"
            )
        # hooks fire as modules finish, so a container returning its last child's map comes after that child
        return resolve_module(model, spatial[-1].path, "layer")
    layer4 = getattr(base, "layer4", None)
    if isinstance(layer4, nn.Module):
        return layer4
    convs = [m for m in base.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise Ex2lError(f"layer: {type(base).__name__} has no Conv2d; pass layer= (the module to take CAMs at)")
    return convs[-1]


def cascade_modules(model: nn.Module, example: Tensor, forward_fn: Callable[[Tensor], Any] | None = None
                    ) -> list[str]:
    """Paths of the modules that own parameters and feed the label logits, from the output end towards the input:
    the reverse of the order in which one forward pass of ``example`` first finishes them (the order of cascading
    randomisation, Adebayo et al. 2018). A module whose output the logits do not depend on (a confounder head,
    a second backbone) is left out; so is one whose output is not a tensor."""
    base = unwrap(model)
    owns = {p for p, m in base.named_modules() if p and any(True for _ in m.parameters(recurse=False))}
    seen: list[str] = []
    for point in feature_points(model, example, forward_fn):
        if point.connected and point.path in owns and point.path not in seen:
            seen.append(point.path)
    if not seen:
        raise Ex2lError(f"cascade: no module of {type(base).__name__} with parameters feeds the label logits")
    return seen[::-1]


_RUNNING = ("running_mean", "running_var")


def randomize_(module: nn.Module) -> None:
    """Re-initialise ``module``'s weights in place, from torch's global random generator: its own
    ``reset_parameters()`` when it has one (PyTorch's default initialisation; batch norm also resets its running
    statistics), else each of its own parameters drawn from N(0, s²) with s its current standard deviation (0.02
    for a constant or one-element parameter) and running statistics set to mean 0, variance 1 (a TorchScript
    module, a custom layer)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset) and not isinstance(module, torch.jit.ScriptModule):
        reset()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            module.reset_running_stats()
        return
    with torch.no_grad():
        for _, p in module.named_parameters(recurse=False):
            s = float(p.float().std()) if p.numel() > 1 else 0.0
            p.normal_(0.0, s if s > 0 and s == s else 0.02)
        for name, b in module.named_buffers(recurse=False):
            if name in _RUNNING:
                b.fill_(0.0 if name == "running_mean" else 1.0)


def random_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised copy of ``model`` (same architecture): ``copy.deepcopy``, then :func:`randomize_` of
    every sub-module that has a ``reset_parameters()`` or parameters of its own, under ``torch.manual_seed(seed)``
    (the global RNG state is restored)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None)
            own = any(True for _ in m.parameters(recurse=False))
            if (callable(reset) and not isinstance(m, torch.jit.ScriptModule)) or own:
                randomize_(m)
    return clone
