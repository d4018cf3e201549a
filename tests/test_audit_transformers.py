"""`ex2l audit --model timm:vit_tiny_patch16_224 --weights W --data DIR` end to end (random weights saved to a file,
a tiny image folder): the CAM layer is the last block's norm1, its tokens become a 14x14 map, and the CAMs, the
sanity check and the faithfulness checks run; the same for a Swin-tiny (7x7 map from channels-last
``layers.3.blocks.1.norm1``). `--pretrained` offline: one line naming --weights, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm  # a dependency of the project: a missing timm must fail, not skip
import torch
from helpers import write_png


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree of 4 images (2 classes, 2 backgrounds) and its CSV."""
    root = tmp_path_factory.mktemp("vit_tree")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        rel = f"{'ab'[i % 2]}/{i}.png"
        write_png(root / rel, rng.random((3, 32, 32)).astype(np.float32))
        rows.append({"path": rel, "confounder": "xy"[i // 2]})
    pd.DataFrame(rows).to_csv(root / "audit.csv", index=False)
    return root


def _weights(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False, num_classes=2).state_dict(), path)
    return path


def _audit(name: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    from ex2l_xai.cli import main

    out = tmp_path / "audit"
    w = _weights(name, tmp_path / f"{name}.pt")
    rc = main(["audit", "--model", f"timm:{name}", "--weights", str(w), "--data", str(folder), "--csv", "audit.csv",
               "--out", str(out), "--max-samples", "0", "--sanity-samples", "2", "--sanity-steps", "2",
               "--faith-samples", "2", "--faith-steps", "8", "--rows", "2", "--umap-epochs", "10", "--quiet", *extra])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "audit.json").read_text())
    assert "Faithfulness of the CAMs" in (out / "report.html").read_text()
    assert (out / "figures" / "fig8_faithfulness.png").is_file()
    return data


def _check_faithfulness(entry: dict, variants: tuple[str, ...]) -> None:
    assert list(entry["faithfulness"]) == list(variants)
    for v in variants:
        f = entry["faithfulness"][v]
        for key in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf"):
            assert 0.0 <= f[key] <= 1.0
            assert 0.0 <= f["random"][key] <= 1.0 and 0.0 <= f["centre"][key] <= 1.0
        assert f["n"] == 2 and len(f["curves"]["cam"]["deletion"]) == 9


def test_audit_a_vit_tiny_from_a_weights_file(folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = _audit("vit_tiny_patch16_224", folder, tmp_path, capsys, "--cam", "gradcam", "--cam", "hirescam")
    (entry,) = data["runs"]
    assert entry["layer"] == "blocks.11.norm1" and entry["model_kind"] == "module"
    assert data["settings"]["cam_variants"] == ["gradcam", "hirescam"]
    san = entry["cam_sanity"]
    assert san["available"] and san["layer"] == "blocks.11.norm1" and len(san["steps"]) == 2
    _check_faithfulness(entry, ("gradcam", "hirescam"))
    assert entry["zero_cam_share"] is not None  # the CAMs exist (14x14 token maps)


def test_audit_a_swin_tiny_from_a_weights_file(folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = _audit("swin_tiny_patch4_window7_224", folder, tmp_path, capsys)
    (entry,) = data["runs"]
    assert entry["layer"] == "layers.3.blocks.1.norm1"
    assert entry["cam_sanity"]["available"]
    _check_faithfulness(entry, ("gradcam",))


def test_pretrained_offline_is_one_line_naming_weights(folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ex2l_xai.cli import main

    calls = []

    def offline(name: str, pretrained: bool = False, **kw: object) -> None:
        calls.append((name, pretrained))
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm, "create_model", offline)
    rc = main(["audit", "--model", "timm:vit_tiny_patch16_224", "--pretrained", "--data", str(folder), "--csv",
               "audit.csv", "--out", str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and calls == [("vit_tiny_patch16_224", True)]
    assert len(err.splitlines()) == 1 and "--weights" in err and "cannot download" in err, err
