"""The audit report: ``audit(runs_or_models, out_dir)`` writes the audit contract of docs/architecture.md.

::

    out_dir/
      report.html     self-contained (figures embedded as base64 PNG; no external CSS, JS or fonts)
      audit.json      {"runs": [one entry per model: mmd_env, leakage, cam_overlap, cam_in_mask, zero_cam_share,
                                 pointing_game, avg_acc, worst_group_acc, mean_group_acc, per_group,
                                 interventions, bg_gap, cam_sanity, ...], ...}
      figures/        fig1_gradcam_grid.png, fig1b_gradcam_disagreement.png, fig2_umap.png, fig3_umap_env.png,
                      fig4_interventions.png, fig5_cam_sanity.png

This module orchestrates: each model's numbers come from :func:`analysis.audit.audit_one`, the figures from
:mod:`analysis.overlays`, :mod:`analysis.embeddings` and :mod:`analysis.causal_plots`, the HTML from
:func:`analysis.html.render_html` (a jinja2 template). Every file is written atomically
(:mod:`ex2l_xai.fileio`). ``ex2l audit`` is the command-line form; :func:`demo_report` is what ``ex2l demo`` calls
at its end.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.audit import AuditTarget, ModelAudit, audit_one, jsonable
from analysis.html import render_html
from ex2l_xai.errors import Ex2lError
from ex2l_xai.fileio import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["AUDIT_VERSION", "AuditTarget", "DEMO_SETTINGS", "FIGURES", "audit", "demo_report", "render_html"]

AUDIT_VERSION = 1
FIGURES = {
    "gradcam_grid": "fig1_gradcam_grid.png",
    "gradcam_disagreement": "fig1b_gradcam_disagreement.png",
    "umap": "fig2_umap.png",
    "umap_env": "fig3_umap_env.png",
    "interventions": "fig4_interventions.png",
    "cam_sanity": "fig5_cam_sanity.png",
}
#: Settings of the report ``ex2l demo`` writes (fast: subsamples, fewer UMAP epochs, a short sanity cascade).
DEMO_SETTINGS: dict[str, Any] = {"max_samples": 480, "umap_epochs": 200, "intervention_samples": 64,
                                 "sanity_samples": 16, "sanity_steps": 4}


def _unique_names(audits: Sequence[ModelAudit]) -> None:
    names = [a.entry["name"] for a in audits]
    for i, a in enumerate(audits):
        if names.count(names[i]) > 1:
            src = a.entry.get("source", "")
            suffix = Path(src).name if src and not src.startswith("python object") else str(i + 1)
            a.entry["name"] = f"{names[i]} ({suffix})"
        a.extraction.name = a.entry["name"]
        a.env_extraction.name = a.entry["name"]


def _models(runs_or_models: Any, names: Sequence[str] | None, dataset: Any, layer: Any) -> list[Any]:
    items = list(runs_or_models) if isinstance(runs_or_models, (list, tuple)) else [runs_or_models]
    if not items:
        raise Ex2lError("audit: expected at least one run folder or model")
    if names is not None:
        if len(names) != len(items):
            raise Ex2lError(f"audit: {len(names)} names for {len(items)} models")
        items = [i if isinstance(i, AuditTarget) else AuditTarget(model=i, dataset=dataset, layer=layer)
                 for i in items]
        for item, name in zip(items, names, strict=True):
            item.name = name
    return items


def _gradcam_figures(audits: Sequence[ModelAudit], fig_dir: Path, rule: str, n_rows: int, seed: int
                     ) -> dict[str, str]:
    """Figs. 1 and 1b for the models audited on the first model's dataset."""
    from analysis.overlays import gradcam_grid

    same = [a for a in audits if a.dataset_key == audits[0].dataset_key]
    if len(same) < len(audits):
        log.warning("audit: the Grad-CAM grids show only the models audited on %s's dataset", audits[0].entry["name"])
    exts = [a.extraction for a in same]
    figures = {}
    gradcam_grid(exts, same[0].dataset, fig_dir / FIGURES["gradcam_grid"], rule=rule, n_rows=n_rows, seed=seed,
                 show_conf=any(e.cams_conf is not None for e in exts))
    figures["gradcam_grid"] = f"figures/{FIGURES['gradcam_grid']}"
    if len(exts) > 1:
        gradcam_grid(exts, same[0].dataset, fig_dir / FIGURES["gradcam_disagreement"], rule="disagreement",
                     n_rows=n_rows, seed=seed, cam="pred", title="Grad-CAM of the label head at the prediction ŷ")
        figures["gradcam_disagreement"] = f"figures/{FIGURES['gradcam_disagreement']}"
    return figures


