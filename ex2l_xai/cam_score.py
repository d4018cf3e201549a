"""Score-CAM (Wang et al. 2020), for the audit: no gradients, batched over channels.

With ``A`` the layer's output (B, K, h, w) and ``x`` the input (B, C, H, W), as pytorch-grad-cam 1.5.7 defines it:

    M_k = minmax(up(A_k))             up: bilinear to (H, W) with aligned corners; minmax: (M - min) / (max - min + 1e-8)
    s_k = forward_fn(x * M_k)[target]  the target logit of the input masked by channel k's map
    CAM = ReLU(sum_k softmax_k(s)_k A_k)   -> (B, h, w), unnormalised, at the layer's resolution

It costs one forward pass per channel and image; they run ``batch_size`` masked images at a time, each mask
upsampled only when its batch needs it (memory stays at one batch, whatever K).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ex2l_xai.cam import Target, _as_target, capture_activations
from ex2l_xai.cam_layers import Reshape, auto_reshape
from ex2l_xai.errors import Ex2lError

#: pytorch-grad-cam's constant in the masks' min-max scaling
SCORE_CAM_EPS = 1e-8

__all__ = ["channel_masks", "score_cam"]


def channel_masks(activations: Tensor, size: tuple[int, int]) -> Tensor:
    """Score-CAM's masks of maps (n, h, w): each upsampled to ``size`` (bilinear, aligned corners) and min-max
    scaled to [0, 1] on its own -> (n, H, W)."""
    up = F.interpolate(activations[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    flat = up.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return (up - lo) / (hi - lo + SCORE_CAM_EPS)


def score_cam(
    forward_fn: Callable[[Tensor], Tensor],
    layer: nn.Module,
    inputs: Tensor,
    target: Target,
    *,
    batch_size: int = 64,
    relu: bool = True,
    reshape: Reshape | None = None,
) -> Tensor:
    """Score-CAM of ``forward_fn(inputs)[:, target]`` at ``layer`` -> (B, h, w), without gradients.

    ``forward_fn`` maps inputs (B, C, H, W) to logits (B, n_classes) and is called once on ``inputs`` (to record
    the layer) and then on ``B * K`` masked inputs, ``batch_size`` at a time. ``reshape`` as in
    :func:`~ex2l_xai.cam.grad_cam` (tokens and channels-last maps by default). The model's train/eval mode is left
    as it is (put it in eval mode for an audit).
    """
    if inputs.dim() != 4:
        raise Ex2lError(f"inputs: Score-CAM masks images (B, C, H, W), got shape {tuple(inputs.shape)}")
    if batch_size < 1:
        raise Ex2lError(f"batch_size: expected >= 1, got {batch_size}")
    t = _as_target(target, inputs.shape[0], inputs.device)
    with torch.no_grad():
        with capture_activations([layer]) as store:
            logits = forward_fn(inputs)
        if store[0] is None:
            raise Ex2lError(f"layer {type(layer).__name__} was not called by forward_fn")
        if int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
            raise Ex2lError(f"target: class indices must lie in [0, {logits.shape[1]}), got {t.tolist()}")
        acts = (reshape if reshape is not None else auto_reshape(forward_fn, layer))(store[0].detach())
        if acts.dim() != 4:
            raise Ex2lError(f"layer output: expected a map (B, K, h, w) after reshape, got {tuple(acts.shape)}")
        n, k = acts.shape[:2]
        flat = acts.reshape(n * k, *acts.shape[2:])
        scores = torch.empty(n * k, dtype=logits.dtype, device=inputs.device)
        for start in range(0, n * k, batch_size):
            idx = torch.arange(start, min(start + batch_size, n * k), device=inputs.device)
            image = idx // k
            masks = channel_masks(flat[idx], tuple(inputs.shape[-2:]))
            out = forward_fn(inputs[image] * masks[:, None].to(inputs.dtype))
            scores[idx] = out.gather(1, t[image][:, None])[:, 0]
        weights = torch.softmax(scores.view(n, k), dim=1)
        cam = (weights[:, :, None, None] * acts).sum(1)
    return F.relu(cam) if relu else cam
