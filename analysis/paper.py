"""The paper's artefacts from run folders: Fig. 1 (Grad-CAM grid), Figs. 2-3 (UMAP by label/confounder and by
environment) and the results table, with the audit's extraction (:func:`analysis.audit.prepare`) and its
:class:`~analysis.settings.AuditSettings` (``ex2l figures`` and ``figures/fig*.py`` call :func:`paper_figures`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.audit import AuditTarget, Prepared, prepare
from analysis.settings import AuditSettings
from analysis.tables import markdown_table, results_table
from ex2l_xai.errors import Ex2lError
from ex2l_xai.fileio import atomic_write

__all__ = ["ARTEFACTS", "paper_figures"]

ARTEFACTS = {"fig1": "fig1_gradcam_grid.png", "fig2": "fig2_umap.png", "fig3": "fig3_umap_env.png",
             "table": "table_results.md"}


def _fig1(preps: Sequence[Prepared], path: Path, s: AuditSettings, cam: str, show_conf: bool, dpi: int) -> None:
    from analysis.overlays import gradcam_grid

    same = [p for p in preps if p.dataset_key == preps[0].dataset_key]
    gradcam_grid([p.extraction for p in same], same[0].dataset, path, rule=s.rule, n_rows=s.n_rows, seed=s.seed,
                 cam=cam, show_conf=show_conf, dpi=dpi)


def _umaps(preps: Sequence[Prepared], out: Path, which: Sequence[str], s: AuditSettings, dpi: int
           ) -> dict[str, Path]:
    from analysis.embeddings import embed, embedding_figure
    from analysis.mmd import mmd_env

    envs = [p.env_extraction for p in preps]
    embs = [embed(e.latents, seed=s.seed, n_epochs=s.umap_epochs) for e in envs]
    mmds = [mmd_env(e.latents, e.envs, seed=s.seed)["mmd_env"] for e in envs]
    written = {}
    for key, colour_by in (("fig2", ("label", "confounder")), ("fig3", ("env",))):
        if key in which:
            written[key] = out / ARTEFACTS[key]
            embedding_figure(envs, embs, written[key], colour_by=colour_by, mmd=mmds, seed=s.seed, dpi=dpi)
    return written


def paper_figures(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: AuditSettings | None = None,
    *,
    which: Sequence[str] = ("fig1", "fig2", "fig3", "table"),
    cam: str = "true",
    show_conf: bool = False,
    names: Sequence[str] | None = None,
    dpi: int = 130,
    **options: Any,
) -> dict[str, Path]:
    """Regenerate the paper's artefacts from run folders into ``out_dir``: ``fig1_gradcam_grid.png``,
    ``fig2_umap.png``, ``fig3_umap_env.png`` and ``table_results.md``; returns {artefact: path}.

    ``settings`` (or ``options``, its fields as keywords): split, max_samples, seed, device, rule, n_rows,
    umap_epochs. ``cam``: the label CAM at the true label (``true``) or the prediction (``pred``); ``show_conf``:
    add each confounder head's CAM.
    """
    s = (settings or AuditSettings()).replace(**options) if options else settings or AuditSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(which) - set(ARTEFACTS))
    if unknown:
        raise Ex2lError(f"paper_figures: unknown artefact {unknown[0]!r}; expected fig1, fig2, fig3 or table")
    if names is not None and len(names) != len(run_dirs):
        raise Ex2lError(f"paper_figures: {len(names)} names for {len(run_dirs)} runs")
    written: dict[str, Path] = {}
    if "table" in which:
        written["table"] = out / ARTEFACTS["table"]
        atomic_write(written["table"], markdown_table(results_table(run_dirs, s.split), s.split))
    figs = [w for w in which if w != "table"]
    if not figs:
        return written
    cache: dict[str, Any] = {}
    preps = [prepare(AuditTarget(model=r, name=names[i] if names else None), s, cams="fig1" in figs,
                     env=bool({"fig2", "fig3"} & set(figs)), dataset_cache=cache) for i, r in enumerate(run_dirs)]
    if "fig1" in figs:
        written["fig1"] = out / ARTEFACTS["fig1"]
        _fig1(preps, written["fig1"], s, cam, show_conf, dpi)
    if {"fig2", "fig3"} & set(figs):
        written.update(_umaps(preps, out, figs, s, dpi))
    return written
