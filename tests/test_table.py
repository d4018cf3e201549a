"""The one reader of image tables (ex2l_xai/data/table.py): split spellings, labels by name or integer, errors that
name the file, column, row and value; and the training ``csv`` dataset and the audit's FolderDataset reading one
CSV the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.datasets import FolderDataset
from ex2l_xai.data import get_dataset
from ex2l_xai.data.table import SPLIT_SPELLINGS, id_column, read_image_table, resolve_csv, split_column
from ex2l_xai.errors import DataError


def _write(root: Path, rows: list[dict[str, object]], name: str = "metadata.csv") -> Path:
    """``rows`` as a CSV under ``root``, with an 8x8 PNG for every ``path`` (its red channel = the row number)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(rows):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / str(r["path"]))
    pd.DataFrame(rows).to_csv(root / name, index=False)
    return root / name


def _frame(**cols: list[object]) -> pd.DataFrame:
    return pd.DataFrame(cols)


def test_every_split_spelling_and_only_those() -> None:
    assert SPLIT_SPELLINGS == {"train": ("train", "0"), "val": ("val", "valid", "validation", "1"),
                               "test": ("test", "2")}
    df = _frame(split=["train", "0", " VAL ", "valid", "Validation", "1", "1.0", "test", "2", "TEST"])
    assert split_column(df, "t.csv").tolist() == ["train", "train", "val", "val", "val", "val", "val", "test",
                                                  "test", "test"]
    assert split_column(_frame(split=[0, 1, 2, 1]), "t.csv").tolist() == ["train", "val", "test", "val"]
    for bad, row in (("training", 2), ("dev", 2), ("3", 2), ("", 2)):
        with pytest.raises(DataError, match=rf"CSV file 't.csv' column 'split' row {row} has value .*; expected a "
                                            r"split \(train: train, 0; val: val, valid, validation, 1; test"):
            split_column(_frame(split=["test", bad, "val"]), "t.csv")


def test_labels_by_integer_or_by_name() -> None:
    ids, names = id_column(_frame(label=[7, 3, 7, 3.0]), "label", "t.csv")
    assert ids.tolist() == [1, 0, 1, 0] and names == ["3", "7"] and ids.dtype == np.int64
    ids, names = id_column(_frame(label=["water", " land", "water"]), "label", "t.csv")
    assert ids.tolist() == [1, 0, 1] and names == ["land", "water"]
    # with a list of names: a name of the list or an id in range, in any mix
    ids, names = id_column(_frame(label=["dog", 0, "1", "cat"]), "label", "t.csv", ["cat", "dog"])
    assert ids.tolist() == [1, 0, 1, 0] and names == ["cat", "dog"]


@pytest.mark.parametrize(("values", "names", "message"), [
    ([1, "seven", 2], None, r"column 'label' mixes integers \(row 1: 1\) and names \(row 2: 'seven'\)"),
    ([1, 2.5], None, r"column 'label' row 2 has value 2.5; expected an integer or a name"),
    ([1, None], None, r"column 'label' row 2 is empty"),
    (["cat", "cow"], ["cat", "dog"], r"column 'label' row 2 has value 'cow'; expected one of \['cat', 'dog'\] or "
                                     r"an id in \[0, 2\) because label_names has 2 names"),
    ([0, 2], ["cat", "dog"], r"column 'label' row 2 has value 2; expected one of"),
])
def test_label_errors_name_the_file_column_row_and_value(values: list[object], names: list[str] | None,
                                                         message: str) -> None:
    with pytest.raises(DataError, match=r"CSV file 't.csv' " + message):
        id_column(_frame(label=values), "label", "t.csv", names)


def test_read_image_table_resolves_paths_env_and_splits(tmp_path: Path) -> None:
    rows = [{"path": f"img/{i}.png", "label": ["cat", "dog"][i % 2], "confounder": i % 3,
             "split": ["train", "valid", "test", "validation"][i % 4]} for i in range(8)]
    csv = _write(tmp_path, rows)
    table = read_image_table(csv, tmp_path)
    assert table.label_names == ["cat", "dog"] and table.confounder_names == ["0", "1", "2"]
    assert table.env_names == table.confounder_names and (table.rows["env"] == table.rows["confounder"]).all()
    assert table.rows["path"].tolist() == [str(tmp_path / f"img/{i}.png") for i in range(8)]
    assert table.select("val")["path"].tolist() == [str(tmp_path / f"img/{i}.png") for i in (1, 3, 5, 7)]
    assert resolve_csv(tmp_path, None) == csv and resolve_csv(tmp_path, "metadata.csv") == csv
    no_split = read_image_table(_write(tmp_path, [{k: v for k, v in r.items() if k != "split"} for r in rows],
                                       "plain.csv"), tmp_path)
    with pytest.raises(DataError, match=r"split 'val': CSV file .*plain.csv' has no 'split' column"):
        no_split.select("val")


def test_training_and_audit_read_one_csv_alike(tmp_path: Path) -> None:
    """The same CSV (names as labels, every accepted split spelling) gives the same rows, ids and names to the
    training ``csv`` dataset and to the audit's FolderDataset; a split value neither knows fails both alike."""
    spellings = ["train", "0", "val", "valid", "validation", "1", "test", "2"]
    rows = [{"path": f"img/{i}.png", "label": ["cat", "dog"][i % 2], "confounder": ["land", "water"][(i // 2) % 2],
             "env": i % 3, "split": spellings[i % 8]} for i in range(24)]
    csv = _write(tmp_path, rows)
    for split, n in (("train", 6), ("val", 12), ("test", 6)):
        train_side = get_dataset("csv", split, root=str(tmp_path), image_size=8)
        audit_side = FolderDataset(tmp_path, csv, split=split, image_size=8)
        assert len(train_side) == len(audit_side) == n
        for col in ("path", "label", "confounder", "env"):
            assert train_side.table[col].tolist() == audit_side.table[col].tolist(), (split, col)
        assert train_side.label_names == audit_side.label_names == ["cat", "dog"]
        assert train_side.confounder_names == audit_side.confounder_names == ["land", "water"]
        assert train_side.groups == audit_side.groups
        assert float(train_side[0]["image"][0, 0, 0]) == float(audit_side[0]["image"][0, 0, 0])
    rows[5]["split"] = "holdout"
    _write(tmp_path, rows)
    message = r"metadata.csv' column 'split' row 6 has value 'holdout'; expected a split"
    with pytest.raises(DataError, match=message):
        get_dataset("csv", "train", root=str(tmp_path), image_size=8)
    with pytest.raises(DataError, match=message):
        FolderDataset(tmp_path, csv, split="test", image_size=8)
    with pytest.raises(DataError, match=message):  # auditing every row still refuses it: no row is dropped silently
        FolderDataset(tmp_path, csv, split="all", image_size=8)
