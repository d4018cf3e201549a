"""Auditing models trained elsewhere: `ex2l audit --model ... --data ...` on a torchvision ResNet-18 saved with
torch.save(state_dict) and an ImageFolder + CSV tree; TorchScript files give the same CAMs as the eager model;
timm models; plain (image, label) datasets with the confounder given separately, and one clear error without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from helpers import write_png
from PIL import Image

from analysis.datasets import AuditDataset, FolderDataset, as_audit_dataset, waterbirds_masks
from analysis.extract import extract
from analysis.loading import IMAGENET, Normalized, load_model, parse_normalization
from analysis.report import audit
from analysis.scripted import ScriptedClassifier, load_torchscript
from ex2l_xai.data import get_dataset
from ex2l_xai.errors import Ex2lError

SIZE = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """An ImageFolder tree (root/<class>/<n>.png) of 24 synthetic test images, their masks, and a CSV giving each
    file's background (by name) and mask."""
    root = tmp_path_factory.mktemp("tree")
    ds = get_dataset("synthetic", "test", image_size=SIZE, per_group=6, test_per_group=6)
    rows = []
    for i in range(len(ds)):
        s = ds[i]
        rel = f"{ds.label_names[s['label']]}/{i:03d}.png"
        write_png(root / rel, s["image"].numpy())
        Image.fromarray((s["mask"][0].numpy() * 255).astype(np.uint8)).save(root / f"mask_{i:03d}.png")
        rows.append({"path": rel, "confounder": ds.confounder_names[s["confounder"]], "mask": f"mask_{i:03d}.png"})
    pd.DataFrame(rows).to_csv(root / "audit.csv", index=False)
    return root, ds


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _expected_preds(model: torch.nn.Module, ds: object) -> np.ndarray:
    """What the model predicts on the tree's images, computed here directly: ImageNet-normalised inputs."""
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in IMAGENET)
    with torch.no_grad():
        return model((x - mean) / std).argmax(1).numpy()


def test_folder_dataset_reads_the_tree_exactly(tree) -> None:
    root, ds = tree
    folder = FolderDataset(root, "audit.csv", image_size=SIZE)
    assert folder.layout == "imagefolder" and folder.label_names == sorted(ds.label_names[i] for i in range(4))
    assert folder.confounder_names == sorted(set(ds.confounder_names[c] for c in ds.confounders))
    assert folder.mean is None and folder.has_masks and len(folder) == len(ds)
    for j in (0, 7, len(folder) - 1):
        s = folder[j]
        i = int(Path(folder.table["path"][j]).stem)
        # the PNG round trip keeps every 8-bit value (x / 255 and x * (1 / 255) differ in the last float bit)
        np.testing.assert_array_equal(np.round(s["image"].numpy() * 255), np.round(ds[i]["image"].numpy() * 255))
        np.testing.assert_array_equal(s["mask"].numpy(), ds[i]["mask"].numpy())
        assert folder.label_names[s["label"]] == ds.label_names[ds.labels[i]]
        assert folder.confounder_names[s["confounder"]] == ds.confounder_names[ds.confounders[i]]
        assert s["env"] == s["confounder"]  # no env column: the environment is the confounder


