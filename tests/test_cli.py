import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY as _TINY

from ex2l_xai.cli import COMMANDS, build_parser, main

TINY = [o for o in _TINY if o != "train.device=cpu"]


def sets(*overrides: str) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out += ["--set", o]
    return out


def test_train_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", "quick", *sets(*TINY, "algorithm.name=erm"), "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "erm" in out and "test WGA" in out
    assert (run / "done").exists()
    results = json.loads((run / "results.json").read_text())

    assert main(["evaluate", str(run), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == results["test"]
    assert main(["evaluate", str(run), "--split", "val", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "on val" in table and "bulldog/dirt" in table and "worst group" in table


def test_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ex2l: error: config 'nope': not a file and not a preset") and err.count("\n") == 1
    assert main(["train", "--config", "quick", "--set", "train.epochs=ten", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == "ex2l: error: train.epochs: expected an integer, got 'ten'\n"
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # usage errors are argparse's (exit 2 too)
        main(["train", "--out", str(tmp_path)])
    assert info.value.code == 2


def test_demo_tiny_and_skips_done_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quiet", *sets(*TINY)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("erm", "groupdro", "ex2l"):
        assert (out / name / "done").exists()
        assert json.loads((out / name / "results.json").read_text())["algorithm"] == name
        assert f"\n{name} " in table
    assert "test avg" in table and "wall time" in table
    mtime = (out / "erm" / "checkpoint.pt").stat().st_mtime_ns
    assert main(argv) == 0  # resumable: finished runs are skipped
    assert (out / "erm" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_subcommands_are_registered_by_one_function() -> None:
    assert len(COMMANDS) >= 3
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"train", "evaluate", "demo"} <= set(choices)


def test_module_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "ex2l_xai.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "demo" in done.stdout
