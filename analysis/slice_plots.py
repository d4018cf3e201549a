"""Figures and the report table of the slice check (:mod:`analysis.checks.slices`): Fig. 6, the worst slices
(exemplar images with their Grad-CAMs, and the 2-D embedding coloured by slice), Fig. 7, each class's top and
bottom images by spuriosity."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["embedding_of", "slice_figure", "slices_table", "spuriosity_figure"]

N_WORST = 3
N_EXEMPLARS = 4


def embedding_of(audit: Any, settings: Any) -> tuple[str, np.ndarray]:
    """(method, (N, 2) embedding) of ``audit.extraction``'s latents.

    When Fig. 2 embeds the same extraction (the audited split holds several environments, or none was added), this
    is the audit's own embedding (UMAP with the audit's settings, PCA when UMAP fails), made here once and kept in
    ``audit.artifacts["embedding"]`` for Fig. 2. Otherwise (Fig. 2 embeds val + the split) a PCA of the split: a
    second UMAP would cost as much as Fig. 2 itself."""
    from analysis.embeddings import embed

    if "embedding" in audit.artifacts:
        return audit.artifacts["embedding"]
    s, z = settings, audit.extraction.latents
    if audit.env_extraction is not audit.extraction:
        return "pca", embed(z, method="pca")
    try:
        out = s.embedding, embed(z, method=s.embedding, seed=s.seed, n_epochs=s.umap_epochs,
                                 n_neighbors=s.umap_neighbors)
    except Ex2lError as exc:
        if s.embedding != "umap":
            raise
        log.warning("audit: UMAP failed for the slice figure, PCA shown instead: %s", exc)
        out = "pca", embed(z, method="pca")
    audit.artifacts["embedding"] = out
    return out


def _exemplars(audit: Any, label: int, slice_id: int, n: int) -> np.ndarray:
    """Positions (in the extraction) of the ``n`` images of a slice nearest to its mean latent."""
    ext, res = audit.extraction, audit.artifacts["slices"]
    members = np.flatnonzero((ext.labels == label) & (res.slices == slice_id))
    z = ext.latents[members]
    dist = np.linalg.norm(z - z.mean(0), axis=1)
    return members[np.argsort(dist, kind="stable")[:n]]


def _image_cell(ax: Any, audit: Any, pos: int, title: str, colour: str) -> None:
    from analysis.overlays import cam_overlay, display_image

    ext = audit.extraction
    ax.set_xticks([])
    ax.set_yticks([])
    img = display_image(audit.dataset[int(ext.indices[pos])]["image"], audit.dataset)
    cams = ext.cams_pred if ext.cams_pred is not None else None
    ax.imshow(cam_overlay(img, cams[pos])[0] if cams is not None else img, interpolation="bilinear")
    ax.set_title(title, fontsize=7, color=colour)


def slice_figure(audits: Sequence[Any], out: str | os.PathLike[str], settings: Any) -> None:
    """Fig. 6: per model a row block: the embedding coloured by (class, slice), then the ``N_WORST`` worst slices,
    ``N_EXEMPLARS`` exemplars each, with the Grad-CAM of the predicted class over them."""
    from analysis.plotting import new_figure, save_figure

    cols = 1 + N_EXEMPLARS
    fig = new_figure(2.0 * cols, 2.1 * N_WORST * len(audits))
    grid = fig.add_gridspec(N_WORST * len(audits), cols)
    for m, a in enumerate(audits):
        ext, res = a.extraction, a.artifacts["slices"]
        method, emb = embedding_of(a, settings)
        ids, names = res.global_ids()
        ax = fig.add_subplot(grid[m * N_WORST:(m + 1) * N_WORST, 0])
        for g, name in enumerate(names):
            sel = ids == g
            ax.scatter(emb[sel, 0], emb[sel, 1], s=4, label=_named(name, ext.label_names))
        ax.set_title(f"{a.entry['name']}: {method.upper()} by slice", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(names) <= 12:
            ax.legend(fontsize=5, markerscale=2, loc="best")
        for r, row in enumerate(res.table[:N_WORST]):
            for c, pos in enumerate(_exemplars(a, row["label"], row["slice"], N_EXEMPLARS)):
                ok = ext.preds[pos] == ext.labels[pos]
                title = (f"{ext.label_names[row['label']]}/slice {row['slice']}: acc {row['acc']:.0%} "
                         f"(gap {row['gap']:+.0%})" if c == 0 else f"ŷ={ext.label_names[int(ext.preds[pos])]}")
                _image_cell(fig.add_subplot(grid[m * N_WORST + r, 1 + c]), a, int(pos), title,
                            "#1a7f37" if ok else "#cf222e")
    save_figure(fig, out)


def _named(global_name: str, label_names: Sequence[str]) -> str:
    label, _, rest = global_name.partition("/")
    return f"{label_names[int(label)]}/{rest}"


def spuriosity_figure(audits: Sequence[Any], out: str | os.PathLike[str], n: int = 4) -> None:
    """Fig. 7: per model and class with flagged features, its ``n`` most and ``n`` least spurious images."""
    from analysis.plotting import new_figure, save_figure

    rows = [(a, y) for a in audits for y, rec in a.artifacts["spuriosity"].classes.items() if rec["flagged"]]
    fig = new_figure(1.8 * 2 * n, 2.0 * len(rows))
    grid = fig.add_gridspec(len(rows), 2 * n)
    for r, (a, y) in enumerate(rows):
        ext, sp = a.extraction, a.artifacts["spuriosity"]
        members = np.flatnonzero(ext.labels == y)
        order = members[np.argsort(-sp.scores[members], kind="stable")]
        picks = list(order[:n]) + list(order[-n:][::-1])
        for c, pos in enumerate(picks):
            ok = ext.preds[pos] == ext.labels[pos]
            side = "top" if c < n else "bottom"
            title = f"{a.entry['name'][:10]} {ext.label_names[y]} {side}\nscore {sp.scores[pos]:+.2f}"
            _image_cell(fig.add_subplot(grid[r, c]), a, int(pos), title, "#1a7f37" if ok else "#cf222e")
    save_figure(fig, out)


def slices_table(runs: Sequence[dict[str, Any]], per_model: int = 5) -> Any:
    """The report's table: per model its worst slices (class, slice, size, share, acc, gap, confidence) and the
    discovery's k and scores."""
    from analysis.html import Cell, Table, cell, name_cell, plain_th

    head = [plain_th("model"), plain_th("class / slice"), plain_th("size"), plain_th("share"), plain_th("acc"),
            plain_th("gap", "slice accuracy minus its class's"), plain_th("confidence"),
            plain_th("k per class"), plain_th("ARI / NMI", "agreement with the true confounder (overall)"),
            plain_th("spurious gap", "top minus bottom spuriosity quartile accuracy, mean over classes")]
    table = Table(head)
    for run in runs:
        disc = run.get("discovery") or {}
        ks = ", ".join(f"{k}: {v}" for k, v in (disc.get("k") or {}).items())
        score = (f"{disc['ari']:.2f} / {disc['nmi']:.2f}" if disc.get("ari") is not None else "n/a (no confounder)")
        for i, row in enumerate(run["slices"][:per_model]):
            table.rows.append([
                name_cell(run["name"] if i == 0 else ""), Cell(f"{row.get('label_name', row['label'])} / "
                                                               f"{row['slice']}"),
                Cell(str(row["size"])), cell(row["share"]), cell(row["acc"]), cell(row["gap"]),
                cell(row["confidence"]), Cell(ks if i == 0 else ""), Cell(score if i == 0 else ""),
                cell(run.get("spurious_gap")) if i == 0 else Cell("")])
    return table
