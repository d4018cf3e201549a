"""RunFolder, the one reader and writer of a run folder's files (docs/architecture.md, "Run folder"): the names of
the contract, round trips of every file, a torn last metrics line, and errors that name the folder or file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY

from ex2l_xai.config import config_to_dict, load_config
from ex2l_xai.errors import TrainingError
from ex2l_xai.runfiles import RunFiles
from ex2l_xai.train import (
    RUN_FILES,
    RunFolder,
    build_model,
    load_best,
    load_run,
    load_run_config,
    read_metrics,
)


def test_the_names_are_the_contracts() -> None:
    run = RunFolder("some/run")
    assert RUN_FILES == RunFiles.NAMES == ("config.yaml", "metrics.jsonl", "checkpoint.pt", "best.pt",
                                           "results.json", "done")
    files = [run.config_file, run.metrics_file, run.checkpoint_file, run.best_file, run.results_file, run.done_file]
    assert [f.name for f in files] == list(RUN_FILES) and {f.parent for f in files} == {Path("some/run")}
    assert os.fspath(run) == "some/run" and run == RunFolder(Path("some/run")) and run != RunFolder("other")


def test_config_round_trip_and_the_resume_check(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    assert not run.exists() and not run.is_done()
    config = load_config("quick", TINY)
    run.create()
    run.write_config(config)
    assert run.exists() and run.read_config() == config == load_run_config(run.path)
    assert yaml.safe_load(run.config_file.read_text()) == config_to_dict(config)
    run.check_config(load_config("quick", [*TINY, "train.quiet=true"]))  # quiet and device aside
    with pytest.raises(TrainingError, match=r"run: this run folder was started with another configuration "
                                            r"\(seed: 0 there, 3 now\)"):
        run.check_config(load_config("quick", [*TINY, "seed=3"]))
    with pytest.raises(TrainingError, match=r"run: this run folder .*\(model.width: 8 there, 16 now, and 1 more"):
        run.check_config(load_config("quick", [*TINY, "model.width=16", "seed=3"]))


def test_config_errors_name_the_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"empty: no config.yaml; expected a run folder written by `ex2l train`"):
        RunFolder(tmp_path / "empty").read_config()
    bad = RunFolder(tmp_path / "bad")
    bad.create()
    bad.config_file.write_text("seed: [1\n")
    with pytest.raises(TrainingError, match=r"bad/config.yaml: invalid YAML"):
        bad.read_config()
    bad.config_file.write_text("seed: 1\noptim: {lr: fast}\n")
    with pytest.raises(TrainingError, match=r"bad/config.yaml: the run's configuration is not valid \(optim.lr"):
        bad.read_config()


def test_metrics_append_read_truncate_and_a_torn_line(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    assert run.read_metrics() == []
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "loss": {"loss": 1.0 / epoch}})
    with open(run.metrics_file, "a") as f:
        f.write('{"epoch": 4, "lo')  # a write cut by a kill
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    assert read_metrics(tmp_path) == read_metrics(run.metrics_file) == run.read_metrics()
    run.truncate_metrics(2)
    assert run.read_metrics() == [{"epoch": 1, "loss": {"loss": 1.0}}, {"epoch": 2, "loss": {"loss": 0.5}}]
    assert run.metrics_file.read_text().count("\n") == 2


def test_checkpoint_best_results_and_done(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    assert not run.has_checkpoint()
    run.save_checkpoint({"epoch": 2, "w": torch.arange(3.0)})
    ckpt = run.load_checkpoint()
    assert run.has_checkpoint() and ckpt["epoch"] == 2 and torch.equal(ckpt["w"], torch.arange(3.0))
    with pytest.raises(TrainingError, match=r"no best.pt; the run has not finished an evaluated epoch"):
        run.load_best()
    run.save_best({"epoch": 1, "score": 0.5})
    assert run.load_best() == load_best(tmp_path) == {"epoch": 1, "score": 0.5}
    run.clear_progress()
    assert not run.best_file.exists() and not run.metrics_file.exists() and run.has_checkpoint()

    assert run.read_results(missing_ok=True) is None
    with pytest.raises(TrainingError, match="no results.json; expected a finished run folder"):
        run.read_results()
    run.finish({"algorithm": "erm", "test": {"avg_acc": 0.75}})
    assert run.is_done() and run.done_file.read_bytes() == b""
    assert run.read_results() == json.loads(run.results_file.read_text()) == {"algorithm": "erm",
                                                                              "test": {"avg_acc": 0.75}}
    run.results_file.write_text("[1, 2]")
    with pytest.raises(TrainingError, match=r"results.json: expected a JSON object, got list"):
        run.read_results()
    run.results_file.write_text("{")
    with pytest.raises(TrainingError, match=r"results.json: cannot read results.json"):
        run.read_results()
    run.checkpoint_file.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=r"checkpoint.pt: cannot resume from this checkpoint .*delete it"):
        run.load_checkpoint()


def test_load_model_rebuilds_the_selected_network(tmp_path: Path) -> None:
    config = load_config("quick", [*TINY, "algorithm.name=ex2l"])
    torch.manual_seed(3)
    net = build_model(config, 4, 6)
    run = RunFolder(tmp_path)
    run.write_config(config)
    run.save_best({"model": net.state_dict(), "n_labels": 4, "n_confounders": 6, "epoch": 1})
    model, loaded_config, payload = run.load_model("cpu")
    assert loaded_config == config and payload == {"n_labels": 4, "n_confounders": 6, "epoch": 1}
    assert not model.training and model.conf_head is not None
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).label, net.eval()(x).label, rtol=0, atol=0)
    again, _, _ = load_run(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values(),
                                                 strict=True))
