"""Localisation of the label CAMs: :func:`analysis.localization.localization_summary` (mass in the object mask and
pointing game where masks exist, overlap with the confounder CAM where there is a confounder head, share of all-zero
CAMs)."""

from __future__ import annotations

from analysis.checks.base import Check, CheckContext, register

KEYS = ("cam_overlap", "cam_in_mask", "zero_cam_share", "pointing_game", "conf_zero_cam_share")


@register
class Localization(Check):
    """``cam_in_mask``, ``pointing_game``, ``cam_overlap``, ``zero_cam_share`` (+ ``localization``: the details)."""

    name = "localization"
    order = 40
    needs = ("cams",)

    def run(self, ctx: CheckContext) -> None:
        from analysis.localization import localization_summary

        ext = ctx.extraction
        loc = localization_summary(ext.cams_true, ext.masks, ext.cams_conf)
        ctx.entry.update({k: loc.get(k) for k in KEYS})
        ctx.entry["localization"] = loc

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry.update(dict.fromkeys(KEYS))
        ctx.entry["localization"] = {"available": False, "reason": reason}
