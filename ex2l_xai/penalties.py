"""Similarity of CAM batches, for the eX2L penalty and the audit's overlap scores.

``similarity(a, b, kind, norm)`` maps two batches of maps (B, h, w) to one score per sample (B,). Each map is
first normalised on its own (``norm``), then compared (``kind``):

=========  =====================================================================  ===========================
kind       definition (sums over pixels; eps keeps all-zero maps finite)           range for maps >= 0 (any)
=========  =====================================================================  ===========================
dice       soft Dice (Milletari et al. 2016): 2 Σab / (Σa² + Σb² + eps)            [0, 1]   ([-1, 1])
iou        soft Jaccard, quadratic (Tanimoto) form: Σab / (Σa² + Σb² - Σab + eps);  [0, 1]   ([-1/3, 1])
           equals Rahman & Wang's Σab / Σ(a + b - ab) on binary maps
ssim       SSIM (Wang et al. 2004), mean over Gaussian windows, see :func:`ssim`    [-1, 1]
cosine     Σab / sqrt((Σa² + eps)(Σb² + eps))                                       [0, 1]   ([-1, 1])
pearson    cosine of the mean-centred maps                                          [-1, 1]
product    mean over pixels of ab (Singh et al. 2020's overlap of min-max CAMs)      [0, 1] for maps in [0, 1]
=========  =====================================================================  ===========================

Identical maps score 1 under every kind but ``product`` (which gives their mean square; for dice, iou and cosine up
to eps; an all-zero map scores 0 under
dice, iou and cosine, which is what lets ReLU'd CAMs "game" the penalty, see the docs); disjoint non-negative
maps score 0 under dice, iou and cosine.

Norms: ``max`` (divide by the map's max), ``sum`` (divide by its sum), ``minmax`` (subtract the min, divide by
the range), ``softmax`` (spatial softmax of the map; never all-zero) and ``none``. ``max`` and ``sum`` make every
kind invariant to positive scaling of a map. The divisions add ``eps``, so an all-zero map stays all-zero with
finite gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ex2l_xai.errors import Ex2lError

Kind = Literal["dice", "iou", "ssim", "cosine", "pearson", "product"]
Norm = Literal["max", "sum", "minmax", "softmax", "none"]
KINDS: tuple[str, ...] = ("dice", "iou", "ssim", "cosine", "pearson", "product")
NORMS: tuple[str, ...] = ("max", "sum", "minmax", "softmax", "none")
EPS = 1e-8
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

__all__ = ["KINDS", "NORMS", "normalize", "similarity", "ssim"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def normalize(cam: Tensor, norm: Norm = "max", eps: float = EPS) -> Tensor:
    """Normalise each map of a batch (B, h, w) on its own; see the module docstring for the options."""
    if norm == "none":
        return cam
    flat = _flat(cam)
    if norm == "max":
        out = flat / (flat.amax(dim=1, keepdim=True).clamp_min(0) + eps)
    elif norm == "sum":
        out = flat / (flat.sum(dim=1, keepdim=True).clamp_min(0) + eps)
    elif norm == "minmax":
        lo = flat.amin(dim=1, keepdim=True)
        out = (flat - lo) / (flat.amax(dim=1, keepdim=True) - lo + eps)
    elif norm == "softmax":
        out = torch.softmax(flat, dim=1)
    else:
        raise Ex2lError(f"norm: expected one of {NORMS}, got {norm!r}")
    return out.reshape(cam.shape)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: Tensor, b: Tensor, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, data_range: float = 1.0) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of two map batches (B, h, w) -> (B,).

    Local statistics use a Gaussian window (σ = 1.5, size 11, as in the paper), clipped to the largest odd size
    that fits the map, without padding ("valid" windows). On maps smaller than 3 pixels in a side (a 2×2 ResNet
    ``layer4`` map of a 64 px image) one window covers the whole map with uniform weights (global SSIM).
    C1 = (0.01 L)², C2 = (0.03 L)² with L = ``data_range`` (1 for max/minmax-normalised maps).
    """
    if a.shape != b.shape or a.dim() != 3:
        raise Ex2lError(f"ssim: expected two (B, h, w) batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    h, w = a.shape[1:]
    k = min(window, h, w)
    k = k if k % 2 == 1 else k - 1
    if k < 3:
        fa, fb = _flat(a), _flat(b)
        mu_a, mu_b = fa.mean(1), fb.mean(1)
        va = ((fa - mu_a[:, None]) ** 2).mean(1)
        vb = ((fb - mu_b[:, None]) ** 2).mean(1)
        cov = ((fa - mu_a[:, None]) * (fb - mu_b[:, None])).mean(1)
    else:
        win = _gaussian_window(k, sigma, a.dtype, a.device)
        x, y = a[:, None], b[:, None]
        mu_a, mu_b = F.conv2d(x, win), F.conv2d(y, win)
        va = F.conv2d(x * x, win) - mu_a**2
        vb = F.conv2d(y * y, win) - mu_b**2
        cov = F.conv2d(x * y, win) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.reshape(s.shape[0], -1).mean(1)


def similarity(a: Tensor, b: Tensor, kind: Kind = "dice", norm: Norm = "max", eps: float = EPS) -> Tensor:
    """Similarity of two CAM batches (B, h, w) -> (B,), after normalising each map with ``norm``.

    See the module docstring for the definitions and ranges. All-zero maps give finite values and gradients.
    """
    if a.shape != b.shape:
        raise Ex2lError(f"similarity: the two CAM batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 3:
        raise Ex2lError(f"similarity: expected CAM batches of shape (B, h, w), got {tuple(a.shape)}")
    if kind not in KINDS:
        raise Ex2lError(f"kind: expected one of {KINDS}, got {kind!r}")
    a, b = normalize(a, norm, eps), normalize(b, norm, eps)
    if kind == "ssim":
        return ssim(a, b)
    fa, fb = _flat(a), _flat(b)
    if kind == "pearson":
        fa = fa - fa.mean(1, keepdim=True)
        fb = fb - fb.mean(1, keepdim=True)
    ab = (fa * fb).sum(1)
    if kind == "product":
        return ab / fa.shape[1]
    aa = (fa * fa).sum(1)
    bb = (fb * fb).sum(1)
    if kind == "dice":
        return 2 * ab / (aa + bb + eps)
    if kind == "iou":
        return ab / (aa + bb - ab + eps)
    return ab / torch.sqrt((aa + eps) * (bb + eps))

