"""The Grad-CAM overlay grid (the paper's Fig. 1): rows = images, columns = the input and one column per model.

Rows are chosen by a seeded rule (:func:`select_rows`); each CAM is upsampled bilinearly to the image
(:func:`ex2l_xai.cam.upsample`), divided by its own maximum and blended over the image with one colour map, which
a colour bar explains. Each cell is titled ``y=<label> ŷ=<prediction> c=<confounder>`` (green when ŷ = y, red
otherwise). Drawn on its own :class:`matplotlib.figure.Figure` (no pyplot, no backend switch); PNG output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from analysis.extract import Extraction
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["RULES", "cam_overlay", "display_image", "gradcam_grid", "select_rows"]

RULES = ("worst_groups", "disagreement", "random")
CORRECT, WRONG = "#1a7f37", "#c62828"


def _aligned(extractions: Sequence[Extraction]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dataset indices present in every extraction (in the first one's order) and each one's positions."""
    if not extractions:
        raise Ex2lError("gradcam_grid: expected at least one extraction")
    common = extractions[0].indices
    for e in extractions[1:]:
        common = common[np.isin(common, e.indices)]
    if common.size == 0:
        raise Ex2lError("gradcam_grid: the extractions share no sample (extract them with the same dataset, "
                        "max_samples and seed)")
    positions = []
    for e in extractions:
        where = {int(v): i for i, v in enumerate(e.indices)}
        positions.append(np.asarray([where[int(v)] for v in common], dtype=np.int64))
    return common, positions


def select_rows(
    extractions: Sequence[Extraction], rule: str = "worst_groups", n_rows: int = 6, seed: int = 0
) -> np.ndarray:
    """Dataset indices of the rows of the grid, chosen by ``rule`` (seeded).

    ``worst_groups``: the groups (label × confounder) where the FIRST model's accuracy is lowest (ties: larger
    groups first), one sample per group in that order, round-robin when there are fewer groups than rows.
    ``disagreement``: samples where the models' predictions differ (those where the first model is wrong and
    another is right first), topped up with random samples when there are too few. ``random``: uniform.
    """
    if rule not in RULES:
        raise Ex2lError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    common, pos = _aligned(extractions)
    rng = np.random.default_rng(seed)
    n_rows = min(int(n_rows), common.size)
    first = extractions[0]
    p0 = pos[0]
    if rule == "random":
        chosen = rng.choice(common.size, size=n_rows, replace=False)
    elif rule == "worst_groups":
        groups = first.groups[p0]
        correct = first.correct[p0]
        stats = []
        for g in np.unique(groups):
            sel = groups == g
            stats.append((float(correct[sel].mean()), -int(sel.sum()), int(g)))
        stats.sort()
        pools = [list(rng.permutation(np.flatnonzero(groups == g))) for _, _, g in stats]
        chosen_list: list[int] = []
        while len(chosen_list) < n_rows and any(pools):
            for pool in pools:
                if pool and len(chosen_list) < n_rows:
                    chosen_list.append(int(pool.pop(0)))
        chosen = np.asarray(chosen_list, dtype=np.int64)
    else:
        preds = np.stack([e.preds[p] for e, p in zip(extractions, pos, strict=True)])
        labels = first.labels[p0]
        differ = (preds != preds[0]).any(0)
        story = differ & (preds[0] != labels) & (preds[1:] == labels).any(0) if len(extractions) > 1 else differ
        order = []
        for mask in (story, differ & ~story, ~differ):
            cand = rng.permutation(np.flatnonzero(mask))
            order.extend(int(c) for c in cand)
        if int(differ.sum()) < n_rows:
            log.info("gradcam_grid: only %d disagreements; topped up with random samples", int(differ.sum()))
        chosen = np.asarray(order[:n_rows], dtype=np.int64)
    return common[chosen]


def display_image(image: torch.Tensor | np.ndarray, dataset: Any = None) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] for display: undoes the dataset's ``mean``/``std`` normalisation."""
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    img = img.astype(np.float64)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is not None and std is not None:
        img = img * np.asarray(std)[None, None] + np.asarray(mean)[None, None]
    return np.clip(img, 0.0, 1.0)


