"""The analysis layer's two figure helpers: a new :class:`matplotlib.figure.Figure` and saving one atomically.

Figures are plain ``Figure`` objects, never registered with pyplot, so drawing one changes no global state: the
user's matplotlib backend (a notebook's inline plots, say) is left alone and nothing needs closing. A notebook
shows a returned figure when it is the cell's value.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["new_figure", "save_figure"]


def new_figure(width: float, height: float, *, dpi: int = 130, layout: str | None = "constrained") -> Any:
    """A pyplot-free :class:`matplotlib.figure.Figure` of ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout=layout)


def save_figure(fig: Any, out: str | os.PathLike[str], dpi: int | None = None) -> None:
    """Write ``fig`` to ``out`` (format from the suffix, PNG by default) through :func:`ex2l_xai.fileio.atomic_save`,
    on a white background."""
    from pathlib import Path

    from ex2l_xai.fileio import atomic_save

    path = Path(out)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_save(path, lambda f: fig.savefig(f, dpi=dpi or fig.dpi, format=fmt, facecolor="white"))
