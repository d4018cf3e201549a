"""Datasets whose samples carry a label, a confounder, an environment and (where available) an object mask.

Use :func:`get_dataset`::

    from ex2l_xai.data import get_dataset
    train = get_dataset("synthetic", "train", challenge="m2m_hard", per_group=200)
    sample = train[0]  # {"image", "label", "confounder", "env", "index", "mask"}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ex2l_xai.data.base import SPLITS, GroupDataset, ImageFileDataset, carve_validation
from ex2l_xai.data.challenges import BACKGROUNDS, CHALLENGES, CLASSES, ENV_NAMES, get_challenge
from ex2l_xai.data.csv_dataset import CsvDataset
from ex2l_xai.data.spawrious import SpawriousDataset
from ex2l_xai.data.synthetic import SyntheticDataset
from ex2l_xai.data.waterbirds import WaterbirdsDataset
from ex2l_xai.errors import DataError

DATASETS: dict[str, Callable[..., GroupDataset]] = {}
"""Registry: dataset name -> class (or factory) called as ``cls(split=..., **options)``."""


def register_dataset(name: str) -> Callable[[Callable[..., GroupDataset]], Callable[..., GroupDataset]]:
    """Decorator that registers a dataset class (or factory) under ``name``."""

    def wrap(cls: Callable[..., GroupDataset]) -> Callable[..., GroupDataset]:
        DATASETS[name] = cls
        return cls

    return wrap


for _cls in (SyntheticDataset, SpawriousDataset, WaterbirdsDataset, CsvDataset):
    register_dataset(_cls.name)(_cls)


def dataset_options(name: str) -> dict[str, Any]:
    """Options of dataset ``name`` with their defaults (``inspect.Parameter.empty`` when required)."""
    cls = _lookup(name)
    params = inspect.signature(cls).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p.default for k, p in params.items() if k != "split" and p.kind in kinds}


def _lookup(name: str) -> Callable[..., GroupDataset]:
    try:
        return DATASETS[str(name).lower()]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(sorted(DATASETS))}") from None


def get_dataset(name: str, split: str = "train", **options: Any) -> GroupDataset:
    """Build split ``split`` of dataset ``name``.

    Parameters
    ----------
    name : str
        ``synthetic``, ``spawrious``, ``waterbirds``, ``csv`` or a name added with :func:`register_dataset`.
    split : str
        ``train``, ``val`` or ``test`` (``synthetic`` also has ``oracle_val``).
    **options
        Dataset options (e.g. ``root``, ``challenge``, ``image_size``, ``per_group``, ``seed``).

    Raises
    ------
    DataError
        For an unknown dataset, split or option, or bad data on disk.
    """
    cls = _lookup(name)
    known = dataset_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} for dataset {name!r}; expected one of {', '.join(sorted(known))}"
        )
    splits = getattr(cls, "splits", SPLITS)
    if split not in splits:
        raise DataError(f"unknown split {split!r} for dataset {name!r}; expected one of {', '.join(splits)}")
    return cls(split=split, **options)


__all__ = [
    "BACKGROUNDS",
    "CHALLENGES",
    "CLASSES",
    "DATASETS",
    "ENV_NAMES",
    "SPLITS",
    "CsvDataset",
    "GroupDataset",
    "ImageFileDataset",
    "SpawriousDataset",
    "SyntheticDataset",
    "WaterbirdsDataset",
    "carve_validation",
    "dataset_options",
    "get_challenge",
    "get_dataset",
    "register_dataset",
]
