"""The one reader of image tables: a CSV that lists images with their label, confounder, environment and split.

Training (the ``csv`` dataset, :class:`~ex2l_xai.data.csv_dataset.CsvDataset`) and the audit
(``analysis.datasets.FolderDataset``, ``ex2l audit --data DIR --csv FILE``) read their CSVs here, with one set of
rules:

- ``path`` (and any other path column named in ``path_columns``, such as ``mask``): relative to the root folder,
  or absolute.
- ``label``, ``confounder``, ``env``: integers or names, one kind per column. Without a list of names, the sorted
  distinct values become ids 0, 1, ... and their text the names (integers 3 and 7 -> ids 0, 1, names "3", "7";
  names "land", "water" -> ids 0, 1). With a list of names, a value is a name of the list or an id in
  ``[0, len(names))``.
- ``split``: one of :data:`SPLIT_SPELLINGS` (any case, spaces around ignored): ``train`` or 0; ``val``,
  ``valid``, ``validation`` or 1; ``test`` or 2. Any other value is an error naming the file, the column, the
  row and the value; no row is dropped silently.

Every error is a :class:`~ex2l_xai.errors.DataError` naming the file, the column, the 1-based data row and the
value, and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ex2l_xai.data.base import read_csv
from ex2l_xai.errors import DataError

__all__ = ["SPLIT_SPELLINGS", "ImageTable", "id_column", "read_image_table", "resolve_csv", "split_column"]

SPLIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "train": ("train", "0"),
    "val": ("val", "valid", "validation", "1"),
    "test": ("test", "2"),
}
"""Split -> the values of a ``split`` column that mean it (compared lower-cased, stripped; ``1.0`` reads as 1)."""

_SPLIT_OF = {spelling: split for split, spellings in SPLIT_SPELLINGS.items() for spelling in spellings}
_EXPECTED_SPLITS = "; ".join(f"{s}: {', '.join(v)}" for s, v in SPLIT_SPELLINGS.items())


def _where(path: str | os.PathLike[str], col: str, row: int) -> str:
    return f"CSV file {str(path)!r} column {col!r} row {row}"


def _is_empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _as_int(v: Any) -> int | None:
    """``v`` as an integer when it is one (``3``, ``"3"``, ``3.0``), None for text that is not a number; a
    ValueError for a number that is not an integer."""
    if isinstance(v, bool):
        return int(v)
    try:
        f = float(str(v).strip())
    except (TypeError, ValueError):
        return None
    if f != f or f in (float("inf"), float("-inf")) or f != int(f):
        raise ValueError(v)
    return int(f)


def split_column(df: pd.DataFrame, path: str | os.PathLike[str], col: str = "split") -> np.ndarray:
    """The canonical split (``train``, ``val``, ``test``) of every row of column ``col``; DataError for a value
    that is none of :data:`SPLIT_SPELLINGS`'s, naming the file, column, row and value."""
    out = []
    for i, v in enumerate(df[col].tolist()):
        key = "" if _is_empty(v) else str(v).strip().lower()
        key = key[:-2] if key.endswith(".0") else key
        if key not in _SPLIT_OF:
            raise DataError(f"{_where(path, col, i + 1)} has value {v!r}; expected a split ({_EXPECTED_SPLITS})")
        out.append(_SPLIT_OF[key])
    return np.asarray(out, dtype=object)


