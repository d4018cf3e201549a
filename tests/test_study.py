"""The eX2L study script: runs resumably, measures each run, renders the tables it writes into results.md."""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "figures" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod
    spec.loader.exec_module(mod)  # puts figures/ on sys.path: studylib imports after this
    return mod


def test_study_run_skip_and_report(tmp_path: Path) -> None:
    study = _study()
    args = ["run", "--regime", "scratch", "--root", str(tmp_path), "--seeds", "0", "--only",
            "^m2m_hard/(erm|paper_l0.1)$", "--jobs", "1", "--threads", "1", "--quiet", "--set", *TINY,
            "data.options.test_per_group=20"]  # 10 test images per background: enough for the 5-fold leak probe
    assert study.main(args) == 0
    runs = sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("done"))
    assert runs == ["m2m_hard/erm/seed0", "m2m_hard/paper_l0.1/seed0"]
    metrics = json.loads((tmp_path / "m2m_hard/paper_l0.1/seed0/study_metrics.json").read_text())
    assert 0.0 <= metrics["zero_cam_share"] <= 1.0 and 0.0 <= metrics["cam_in_mask"] <= 1.0
    assert 0.0 <= metrics["cam_overlap"] <= 1.0  # Dice of the label and confounder CAMs
    assert metrics["chance"] == 0.5  # each m2m test class sits on two backgrounds
    # the diagnostics are the audit's own numbers for that run (its localization and leakage checks)
    from analysis.audit import audit_one
    from analysis.settings import AuditSettings

    entry = audit_one(tmp_path / "m2m_hard/paper_l0.1/seed0", AuditSettings(split="test", max_samples=800),
                      checks=["localization", "leakage"]).entry
    assert (metrics["cam_overlap"], metrics["zero_cam_share"]) == (entry["cam_overlap"], entry["zero_cam_share"])
    assert metrics["logit_leak"] == entry["leakage"]["logit_leak"] and metrics["n"] == entry["n_samples"]
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
    from studylib.runner import INFERRED, overrides_for, run_dir

    from ex2l_xai.config import load_config

    for regime in study.REGIMES.values():
        for bench in regime.benchmarks:
            for method in regime.methods_of(bench):
                table = None
                if method in regime.confounders_from:  # the first stage's table, written before the run starts
                    table = run_dir(tmp_path, bench, regime.confounders_from[method], 1) / INFERRED
                    table.parent.mkdir(parents=True, exist_ok=True)
                    table.touch()
                cfg = load_config(regime.preset, overrides_for(regime, bench, method, 1, root=tmp_path))
                assert cfg.data.confounders == (None if table is None else str(table))
                assert cfg.seed == 1
                size = 64 if regime.name == "scratch" else 128
                assert cfg.data.options["image_size"] == size, (regime.name, bench, method)
    pre = study.REGIMES["pretrained"]
    cfg = load_config(pre.preset, overrides_for(pre, "o2o_hard", "singh_dual", 2, root=tmp_path))
    assert cfg.model.init_from == str(tmp_path / "o2o_hard" / "erm_2head" / "seed2")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.model.freeze == "layer3"


def test_study_methods_do_not_inherit_the_presets_algorithm_options() -> None:
    """A study's method of the preset's own algorithm sets every algorithm option the preset sets (and the model's
    architecture), so changing the preset's default (the pretrained preset's eX2L) never changes a study's runs."""
    study = _study()
    from ex2l_xai.config import preset_path

    for regime in study.REGIMES.values():
        preset = yaml.safe_load(preset_path(regime.preset).read_text())
        fixed = [k for k in preset.get("algorithm", {}) if k != "name"]
        for name, method in regime.methods.items():
            given = {o.partition("=")[0] for o in (*regime.base, *method.overrides)}
            assert "model.architecture" in given, (regime.name, name)
            if f"algorithm.name={preset['algorithm']['name']}" in method.overrides:
                missing = [k for k in fixed if f"algorithm.{k}" not in given]
                assert not missing, (regime.name, name, missing)


