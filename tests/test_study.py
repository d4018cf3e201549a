"""The eX2L study script: runs resumably, measures each run, renders the tables it writes into results.md."""

import importlib.util
import json
import sys
from pathlib import Path

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "figures" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_study_run_skip_and_report(tmp_path: Path) -> None:
    study = _study()
    args = ["run", "--root", str(tmp_path), "--seeds", "0", "--only", "^m2m_hard/(erm|paper_l0.1)$", "--jobs", "1",
            "--threads", "1", "--quiet", "--set", *TINY]
    assert study.main(args) == 0
    runs = sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("done"))
    assert runs == ["m2m_hard/erm/seed0", "m2m_hard/paper_l0.1/seed0"]
    metrics = json.loads((tmp_path / "m2m_hard/paper_l0.1/seed0/study_metrics.json").read_text())
    assert 0.0 <= metrics["zero_cam_share"] <= 1.0 and 0.0 <= metrics["cam_in_mask"] <= 1.0
    assert metrics["chance"] == 0.5  # each m2m test class sits on two backgrounds
    stamp = (tmp_path / "m2m_hard/erm/seed0/done").stat().st_mtime_ns
    assert study.main(args) == 0  # done runs are skipped
    assert (tmp_path / "m2m_hard/erm/seed0/done").stat().st_mtime_ns == stamp

    md = tmp_path / "results.md"
    md.write_text("# Results\n\nprose above\n\n<!-- study:begin -->\nold\n<!-- study:end -->\n\nprose below\n")
    assert study.main(["all", *args[1:], "--md", str(md)]) == 0  # one command: (nothing left to) run + report
    text = md.read_text()
    assert "prose above" in text and "prose below" in text and "old" not in text
    assert "| `erm`: ERM | 1 |" in text and "#### m2m_hard" in text and "#### o2o_hard" not in text
    res = json.loads((tmp_path / "m2m_hard/erm/seed0/results.json").read_text())
    assert f"**{100 * res['test']['worst_group_acc']:.1f} ± 0.0**" in text.split("| `erm`: ERM | 1 |")[1].split("\n")[0]


def test_overrides_are_valid_configs() -> None:
    study = _study()
    from ex2l_xai.config import load_config

    for bench in study.BENCHMARKS:
        for method in study.methods_of(bench):
            cfg = load_config(study.BASE_PRESET, study.overrides_for(bench, method, 1))
            assert cfg.seed == 1 and cfg.data.options["image_size"] == 64
