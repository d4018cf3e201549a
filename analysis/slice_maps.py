"""Where each latent feature looks, for the spuriosity ranking where the data has object masks: the share of a
feature's activation map that lies outside the object (:func:`off_object_shares`), beside the share a uniform map
would put there (the background's area): a feature is off the object when its share exceeds that baseline.

A latent feature has an activation map only when the latent is the global average pool of the CAM layer (a
ResNet's ``fc`` input and ``layer4``): the pass checks this on the images it reads (the pooled map must equal the
extracted latent) and otherwise returns None with the reason, and the ranking falls back on slice separation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["off_object_shares"]


def _pick(labels: np.ndarray, per_class: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for y in np.unique(labels):
        members = np.flatnonzero(labels == y)
        out[int(y)] = np.sort(rng.choice(members, size=min(per_class, members.size), replace=False))
    return out


def _maps(adapter: Any, dataset: Any, indices: np.ndarray, batch_size: int) -> torch.Tensor | None:
    """The CAM layer's output (N, C, h, w) on the dataset's images ``indices`` (None: not a 4-D map)."""
    layer, out = adapter.layers.label, []
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, o: captured.__setitem__("a", o.detach()))
    try:
        with torch.no_grad():
            for start in range(0, indices.size, batch_size):
                x = torch.stack([dataset[int(i)]["image"] for i in indices[start:start + batch_size]])
                adapter.label_fn()(x.to(adapter.device))
                a = captured.get("a")
                if not isinstance(a, torch.Tensor) or a.dim() != 4:
                    return None
                out.append(a.float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def off_object_shares(adapter: Any, dataset: Any, ext: Any, *, per_class: int = 32, seed: int = 0,
                      batch_size: int = 64) -> tuple[dict[int, np.ndarray] | None, dict[int, float], str]:
    """({class: (D,) share of each feature's positive activation outside the object mask, over up to ``per_class``
    of the class's audited images}, {class: the share a uniform map would put outside, i.e. the mean background
    area of those images}, how it was measured), or (None, {}, why not): no masks, a TorchScript model, a CAM
    layer that is not a channel map, or a latent that is not its global average pool."""
    if ext.masks is None:
        return None, {}, "the data has no object masks"
    if getattr(adapter, "scripted", None) is not None or adapter.forward_fn is not None:
        return None, {}, "the model's CAM layer cannot be hooked (TorchScript or a custom forward_fn)"
    picks = _pick(ext.labels, per_class, seed)
    pos = np.concatenate(list(picks.values()))
    maps = _maps(adapter, dataset, ext.indices[pos], batch_size)
    if maps is None:
        return None, {}, f"the CAM layer {adapter.layer_path} gives no (N, C, h, w) map"
    pooled = maps.mean((2, 3)).numpy()
    latents = ext.latents[pos]
    if pooled.shape != latents.shape or not np.allclose(pooled, latents, rtol=1e-3, atol=1e-4):
        return None, {}, (f"the latent is not the global average pool of {adapter.layer_path}, so its features have no "
                      "activation maps there")
    masks = torch.as_tensor(ext.masks[pos], dtype=torch.float32)[:, None]
    inside = F.interpolate(masks, size=maps.shape[-2:], mode="area")  # the object's share of each map cell
    act = maps.clamp_min(0)
    off = (act * (1 - inside)).sum((2, 3)).numpy()
    total = act.sum((2, 3)).numpy()
    background = (1 - inside).mean((1, 2, 3)).numpy()
    out, base, start = {}, {}, 0
    for y, p in picks.items():
        rows = slice(start, start + p.size)
        t = total[rows].sum(0)
        out[y] = np.where(t > 0, off[rows].sum(0) / np.where(t > 0, t, 1.0), np.nan)
        base[y] = float(background[rows].mean())
        start += p.size
    return out, base, f"activation maps of {adapter.layer_path} vs the object masks ({per_class} images per class at most)"
