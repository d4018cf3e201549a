"""The CAM sanity check (:func:`analysis.sanity.cam_sanity`: cascading randomisation of the label CAMs at the
adapter's CAM layer) on ``sanity_samples`` images in ``sanity_steps`` steps, with its verdict; ``cam_sanity``,
``cam_sanity_passes`` and Fig. 5."""

from __future__ import annotations

from typing import Any

from analysis.checks.base import Check, CheckContext, FigureContext, register

FILE = "fig5_cam_sanity.png"


@register
class CamSanity(Check):
    """Do the CAMs depend on the weights? (Adebayo et al. 2018)"""

    name = "cam_sanity"
    files = {"cam_sanity": FILE}
    order = 60
    needs = ("recomputable_cams",)

    def disabled(self, settings: Any) -> str | None:
        return None if settings.sanity_samples else "skipped (sanity_samples=0)"

    def run(self, ctx: CheckContext) -> None:
        from analysis.sanity import cam_sanity

        s = ctx.settings
        res = cam_sanity(ctx.adapter.model, ctx.dataset, layer=ctx.adapter.layer_path, max_samples=s.sanity_samples,
                         steps=s.sanity_steps, seed=s.seed, device=s.device)
        ctx.entry["cam_sanity"] = {"available": True, **res.summary}
        ctx.entry["cam_sanity_passes"] = res.summary.get("passes")
        ctx.artifacts["cam_sanity"] = res

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["cam_sanity"] = {"available": False, "reason": reason}
        ctx.entry["cam_sanity_passes"] = None

    def figures(self, fc: FigureContext) -> dict[str, str]:
        from analysis.causal_plots import sanity_figure

        done = [(a.entry["name"], a.artifacts["cam_sanity"]) for a in fc.audits if "cam_sanity" in a.artifacts]
        if not done:
            return {}
        path, rel = fc.path("cam_sanity", FILE)
        sanity_figure(done, path)
        return {"cam_sanity": rel}
