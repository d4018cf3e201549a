"""The sweep launcher (ex2l_xai.launch): local processes, and submitit's local executor on a tiny sweep (including a
2-task job that trains one DDP run); waves, done folders skipped, failures reported with their logs; the #SBATCH
lines a SLURM sweep gets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import TINY

from ex2l_xai.config import load_config
from ex2l_xai.errors import ConfigError
from ex2l_xai.launch import (
    Job,
    LaunchError,
    LaunchOptions,
    launch,
    make_executor,
    require_submitit,
    submitit_parameters,
    train_jobs,
)

ERM = [*TINY, "algorithm.name=erm"]


def _bad_folder(path: Path) -> Path:
    """A run folder started with another configuration: training into it fails with a TrainingError."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("seed: 5\n")
    return path


def test_local_launcher_runs_waves_skips_done_folders_and_reports_failures(tmp_path: Path) -> None:
    first = train_jobs({"erm": (load_config("quick", ERM), tmp_path / "erm")}, threads=1)
    # the second wave starts from the first wave's run (model.init_from), as the study's anchored methods do
    second = train_jobs({
        "from_erm": (load_config("quick", [*ERM, f"model.init_from={tmp_path / 'erm'}"]), tmp_path / "from_erm"),
        "bad": (load_config("quick", ERM), _bad_folder(tmp_path / "bad")),
    }, threads=1)
    report = launch([first, second], LaunchOptions(launcher="local", workers=2), tmp_path / "logs")
    assert sorted(report.finished) == ["erm", "from_erm"] and report.skipped == []
    assert [f.name for f in report.failed] == ["bad"]
    failure = report.failed[0]
    assert "TrainingError" in failure.error and "started with another configuration" in failure.error
    assert Path(failure.log) == tmp_path / "logs" / "bad.err"
    assert "Traceback" in Path(failure.log).read_text()  # the whole traceback is kept
    with pytest.raises(LaunchError, match=r"1 of 3 jobs failed: bad: .* \(log: .*bad\.err\)"):
        report.raise_if_failed()
    assert (tmp_path / "from_erm" / "done").exists()

    again = launch([first, second], LaunchOptions(launcher="local"), tmp_path / "logs")
    assert sorted(again.skipped) == ["erm", "from_erm"] and again.finished == []
    assert [f.name for f in again.failed] == ["bad"]


def _boom(path: str) -> None:
    raise RuntimeError(f"planted failure for {path}")


def test_a_job_that_raises_is_never_lost(tmp_path: Path) -> None:
    jobs = [Job("a/b c", _boom, (str(tmp_path),)), Job("done", _boom, skip_if=str(tmp_path / "marker"))]
    (tmp_path / "marker").touch()
    report = launch([jobs], LaunchOptions(), tmp_path / "logs")
    assert report.skipped == ["done"]
    assert report.failed[0].error == f"RuntimeError: planted failure for {tmp_path}"
    assert Path(report.failed[0].log).name == "a__b__c.err"


def test_submitit_local_executor_runs_a_tiny_sweep(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    runs = {
        "erm": (load_config("quick", ERM), tmp_path / "erm"),
        "bad": (load_config("quick", ERM), _bad_folder(tmp_path / "bad")),
    }
    options = LaunchOptions(launcher="submitit-local", time_min=10)
    report = launch([train_jobs(runs, threads=1)], options, tmp_path / "logs", name="tiny")
    assert report.finished == ["erm"] and [f.name for f in report.failed] == ["bad"]
    results = json.loads((tmp_path / "erm" / "results.json").read_text())
    assert results["algorithm"] == "erm" and "world_size" not in results
    failure = report.failed[0]
    assert "started with another configuration" in failure.error
    assert Path(failure.log).parent == tmp_path / "logs" and failure.log.endswith("_log.err")
    assert "TrainingError" in Path(failure.log).read_text()

    # a job of 2 tasks is one DDP run over them (gloo): rank 0 writes the folder
    ddp = {"groupdro": (load_config("quick", [*TINY, "algorithm.name=groupdro"]), tmp_path / "groupdro")}
    report = launch([train_jobs(ddp, threads=1)], LaunchOptions(launcher="submitit-local", tasks_per_job=2),
                    tmp_path / "logs")
    assert report.finished == ["groupdro"], report.failed
    assert json.loads((tmp_path / "groupdro" / "results.json").read_text())["world_size"] == 2

    again = launch([train_jobs({**runs, **ddp})], options, tmp_path / "logs")
    assert sorted(again.skipped) == ["erm", "groupdro"] and [f.name for f in again.failed] == ["bad"]


def test_slurm_sweep_gets_partition_gpus_time_and_array_parallelism(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    submitit = pytest.importorskip("submitit")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for srun before it builds a SLURM executor
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    options = LaunchOptions(launcher="slurm", partition="gpu", gpus_per_job=4, time_min=30, array_parallelism=8,
                            mem_gb=32, cpus_per_task=6, slurm_args={"account": "lab"})
    executor = make_executor(options, tmp_path / "logs", "study")
    script = submitit.slurm.slurm._make_sbatch_string(command="python job.py", folder=str(tmp_path / "logs"),
                                                      map_count=20, **executor._executor.parameters)
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=30", "--array=0-19%8",
                 "--mem=32GB", "--cpus-per-task=6", "--account=lab", "--job-name=study", "--nodes=1"):
        assert f"#SBATCH {line}\n" in script, line
    # one task per GPU unless told: each run is a DDP run over its GPUs
    assert submitit_parameters(LaunchOptions(launcher="slurm", gpus_per_job=2), "x")["tasks_per_node"] == 2
    assert submitit_parameters(LaunchOptions(launcher="slurm", gpus_per_job=2, tasks_per_job=1), "x")[
        "tasks_per_node"] == 1


def test_launch_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"launch option launcher: expected one of \['local', 'slurm'"):
        launch([], LaunchOptions(launcher="pbs"), tmp_path)
    with pytest.raises(ConfigError, match="launch option workers: expected >= 1, got 0"):
        LaunchOptions(workers=0).validate()
    with pytest.raises(ConfigError, match="tasks_per_job=2: the local launcher runs one process per job"):
        LaunchOptions(tasks_per_job=2).validate()


def test_missing_submitit_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    with pytest.raises(ConfigError, match=r"need submitit: pip install submitit"):
        require_submitit()
    with pytest.raises(ConfigError, match="pip install submitit"):
        launch([[Job("x", _boom)]], LaunchOptions(launcher="submitit-local"), tmp_path)
