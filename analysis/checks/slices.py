"""Slice discovery and spuriosity ranking (:mod:`analysis.slices`): ``slices``, ``discovery`` and ``spuriosity``
of the model's entry; the rows of ``slices.csv`` (:func:`slice_rows`); Fig. 6 (the worst slices, exemplars with
their Grad-CAMs, and the embedding coloured by slice) and Fig. 7 (each class's top and bottom images by
spuriosity).

Data without confounders (a bare ``DIR/<class>/<image>`` folder, a CSV without a ``confounder`` column): the
discovered slices take the confounder's place (``discovery.groups`` = ``"slices"``), so the accuracy check's worst
group is the worst slice, the Grad-CAM grid's worst-group rows are slices, and the UMAP is coloured by slice. The
MMD across environments and the leakage probes are skipped with their reason: the slices are clusters of the same
latent, so a probe would recover them, and the latents would differ across them, by construction.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from analysis.checks.base import Check, CheckContext, FigureContext, ReportSection, SkipCheck, register

log = logging.getLogger(__name__)

FILES = {"slices": "fig6_slices.png", "spuriosity": "fig7_spuriosity.png"}
#: Why the confounder checks do not run on discovered slices (recorded as their skip reason).
CIRCULAR = ("the data has no confounder and the slices that replace it are clusters of this latent: {what} would "
            "find them by construction")


def inferred_groups(ctx: CheckContext) -> bool:
    """Whether the model's groups are its discovered slices (the data has no confounder)."""
    return (ctx.entry.get("discovery") or {}).get("groups") == "slices"


def skip_if_inferred(ctx: CheckContext, what: str) -> None:
    """Raise :class:`SkipCheck` for a confounder check on data whose groups are the discovered slices."""
    if inferred_groups(ctx):
        raise SkipCheck(CIRCULAR.format(what=what))


@register
class Slices(Check):
    """Per class, GMM-BIC slices of the latent with the class's decision direction projected out; their accuracy
    gaps; the ground-truth scores where the data has confounders; the spuriosity ranking."""

    name = "slices"
    files = FILES
    order = 15

    def run(self, ctx: CheckContext) -> None:
        from analysis.slices import METHOD, discover_slices, head_weights, score_slices, spuriosity

        ext, s = ctx.extraction, ctx.settings
        if len(ext) < 2:
            raise SkipCheck("fewer than two images")
        weights, r2 = head_weights(ext.latents, ext.logits)
        res = discover_slices(ext.latents, ext.logits, ext.labels, ext.preds, k_max=s.slice_k_max,
                              min_size=s.slice_min_size, dims=s.slice_dims, seed=s.seed, weights=weights)
        names = ext.label_names
        worst_by_class = {}
        for row in res.table:  # ranked worst first
            row["label_name"] = names[row["label"]]
            worst_by_class.setdefault(row["label"], row["slice"])
        has_conf = bool(ext.meta.get("has_confounders", True))
        disc: dict[str, Any] = {
            "method": METHOD, "criterion": "lowest BIC of a diagonal-covariance GaussianMixture",
            "k_range": [1, s.slice_k_max], "k": {names[y]: k for y, k in res.k.items()},
            "space": f"{ctx.entry.get('latent') or 'latent'}, minus the class's direction W[y] - mean_k W[k]",
            "head_r2": r2, "dims": s.slice_dims, "min_size": s.slice_min_size,
            "groups": "confounder" if has_conf else "slices", "worst_slice": res.table[0],
            "worst_slice_acc": res.table[0]["acc"]}
        if has_conf:
            sc = score_slices(res.slices, ext.labels, ext.confounders, ext.preds)
            sc["ari_per_class"] = {names[y]: v for y, v in sc["ari_per_class"].items()}
            sc["nmi_per_class"] = {names[y]: v for y, v in sc["nmi_per_class"].items()}
            disc.update(sc)
        off, base, how = None, {}, "the data has no object masks"
        if ext.masks is not None:
            from analysis.extract import batch_for
            from analysis.slice_maps import off_object_shares

            bs = min(batch_for(s.batch_size, ctx.adapter.device, ext.image_size), 64)
            off, base, how = off_object_shares(ctx.adapter, ctx.dataset, ext, seed=s.seed, batch_size=bs)
        disc["spurious_criterion"] = "|Cohen's d| >= 0.8 between the class's worst slice and the rest" + (
            f", or an off-object share of the feature's activation map above the background's area ({how})"
            if off is not None else f" (no off-object test: {how})")
        disc["off_object_baseline"] = {names[y]: v for y, v in base.items()} or None
        sp = spuriosity(ext.latents, ext.labels, ext.preds, res.slices, weights, worst_by_class,
                        m=s.spurious_features, off_object=off, off_min=base or 0.5)
        ctx.entry["slices"] = res.table
        ctx.entry["discovery"] = disc
        ctx.entry["spuriosity"] = {names[y]: rec for y, rec in sp.classes.items()}
        ctx.entry["spurious_gap"] = _mean_gap(sp.classes)
        ctx.artifacts["slices"], ctx.artifacts["spuriosity"] = res, sp
        if not has_conf:
            _groups_from_slices(ctx, res)

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["slices"] = []
        ctx.entry["discovery"] = {"available": False, "reason": reason}
        ctx.entry["spuriosity"] = {}
        ctx.entry["spurious_gap"] = None

    def figures(self, fc: FigureContext) -> dict[str, str]:
        """Fig. 6 (worst slices + embedding by slice) and Fig. 7 (spuriosity extremes) over every model."""
        from analysis.slice_plots import slice_figure, spuriosity_figure

        done = [a for a in fc.audits if a.artifacts.get("slices") is not None]
        if not done:
            return {}
        out = {}
        path, out["slices"] = fc.path("slices", FILES["slices"])
        slice_figure(done, path, fc.settings)
        if any(r["flagged"] for a in done for r in a.artifacts["spuriosity"].classes.values()):
            path, out["spuriosity"] = fc.path("spuriosity", FILES["spuriosity"])
            spuriosity_figure(done, path)
        return out

    def section(self, data: dict[str, Any]) -> ReportSection | None:
        from analysis.slice_plots import slices_table

        runs = [r for r in data["runs"] if r.get("slices")]
        if not runs:
            return None
        inferred = any((r.get("discovery") or {}).get("groups") == "slices" for r in runs)
        text = ("Per class, the images are clustered in the model's latent with the class's decision direction "
                "projected out (GaussianMixture, k by BIC; k = 1 means no hidden structure). Each row is a slice, "
                "worst accuracy gap to its class first. ARI/NMI: agreement with the true confounder where the data "
                "has one. Spurious gap: accuracy of the top minus the bottom spuriosity quartile.")
        if inferred:
            text += (" This data has no confounder: the worst group, the Grad-CAM grid's groups and the UMAP colours "
                     "are the discovered slices; MMD and the leakage probes are skipped (circular on slices).")
        figs = [(k, c) for k, c in (("slices", "The worst slices: exemplars and their Grad-CAMs; the embedding "
                                     "coloured by slice."),
                                    ("spuriosity", "Each class's most and least spurious images (the mean of the "
                                     "flagged features).")) if k in data.get("figures", {})]
        return ReportSection(id="slices", title="Discovered slices and spuriosity", text=text,
                             table=slices_table(runs), figures=figs)


