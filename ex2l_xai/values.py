"""Checking configuration values, shared by :mod:`ex2l_xai.config` (its sections) and the algorithms' ``Params``
(:func:`ex2l_xai.algorithms.params_from_dict`), and the selection metrics both name. Both import this module and
it imports neither, so the configuration and the algorithm registry do not import each other in a circle."""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

from ex2l_xai.errors import ConfigError

__all__ = ["SELECTION_METRIC", "SELECTION_MINIMISES", "check_choice", "check_value"]

SELECTION_METRIC = {"val_worst_group_acc": "worst_group_acc", "val_avg_acc": "avg_acc",
                    "val_worst_group_nll": "worst_group_nll"}
"""The key of a metrics dict each ``train.selection`` maximises (those of :data:`SELECTION_MINIMISES`: minimises)."""
SELECTION_MINIMISES = ("val_worst_group_nll",)


def check_value(value: Any, annotation: Any, key: str, choices: tuple[str, ...] | None = None) -> Any:
    """``value`` checked against a field's type annotation (and ``choices``, for strings); ints are widened to
    floats. The project's one type checker of configuration values: the sections here and every algorithm's
    ``Params`` (:func:`ex2l_xai.algorithms.params_from_dict`) go through it.

    Parameters
    ----------
    value : any
        The value as read from YAML or an override.
    annotation : type
        The field's resolved annotation: ``int``, ``float``, ``bool``, ``str``, ``dict[...]`` or an optional
        (``X | None``) of one of them.
    key : str
        The dotted key named in the error (``optim.lr``, ``algorithm.eta``).
    choices : tuple of str, optional
        The allowed values of a string field.

    Raises
    ------
    ConfigError
        Naming ``key``, the expected type (or choices) and the value.
    """
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{key}: unsupported annotation {annotation!r} (one type, optionally | None)")
        if value is None and type(None) in args:
            return None
        annotation, optional = inner[0], type(None) in args
    if typing.get_origin(annotation) is dict or annotation is dict:
        ok, what = isinstance(value, dict), "a mapping"
    elif annotation is bool:
        ok, what = isinstance(value, bool), "true or false"
    elif annotation is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif annotation is float:
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif annotation is str:
        ok, what = isinstance(value, str), "a string"
    else:  # a programming error in a dataclass, not bad input
        raise TypeError(f"{key}: unsupported annotation {annotation!r}")
    if not ok:
        raise ConfigError(f"{key}: expected {what}{' or null' if optional else ''}, got {value!r}")
    if annotation is float:
        return float(value)
    if annotation is str and choices is not None:
        check_choice(key, value, choices)
    return copy.deepcopy(value) if isinstance(value, dict) else value


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
