"""The random-network baseline: the latents of the same architecture at random initialisation, on the same images.

The leakage probes read them (:mod:`analysis.checks.leakage`): textures are decodable even from random features.
A run's baseline is its own initialisation (same config and seed, no pretrained weights); a plain model's is
:func:`analysis.modules.random_copy`. Models whose baselines have the same :meth:`latent fingerprint
<analysis.adapter.ModelAdapter.latent_fingerprint>` (one architecture, one seed: ERM, GroupDRO and eX2L of one
study) share one extraction.
"""

from __future__ import annotations

import torch

from analysis.checks.base import Check, CheckContext, register


@register
class RandomNetwork(Check):
    """Latents of the model's architecture with random weights (``ctx.artifacts["random_latents"]``)."""

    name = "random_network"
    order = 10

    def run(self, ctx: CheckContext) -> None:
        from analysis.extract import extract

        ext, ds = ctx.extraction, ctx.dataset
        baseline = ctx.adapter.random_baseline(ctx.settings.seed, ds)
        baseline.bind(torch.stack([ds[int(i)]["image"] for i in ext.indices[:2]]).to(baseline.device))
        fingerprint = baseline.latent_fingerprint()
        cache = ctx.shared.setdefault("random_latents", {})
        key = None if fingerprint is None else (fingerprint, ctx.dataset_key, ext.indices.tobytes())
        if key is None or key not in cache:
            latents = extract(baseline, ds, indices=ext.indices, cams=False,
                              batch_size=ctx.settings.batch_size).latents
            if key is not None:
                cache[key] = (latents, ctx.entry.get("name"))
            ctx.artifacts["random_latents"] = latents
        else:
            ctx.artifacts["random_latents"], ctx.artifacts["random_shared_with"] = cache[key]
