"""The audit report: audit.json contract, self-contained HTML that a real browser renders, plain torchvision
models, the ``ex2l audit`` command."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from helpers import chromium, chromium_probe, drawn, png_pixels

from analysis.audit import AuditTarget, jsonable
from analysis.report import FIGURES, audit
from analysis.tables import markdown_table, results_table
from ex2l_xai.data import get_dataset
from ex2l_xai.errors import Ex2lError

ALGORITHMS = ("erm", "groupdro", "ex2l")
RUN_KEYS = {"mmd_env", "leakage", "cam_overlap", "cam_in_mask", "zero_cam_share", "pointing_game", "avg_acc",
            "worst_group_acc", "mean_group_acc", "per_group", "name", "source", "interventions", "bg_gap",
            "cam_sanity", "cam_sanity_passes"}
LEAK_KEYS = {"confounder_probe_acc", "chance", "within_label_acc", "within_label_chance", "logit_leak",
             "random_within_label_acc", "random_confounder_probe_acc", "label_probe_acc"}


@pytest.fixture(scope="session")
def tiny_runs(analysis_runs) -> list[Path]:
    """ERM, GroupDRO and eX2L, one epoch each on the tiny synthetic benchmark (shared with other analysis tests)."""
    return [analysis_runs(name) for name in ALGORITHMS]


@pytest.fixture(scope="module")
def audited(tiny_runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("audit")
    res = audit(tiny_runs, out, max_samples=None, umap_epochs=30, umap_neighbors=8, n_rows=3, quiet=True)
    return out, res


def test_audit_json_contract(audited: tuple[Path, dict[str, Any]], tiny_runs: list[Path]) -> None:
    out, res = audited
    data = json.loads((out / "audit.json").read_text())
    assert res["report"] == str(out / "report.html")
    assert [r["name"] for r in data["runs"]] == ["ERM", "GroupDRO", "eX2L"]
    assert data["split"] == "test" and data["reference"] == "ERM"
    for run, entry in zip(tiny_runs, data["runs"], strict=True):
        assert RUN_KEYS <= set(entry), RUN_KEYS - set(entry)
        assert LEAK_KEYS <= set(entry["leakage"]), LEAK_KEYS - set(entry["leakage"])
        results = json.loads((run / "results.json").read_text())
        for k in ("avg_acc", "worst_group_acc", "mean_group_acc", "per_group"):
            assert entry[k] == results["test"][k], k
        assert entry["metrics_source"] == "results.json"
        # the whole (tiny) test split was audited: the sample metrics equal results.json's
        assert entry["sample_metrics"]["avg_acc"] == pytest.approx(results["test"]["avg_acc"], abs=1e-9)
        lk = entry["leakage"]
        assert lk["chance"] == pytest.approx(0.25)  # 4 confounders present in the test split
        assert 0 <= lk["confounder_probe_acc"] <= 1
        # the test split holds one environment: MMD_env over val (train envs) + test
        assert entry["mmd"]["data"].startswith("val + test") and len(entry["mmd"]["envs"]) == 3
        assert isinstance(entry["mmd_env"], float)
        assert entry["cam_in_mask"] is None or 0 <= entry["cam_in_mask"] <= 1
        assert 0 <= entry["zero_cam_share"] <= 1
        assert entry["has_masks"] is True and entry["mask_area"] > 0
        iv = entry["interventions"]  # the whole tiny test split, every image on all six backgrounds
        assert iv["available"] and iv["method"] == "exact" and iv["n"] == entry["n_samples"]
        assert iv["n_forward"] == iv["n"] * (6 + 2) and iv["prior_source"] == "the run's train split"
        assert entry["bg_gap"] == pytest.approx(iv["mixed_same_acc"] - iv["mixed_rand_acc"])
        # m2m_hard's training table: bulldog on dirt and jungle, half each (issue 3's challenge table)
        assert iv["same_backgrounds"]["bulldog"] == {"dirt": 0.5, "jungle": 0.5}
        assert set(iv["per_class_background"]) <= set(results["test"]["per_group"]) | {"bulldog", "dachshund",
                                                                                      "labrador", "corgi"}
        san = entry["cam_sanity"]
        assert san["available"] and san["layer"] == "backbone.layer4" and len(san["steps"]) == 5
        assert entry["cam_sanity_passes"] is san["passes"]
        assert {"interventions", "cam_sanity"} <= set(entry["seconds"])
    assert data["settings"]["intervention_samples"] == 240 and data["settings"]["sanity_steps"] == 5
    erm, _, ex2l = data["runs"]
    assert erm["cam_overlap"] is None and erm["has_confounder_head"] is False
    assert ex2l["has_confounder_head"] is True
    assert ex2l["cam_overlap"] is None or 0 <= ex2l["cam_overlap"] <= 1
    for r in data["runs"]:  # faithfulness, keyed by variant: the CAM's four numbers and the same for two chance maps
        f = r["faithfulness"]["gradcam"]
        for key in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf"):
            assert 0 <= f[key] <= 1 and 0 <= f["random"][key] <= 1 and 0 <= f["centre"][key] <= 1
    assert data["settings"]["cam_variants"] == ["gradcam"] and data["settings"]["faithfulness"] is True
    for key, name in FIGURES.items():
        png = out / "figures" / name
        assert data["figures"][key] == f"figures/{name}"
        drawn(png_pixels(png))
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_report_html_is_self_contained(audited: tuple[Path, dict[str, Any]]) -> None:
    out, _ = audited
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"<(script|link|iframe)\b", text, re.I), "no scripts or external stylesheets"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I), "no external resources"
    srcs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(srcs) == len(FIGURES)  # three models on the synthetic benchmark: every figure, both causal ones too
    for s, name in zip(srcs, ("fig4_interventions", "fig1_gradcam_grid", "fig1b_gradcam_disagreement",
                              "fig5_cam_sanity", "fig2_umap", "fig3_umap_env", "fig6_slices", "fig7_spuriosity",
                              "fig8_faithfulness"), strict=True):
        assert base64.b64decode(s) == (out / "figures" / f"{name}.png").read_bytes(), name  # in section order
    for words in ("Worst-group", "How to read this", "MMD", "Within-label leak", "Decision-level leak",
                  "CAM in object", "Label–confounder overlap", "Zero-CAM share", "auditing_metrics.md",
                  "Background swaps", "BG-gap", "Accuracy of each class on each background", "Flip rate",
                  "CAM sanity check", "Adebayo et al. 2018", "How to read it", "Discovered slices and spuriosity",
                  "Faithfulness of the CAMs", "ROAD MoRF", "centre prior"):
        assert words in text, words
    data = json.loads((out / "audit.json").read_text())
    for r in data["runs"]:  # the report shows the numbers of audit.json
        assert f"{100 * r['interventions']['mixed_rand_acc']:.1f}%" in text
        assert f"ρ {r['cam_sanity']['steps'][-1]['spearman']:.2f}" in text
        assert f"{r['discovery']['ari']:.2f} / {r['discovery']['nmi']:.2f}" in text  # the slice table
    assert "report.css" not in text and "--accent" in text  # the stylesheet is inlined


PROBE_SCRIPT = """<script>
window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (i) {
    return {complete: i.complete, w: i.naturalWidth, h: i.naturalHeight};
  });
  var pre = document.createElement('pre');
  pre.id = 'image-probe';
  pre.textContent = JSON.stringify({images: r, tables: document.querySelectorAll('table').length});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(chromium() is None, reason="no chromium/chrome binary on PATH (Debian: apt-get install -y "
                    "chromium); the headless-browser check of report.html needs one")