def test_pretrained_variants_run_on_every_benchmark() -> None:
    """Each kind of eX2L variant (shared and dual paper form, a stronger λ, evidence, Singh's form with its control,
    the penalty at an earlier block) runs on every benchmark of the pretrained regime, not on m2m_hard alone, and
    each dependent run's starting run is in the same benchmark's set."""
    study = _study()
    pre = study.REGIMES["pretrained"]
    kinds = {"erm", "erm_2head", "groupdro", "paper_l0.1", "paper_dual_l0.1", "paper_dual_l1", "evid_dual_all_l0.1",
             "singh_dual", "erm_2head_cont", "gradmask_l3"}
    for bench in pre.benchmarks:
        methods = set(pre.methods_of(bench))
        assert kinds <= methods, (bench, kinds - methods)
        for method, start in pre.init_from.items():
            assert method not in methods or start in methods, (bench, method)


def test_runs_that_start_from_another_run_come_in_a_second_wave(tmp_path: Path) -> None:
    """Singh et al.'s form starts from two-head ERM of the same benchmark and seed: the waves say so, also when
    --only selects the dependent run alone; a tiny pretrained sweep runs them in that order."""
    study = _study()
    pre = study.REGIMES["pretrained"]
    from studylib.runner import jobs_of

    waves = jobs_of(pre, tmp_path, [0], only="^m2m_hard/singh_dual$")
    assert waves == [[("m2m_hard", "erm_2head", 0)], [("m2m_hard", "singh_dual", 0)]]
    tiny = [o for o in TINY if not o.startswith("model.width")] + ["data.options.image_size=64"]
    args = ["run", "--regime", "pretrained", "--root", str(tmp_path), "--seeds", "0", "--only", "^m2m_hard/singh_dual$", "--jobs", "1",
            "--quiet", "--set", *tiny]
    assert study.main(args) == 0
    assert (tmp_path / "m2m_hard/erm_2head/seed0/done").exists() and (tmp_path / "m2m_hard/singh_dual/seed0/done").exists()
    metrics = [json.loads(x) for x in (tmp_path / "m2m_hard/singh_dual/seed0/metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"]["anchor"] >= 0.0
    assert jobs_of(pre, tmp_path, [0], only="^m2m_hard/singh_dual$") == []


def test_inferred_confounders_come_from_the_first_stage_and_get_their_table(tmp_path: Path) -> None:
    """A method with ``confounders_from`` runs after that run, trains on the table inferred from it (written once
    into its folder) and the report scores the inference and pairs the method with its true-confounder twin."""
    study = _study()
    reg = study.REGIMES["inferred"]
    from studylib.aggregate import collect
    from studylib.runner import INFERRED, jobs_of
    from studylib.tables import inferred_table, is_ex2l

    assert jobs_of(reg, tmp_path, [0], only="^m2m_hard/groupdro_inferred$") == [
        [("m2m_hard", "erm", 0)], [("m2m_hard", "groupdro_inferred", 0)]]
    assert not is_ex2l(reg, "paper_dual_l0.1_inferred") and is_ex2l(reg, "paper_dual_l0.1")
    tiny = [o for o in TINY if not o.startswith("model.width")] + ["data.options.image_size=64",
                                                                   "data.options.test_per_group=20"]
    args = ["run", "--regime", "inferred", "--root", str(tmp_path), "--seeds", "0", "--only",
            "^m2m_hard/groupdro(_inferred)?$", "--jobs", "1", "--quiet", "--set", *tiny]
    assert study.main(args) == 0
    table = tmp_path / "m2m_hard/erm/seed0" / INFERRED
    report = json.loads(Path(f"{table}.json").read_text())
    config = (tmp_path / "m2m_hard/groupdro_inferred/seed0/config.yaml").read_text()
    assert f"confounders: {table}" in config and 2 <= report["k"] <= 8
    rows = collect(tmp_path, reg)["m2m_hard"]
    rec = rows["groupdro_inferred"][0]
    assert (rec["inferred_k"], rec["inferred_ari"]) == (report["k"], report["splits"]["train"]["ari"])
    text = inferred_table(rows, reg)
    true = rows["groupdro"][0]["test_wga"]
    line = next(x for x in text.splitlines() if x.startswith("| `groupdro_inferred`"))
    assert f"| {report['k']:.1f} ± 0.0 |" in line and f"| {100 * true:.1f} ± 0.0 |" in line
    d = 100 * (rec["test_wga"] - true)
    assert f"| {d:+.1f} [{d:+.1f}, {d:+.1f}]" in line  # one seed: the interval is the difference itself


def test_report_adds_rows_the_root_lacks_from_a_summary(tmp_path: Path) -> None:
    """The inferred study's true-confounder rows can come from the pretrained study's summary (same configurations):
    rows the root has are kept, the others are added, and the section says so by their numbers."""
    study = _study()
    summary = ROOT / "docs" / "data" / "study_pretrained_summary.json"
    recs = json.loads(summary.read_text())["m2m_hard"]["groupdro"]
    md = tmp_path / "r.md"
    assert study.main(["report", "--regime", "inferred", "--root", str(tmp_path), "--add", str(summary),
                       "--md", str(md), "--quiet"]) == 0
    text = md.read_text()
    row = next(x for x in text.splitlines() if x.startswith("| `groupdro`: GroupDRO"))
    from studylib.tables import ms

    assert f"| {len(recs)} |" in row and f"**{ms([r['test_wga'] for r in recs])}**" in row
    assert "`groupdro_inferred`" not in text  # not in the summary, not run: no row


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
    from studylib.tables import choose, render

    pre = study.REGIMES["pretrained"]
    assert pre.choose_on == ("m2m_hard",)
    table = {
        "m2m_hard": {"paper_dual_l0.1": [_record(1.0, 0.30, 0.9)], "paper_dual_l1_warm": [_record(1.0, 0.10, 0.0)],
                     "evid_dual_all_l0.1": [_record(0.9, 0.01, 1.0)]},
        "m2m_hard_min5": {"paper_dual_l0.1": [_record(1.0, 0.30, 0.9)]},
    }
    assert choose(table, "val_wga", pre.choose_on, pre) == "paper_dual_l1_warm"
    assert choose(table, "val_wga", None, pre) is None  # o2o_hard has no runs here: no variant ran on all three
    text = render(table, pre)
    assert "over m2m_hard, ties broken" in text and "**paper_dual_l1_warm**" in text
    assert "`paper_dual_l1_warm` ← val choice" in text


def _sweep(**changes) -> dict:
    data = {"name": "t", "title": "T", "preset": "quick", "seeds": 2, "markers": ["<!-- a -->", "<!-- b -->"],
            "base": [], "benchmarks": {"b1": {"description": "B", "overrides": []}},
            "methods": {"erm": {"description": "ERM", "overrides": ["algorithm.name=erm"], "seeds": 3},
                        "ex": {"description": "X", "overrides": ["algorithm.name=ex2l"]}},
            "baselines": ["erm"]}
    data.update(changes)
    return data


def test_sweep_files_are_checked_with_errors_naming_the_file_and_key() -> None:
    _study()
    from studylib.regimes import SweepError, parse_regime

    regime = parse_regime(_sweep(), "t.yaml")
    assert regime.seeds_of("erm") == (0, 1, 2) and regime.seeds_of("ex") == (0, 1)
    with pytest.raises(SweepError, match=r"t.yaml: unknown keys \['sweeps'\]"):
        parse_regime(_sweep(sweeps=1), "t.yaml")
    bad = _sweep(benchmarks={"b1": {"description": "B", "overrides": [], "methods": ["erm", "nope"]}})
    with pytest.raises(SweepError, match=r"t.yaml: benchmarks.b1.methods: unknown method 'nope'"):
        parse_regime(bad, "t.yaml")
    with pytest.raises(SweepError, match=r"t.yaml: methods.ex: missing key 'description'"):
        parse_regime(_sweep(methods={"ex": {"overrides": []}}), "t.yaml")
    with pytest.raises(SweepError, match=r"baselines: unknown method 'dro'"):
        parse_regime(_sweep(baselines=["dro"]), "t.yaml")


def test_each_method_runs_its_own_seeds_seed_major(tmp_path: Path) -> None:
    _study()
    from studylib.regimes import parse_regime
    from studylib.runner import jobs_of

    regime = parse_regime(_sweep(), "t.yaml")
    assert jobs_of(regime, tmp_path) == [[("b1", "erm", 0), ("b1", "ex", 0), ("b1", "erm", 1), ("b1", "ex", 1),
                                          ("b1", "erm", 2)]]
    assert jobs_of(regime, tmp_path, seeds=[2]) == [[("b1", "erm", 2)]]


def test_paired_table_and_outcome_from_a_planted_table() -> None:
    """eX2L ahead of ERM by 10 points of WGA on every seed: the paired difference is +10.0 with a point interval
    that excludes 0, and the outcome says it beats the baseline; by 2 points it does not."""
    _study()
    from studylib.regimes import parse_regime
    from studylib.tables import outcome, paired_table

    regime = parse_regime(_sweep(), "t.yaml")

    def recs(wgas):
        return [{"seed": s, "test_aa": 0.5, "test_wga": w, "test_mga": 0.5} for s, w in enumerate(wgas)]

    rows = {"erm": recs([0.1, 0.2, 0.3]), "ex": recs([0.2, 0.3, 0.4])}
    text = paired_table(rows, regime)
    assert "| `ex` | `erm` | 3 | +0.0 [+0.0, +0.0] | +10.0 [+10.0, +10.0]* | +0.0 [+0.0, +0.0] | 100 % |" in text
    assert outcome({"b1": rows}, regime).startswith("`ex` on b1 beats `erm` by at least 5 points")
    rows["ex"] = recs([0.12, 0.22, 0.32])
    assert outcome({"b1": rows}, regime).startswith("No eX2L variant beats `erm` by 5 points")


def test_default_is_chosen_across_studies_on_validation_only() -> None:
    """Two studies, each with its own choose_on benchmark: a variant must have runs on both to compete; val WGA
    first, then the lower val CE; test numbers play no part."""
    _study()
    from studylib.regimes import parse_regime
    from studylib.tables import choose_default

    a = parse_regime(_sweep(name="a", choose_on=["b1"]), "a.yaml")
    b = parse_regime(_sweep(name="b", choose_on=["b1"], methods={
        "erm": {"description": "ERM", "overrides": ["algorithm.name=erm"]},
        "ex": {"description": "X", "overrides": ["algorithm.name=ex2l"]},
        "ex2": {"description": "Y", "overrides": ["algorithm.name=ex2l"]}}), "b.yaml")
    t_a = {"b1": {"ex": [_record(1.0, 0.30, 0.0)]}}
    t_b = {"b1": {"ex": [_record(1.0, 0.10, 0.0)], "ex2": [_record(1.0, 0.01, 1.0)]}}
    choice, scores = choose_default([(t_a, a), (t_b, b)])
    assert choice == "ex" and set(scores) == {"ex"}  # ex2 ran in one study only
    assert scores["ex"]["val_nll"] == pytest.approx(0.2)
    t_a["b1"]["ex2"] = [_record(1.0, 0.01, 0.0)]
    assert choose_default([(t_a, a), (t_b, b)])[0] == "ex2"  # same val WGA, lower val CE


def test_default_excludes_two_step_recipes() -> None:
    """A variant that starts from another run (init_from: twice the budget) never becomes the one-run default,
    however low its validation cross-entropy; without init_from the same rows would win."""
    _study()
    from studylib.regimes import parse_regime
    from studylib.tables import choose_default

    methods = {"erm": {"description": "ERM", "overrides": ["algorithm.name=erm"]},
               "ex": {"description": "X", "overrides": ["algorithm.name=ex2l"]},
               "two": {"description": "Y", "overrides": ["algorithm.name=ex2l"], "init_from": "erm"}}
    a = parse_regime(_sweep(name="a", choose_on=["b1"], methods=methods), "a.yaml")
    t = {"b1": {"ex": [_record(1.0, 0.10, 0.0)], "two": [_record(1.0, 0.001, 0.0)]}}
    choice, scores = choose_default([(t, a)])
    assert choice == "ex" and set(scores) == {"ex"}
    methods["two"].pop("init_from")
    assert choose_default([(t, parse_regime(_sweep(name="a", choose_on=["b1"], methods=methods), "a.yaml"))])[0] == "two"
