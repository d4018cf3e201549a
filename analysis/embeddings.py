"""2-D embeddings of latents (UMAP, seeded) and the paper's Figs. 2-3: panels coloured by label, confounder and
environment, one row per model, each row titled with its MMD across environments.

UMAP (umap-learn) is imported lazily: its first use compiles with numba (10-20 s; :func:`exact_knn` saves the
nearest-neighbour search's share of it). :func:`embed` raises a
clear :class:`~ex2l_xai.errors.Ex2lError` when UMAP cannot embed the data (e.g. too few samples); it never
switches method silently. ``method="pca"`` is available explicitly, and every figure names the method used.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.extract import Extraction
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["COLOUR_BY", "MIN_SAMPLES", "embed", "embedding_figure", "exact_knn"]

COLOUR_BY = ("label", "confounder", "env")
#: UMAP needs a neighbourhood graph: fewer samples than this are refused with an error.
MIN_SAMPLES = 10
_PALETTES = {"label": "Set2", "confounder": "tab10", "env": "colorblind"}
_TITLES = {"label": "coloured by label", "confounder": "coloured by confounder", "env": "coloured by environment"}
_WORDS = {"label": "label", "confounder": "confounder", "env": "environment"}


def embed(
    latents: np.ndarray,
    *,
    method: str = "umap",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_epochs: int | None = None,
    standardize: bool = True,
) -> np.ndarray:
    """2-D embedding (N, 2) of latents (N, D).

    Parameters
    ----------
    method : ``"umap"`` (umap-learn, ``random_state=seed``: deterministic, single-threaded) or ``"pca"``.
    n_neighbors : UMAP neighbourhood size (capped at N - 1). min_dist, n_epochs : UMAP options (None = UMAP's
        default, 200 epochs for large N and 500 for small).
    standardize : z-score every latent dimension first (constant dimensions are left at 0).

    Raises
    ------
    Ex2lError
        With fewer than :data:`MIN_SAMPLES` samples, non-finite latents, or when UMAP fails.
    """
    z = np.asarray(latents, dtype=np.float64)
    if z.ndim != 2:
        raise Ex2lError(f"embed: latents must be (N, D), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise Ex2lError("embed: latents contain NaN or inf values")
    n = z.shape[0]
    if standardize:
        sd = z.std(0)
        z = (z - z.mean(0)) / np.where(sd > 0, sd, 1.0)
    if method == "pca":
        if n < 2:
            raise Ex2lError(f"embed: PCA needs at least 2 samples, got {n}")
        zc = z - z.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        out = zc @ vt[:2].T
        if out.shape[1] < 2:
            out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
        return out.astype(np.float32)
    if method != "umap":
        raise Ex2lError(f"embed: method must be 'umap' or 'pca', got {method!r}")
    if n < MIN_SAMPLES:
        raise Ex2lError(
            f"embed: UMAP needs at least {MIN_SAMPLES} samples, got {n}; extract more samples, or pass "
            "method='pca' (labelled PCA in the figure)"
        )
    try:
        import umap
    except ImportError as exc:  # pragma: no cover - a dependency
        raise Ex2lError(f"embed: umap-learn is not installed ({exc}); pip install umap-learn") from exc
    k = max(2, min(n_neighbors, n - 1))
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=min_dist,
        n_epochs=n_epochs,
        random_state=seed,
        init="spectral" if n > 50 else "random",
        precomputed_knn=exact_knn(z, k),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n_jobs overridden by random_state; spectral init fallbacks
            out = reducer.fit_transform(z)
    except Exception as exc:
        raise Ex2lError(
            f"embed: UMAP failed on {n} samples x {z.shape[1]} dims ({type(exc).__name__}: {exc}); "
            "try more samples, a smaller n_neighbors, or method='pca'"
        ) from exc
    return np.asarray(out, dtype=np.float32)


def exact_knn(z: np.ndarray, k: int) -> tuple[Any, ...]:
    """The k nearest neighbours UMAP's small-data path (< 4096 samples) computes, computed the same way without
    its numba-parallel argsort (whose compilation costs a few seconds in every new process): the distances of the
    float32 data with UMAP's own euclidean (as UMAP passes it to scikit-learn), each row sorted stably (as UMAP's
    mergesort). Gives UMAP's embedding bit for bit (tests/test_analysis_extract.py). ``(None, None, None)``, i.e.
    UMAP's own path, for 4096 samples or more and for data with duplicate rows (tied neighbours: UMAP's own
    path stays the reference there)."""
    n = z.shape[0]
    x = np.ascontiguousarray(z, dtype=np.float32)
    if n >= 4096 or np.unique(x, axis=0).shape[0] < n:
        return None, None, None
    from sklearn.metrics import pairwise_distances
    from umap.distances import euclidean

    d = pairwise_distances(x, metric=euclidean)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k].astype(np.int32)
    return idx, d[np.arange(n)[:, None], idx].copy()


def _values(e: Extraction, by: str) -> tuple[np.ndarray, list[str]]:
    if by == "label":
        return e.labels, e.label_names
    if by == "confounder":
        return e.confounders, e.confounder_names
    if by == "env":
        return e.envs, e.env_names
    raise Ex2lError(f"colour_by: expected entries of {COLOUR_BY}, got {by!r}")


def embedding_figure(
    extractions: Sequence[Extraction],
    embeddings: Sequence[np.ndarray] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    colour_by: Sequence[str] = ("label", "confounder"),
    mmd: Sequence[float | None] | None = None,
    method: str = "umap",
    seed: int = 0,
    n_epochs: int | None = None,
    n_neighbors: int = 15,
    title: str | None = None,
    point_size: float | None = None,
    dpi: int = 130,
) -> Any:
    """Scatter panels of 2-D embeddings: one row per model, one column per entry of ``colour_by``.

    With a single ``colour_by`` (Fig. 3: environment), the models are laid side by side instead (one panel each).
    Each row (panel) is titled with the model's name and, when ``mmd`` is given, its MMD_env. ``embeddings``
    default to :func:`embed` of each extraction's latents (``method``, ``seed``, ``n_epochs``,
    ``n_neighbors``). Legends carry the names. Saves a PNG when ``out`` is given; returns the figure.
    """
    from analysis.plotting import new_figure, save_figure

    if not extractions:
        raise Ex2lError("embedding_figure: expected at least one extraction")
    colour_by = list(colour_by)
    for by in colour_by:
        _values(extractions[0], by)
    if embeddings is None:
        embeddings = [
            embed(e.latents, method=method, seed=seed, n_epochs=n_epochs, n_neighbors=n_neighbors)
            for e in extractions
        ]
    if len(embeddings) != len(extractions):
        raise Ex2lError(f"embedding_figure: {len(embeddings)} embeddings for {len(extractions)} extractions")
    n_models = len(extractions)
    side_by_side = len(colour_by) == 1
    n_rows, n_cols = (1, n_models) if side_by_side else (n_models, len(colour_by))
    size = 3.3
    fig = new_figure(size * n_cols + 1.6, size * n_rows + 0.9, dpi=dpi)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    label = "UMAP" if method == "umap" else "PCA"
    for m, (e, emb) in enumerate(zip(extractions, embeddings, strict=True)):
        row_title = e.name
        if mmd is not None:
            v = mmd[m]
            row_title += f"   MMD$_{{env}}$ = {v:.4f}" if v is not None else "   MMD$_{env}$ = n/a"
        for j, by in enumerate(colour_by):
            ax = axes[0, m] if side_by_side else axes[m, j]
            palette = _panel(ax, e, emb, by, label, seed, point_size)
            if side_by_side:
                ax.set_title(row_title, fontsize=10, fontweight="bold")
            elif m == 0:
                ax.set_title(_TITLES[by], fontsize=10)
            if not side_by_side and j == 0:
                ax.annotate(
                    row_title, xy=(0, 0.5), xytext=(-28, 0), xycoords="axes fraction", textcoords="offset points",
                    rotation=90, ha="right", va="center", fontsize=10, fontweight="bold",
                )
            if (m == n_models - 1) if side_by_side else (m == 0):
                _legend(ax, e, by, palette)
    words = [_WORDS[b] for b in colour_by]
    what = " and by ".join(words) if len(words) == 2 else ", ".join(words)
    head = title or f"{label} of the latents, coloured by {what}"
    if mmd is not None:
        head += "\nMMD$_{env}$: mean squared MMD between environments (lower = more domain-invariant)"
    fig.suptitle(head, fontsize=10)
    if out is not None:
        save_figure(fig, out, dpi)
    return fig


def _panel(ax: Any, e: Extraction, emb: np.ndarray, by: str, label: str, seed: int, point_size: float | None
           ) -> list[Any]:
    """One scatter panel of ``emb`` coloured by ``by`` (a seeded drawing order: no class drawn entirely on top);
    returns the palette."""
    import seaborn as sns

    n = emb.shape[0]
    s = point_size or float(np.clip(2400 / max(n, 1), 3, 30))
    vals, names = _values(e, by)
    palette = sns.color_palette(_PALETTES[by], n_colors=max(len(names), 1))
    order = np.random.default_rng(seed).permutation(n)
    colours = np.asarray([palette[int(v) % len(palette)] for v in vals[order]])
    ax.scatter(emb[order, 0], emb[order, 1], c=colours, s=s, linewidths=0, alpha=0.8, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ("top", "right"):
        ax.spines[sp].set_visible(False)
    ax.set_xlabel(f"{label} 1", fontsize=8)
    ax.set_ylabel(f"{label} 2", fontsize=8)
    return palette


def _legend(ax: Any, e: Extraction, by: str, palette: list[Any]) -> None:
    """The legend of ``by``'s values present in ``e``, outside the panel on the right."""
    from matplotlib.lines import Line2D

    vals, names = _values(e, by)
    handles = [
        Line2D([], [], marker="o", linestyle="", markersize=6, color=palette[int(v) % len(palette)],
               label=names[int(v)] if int(v) < len(names) else str(int(v)))
        for v in np.unique(vals)
    ]
    ax.legend(handles=handles, title=_WORDS[by], fontsize=7, title_fontsize=8, frameon=False,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
