"""figures/: each script regenerates its artefact from run folders; ``ex2l figures`` makes them all."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import drawn, png_pixels

FIGURES = Path(__file__).resolve().parents[1] / "figures"


@pytest.fixture(scope="session")
def seed_runs(analysis_runs) -> list[Path]:
    """ERM and eX2L of the shared tiny runs (seed 0), plus ERM with seed 1."""
    return [analysis_runs(name, seed) for name, seed in (("erm", 0), ("ex2l", 0), ("erm", 1))]


def script(name: str) -> dict[str, Any]:
    """The script's globals, without running its ``__main__`` block (``figures/`` put on sys.path for common)."""
    if str(FIGURES) not in sys.path:
        sys.path.insert(0, str(FIGURES))
    return runpy.run_path(str(FIGURES / name))


@pytest.mark.parametrize(
    ("name", "artefact", "extra"),
    [
        ("fig1_gradcam_grid.py", "fig1", ["--rows", "3", "--show-conf", "--names", "ERM0,eX2L,ERM1"]),
        ("fig2_umap_label_confounder.py", "fig2", ["--umap-epochs", "30"]),
        ("fig3_umap_env_mmd.py", "fig3", ["--umap-epochs", "30", "--max-samples", "0"]),
    ],
)
def test_figure_scripts(seed_runs: list[Path], tmp_path: Path, name: str, artefact: str, extra: list[str]) -> None:
    g = script(name)
    out = tmp_path / "sub" / f"{artefact}.png"
    assert g["main"](artefact, g["PARSER"], [*map(str, seed_runs), "--out", str(out), "--quiet", *extra]) == 0
    drawn(png_pixels(out))
    assert not list(out.parent.glob(".*")), "no temporary files left"


def test_table_script_mean_and_std_over_seeds(seed_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(FIGURES / "table_results.py"), *map(str, seed_runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    erm = [json.loads((r / "results.json").read_text())["test"] for r in (seed_runs[0], seed_runs[2])]
    wga = [100 * m["worst_group_acc"] for m in erm]
    avg = [100 * m["avg_acc"] for m in erm]
    mean_sd = [f"{(a + b) / 2:.1f} ± {abs(a - b) / 2 ** 0.5:.1f}" for a, b in (avg, wga)]  # sample std of two values
    lines = out.read_text().splitlines()
    assert lines[0] == "| Algorithm | test avg acc. (%) | test worst-group acc. (%) | Seeds |"
    assert lines[2] == f"| ERM | {mean_sd[0]} | {mean_sd[1]} | 2 |"
    assert lines[3].startswith("| eX2L |") and lines[3].endswith("| 1 |")


def test_figure_script_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = script("table_results.py")
    assert g["main"]("table", g["PARSER"], [str(tmp_path), "--out", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "results.json" in err and err.count("\n") == 1


def test_cli_figures(seed_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ex2l_xai.cli import main

    out = tmp_path / "figs"
    assert main(["figures", *map(str, seed_runs[:2]), "--out", str(out), "--only", "fig1,table", "--quiet"]) == 0
    drawn(png_pixels(out / "fig1_gradcam_grid.png"))
    assert "| ERM |" in (out / "table_results.md").read_text()
    assert "fig1:" in capsys.readouterr().out
    assert main(["figures", str(seed_runs[0]), "--out", str(out), "--only", "fig9"]) == 2


def test_calibrate_probes_frozen_pretrained_features(tmp_path: Path) -> None:
    """figures/calibrate.py: on m2m_hard the frozen ImageNet features carry the label on the test backgrounds (the
    probe fitted on oracle_val is far better on test than the one fitted on train, which learns the shortcut);
    random features are refused."""
    calibrate = runpy.run_path(str(FIGURES / "calibrate.py"))
    tiny = ["data.options.per_group=20", "data.options.test_per_group=20", "data.options.image_size=64",
            "data.options.benchmark=none"]  # plain m2m_hard, not the preset's calibrated variant
    res = calibrate["calibrate"](tiny)
    assert res["n"] == {"train": 128, "oracle_val": 16, "test": 80}
    assert res["label_fit_oracle_val"]["avg_acc"] > res["label_fit_train"]["avg_acc"] + 0.2
    assert res["label_fit_train"]["worst_group_acc"] <= 0.2  # the shortcut: some test group is mostly wrong
    assert "| label, fitted on train |" in calibrate["markdown"](res)
    with pytest.raises(ValueError, match="pretrained: none"):
        calibrate["calibrate"]([*tiny, "model.pretrained=none"])
