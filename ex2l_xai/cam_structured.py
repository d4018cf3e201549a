"""Structured Grad-CAM gradients: the exact backward pass through a known network tail, batched over heads.

Grad-CAM needs, per head and sample, ``alpha = spatial mean of d logit[target] / dA`` at the CAM layer ``A``. The
generic path (:func:`ex2l_xai.cam.cam_from_activations`) asks autograd for the full gradient map, one
``torch.autograd.grad`` per head, and for a penalty it differentiates that gradient again (double backward).
When the part of the network between the CAM layer and a head is known — a sequence of torchvision ResNet blocks,
``Conv2d``/``BatchNorm2d``/``ReLU`` layers, then global average pooling and a linear head — this module writes that
backward pass out explicitly with differentiable operations instead:

* the cotangent at the last feature map is the head's weight row ``W[target] / (h*w)``, no autograd call needed;
* all heads (and, for ``"all"``, all classes) that share a tail go through it in ONE batched pass;
* batch-norm statistics and ReLU masks are computed once per step and shared by every head;
* the convolution that reads the CAM layer only returns the *spatial sum* of its input gradient (all that alpha
  needs), about ``h*w`` times fewer multiply-adds than the full map;
* the double backward of a transposed convolution uses the forward-convolution kernels (:class:`_ConvInputVJP`),
  faster on a CPU than the generic weight-gradient kernel; on maps smaller than the kernel (on a CPU) the product
  and its backward are one matrix product per kernel tap over the pixels that exist, skipping the zero padding
  (:class:`_TapConvInputVJP`).

The result is the same function as the generic path (gradients equal to float64 round-off; tests check both),
computed from the activations recorded during the ONE forward pass. Every recorded tensor is checked for in-place
modification before use; anything the walker does not recognise makes :func:`tail_alphas` return ``None`` and
the caller falls back to autograd. The penalty can be differentiated once (training); differentiating the
penalty's gradient again (gradgradcheck) is not supported on this path and raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["CamTail", "record_tails", "supports", "tail_alphas", "tail_output"]


@dataclass(frozen=True)
class CamTail:
    """What follows a head's CAM layer: ``modules`` in order, then global average pooling, then ``head``."""

    modules: tuple[nn.Module, ...]
    head: nn.Linear


class _Unsupported(Exception):
    """The recorded forward pass does not match what the walker expects: use the generic path."""


