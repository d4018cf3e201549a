"""Background swaps (:func:`analysis.interventions.interventions`): the object on its own, the background on its
own, the object on backgrounds of its own class and of random classes; ``interventions`` and ``bg_gap``, and
Fig. 4. "Own-class" backgrounds are those of the run's train split (a plain model: ``AuditTarget.prior`` /
``reference_dataset``, else the audited data)."""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.checks.base import Check, CheckContext, FigureContext, SkipCheck, register

FILE = "fig4_interventions.png"


def _prior(ctx: CheckContext) -> tuple[np.ndarray | None, str]:
    """P(background | label) that defines a class's own backgrounds, and where it came from."""
    from analysis.interventions import background_prior

    target, ext = ctx.target, ctx.extraction
    n_labels, n_conf = len(ext.label_names), len(ext.confounder_names)
    if target is not None and target.prior is not None:
        return np.asarray(target.prior, dtype=np.float64), "given"
    ref = target.reference_dataset if target is not None else None
    source = "reference_dataset"
    if ref is None and ctx.adapter.config is not None:
        ref, source = ctx.run_split("train"), "the run's train split"
    if ref is None:
        return None, "the audited data"
    return background_prior(ref.labels, ref.confounders, n_labels, n_conf), source


@register
class Interventions(Check):
    """The background-swap accuracies, BG-gap and flip rate on ``intervention_samples`` images."""

    name = "interventions"
    files = {"interventions": FILE}
    order = 50

    def disabled(self, settings: Any) -> str | None:
        return None if settings.intervention_samples else "skipped (intervention_samples=0)"

    def run(self, ctx: CheckContext) -> None:
        from analysis.extract import batch_for
        from analysis.interventions import interventions

        s, adapter = ctx.settings, ctx.adapter
        prior, source = _prior(ctx)
        bs = min(batch_for(s.batch_size, adapter.device, ctx.extraction.image_size), 64)
        res = interventions(adapter.model, ctx.dataset, max_samples=s.intervention_samples, prior=prior,
                            seed=s.seed, device=s.device, batch_size=bs,
                            forward_fn=adapter.forward_fn)
        if not res.summary.get("available"):
            raise SkipCheck(res.summary.get("reason", "not available"))
        res.summary["prior_source"] = source
        ctx.entry["interventions"] = res.summary
        ctx.entry["bg_gap"] = res.summary.get("bg_gap")
        ctx.artifacts["interventions"] = res

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["interventions"] = {"available": False, "reason": reason}
        ctx.entry["bg_gap"] = None

    def figures(self, fc: FigureContext) -> dict[str, str]:
        from analysis.causal_plots import intervention_figure

        done = [a for a in fc.audits if a.artifacts.get("interventions") is not None
                and a.artifacts["interventions"].examples]
        if not done:
            return {}
        path, rel = fc.path("interventions", FILE)
        intervention_figure([(a.entry["name"], a.artifacts["interventions"]) for a in done],
                            done[0].extraction.label_names, path)
        return {"interventions": rel}
