"""The eX2L study script: runs resumably, measures each run, renders the tables it writes into results.md."""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
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
    args = ["run", "--regime", "scratch", "--root", str(tmp_path), "--seeds", "0", "--only",
            "^m2m_hard/(erm|paper_l0.1)$", "--jobs", "1", "--threads", "1", "--quiet", "--set", *TINY]
    assert study.main(args) == 0
    runs = sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("done"))
    assert runs == ["m2m_hard/erm/seed0", "m2m_hard/paper_l0.1/seed0"]
    metrics = json.loads((tmp_path / "m2m_hard/paper_l0.1/seed0/study_metrics.json").read_text())
    assert 0.0 <= metrics["zero_cam_share"] <= 1.0 and 0.0 <= metrics["cam_in_mask"] <= 1.0
    assert 0.0 <= metrics["cam_overlap"] <= 1.0  # Dice of the label and confounder CAMs
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


def test_overrides_are_valid_configs(tmp_path: Path) -> None:
    study = _study()
    from ex2l_xai.config import load_config

    for regime in study.REGIMES.values():
        for bench in regime.benchmarks:
            for method in study.methods_of(bench, regime):
                cfg = load_config(regime.preset, study.overrides_for(bench, method, 1, regime=regime, root=tmp_path))
                assert cfg.seed == 1
                size = 64 if regime.name == "scratch" else 128
                assert cfg.data.options["image_size"] == size, (regime.name, bench, method)
    pre = study.REGIMES["pretrained"]
    cfg = load_config(pre.preset, study.overrides_for("o2o_hard", "singh_dual", 2, regime=pre, root=tmp_path))
    assert cfg.model.init_from == str(tmp_path / "o2o_hard" / "erm_2head" / "seed2")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.model.freeze == "layer3"


def test_pretrained_variants_run_on_every_benchmark() -> None:
    """Each kind of eX2L variant (shared and dual paper form, a stronger λ, evidence, Singh's form with its control,
    the penalty at an earlier block) runs on every benchmark of the pretrained regime, not on m2m_hard alone, and
    each dependent run's starting run is in the same benchmark's set."""
    study = _study()
    pre = study.REGIMES["pretrained"]
    kinds = {"erm", "erm_2head", "groupdro", "paper_l0.1", "paper_dual_l0.1", "paper_dual_l1", "evid_dual_all_l0.1",
             "singh_dual", "erm_2head_cont", "gradmask_l3"}
    for bench in pre.benchmarks:
        methods = set(study.methods_of(bench, pre))
        assert kinds <= methods, (bench, kinds - methods)
        for method, start in pre.init_from.items():
            assert method not in methods or start in methods, (bench, method)


def test_runs_that_start_from_another_run_come_in_a_second_wave(tmp_path: Path) -> None:
    """Singh et al.'s form starts from two-head ERM of the same benchmark and seed: the waves say so, also when
    --only selects the dependent run alone; a tiny pretrained sweep runs them in that order."""
    study = _study()
    pre = study.REGIMES["pretrained"]
    waves = study.jobs_of(pre, tmp_path, [0], only="^m2m_hard/singh_dual$")
    assert waves == [[("m2m_hard", "erm_2head", 0)], [("m2m_hard", "singh_dual", 0)]]
    tiny = [o for o in TINY if not o.startswith("model.width")] + ["data.options.image_size=64"]
    args = ["run", "--root", str(tmp_path), "--seeds", "0", "--only", "^m2m_hard/singh_dual$", "--jobs", "1",
            "--quiet", "--set", *tiny]
    assert study.main(args) == 0
    assert (tmp_path / "m2m_hard/erm_2head/seed0/done").exists() and (tmp_path / "m2m_hard/singh_dual/seed0/done").exists()
    metrics = [json.loads(x) for x in (tmp_path / "m2m_hard/singh_dual/seed0/metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"]["anchor"] >= 0.0
    assert study.jobs_of(pre, tmp_path, [0], only="^m2m_hard/singh_dual$") == []


def test_study_runs_through_submitit_and_reports_a_failed_run_with_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--launcher submitit-local: each run is a submitit job (the study's worker pickled by value); a run that fails
    (here: a folder started with another configuration) is reported with its log and the command exits 1."""
    pytest.importorskip("submitit")
    study = _study()
    bad = tmp_path / "m2m_hard/erm/seed0"
    bad.mkdir(parents=True)
    (bad / "config.yaml").write_text("seed: 5\n")
    args = ["run", "--regime", "scratch", "--root", str(tmp_path), "--seeds", "0", "--only",
            "^m2m_hard/(erm|paper_l0.1)$", "--launcher", "submitit-local", "--time", "20", "--threads", "1",
            "--quiet", "--set", *TINY]
    with caplog.at_level(logging.ERROR, logger="study"):
        assert study.main(args) == 1
    assert (tmp_path / "m2m_hard/paper_l0.1/seed0/done").exists()
    assert (tmp_path / "m2m_hard/paper_l0.1/seed0/study_metrics.json").exists()  # measured inside the job
    assert not (bad / "done").exists()
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("m2m_hard/erm/seed0 failed")]
    assert failed and "started with another configuration" in failed[0]
    log = Path(failed[0].rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs" and "TrainingError" in log.read_text()


def _record(val_wga: float, val_nll: float, test_wga: float) -> dict:
    return {"seed": 0, "selected_epoch": 4, "val_wga": val_wga, "val_nll": val_nll, "test_aa": 0.5,
            "test_wga": test_wga, "last_test_aa": 0.5, "last_test_wga": test_wga, "oracle_val_wga": val_wga,
            "oracle_test_aa": 0.5, "oracle_test_wga": test_wga, "train_zero_cam": 0.0, "train_penalty": 0.5}


def test_pretrained_default_is_chosen_on_m2m_hard_by_val_wga_then_val_nll() -> None:
    """In this table three variants ran on m2m_hard and only the default on the minority variant: the choice is
    made among all variants on m2m_hard (not trivially among those that ran everywhere), ties of val WGA broken by
    val nll, and test numbers never choose."""
    study = _study()
    pre = study.REGIMES["pretrained"]
    assert pre.choose_on == ("m2m_hard",)
    table = {
        "m2m_hard": {"paper_dual_l0.1": [_record(1.0, 0.30, 0.9)], "paper_dual_l1_warm": [_record(1.0, 0.10, 0.0)],
                     "evid_dual_all_l0.1": [_record(0.9, 0.01, 1.0)]},
        "m2m_hard_min5": {"paper_dual_l0.1": [_record(1.0, 0.30, 0.9)]},
    }
    assert study.choose(table, "val_wga", pre.choose_on, pre) == "paper_dual_l1_warm"
    assert study.choose(table, "val_wga", None, pre) is None  # o2o_hard has no runs here: no variant ran on all three
    text = study.render(table, pre)
    assert "over m2m_hard, ties broken" in text and "**paper_dual_l1_warm**" in text
    assert "`paper_dual_l1_warm` ← val choice" in text