def _embedding_figures(audits: Sequence[ModelAudit], fig_dir: Path, embedding: str, seed: int,
                       umap_epochs: int | None, umap_neighbors: int, timings: dict[str, float]
                       ) -> tuple[dict[str, str], str, str | None]:
    """Figs. 2 and 3; falls back to a labelled PCA (with the reason) when UMAP cannot embed the data."""
    from analysis.embeddings import embed, embedding_figure

    t = time.time()
    env_exts = [a.env_extraction for a in audits]
    note = None
    try:
        embeddings = [embed(e.latents, method=embedding, seed=seed, n_epochs=umap_epochs,
                            n_neighbors=umap_neighbors) for e in env_exts]
    except Ex2lError as exc:
        if embedding != "umap":
            raise
        note = f"UMAP failed, PCA shown instead: {exc}"
        log.warning("audit: %s", note)
        embedding = "pca"
        embeddings = [embed(e.latents, method="pca") for e in env_exts]
    timings["umap"] = time.time() - t
    t = time.time()
    mmds = [a.entry["mmd_env"] for a in audits]
    embedding_figure(env_exts, embeddings, fig_dir / FIGURES["umap"], colour_by=("label", "confounder"),
                     mmd=mmds, method=embedding, seed=seed)
    embedding_figure(env_exts, embeddings, fig_dir / FIGURES["umap_env"], colour_by=("env",), mmd=mmds,
                     method=embedding, seed=seed)
    timings["umap_figures"] = time.time() - t
    return {k: f"figures/{FIGURES[k]}" for k in ("umap", "umap_env")}, embedding, note


def _causal_figures(audits: Sequence[ModelAudit], fig_dir: Path) -> dict[str, str]:
    """Figs. 4 (background swaps) and 5 (CAM sanity check), when the checks ran."""
    from analysis.causal_plots import intervention_figure, sanity_figure

    figures = {}
    ivs = [(a.entry["name"], a.interventions) for a in audits
           if a.interventions is not None and a.interventions.examples]
    if ivs:
        first = next(a for a in audits if a.interventions is not None and a.interventions.examples)
        intervention_figure(ivs, first.extraction.label_names, fig_dir / FIGURES["interventions"])
        figures["interventions"] = f"figures/{FIGURES['interventions']}"
    sans = [(a.entry["name"], a.sanity) for a in audits if a.sanity is not None]
    if sans:
        sanity_figure(sans, fig_dir / FIGURES["cam_sanity"])
        figures["cam_sanity"] = f"figures/{FIGURES['cam_sanity']}"
    return figures


