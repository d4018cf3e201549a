"""Auditing data nobody labelled: `ex2l audit --data DIR` on a bare DIR/<class>/<image> tree (no CSV), a CSV with
path and label only, the slice check on data with and without confounders, and the clear errors of bad folders."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import write_png

from analysis.audit import AuditTarget, audit_one
from analysis.datasets import FolderDataset
from ex2l_xai.data import get_dataset
from ex2l_xai.errors import DataError, Ex2lError

SIZE = 32


def _write_tree(root: Path, per_group: int = 3) -> object:
    ds = get_dataset("synthetic", "test", image_size=SIZE, per_group=per_group, test_per_group=per_group)
    for i in range(len(ds)):
        s = ds[i]
        write_png(root / ds.label_names[s["label"]] / f"{i:03d}.png", s["image"].numpy())
    return ds


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("bare") / "imgs"
    return root, _write_tree(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    return path


def test_bare_tree_reads_labels_from_folders_without_confounders(bare) -> None:
    root, ds = bare
    folder = FolderDataset(root, image_size=SIZE)
    assert folder.layout == "bare" and not folder.has_confounders and folder.csv is None
    assert folder.label_names == sorted(set(ds.label_names))
    assert len(folder) == len(ds)
    for j in (0, len(folder) - 1):
        assert Path(folder.table["path"][j]).parent.name == folder.label_names[folder[j]["label"]]
        assert folder[j]["confounder"] == 0


def test_cli_audits_a_bare_folder_given_relatively(bare, weights, tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ex2l_xai.cli import main

    root, ds = bare
    monkeypatch.chdir(root.parent)  # --data imgs: joined once, from the working directory (was imgs/imgs/...)
    out = tmp_path / "a"
    rc = main(["audit", "--model", "resnet18", "--weights", str(weights), "--data", root.name, "--out", str(out),
               "--image-size", str(SIZE), "--interventions", "0", "--sanity-samples", "4", "--sanity-steps", "2",
               "--rows", "2", "--umap-epochs", "20", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "report.html").is_file()
    html = (out / "report.html").read_text()
    assert "Discovered slices and spuriosity" in html and "no confounder" in html
    (entry,) = json.loads((out / "audit.json").read_text())["runs"]
    disc = entry["discovery"]
    assert disc["groups"] == "slices" and disc["method"] == "gmm-bic" and "ari" not in disc
    assert sum(r["size"] for r in entry["slices"]) == len(ds) == entry["n_samples"]
    assert set(disc["k"]) == set(ds.label_names)
    # groups are the slices: the worst group is the worst slice; the circular checks are skipped with their reason
    assert entry["worst_group_acc"] == pytest.approx(min(r["acc"] for r in entry["slices"]))
    assert "by construction" in entry["skipped"]["leakage"] and "by construction" in entry["skipped"]["latent_space"]
    assert "seconds" in entry and entry["seconds"]["slices"] >= 0
    with open(out / "slices.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ds)
    assert list(rows[0])[:6] == ["model", "index", "path", "label", "slice", "spuriosity"]
    folder = FolderDataset(root, image_size=SIZE)
    for r in rows:
        assert Path(r["path"]).is_file() and Path(r["path"]).is_absolute()
        assert Path(r["path"]).parent.name == folder.label_names[int(r["label"])]
    assert "/slice" not in {r["label_name"] for r in rows}


def test_csv_with_path_and_label_only(bare, tmp_path: Path) -> None:
    root, _ = bare
    folder = FolderDataset(root, image_size=SIZE)
    table = folder.table[["path", "label"]]
    table.to_csv(tmp_path / "labels.csv", index=False)
    read = FolderDataset(root, tmp_path / "labels.csv", image_size=SIZE)
    assert read.layout == "csv" and not read.has_confounders
    np.testing.assert_array_equal(read.labels, folder.labels)


def test_slices_on_data_with_confounders_are_scored_and_change_nothing(bare, weights) -> None:
    """A dataset with confounders: the slices are new keys with ARI/NMI; the groups stay the confounder's."""
    from analysis.loading import load_model
    from ex2l_xai.metrics import group_metrics

    model, _ = load_model("resnet18", str(weights), num_classes=4)
    ds = get_dataset("synthetic", "test", image_size=SIZE, per_group=3, test_per_group=3)
    res = audit_one(AuditTarget(model=model, dataset=ds), checks=["slices", "accuracy"], max_samples=None)
    e, ext = res.entry, res.extraction
    assert e["discovery"]["groups"] == "confounder"
    for key in ("ari", "nmi", "ari_per_class", "nmi_per_class", "true_worst_group_acc"):
        assert key in e["discovery"]
    np.testing.assert_array_equal(ext.confounders, [int(ds[int(i)]["confounder"]) for i in ext.indices])
    expected = group_metrics(ext.preds, ext.labels, ext.groups, ext.group_names)["worst_group_acc"]
    assert e["worst_group_acc"] == pytest.approx(expected)
    assert e["discovery"]["true_worst_group_acc"] == pytest.approx(expected)


# ---- errors ---------------------------------------------------------------------------------------------------
def _two_classes(root: Path, n: int = 2) -> None:
    img = np.zeros((3, 8, 8), dtype=np.float32)
    for c in ("a", "b"):
        for i in range(n):
            write_png(root / c / f"{i}.png", img)


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    one = tmp_path / "one"
    write_png(one / "a" / "0.png", np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match="one class folder \\('a'\\)"):
        FolderDataset(one)
    empty = tmp_path / "empty"
    _two_classes(empty)
    (empty / "c").mkdir()
    with pytest.raises(DataError, match=f"class folder '{empty / 'c'}' is empty"):
        FolderDataset(empty)
    other = tmp_path / "other"
    _two_classes(other)
    (other / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt' is not an image"):
        FolderDataset(other)
    with pytest.raises(DataError, match="no class folders and no CSV"):
        FolderDataset(tmp_path / "empty" / "c")


def test_unreadable_image_error_and_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "bad"
    _two_classes(root)
    (root / "b" / "broken.png").write_bytes(b"not a png")
    folder = FolderDataset(root, image_size=8)
    idx = [str(p) for p in folder.table["path"]].index(str(root / "b" / "broken.png"))
    with pytest.raises(DataError, match="broken.png.*--skip-unreadable"):
        folder[idx]
    with caplog.at_level(logging.WARNING):
        skipped = FolderDataset(root, image_size=8, skip_unreadable=True)
    assert len(skipped) == 4 and skipped.n_skipped == 1
    assert "skipped 1 unreadable image(s) of 5" in caplog.text


def test_unknown_model_name_lists_where_names_come_from(bare, weights, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from ex2l_xai.cli import main

    root, _ = bare
    assert main(["audit", "--model", "resnet1", "--weights", str(weights), "--data", str(root), "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model name 'resnet1'" in err and "timm:NAME" in err and "TorchScript" in err
    with pytest.raises(Ex2lError, match="unknown kind 'tv'"):
        from analysis.loading import check_model_spec

        check_model_spec("tv:resnet18")
