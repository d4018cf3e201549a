"""The audit report: ``audit(runs_or_models, out_dir)`` writes DESIGN.md's audit contract.

::

    out_dir/
      report.html     self-contained (figures embedded as base64 PNG; no external CSS, JS or fonts)
      audit.json      {"runs": [one entry per model: mmd_env, leakage, cam_overlap, cam_in_mask, zero_cam_share,
                                 pointing_game, avg_acc, worst_group_acc, mean_group_acc, per_group, ...], ...}
      figures/        fig1_gradcam_grid.png, fig1b_gradcam_disagreement.png, fig2_umap.png, fig3_umap_env.png

Every file is written atomically (a temporary file, then ``os.replace``). ``ex2l audit RUN [RUN ...] --out DIR``
is the command-line form; :func:`demo_report` is what ``ex2l demo`` calls at its end.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.audit import AuditTarget, ModelAudit, audit_one, jsonable
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["AUDIT_VERSION", "AuditTarget", "audit", "demo_report", "render_html"]

AUDIT_VERSION = 1
FIGURES = {
    "gradcam_grid": "fig1_gradcam_grid.png",
    "gradcam_disagreement": "fig1b_gradcam_disagreement.png",
    "umap": "fig2_umap.png",
    "umap_env": "fig3_umap_env.png",
}
#: Settings of the report ``ex2l demo`` writes (fast: a subsample, fewer UMAP epochs).
DEMO_SETTINGS: dict[str, Any] = {"max_samples": 480, "umap_epochs": 200}


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unique_names(audits: Sequence[ModelAudit]) -> None:
    names = [a.entry["name"] for a in audits]
    for i, a in enumerate(audits):
        if names.count(names[i]) > 1:
            src = a.entry.get("source", "")
            suffix = Path(src).name if src and not src.startswith("python object") else str(i + 1)
            a.entry["name"] = f"{names[i]} ({suffix})"
        a.extraction.name = a.entry["name"]
        a.env_extraction.name = a.entry["name"]


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
    seed : seed of the subsample, probes, UMAP and row selection.
    names : display names (default: the run's algorithm, e.g. ERM, or the model's class name).
    dataset, layer : for plain torch models (see :func:`analysis.extract.extract`).
    device : where to run the models (default: cpu for run folders, the model's device for modules).
    rule, n_rows : how the rows of the Grad-CAM grid are chosen (see :func:`analysis.overlays.select_rows`).
    umap_epochs, umap_neighbors, embedding : UMAP options (``embedding="pca"`` for a PCA, labelled as such).
    reference : the model the gaming warnings compare with (index or name; default the first, e.g. ERM).
    quiet : no progress bar.

    Returns
    -------
    dict
        The content of ``audit.json`` plus ``"report"``: the path of ``report.html``.
    """
    from tqdm.auto import tqdm

    from analysis.embeddings import embed, embedding_figure
    from analysis.localization import gaming_warnings
    from analysis.overlays import gradcam_grid

    start = time.time()
    items = list(runs_or_models) if isinstance(runs_or_models, (list, tuple)) else [runs_or_models]
    if not items:
        raise Ex2lError("audit: expected at least one run folder or model")
    if names is not None and len(names) != len(items):
        raise Ex2lError(f"audit: {len(names)} names for {len(items)} models")
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    cache: dict[str, Any] = {}
    audits: list[ModelAudit] = []
    bar = tqdm(items, desc="audit", disable=quiet or not sys.stderr.isatty(), leave=False)
    for i, item in enumerate(bar):
        if names is not None:
            item = item if isinstance(item, AuditTarget) else AuditTarget(model=item, dataset=dataset, layer=layer)
            item.name = names[i]
        log.info("audit: %s", getattr(item, "name", None) or item)
        audits.append(audit_one(item, split=split, max_samples=max_samples, seed=seed, device=device,
                                dataset_cache=cache, dataset=dataset, layer=layer))
    bar.close()
    _unique_names(audits)
    timings: dict[str, float] = {"models": time.time() - start}

    # ---- figures ---------------------------------------------------------------------------------------------
    t = time.time()
    figures: dict[str, str] = {}
    first_key = audits[0].dataset_key
    same = [a for a in audits if a.dataset_key == first_key]
    if len(same) < len(audits):
        log.warning("audit: the Grad-CAM grids show only the models audited on %s's dataset", audits[0].entry["name"])
    exts = [a.extraction for a in same]
    gradcam_grid(exts, same[0].dataset, fig_dir / FIGURES["gradcam_grid"], rule=rule, n_rows=n_rows, seed=seed,
                 show_conf=any(e.cams_conf is not None for e in exts))
    figures["gradcam_grid"] = f"figures/{FIGURES['gradcam_grid']}"
    if len(exts) > 1:
        gradcam_grid(exts, same[0].dataset, fig_dir / FIGURES["gradcam_disagreement"], rule="disagreement",
                     n_rows=n_rows, seed=seed, cam="pred",
                     title="Grad-CAM of the label head at the prediction ŷ")
        figures["gradcam_disagreement"] = f"figures/{FIGURES['gradcam_disagreement']}"
    timings["gradcam_figures"] = time.time() - t
    t = time.time()
    env_exts = [a.env_extraction for a in audits]
    embedding_note = None
    try:
        embeddings = [embed(e.latents, method=embedding, seed=seed, n_epochs=umap_epochs,
                            n_neighbors=umap_neighbors) for e in env_exts]
    except Ex2lError as exc:
        if embedding != "umap":
            raise
        # documented fallback: the report still gets its latent-space figures, labelled PCA, with the reason
        embedding_note = f"UMAP failed, PCA shown instead: {exc}"
        log.warning("audit: %s", embedding_note)
        embedding = "pca"
        embeddings = [embed(e.latents, method="pca") for e in env_exts]
    timings["umap"] = time.time() - t
    t = time.time()
    mmds = [a.entry["mmd_env"] for a in audits]
    embedding_figure(env_exts, embeddings, fig_dir / FIGURES["umap"], colour_by=("label", "confounder"),
                     mmd=mmds, method=embedding, seed=seed)
    embedding_figure(env_exts, embeddings, fig_dir / FIGURES["umap_env"], colour_by=("env",), mmd=mmds,
                     method=embedding, seed=seed)
    figures["umap"] = f"figures/{FIGURES['umap']}"
    figures["umap_env"] = f"figures/{FIGURES['umap_env']}"
    timings["umap_figures"] = time.time() - t

    # ---- warnings, json, html --------------------------------------------------------------------------------
    rows = [{"name": a.entry["name"], "cam_in_mask": a.entry["cam_in_mask"],
             "logit_leak": a.entry["leakage"]["logit_leak"]} for a in audits]
    ref = reference
    if isinstance(ref, str) and ref not in [r["name"] for r in rows]:
        raise Ex2lError(f"audit: reference {ref!r} is not one of the models ({', '.join(r['name'] for r in rows)})")
    warnings_out = gaming_warnings(rows, reference=ref)
    ref_name = rows[ref]["name"] if isinstance(ref, int) else ref
    for a in audits:
        e = a.extraction
        a.entry["mask_area"] = float(e.masks.mean()) if e.masks is not None else None
    timings["total"] = time.time() - start
    data: dict[str, Any] = {
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
                     "umap_neighbors": umap_neighbors, "embedding_note": embedding_note},
        "seconds": timings,
    }
    data = jsonable(data)
    _atomic_write(out / "audit.json", json.dumps(data, indent=2) + "\n")
    images = {k: (out / v).read_bytes() for k, v in figures.items()}
    _atomic_write(out / "report.html", render_html(data, images))
    log.info("audit: wrote %s in %.1f s", out / "report.html", time.time() - start)
    return {**data, "report": str(out / "report.html")}


