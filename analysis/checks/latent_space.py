"""Latent space: MMD across environments (``mmd_env``, ``mmd``) and the UMAP figures (Figs. 2 and 3).

The environment analysis reads ``ctx.env_extraction``: the audited split when it holds several environments, else
the run's ``val`` split + the split, every environment capped at the median environment size
(:func:`analysis.audit.prepare`).
"""

from __future__ import annotations

import logging
import time

from analysis.checks.base import Check, CheckContext, FigureContext, register
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

FILES = {"umap": "fig2_umap.png", "umap_env": "fig3_umap_env.png"}


@register
class LatentSpace(Check):
    """``mmd_env`` (:func:`analysis.mmd.mmd_env`) of the latents; UMAP by label/confounder and by environment."""

    name = "latent_space"
    files = FILES
    order = 20

    def run(self, ctx: CheckContext) -> None:
        from analysis.checks.slices import skip_if_inferred
        from analysis.mmd import mmd_env

        skip_if_inferred(ctx, "an MMD across them")
        env_ext = ctx.env_extraction
        mmd = mmd_env(env_ext.latents, env_ext.envs, seed=ctx.settings.seed)
        ctx.entry["mmd_env"] = mmd["mmd_env"]
        ctx.entry["mmd"] = {**mmd, "data": ctx.env_note, "n": len(env_ext),
                            "env_names": {int(e): env_ext.env_names[int(e)] for e in mmd["envs"]}}

    def skip(self, ctx: CheckContext, reason: str) -> None:
        ctx.entry["mmd_env"] = None
        ctx.entry["mmd"] = {"available": False, "reason": reason}

    def figures(self, fc: FigureContext) -> dict[str, str]:
        """Figs. 2 and 3; a labelled PCA (with the reason) when UMAP cannot embed the data."""
        from analysis.embeddings import embed, embedding_figure

        s = fc.settings
        t = time.time()
        env_exts = [a.env_extraction for a in fc.audits]
        method, note = s.embedding, None
        try:
            embeddings = [_reused(a, method) if _reused(a, method) is not None else
                          embed(a.env_extraction.latents, method=method, seed=s.seed, n_epochs=s.umap_epochs,
                                n_neighbors=s.umap_neighbors) for a in fc.audits]
        except Ex2lError as exc:
            if method != "umap":
                raise
            note = f"UMAP failed, PCA shown instead: {exc}"
            log.warning("audit: %s", note)
            method = "pca"
            embeddings = [embed(e.latents, method="pca") for e in env_exts]
        fc.timings["umap"] = time.time() - t
        fc.notes.update(embedding=method, embedding_note=note)
        t = time.time()
        mmds = [a.entry.get("mmd_env") for a in fc.audits]
        out = {}
        for key, colour_by in (("umap", ("label", "confounder")), ("umap_env", ("env",))):
            path, out[key] = fc.path(key, FILES[key])
            embedding_figure(env_exts, embeddings, path, colour_by=colour_by, mmd=mmds, method=method, seed=s.seed)
        fc.timings["umap_figures"] = time.time() - t
        return out


def _reused(audit: object, method: str) -> object:
    """The embedding the slice figure already made of the same extraction with the same method (same call: the
    same numbers), or None (:func:`analysis.slice_plots.embedding_of`)."""
    cached = audit.artifacts.get("embedding")  # type: ignore[attr-defined]
    same = audit.env_extraction is audit.extraction  # type: ignore[attr-defined]
    return cached[1] if same and cached is not None and cached[0] == method else None