def _units(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Flatten nested ``nn.Sequential`` containers into the blocks and layers the walker handles."""
    out: list[nn.Module] = []
    for m in modules:
        if type(m) is nn.Sequential:
            out.extend(_units(list(m.children())))
        else:
            out.append(m)
    return out


def _conv_ok(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple)
        and all(isinstance(p, int) for p in m.padding)
    )


def _bn_ok(m: nn.Module) -> bool:
    return type(m) is nn.BatchNorm2d


def _downsample_ok(ds: nn.Module | None) -> bool:
    if ds is None:
        return True
    parts = list(ds.children()) if type(ds) is nn.Sequential else []
    return len(parts) == 2 and _conv_ok(parts[0]) and _bn_ok(parts[1])


def _unit_ok(m: nn.Module) -> bool:
    if type(m) is BasicBlock:
        convs_bns = (m.conv1, m.bn1, m.conv2, m.bn2)
    elif type(m) is Bottleneck:
        convs_bns = (m.conv1, m.bn1, m.conv2, m.bn2, m.conv3, m.bn3)
    else:
        return _conv_ok(m) or _bn_ok(m) or type(m) in (nn.ReLU, nn.Identity)
    return (
        all(_conv_ok(c) if i % 2 == 0 else _bn_ok(c) for i, c in enumerate(convs_bns))
        and type(m.relu) is nn.ReLU
        and _downsample_ok(m.downsample)
    )


def supports(tail: CamTail | None) -> bool:
    """Whether :func:`tail_alphas` can walk ``tail`` (else the caller uses autograd)."""
    if tail is None or type(tail.head) is not nn.Linear:
        return False
    return all(_unit_ok(u) for u in _units(tail.modules))


class _Record:
    """(input, output) of every hooked module during one forward pass, with version stamps."""

    def __init__(self) -> None:
        self.io: dict[int, tuple[Tensor, Tensor, int, int]] = {}
        self.calls: dict[int, int] = {}

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if isinstance(x, Tensor) and isinstance(output, Tensor):
            self.io[id(module)] = (x, output, x._version, output._version)
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1

    def _io(self, module: nn.Module) -> tuple[Tensor, Tensor, int, int]:
        if self.calls.get(id(module)) != 1 or id(module) not in self.io:
            raise _Unsupported(f"{type(module).__name__} called {self.calls.get(id(module), 0)} times")
        return self.io[id(module)]

    def input(self, module: nn.Module, *, values: bool = True) -> Tensor:
        """The module's input; with ``values``, raise when it was modified in place after the call."""
        x, _, vx, _ = self._io(module)
        if values and x._version != vx:
            raise _Unsupported(f"the input of a {type(module).__name__} was modified in place")
        return x

    def output(self, module: nn.Module, *, values: bool = True) -> Tensor:
        """The module's output; with ``values``, raise when it was modified in place after the call."""
        _, y, _, vy = self._io(module)
        if values and y._version != vy:
            raise _Unsupported(f"the output of a {type(module).__name__} was modified in place")
        return y


def _hooked(unit: nn.Module) -> list[nn.Module]:
    """The modules whose input/output the walker reads for ``unit``."""
    if type(unit) in (BasicBlock, Bottleneck):
        mods = [unit] + [c for c in unit.children() if type(c) in (nn.Conv2d, nn.BatchNorm2d)]
        if unit.downsample is not None:
            mods += list(unit.downsample.children())
        return mods
    return [unit]


@contextmanager
def record_tails(tails: Sequence[CamTail]) -> Iterator[_Record]:
    """Record, during the forward passes inside the block, what :func:`tail_alphas` needs; hooks removed on exit."""
    rec = _Record()
    handles = []
    seen: set[int] = set()
    try:
        for tail in tails:
            for unit in _units(tail.modules):
                for m in _hooked(unit):
                    if id(m) not in seen:
                        seen.add(id(m))
                        handles.append(m.register_forward_hook(rec.hook))
        yield rec
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# the backward pieces; cotangents are 5-D: (n_queries, B, C, h, w), activations 4-D: (B, C, h, w)


class _ConvInputVJP(torch.autograd.Function):
    """Input gradient of a convolution, ``conv_transpose2d(g, W)``, with a fast backward.

    Its backward needs ``conv2d(u, W)`` (for ``g``) and the correlation of ``u`` with ``g`` (for ``W``); the
    latter is computed as a convolution over the batch axis, as PyTorch's own double backward does, instead of the
    slower generic weight-gradient kernel that autograd would call for ``conv_transpose2d``.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, w: Tensor, in_hw: tuple[int, int], conf: tuple) -> Tensor:
        stride, padding, dilation = conf
        k = w.shape[2:]
        out_pad = [
            in_hw[i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
            for i in range(2)
        ]
        ctx.save_for_backward(g, w)
        ctx.conf = conf
        return F.conv_transpose2d(g, w, None, stride, padding, out_pad, 1, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        g, w = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        grad_g = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_g = F.conv2d(u, w, None, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            k = w.shape[2:]
            gw = F.conv2d(u.transpose(0, 1), g.transpose(0, 1), None, dilation, padding, stride)
            grad_w = gw[:, :, : k[0], : k[1]].transpose(0, 1)
        return grad_g, grad_w, None, None


def _tap_ranges(
    k: int, n_out: int, n_in: int, s: int, p: int, d: int
) -> list[tuple[int, int, int, int]]:
    """Per kernel tap ``a``: the output range [q0, q1) that reads in-bounds input, and its first input index."""
    out = []
    for a in range(k):
        qs = [q for q in range(n_out) if 0 <= q * s + a * d - p < n_in]
        if qs:
            out.append((a, qs[0], qs[-1] + 1, qs[0] * s + a * d - p))
    return out


class _TapConvInputVJP(torch.autograd.Function):
    """:class:`_ConvInputVJP` as one matrix product per kernel tap over the in-bounds pixels only.

    On maps smaller than the kernel (2×2 maps, 3×3 kernels) most of a convolution's multiply-adds hit the zero
    padding; per tap, only the pixel pairs that exist are multiplied (16 of 36 for 2×2 and 3×3), for the product
    and for both gradients of its backward. Channels-last internally, so every product is one GEMM.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, w: Tensor, in_hw: tuple[int, int], conf: tuple) -> Tensor:
        stride, padding, dilation = conf
        n, _, ho, wo = g.shape
        taps = [
            (ry, rx)
            for ry in _tap_ranges(w.shape[2], ho, in_hw[0], stride[0], padding[0], dilation[0])
            for rx in _tap_ranges(w.shape[3], wo, in_hw[1], stride[1], padding[1], dilation[1])
        ]
        g_cl = g.permute(0, 2, 3, 1)
        w_taps = w.permute(2, 3, 0, 1).contiguous()  # (kh, kw, C_out, C_in): one contiguous matrix per tap
        out = g.new_zeros(n, in_hw[0], in_hw[1], w.shape[1])
        sy, sx = stride
        for (a, y0, y1, py), (b, x0, x1, px) in taps:
            # a 2-D product (one GEMM); a 4-D matmul on the strided slice would become a batched one
            part = g_cl[:, y0:y1, x0:x1, :].reshape(-1, g.shape[1]) @ w_taps[a, b]
            out[:, py : py + (y1 - y0 - 1) * sy + 1 : sy, px : px + (x1 - x0 - 1) * sx + 1 : sx, :] += part.view(
                n, y1 - y0, x1 - x0, -1
            )
        ctx.save_for_backward(g, w_taps)
        ctx.taps, ctx.stride = taps, stride
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        g, w_taps = ctx.saved_tensors
        sy, sx = ctx.stride
        g_cl, u_cl = g.permute(0, 2, 3, 1), u.permute(0, 2, 3, 1)
        grad_g = torch.zeros_like(g_cl) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_taps) if ctx.needs_input_grad[1] else None
        for (a, y0, y1, py), (b, x0, x1, px) in ctx.taps:
            u_sel = u_cl[:, py : py + (y1 - y0 - 1) * sy + 1 : sy, px : px + (x1 - x0 - 1) * sx + 1 : sx, :]
            u_sel = u_sel.reshape(-1, u.shape[1])
            if grad_g is not None:
                part = u_sel @ w_taps[a, b].t()
                grad_g[:, y0:y1, x0:x1, :] += part.view(g.shape[0], y1 - y0, x1 - x0, -1)
            if grad_w is not None:
                g_sel = g_cl[:, y0:y1, x0:x1, :].reshape(-1, g.shape[1])
                torch.mm(g_sel.t(), u_sel, out=grad_w[a, b])
        return (
            grad_g.permute(0, 3, 1, 2) if grad_g is not None else None,
            grad_w.permute(2, 3, 0, 1) if grad_w is not None else None,
            None,
            None,
        )