def _mean_gap(classes: dict[int, dict[str, Any]]) -> float | None:
    gaps = [r["gap"] for r in classes.values() if r["gap"] is not None]
    return float(np.mean(gaps)) if gaps else None


def _groups_from_slices(ctx: CheckContext, res: Any) -> None:
    """The slices take the confounder's (and the environment's) place in the extraction the later checks read."""
    ext = ctx.extraction
    same_env = ctx.env_extraction is ext
    k_max = max(res.k.values())
    ext.confounders = res.slices.astype(np.int64)
    ext.envs = ext.confounders
    ext.confounder_names = [f"slice {i}" for i in range(k_max)]
    ext.env_names = list(ext.confounder_names)
    if not same_env:
        log.warning("audit: %s: the environment analysis's extra data keeps its own environments",
                    ctx.entry.get("name"))


def slice_rows(audit: Any) -> list[dict[str, Any]]:
    """The rows of ``slices.csv`` for one model's audit (``analysis.audit.ModelAudit``): ``model, index, path,
    label, slice, spuriosity`` (+ ``label_name``, ``correct``); none when the check did not run."""
    res, sp = audit.artifacts.get("slices"), audit.artifacts.get("spuriosity")
    if res is None:
        return []
    ext = audit.extraction
    table = getattr(audit.dataset, "table", None)
    paths = table["path"].tolist() if table is not None and "path" in getattr(table, "columns", ()) else None
    rows = []
    for i in range(len(ext)):
        idx = int(ext.indices[i])
        score = float(sp.scores[i]) if sp is not None and np.isfinite(sp.scores[i]) else None
        rows.append({"model": audit.entry["name"], "index": idx, "path": paths[idx] if paths is not None else "",
                     "label": int(ext.labels[i]), "slice": int(res.slices[i]), "spuriosity": score,
                     "label_name": ext.label_names[int(ext.labels[i])], "correct": int(ext.preds[i] == ext.labels[i])})
    return rows
