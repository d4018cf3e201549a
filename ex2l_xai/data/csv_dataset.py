"""Any folder of images plus a CSV with ``path, label, confounder[, env][, split]`` (dataset name ``csv``).

The CSV is read by :func:`ex2l_xai.data.table.read_image_table`, the project's one reader of image tables (the
audit's ``--data DIR --csv FILE`` reads the same way):

- ``path``: image path, relative to ``root`` (or absolute).
- ``label``, ``confounder``, ``env``: integers or names. Without the ``*_names`` options, the sorted distinct
  values become ids 0, 1, ... and their names are the values as text (``label`` values 3 and 7 -> ids 0, 1,
  names "3", "7"). With ``label_names`` (or ``confounder_names``, ``env_names``) a value is one of the names or
  an id in ``[0, len(names))``. Without an ``env`` column, ``env`` = ``confounder`` (as for Waterbirds).
- ``split``: ``train``/``val``/``test`` (any case; also ``valid``, ``validation``) or 0/1/2; any other value is
  an error naming it. Without the column, each (label, confounder, env) cell is split with ``seed``:
  ``round(test_fraction * n)`` rows to test, then ``round(val_fraction * m)`` of the remaining ``m`` to val.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ex2l_xai.data.base import (
    ImageFileDataset,
    carve_validation,
    check_missing_files,
    check_root,
    make_transform,
)
from ex2l_xai.data.table import SPLIT_SPELLINGS, read_image_table, resolve_csv
from ex2l_xai.errors import DataError


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
        csv_path = resolve_csv(root_path, csv)
        self.root, self.csv = str(root_path), str(csv_path)
        read = read_image_table(csv_path, root_path, label_names=label_names, confounder_names=confounder_names,
                                env_names=env_names)
        lnames, cnames, enames = read.label_names or [], read.confounder_names, read.env_names
        if read.has_split:
            self._split_rule = f"rows with split {' or '.join(repr(v) for v in SPLIT_SPELLINGS[split])}"
            table = read.select(split).drop(columns="split")
        else:
            table = read.rows
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
