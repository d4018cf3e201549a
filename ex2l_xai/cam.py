"""Differentiable Grad-CAM, Captum-backed.

The definition is Captum's ``LayerGradCam(forward_fn, layer).attribute(x, target, relu_attributions=True)``:
with ``A`` the layer's output (B, K, h, w) and ``s`` the target logit of each sample,

    weights_k = mean over (h, w) of ds/dA_k,    CAM = ReLU(sum_k weights_k * A_k)   -> (B, h, w).

Two backends share one interface:

* ``captum`` calls Captum's ``LayerGradCam`` with ``grad_kwargs={"create_graph": ...}`` (one extra forward
  pass per call);
* ``fused`` captures the layer's output with a forward hook during the forward pass the caller needs anyway and
  takes ``torch.autograd.grad`` of the target logits with respect to it. During training this makes the CAM of
  every head nearly free: :func:`head_cams` computes the CAMs of several heads from ONE forward pass. For a model
  that describes what follows its CAM layer (``TwoHeadNet``), :func:`head_cams` writes that backward pass out
  instead (:mod:`ex2l_xai.cam_structured`): the same CAMs and gradients, cheaper below the last block.

Neither backend changes the model's train/eval mode, and every hook is removed on exit, also on an exception.
Upsampling to the input size is a separate step (:func:`upsample`), used by the analysis layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ex2l_xai import cam_heads, cam_structured
from ex2l_xai.cam_layers import Reshape, auto_reshape
from ex2l_xai.cam_variants import VARIANTS, Variant, check_variant, constant_gradient, variant_map
from ex2l_xai.errors import Ex2lError

Target = int | Sequence[int] | Tensor
HeadTarget = Target | Literal["pred", "all"]
Backend = Literal["fused", "captum"]
Method = Literal["auto", "autograd", "structured"]

__all__ = [
    "VARIANTS",
    "HeadCams",
    "Variant",
    "capture_activations",
    "cam_from_activations",
    "grad_cam",
    "head_cams",
    "upsample",
]


def _as_target(target: Target, n: int, device: torch.device) -> Tensor:
    """Turn an int, a sequence or a tensor of class indices into a LongTensor of shape (n,)."""
    if isinstance(target, Tensor):
        t = target.to(device=device, dtype=torch.long).reshape(-1)
    elif isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=device)
    else:
        t = torch.as_tensor(list(target), dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.numel() != n:
        raise Ex2lError(f"target: expected an int or one class index per sample ({n}), got {t.numel()}")
    return t


@contextmanager
def capture_activations(layers: Sequence[nn.Module]) -> Iterator[list[Tensor | None]]:
    """Record the output of each layer during the forward passes run inside the ``with`` block.

    Yields a list with one slot per *distinct* layer position in ``layers``; slot ``i`` holds the output of
    ``layers[i]`` of the latest forward pass. The hook stores (and passes on) a clone of the output, as Captum
    does, so an in-place operation after the layer cannot corrupt the gradient; when nothing upstream requires
    grad (a frozen model), the stored output is made a leaf that does, so a CAM can still be taken.
    Hooks are removed on exit, also when the block raises.
    """
    store: list[Tensor | None] = [None] * len(layers)
    handles = []
    first_index: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise Ex2lError(f"layers[{i}]: expected a torch.nn.Module, got {type(layer).__name__}")
        first_index.setdefault(id(layer), i)

    def make_hook(slots: list[int]) -> Callable[[nn.Module, Any, Any], Tensor]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise Ex2lError(f"CAM layer {type(_module).__name__} must output a tensor, got {type(output)}")
            out = output.clone() if output.requires_grad else output.detach().requires_grad_(True)
            for s in slots:
                store[s] = out
            return out

        return hook

    slots_of: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        slots_of.setdefault(id(layer), []).append(i)
    try:
        for key, slots in slots_of.items():
            handles.append(layers[first_index[key]].register_forward_hook(make_hook(slots)))
        yield store
    finally:
        for h in handles:
            h.remove()


def cam_from_activations(
    activations: Tensor,
    scores: Tensor,
    target: Target,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    relu: bool = True,
    variant: Variant = "gradcam",
    reshape: Reshape | None = None,
) -> Tensor:
    """The CAM (``variant``, :mod:`ex2l_xai.cam_variants`) of ``scores[:, target]`` at already-captured
    ``activations`` (B, K, *spatial), or at ``reshape(activations)`` when given (tokens, channels-last maps:
    :mod:`ex2l_xai.cam_layers`; the gradient is reshaped the same way).

    ``scores`` must have been computed from ``activations`` in the same graph. Returns (B, *spatial); with
    ``create_graph=False`` the result is detached.
    """
    check_variant(variant)
    if activations.dim() < 3:
        raise Ex2lError(f"activations: expected (B, K, h, w) or (B, K, L), got shape {tuple(activations.shape)}")
    if scores.dim() != 2 or scores.shape[0] != activations.shape[0]:
        raise Ex2lError(
            f"scores: expected (B, n_classes) with B={activations.shape[0]}, got shape {tuple(scores.shape)}"
        )
    t = _as_target(target, scores.shape[0], scores.device)
    if int(t.min()) < 0 or int(t.max()) >= scores.shape[1]:
        raise Ex2lError(f"target: class indices must lie in [0, {scores.shape[1]}), got {t.tolist()}")
    selected = scores.gather(1, t[:, None]).sum()
    (grads,) = torch.autograd.grad(
        selected,
        activations,
        create_graph=create_graph,
        retain_graph=create_graph if retain_graph is None else retain_graph,
    )
    if reshape is not None:
        activations, grads = reshape(activations), reshape(grads)
        if activations.dim() < 3 or activations.shape != grads.shape:
            raise Ex2lError(f"reshape: expected a map (B, K, h, w), got shape {tuple(activations.shape)}")
    if variant == "gradcam":  # written out as it always was: the default's numbers do not move
        spatial = tuple(range(2, activations.dim()))
        weights = grads.mean(dim=spatial, keepdim=True)
        cam = (weights * activations).sum(dim=1)
    else:
        cam = variant_map(activations, grads, variant)
    if relu:
        cam = F.relu(cam)
    return cam if create_graph else cam.detach()


def _grad_cam_captum(
    forward_fn: Callable[[Tensor], Tensor],
    layer: nn.Module,
    inputs: Tensor,
    target: Tensor,
    create_graph: bool,
    relu: bool,
) -> Tensor:
    from captum.attr import LayerGradCam

    attr = LayerGradCam(forward_fn, layer).attribute(
        inputs,
        target=target,
        relu_attributions=relu,
        grad_kwargs={"create_graph": create_graph, "retain_graph": create_graph},
    )
    cam = attr.squeeze(1)
    return cam if create_graph else cam.detach()


def grad_cam(
    forward_fn: Callable[[Tensor], Tensor],
    layer: nn.Module,
    inputs: Tensor,
    target: Target,
    *,
    variant: Variant = "gradcam",
    backend: Backend = "fused",
    create_graph: bool = False,
    relu: bool = True,
    reshape: Reshape | None = None,
) -> Tensor:
    """The CAM of ``forward_fn(inputs)[:, target]`` at ``layer``; returns (B, h, w), unnormalised.

    Parameters
    ----------
    forward_fn : callable mapping ``inputs`` to logits (B, n_classes), e.g. a model.
    layer : the module whose output the CAM is taken at (e.g. ``model.layer4``, a ViT's ``blocks[-1].norm1``).
    inputs : batch of inputs (B, ...).
    target : one class index for all samples, or one per sample.
    variant : ``"gradcam"`` (default), ``"gradcam++"``, ``"hirescam"``, ``"xgradcam"`` or ``"layercam"``
        (definitions: :mod:`ex2l_xai.cam_variants`).
    backend : ``"fused"`` (forward hook + ``torch.autograd.grad``) or ``"captum"`` (``LayerGradCam``; Grad-CAM of
        a (B, K, h, w) layer only).
    create_graph : keep the graph so the CAM can be differentiated (for a penalty); else it is detached.
    relu : ReLU the map, as Grad-CAM does (``False`` gives the signed map).
    reshape : callable from the layer's output to (B, K, h, w); default :func:`~ex2l_xai.cam_layers.auto_reshape`
        (tokens of a ViT, channels-last maps of a Swin; conv maps as they are).

    Examples
    --------
    >>> cam = grad_cam(model, model.layer4, images, labels, variant="hirescam")  # doctest: +SKIP
    """
    check_variant(variant)
    t = _as_target(target, inputs.shape[0], inputs.device)
    with torch.enable_grad():
        if backend == "captum":
            if variant != "gradcam" or reshape is not None:
                raise Ex2lError("backend='captum' computes Grad-CAM of a (B, K, h, w) layer only; use backend='fused'")
            return _grad_cam_captum(forward_fn, layer, inputs, t, create_graph, relu)
        if backend != "fused":
            raise Ex2lError(f"backend: expected 'fused' or 'captum', got {backend!r}")
        with capture_activations([layer]) as store:
            scores = forward_fn(inputs)
        if store[0] is None:
            raise Ex2lError(f"layer {type(layer).__name__} was not called by forward_fn")
        shape = reshape if reshape is not None else auto_reshape(forward_fn, layer)
        return cam_from_activations(
            store[0], scores, t, create_graph=create_graph, relu=relu, variant=variant, reshape=shape
        )


@dataclass
class HeadCams:
    """The result of :func:`head_cams`: the forward output, each head's logits, activations and CAM."""

    output: Any
    logits: tuple[Tensor, ...]
    activations: tuple[Tensor, ...]
    cams: tuple[Tensor | None, ...]


def _head_cam(
    acts: Tensor,
    logits: Tensor,
    target: HeadTarget,
    create_graph: bool,
    retain: bool,
    relu: bool,
    variant: Variant = "gradcam",
    reshape: Reshape | None = None,
) -> Tensor:
    kw: dict[str, Any] = {"create_graph": create_graph, "relu": relu, "variant": variant, "reshape": reshape}
    if isinstance(target, str):
        if target == "pred":
            return cam_from_activations(acts, logits, logits.detach().argmax(1), retain_graph=retain, **kw)
        if target == "all":
            n_classes = logits.shape[1]
            maps = [
                cam_from_activations(acts, logits, k, retain_graph=retain or k < n_classes - 1, **kw)
                for k in range(n_classes)
            ]
            return torch.stack(maps, dim=1)
        raise Ex2lError(f"target: expected class indices, 'pred' or 'all', got {target!r}")
    return cam_from_activations(acts, logits, target, retain_graph=retain, **kw)


def _structured_tails(
    forward_fn: Callable[[Tensor], Any], layers: Sequence[nn.Module], method: Method
) -> list[cam_structured.CamTail | None] | None:
    """Each head's :class:`~ex2l_xai.cam_structured.CamTail` when ``forward_fn`` describes them, else ``None``."""
    if method not in ("auto", "autograd", "structured"):
        raise Ex2lError(f"method: expected 'auto', 'autograd' or 'structured', got {method!r}")
    if method == "autograd":
        return None
    if any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
        # mixed precision changes dtypes between the recorded tensors and the weights: leave it to autograd
        if method == "structured":
            raise Ex2lError("method='structured' does not run under torch.autocast; use 'auto' or 'autograd'")
        return None
    describe = getattr(forward_fn, "cam_tails", None)
    own_layers = getattr(forward_fn, "cam_layers", None)
    tails: list[cam_structured.CamTail | None] | None = None
    if callable(describe) and callable(own_layers):
        own = list(own_layers())
        if len(own) >= len(layers) and all(a is b for a, b in zip(own, layers, strict=False)):
            tails = list(describe())[: len(layers)]
            if all(t is None for t in tails) or not all(
                t is None or cam_structured.supports(t) for t in tails
            ):
                tails = None
    return tails


def _head_targets(logits: Tensor, target: HeadTarget) -> list[Tensor]:
    """One LongTensor (B,) per CAM asked of a head: its targets, its predictions, or each class for ``"all"``."""
    n, n_classes = logits.shape
    if isinstance(target, str):
        if target == "pred":
            return [logits.detach().argmax(1)]
        if target == "all":
            return [torch.full((n,), k, dtype=torch.long, device=logits.device) for k in range(n_classes)]
        raise Ex2lError(f"target: expected class indices, 'pred' or 'all', got {target!r}")
    t = _as_target(target, n, logits.device)
    if int(t.min()) < 0 or int(t.max()) >= n_classes:
        raise Ex2lError(f"target: class indices must lie in [0, {n_classes}), got {t.tolist()}")
    return [t]


def _weighted_maps(
    alphas: Sequence[Tensor],
    acts: Tensor,
    target: HeadTarget,
    relu: bool,
    create_graph: bool,
    variant: Variant = "gradcam",
) -> Tensor:
    """``sum_k alpha_k A_k`` (ReLU'd if asked) for each query; stacked on dim 1 for ``"all"``. For a variant other
    than Grad-CAM, ``alpha`` is the gradient, (B, K, h, w), or (B, K) when it is the same at every position (a
    pooling + linear head), and the map is the variant's (:func:`~ex2l_xai.cam_variants.variant_map`)."""
    src = acts if create_graph else acts.detach()
    maps = []
    for alpha in alphas:
        if variant == "gradcam":
            cam = (alpha[:, :, None, None] * src).sum(1)
        elif alpha.dim() == 4:  # a gradient map (the structured tail's, for the other variants)
            cam = variant_map(src, alpha, variant)
        else:
            cam = variant_map(src, constant_gradient(alpha, src), variant)
        maps.append(F.relu(cam) if relu else cam)
    every_class = isinstance(target, str) and target == "all"
    return torch.stack(maps, dim=1) if every_class else maps[0]


def _closed_form_cam(
    probe: cam_heads.HeadProbe,
    acts: Tensor,
    logits: Tensor,
    target: HeadTarget,
    relu: bool,
    create_graph: bool,
    variant: Variant = "gradcam",
) -> Tensor | None:
    """The CAM from ``W[target] / (h w)`` when the recorded pass proves ``logits = Linear(GAP(acts))``, else None.

    Every variant has this closed form: the gradient is ``W[target] / (h w)`` at every position."""
    if acts.dim() != 4:
        return None
    head = probe.linear_after_pool(logits, acts)
    if head is None:
        return None
    hw = acts.shape[2] * acts.shape[3]
    alphas = [cam_heads.closed_form_alphas(head, t, hw, create_graph) for t in _head_targets(logits, target)]
    return _weighted_maps(alphas, acts, target, relu, create_graph, variant)


def _structured_cams(
    tails: list[cam_structured.CamTail | None],
    rec: Any,
    probe: cam_heads.HeadProbe | None,
    store: list[Tensor | None],
    logits: tuple[Tensor, ...],
    targets: Sequence[HeadTarget | None],
    relus: Sequence[bool],
    create_graph: bool,
    variant: Variant = "gradcam",
) -> list[Tensor | None] | None:
    """The CAMs of all heads via :func:`~ex2l_xai.cam_structured.tail_alphas`, heads that share a tail batched
    (for a variant other than Grad-CAM, the whole gradient map rather than its spatial mean).

    Each head's tail, as the model describes it, must match the recorded pass: the tail's last map feeds global
    pooling and then the described head, whose output is that head's logits (:mod:`ex2l_xai.cam_heads`); else
    None (the caller uses autograd)."""
    if probe is None:
        return None
    queries: dict[
        tuple[int, ...], list[tuple[int, Tensor]]
    ] = {}  # (activations, tail) -> (head index, target)
    for i, target in enumerate(targets):
        if target is None:
            continue
        tail, acts = tails[i], store[i]
        if tail is None or acts is None:
            return None
        last = cam_structured.tail_output(tail.modules, rec, acts)
        if last is None or probe.linear_after_pool(logits[i], last) is not tail.head:
            return None
        ts = _head_targets(logits[i], target)
        key = (id(store[i]), *map(id, tail.modules))
        queries.setdefault(key, []).extend((i, t) for t in ts)
    per_head: dict[int, list[Tensor]] = {}
    for qs in queries.values():
        i0 = qs[0][0]
        tail, acts = tails[i0], store[i0]
        assert tail is not None and acts is not None
        heads = [(tails[i].head, t) for i, t in qs]  # type: ignore[union-attr]
        alphas = cam_structured.tail_alphas(
            tail.modules, rec, acts, heads, create_graph=create_graph, spatial_mean=variant == "gradcam"
        )
        if alphas is None:
            return None
        for (i, _), alpha in zip(qs, alphas, strict=True):
            per_head.setdefault(i, []).append(alpha)
    cams: list[Tensor | None] = [None] * len(targets)
    for i, alphas in per_head.items():
        acts = store[i]
        assert acts is not None
        cams[i] = _weighted_maps(alphas, acts, targets[i], relus[i], create_graph, variant)  # type: ignore[arg-type]
    return cams


@dataclass
class _CamJob:
    """What :func:`head_cams` recorded in its forward pass, and how the CAMs are to be taken."""

    probe: Any
    tails: Any
    rec: Any
    store: list[Tensor | None]
    logits: tuple[Tensor, ...]
    targets: list[HeadTarget | None]
    relus: list[bool]
    shapes: list[Reshape]
    create_graph: bool
    retain_graph: bool | None
    method: str
    variant: str


def _head_logits(output: Any, n: int) -> tuple[Tensor, ...]:
    """Entries 0..n-1 of ``forward_fn``'s output: one logits tensor per head."""
    try:
        return tuple(output[i] for i in range(n))
    except (TypeError, IndexError, KeyError) as exc:
        raise Ex2lError(
            f"forward_fn must return a sequence with one logits tensor per head ({n}), got {type(output).__name__}"
        ) from exc


def _fill_cams(job: _CamJob) -> list[Tensor | None]:
    """Each head's CAM: 1. the closed form where the pass proves pooling + linear after the CAM layer, 2. a
    described tail checked against the pass, 3. autograd."""
    n = len(job.store)
    cams: list[Tensor | None] = [None] * n
    todo = [i for i, t in enumerate(job.targets) if t is not None]
    if job.probe is not None:
        for i in list(todo):
            acts = job.store[i]
            assert acts is not None
            if job.shapes[i](acts) is not acts:  # a token or channels-last layer: no pooled map to prove
                continue
            cam = _closed_form_cam(job.probe, acts, job.logits[i], job.targets[i], job.relus[i],  # type: ignore[arg-type]
                                   job.create_graph, job.variant)
            if cam is not None:
                cams[i] = cam
                todo.remove(i)
    if todo and job.tails is not None:
        sub = [job.targets[i] if i in todo else None for i in range(n)]
        got = _structured_cams(job.tails, job.rec, job.probe, job.store, job.logits, sub, job.relus,
                               job.create_graph, job.variant)
        if got is not None:
            for i in todo:
                cams[i] = got[i]
            todo = []
    if todo and job.method == "structured":
        raise Ex2lError(
            f"method='structured': heads {todo} have neither a CAM layer that feeds global pooling and a "
            "linear head nor a described tail (cam_tails()) that matches the recorded forward pass; use "
            "method='auto' to fall back to autograd"
        )
    for j, i in enumerate(todo):
        # Keep the graph while another head still needs it, or when the caller will backpropagate.
        keep = job.create_graph if job.retain_graph is None else job.retain_graph
        retain = keep or j < len(todo) - 1
        cams[i] = _head_cam(job.store[i], job.logits[i], job.targets[i], job.create_graph, retain,  # type: ignore[arg-type]
                            job.relus[i], job.variant, job.shapes[i])
    return cams


def head_cams(
    forward_fn: Callable[[Tensor], Any],
    layers: Sequence[nn.Module],
    inputs: Tensor,
    targets: Sequence[HeadTarget | None],
    *,
    create_graph: bool = True,
    retain_graph: bool | None = None,
    relu: bool | Sequence[bool] = True,
    method: Method = "auto",
    variant: Variant = "gradcam",
    reshape: Reshape | None = None,
) -> HeadCams:
    """The CAM of several heads from ONE forward pass (the training-time path of eX2L).

    ``forward_fn(inputs)`` must return a sequence (tuple, NamedTuple, list) whose entry ``i`` is head ``i``'s
    logits (B, n_classes_i); ``layers[i]`` is the CAM layer of head ``i`` (the same module for heads over one
    shared backbone, different modules for two backbones). ``targets[i]`` is an int or one class per sample,
    ``"pred"`` (the head's own prediction), ``"all"`` (every class: the CAM is (B, C, h, w)) or ``None`` (no
    CAM for that head). With ``create_graph=True`` (default) the CAMs are differentiable and the graph of the
    forward pass is kept for the caller's ``loss.backward()``; ``retain_graph=True`` keeps it also without
    ``create_graph`` (CAMs for the logs only, loss still to be backpropagated). ``relu`` may be given per head.

    ``method``: ``"autograd"`` takes ``torch.autograd.grad`` per head (any network); ``"structured"`` writes the
    backward pass from the CAM layer to the heads out explicitly (:mod:`ex2l_xai.cam_structured`: one batched pass
    for all heads on a shared tail, only the spatial sums alpha needs) — the same CAMs and gradients, cheaper,
    for a ``forward_fn`` that describes its tails (``TwoHeadNet`` with a ResNet backbone, called with its own
    ``cam_layers()``); ``"auto"`` (default) uses it where it applies and autograd elsewhere.

    ``variant`` (:mod:`ex2l_xai.cam_variants`) applies to every head. Where the recorded pass proves that a CAM
    layer feeds global average pooling and a linear head, every variant takes its closed form from the head's
    weights; the structured tail path computes the gradient's spatial mean for ``"gradcam"`` and the whole
    gradient map for the other variants. ``reshape`` (a callable to (B, K, h, w))
    overrides :func:`~ex2l_xai.cam_layers.auto_reshape` for every layer (token and channels-last layers).
    """
    check_variant(variant)
    relus = [relu] * len(layers) if isinstance(relu, bool) else list(relu)
    if len(targets) != len(layers):
        raise Ex2lError(f"targets: expected one per head ({len(layers)}), got {len(targets)}")
    shapes = [reshape if reshape is not None else auto_reshape(forward_fn, layer) for layer in layers]
    tails = _structured_tails(forward_fn, layers, method)
    explicit = method != "autograd" and not any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    with torch.enable_grad():
        with ExitStack() as stack:
            store = stack.enter_context(capture_activations(layers))
            probe = stack.enter_context(cam_heads.probe_heads(forward_fn)) if explicit else None
            rec = None
            if tails is not None:
                rec = stack.enter_context(cam_structured.record_tails([t for t in tails if t is not None]))
            output = forward_fn(inputs)
        missing = [i for i, a in enumerate(store) if a is None]
        if missing:
            raise Ex2lError(f"layers {missing} were not called by forward_fn")
        logits = _head_logits(output, len(layers))
        cams = _fill_cams(_CamJob(probe, tails, rec, store, logits, list(targets), relus, shapes, create_graph,
                                  retain_graph, method, variant))
    acts = tuple(a for a in store if a is not None)
    return HeadCams(output=output, logits=logits, activations=acts, cams=tuple(cams))


def upsample(cam: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinearly upsample CAMs (B, h, w) or (B, C, h, w) to ``size`` (as Captum's ``interpolate``)."""
    squeeze = cam.dim() == 3
    x = cam[:, None] if squeeze else cam
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return out[:, 0] if squeeze else out