def _conv_vjp(conv: nn.Conv2d, g: Tensor, in_hw: Sequence[int]) -> Tensor:
    n, b = g.shape[:2]
    # tiny maps on a CPU: per-tap products skip the padding; elsewhere the convolution kernels do better
    tiny = g.device.type == "cpu" and g.shape[3] * g.shape[4] < conv.weight.shape[2] * conv.weight.shape[3]
    fn = _TapConvInputVJP if tiny else _ConvInputVJP
    gx = fn.apply(
        g.reshape(n * b, *g.shape[2:]),
        conv.weight,
        (int(in_hw[0]), int(in_hw[1])),
        (conv.stride, conv.padding, conv.dilation),
    )
    return gx.reshape(n, b, *gx.shape[1:])


def _conv_vjp_sum(conv: nn.Conv2d, g: Tensor, in_hw: Sequence[int]) -> Tensor:
    """Spatial sum of the convolution's input gradient, (n, B, C_in), without the full map."""
    w = conv.weight
    kh, kw = w.shape[2:]

    def valid(k: int, n_out: int, n_in: int, s: int, p: int, d: int) -> Tensor:
        pos = (
            torch.arange(n_out, device=g.device)[None, :] * s
            + torch.arange(k, device=g.device)[:, None] * d
            - p
        )
        return ((pos >= 0) & (pos < n_in)).to(
            g.dtype
        )  # (k, n_out): tap a reads an in-bounds pixel at output q

    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    vh = valid(kh, g.shape[3], int(in_hw[0]), sh, ph, dh)
    vw = valid(kw, g.shape[4], int(in_hw[1]), sw, pw, dw)
    per_tap = torch.einsum("nbohw,ah,cw->nboac", g, vh, vw)
    return torch.einsum("nboac,oiac->nbi", per_tap, w)


