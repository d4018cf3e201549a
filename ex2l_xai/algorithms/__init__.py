"""Training algorithms, one file each, found automatically.

Importing this package imports every module in it (``base`` and names starting with ``_`` aside); each
algorithm registers itself with ``@register("name")`` into :data:`ALGORITHMS` (:mod:`ex2l_xai.algorithms.base`).
So a new algorithm is one new file in this folder; nothing else is edited (docs/training.md shows a toy one).
"""

from __future__ import annotations

import importlib
import pkgutil

from ex2l_xai.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    Params,
    Stage,
    StageContext,
    StepContext,
    StepOutput,
    TrainInfo,
    build_algorithm,
    group_ids,
    params_from_dict,
    register,
)


def discover() -> list[str]:
    """Import every algorithm module of this package (idempotent); returns the module names."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Params",
    "Stage",
    "StageContext",
    "StepContext",
    "StepOutput",
    "TrainInfo",
    "build_algorithm",
    "discover",
    "group_ids",
    "params_from_dict",
    "register",
]
