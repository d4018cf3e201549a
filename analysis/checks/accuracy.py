"""Accuracy: ``avg_acc``, ``worst_group_acc``, ``mean_group_acc``, ``per_group`` of the run's ``results.json`` for
the split (a plain model: ``AuditTarget.metrics`` when given, else computed on the audited sample, which is always
reported as ``sample_metrics``); ``metrics_source`` says which."""

from __future__ import annotations

from analysis.checks.base import Check, CheckContext, register

KEYS = ("avg_acc", "worst_group_acc", "mean_group_acc", "per_group")


@register
class Accuracy(Check):
    """The accuracy metrics of docs/architecture.md's metrics dict ``M``."""

    name = "accuracy"
    order = 70

    def run(self, ctx: CheckContext) -> None:
        from ex2l_xai.metrics import group_metrics

        ext, split = ctx.extraction, ctx.settings.split
        sample = group_metrics(ext.preds, ext.labels, ext.groups, ext.group_names)
        metrics = ctx.target.metrics if ctx.target is not None else None
        source = "given"
        results = ctx.results
        if metrics is None and results is not None and isinstance(results.get(split), dict):
            metrics, source = results[split], "results.json"
        if metrics is None:
            metrics, source = sample, "audit sample"
        ctx.entry.update({k: metrics.get(k) for k in KEYS})
        ctx.entry["metrics_source"] = source
        ctx.entry["sample_metrics"] = sample
        if results is not None:
            ctx.entry["selected_epoch"] = results.get("selected_epoch")

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry.update(dict.fromkeys(KEYS))
        ctx.entry["metrics_source"] = None