def cam_overlay(
    image: np.ndarray, cam: np.ndarray, *, cmap: str = "jet", alpha: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Blend one CAM (h, w) over an (H, W, 3) image: bilinear upsampling, division by the map's maximum (an
    all-zero map stays zero), colour map, ``(1 - alpha) * image + alpha * colour``. Returns (overlay, map)."""
    import matplotlib

    from ex2l_xai.cam import upsample

    h, w = image.shape[:2]
    c = torch.as_tensor(np.asarray(cam, dtype=np.float32))[None]
    up = upsample(c, (h, w))[0].clamp_min(0).numpy().astype(np.float64)
    peak = up.max()
    up = up / peak if peak > 0 else up
    colour = matplotlib.colormaps[cmap](up)[..., :3]
    return (1.0 - alpha) * image + alpha * colour, up


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def gradcam_grid(
    extractions: Sequence[Extraction],
    dataset: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    rule: str = "worst_groups",
    n_rows: int = 6,
    seed: int = 0,
    cam: str = "true",
    show_conf: bool = False,
    rows: Sequence[int] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    dpi: int = 130,
) -> Any:
    """Draw the Grad-CAM grid; save it as PNG when ``out`` is given. Returns the matplotlib figure.

    Parameters
    ----------
    extractions : one :class:`~analysis.extract.Extraction` per model (same dataset; only the samples present
        in all of them are used). Column order = this order; the first model drives ``worst_groups``.
    dataset : the dataset the extractions were made from (images are read from it by index).
    out : PNG path. rule, n_rows, seed : see :func:`select_rows`; ``rows`` gives dataset indices instead.
    cam : ``"true"`` (label CAM at the true label y, the default) or ``"pred"`` (at the prediction ŷ).
    show_conf : add, for every model with a confounder head, a column with its confounder CAM (at c).
    cmap, alpha : colour map and blending weight of the CAM.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from analysis.plotting import new_figure, save_figure

    if cam not in ("true", "pred"):
        raise Ex2lError(f"cam: expected 'true' or 'pred', got {cam!r}")
    missing = [e.name for e in extractions if e.cams_true is None]
    if missing:
        raise Ex2lError(f"gradcam_grid: extraction(s) {missing} have no CAMs (extract with cams=True)")
    chosen = np.asarray(rows, dtype=np.int64) if rows is not None else select_rows(extractions, rule, n_rows, seed)
    columns: list[tuple[str, Extraction | None, str]] = [("input", None, "")]
    for e in extractions:
        columns.append((e.name, e, "pred" if cam == "pred" else "true"))
        if show_conf and e.cams_conf is not None:
            columns.append((f"{e.name}\nconfounder head", e, "conf"))
    n_r, n_c = len(chosen), len(columns)
    cell = 1.9
    fig = new_figure(cell * n_c + 0.9, cell * n_r + 1.0, dpi=dpi)
    axes = fig.subplots(n_r, n_c, squeeze=False)
    for r, idx in enumerate(chosen):
        img = display_image(dataset[int(idx)]["image"], dataset)
        for j, (_col_name, e, kind) in enumerate(columns):
            if e is None:
                _input_cell(axes[r, j], img, extractions[0], int(idx))
            else:
                _cam_cell(axes[r, j], img, e, kind, int(idx), cmap, alpha)
    for j, (col_name, _e, _k) in enumerate(columns):
        axes[0, j].annotate(
            col_name, xy=(0.5, 1.0), xytext=(0, 30), xycoords="axes fraction", textcoords="offset points",
            ha="center", va="bottom", fontsize=10, fontweight="bold",
        )
    sm = ScalarMappable(norm=Normalize(0, 1), cmap=cmap)
    cbar = fig.colorbar(sm, ax=axes, location="right", fraction=0.04, shrink=0.6, pad=0.02)
    cbar.set_label("Grad-CAM, each map max-normalised (0 = none, 1 = its maximum)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    which = "at the prediction ŷ" if cam == "pred" else "at the true label y"
    head = title or f"Grad-CAM of the label head {which}"
    fig.suptitle(
        f"{head}\nrows: {_rule_text(rule) if rows is None else 'given samples'}; "
        "title green = correct, red = wrong",
        fontsize=10,
    )
    if out is not None:
        save_figure(fig, out, dpi)
    return fig


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _input_cell(ax: Any, img: np.ndarray, first: Extraction, idx: int) -> None:
    """The input column: the image, titled with its label and confounder, its index and environment aside."""
    _bare(ax)
    ax.imshow(img, interpolation="bilinear")
    i0 = int(np.flatnonzero(first.indices == idx)[0])
    env = first.env_names[first.envs[i0]] if first.env_names else str(first.envs[i0])
    ax.set_title(
        f"y={_short(first.label_names[first.labels[i0]])}\n"
        f"c={_short(first.confounder_names[first.confounders[i0]])}",
        fontsize=8,
    )
    ax.set_ylabel(f"#{idx} · {_short(env, 14)}", fontsize=7, color="#555")


def _cam_cell(ax: Any, img: np.ndarray, e: Extraction, kind: str, idx: int, cmap: str, alpha: float) -> None:
    """One model's CAM (``kind``: true, pred or conf) over the image, titled with y, ŷ, c (green when right)."""
    _bare(ax)
    i = int(np.flatnonzero(e.indices == idx)[0])
    maps = {"true": e.cams_true, "pred": e.cams_pred, "conf": e.cams_conf}[kind]
    assert maps is not None
    overlay, _ = cam_overlay(img, maps[i], cmap=cmap, alpha=alpha)
    ax.imshow(overlay, interpolation="bilinear")
    y, p, c = e.labels[i], e.preds[i], e.confounders[i]
    if kind == "conf":
        cp = int(e.conf_logits[i].argmax()) if e.conf_logits is not None else c
        text = f"c={_short(e.confounder_names[c])}\nĉ={_short(e.confounder_names[cp])}"
        colour = CORRECT if cp == c else WRONG
    else:
        text = f"y={_short(e.label_names[y])} ŷ={_short(e.label_names[p])}\nc={_short(e.confounder_names[c])}"
        colour = CORRECT if p == y else WRONG
    if not np.any(maps[i] > 0):
        text += " · zero CAM"
    ax.set_title(text, fontsize=8, color=colour)


def _rule_text(rule: str) -> str:
    return {
        "worst_groups": "samples of the first model's worst groups",
        "disagreement": "samples where the models disagree",
        "random": "random samples",
    }[rule]