def _bn_vjp(bn: nn.BatchNorm2d, x: Tensor, g: Tensor, cache: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
    """Input gradient of batch norm (batch statistics in training, running ones in eval), exact in ``x``."""
    weight = bn.weight.view(1, 1, -1, 1, 1) if bn.weight is not None else None
    if bn.training or bn.running_var is None:
        # sums times 1/n rather than means: the same numbers, and twice as fast on a CPU for these layouts
        inv_n = 1.0 / (x.shape[0] * x.shape[2] * x.shape[3])
        if id(bn) not in cache:
            d = (0, 2, 3)
            xc = x - x.sum(d, keepdim=True) * inv_n
            inv = (xc.pow(2).sum(d, keepdim=True) * inv_n + bn.eps).rsqrt()
            cache[id(bn)] = (xc * inv, inv)
        xhat, inv = cache[id(bn)]
        d5 = (1, 3, 4)
        scale = inv if weight is None else weight * inv
        mean_g = g.sum(d5, keepdim=True) * inv_n
        mean_gx = (g * xhat).sum(d5, keepdim=True) * inv_n
        return scale * (g - mean_g - xhat * mean_gx)
    scale = (bn.running_var + bn.eps).rsqrt().view(1, 1, -1, 1, 1)
    return g * (scale if weight is None else weight * scale)


def _mask(t: Tensor, g: Tensor) -> Tensor:
    return g * (t > 0).to(g.dtype)


def _unit_vjp(unit: nn.Module, g: Tensor, rec: _Record, cache: dict, summed: bool) -> Tensor:
    """Gradient at ``unit``'s input from ``g`` at its output; with ``summed`` only its spatial sum (n, B, C)."""
    conv_vjp = _conv_vjp_sum if summed else _conv_vjp

    def total(t: Tensor) -> Tensor:
        return t.sum((3, 4)) if summed else t

    if type(unit) is nn.Conv2d:
        return conv_vjp(unit, g, rec.input(unit, values=False).shape[2:])
    if type(unit) is nn.BatchNorm2d:
        return total(_bn_vjp(unit, rec.input(unit), g, cache))
    if type(unit) is nn.ReLU:
        return total(_mask(rec.output(unit), g))
    if type(unit) is nn.Identity:
        return total(g)
    x = rec.input(unit, values=False)
    g = _mask(rec.output(unit), g)
    convs = [unit.conv1, unit.conv2] + ([unit.conv3] if type(unit) is Bottleneck else [])
    bns = [unit.bn1, unit.bn2] + ([unit.bn3] if type(unit) is Bottleneck else [])
    h = g
    for i in range(len(convs) - 1, -1, -1):
        c_in, c_out = rec.input(convs[i], values=i > 0), rec.output(convs[i])
        if rec.input(bns[i], values=False) is not c_out:
            raise _Unsupported("a block's batch norm does not read its convolution")
        h = _bn_vjp(bns[i], c_out, h, cache)
        if i == 0:
            if c_in is not x:
                raise _Unsupported("a block's first convolution does not read the block input")
            h = conv_vjp(convs[i], h, c_in.shape[2:])
        else:
            h = _mask(c_in, _conv_vjp(convs[i], h, c_in.shape[2:]))
    if unit.downsample is not None:
        ds_conv, ds_bn = list(unit.downsample.children())
        d_in, d_out = rec.input(ds_conv, values=False), rec.output(ds_conv)
        if d_in is not x or rec.input(ds_bn, values=False) is not d_out:
            raise _Unsupported("a block's downsample does not read the block input")
        return h + conv_vjp(ds_conv, _bn_vjp(ds_bn, d_out, g, cache), x.shape[2:])
    return h + total(g)


def _chain_output(units: Sequence[nn.Module], rec: _Record, activations: Tensor) -> Tensor:
    """The last unit's recorded output, after checking that each unit read the one before (the first: the CAM
    layer's output)."""
    if not units:
        return activations
    if rec.input(units[0], values=False) is not activations:
        raise _Unsupported("the tail does not read the CAM layer's output")
    for a, b in zip(units, units[1:], strict=False):
        if rec.input(b, values=False) is not rec.output(a, values=False):
            raise _Unsupported(f"a {type(b).__name__} does not read the {type(a).__name__} before it")
    return rec.output(units[-1], values=False)


def tail_output(modules: Sequence[nn.Module], rec: _Record, activations: Tensor) -> Tensor | None:
    """The feature map at the end of the tail ``modules`` in the recorded pass (``activations`` for an empty
    tail), or None when the recorded units do not form that chain. The caller checks that it feeds the head."""
    try:
        return _chain_output(_units(modules), rec, activations)
    except _Unsupported:
        return None


def tail_alphas(
    modules: Sequence[nn.Module],
    rec: _Record,
    activations: Tensor,
    queries: Sequence[tuple[nn.Linear, Tensor]],
    *,
    create_graph: bool,
    spatial_mean: bool = True,
) -> Tensor | None:
    """Grad-CAM weights ``alpha`` (n_queries, B, K) at ``activations`` for each (head, per-sample target) query.

    ``modules`` read ``activations`` and feed, after global average pooling, every query's head; all queries go
    through them in one batched pass. Returns ``None`` when the recorded forward pass does not match the walker's
    expectations (the caller then uses autograd). ``spatial_mean=False`` returns the whole gradient map
    (n_queries, B, K, h, w) instead of its spatial mean (what the other CAM variants need; the last convolution
    then computes the full map).
    """
    units = _units(modules)
    try:
        last = _chain_output(units, rec, activations)
        if last.dim() != 4 or any(last.shape[1] != head.in_features for head, _ in queries):
            raise _Unsupported("the last feature map does not feed the heads")
        with torch.set_grad_enabled(create_graph):
            h, w = last.shape[2:]
            # index_select: its backward is deterministic on a multi-threaded CPU, weight[t]'s is not
            rows = torch.stack([head.weight.index_select(0, t) for head, t in queries]) / (h * w)  # (n, B, D)
            g = rows[:, :, :, None, None].expand(-1, -1, -1, h, w)
            if not units:
                return g.sum((3, 4)) / (h * w) if spatial_mean else g
            cache: dict[int, tuple[Tensor, Tensor]] = {}
            for j, unit in enumerate(reversed(units)):
                g = _unit_vjp(unit, g, rec, cache, summed=spatial_mean and j == len(units) - 1)
            return g / (activations.shape[2] * activations.shape[3]) if spatial_mean else g
    except _Unsupported:
        return None
