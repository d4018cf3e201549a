"""Leakage probes: :func:`analysis.probes.leakage` of the confounder from the latents, from the label logits and from
the random network's latents (:mod:`analysis.checks.random_network`), into ``leakage``."""

from __future__ import annotations

from analysis.checks.base import Check, CheckContext, register

HEADLINE = ("confounder_probe_acc", "chance", "within_label_acc", "within_label_chance", "random_within_label_acc",
            "logit_leak", "logit_leak_overall", "random_confounder_probe_acc", "label_probe_acc")


@register
class Leakage(Check):
    """Cross-validated linear probes (one BLAS thread: small logistic regressions oversubscribe the CPU)."""

    name = "leakage"
    order = 30

    def run(self, ctx: CheckContext) -> None:
        from threadpoolctl import threadpool_limits

        from analysis.checks.slices import skip_if_inferred
        from analysis.probes import leakage

        skip_if_inferred(ctx, "a linear probe")
        ext, s = ctx.extraction, ctx.settings
        with threadpool_limits(limits=1):
            leak = leakage(ext.latents, ext.labels, ext.confounders, logits=ext.logits,
                           random_latents=ctx.artifacts.get("random_latents"), seed=s.seed,
                           max_samples=s.probe_max_samples)
        leak["random_confounder_probe_acc"] = leak["random"]["confounder"]["balanced_acc"] if leak["random"] else None
        leak["label_probe_acc"] = leak["label"]["balanced_acc"]
        ctx.entry["leakage"] = leak

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["leakage"] = {"available": False, "reason": reason, **dict.fromkeys(HEADLINE)}
