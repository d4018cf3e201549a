"""Inferred confounders: the clustering beside the label (planted answers), the confounder table's contract and
errors, and GroupDRO / eX2L trained on an inferred table through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY

from analysis.infer_confounders import fit_confounders, score_inferred
from ex2l_xai.cli import main
from ex2l_xai.data import get_dataset
from ex2l_xai.data.inferred import Relabelled, apply_confounders, read_confounders, write_confounders
from ex2l_xai.errors import DataError, Ex2lError

TINY_DATA = {"image_size": 32, "per_group": 8, "test_per_group": 8}


def _planted(conf_dirs: np.ndarray, n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """Latents ``class vector + confounder vector + noise`` (3 classes, 4 confounders shared across classes,
    every (class, confounder) pair present) and the head weights (the class vectors)."""
    rng = np.random.default_rng(seed)
    classes = 6.0 * np.eye(12)[:3]
    labels = rng.integers(0, 3, n)
    conf = rng.integers(0, 4, n)
    z = classes[labels] + conf_dirs[conf] + 0.3 * rng.standard_normal((n, 12))
    return z, labels, conf, classes


def test_clusters_beside_the_label_recover_a_planted_confounder() -> None:
    dirs = 3.0 * np.eye(12)[6:10]  # orthogonal to the label head's rows
    z, labels, conf, w = _planted(dirs)
    model = fit_confounders(z, labels, w, k_max=6)
    assert model.k == 4  # BIC finds the four confounders, not the 3 x 4 groups
    ids = model.predict(z, labels)
    assert score_inferred(ids, labels, conf)["ari"] > 0.95
    assert np.bincount(ids).tolist() == sorted(np.bincount(ids).tolist(), reverse=True)  # 0 = the largest


def test_structure_the_label_head_reads_is_removed() -> None:
    # the confounder planted *along the label head's directions* (a mix of the class vectors' differences) cannot
    # be found: those directions are projected out; the same planted structure off them is found
    w = 6.0 * np.eye(12)[:3]
    along = np.stack([np.r_[[a, -a, 0.0], np.zeros(9)] for a in (-4.5, -1.5, 1.5, 4.5)])
    z, labels, conf, _ = _planted(along)
    assert abs(score_inferred(fit_confounders(z, labels, w, k=4).predict(z, labels), labels, conf)["ari"]) < 0.05
    off = np.stack([np.r_[np.zeros(3), [a, 0.0], np.zeros(7)] for a in (-4.5, -1.5, 1.5, 4.5)])
    z, labels, conf, _ = _planted(off)
    assert score_inferred(fit_confounders(z, labels, w, k=4).predict(z, labels), labels, conf)["ari"] > 0.9


def test_fit_rejects_bad_k() -> None:
    z, labels, _, w = _planted(np.zeros((4, 12)), n=50)
    with pytest.raises(Ex2lError, match="2 <= k"):
        fit_confounders(z, labels, w, k=1)


def _table(tmp_path: Path, rows: list[tuple], columns=("split", "index", "confounder")) -> Path:
    path = tmp_path / "conf.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_relabelled_split_keeps_images_and_takes_the_tables_groups(tmp_path: Path) -> None:
    ds = get_dataset("synthetic", "train", **TINY_DATA)
    ids = np.arange(len(ds)) % 3
    frames = {"train": pd.DataFrame({"index": np.arange(len(ds)), "confounder": ids, "label": ds.labels})}
    table = read_confounders(write_confounders(tmp_path / "t.csv", frames))
    new = apply_confounders(ds, table)
    assert isinstance(new, Relabelled)
    assert new.n_confounders == 3 and new.confounder_names == ["inferred 0", "inferred 1", "inferred 2"]
    assert np.array_equal(new.confounders, ids) and np.array_equal(new.true_confounders, ds.confounders)
    assert np.array_equal(new.group_ids, ds.labels * 3 + ids)
    for i in (0, len(ds) - 1):  # the image is the dataset's own (the synthetic renderer draws the true background)
        a, b = ds[i], new[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert b["confounder"] == ids[i] and b["label"] == a["label"]
    val = get_dataset("synthetic", "val", **TINY_DATA)
    assert apply_confounders(val, table) is val  # a split the table does not cover keeps its confounders


def test_confounder_table_errors_name_the_file_and_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lacks column 'confounder'"):
        read_confounders(_table(tmp_path, [("train", 0)], ("split", "index")))
    with pytest.raises(DataError, match=r"split 'train'.*sample 1 is missing or repeated"):
        read_confounders(_table(tmp_path, [("train", 0, 1), ("train", 2, 0)]))
    with pytest.raises(DataError, match="expected an id >= 0"):
        read_confounders(_table(tmp_path, [("train", 0, -1)]))
    ds = get_dataset("synthetic", "train", **TINY_DATA)
    short = read_confounders(_table(tmp_path, [("train", 0, 1)]))
    with pytest.raises(DataError, match=rf"has 1 rows; expected one per sample .*\({len(ds)}\)"):
        apply_confounders(ds, short)
    wrong = [("train", i, 0, (int(y) + 1) % ds.n_labels) for i, y in enumerate(ds.labels)]
    table = read_confounders(_table(tmp_path, wrong, ("split", "index", "confounder", "label")))
    with pytest.raises(DataError, match="sample 0 has label .*written for other data"):
        apply_confounders(ds, table)


def test_config_names_a_missing_table(tmp_path: Path) -> None:
    from ex2l_xai.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.confounders: .*nope.csv.* is not a file"):
        load_config("quick", [*TINY, f"data.confounders={tmp_path / 'nope.csv'}"])


def test_groupdro_and_ex2l_train_on_inferred_confounders_through_the_cli(tmp_path: Path, capsys) -> None:
    first = tmp_path / "erm"
    assert main(["train", "-c", "quick", *sum((["--set", s] for s in TINY), []), "--set", "algorithm.name=erm",
                 "--out", str(first), "-q"]) == 0
    table = tmp_path / "inferred.csv"
    assert main(["infer-confounders", str(first), "--out", str(table), "--k", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "k = 3 confounders" in out and "ARI" in out
    report = json.loads(Path(f"{table}.json").read_text())
    ds = get_dataset("synthetic", "train", **TINY_DATA)
    frame = pd.read_csv(table)
    assert set(frame["split"]) == {"train", "val"} and (frame["split"] == "train").sum() == len(ds)
    expected = score_inferred(frame[frame.split == "train"]["confounder"].to_numpy(), ds.labels, ds.confounders)
    assert report["splits"]["train"]["ari"] == pytest.approx(expected["ari"])
    for algo in ("groupdro", "ex2l"):
        run = tmp_path / algo
        assert main(["train", "-c", "quick", *sum((["--set", s] for s in TINY), []), "--set", f"algorithm.name={algo}",
                     "--set", f"data.confounders={table}", "--out", str(run), "-q"]) == 0
        payload = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
        state = payload["model"] if "model" in payload else payload
        if algo == "ex2l":  # the confounder head learns the 3 inferred confounders, not the 4 true backgrounds
            heads = [v for k, v in state.items() if "conf_head" in k and k.endswith("weight")]
            assert heads and heads[0].shape[0] == 3
        results = json.loads((run / "results.json").read_text())
        # the test metrics are taken on the true groups (the table covers train and val only), validation's on the
        # inferred ones
        test = get_dataset("synthetic", "test", **TINY_DATA)
        assert set(results["test"]["per_group"]) == {test.groups[g] for g in np.unique(test.group_ids)}
        assert all(g.split("/")[1].startswith("inferred ") for g in results["val"]["per_group"])
