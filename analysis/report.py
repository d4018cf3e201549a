"""The audit report: ``audit(runs_or_models, out_dir)`` writes the audit contract of docs/architecture.md.

::

    out_dir/
      report.html     self-contained (figures embedded as base64 PNG; no external CSS, JS or fonts)
      audit.json      {"runs": [one entry per model: mmd_env, leakage, cam_overlap, cam_in_mask, zero_cam_share,
                                 pointing_game, avg_acc, worst_group_acc, mean_group_acc, per_group,
                                 interventions, bg_gap, cam_sanity, slices, discovery, spuriosity, ...], ...}
      slices.csv      one row per audited image and model: model, index, path, label, slice, spuriosity
      figures/        fig1_gradcam_grid.png, fig1b_gradcam_disagreement.png, fig2_umap.png, fig3_umap_env.png,
                      fig4_interventions.png, fig5_cam_sanity.png, fig6_slices.png, fig7_spuriosity.png

This module orchestrates: each model's numbers come from :func:`analysis.audit.audit_one` (the checks of
:mod:`analysis.checks`, run by one loop), the figures from each check's ``figures`` over all models, the HTML from
:func:`analysis.html.render_html` (a jinja2 template; a check may add a section of its own). Every option is a
field of :class:`~analysis.settings.AuditSettings`; ``audit.json``'s ``settings`` is its dump. Every file is written atomically
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
from analysis.checks import Check, FigureContext, figure_files, resolve_checks
from analysis.html import render_html
from analysis.settings import DEMO, AuditSettings
from ex2l_xai.errors import Ex2lError
from ex2l_xai.fileio import atomic_write, atomic_write_json
from ex2l_xai.runfiles import RunFiles

log = logging.getLogger(__name__)

__all__ = ["AUDIT_VERSION", "AuditSettings", "AuditTarget", "DEMO_SETTINGS", "FIGURES", "audit", "demo_report",
           "render_html"]

AUDIT_VERSION = 1
#: The figure files of the registered checks, by figure key (each check declares its own: ``Check.files``).
FIGURES = figure_files()
#: The options of the report ``ex2l demo`` writes that differ from the defaults (:data:`analysis.settings.DEMO`).
DEMO_SETTINGS: dict[str, Any] = {k: v for k, v in DEMO.dump().items() if v != AuditSettings().dump()[k]}


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


def _audit_models(items: Sequence[Any], settings: AuditSettings, checks: list[Check], dataset: Any, layer: Any,
                  quiet: bool) -> list[ModelAudit]:
    """:func:`~analysis.audit.audit_one` of every item, sharing the run datasets and the random baselines."""
    from tqdm.auto import tqdm

    cache: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    audits = []
    bar = tqdm(items, desc="audit", disable=quiet or not sys.stderr.isatty(), leave=False)
    for item in bar:
        log.info("audit: %s", getattr(item, "name", None) or item)
        audits.append(audit_one(item, settings, checks=checks, dataset_cache=cache, shared=shared, dataset=dataset,
                                layer=layer))
    bar.close()
    _unique_names(audits)
    return audits


def _warnings(audits: Sequence[ModelAudit], reference: int | str) -> tuple[list[str], str]:
    """The gaming warnings (:func:`analysis.localization.gaming_warnings`) and the reference model's name."""
    from analysis.localization import gaming_warnings

    rows = [{"name": a.entry["name"], "cam_in_mask": a.entry.get("cam_in_mask"),
             "logit_leak": (a.entry.get("leakage") or {}).get("logit_leak")} for a in audits]
    if isinstance(reference, str) and reference not in [r["name"] for r in rows]:
        raise Ex2lError(f"audit: reference {reference!r} is not one of the models "
                        f"({', '.join(r['name'] for r in rows)})")
    ref_name = rows[reference]["name"] if isinstance(reference, int) else reference
    return gaming_warnings(rows, reference=reference), ref_name


def _figures(checks: Sequence[Check], fc: FigureContext) -> dict[str, str]:
    """Every check's figures over all models (timed per check: ``<check>_figures``)."""
    figures: dict[str, str] = {}
    for check in checks:
        t = time.time()
        drawn = check.figures(fc)
        if drawn:
            figures.update(drawn)
            fc.timings[f"{check.name}_figures"] = time.time() - t
    return figures


