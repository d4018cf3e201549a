"""figures/slice_recovery.py and figures/faithfulness_lambda.py: they report the audit's own numbers for the runs
they find, and their tables say what the records hold."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "figures" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_slice_recovery_reports_the_audits_discovery(tmp_path: Path, analysis_runs) -> None:
    mod = _script("slice_recovery")
    run = analysis_runs("erm")
    (tmp_path / "bench" / "erm").mkdir(parents=True)
    (tmp_path / "bench" / "erm" / "seed0").symlink_to(run)
    md = tmp_path / "page.md"
    md.write_text(f"before\n{mod.MARKERS[0]}\nold\n{mod.MARKERS[1]}\nafter\n")
    assert mod.main(["--root", str(tmp_path), "--bench", "bench", "--seeds", "0", "1", "--json",
                     str(tmp_path / "r.json"), "--md", str(md)]) == 0
    rec = json.loads((tmp_path / "r.json").read_text())["results"]["bench"]
    assert len(rec) == 1  # seed 1 has no run: left out
    from analysis.audit import audit_one
    from analysis.settings import AuditSettings

    disc = audit_one(run, AuditSettings(split="test", seed=0), checks=["slices"], env=False).entry["discovery"]
    assert rec[0]["ari"] == pytest.approx(disc["ari"]) and rec[0]["nmi"] == pytest.approx(disc["nmi"])
    text = md.read_text()
    assert "old" not in text and text.startswith("before") and text.rstrip().endswith("after")
    assert f"| bench | 1 | {rec[0]['n']} | {rec[0]['ari']:.2f} ± 0.00 | {rec[0]['nmi']:.2f} ± 0.00 |" in text


def test_faithfulness_table_says_what_the_records_hold() -> None:
    mod = _script("faithfulness_lambda")

    def rec(cam: float, rnd: float) -> dict:
        m = {"deletion_auc": cam, "insertion_auc": 1 - cam, "road_morf": cam, "road_lerf": 1 - cam}
        r = {"deletion_auc": rnd, "insertion_auc": 1 - rnd, "road_morf": rnd, "road_lerf": 1 - rnd}
        return {"cam": m, "random": r, "centre": r, "n": 16}

    text = mod.table({"erm": [rec(0.2, 0.3), rec(0.4, 0.3)], "paper_dual_l1": [rec(0.5, 0.3)]})
    erm = next(x for x in text.splitlines() if x.startswith("| `erm`"))
    assert "| 2 | 16 | 0.300 ± 0.141 / 0.300 ± 0.000 / 0.300 ± 0.000 |" in erm
    assert erm.endswith("| -0.100, +0.100 |")
    lam = next(x for x in text.splitlines() if x.startswith("| `paper_dual_l1`"))
    assert "eX2L, λ = 1" in lam and lam.endswith("| +0.200 |")
    assert "erm_2head" not in text  # a method without runs gets no row
