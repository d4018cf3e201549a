"""Every example runs as a user would run it, at tiny size, and writes what it promises."""

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, drawn, png_pixels

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_differentiable_gradcam(capsys: pytest.CaptureFixture[str]) -> None:
    history = _example("differentiable_gradcam").main(["--steps", "3"])
    assert len(history) == 3 and all(0.0 <= h <= 1.0 for h in history)
    out = capsys.readouterr().out
    diff = float(out.split("max |difference|:")[1].split()[0])
    assert diff < 1e-5  # the fused CAM equals Captum's


def test_train_ex2l_on_your_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _example("train_ex2l_on_your_data").main(["--out", str(tmp_path), "--epochs", "1", "--per-group", "6"])
    table = pd.read_csv(tmp_path / "data" / "metadata.csv")
    assert list(table.columns) == ["path", "label", "confounder", "env", "split"]
    assert set(table["split"]) == {"train", "val", "test"} and all((tmp_path / "data" / p).is_file() for p in table.path)
    assert set(results) == {"erm", "ex2l"}
    for algo, res in results.items():
        assert (tmp_path / algo / "done").exists() and res["algorithm"] == algo
        assert sum(g["n"] for g in res["test"]["per_group"].values()) == int((table.split == "test").sum())
    out = capsys.readouterr().out
    assert "erm: test average" in out and "ex2l: test average" in out


def test_train_without_confounder_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = _example("train_without_confounder_labels").main(["--out", str(tmp_path), "--epochs", "1",
                                                             "--per-group", "6"])
    table = pd.read_csv(tmp_path / "inferred_confounders.csv")
    assert set(table["split"]) == {"train", "val"} and table["confounder"].max() + 1 == res["report"]["k"]
    assert (tmp_path / "groupdro_inferred" / "done").exists()
    config = (tmp_path / "groupdro_inferred" / "config.yaml").read_text()
    assert f"confounders: {tmp_path / 'inferred_confounders.csv'}" in config
    out = capsys.readouterr().out
    assert f"inferred {res['report']['k']} confounders" in out and "groupdro on inferred confounders: test" in out


def test_audit_a_torchvision_model(tmp_path: Path) -> None:
    result = _example("audit_a_torchvision_model").main(
        ["--out", str(tmp_path), "--max-samples", "60", "--per-group", "12"]
    )
    audit = json.loads((tmp_path / "audit.json").read_text())
    entry = audit["runs"][0]
    html = (tmp_path / "report.html").read_text()  # the report shows audit.json's numbers
    assert entry["name"] in html and f"{100 * entry['leakage']['logit_leak']:.1f}%" in html
    assert f"{entry['mmd_env']:.4f}" in html
    assert entry["name"] == "my ResNet-18" and entry["latent_dim"] == 512
    assert 0.0 <= entry["leakage"]["logit_leak"] <= 1.0 and entry["mmd_env"] is not None
    assert result["report"].endswith("report.html")
    for png in (tmp_path / "figures").glob("*.png"):
        drawn(png_pixels(png))


def test_compare_attention(tmp_path: Path) -> None:
    from ex2l_xai.config import load_config
    from ex2l_xai.train import train

    runs = []
    for algo in ("erm", "groupdro", "ex2l"):
        train(load_config("quick", [f"algorithm.name={algo}", *TINY]), tmp_path / algo, quiet=True)
        runs.append(str(tmp_path / algo))
    out = _example("compare_attention").main([*runs, "--out", str(tmp_path / "grid.png"), "--rows", "3"])
    drawn(png_pixels(Path(out)))


def test_audit_any_model_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _example("audit_any_model_cli").main(["--out", str(tmp_path), "--per-group", "6", "--steps", "3",
                                               "--size", "32", "--interventions", "12"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "$ ex2l audit --model resnet18 --weights" in out and "BG-gap" in out
    state = __import__("torch").load(tmp_path / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (4, 512)  # the plain script's state dict
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    (entry,) = audit["runs"]
    assert entry["name"] == "my ResNet-18" and entry["source"].startswith("resnet18 + ")
    assert entry["normalization"]["mean"] == [0.485, 0.456, 0.406]  # --normalize auto: ImageNet for torchvision
    assert entry["interventions"]["method"] == "composite"
    assert entry["interventions"]["n"] == min(12, entry["n_samples"])  # a subsample of at most 12 images
    assert entry["cam_sanity"]["available"] and (tmp_path / "audit" / "report.html").is_file()
    for png in (tmp_path / "audit" / "figures").glob("*.png"):
        drawn(png_pixels(png))


def test_audit_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _example("audit_an_image_folder").main(["--out", str(tmp_path), "--per-group", "3", "--size", "32"])
    assert rc == 0
    out = capsys.readouterr().out
    n = int(out.split(" images,")[0].split()[-1])
    assert f"{n} rows in slices.csv" in out and "slices per class" in out
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    entry = audit["runs"][0]
    assert entry["discovery"]["groups"] == "slices" and sum(s["size"] for s in entry["slices"]) == n
    assert all((tmp_path / "images" / p).is_dir() for p in entry["discovery"]["k"])
    for png in (tmp_path / "audit" / "figures").glob("*.png"):
        drawn(png_pixels(png))