def demo_report(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                quiet: bool = True) -> Path:
    """The report ``ex2l demo`` writes for its runs (ERM first: the reference); returns the HTML path.

    Like the demo's training, it is skipped when already done: when ``out`` holds a report of the same runs
    written after every run finished (delete ``out`` to rebuild it)."""
    out = Path(out)
    runs = [Path(r) for r in run_dirs]
    html_path, json_path = out / "report.html", out / "audit.json"
    if html_path.is_file() and json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
            same = [r.get("source") for r in data.get("runs", [])] == [str(r) for r in runs]
            newer = all(json_path.stat().st_mtime >= (r / "done").stat().st_mtime for r in runs)
            if same and newer and data.get("max_samples") == DEMO_SETTINGS["max_samples"]:
                log.info("demo: the audit report in %s is up to date; skipped", out)
                return html_path
        except (OSError, json.JSONDecodeError):
            pass
    res = audit(runs, out, quiet=quiet, **DEMO_SETTINGS)
    return Path(res["report"])


# ---- HTML ------------------------------------------------------------------------------------------------------
CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d8dee4;--soft:#f6f8fa;--accent:#0969da;--good:#1a7f37;--bad:#cf222e;
--warn:#9a6700;--bar:#ddf4ff}
*{box-sizing:border-box}
body{margin:0;background:#fff;color:var(--fg);line-height:1.55;
font-family:-apple-system,BlinkMacSystemFont,"Segoe UI","Noto Sans",Helvetica,Arial,sans-serif;font-size:15px}
main{max-width:1140px;margin:0 auto;padding:36px 28px 80px}
header{border-bottom:1px solid var(--line);padding-bottom:18px}
h1{font-size:30px;margin:0 0 6px;letter-spacing:-.01em}
h2{font-size:21px;margin:44px 0 10px;padding-bottom:6px;border-bottom:1px solid var(--line)}
h3{font-size:16px;margin:24px 0 8px}
p{margin:8px 0}
.meta{color:var(--muted);font-size:14px}
.chips{margin-top:10px}
.chip{display:inline-block;margin:2px 6px 2px 0;padding:2px 10px;border-radius:999px;background:var(--soft);
border:1px solid var(--line);font-size:12.5px;color:var(--muted)}
nav{margin:16px 0 0;font-size:14px}
nav a{color:var(--accent);text-decoration:none;margin-right:16px}
nav a:hover{text-decoration:underline}
.callout{border-left:4px solid var(--accent);background:#f1f8ff;padding:12px 18px;border-radius:6px;margin:16px 0}
.callout.warn{border-color:#d4a72c;background:#fff8c5}
.callout.ok{border-color:var(--good);background:#dafbe1}
.callout ol,.callout ul{margin:6px 0;padding-left:22px}
.callout li{margin:4px 0}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:14px;margin:8px 0}
th,td{padding:7px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:middle}
th:first-child,td:first-child{text-align:left}
thead th{background:var(--soft);font-weight:600;font-size:13px;color:#31373d;border-bottom:2px solid var(--line)}
th[title]{cursor:help;text-decoration:underline dotted #8c959f}
td{font-variant-numeric:tabular-nums}
td.name{font-weight:600}
td.best{font-weight:700;color:var(--good)}
td .sub{display:block;font-size:11.5px;color:var(--muted);font-weight:400}
td.na{color:#8c959f}
.bar{display:block;margin:3px 0 0 auto;width:72px;height:4px;border-radius:2px;background:#eaeef2}
.bar i{display:block;height:100%;border-radius:2px;background:#54aeff}
td.best .bar i{background:var(--good)}
th.left,td.left{text-align:left}
tbody tr:hover{background:#fafbfc}
figure{margin:18px 0 26px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:8px;display:block;margin:0 auto}
figcaption{color:var(--muted);font-size:13.5px;margin-top:8px}
dl.explain{display:grid;grid-template-columns:minmax(170px,230px) 1fr;gap:6px 18px;font-size:14px;margin:10px 0}
dl.explain dt{font-weight:600}
dl.explain dd{margin:0;color:#3d444d}
details{margin:10px 0}
details summary{cursor:pointer;color:var(--accent);font-size:14px}
code{background:var(--soft);padding:1px 5px;border-radius:4px;font-size:13px}
pre{background:var(--soft);padding:12px;border-radius:6px;overflow-x:auto;font-size:12.5px}
footer{margin-top:50px;color:var(--muted);font-size:13px;border-top:1px solid var(--line);padding-top:14px}
@media print{nav{display:none}}
"""

_EXPLAIN = {
    "avg_acc": ("Average accuracy", "The share of the split's images classified correctly."),
    "worst_group_acc": (
        "Worst-group accuracy",
        "Accuracy on the (label, confounder) group where the model does worst; it drops when the model relies on "
        "the confounder, because that group is where the confounder points to the wrong label.",
    ),
    "mean_group_acc": ("Mean-group accuracy", "The unweighted mean of the per-group accuracies."),
    "mmd_env": (
        "MMD<sub>env</sub>",
        "Mean squared maximum mean discrepancy between the latent distributions of every pair of environments "
        "(Gaussian kernel, median-heuristic bandwidth, unbiased estimate): lower means more domain-invariant "
        "latents, about 0 means the environments are indistinguishable.",
    ),
    "confounder_probe_acc": (
        "Confounder probe, latents",
        "Balanced accuracy of a cross-validated logistic regression that predicts the confounder from the "
        "latents; it also profits from the label where label and confounder are correlated, so read it against "
        "chance.",
    ),
    "within_label_acc": (
        "Within-label leak, latents",
        "The same probe fitted inside each label separately (weighted mean): confounder information that cannot "
        "come from the label. This is the leak that matters; chance means none.",
    ),
    "random_within_label_acc": (
        "Random network",
        "The within-label probe on the latents of the same architecture at random initialisation: textures are "
        "decodable even from random features, so compare a trained model with this as well as with chance.",
    ),
    "logit_leak": (
        "Decision-level leak",
        "The within-label probe on the model's label logits: how much the decisions themselves vary with the "
        "confounder; it separates models when the latent probes saturate.",
    ),
    "label_probe_acc": (
        "Label probe",
        "Balanced accuracy of the probe predicting the label from the latents (a sanity check).",
    ),
    "cam_in_mask": (
        "CAM in object",
        "Share of the label Grad-CAM's mass (at the true label) inside the object mask, averaged over non-zero "
        "CAMs; a uniform map scores the object's area share.",
    ),
    "pointing_game": (
        "Pointing game",
        "Share of non-zero label CAMs whose maximum lies on the object.",
    ),
    "cam_overlap": (
        "Label–confounder overlap",
        "Soft Dice between the max-normalised label CAM (at y) and confounder CAM (at c): lower means the two "
        "heads look at different places, which is what eX2L's penalty asks for; n/a without a confounder head.",
    ),
    "zero_cam_share": (
        "Zero-CAM share",
        "Share of label CAMs that are all zero (Grad-CAM's ReLU can switch a map off); such maps are left out of "
        "the CAM averages and trivially satisfy an overlap penalty, so read the CAM numbers with this one.",
    ),
}


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _th(key: str, text: str | None = None) -> str:
    label, sentence = _EXPLAIN.get(key, (key, ""))
    return f'<th title="{_esc(_strip_tags(sentence))}">{text or label}</th>'


def _strip_tags(s: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", s)


def _best(values: Sequence[float | None], higher: bool) -> set[int]:
    ok = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(ok) < 2:
        return set()
    target = max(v for _, v in ok) if higher else min(v for _, v in ok)
    if all(abs(v - target) < 1e-12 for _, v in ok):
        return set()
    return {i for i, v in ok if abs(v - target) < 1e-12}


def _cell(v: float | None, *, pct: bool = True, digits: int | None = None, best: bool = False, bar: bool = False,
          sub: str = "") -> str:
    if v is None:
        return '<td class="na">n/a</td>'
    text = _pct(v, digits if digits is not None else 1) if pct else _num(v, digits if digits is not None else 3)
    cls = ' class="best"' if best else ""
    bar_html = ""
    if bar and pct:
        w = max(0.0, min(100.0, 100 * v))
        bar_html = f'<span class="bar"><i style="width:{w:.1f}%"></i></span>'
    sub_html = f'<span class="sub">{sub}</span>' if sub else ""
    return f"<td{cls}>{text}{bar_html}{sub_html}</td>"


def _table(head: list[str], body: list[list[str]]) -> str:
    rows = "".join("<tr>" + "".join(r) + "</tr>" for r in body)
    return f'<div class="tablewrap"><table><thead><tr>{"".join(head)}</tr></thead><tbody>{rows}</tbody></table></div>'


def _explain(keys: Sequence[str]) -> str:
    items = "".join(f"<dt>{_EXPLAIN[k][0]}</dt><dd>{_EXPLAIN[k][1]}</dd>" for k in keys)
    return f'<dl class="explain">{items}</dl>'


def _img(images: dict[str, bytes], key: str, alt: str) -> str:
    if key not in images:
        return ""
    b64 = base64.b64encode(images[key]).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_esc(alt)}">'


def render_html(data: dict[str, Any], images: dict[str, bytes]) -> str:
    """The self-contained ``report.html`` of an ``audit.json`` dict and its figures (PNG bytes by figure key)."""
    runs = data["runs"]
    names = [r["name"] for r in runs]
    n = len(runs)
    leak = [r["leakage"] for r in runs]
    datasets = sorted({str(r.get("dataset")) for r in runs})
    opts = runs[0].get("dataset_options") or {}
    dataset_text = ", ".join(datasets) + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    n_samples = runs[0]["n_samples"]
    n_split = runs[0].get("n_split")
    sample_text = f"{n_samples} of {n_split} samples" if n_split and n_split != n_samples else f"{n_samples} samples"
    secs = data.get("seconds", {}).get("total")

    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>")
    add("<meta name='viewport' content='width=device-width,initial-scale=1'>")
    add(f"<title>Spurious-reliance audit: {_esc(', '.join(names))}</title><style>{CSS}</style></head><body><main>")
    add("<header><h1>Spurious-reliance audit</h1>")
    add(f"<div class='meta'>{_esc(', '.join(names))} on <b>{_esc(dataset_text)}</b>, split <b>{_esc(data['split'])}</b>"
        f" · {_esc(sample_text)} (stratified by group, seed {_esc(data['seed'])})</div>")
    chips = [f"generated {_esc(data.get('created', ''))}"]
    if secs is not None:
        chips.append(f"audit took {secs:.0f} s")
    chips.append(f"reference for warnings: {_esc(data.get('reference'))}")
    add("<div class='chips'>" + "".join(f"<span class='chip'>{c}</span>" for c in chips) + "</div>")
    add("<nav><a href='#glance'>At a glance</a><a href='#read'>How to read this</a><a href='#accuracy'>Accuracy</a>"
        "<a href='#gradcam'>Grad-CAM</a><a href='#latents'>Latent space</a><a href='#leakage'>Leakage probes</a>"
        "<a href='#localization'>Localisation</a><a href='#numbers'>What the numbers mean</a></nav></header>")

    # ---- at a glance
    add("<section id='glance'><h2>At a glance</h2>")
    if data.get("warnings"):
        add("<div class='callout warn'><b>Gaming warning.</b> The Grad-CAM looks better while the decisions leak "
            "more confounder information than the reference's: trust the probes, not the picture.<ul>"
            + "".join(f"<li>{_esc(w)}</li>" for w in data["warnings"]) + "</ul></div>")
    else:
        add(f"<div class='callout ok'><b>No gaming warning.</b> No model's CAM mass in the object rose together "
            f"with its decision-level leak (relative to {_esc(data.get('reference'))}; thresholds +5 points each)."
            + ("" if any(r.get("cam_in_mask") is not None for r in runs) else
               " The dataset has no object masks, so the check could not run.") + "</div>")
    aa = [r.get("avg_acc") for r in runs]
    wga = [r.get("worst_group_acc") for r in runs]
    mmd = [r.get("mmd_env") for r in runs]
    wl = [x.get("within_label_acc") for x in leak]
    ll = [x.get("logit_leak") for x in leak]
    cim = [r.get("cam_in_mask") for r in runs]
    ov = [r.get("cam_overlap") for r in runs]
    zc = [r.get("zero_cam_share") for r in runs]
    best = {
        "aa": _best(aa, True), "wga": _best(wga, True), "mmd": _best(mmd, False), "wl": _best(wl, False),
        "ll": _best(ll, False), "cim": _best(cim, True), "ov": _best(ov, False), "zc": _best(zc, False),
    }
    head = ["<th>Model</th>", _th("avg_acc", "Average acc."), _th("worst_group_acc", "Worst-group acc."),
            _th("mmd_env"), _th("within_label_acc", "Within-label leak (latents)"),
            _th("logit_leak", "Decision-level leak"), _th("cam_in_mask"), _th("cam_overlap"), _th("zero_cam_share")]
    body = []
    for i, r in enumerate(runs):
        body.append([
            f"<td class='name'>{_esc(r['name'])}</td>",
            _cell(aa[i], best=i in best["aa"]),
            _cell(wga[i], best=i in best["wga"]),
            _cell(mmd[i], pct=False, digits=4, best=i in best["mmd"]),
            _cell(wl[i], best=i in best["wl"], sub=f"chance {_pct(leak[i].get('within_label_chance'), 0)}"),
            _cell(ll[i], best=i in best["ll"], sub=f"chance {_pct(leak[i].get('within_label_chance'), 0)}"),
            _cell(cim[i], best=i in best["cim"],
                  sub=f"area {_pct(r.get('mask_area'), 0)}" if r.get("mask_area") is not None else ""),
            _cell(ov[i], pct=False, best=i in best["ov"]),
            _cell(zc[i], best=i in best["zc"]),
        ])
    add(_table(head, body))
    src = {r.get("metrics_source") for r in runs}
    add("<p class='meta'>Green: the best value in a column (higher accuracy and CAM-in-object; lower MMD, leaks, "
        "overlap and zero-CAM share). Accuracies come from "
        + ("each run's <code>results.json</code> (the full split, selected epoch)" if src == {"results.json"}
           else "the audited sample" if src == {"audit sample"} else "results.json where available, else the "
           "audited sample")
        + "; every other number from the audited sample. Hover a column title for its definition.</p></section>")

    # ---- how to read
    add("<section id='read'><h2>How to read this</h2><div class='callout'><ol>"
        "<li><b>Accuracy first.</b> A large gap between average and worst-group accuracy means the model fails "
        "where the confounder points to the wrong label: it relies on the confounder.</li>"
        "<li><b>Then the leaks.</b> The within-label probes ask whether the confounder can be read from the "
        "latents (and from the decisions) inside one class. Lower is better; compare with chance and with the "
        "random network, not only with each other.</li>"
        "<li><b>Then the pictures.</b> Grad-CAMs show where the label head looks. They help, but an explanation "
        "penalty can be gamed: where a CAM looks better while the decision leaks more, believe the probes.</li>"
        "<li><b>Latent space.</b> If the UMAP groups points by confounder colour more than by label colour, the "
        "representation is organised by the confounder; mixed environments and a small MMD<sub>env</sub> mean a "
        "domain-invariant representation.</li></ol></div></section>")

    # ---- accuracy
    add("<section id='accuracy'><h2>Accuracy</h2>")
    head = ["<th>Model</th>", _th("avg_acc"), _th("worst_group_acc"), _th("mean_group_acc"),
            "<th title='The group with the lowest accuracy'>Worst group</th>", "<th>Source</th>"]
    body = []
    mga = [r.get("mean_group_acc") for r in runs]
    bm = _best(mga, True)
    for i, r in enumerate(runs):
        pg = r.get("per_group") or {}
        worst = min(pg.items(), key=lambda kv: kv[1]["acc"])[0] if pg else "n/a"
        epoch = f", epoch {r['selected_epoch']}" if r.get("selected_epoch") is not None else ""
        body.append([f"<td class='name'>{_esc(r['name'])}</td>", _cell(aa[i], best=i in best["aa"], bar=True),
                     _cell(wga[i], best=i in best["wga"], bar=True), _cell(mga[i], best=i in bm, bar=True),
                     f"<td>{_esc(worst)}</td>", f"<td class='meta'>{_esc(r.get('metrics_source'))}{epoch}</td>"])
    add(_table(head, body))
    add(_explain(["avg_acc", "worst_group_acc", "mean_group_acc"]))
    groups: list[str] = []
    for r in runs:
        for g in (r.get("per_group") or {}):
            if g not in groups:
                groups.append(g)
    if groups:
        head = ["<th>Group (label/confounder)</th>", "<th>n</th>"] + [f"<th>{_esc(nm)}</th>" for nm in names]
        body = []
        for g in groups:
            vals = [((r.get("per_group") or {}).get(g) or {}).get("acc") for r in runs]
            ns = [((r.get("per_group") or {}).get(g) or {}).get("n") for r in runs]
            bg = _best(vals, True)
            body.append([f"<td>{_esc(g)}</td>", f"<td>{_esc(next((x for x in ns if x is not None), ''))}</td>"]
                        + [_cell(v, best=j in bg, bar=True) for j, v in enumerate(vals)])
        add(f"<details><summary>Accuracy per group ({len(groups)} groups)</summary>{_table(head, body)}</details>")
    add("</section>")

    # ---- grad-cam
    add("<section id='gradcam'><h2>Where the models look: Grad-CAM</h2>")
    add("<figure>" + _img(images, "gradcam_grid", "Grad-CAM grid") + "<figcaption><b>Figure 1.</b> Rows: images "
        f"from the groups where {_esc(names[0])} is least accurate; columns: the input, then each model's "
        "label-head Grad-CAM at the true label y (the map eX2L's penalty and the localisation numbers use), "
        "bilinearly upsampled and divided by its own maximum; for models with a confounder head, also that "
        "head's CAM at the true confounder c. Titles: y = true label, ŷ = prediction (green when right, red when "
        "wrong), c = true confounder; <i>zero CAM</i> marks an all-zero map.</figcaption></figure>")
    if "gradcam_disagreement" in images:
        add("<figure>" + _img(images, "gradcam_disagreement", "Grad-CAM where models disagree")
            + "<figcaption><b>Figure 1b.</b> Images where the models' predictions differ (first those "
            f"{_esc(names[0])} gets wrong and another model gets right), with each model's Grad-CAM at its own "
            "prediction ŷ: what drove each decision.</figcaption></figure>")
    add("</section>")

    # ---- latents
    add("<section id='latents'><h2>Latent space</h2>")
    env_note = runs[0].get("mmd", {}).get("data", "")
    method = "UMAP" if data.get("settings", {}).get("embedding", "umap") == "umap" else "PCA"
    note = data.get("settings", {}).get("embedding_note")
    if note:
        add(f"<div class='callout warn'>{_esc(note)}</div>")
    add("<figure>" + _img(images, "umap", "UMAP by label and confounder") + f"<figcaption><b>Figure 2.</b> {method} "
        "(seeded) of each model's pooled latents, one row per model, coloured by label (left) and by confounder "
        f"(right); data: {_esc(env_note)}. A representation organised by the label shows label colours in "
        "separate clusters with the confounder colours mixed inside them.</figcaption></figure>")
    add("<figure>" + _img(images, "umap_env", "UMAP by environment") + "<figcaption><b>Figure 3.</b> The same "
        "embeddings coloured by environment, titled with MMD<sub>env</sub>: well-mixed colours and a small value "
        "mean the environments are indistinguishable in latent space.</figcaption></figure>")
    head = ["<th>Model</th>", _th("mmd_env"), "<th class='left'>Environment pairs (MMD²)</th>", "<th>Samples</th>",
            "<th>Bandwidth σ</th>"]
    body = []
    for i, r in enumerate(runs):
        m = r.get("mmd") or {}
        en = m.get("env_names") or {}
        pairs = "; ".join(
            f"{_esc(en.get(str(p['envs'][0]), p['envs'][0]))} vs {_esc(en.get(str(p['envs'][1]), p['envs'][1]))}: "
            f"{_num(p.get('mmd2'), 4)}" for p in m.get("pairs", [])
        ) or _esc(m.get("reason", "n/a"))
        body.append([f"<td class='name'>{_esc(r['name'])}</td>", _cell(mmd[i], pct=False, digits=4,
                     best=i in best["mmd"]), f"<td class='left'>{pairs}</td>",
                     f"<td>{_esc(m.get('n', ''))}</td>", _cell(m.get("bandwidth"), pct=False, digits=2)])
    add(_table(head, body))
    add(_explain(["mmd_env"]))
    add("</section>")

    # ---- leakage
    add("<section id='leakage'><h2>Leakage probes: is the confounder still in there?</h2>")
    head = ["<th>Model</th>", _th("confounder_probe_acc", "Confounder, latents (overall)"),
            _th("within_label_acc", "Within label, latents"),
            _th("random_within_label_acc", "Within label, random network"),
            _th("logit_leak", "Within label, logits (decision)"), _th("label_probe_acc")]
    body = []
    cp = [x.get("confounder_probe_acc") for x in leak]
    rw = [x.get("random_within_label_acc") for x in leak]
    lp = [x.get("label_probe_acc") for x in leak]
    for i, r in enumerate(runs):
        x = leak[i]
        wch = f"chance {_pct(x.get('within_label_chance'), 0)}"
        body.append([
            f"<td class='name'>{_esc(r['name'])}</td>",
            _cell(cp[i], sub=f"chance {_pct(x.get('chance'), 0)}", best=i in _best(cp, False)),
            _cell(wl[i], sub=wch, best=i in best["wl"]),
            _cell(rw[i], sub=_delta(wl[i], rw[i])),
            _cell(ll[i], sub=wch, best=i in best["ll"]),
            _cell(lp[i], best=i in _best(lp, True)),
        ])
    add(_table(head, body))
    add("<p class='meta'>Balanced accuracy of a standardised logistic regression, 5-fold stratified "
        "cross-validation (mean over folds). Under “random network”: the trained model's within-label leak minus "
        "the random network's (negative = the model removed confounder information that random features carry). "
        "Differences below about two fold standard deviations are noise.</p>")
    add(_explain(["confounder_probe_acc", "within_label_acc", "random_within_label_acc", "logit_leak",
                  "label_probe_acc"]))
    add("</section>")

    # ---- localization
    add("<section id='localization'><h2>Localisation: do the CAMs look at the object?</h2>")
    pgm = [r.get("pointing_game") for r in runs]
    head = ["<th>Model</th>", _th("cam_in_mask"), _th("pointing_game"), _th("cam_overlap"), _th("zero_cam_share"),
            "<th title='Share of all-zero confounder CAMs'>Zero confounder CAMs</th>"]
    body = []
    for i, r in enumerate(runs):
        loc = r.get("localization") or {}
        body.append([
            f"<td class='name'>{_esc(r['name'])}</td>",
            _cell(cim[i], best=i in best["cim"], bar=True,
                  sub=f"object area {_pct(r.get('mask_area'), 0)}" if r.get("mask_area") is not None else ""),
            _cell(pgm[i], best=i in _best(pgm, True), bar=True),
            _cell(ov[i], pct=False, best=i in best["ov"],
                  sub=f"n = {loc.get('cam_overlap_n')}" if ov[i] is not None else ""),
            _cell(zc[i], best=i in best["zc"]),
            _cell(r.get("conf_zero_cam_share")),
        ])
    add(_table(head, body))
    if not any(r.get("has_masks") for r in runs):
        add("<p class='meta'>This dataset has no object masks: CAM-in-object and the pointing game are n/a.</p>")
    add(_explain(["cam_in_mask", "pointing_game", "cam_overlap", "zero_cam_share"]))
    add("</section>")

    # ---- glossary + provenance
    add("<section id='numbers'><h2>What the numbers mean</h2>")
    add("<p>Each number in one sentence; the exact definitions (estimators, kernels, cross-validation, the "
        "gaming rule) are in <code>docs/auditing_metrics.md</code> of ex2l-xai.</p>")
    add(_explain(list(_EXPLAIN)))
    add("<h3>Models audited</h3>")
    head = ["<th>Model</th>", "<th>Source</th>", "<th>CAM layer</th>", "<th>Latent</th>", "<th>Audit time</th>"]
    body = [[f"<td class='name'>{_esc(r['name'])}</td>", f"<td style='text-align:right'><code>{_esc(r.get('source'))}"
             f"</code></td>", f"<td><code>{_esc(r.get('layer'))}</code></td>",
             f"<td>{_esc(r.get('latent'))} ({_esc(r.get('latent_dim'))}-d)</td>",
             f"<td>{(r.get('seconds') or {}).get('total', 0):.1f} s</td>"] for r in runs]
    add(_table(head, body))
    srcs = [r.get("source", "") for r in runs if not str(r.get("source", "")).startswith("python object")]
    cmd = ("ex2l audit " + " ".join(srcs) + f" --out DIR --split {data['split']}"
           + (f" --max-samples {data['max_samples']}" if data.get("max_samples") else "") + f" --seed {data['seed']}")
    if srcs:
        add(f"<p>Reproduce: <code>{_esc(cmd)}</code></p>")
    add("</section>")
    add(f"<footer>ex2l-xai audit report · machine-readable numbers in <code>audit.json</code> next to this file · "
        f"{n} model{'s' if n != 1 else ''}</footer>")
    add("</main></body></html>\n")
    return "".join(parts)


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    d = 100 * (a - b)
    return f"model − random: {d:+.1f} pts"

