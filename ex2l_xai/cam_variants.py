"""The Grad-CAM family: how a CAM is made from a layer's activations and the target's gradient there.

With ``A`` the layer's output (B, K, h, w), ``g = ds/dA`` the gradient of the target logit ``s`` at it and sums
over the positions ``p`` of the map (the definitions of pytorch-grad-cam 1.5.7, the field's reference):

============  ==========================================================================================
variant       signed map (before the ReLU every variant applies)
============  ==========================================================================================
gradcam       ``sum_k w_k A_k`` with ``w_k = mean_p g_k(p)`` (Selvaraju et al. 2017)
gradcam++     ``sum_k w_k A_k`` with ``w_k = sum_p ReLU(g_k(p)) a_k(p)``,
              ``a_k(p) = g² / (2 g² + S_k g³ + 1e-6)`` (0 where ``g = 0``), ``S_k = sum_p A_k(p)``
              (Chattopadhay et al. 2018, their eq. 19 with exp(s) dropped, as pytorch-grad-cam does)
hirescam      ``sum_k g_k(p) A_k(p)`` (Draelos & Carin 2020): the element-wise product, not averaged
xgradcam      ``sum_k w_k A_k`` with ``w_k = sum_p g_k(p) A_k(p) / (S_k + 1e-7)`` (Fu et al. 2020)
layercam      ``sum_k ReLU(g_k(p)) A_k(p)`` (Jiang et al. 2021)
============  ==========================================================================================

Every formula is written with differentiable tensor operations, so a CAM taken with ``create_graph=True`` can be
a training penalty whatever the variant.

When the layer feeds global average pooling and a linear head (``s = W · mean_p A + b``) the gradient is the
same at every position, ``g_k(p) = W[t, k] / (h w)``, so every variant is a closed form in ``W[t]`` and the
map's channel sums ``S_k``: :func:`constant_gradient` builds that gradient without autograd.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ex2l_xai.errors import Ex2lError

Variant = Literal["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"]
VARIANTS: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
#: the constants of pytorch-grad-cam 1.5.7 (grad_cam_plusplus.py, xgrad_cam.py)
GRADCAM_PP_EPS = 1e-6
XGRADCAM_EPS = 1e-7

__all__ = ["VARIANTS", "Variant", "check_variant", "constant_gradient", "variant_map"]


def check_variant(variant: str) -> str:
    """``variant`` if it names a CAM variant, else an Ex2lError listing them."""
    if variant not in VARIANTS:
        raise Ex2lError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    return variant


def variant_map(activations: Tensor, grads: Tensor, variant: str = "gradcam") -> Tensor:
    """The signed CAM (B, *spatial) of ``variant`` from ``activations`` and ``grads`` (both (B, K, *spatial)).

    No ReLU is applied (the caller does, as Grad-CAM does); see the module docstring for the definitions.
    """
    if activations.shape != grads.shape:
        raise Ex2lError(
            f"variant_map: activations {tuple(activations.shape)} and gradients {tuple(grads.shape)} differ in shape"
        )
    check_variant(variant)
    spatial = tuple(range(2, activations.dim()))
    if variant == "gradcam":
        return (grads.mean(dim=spatial, keepdim=True) * activations).sum(dim=1)
    if variant == "hirescam":
        return (grads * activations).sum(dim=1)
    if variant == "layercam":
        return (F.relu(grads) * activations).sum(dim=1)
    sums = activations.sum(dim=spatial, keepdim=True)
    if variant == "xgradcam":
        weights = (grads * activations / (sums + XGRADCAM_EPS)).sum(dim=spatial, keepdim=True)
    else:  # gradcam++
        g2 = grads * grads
        a = g2 / (2 * g2 + sums * g2 * grads + GRADCAM_PP_EPS)
        a = torch.where(grads != 0, a, torch.zeros_like(a))
        weights = (F.relu(grads) * a).sum(dim=spatial, keepdim=True)
    return (weights * activations).sum(dim=1)


def constant_gradient(rows: Tensor, activations: Tensor) -> Tensor:
    """The gradient at ``activations`` (B, K, h, w) of a pooling + linear head whose Grad-CAM weights are
    ``rows`` (B, K) = ``W[target] / (h w)``: the same value at every position."""
    return rows[:, :, None, None].expand_as(activations)
