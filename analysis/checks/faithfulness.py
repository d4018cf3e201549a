"""Faithfulness of the label CAMs (:mod:`analysis.faithfulness`): per CAM variant of ``settings.cam_variants``,
deletion and insertion AUC and ROAD (MoRF, LeRF) of the CAM at the predicted class, on ``faith_samples`` images of
the audited sample, each beside the same metric for a random map and a centre prior; ``faithfulness`` and Fig. 6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from analysis.checks.base import Check, CheckContext, FigureContext, ReportSection, register

FILE = "fig8_faithfulness.png"
METRICS = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")
BASES = ("random", "centre")


def _chunks(fn: Any, n: int, size: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, i + size)) for i in range(0, n, size)])


@register
class Faithfulness(Check):
    """Does the CAM show what the decision uses? (deletion/insertion, Petsiuk et al. 2018; ROAD, Rong et al. 2022)"""

    name = "faithfulness"
    files = {"faithfulness": FILE}
    order = 65

    def disabled(self, settings: Any) -> str | None:
        if not settings.faithfulness:
            return "skipped (faithfulness=False)"
        return None if settings.faith_samples else "skipped (faith_samples=0)"

    def run(self, ctx: CheckContext) -> None:
        from analysis.extract import batch_for
        from analysis.faithfulness import ROAD_PERCENTAGES, centre_maps, faithfulness_maps, random_maps

        s, ad = ctx.settings, ctx.adapter
        rng = np.random.default_rng(s.seed)
        idx = np.sort(rng.permutation(ctx.extraction.indices)[: s.faith_samples])
        x = torch.stack([ctx.dataset[int(i)]["image"] for i in idx]).to(ad.device)
        n, bs = len(idx), batch_for(s.batch_size, ad.device, tuple(x.shape[-2:]))
        was_training = ad.model.training
        ad.model.eval()
        try:
            target = _chunks(lambda sl: ad.logits(x[sl]).argmax(1), n, bs)
            cams = {v: _chunks(lambda sl, v=v: ad.cams(x[sl], target[sl], v), n, bs).cpu() for v in s.cam_variants}
            shape = tuple(next(iter(cams.values())).shape[-2:])
            # the chance maps do not depend on the variant: once per model, in the same forward passes
            maps = {**{("cam", v): m for v, m in cams.items()},
                    ("base", "random"): random_maps(n, shape, s.seed), ("base", "centre"): centre_maps(n, shape)}
            res = faithfulness_maps(ad.logits, x, maps, target, steps=s.faith_steps, baseline=s.faith_baseline,
                                    seed=s.seed)
        finally:
            ad.model.train(was_training)
        bases = {k: res["base", k] for k in BASES}
        out: dict[str, Any] = {}
        for variant in s.cam_variants:
            r = res["cam", variant]
            out[variant] = {**r.summary(), **{k: b.summary() for k, b in bases.items()},
                            "n": n, "steps": s.faith_steps, "baseline": s.faith_baseline,
                            "road_percentages": list(ROAD_PERCENTAGES),
                            "curves": {"fractions": r.fractions.tolist(), "cam": r.curves(),
                                       **{k: b.curves() for k, b in bases.items()}}}
        ctx.entry["faithfulness"] = out
        ctx.artifacts["faithfulness"] = out

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["faithfulness"] = {"available": False, "reason": reason}

    def figures(self, fc: FigureContext) -> dict[str, str]:
        from analysis.plotting import new_figure, save_figure

        done = [(a.entry["name"], a.artifacts["faithfulness"]) for a in fc.audits if "faithfulness" in a.artifacts]
        if not done:
            return {}
        fig = new_figure(8.0, 2.6 * len(done))
        axes = fig.subplots(len(done), 2, squeeze=False)
        for row, (name, per_variant) in zip(axes, done, strict=True):
            for ax, curve, better in ((row[0], "deletion", "lower"), (row[1], "insertion", "higher")):
                first = next(iter(per_variant.values()))["curves"]
                frac = first["fractions"]
                for variant, res in per_variant.items():
                    ax.plot(frac, res["curves"]["cam"][curve], marker="o", ms=3, label=variant)
                ax.plot(frac, first["random"][curve], ls="--", color="0.45", label="random map")
                ax.plot(frac, first["centre"][curve], ls=":", color="0.2", label="centre prior")
                ax.set_title(f"{name}: {curve} (AUC {better} = faithful)", fontsize=9)
                ax.set_xlabel(f"fraction of pixels {'removed' if curve == 'deletion' else 'revealed'}")
                ax.set_ylabel("p(predicted class)")
                ax.set_ylim(-0.02, 1.02)
            row[1].legend(fontsize=7, loc="lower right")
        path, rel = fc.path("faithfulness", FILE)
        save_figure(fig, path)
        return {"faithfulness": rel}

    def section(self, data: dict[str, Any]) -> ReportSection | None:
        from analysis.html import Cell, Table, cell, name_cell, plain_th

        runs = [r for r in data.get("runs", []) if isinstance(r.get("faithfulness"), dict)
                and "available" not in r["faithfulness"]]
        if not runs:
            return None
        heads = [("Deletion AUC", "lower = faithful"), ("Insertion AUC", "higher = faithful"),
                 ("ROAD MoRF", "lower = faithful"), ("ROAD LeRF", "higher = faithful")]
        t = Table([plain_th("Model"), plain_th("CAM variant")] + [plain_th(h, tip) for h, tip in heads])
        for r in runs:
            for variant, res in r["faithfulness"].items():
                row: list[Cell] = [name_cell(r["name"]), Cell(variant)]
                for key in METRICS:
                    sub = " · ".join(f"{b} {res[b][key]:.3f}" for b in BASES if res[b].get(key) is not None)
                    row.append(cell(res.get(key), pct=False, sub=sub))
                t.rows.append(row)
        n = runs[0]["faithfulness"][next(iter(runs[0]["faithfulness"]))]
        text = (f"Pixels removed (deletion) or revealed (insertion) in the CAM's order on {n['n']} images, "
                f"{n['steps']} steps, {n['baseline']} baseline; ROAD imputes the removed pixels from their "
                f"neighbours (noisy linear imputation) at {', '.join(map(str, n['road_percentages']))} %. Each "
                "number is the probability of the predicted class (AUC over the fraction removed, ROAD the mean "
                "over the percentages); below it the same for a random map and a centre prior: a faithful map "
                "beats both.")
        return ReportSection("faithfulness", "Faithfulness of the CAMs", text, t,
                             [("faithfulness", "Deletion and insertion curves per model: each CAM variant against a "
                               "random map and a centre prior.")])
