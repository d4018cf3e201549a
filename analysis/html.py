"""Rendering the audit report: ``audit.json``'s content + the figures -> one self-contained ``report.html``.

:func:`render_html` builds the tables (values, best-in-column marks, bars, heat cells) in Python and lays them out
with the jinja2 template ``analysis/templates/report.html.j2``; the stylesheet ``report.css`` is inlined and the
figures are embedded as base64 PNG, so the report is one file that opens offline. Every number shown comes from
the ``data`` dict (``audit.json``); nothing is computed here but formatting and "which value is best".
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

__all__ = ["GLOSSARY", "Cell", "Table", "cell", "name_cell", "plain_th", "render_html", "th"]

GLOSSARY: dict[str, tuple[str, str]] = {
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
    "bg_gap": (
        "BG-gap",
        "Accuracy with the object on a background of its own class minus on a random background (Xiao et al. "
        "2020): how much a class-consistent background helps. About 0 = the background does not sway the "
        "decision; large = the model leans on the background.",
    ),
    "only_bg_acc": (
        "Background only",
        "Accuracy on the background with the object removed: above chance means the background alone predicts the "
        "label for this model.",
    ),
    "only_fg_acc": ("Object only", "Accuracy on the object on a black background."),
    "mixed_same_acc": (
        "Own-class background",
        "Accuracy with the object on a background its class was seen on in training.",
    ),
    "mixed_rand_acc": ("Random background", "Accuracy with the object on a random background."),
    "flip_rate": (
        "Flip rate",
        "Share of predictions that change when only the background changes (the object stays pixel for pixel the "
        "same where the renderer allows it).",
    ),
    "cam_sanity": (
        "CAM sanity check",
        "Rank correlation (Spearman) between the trained model's CAMs and its CAMs after re-initialising its layers "
        "from the output end (Adebayo et al. 2018): CAMs that explain the model fall towards 0; a map that stays "
        "near 1 does not depend on the weights.",
    ),
}


# ---- cells and tables (the template draws them) --------------------------------------------------------------
@dataclass
class Cell:
    """One table cell: its text (or safe HTML), css classes, an optional bar (percent) and a small line below."""

    text: Any
    cls: str = ""
    bar: float | None = None
    sub: str = ""
    style: str = ""


@dataclass
class Table:
    """Column heads (text, title tooltip, css class) and rows of cells."""

    head: list[tuple[Any, str, str]]
    rows: list[list[Cell]] = field(default_factory=list)


def _pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _plain(s: str) -> str:
    return re.sub(r"<[^>]+>", "", s)


def th(key: str, text: str | None = None, cls: str = "") -> tuple[Any, str, str]:
    """A column head for glossary ``key`` (its sentence as the tooltip)."""
    label, sentence = GLOSSARY.get(key, (key, ""))
    return Markup(text or label), _plain(sentence), cls


def plain_th(text: str, title: str = "", cls: str = "") -> tuple[Any, str, str]:
    """A column head without a glossary entry."""
    return text, title, cls


def best(values: Sequence[float | None], higher: bool) -> set[int]:
    """Positions of the best value (none when fewer than two values or all equal)."""
    ok = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(ok) < 2:
        return set()
    target = max(v for _, v in ok) if higher else min(v for _, v in ok)
    if all(abs(v - target) < 1e-12 for _, v in ok):
        return set()
    return {i for i, v in ok if abs(v - target) < 1e-12}


def cell(v: float | None, *, pct: bool = True, digits: int | None = None, is_best: bool = False,
         bar: bool = False, sub: str = "") -> Cell:
    """A number cell (percent by default), marked best, with an optional bar and sub-line."""
    if v is None:
        return Cell("n/a", "na")
    text = _pct(v, digits if digits is not None else 1) if pct else _num(v, digits if digits is not None else 3)
    width = max(0.0, min(100.0, 100 * v)) if bar and pct else None
    return Cell(text, "best" if is_best else "", width, sub)


def name_cell(name: str) -> Cell:
    """The model-name cell of a row."""
    return Cell(name, "name")


def heat(v: float | None, train_share: float = 0.0) -> Cell:
    """A heat-map cell of an accuracy (white 0 -> green 1); outlined when the class had that background in
    training."""
    if v is None:
        return Cell("n/a", "heat na")
    g = int(round(255 - 120 * v)), int(round(255 - 40 * v)), int(round(255 - 120 * v))
    return Cell(f"{100 * v:.0f}%", "heat train" if train_share > 0 else "heat",
                style=f"background:rgb({g[0]},{g[1]},{g[2]})", sub=f"train {100 * train_share:.0f}%"
                if train_share > 0 else "")


def delta(a: float | None, b: float | None) -> str:
    """``model − random: +x.y pts``."""
    if a is None or b is None:
        return ""
    return f"model − random: {100 * (a - b):+.1f} pts"


def _img(images: dict[str, bytes], key: str) -> str | None:
    return base64.b64encode(images[key]).decode("ascii") if key in images else None


# ---- sections ------------------------------------------------------------------------------------------------
def _glance(runs: list[dict[str, Any]]) -> Table:
    leak = [(r.get("leakage") or {}) for r in runs]
    cols = {
        "aa": ([r.get("avg_acc") for r in runs], True), "wga": ([r.get("worst_group_acc") for r in runs], True),
        "gap": ([(r.get("interventions") or {}).get("bg_gap") for r in runs], False),
        "mmd": ([r.get("mmd_env") for r in runs], False), "wl": ([x.get("within_label_acc") for x in leak], False),
        "ll": ([x.get("logit_leak") for x in leak], False), "cim": ([r.get("cam_in_mask") for r in runs], True),
        "ov": ([r.get("cam_overlap") for r in runs], False), "zc": ([r.get("zero_cam_share") for r in runs], False),
    }
    b = {k: best(v, hi) for k, (v, hi) in cols.items()}
    t = Table([plain_th("Model"), th("avg_acc", "Average acc."), th("worst_group_acc", "Worst-group acc."),
               th("bg_gap"), th("cam_sanity", "CAMs depend on weights"), th("mmd_env"),
               th("within_label_acc", "Within-label leak (latents)"), th("logit_leak", "Decision-level leak"),
               th("cam_in_mask"), th("cam_overlap"), th("zero_cam_share")])
    for i, r in enumerate(runs):
        v = {k: vals[i] for k, (vals, _) in cols.items()}
        ch = f"chance {_pct(leak[i].get('within_label_chance'), 0)}"
        san = r.get("cam_sanity") or {}
        sanity = (Cell(Markup(f"<span class='verdict {'pass' if san['passes'] else 'fail'}'>"
                              f"{'yes' if san['passes'] else 'NO'}</span>"),
                       sub=f"ρ {san['steps'][-1]['spearman']:.2f} when random") if san.get("steps")
                  else Cell("n/a", "na"))
        t.rows.append([
            name_cell(r["name"]), cell(v["aa"], is_best=i in b["aa"]), cell(v["wga"], is_best=i in b["wga"]),
            cell(v["gap"], is_best=i in b["gap"]), sanity,
            cell(v["mmd"], pct=False, digits=4, is_best=i in b["mmd"]),
            cell(v["wl"], is_best=i in b["wl"], sub=ch), cell(v["ll"], is_best=i in b["ll"], sub=ch),
            cell(v["cim"], is_best=i in b["cim"], sub=f"area {_pct(r.get('mask_area'), 0)}"
                 if r.get("mask_area") is not None else ""),
            cell(v["ov"], pct=False, is_best=i in b["ov"]), cell(v["zc"], is_best=i in b["zc"]),
        ])
    return t


def _accuracy(runs: list[dict[str, Any]]) -> tuple[Table, Table | None]:
    aa, wga, mga = ([r.get(k) for r in runs] for k in ("avg_acc", "worst_group_acc", "mean_group_acc"))
    t = Table([plain_th("Model"), th("avg_acc"), th("worst_group_acc"), th("mean_group_acc"),
               plain_th("Worst group", "The group with the lowest accuracy"), plain_th("Source")])
    ba, bw, bm = best(aa, True), best(wga, True), best(mga, True)
    for i, r in enumerate(runs):
        pg = r.get("per_group") or {}
        worst = min(pg.items(), key=lambda kv: kv[1]["acc"])[0] if pg else "n/a"
        epoch = f", epoch {r['selected_epoch']}" if r.get("selected_epoch") is not None else ""
        t.rows.append([name_cell(r["name"]), cell(aa[i], is_best=i in ba, bar=True),
                       cell(wga[i], is_best=i in bw, bar=True), cell(mga[i], is_best=i in bm, bar=True),
                       Cell(worst), Cell(f"{r.get('metrics_source')}{epoch}", "meta")])
    groups: list[str] = []
    for r in runs:
        groups += [g for g in (r.get("per_group") or {}) if g not in groups]
    if not groups:
        return t, None
    g_t = Table([plain_th("Group (label/confounder)"), plain_th("n")] + [plain_th(r["name"]) for r in runs])
    for g in groups:
        vals = [((r.get("per_group") or {}).get(g) or {}).get("acc") for r in runs]
        ns = [((r.get("per_group") or {}).get(g) or {}).get("n") for r in runs]
        bg = best(vals, True)
        g_t.rows.append([Cell(g), Cell(next((x for x in ns if x is not None), ""))]
                        + [cell(v, is_best=j in bg, bar=True) for j, v in enumerate(vals)])
    return t, g_t


def _interventions(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ivs = [r.get("interventions") or {} for r in runs]
    if not any(x.get("available") for x in ivs):
        reasons = sorted({x.get("reason", "not run") for x in ivs})
        return {"available": False, "reasons": reasons}
    keys = ["original_acc", "only_fg_acc", "only_bg_acc", "mixed_same_acc", "mixed_rand_acc", "bg_gap",
            "flip_rate"]
    higher = {"bg_gap": False, "flip_rate": False}
    cols = {k: [x.get(k) for x in ivs] for k in keys}
    b = {k: best(v, higher.get(k, True)) for k, v in cols.items()}
    b["only_bg_acc"] = set()  # no "best": chance is the ideal, and 0 on swapped test backgrounds is reliance too
    t = Table([plain_th("Model"), plain_th("Original", "Accuracy on the unchanged images of the sample")]
              + [th(k, cls="") for k in keys[1:]] + [plain_th("n", "Images per version; method")])
    for i, r in enumerate(runs):
        x = ivs[i]
        if not x.get("available"):
            t.rows.append([name_cell(r["name"])] + [Cell("n/a", "na")] * (len(keys) + 1))
            continue
        row = [name_cell(r["name"])]
        for k in keys:
            row.append(cell(cols[k][i], is_best=i in b[k], bar=k.endswith("_acc"), pct=True))
        row.append(Cell(x.get("n"), sub=str(x.get("method"))))
        t.rows.append(row)
    heat_tables = []
    for r, x in zip(runs, ivs, strict=True):
        pcb = x.get("per_class_background")
        if not pcb:
            continue
        bgs = list(next(iter(pcb.values()))["acc"])
        ht = Table([plain_th("Class \\ background")] + [plain_th(bg) for bg in bgs] + [plain_th("n")])
        for lab, row in pcb.items():
            ht.rows.append([Cell(lab, "name")] + [heat(row["acc"][bg], row["train_share"].get(bg, 0.0)) for bg in bgs]
                           + [Cell(row["n"])])
        heat_tables.append((r["name"], ht))
    first = next(x for x in ivs if x.get("available"))
    return {"available": True, "table": t, "heat": heat_tables, "method": first.get("method"),
            "n": first.get("n"), "prior_source": first.get("prior_source"),
            "same": first.get("same_backgrounds") or {}}


def _sanity(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sans = [r.get("cam_sanity") or {} for r in runs]
    if not any(s.get("steps") for s in sans):
        return {"available": False, "reasons": sorted({s.get("reason", "not run") for s in sans})}
    n_steps = max(len(s.get("steps", [])) for s in sans)
    t = Table([plain_th("Model"), th("cam_sanity", "Verdict"), plain_th("CAM layer")]
              + [plain_th(f"step {k + 1}", "Spearman ρ / SSIM after this step; modules re-initialised so far, "
                          "from the output end") for k in range(n_steps)])
    verdicts = []
    for r, s in zip(runs, sans, strict=True):
        if not s.get("steps"):
            t.rows.append([name_cell(r["name"])] + [Cell("n/a", "na")] * (n_steps + 2))
            continue
        badge = Markup(f"<span class='verdict {'pass' if s['passes'] else 'fail'}'>"
                       f"{'passes' if s['passes'] else 'fails'}</span>")
        row = [name_cell(r["name"]), Cell(badge, sub=f"n = {s['n']} images"), Cell(Markup(f"<code>{escape(s['layer'])}"
                                                                                         "</code>"), "left")]
        for st in s["steps"]:
            rnd = st["randomized"]
            zero = f"; {100 * st['zero_share']:.0f}% all-zero" if st.get("zero_share") else ""
            row.append(Cell(f"ρ {st['spearman']:.2f} / {st['ssim']:.2f}",
                            sub=f"{rnd['n_modules']} random, to {rnd['last']}{zero}"))
        row += [Cell("")] * (n_steps - len(s["steps"]))
        t.rows.append(row)
        verdicts.append((r["name"], s["passes"], s["verdict"]))
    return {"available": True, "table": t, "verdicts": verdicts,
            "threshold": next(s["threshold"] for s in sans if s.get("steps"))}


def _latents(runs: list[dict[str, Any]]) -> Table:
    mmd = [r.get("mmd_env") for r in runs]
    bm = best(mmd, False)
    t = Table([plain_th("Model"), th("mmd_env"), plain_th("Environment pairs (MMD²)", cls="left"),
               plain_th("Samples"), plain_th("Bandwidth σ")])
    for i, r in enumerate(runs):
        m = r.get("mmd") or {}
        en = m.get("env_names") or {}
        pairs = "; ".join(
            f"{en.get(str(p['envs'][0]), p['envs'][0])} vs {en.get(str(p['envs'][1]), p['envs'][1])}: "
            f"{_num(p.get('mmd2'), 4)}" for p in m.get("pairs", [])) or str(m.get("reason", "n/a"))
        t.rows.append([name_cell(r["name"]), cell(mmd[i], pct=False, digits=4, is_best=i in bm),
                       Cell(pairs, "left"), Cell(m.get("n", "")), cell(m.get("bandwidth"), pct=False, digits=2)])
    return t


def _leakage(runs: list[dict[str, Any]]) -> Table:
    leak = [(r.get("leakage") or {}) for r in runs]
    cp, wl, rw, ll, lp = ([x.get(k) for x in leak] for k in ("confounder_probe_acc", "within_label_acc",
                                                             "random_within_label_acc", "logit_leak",
                                                             "label_probe_acc"))
    t = Table([plain_th("Model"), th("confounder_probe_acc", "Confounder, latents (overall)"),
               th("within_label_acc", "Within label, latents"), th("random_within_label_acc",
                                                                     "Within label, random network"),
               th("logit_leak", "Within label, logits (decision)"), th("label_probe_acc")])
    bc, bw, bl, bp = best(cp, False), best(wl, False), best(ll, False), best(lp, True)
    for i, r in enumerate(runs):
        wch = f"chance {_pct(leak[i].get('within_label_chance'), 0)}"
        t.rows.append([name_cell(r["name"]), cell(cp[i], sub=f"chance {_pct(leak[i].get('chance'), 0)}",
                                                  is_best=i in bc),
                       cell(wl[i], sub=wch, is_best=i in bw), cell(rw[i], sub=delta(wl[i], rw[i])),
                       cell(ll[i], sub=wch, is_best=i in bl), cell(lp[i], is_best=i in bp)])
    return t


def _localization(runs: list[dict[str, Any]]) -> Table:
    cim, pgm, ov, zc = ([r.get(k) for r in runs] for k in ("cam_in_mask", "pointing_game", "cam_overlap",
                                                            "zero_cam_share"))
    t = Table([plain_th("Model"), th("cam_in_mask"), th("pointing_game"), th("cam_overlap"), th("zero_cam_share"),
               plain_th("Zero confounder CAMs", "Share of all-zero confounder CAMs")])
    bc, bp, bo, bz = best(cim, True), best(pgm, True), best(ov, False), best(zc, False)
    for i, r in enumerate(runs):
        loc = r.get("localization") or {}
        t.rows.append([
            name_cell(r["name"]),
            cell(cim[i], is_best=i in bc, bar=True, sub=f"object area {_pct(r.get('mask_area'), 0)}"
                 if r.get("mask_area") is not None else ""),
            cell(pgm[i], is_best=i in bp, bar=True),
            cell(ov[i], pct=False, is_best=i in bo, sub=f"n = {loc.get('cam_overlap_n')}" if ov[i] is not None
                 else ""),
            cell(zc[i], is_best=i in bz), cell(r.get("conf_zero_cam_share")),
        ])
    return t


def _models(runs: list[dict[str, Any]]) -> Table:
    t = Table([plain_th("Model"), plain_th("Source"), plain_th("CAM layer"), plain_th("Latent"),
               plain_th("Input normalisation"), plain_th("Audit time")])
    for r in runs:
        norm = r.get("normalization")
        norm_text = ("inside the model" if norm is None and r.get("algorithm") else "none" if norm is None else
                     f"mean {norm['mean']}, std {norm['std']}")
        t.rows.append([name_cell(r["name"]), Cell(Markup(f"<code>{escape(r.get('source'))}</code>"), "left"),
                       Cell(Markup(f"<code>{escape(r.get('layer'))}</code>"), "left"),
                       Cell(f"{r.get('latent')} ({r.get('latent_dim')}-d)", "left"), Cell(norm_text, "left"),
                       Cell(f"{(r.get('seconds') or {}).get('total', 0):.1f} s")])
    return t


def _reproduce(data: dict[str, Any]) -> str | None:
    runs = data["runs"]
    srcs = [r.get("source", "") for r in runs if r.get("algorithm")]
    if not srcs:
        return None
    return ("ex2l audit " + " ".join(srcs) + f" --out DIR --split {data['split']}"
            + (f" --max-samples {data['max_samples']}" if data.get("max_samples") else "") + f" --seed {data['seed']}")


def render_html(data: dict[str, Any], images: dict[str, bytes], sections: Sequence[Any] = ()) -> str:
    """The self-contained ``report.html`` of an ``audit.json`` dict and its figures (PNG bytes by figure key);
    ``sections``: the :class:`~analysis.checks.ReportSection` of checks that draw their own, after the built-in
    sections."""
    from importlib.resources import files

    import jinja2

    runs = data["runs"]
    names = [r["name"] for r in runs]
    datasets = sorted({str(r.get("dataset")) for r in runs})
    opts = runs[0].get("dataset_options") or {}
    dataset_text = ", ".join(datasets) + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    n_samples, n_split = runs[0]["n_samples"], runs[0].get("n_split")
    accuracy, per_group = _accuracy(runs)
    src = {r.get("metrics_source") for r in runs}
    context = {
        "data": data, "runs": runs, "names": names, "n": len(runs), "dataset_text": dataset_text,
        "sample_text": f"{n_samples} of {n_split} samples" if n_split and n_split != n_samples
        else f"{n_samples} samples",
        "seconds": (data.get("seconds") or {}).get("total"),
        "css": Markup(files("analysis").joinpath("templates/report.css").read_text(encoding="utf-8")),
        "glance": _glance(runs), "accuracy": accuracy, "per_group": per_group,
        "metrics_source": Markup("each run's <code>results.json</code> (the full split, selected epoch)"
                                 if src == {"results.json"} else "the audited sample" if src == {"audit sample"}
                                 else "results.json where available, else the audited sample"),
        "any_masks": any(r.get("cam_in_mask") is not None for r in runs),
        "has_masks": any(r.get("has_masks") for r in runs),
        "interventions": _interventions(runs), "sanity": _sanity(runs), "latents": _latents(runs),
        "leakage": _leakage(runs), "localization": _localization(runs), "models": _models(runs),
        "env_note": (runs[0].get("mmd") or {}).get("data", ""),
        "method": "UMAP" if (data.get("settings") or {}).get("embedding", "umap") == "umap" else "PCA",
        "embedding_note": (data.get("settings") or {}).get("embedding_note"),
        "img": {k: _img(images, k) for k in images}, "glossary": {k: (Markup(a), Markup(b))
                                                                   for k, (a, b) in GLOSSARY.items()},
        "reproduce": _reproduce(data), "sections": list(sections),
    }
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(files("analysis").joinpath("templates"))),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(**context)
