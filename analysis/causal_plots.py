"""Figures of the two causal checks: the background-swap versions of a few images with each model's prediction
(:mod:`analysis.interventions`), and the CAM sanity check's similarity curves with one image's CAM after each
randomisation step (:mod:`analysis.sanity`). Drawn on their own ``Figure`` objects (no pyplot)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.interventions import VARIANTS, InterventionResult
from analysis.sanity import SanityResult
from ex2l_xai.errors import Ex2lError

__all__ = ["VARIANT_TITLES", "intervention_figure", "sanity_figure"]

VARIANT_TITLES = {"original": "original", "only_fg": "object only", "only_bg": "background only",
                  "mixed_same": "own-class background", "mixed_rand": "random background"}
CORRECT, WRONG = "#1a7f37", "#c62828"


def _short(text: str, width: int = 11) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clean(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def intervention_figure(
    results: Sequence[tuple[str, InterventionResult]],
    label_names: Sequence[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dpi: int = 110,
) -> Any:
    """Rows: the first result's example images; columns: the five versions (original, object only, background
    only, own-class background, random background); under each image every model's prediction (green = right).

    The versions are the same for every model (same samples and seed), so the images come from the first result.
    """
    from analysis.plotting import new_figure, save_figure

    usable = [(n, r) for n, r in results if r.examples]
    if not usable:
        raise Ex2lError("intervention_figure: no result has examples (the interventions did not run)")
    first = usable[0][1].examples
    n_r, n_c = len(first), len(VARIANTS)
    lines = len(usable)
    fig = new_figure(2.0 * n_c + 0.4, (1.9 + 0.16 * lines) * n_r + 0.8, dpi=dpi)
    axes = fig.subplots(n_r, n_c, squeeze=False)
    for r, ex in enumerate(first):
        y = ex["label"]
        for j, v in enumerate(VARIANTS):
            ax = axes[r, j]
            _clean(ax)
            ax.imshow(np.clip(ex["images"][v], 0, 1), interpolation="nearest")
            head = VARIANT_TITLES[v]
            bg = ex.get("backgrounds", {}).get(v)
            ax.set_title(f"{head}\n({_short(str(bg), 14)})" if bg else head, fontsize=8)
            words = []
            for name, res in usable:
                match = [e for e in res.examples if e["index"] == ex["index"]]
                if not match:
                    continue
                p = match[0]["preds"][v]
                words.append((f"{_short(name, 9)}: {_short(label_names[p])}", CORRECT if p == y else WRONG))
            for k, (text, colour) in enumerate(words):
                ax.text(0.5, -0.04 - 0.12 * k, text, transform=ax.transAxes, ha="center", va="top", fontsize=7,
                        color=colour)
        axes[r, 0].set_ylabel(f"y = {_short(label_names[y], 14)}", fontsize=8)
    fig.suptitle("The same object on other backgrounds: each model's prediction (green = right, red = wrong)",
                 fontsize=10)
    if out is not None:
        save_figure(fig, out, dpi)
    return fig


def sanity_figure(
    results: Sequence[tuple[str, SanityResult]],
    out: str | os.PathLike[str] | None = None,
    *,
    dpi: int = 110,
) -> Any:
    """Top: mean Spearman rank correlation and SSIM between each model's trained CAMs and its CAMs after each
    cascading-randomisation step (the threshold of the verdict dashed). Below, one row per model: an image, its
    trained CAM and its CAM after each step (each map divided by its own maximum)."""
    from analysis.plotting import new_figure, save_figure

    if not results:
        raise Ex2lError("sanity_figure: expected at least one result")
    n_steps = max(len(r.summary["steps"]) for _, r in results)
    n_c = n_steps + 2
    fig = new_figure(max(8.0, 1.5 * n_c + 0.6), 3.0 + 1.55 * len(results), dpi=dpi)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.0, 1.0 * len(results)])
    ax_r, ax_s = top.subplots(1, 2)
    threshold = results[0][1].summary["threshold"]
    ticks: list[str] = ["trained"]
    for name, res in results:
        steps = res.summary["steps"]
        xs = list(range(len(steps) + 1))
        ax_r.plot(xs, [1.0] + [s["spearman"] for s in steps], marker="o", label=name)
        ax_s.plot(xs, [1.0] + [s["ssim"] for s in steps], marker="o", label=name)
        if len(steps) + 1 > len(ticks):
            ticks = ["trained"] + [str(s["randomized"]["n_modules"]) for s in steps]
    low = min([s[k] for _, r in results for s in r.summary["steps"] for k in ("spearman", "ssim")] + [-0.3])
    for ax, what in ((ax_r, "Spearman rank correlation"), (ax_s, "SSIM")):
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_xlabel("modules re-initialised, counted from the output end", fontsize=8)
        ax.set_ylabel(f"{what}\nwith the trained CAM", fontsize=8)
        ax.set_ylim(low - 0.08, 1.05)
        ax.axhline(0, color="#999", lw=0.6)
        ax.tick_params(labelsize=7)
    ax_r.axhline(threshold, color="#c62828", ls="--", lw=0.8)
    ax_r.text(0.02, threshold + 0.03, f"verdict threshold {threshold}", transform=ax_r.get_yaxis_transform(),
              fontsize=7, color="#c62828")
    ax_s.legend(fontsize=7, frameon=False, loc="upper right")
    cells = bottom.subplots(len(results), n_c, squeeze=False)
    for row, (name, res) in enumerate(results):
        ex = res.example
        for ax in cells[row]:
            _clean(ax)
        if not ex:
            continue
        panels = [("image", ex["image"])] + [("trained", ex["trained"])] + [
            (f"{s['randomized']['n_modules']} random", m) for s, m in zip(res.summary["steps"], ex["steps"],
                                                                          strict=True)]
        for j, (title, m) in enumerate(panels[:n_c]):
            ax = cells[row, j]
            if title == "image":
                ax.imshow(np.clip(m, 0, 1))
                ax.set_ylabel(_short(name, 14), fontsize=8, fontweight="bold")
            else:
                peak = float(np.max(m))
                ax.imshow(m / peak if peak > 0 else m, cmap="jet", vmin=0, vmax=1)
                if peak <= 0:
                    title += " · zero"
            ax.set_title(title, fontsize=7)
    fig.suptitle("CAM sanity check (cascading randomisation, Adebayo et al. 2018): CAMs that depend on the "
                 "weights fall towards 0", fontsize=10)
    if out is not None:
        save_figure(fig, out, dpi)
    return fig