def audit(
    runs_or_models: Sequence[AuditTarget | Any] | AuditTarget | Any,
    out_dir: str | os.PathLike[str],
    settings: AuditSettings | None = None,
    *,
    names: Sequence[str] | None = None,
    dataset: Any = None,
    layer: Any = None,
    checks: Sequence[Check | str] | None = None,
    quiet: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Audit models for spurious reliance and write ``report.html``, ``audit.json`` and ``figures/`` to ``out_dir``.

    Parameters
    ----------
    runs_or_models : run folders (written by ``ex2l train``), torch classifiers (with ``dataset=`` and
        optionally ``layer=``), or :class:`~analysis.audit.AuditTarget` objects; one item or a list.
    out_dir : output folder (created).
    settings : every option of the audit (:class:`~analysis.settings.AuditSettings`: split, subsample sizes, seed,
        device, the Grad-CAM grid's rows, UMAP, the reference of the gaming warnings, the background swaps and
        the sanity check); ``options`` (the same names as keywords, e.g. ``max_samples=None``) override fields.
    names : display names (default: the run's algorithm, e.g. ERM, or the model's class name).
    dataset, layer : for plain torch models (see :func:`analysis.extract.extract`).
    checks : the checks to run (instances or registered names; default every registered check,
        :mod:`analysis.checks`).
    quiet : no progress bar.

    Returns
    -------
    dict
        The content of ``audit.json`` plus ``"report"``: the path of ``report.html``.
    """
    s = (settings or AuditSettings()).replace(**options) if options else settings or AuditSettings()
    start = time.time()
    items = _models(runs_or_models, names, dataset, layer)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    chosen = resolve_checks(checks)
    audits = _audit_models(items, s, chosen, dataset, layer, quiet)
    fc = FigureContext(audits, fig_dir, s, timings={"models": time.time() - start},
                       notes={"embedding": s.embedding, "embedding_note": None})
    figures = _figures(chosen, fc)
    warnings_out, ref_name = _warnings(audits, s.reference)
    fc.timings["total"] = time.time() - start
    data: dict[str, Any] = jsonable({
        "version": AUDIT_VERSION,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "split": s.split,
        "max_samples": s.max_samples,
        "seed": s.seed,
        "reference": ref_name,
        "runs": [a.entry for a in audits],
        "warnings": warnings_out,
        "figures": figures,
        "settings": {**s.dump(), **fc.notes, "checks": [c.name for c in chosen]},
        "seconds": fc.timings,
    })
    atomic_write_json(out / "audit.json", data)
    _write_slices_csv(audits, out / "slices.csv")
    images = {k: (out / v).read_bytes() for k, v in figures.items()}
    atomic_write(out / "report.html", render_html(data, images, sections=_sections(chosen, data)))
    log.info("audit: wrote %s in %.1f s", out / "report.html", time.time() - start)
    return {**data, "report": str(out / "report.html")}


def _write_slices_csv(audits: Sequence[ModelAudit], path: Path) -> None:
    """``slices.csv``: one row per audited image and model (:func:`analysis.checks.slices.slice_rows`); written
    whenever the slice check ran on some model."""
    import csv
    import io

    from analysis.checks.slices import slice_rows

    rows = [r for a in audits for r in slice_rows(a)]
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    atomic_write(path, buf.getvalue())


def _sections(checks: Sequence[Check], data: dict[str, Any]) -> list[Any]:
    """The report sections of the checks that draw their own (:meth:`~analysis.checks.Check.section`)."""
    return [sec for sec in (c.section(data) for c in checks) if sec is not None]


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
            newer = all(json_path.stat().st_mtime >= RunFiles(r).done_file.stat().st_mtime for r in runs)
            settings = data.get("settings") or {}
            unchanged = all(settings.get(k) == v for k, v in DEMO.dump().items() if k != "embedding")
            if same and newer and unchanged:
                log.info("demo: the audit report in %s is up to date; skipped", out)
                return html_path
        except (OSError, json.JSONDecodeError):
            pass
    res = audit(runs, out, DEMO, quiet=quiet)
    return Path(res["report"])
