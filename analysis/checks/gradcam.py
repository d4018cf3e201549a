"""The Grad-CAM grids (Figs. 1 and 1b): the label CAMs every model's extraction holds, side by side.

No per-model numbers (the CAMs come from the extraction's one pass; :mod:`analysis.checks.localization` scores
them); the figures show the models audited on the first model's dataset.
"""

from __future__ import annotations

import logging

from analysis.checks.base import Check, FigureContext, register

log = logging.getLogger(__name__)

FILES = {"gradcam_grid": "fig1_gradcam_grid.png", "gradcam_disagreement": "fig1b_gradcam_disagreement.png"}


@register
class GradCam(Check):
    """Figs. 1 and 1b: the label CAM at y (and each confounder head's CAM at c); at ŷ where the models disagree."""

    name = "gradcam"
    files = FILES
    order = 0
    needs = ("cams",)

    def figures(self, fc: FigureContext) -> dict[str, str]:
        from analysis.overlays import gradcam_grid

        audits = [a for a in fc.audits if a.extraction.cams_true is not None]
        if not audits:
            return {}
        same = [a for a in audits if a.dataset_key == audits[0].dataset_key]
        if len(same) < len(fc.audits):
            log.warning("audit: the Grad-CAM grids show only the models audited on %s's dataset",
                        audits[0].entry["name"])
        exts = [a.extraction for a in same]
        s = fc.settings
        out: dict[str, str] = {}
        path, rel = fc.path("gradcam_grid", FILES["gradcam_grid"])
        gradcam_grid(exts, same[0].dataset, path, rule=s.rule, n_rows=s.n_rows, seed=s.seed,
                     show_conf=any(e.cams_conf is not None for e in exts))
        out["gradcam_grid"] = rel
        if len(exts) > 1:
            path, rel = fc.path("gradcam_disagreement", FILES["gradcam_disagreement"])
            gradcam_grid(exts, same[0].dataset, path, rule="disagreement", n_rows=s.n_rows, seed=s.seed, cam="pred",
                         title="Grad-CAM of the label head at the prediction ŷ")
            out["gradcam_disagreement"] = rel
        return out
