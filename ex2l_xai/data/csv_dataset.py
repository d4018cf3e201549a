"""Any folder of images plus a CSV with ``path, label, confounder[, env][, split]`` (dataset name ``csv``).

- ``path``: image path, relative to ``root`` (or absolute).
- ``label``, ``confounder``, ``env``: integers. Without the ``*_names`` options, the sorted distinct values of
  the whole CSV become ids 0, 1, ... and their names are the values as text (``label`` values 3 and 7 -> ids
  0, 1, names "3", "7"). With ``label_names`` (or ``confounder_names``, ``env_names``) the values are the ids
  and must lie in ``[0, len(names))``. Without an ``env`` column, ``env`` = ``confounder`` (as for
  Waterbirds).
- ``split``: ``train``/``val``/``test`` (any case) or 0/1/2. Without it, each (label, confounder, env) cell is
  split with ``seed``: ``round(test_fraction * n)`` rows to test, then ``round(val_fraction * m)`` of the
  remaining ``m`` to val.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ex2l_xai.data.base import (
    ImageFileDataset,
    carve_validation,
    check_missing_files,
    check_root,
    int_column,
    make_transform,
    read_csv,
)
from ex2l_xai.errors import DataError

SPLIT_VALUES = {"train": 0, "val": 1, "test": 2, "0": 0, "1": 1, "2": 2, "validation": 1, "valid": 1}


def _ids(
    values: np.ndarray, names: Sequence[str] | None, col: str, path: str
) -> tuple[np.ndarray, list[str]]:
    if names is not None:
        names = [str(n) for n in names]
        bad = values[(values < 0) | (values >= len(names))]
        if len(bad):
            raise DataError(
                f"CSV file {path!r} column {col!r} has value {int(bad[0])}; expected an id in "
                f"[0, {len(names)}) because {col}_names has {len(names)} names"
            )
        return values, names
    uniq = np.unique(values)
    return np.searchsorted(uniq, values), [str(int(v)) for v in uniq]


def _split_ids(df: pd.DataFrame, path: str) -> np.ndarray:
    out = np.empty(len(df), dtype=np.int64)
    for i, v in enumerate(df["split"].tolist()):
        key = str(v).strip().lower()
        if key.endswith(".0"):
            key = key[:-2]
        if key not in SPLIT_VALUES:
            raise DataError(
                f"CSV file {path!r} column 'split' row {i + 1} has value {v!r}; expected train, val, "
                "test or 0, 1, 2"
            )
        out[i] = SPLIT_VALUES[key]
    return out


class CsvDataset(ImageFileDataset):
    """Images listed in a CSV (see the module docstring for the columns and id rules).

    Parameters
    ----------
    split : str
        ``train``, ``val`` or ``test``.
    root : str
        Folder the ``path`` column is relative to.
    csv : str or None
        The CSV file (default ``<root>/metadata.csv``; a relative path is taken relative to ``root``).
    label_names, confounder_names, env_names : sequence of str or None
        Names of ids 0, 1, ...; when given, the column values are used as ids.
    image_size : int
        Images are resized to ``image_size`` x ``image_size`` (default 224), in [0, 1] (the toolkit's backbones
        normalise their own input); ``normalize=True`` ImageNet-normalises them for a model that does not.
    seed, val_fraction, test_fraction : int, float, float
        Used only when the CSV has no ``split`` column.
    augment, skip_unreadable, transform
        As for the other file datasets.
    """

    name = "csv"

    def __init__(
        self,
        split: str = "train",
        root: str | None = None,
        csv: str | None = None,
        label_names: Sequence[str] | None = None,
        confounder_names: Sequence[str] | None = None,
        env_names: Sequence[str] | None = None,
        image_size: int = 224,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        augment: bool = False,
        normalize: bool = False,
        skip_unreadable: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        root_path = check_root(root, "csv", "the folder the CSV's image paths are relative to")
        if split not in self.splits:
            raise DataError(
                f"unknown split {split!r} for dataset 'csv'; expected one of {', '.join(self.splits)}"
            )
        csv_path = root_path / "metadata.csv" if csv is None else Path(csv).expanduser()
        if not csv_path.is_absolute() and not csv_path.exists():
            csv_path = root_path / csv_path
        self.root, self.csv = str(root_path), str(csv_path)
        df = read_csv(
            csv_path, ["path", "label", "confounder"], "columns path, label, confounder[, env][, split]"
        )
        labels, lnames = _ids(int_column(df, "label", csv_path), label_names, "label", self.csv)
        confs, cnames = _ids(int_column(df, "confounder", csv_path), confounder_names, "confounder", self.csv)
        if "env" in df.columns:
            envs, enames = _ids(int_column(df, "env", csv_path), env_names, "env", self.csv)
        else:
            envs, enames = confs, list(env_names) if env_names is not None else cnames
        paths = [str(p) if Path(str(p)).is_absolute() else str(root_path / str(p)) for p in df["path"]]
        table = pd.DataFrame({"path": paths, "label": labels, "confounder": confs, "env": envs})
        want = {"train": 0, "val": 1, "test": 2}[split]
        if "split" in df.columns:
            self._split_rule = f"rows with split {split!r} or {want}"
            table = table[_split_ids(df, self.csv) == want]
        else:
            self._split_rule = (
                f"a seeded split with val_fraction={val_fraction}, test_fraction={test_fraction}"
            )
            rest, test = carve_validation(table, float(test_fraction), int(seed), stream=104729)
            if split == "test":
                table = table.iloc[test]
            else:
                pool = table.iloc[rest]
                train, val = carve_validation(pool, float(val_fraction), int(seed))
                table = pool.iloc[train if split == "train" else val]
        table, n_missing = check_missing_files(table, skip_unreadable, self.csv)
        self.image_size = int(image_size)
        if transform is None:
            transform = make_transform(
                self.image_size, augment=bool(augment) and split == "train", normalize=normalize
            )
        super().__init__(split, table, lnames, cnames, enames, transform, skip_unreadable, normalize)
        self.n_skipped += n_missing

    def _empty_hint(self) -> str:
        return f" ({self.csv!r}: {self._split_rule} selected no readable rows)"