def id_column(
    df: pd.DataFrame, col: str, path: str | os.PathLike[str], names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Ids (int64) and names of column ``col`` of integers or names (the module's rules).

    Raises
    ------
    DataError
        For an empty cell, a number that is not an integer, a column that mixes integers and names, or (with
        ``names``) a value that is neither a name of the list nor an id in range; naming the file, column, row
        and value.
    """
    raw = df[col].tolist()
    ints: list[int | None] = []
    for i, v in enumerate(raw):
        if _is_empty(v):
            raise DataError(f"{_where(path, col, i + 1)} is empty; expected an integer or a name on every row")
        try:
            ints.append(_as_int(v))
        except ValueError:
            raise DataError(f"{_where(path, col, i + 1)} has value {v!r}; expected an integer or a name") from None
    if names is not None:
        return _ids_from_names(raw, ints, [str(n) for n in names], col, path)
    if all(n is not None for n in ints):
        values = np.asarray(ints, dtype=np.int64)
        uniq = np.unique(values)
        return np.searchsorted(uniq, values).astype(np.int64), [str(int(u)) for u in uniq]
    numbers = [i for i, n in enumerate(ints) if n is not None]
    if numbers:
        first_name = next(i for i, n in enumerate(ints) if n is None)
        raise DataError(
            f"CSV file {str(path)!r} column {col!r} mixes integers (row {numbers[0] + 1}: {raw[numbers[0]]!r}) and "
            f"names (row {first_name + 1}: {raw[first_name]!r}); expected all integers or all names"
        )
    text = np.asarray([str(v).strip() for v in raw])
    uniq = np.unique(text)
    return np.searchsorted(uniq, text).astype(np.int64), [str(u) for u in uniq]


def _ids_from_names(
    raw: list[Any], ints: list[int | None], names: list[str], col: str, path: str | os.PathLike[str]
) -> tuple[np.ndarray, list[str]]:
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, (v, n) in enumerate(zip(raw, ints, strict=True)):
        text = str(v).strip()
        if text in index:
            out[i] = index[text]
        elif n is not None and 0 <= n < len(names):
            out[i] = n
        else:
            raise DataError(
                f"{_where(path, col, i + 1)} has value {v!r}; expected one of {names} or an id in "
                f"[0, {len(names)}) because {col}_names has {len(names)} names"
            )
    return out, names


def resolve_csv(root: Path, csv: str | os.PathLike[str] | None) -> Path:
    """The CSV file of a table: ``root/metadata.csv`` by default; a relative ``csv`` that does not exist as given
    is taken relative to ``root``."""
    if csv is None:
        return root / "metadata.csv"
    path = Path(csv).expanduser()
    return root / path if not path.is_absolute() and not path.exists() else path


@dataclass(frozen=True)
class ImageTable:
    """A read image table: ``rows`` has ``path`` (resolved), ``label`` (when the CSV has it), ``confounder``,
    ``env`` (= ``confounder`` without an ``env`` column), ``split`` (canonical, when the CSV has it) and the
    other path columns asked for, resolved; ids are int64."""

    csv: Path
    rows: pd.DataFrame
    label_names: list[str] | None
    confounder_names: list[str]
    env_names: list[str]
    has_confounder: bool = True

    @property
    def has_split(self) -> bool:
        """Whether the CSV has a ``split`` column."""
        return "split" in self.rows.columns

    def select(self, split: str) -> pd.DataFrame:
        """The rows of ``split`` (``train``, ``val`` or ``test``); DataError without a ``split`` column."""
        if split not in SPLIT_SPELLINGS:
            raise DataError(f"split {split!r}: expected one of {', '.join(SPLIT_SPELLINGS)}")
        if not self.has_split:
            raise DataError(f"split {split!r}: CSV file {str(self.csv)!r} has no 'split' column")
        return self.rows[self.rows["split"] == split]


def read_image_table(
    csv: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    require_label: bool = True,
    require_confounder: bool = True,
    label_names: Sequence[str] | None = None,
    confounder_names: Sequence[str] | None = None,
    env_names: Sequence[str] | None = None,
    path_columns: Sequence[str] = (),
    what: str = "columns path, label, confounder[, env][, split]",
) -> ImageTable:
    """Read the image table ``csv`` whose paths are relative to ``root`` (the module's rules).

    ``require_label=False`` reads a table whose labels come from elsewhere (an ImageFolder tree): its ``label``
    column is read when present. ``path_columns`` are other columns of paths (``mask``), resolved like ``path``
    when present. ``require_confounder=False`` reads a table without a ``confounder`` column (an audit of data nobody
    labelled): every row gets confounder 0 (name ``"none"``) and ``has_confounder`` is False. ``what`` describes
    the expected columns in errors."""
    root_path = Path(root)
    required = ["path"] + (["label"] if require_label else []) + (["confounder"] if require_confounder else [])
    df = read_csv(csv, required, what)
    has_confounder = "confounder" in df.columns
    if not has_confounder:
        if "env" in df.columns:
            raise DataError(f"CSV file {str(csv)!r} has an 'env' column but no 'confounder' column; expected both "
                            "or neither")
        df = df.assign(confounder=0)
        confounder_names = ["none"]
    rows = pd.DataFrame({"path": [_resolve(root_path, p) for p in df["path"]]})
    lnames = None
    if "label" in df.columns:
        rows["label"], lnames = id_column(df, "label", csv, label_names)
    rows["confounder"], cnames = id_column(df, "confounder", csv, confounder_names)
    if "env" in df.columns:
        rows["env"], enames = id_column(df, "env", csv, env_names)
    else:
        rows["env"], enames = rows["confounder"], list(env_names) if env_names is not None else list(cnames)
    if "split" in df.columns:
        rows["split"] = split_column(df, csv)
    for col in path_columns:
        if col in df.columns:
            rows[col] = [_resolve(root_path, p) for p in df[col]]
    return ImageTable(Path(csv), rows, lnames, cnames, enames, has_confounder)


def _resolve(root: Path, p: Any) -> str:
    return str(p) if Path(str(p)).is_absolute() else str(root / str(p))
