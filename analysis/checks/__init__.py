"""The audit's checks, one module each, run by one loop (:func:`analysis.checks.base.run_checks`).

Every module of this package that defines a :class:`~analysis.checks.base.Check` decorated with
:func:`~analysis.checks.base.register` is found here (no list to edit): adding a check is adding one file.
:func:`default_checks` gives one instance of each, in run order (``order``, then name)::

    gradcam (0)  random_network (10)  slices (15)  latent_space (20)  leakage (30)  localization (40)
    interventions (50)  cam_sanity (60)  faithfulness (65)  accuracy (70)
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from analysis.checks.base import (
    NEEDS,
    Check,
    CheckContext,
    FigureContext,
    ReportSection,
    SkipCheck,
    register,
    registered,
    run_checks,
)
from ex2l_xai.errors import Ex2lError

__all__ = ["NEEDS", "Check", "CheckContext", "FigureContext", "ReportSection", "SkipCheck", "default_checks",
           "figure_files", "register", "registered", "resolve_checks", "run_checks"]


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def default_checks() -> list[Check]:
    """One instance of every registered check, in run order."""
    _discover()
    return [cls() for cls in registered().values()]


def figure_files() -> dict[str, str]:
    """Every registered check's figure files (``Check.files``), {figure key: file name}, in run order."""
    _discover()
    return {k: v for cls in registered().values() for k, v in cls.files.items()}


def resolve_checks(checks: Sequence[Check | str] | None) -> list[Check]:
    """``None``: :func:`default_checks`; else each entry as given (a :class:`Check`) or by registered name."""
    if checks is None:
        return default_checks()
    _discover()
    known = registered()
    out: list[Check] = []
    for c in checks:
        if isinstance(c, Check):
            out.append(c)
        elif isinstance(c, str) and c in known:
            out.append(known[c]())
        else:
            raise Ex2lError(f"checks: unknown check {c!r}; registered: {', '.join(known)}")
    return out
