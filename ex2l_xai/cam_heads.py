"""Run-time proof that a feature map feeds global average pooling and a linear head, and the closed-form
Grad-CAM that proof allows.

If a head's logits are ``s = W · mean_{h,w}(A) + b`` for the feature map ``A`` (B, K, h, w), then
``ds_t / dA_k(p) = W[t, k] / (h w)`` at every position ``p``, so Grad-CAM's weights are ``alpha_k = W[t, k] / (h w)``
and ``CAM = ReLU(sum_k alpha_k A_k)``: no gradient has to be computed, and the CAM is differentiable in ``A`` and
``W`` by construction (a penalty on it costs one weighted sum).

That formula is taken only when the forward pass that produced the logits shows it holds, never because a model
says so. :class:`HeadProbe` hooks every ``nn.Linear`` of the model; :meth:`HeadProbe.linear_after_pool` then checks
that the logits ARE the output of one of those calls (tensor identity, unchanged since: version counters), and
walks the autograd graph of that call's input back to ``A``: only reshaping views (a flatten) and one global mean
over the spatial axes (``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(., 1)`` and ``.mean((2, 3))`` all
record it) may lie between, and the mean must read ``A`` itself. A dropout in training mode, an MLP head, a scaled
or shifted latent, a pooling of another map, a max pooling: any of them breaks the walk, the probe answers None and
the caller uses autograd.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["HeadProbe", "closed_form_alphas", "probe_heads"]


_VIEWS = {"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "SqueezeBackward0", "SqueezeBackward1",
          "SqueezeBackward2", "SqueezeBackward3", "UnsqueezeBackward0", "AliasBackward0"}


def _reads(node: Any, features: Tensor) -> bool:
    """Whether autograd node ``node``'s first input is ``features`` (its grad_fn, or its AccumulateGrad leaf)."""
    nxt = node.next_functions[0][0] if node.next_functions else None
    if nxt is None:
        return False
    if features.grad_fn is not None:
        return nxt is features.grad_fn
    return type(nxt).__name__ == "AccumulateGrad" and nxt.variable is features


def _global_mean_of(x: Tensor, features: Tensor) -> bool:
    """Whether ``x`` (B, K) is, in the autograd graph, a reshaped spatial mean of ``features`` (B, K, h, w)."""
    b, k = features.shape[:2]
    if tuple(x.shape) != (b, k) or x.grad_fn is None:
        return False
    node = x.grad_fn
    while type(node).__name__ in _VIEWS:
        node = node.next_functions[0][0]
        if node is None:
            return False
    name = type(node).__name__
    if name == "MeanBackward1":
        # negative dims come back as unsigned 64-bit integers
        spatial = {(int(d) - 2**64 if int(d) >= 2**63 else int(d)) % features.dim() for d in node._saved_dim}
        if spatial != {2, 3} or tuple(node._saved_self_sym_sizes) != tuple(features.shape):
            return False
    elif name != "AdaptiveAvgPool2DBackward0":
        return False
    return _reads(node, features)


class HeadProbe:
    """(module, input, output, their versions) of every ``nn.Linear`` call in one forward pass."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Linear, Tensor, Tensor, int, int]] = []

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        x = inputs[0] if isinstance(inputs, tuple) and inputs else None
        if isinstance(x, Tensor) and isinstance(output, Tensor):
            self.calls.append((module, x, output, x._version, output._version))  # type: ignore[arg-type]

    def linear_after_pool(self, logits: Tensor, features: Tensor) -> nn.Linear | None:
        """The linear layer ``logits`` came from when ``logits = Linear(flatten(global mean of features))`` held in
        the recorded pass and nothing was modified in place since; else None."""
        if features.dim() != 4:
            return None
        for module, x, out, vx, vout in self.calls:
            if out is not logits:
                continue
            ok = out._version == vout and x._version == vx and module.in_features == features.shape[1]
            return module if ok and _global_mean_of(x, features) else None
        return None


@contextmanager
def probe_heads(model: Any) -> Iterator[HeadProbe | None]:
    """Record the ``nn.Linear`` calls of ``model``'s forward passes inside the block (None when ``model`` is not an
    ``nn.Module``: nothing can be checked, the caller uses autograd). Hooks removed on exit."""
    if not isinstance(model, nn.Module):
        yield None
        return
    probe = HeadProbe()
    handles = [m.register_forward_hook(probe.hook) for m in model.modules() if type(m) is nn.Linear]
    try:
        yield probe
    finally:
        for h in handles:
            h.remove()


def closed_form_alphas(head: nn.Linear, targets: Tensor, hw: int, create_graph: bool) -> Tensor:
    """Grad-CAM weights ``W[target] / (h w)`` (B, K) of a verified pooling + linear head."""
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        # index_select, not weight[targets]: the backward of advanced indexing accumulates with index_put_, which
        # on a multi-threaded CPU adds repeated rows in a varying order (runs were not bit-reproducible)
        rows = head.weight.index_select(0, targets) / hw
    return rows if create_graph else rows.detach()