def audit(
    runs_or_models: Sequence[AuditTarget | Any] | AuditTarget | Any,
    out_dir: str | os.PathLike[str],
    *,
    split: str = "test",
    max_samples: int | None = 2000,
    seed: int = 0,
    names: Sequence[str] | None = None,
    dataset: Any = None,
    layer: Any = None,
    device: str | None = None,
    rule: str = "worst_groups",
    n_rows: int = 6,
    umap_epochs: int | None = None,
    umap_neighbors: int = 15,
    embedding: str = "umap",
    reference: int | str = 0,
    intervention_samples: int | None = 240,
    sanity_samples: int | None = 32,
    sanity_steps: int = 5,
    quiet: bool = False,
) -> dict[str, Any]:
    """Audit models for spurious reliance and write ``report.html``, ``audit.json`` and ``figures/`` to ``out_dir``.

    Parameters
    ----------
    runs_or_models : run folders (written by ``ex2l train``), torch classifiers (with ``dataset=`` and
        optionally ``layer=``), or :class:`~analysis.audit.AuditTarget` objects; one item or a list.
    out_dir : output folder (created).
    split : the split of each run's dataset to audit (``test`` by default).
    max_samples : seeded, group-stratified subsample of the split (None = all samples).
    seed : seed of the subsample, probes, UMAP, row selection, background draws and re-initialisations.
    names : display names (default: the run's algorithm, e.g. ERM, or the model's class name).
    dataset, layer : for plain torch models (see :func:`analysis.extract.extract`).
    device : where to run the models (default: cpu for run folders, the model's device for modules).
    rule, n_rows : how the rows of the Grad-CAM grid are chosen (see :func:`analysis.overlays.select_rows`).
    umap_epochs, umap_neighbors, embedding : UMAP options (``embedding="pca"`` for a PCA, labelled as such).
    reference : the model the gaming warnings compare with (index or name; default the first, e.g. ERM).
    intervention_samples : images for the background swaps (:mod:`analysis.interventions`; 0 = skip).
    sanity_samples, sanity_steps : images and cascade steps of the CAM sanity check (:mod:`analysis.sanity`;
        0 samples = skip).
    quiet : no progress bar.

    Returns
    -------
    dict
        The content of ``audit.json`` plus ``"report"``: the path of ``report.html``.
    """
    from tqdm.auto import tqdm

    from analysis.localization import gaming_warnings

    start = time.time()
    items = _models(runs_or_models, names, dataset, layer)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    cache: dict[str, Any] = {}
    audits: list[ModelAudit] = []
    bar = tqdm(items, desc="audit", disable=quiet or not sys.stderr.isatty(), leave=False)
    for item in bar:
        log.info("audit: %s", getattr(item, "name", None) or item)
        audits.append(audit_one(item, split=split, max_samples=max_samples, seed=seed, device=device,
                                dataset_cache=cache, dataset=dataset, layer=layer,
                                intervention_samples=intervention_samples, sanity_samples=sanity_samples,
                                sanity_steps=sanity_steps))
    bar.close()
    _unique_names(audits)
    timings: dict[str, float] = {"models": time.time() - start}

    t = time.time()
    figures = _gradcam_figures(audits, fig_dir, rule, n_rows, seed)
    timings["gradcam_figures"] = time.time() - t
    emb_figures, embedding, embedding_note = _embedding_figures(audits, fig_dir, embedding, seed, umap_epochs,
                                                                umap_neighbors, timings)
    figures.update(emb_figures)
    t = time.time()
    figures.update(_causal_figures(audits, fig_dir))
    timings["causal_figures"] = time.time() - t

    rows = [{"name": a.entry["name"], "cam_in_mask": a.entry["cam_in_mask"],
             "logit_leak": a.entry["leakage"]["logit_leak"]} for a in audits]
    if isinstance(reference, str) and reference not in [r["name"] for r in rows]:
        raise Ex2lError(f"audit: reference {reference!r} is not one of the models "
                        f"({', '.join(r['name'] for r in rows)})")
    warnings_out = gaming_warnings(rows, reference=reference)
    ref_name = rows[reference]["name"] if isinstance(reference, int) else reference
    for a in audits:
        e = a.extraction
        a.entry["mask_area"] = float(e.masks.mean()) if e.masks is not None else None
    timings["total"] = time.time() - start
    data: dict[str, Any] = jsonable({
        "version": AUDIT_VERSION,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "split": split,
        "max_samples": max_samples,
        "seed": seed,
        "reference": ref_name,
        "runs": [a.entry for a in audits],
        "warnings": warnings_out,
        "figures": figures,
        "settings": {"rule": rule, "n_rows": n_rows, "embedding": embedding, "umap_epochs": umap_epochs,
                     "umap_neighbors": umap_neighbors, "embedding_note": embedding_note,
                     "intervention_samples": intervention_samples, "sanity_samples": sanity_samples,
                     "sanity_steps": sanity_steps},
        "seconds": timings,
    })
    atomic_write_json(out / "audit.json", data)
    images = {k: (out / v).read_bytes() for k, v in figures.items()}
    atomic_write(out / "report.html", render_html(data, images))
    log.info("audit: wrote %s in %.1f s", out / "report.html", time.time() - start)
    return {**data, "report": str(out / "report.html")}


def demo_report(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                quiet: bool = True) -> Path:
    """The report ``ex2l demo`` writes for its runs (ERM first: the reference); returns the HTML path.

    Like the demo's training, it is skipped when already done: when ``out`` holds a report of the same runs
    with the same settings, written after every run finished (delete ``out`` to rebuild it)."""
    out = Path(out)
    runs = [Path(r) for r in run_dirs]
    html_path, json_path = out / "report.html", out / "audit.json"
    if html_path.is_file() and json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
            same = [r.get("source") for r in data.get("runs", [])] == [str(r) for r in runs]
            newer = all(json_path.stat().st_mtime >= (r / "done").stat().st_mtime for r in runs)
            settings = data.get("settings") or {}
            unchanged = data.get("max_samples") == DEMO_SETTINGS["max_samples"] and all(
                settings.get(k) == DEMO_SETTINGS[k] for k in ("intervention_samples", "sanity_samples",
                                                              "sanity_steps"))
            if same and newer and unchanged:
                log.info("demo: the audit report in %s is up to date; skipped", out)
                return html_path
        except (OSError, json.JSONDecodeError):
            pass
    res = audit(runs, out, quiet=quiet, **DEMO_SETTINGS)
    return Path(res["report"])