def test_report_opens_in_headless_chromium(audited: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Chromium renders the report and every embedded image decodes (naturalWidth > 0). The report itself has
    no script: a copy with a small probe script added is loaded, and its DOM dumped after the load event."""
    out, _ = audited
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", PROBE_SCRIPT + "</body>"))
    probe = chromium_probe(page.as_uri(), "image-probe", tmp_path)
    assert len(probe["images"]) == len(FIGURES)
    for img in probe["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
    assert probe["tables"] >= 8  # glance, accuracy, groups, swaps, three heat tables, sanity, latents, ...


def test_audit_plain_torchvision_resnet18(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    ds = get_dataset("synthetic", "test", image_size=32, per_group=8, test_per_group=8)
    env_ds = get_dataset("synthetic", "val", image_size=32, per_group=8, test_per_group=8)
    target = AuditTarget(model=model, name="resnet18", dataset=ds, layer=model.layer4, env_dataset=env_ds)
    res = audit([target], tmp_path, max_samples=None, umap_epochs=30, umap_neighbors=8, n_rows=2, quiet=True)
    data = json.loads((tmp_path / "audit.json").read_text())
    (entry,) = data["runs"]
    assert entry["name"] == "resnet18" and entry["latent_dim"] == 512 and entry["latent"] == "input of fc"
    assert entry["metrics_source"] == "audit sample" and entry["cam_overlap"] is None
    assert entry["n_samples"] == len(ds) and isinstance(entry["mmd_env"], float)
    assert entry["leakage"]["random_within_label_acc"] is not None or entry["leakage"]["within_label_acc"] is None
    html = Path(res["report"]).read_text()  # the report's sections hold audit.json's numbers
    assert f"{100 * entry['avg_acc']:.1f}%" in html and f"{entry['mmd_env']:.4f}" in html
    assert html.count("data:image/png;base64,") == len(data["figures"])
    assert "fig1b" not in "".join(data["figures"].values()), "one model: no disagreement grid"
    # a bare module with dataset= works too (no environments to compare: mmd_env is None with a reason)
    # too few samples for UMAP: the report falls back to a PCA, labelled as such, and says why
    res2 = audit(model, tmp_path / "bare", dataset=ds, layer="layer4", max_samples=8, quiet=True)
    (entry2,) = res2["runs"]
    assert entry2["name"] == "ResNet" and entry2["n_samples"] == 8
    assert entry2["mmd_env"] is None and "reason" in entry2["mmd"]
    assert res2["settings"]["embedding"] == "pca" and "UMAP failed" in res2["settings"]["embedding_note"]
    html_text = (tmp_path / "bare" / "report.html").read_text()
    assert "PCA shown instead" in html_text and "Figure 2.</b> PCA" in html_text


def test_report_escapes_what_it_is_given() -> None:
    """Names come from users: the template escapes them, and the page still has no script."""
    from analysis.html import render_html

    bad = "<script>alert(1)</script>"
    entry = {"name": bad, "source": bad, "leakage": {}, "n_samples": 3, "per_group": {f"{bad}/x": {"acc": 1.0,
             "n": 3}}, "interventions": {"available": False, "reason": bad}, "cam_sanity": {}}
    data = {"runs": [entry], "split": "test", "seed": 0, "created": "now", "reference": bad, "warnings": [bad],
            "settings": {}, "seconds": {}}
    text = render_html(data, {})
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_audit_errors(tmp_path: Path) -> None:
    with pytest.raises(Ex2lError, match="no best.pt"):
        audit([tmp_path], tmp_path / "out", quiet=True)
    with pytest.raises(Ex2lError, match="needs a dataset"):
        audit([torchvision.models.resnet18(num_classes=4)], tmp_path / "out", quiet=True)
    with pytest.raises(Ex2lError, match="at least one"):
        audit([], tmp_path / "out")


def test_jsonable_and_results_table(tiny_runs: list[Path]) -> None:
    assert jsonable({1: np.float32(np.nan), "a": (np.int64(3), np.bool_(True)), "b": np.arange(2)}) == {
        "1": None, "a": [3, True], "b": [0, 1]}
    rows = results_table(tiny_runs + tiny_runs[:1])  # ERM twice: n = 2, std 0
    erm = rows[0]
    assert erm["algorithm"] == "erm" and erm["n"] == 2 and erm["avg_acc_std"] == 0.0
    md = markdown_table(rows)
    assert md.splitlines()[0].startswith("| Algorithm |") and "| ERM |" in md and "| eX2L |" in md


def test_cli_audit(tiny_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ex2l_xai.cli import main

    out = tmp_path / "cli"
    rc = main(["audit", str(tiny_runs[0]), str(tiny_runs[2]), "--out", str(out), "--max-samples", "24",
               "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and "ERM" in printed and "eX2L" in printed
    data = json.loads((out / "audit.json").read_text())
    assert [r["n_samples"] for r in data["runs"]] == [24, 24] and data["max_samples"] == 24
    rc = main(["audit", str(tmp_path / "missing"), "--out", str(out), "--quiet"])
    assert rc == 2
    assert "ex2l: error:" in capsys.readouterr().err


class NoMasks(torch.utils.data.Dataset):
    """A Waterbirds-like view of the synthetic data: no object masks, environment = confounder."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.label_names, self.confounder_names = base.label_names, base.confounder_names
        self.env_names = base.confounder_names
        self.labels, self.confounders = base.labels, base.confounders

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = dict(self.base[i])
        s.pop("mask")
        s["env"] = s["confounder"]
        return s


def test_audit_two_head_module_without_masks(tmp_path: Path) -> None:
    from ex2l_xai.models import TwoHeadNet

    torch.manual_seed(0)
    base = get_dataset("synthetic", "test", image_size=32, per_group=8, test_per_group=8)
    model = TwoHeadNet("small_cnn", base.n_labels, base.n_confounders, width=8)
    res = audit(model, tmp_path, dataset=NoMasks(base), names=["two-head"], max_samples=None, umap_epochs=20,
                umap_neighbors=5, quiet=True)
    (entry,) = res["runs"]
    assert entry["has_masks"] is False and entry["cam_in_mask"] is None and entry["pointing_game"] is None
    assert entry["has_confounder_head"] is True and entry["latent"] == "TwoHeadOutput.latent"
    assert isinstance(entry["mmd_env"], float) and entry["mmd"]["data"] == "test split"  # 4 environments here
    assert "no object masks" in (tmp_path / "report.html").read_text()
