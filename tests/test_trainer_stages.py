"""The trainer's algorithm hooks: stages resume bit for bit at any epoch (inside a stage, at a stage boundary,
before a fit stage), several optimisers are saved and restored, evaluation subsets reach results.json and
`ex2l evaluate`, the one optimiser-step function, and an algorithm dropped into the package as one file."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY as _TINY

import ex2l_xai
from ex2l_xai.algorithms import Stage, StepOutput
from ex2l_xai.algorithms.dann import DANN
from ex2l_xai.algorithms.dfr import DFR
from ex2l_xai.algorithms.jtt import JTT
from ex2l_xai.config import load_config
from ex2l_xai.errors import TrainingError
from ex2l_xai.train import evaluate, lr_factor, optimizer_step, train
from ex2l_xai.train.loop import check_optimizers, check_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = [o for o in _TINY if o != "train.epochs=1"] + ["train.epochs=2"]


def tiny(*overrides: str):
    return load_config("quick", [*TINY, *overrides])


def without_timing(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k != "wall_seconds"}


def records(run: Path) -> list[dict[str, Any]]:
    out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in out:
        r.pop("seconds")
    return out


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["algorithm"]


def assert_same_run(a: Path, b: Path) -> None:
    assert without_timing(json.loads((a / "results.json").read_text())) == without_timing(
        json.loads((b / "results.json").read_text()))
    assert records(a) == records(b)
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def interrupt(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, when: Any) -> None:
    """Make ``cls.method`` raise KeyboardInterrupt (like a kill) the first time ``when(*args)`` holds."""
    real = getattr(cls, method)
    fired: list[bool] = []

    def wrapped(self, *args: Any) -> Any:
        if not fired and when(*args):
            fired.append(True)
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(cls, method, wrapped)


@pytest.mark.parametrize(
    ("where", "when"),
    [
        ("identify", lambda batch, ctx: ctx.stage.name == "identify" and ctx.epoch == 1),
        ("boundary", lambda batch, ctx: ctx.stage.name == "retrain" and ctx.epoch == 0),  # after the start hook
        ("retrain", lambda batch, ctx: ctx.stage.name == "retrain" and ctx.epoch == 1),
    ],
)
@pytest.mark.parametrize("upweight", ["sample"])
def test_jtt_resumes_bit_for_bit_anywhere(where: str, when: Any, upweight: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("algorithm.name=jtt", f"algorithm.upweight={upweight}", "algorithm.lambda_up=3")
    train(config, tmp_path / "full", quiet=True)
    interrupt(monkeypatch, JTT, "training_step", when)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", quiet=True)
    monkeypatch.undo()
    train(config, tmp_path / "killed", quiet=True)
    assert_same_run(tmp_path / "full", tmp_path / "killed")
    assert int(final_state(tmp_path / "full")["error_set"].sum()) > 0


def test_dann_resumes_both_optimisers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("algorithm.name=dann", "train.epochs=3")
    train(config, tmp_path / "full", quiet=True)
    interrupt(monkeypatch, DANN, "training_step", lambda batch, ctx: ctx.epoch == 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", quiet=True)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt["optimizers"]) == {"disc"} and ckpt["optimizers"]["disc"]["state"]
    monkeypatch.undo()
    train(config, tmp_path / "killed", quiet=True)
    assert_same_run(tmp_path / "full", tmp_path / "killed")


def test_dfr_resumes_into_its_fit_stage_and_evaluates_on_the_held_out_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny("algorithm.name=dfr", "algorithm.fit_steps=40", "algorithm.select_every=10")
    full = train(config, tmp_path / "full", quiet=True)
    interrupt(monkeypatch, DFR, "fit", lambda stage, ctx: True)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", quiet=True)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    train(config, tmp_path / "killed", quiet=True)
    assert_same_run(tmp_path / "full", tmp_path / "killed")

    lines = records(tmp_path / "full")
    n_val = sum(g["n"] for g in lines[0]["val"]["per_group"].values())  # the ERM stage: the whole split
    n_held = sum(g["n"] for g in full["val"]["per_group"].values())
    assert full["selected_epoch"] == 3 and lines[2]["stage"] == "last_layer" and lines[2]["lr"] is None
    assert n_held == n_val // 2 and lines[2]["stats"]["select_samples"] == n_held
    assert sum(g["n"] for g in full["test"]["per_group"].values()) == sum(
        g["n"] for g in lines[0]["test"]["per_group"].values())  # test is never cut
    assert evaluate(tmp_path / "full", "val", device="cpu") == full["val"]
    assert evaluate(tmp_path / "full", "test", device="cpu") == full["test"]


def test_stage_schedules_restart() -> None:
    c = load_config("quick", ["train.epochs=10", "schedule.name=cosine"])
    assert [lr_factor(c, e, 2) for e in (0, 1)] == pytest.approx([1.0, 0.5])  # a 2-epoch stage's own cosine
    assert lr_factor(c, 1) == lr_factor(c, 1, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


def test_optimizer_step_resets_zeroes_and_steps_only_what_is_named() -> None:
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opts = {"model": torch.optim.Adam(a.parameters(), lr=0.1), "other": torch.optim.Adam(b.parameters(), lr=0.1)}
    x = torch.ones(4, 2)
    optimizer_step(StepOutput((a(x) + b(x)).sum(), {}, optimizers=("model", "other")), opts, grad_clip=0.0)
    assert opts["model"].state and opts["other"].state
    before = b.weight.detach().clone()
    optimizer_step(StepOutput((a(x) + b(x)).sum(), {}, reset=("model",)), opts, grad_clip=0.0)
    assert int(opts["model"].state[a.weight]["step"]) == 1  # cleared, then one step
    assert torch.equal(b.weight, before) and int(opts["other"].state[b.weight]["step"]) == 1
    with pytest.raises(TrainingError, match="optimiser 'disc'"):
        optimizer_step(StepOutput(a(x).sum(), {}, optimizers=("disc",)), opts, grad_clip=0.0)


def test_stage_and_optimizer_checks() -> None:
    with pytest.raises(TrainingError, match="must be selectable"):
        check_stages("x", [Stage("a"), Stage("b", selectable=False)])
    with pytest.raises(TrainingError, match="unique"):
        check_stages("x", [Stage("a"), Stage("a")])
    with pytest.raises(TrainingError, match="kind 'look'"):
        check_stages("x", [Stage("a", kind="look")])
    with pytest.raises(TrainingError, match="fit: 1"):
        check_stages("x", [Stage("a", epochs=2, kind="fit")])
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(TrainingError, match="in two optimisers"):
        check_optimizers("x", {"model": torch.optim.SGD(lin.parameters(), lr=1), "d": torch.optim.SGD([lin.bias], lr=1)})
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    check_optimizers("x", {"model": torch.optim.SGD(frozen.parameters(), lr=1)})  # the model's may list it
    with pytest.raises(TrainingError, match="frozen parameter"):
        check_optimizers("x", {"model": torch.optim.SGD(lin.parameters(), lr=1),
                               "d": torch.optim.SGD(frozen.parameters(), lr=1)})


def _toy_from_docs() -> tuple[str, str]:
    """The one-file algorithm of docs/training.md: its file name and code."""
    text = (ROOT / "docs" / "training.md").read_text()
    m = re.search(r"```python\n# ex2l_xai/algorithms/(\w+\.py)\n(.*?)```", text, re.S)
    assert m, "docs/training.md lost its toy algorithm"
    return m.group(1), m.group(2)


def test_an_algorithm_dropped_into_the_package_is_one_file(tmp_path: Path) -> None:
    """The toy algorithm of docs/training.md, saved into a copy of the package: found, configured, trained."""
    pkg = Path(ex2l_xai.__file__).parent
    shutil.copytree(pkg, tmp_path / "ex2l_xai", ignore=shutil.ignore_patterns("__pycache__"))
    filename, code = _toy_from_docs()
    (tmp_path / "ex2l_xai" / "algorithms" / filename).write_text(code)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "ex2l_xai.cli", "train", "--config", "quick", "--out", str(tmp_path / "run"), "-q",
           *[f"--set={s}" for s in _TINY], "--set=algorithm.name=label_smoothing", "--set=algorithm.smoothing=0.2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["algorithm"] == "label_smoothing"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "smoothing: 0.2" in config
    where = subprocess.run([sys.executable, "-c", "import ex2l_xai.algorithms as a; print(a.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(tmp_path))  # the copy was used, not the installed package
    bad = subprocess.run([*cmd[:7], str(tmp_path / "bad"), "--set=algorithm.name=label_smoothing",
                          "--set=algorithm.smoothing=lots"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "algorithm.smoothing: expected a number, got 'lots'" in bad.stderr