def test_cli_audits_a_resnet18_state_dict_on_an_imagefolder_tree(tree, resnet_file, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from ex2l_xai.cli import main

    root, _ = tree
    weights, model = resnet_file
    out = tmp_path / "audit"
    rc = main(["audit", "--model", "resnet18", "--weights", str(weights), "--data", str(root), "--csv", "audit.csv",
               "--image-size", str(SIZE), "--out", str(out), "--max-samples", "0", "--interventions", "24",
               "--sanity-samples", "8", "--sanity-steps", "3", "--rows", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "BG-gap" in printed and str(out / "report.html") in printed
    data = json.loads((out / "audit.json").read_text())
    (entry,) = data["runs"]
    folder = FolderDataset(root, "audit.csv", image_size=SIZE)
    preds = _expected_preds(model, folder)
    assert entry["avg_acc"] == pytest.approx(float(np.mean(preds == folder.labels)))
    # at 32 px ResNet-18's layer4 map is 1x1 (no spatial extent to explain): the default is the last map with one
    assert entry["name"] == "resnet18" and entry["layer"] == "layer3" and entry["latent"] == "input of fc"
    assert entry["normalization"] == {"mean": list(IMAGENET[0]), "std": list(IMAGENET[1])}
    assert str(weights) in entry["source"] and entry["n_samples"] == len(folder)
    iv = entry["interventions"]
    assert iv["available"] and iv["method"] == "composite" and iv["n"] == 24
    assert iv["original_acc"] == pytest.approx(entry["avg_acc"])
    assert iv["bg_gap"] == pytest.approx(iv["mixed_same_acc"] - iv["mixed_rand_acc"])
    san = entry["cam_sanity"]
    assert san["available"] and san["layer"] == "layer3" and len(san["steps"]) == 3
    assert san["steps"][0]["randomized"]["last"] == "fc"
    html = (out / "report.html").read_text()
    assert "Background swaps" in html and "CAM sanity check" in html and "mean [0.485, 0.456, 0.406]" in html


def test_torchscript_file_gives_the_eager_models_cams(tree, resnet_file, tmp_path: Path) -> None:
    root, _ = tree
    _, model = resnet_file
    path = tmp_path / "resnet18_scripted.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(model), str(path))
    folder = FolderDataset(root, "audit.csv", image_size=SIZE)
    scripted, info = load_model(str(path), num_classes=4)
    assert info["kind"] == "torchscript" and isinstance(scripted, Normalized)
    assert isinstance(scripted.inner, ScriptedClassifier)
    eager = Normalized(model, *IMAGENET)
    a = extract(scripted, folder, batch_size=10)
    b = extract(eager, folder, batch_size=10)
    assert a.meta["layer"] == b.meta["layer"] == "layer3"  # layer4 is 1x1 at 32 px
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    np.testing.assert_allclose(a.cams_true, b.cams_true, atol=1e-5)
    np.testing.assert_allclose(a.cams_pred, b.cams_pred, atol=1e-5)
    assert a.meta["latent"] == "global average pool of layer3" and b.meta["latent"] == "input of fc"
    c = extract(scripted, folder, layer="layer4", batch_size=10)
    np.testing.assert_allclose(c.latents, b.latents, atol=1e-5)  # the pool of layer4 IS the input of fc
    with pytest.raises(Ex2lError, match="layer9"):
        extract(scripted, folder, layer="layer9")
    # copies for the random baseline and the sanity check: own weights, the original untouched
    from analysis.modules import random_copy
    from analysis.sanity import cam_sanity

    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    rnd = random_copy(scripted, seed=0)
    x = torch.stack([folder[i]["image"] for i in range(4)])
    with torch.no_grad():
        assert not torch.allclose(rnd(x), scripted(x))
    res = cam_sanity(scripted, folder, max_samples=8, steps=3).summary
    assert res["layer"] == "layer3" and res["steps"][0]["randomized"]["last"] == "fc" and res["n_modules"] == 41
    for k, v in scripted.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_scripted_sequential_finds_its_cam_layer(tree) -> None:
    """A scripted nn.Sequential names its children without a leading SELF in the graph (its loop over children is
    unrolled): the CAM layer is still found, and the CAMs and logits equal the eager model's."""
    root, _ = tree
    folder = FolderDataset(root, "audit.csv", image_size=SIZE)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 4)).eval()
    with pytest.warns(FutureWarning):
        scripted = ScriptedClassifier(torch.jit.script(model))
    a, b = extract(scripted, folder, batch_size=10), extract(model, folder, batch_size=10)
    assert a.meta["layer"] == b.meta["layer"] == "3"
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    np.testing.assert_allclose(a.cams_true, b.cams_true, atol=1e-5)
    c = extract(scripted, folder, layer="2", batch_size=10)  # the conv before the ReLU: negative values too
    np.testing.assert_allclose(c.cams_true, extract(model, folder, layer="2", batch_size=10).cams_true, atol=1e-5)


def test_timm_model_from_a_state_dict(tree, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    root, _ = tree
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4).eval()
    torch.save(net.state_dict(), tmp_path / "lite0.pt")
    model, info = load_model("timm:tf_efficientnet_lite0", tmp_path / "lite0.pt", num_classes=4)
    assert info["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # its pretrained_cfg
    folder = FolderDataset(root, "audit.csv", image_size=64)  # 2x2 maps at the head (32 px would give 1x1)
    ext = extract(model, folder, max_samples=8)
    assert ext.meta["layer"] == "bn2"
    x = torch.stack([folder[int(i)]["image"] for i in ext.indices])
    with torch.no_grad():
        np.testing.assert_allclose(ext.logits, net((x - 0.5) / 0.5).numpy(), atol=1e-4)


def test_plain_image_label_datasets(tree, resnet_file, tmp_path: Path) -> None:
    _, ds = tree
    _, model = resnet_file
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    plain = torch.utils.data.TensorDataset(x, torch.as_tensor(ds.labels.copy()))
    with pytest.raises(Ex2lError, match="lack the field 'confounder'.*confounders="):
        extract(model, plain)
    with pytest.raises(Ex2lError, match="lack the field 'confounder'"):
        audit(model, tmp_path / "no", dataset=plain, quiet=True)
    ext = extract(model, plain, confounders=ds.confounders)
    np.testing.assert_array_equal(ext.confounders, ds.confounders)
    np.testing.assert_array_equal(ext.envs, ds.confounders)  # without envs: the environment is the confounder
    np.testing.assert_array_equal(ext.labels, ds.labels)
    wrapped = AuditDataset(plain, confounders=ds.confounders, confounder_names=ds.confounder_names,
                           label_names=ds.label_names)
    assert wrapped.labels is not None and wrapped[3]["index"] == 3 and wrapped.confounder_names == ds.confounder_names
    assert as_audit_dataset(ds) is ds  # complete dict samples pass through
    from analysis.audit import AuditTarget

    res = audit(AuditTarget(model, name="plain", dataset=plain, confounders=ds.confounders), tmp_path / "a",
                max_samples=None, intervention_samples=0, sanity_samples=4, sanity_steps=2, umap_epochs=20,
                umap_neighbors=5, quiet=True)
    (entry,) = res["runs"]
    assert entry["interventions"]["available"] is False and "skipped" in entry["interventions"]["reason"]
    assert entry["n_samples"] == len(ds) and entry["cam_sanity"]["available"]


def test_model_loading_errors(tmp_path: Path, resnet_file) -> None:
    weights, _ = resnet_file
    with pytest.raises(Ex2lError, match=r"fc.weight: file \(4, 512\) vs model \(10, 512\)"):
        load_model("resnet18", weights, num_classes=10)
    with pytest.raises(Ex2lError, match="needs --weights"):
        load_model("torchvision:resnet18", None, num_classes=4)
    with pytest.raises(Ex2lError, match="not a torchvision model name"):
        load_model("torchvision:resnet_nonexistent", weights, num_classes=4)
    with pytest.raises(Ex2lError, match="no such file"):
        load_model("resnet18", tmp_path / "missing.pt", num_classes=4)
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(Ex2lError, match="cannot load it as a TorchScript file"):
        load_torchscript(tmp_path / "junk.pt")
    assert parse_normalization("0.5,0.25") == ((0.5,) * 3, (0.25,) * 3) and parse_normalization("none") is None
    with pytest.raises(Ex2lError, match="--normalize"):
        parse_normalization("0.5")


def test_cli_argument_errors(tree, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from ex2l_xai.cli import main

    root, _ = tree
    assert main(["audit", "--out", str(tmp_path)]) == 2
    assert "give run folders" in capsys.readouterr().err
    assert main(["audit", "--model", "resnet18", "--weights", "w.pt", "--out", str(tmp_path)]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["audit", "--model", "resnet18", "--data", str(root), "--csv", "audit.csv", "--out",
                 str(tmp_path)]) == 2
    assert "no --weights left" in capsys.readouterr().err


def test_folder_dataset_errors(tree, tmp_path: Path) -> None:
    root, _ = tree
    table = pd.read_csv(root / "audit.csv")
    table.iloc[1:].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(Ex2lError, match="has no row in"):
        FolderDataset(root, tmp_path / "short.csv", image_size=SIZE)
    table.drop(columns="confounder").to_csv(tmp_path / "noconf.csv", index=False)
    # issue 21: no confounder column is an audit of unlabelled data (the slices take its place), not an error
    noconf = FolderDataset(root, tmp_path / "noconf.csv", image_size=SIZE)
    assert not noconf.has_confounders and set(noconf.confounders.tolist()) == {0}
    table.drop(columns="path").to_csv(tmp_path / "nopath.csv", index=False)
    with pytest.raises(Ex2lError, match="lacks column 'path'"):
        FolderDataset(root, tmp_path / "nopath.csv", image_size=SIZE)


def test_waterbirds_with_cub_segmentations(tmp_path: Path) -> None:
    root, seg = tmp_path / "wb", tmp_path / "segmentations"
    rows = []
    for i in range(4):
        rel = f"00{i % 2 + 1}.Bird/bird_{i}.jpg"
        img = np.zeros((3, 16, 16))
        img[:, 4:12, 4:12] = 0.8
        write_png(root / rel, img)
        (root / rel).rename((root / rel).with_suffix(".jpg"))
        m = np.zeros((16, 16), np.uint8)
        m[4 + i: 12, 4:12] = 255
        (seg / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save((seg / rel).with_suffix(".png"))
        rows.append({"img_id": i, "img_filename": rel, "y": i % 2, "split": 2, "place": i // 2})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    ds = get_dataset("waterbirds", "test", root=str(root), image_size=16)
    masked = waterbirds_masks(ds, seg)
    assert masked.label_names == ds.label_names and len(masked) == 4
    for i in range(4):
        s = masked[i]
        expect = np.zeros((16, 16))
        expect[4 + i: 12, 4:12] = 1
        np.testing.assert_array_equal(s["mask"][0].numpy(), expect)


def test_csv_dataset_masks_from_a_mask_column(tree, tmp_path: Path) -> None:
    from analysis.datasets import csv_masks

    root, ds = tree
    table = pd.read_csv(root / "audit.csv")
    table["label"] = [p.split("/")[0] for p in table["path"]]
    table["label"] = table["label"].map({n: i for i, n in enumerate(sorted(set(table["label"])))})
    table["confounder"] = table["confounder"].map({n: i for i, n in enumerate(sorted(set(table["confounder"])))})
    table["split"] = "test"
    table.to_csv(root / "with_masks.csv", index=False)
    csv_ds = get_dataset("csv", "test", root=str(root), csv="with_masks.csv", image_size=SIZE, normalize=False)
    masked = csv_masks(csv_ds)
    assert masked.label_names == csv_ds.label_names and len(masked) == len(ds)
    for j in (0, 5):
        i = int(Path(csv_ds.table["path"][j]).stem)
        np.testing.assert_array_equal(masked[j]["mask"].numpy(), ds[i]["mask"].numpy())
    table.drop(columns="mask").to_csv(root / "no_masks.csv", index=False)
    plain = get_dataset("csv", "test", root=str(root), csv="no_masks.csv", image_size=SIZE, normalize=False)
    assert csv_masks(plain) is plain
