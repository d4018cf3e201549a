"""Confounders from a file: inferred groups (``ex2l infer-confounders``) in place of the dataset's own.

A *confounder table* is a CSV with one row per sample of the splits it covers: columns ``split``, ``index`` (the
sample's position in that split, as :class:`~ex2l_xai.data.base.GroupDataset` numbers it) and ``confounder`` (an
integer id), optionally ``label`` (checked against the dataset's, so a table written for other data is refused)
and ``path``. ``data.confounders=FILE`` in a training config replaces the confounder of every split the table
covers; GroupDRO's groups become (label, inferred confounder) and eX2L's confounder head learns the inferred
confounder. Splits the table does not cover (``test``, ``oracle_val``) keep their true confounders, so the test
metrics are still taken on the true groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ex2l_xai.data.base import GroupDataset, int_column, read_csv
from ex2l_xai.errors import DataError

__all__ = ["ConfounderTable", "Relabelled", "apply_confounders", "read_confounders", "write_confounders"]

COLUMNS = ("split", "index", "confounder")
WHAT = "a confounder table (columns split, index, confounder; optional label, path), as `ex2l infer-confounders` writes"


@dataclass(frozen=True)
class ConfounderTable:
    """The confounders of a table, per split: ``ids[split]`` (n,) confounder id of sample ``i`` of the split,
    ``labels[split]`` its label where the table has the column (else None); ``names`` the confounder names
    (``"inferred <id>"``, one per id from 0 to the largest); ``path`` the file."""

    ids: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]
    names: list[str]
    path: str


def read_confounders(path: str | os.PathLike[str]) -> ConfounderTable:
    """Read and check a confounder table: every covered split lists the indices 0..n-1 once each, ids >= 0."""
    df = read_csv(path, COLUMNS, WHAT)
    if df.empty:
        raise DataError(f"CSV file {str(path)!r} has no rows; expected {WHAT}")
    index = int_column(df, "index", path)
    conf = int_column(df, "confounder", path)
    labels = int_column(df, "label", path) if "label" in df.columns else None
    if (conf < 0).any():
        row = int(np.flatnonzero(conf < 0)[0]) + 1
        raise DataError(f"CSV file {str(path)!r} column 'confounder' row {row} has value {conf[row - 1]}; "
                        "expected an id >= 0")
    split = df["split"].astype(str).str.strip().to_numpy()
    ids: dict[str, np.ndarray] = {}
    lab: dict[str, np.ndarray | None] = {}
    for s in dict.fromkeys(split):
        rows = np.flatnonzero(split == s)
        order = np.argsort(index[rows], kind="stable")
        got = index[rows][order]
        if not np.array_equal(got, np.arange(rows.size)):
            bad = int(np.flatnonzero(got != np.arange(rows.size))[0])
            raise DataError(f"CSV file {str(path)!r} split {s!r}: column 'index' must list 0..{rows.size - 1} once "
                            f"each; sample {bad} is missing or repeated")
        ids[s] = conf[rows][order]
        lab[s] = None if labels is None else labels[rows][order]
    names = [f"inferred {i}" for i in range(int(conf.max()) + 1)]
    return ConfounderTable(ids=ids, labels=lab, names=names, path=str(path))


class Relabelled(GroupDataset):
    """A split of a dataset with its confounders replaced: images, masks, labels and environments come from
    ``inner``; ``confounder`` (and so the groups) from ``ids``, named by ``names``. The dataset's own confounder
    stays in ``table["true_confounder"]`` (:attr:`true_confounders`)."""

    def __init__(self, inner: GroupDataset, ids: np.ndarray, names: list[str]) -> None:
        self.inner = inner
        self.name, self.splits, self.has_masks = inner.name, inner.splits, inner.has_masks
        self.mean, self.std = inner.mean, inner.std
        table = inner.table.drop(columns="group").assign(true_confounder=inner.confounders, confounder=ids)
        super().__init__(inner.split, table, inner.label_names, names, inner.env_names)

    @property
    def true_confounders(self) -> np.ndarray:
        """The dataset's own confounder id of every sample."""
        return self.table["true_confounder"].to_numpy()

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inner dataset's image and mask of sample ``index``."""
        return self.inner.load(index)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)


def apply_confounders(dataset: GroupDataset, table: ConfounderTable) -> GroupDataset:
    """``dataset`` with its confounders replaced by the table's (a :class:`Relabelled` view), if the table covers
    its split; ``dataset`` itself otherwise. Raises :class:`DataError` when the split's size or labels disagree."""
    split = dataset.split
    if split not in table.ids:
        return dataset
    ids = table.ids[split]
    where = f"confounder table {table.path!r} split {split!r}"
    if ids.size != len(dataset):
        raise DataError(f"{where} has {ids.size} rows; expected one per sample of the dataset's {split} split "
                        f"({len(dataset)}): the table was written for other data")
    labels = table.labels[split]
    if labels is not None and not np.array_equal(labels, dataset.labels):
        i = int(np.flatnonzero(labels != dataset.labels)[0])
        raise DataError(f"{where} row for sample {i} has label {int(labels[i])}; the dataset's sample {i} has "
                        f"label {int(dataset.labels[i])}: the table was written for other data")
    return Relabelled(dataset, ids, table.names)


def write_confounders(path: str | os.PathLike[str], frames: dict[str, pd.DataFrame]) -> Path:
    """Write a confounder table atomically from per-split frames (columns index, confounder, label[, path])."""
    from ex2l_xai.fileio import atomic_write

    parts = [f.assign(split=s)[["split", *[c for c in f.columns if c != "split"]]] for s, f in frames.items()]
    out = Path(path)
    atomic_write(out, pd.concat(parts, ignore_index=True).to_csv(index=False))
    return out
