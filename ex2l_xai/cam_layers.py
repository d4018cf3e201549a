"""CAM layers of transformers: token outputs turned into feature maps, and the layer a transformer's CAM is taken at.

A CAM needs a feature map (B, C, h, w). Transformer layers give other layouts:

* ViT, DeiT, BEiT, EVA blocks (timm): tokens (B, N, C), the first ``num_prefix_tokens`` of them class, register or
  distillation tokens. :func:`tokens_to_map` drops those and lays the rest out on the patch grid, row-major, as the
  patch embedding flattened them. The count is the model's own ``num_prefix_tokens`` where it declares one
  (timm's ViTs do; so does :class:`~ex2l_xai.models.TwoHeadNet` over a ``vit_tiny`` backbone); else it is
  inferred as ``N - s²`` with ``s = floor(sqrt(N))`` (a square grid).
* Swin (timm >= 0.9): channels-last maps (B, h, w, C), permuted to (B, C, h, w). A 4-D output counts as
  channels-last when the layer is an ``nn.LayerNorm`` (it normalises the last axis) or the model declares
  ``output_fmt == "NHWC"`` (timm's Swin) and the layer is no 2-D convolution or batch norm.

:func:`auto_reshape` picks the rule from the model and the layer; every CAM function takes ``reshape=`` (a callable
from the layer's output to (B, C, h, w)) to override it. The same reshape is applied to the activations and to the
gradient at them (a selection and a permutation of entries, so the gradient of the map is the reshaped gradient).

:func:`transformer_cam_layer` picks a transformer's CAM layer as pytorch-grad-cam advises: the first norm of the
last block (``blocks[-1].norm1`` for ViTs; ``layers[-1].blocks[-1].norm1`` for Swin), whose output every token's
gradient reaches (after the last block only the class token's does, in a class-token model).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from ex2l_xai.errors import Ex2lError

Reshape = Callable[[Tensor], Tensor]
#: at most this many prefix tokens are inferred when a model declares no count (class + register tokens)
MAX_INFERRED_PREFIX = 16

__all__ = [
    "Reshape",
    "auto_reshape",
    "channels_last_to_map",
    "declared_prefix_tokens",
    "tokens_to_map",
    "transformer_cam_layer",
]


def declared_prefix_tokens(model: object) -> int | None:
    """The number of class/register tokens ``model`` declares (``num_prefix_tokens``), or None."""
    n = getattr(model, "num_prefix_tokens", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    s = math.isqrt(n)
    if s * s != n:
        raise Ex2lError(
            f"tokens: {n} patch tokens do not form a square grid; pass reshape= (a callable to (B, C, h, w))"
        )
    return s, s


def tokens_to_map(
    tokens: Tensor, num_prefix_tokens: int | None = None, grid: tuple[int, int] | None = None
) -> Tensor:
    """Tokens (B, N, C) as a map (B, C, h, w): the first ``num_prefix_tokens`` dropped (inferred as ``N - s²``
    when None), the rest laid out row-major on ``grid`` (h, w) (a square grid when None or not matching)."""
    if tokens.dim() != 3:
        raise Ex2lError(f"tokens: expected (B, N, C), got shape {tuple(tokens.shape)}")
    n = tokens.shape[1]
    if num_prefix_tokens is None:
        num_prefix_tokens = n - math.isqrt(n) ** 2
        if num_prefix_tokens > MAX_INFERRED_PREFIX:
            raise Ex2lError(
                f"tokens: cannot tell the prefix tokens of {n} tokens (N - floor(sqrt N)² = {num_prefix_tokens}); "
                "the model declares no num_prefix_tokens: pass reshape="
            )
    if not 0 <= num_prefix_tokens < n:
        raise Ex2lError(f"tokens: num_prefix_tokens={num_prefix_tokens} leaves no patch tokens of {n}")
    patches = tokens[:, num_prefix_tokens:]
    h, w = _grid(patches.shape[1], grid)
    return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)


def channels_last_to_map(x: Tensor) -> Tensor:
    """A channels-last map (B, h, w, C) as (B, C, h, w)."""
    if x.dim() != 4:
        raise Ex2lError(f"channels-last map: expected (B, h, w, C), got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


def _channels_last(model: object, layer: nn.Module) -> bool:
    if type(layer) is nn.LayerNorm:
        return True
    if isinstance(layer, nn.Conv2d | nn.BatchNorm2d):
        return False
    return getattr(model, "output_fmt", None) == "NHWC"


def _patch_grid(model: object) -> tuple[int, int] | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if isinstance(grid, tuple | list) and len(grid) == 2 else None


def auto_reshape(model: object, layer: nn.Module) -> Reshape:
    """The reshape from ``layer``'s output to (B, C, h, w) for a layer of ``model``: tokens (3-D) through
    :func:`tokens_to_map` with the model's declared prefix count, channels-last maps permuted, anything else
    returned as it is (the same tensor object)."""
    prefix = declared_prefix_tokens(model)
    grid = _patch_grid(model)
    last = _channels_last(model, layer)

    def reshape(x: Tensor) -> Tensor:
        if x.dim() == 3:
            return tokens_to_map(x, prefix, grid)
        if x.dim() == 4 and last:
            return channels_last_to_map(x)
        return x

    return reshape


def transformer_cam_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The (name, module) of a transformer's CAM layer: the last block's first norm (pytorch-grad-cam's advice).

    timm ViT/DeiT/BEiT/EVA (a ``blocks`` sequence): ``blocks[-1].norm1``; timm Swin (``layers`` of stages with
    ``blocks``): ``layers[-1].blocks[-1].norm1``. An Ex2lError for a model with neither.
    """
    blocks = getattr(model, "blocks", None)
    prefix = "blocks"
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        layers = getattr(model, "layers", None)
        last = layers[-1] if isinstance(layers, nn.Sequential | nn.ModuleList) and len(layers) else None
        blocks = getattr(last, "blocks", None)
        prefix = f"layers.{len(layers) - 1}.blocks" if layers is not None else ""
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        norm = getattr(blocks[-1], "norm1", None)
        if isinstance(norm, nn.Module):
            return f"{prefix}.{len(blocks) - 1}.norm1", norm
    raise Ex2lError(
        f"{type(model).__name__}: no transformer CAM layer found (expected blocks[-1].norm1 of a ViT or "
        "layers[-1].blocks[-1].norm1 of a Swin); name the layer"
    )
