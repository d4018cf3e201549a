import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import TINY as _TINY

from ex2l_xai.algorithms.erm import ERM
from ex2l_xai.algorithms.groupdro import GroupDRO
from ex2l_xai.config import Config, load_config
from ex2l_xai.errors import TrainingError
from ex2l_xai.train import RUN_FILES, evaluate, lr_factor, train

TINY = [o for o in _TINY if o != "train.epochs=1"] + ["train.epochs=2"]
M_KEYS = {"avg_acc", "mean_group_acc", "worst_group_acc", "per_group", "nll", "worst_group_nll"}


def tiny(*overrides: str) -> Config:
    return load_config("quick", [*TINY, *overrides])


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt["algorithm"].items() if k.startswith("model.")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_timing(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k != "wall_seconds"}


def metric_lines(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        r.pop("seconds")
    return lines


def test_run_folder_contract(tmp_path: Path) -> None:
    run = tmp_path / "run"
    results = train(tiny("algorithm.name=ex2l"), run, quiet=True)
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    assert (run / "done").stat().st_size == 0
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == results
    assert {"algorithm", "dataset", "seed", "selection", "selected_epoch", "val", "test"} <= set(results)
    assert results["algorithm"] == "ex2l" and results["dataset"] == "synthetic" and results["seed"] == 0
    assert results["selection"] == "val_worst_group_acc" and results["selected_epoch"] in (1, 2)
    for split in ("val", "test", "oracle_val"):
        m = results[split]
        assert set(m) == M_KEYS
        assert all(0.0 <= m[k] <= 1.0 for k in ("avg_acc", "mean_group_acc", "worst_group_acc"))
        assert all(set(v) == {"acc", "n", "nll"} and v["n"] > 0 for v in m["per_group"].values())
    assert "bulldog/dirt" in results["val"]["per_group"]  # "<label>/<confounder>" names
    assert "zero_cam_share" in results

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"epoch", "step", "loss", "stats", "val", "test", "oracle_val", "seconds"} <= set(r)
        assert {"ce", "conf_ce", "penalty", "loss"} <= set(r["loss"]) and "zero_cam_share" in r["stats"]
    assert lines[1]["step"] == 2 * lines[0]["step"] > 0
    chosen = lines[results["selected_epoch"] - 1]
    assert chosen["val"] == results["val"] and chosen["test"] == results["test"]

    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == results["selected_epoch"] and isinstance(best["model"], dict)
    assert best["n_confounders"] == 6 and best["group_names"][0] == "bulldog/desert"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "optimizer" in ckpt and "rng" in ckpt
    assert yaml.safe_load((run / "config.yaml").read_text())["algorithm"]["name"] == "ex2l"

    # evaluate() reloads best.pt and reproduces the selected epoch's numbers
    assert evaluate(run, "test", device="cpu") == results["test"]
    assert evaluate(run, "oracle_val", device="cpu") == results["oracle_val"]

    # a finished folder is skipped; another config in the same folder is refused
    mtime = (run / "checkpoint.pt").stat().st_mtime_ns
    assert train(tiny("algorithm.name=ex2l", "train.quiet=true"), run) == results
    assert (run / "checkpoint.pt").stat().st_mtime_ns == mtime
    with pytest.raises(TrainingError, match=r"another configuration \(seed: 0 there, 1 now"):
        train(tiny("algorithm.name=ex2l", "seed=1"), run, quiet=True)


def test_lambda_zero_ex2l_equals_two_head_erm(tmp_path: Path) -> None:
    train(tiny("algorithm.name=ex2l", "algorithm.penalty_weight=0", "train.epochs=1"), tmp_path / "ex2l", quiet=True)
    train(tiny("algorithm.name=erm", "algorithm.conf_weight=1.0", "train.epochs=1"), tmp_path / "erm", quiet=True)
    a = torch.load(tmp_path / "ex2l" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "erm" / "checkpoint.pt", weights_only=True)
    assert_same_tensors(model_state(a), model_state(b))
    assert "model.conf_head.weight" in model_state(a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ERM.loss

    def poisoned(self: ERM, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = real(self, batch, epoch)
        return (loss * float("nan"), parts) if epoch == 1 else (loss, parts)

    monkeypatch.setattr(ERM, "loss", poisoned)
    run = tmp_path / "run"
    config = tiny("algorithm.name=erm", "train.epochs=3")
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 2, step 4 .*checkpoint \(epoch 1\)"):
        train(config, run, quiet=True)
    assert not (run / "done").exists() and not (run / "results.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in metric_lines(run)] == [1]
    # once the cause is gone, the same command resumes and finishes
    monkeypatch.setattr(ERM, "loss", real)
    assert train(config, run, quiet=True)["selected_epoch"] in (1, 2, 3)
    assert (run / "done").exists()


def test_groupdro_q_is_restored_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny("algorithm.name=groupdro", "algorithm.eta=1.0", "train.epochs=2")
    full = train(config, tmp_path / "full", quiet=True)

    real = GroupDRO.loss
    seen: list[torch.Tensor] = []

    def stop_in_epoch_2(self: GroupDRO, batch: dict[str, torch.Tensor], epoch: int) -> Any:
        if epoch == 1:
            raise KeyboardInterrupt  # like a kill during epoch 2
        return real(self, batch, epoch)

    def record_q(self: GroupDRO, batch: dict[str, torch.Tensor], epoch: int) -> Any:
        if not seen:
            seen.append(self.q.clone())
        return real(self, batch, epoch)

    run = tmp_path / "resumed"
    monkeypatch.setattr(GroupDRO, "loss", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(config, run, quiet=True)
    saved_q = torch.load(run / "checkpoint.pt", weights_only=True)["algorithm"]["q"]
    assert not torch.allclose(saved_q, torch.full_like(saved_q, saved_q.max()))  # q moved away from uniform
    monkeypatch.setattr(GroupDRO, "loss", record_q)
    resumed = train(config, run, quiet=True)
    assert torch.equal(seen[0], saved_q)
    assert without_timing(resumed) == without_timing(full)
    assert metric_lines(run) == metric_lines(tmp_path / "full")


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*TINY, "data.options.per_group=16", "algorithm.name=ex2l", "train.epochs=5"]
    full = train(load_config("quick", overrides), tmp_path / "full", quiet=True)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ex2l_xai.cli", "train", "--config", "quick", "--out", str(run), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "done").exists(), "the run finished before it could be killed"
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < 5

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((run / "results.json").read_text())
    assert without_timing(resumed) == without_timing(full)
    assert metric_lines(run) == metric_lines(tmp_path / "full")
    a = torch.load(run / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(
        model_state(torch.load(run / "checkpoint.pt", weights_only=True)),
        model_state(torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)),
    )


def test_same_config_same_results_and_selection_by_avg(tmp_path: Path) -> None:
    config = tiny("algorithm.name=erm", "train.selection=val_avg_acc", "optim.name=sgd", "schedule.name=step",
                  "schedule.step_size=1", "schedule.gamma=0.5")
    a = train(config, tmp_path / "a", quiet=True)
    b = train(config, tmp_path / "b", quiet=True)
    assert without_timing(a) == without_timing(b)
    lines = metric_lines(tmp_path / "a")
    best = max(lines, key=lambda r: r["val"]["avg_acc"])  # max() keeps the earliest of ties
    assert a["selected_epoch"] == best["epoch"] and a["selection"] == "val_avg_acc"
    assert [r["lr"] for r in lines] == pytest.approx([config.optim.lr, config.optim.lr * 0.5])


def test_lr_schedules() -> None:
    c = load_config("quick", ["train.epochs=10", "schedule.name=cosine", "schedule.warmup_epochs=2"])
    f = [lr_factor(c, e) for e in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(x > y for x, y in zip(f[2:], f[3:], strict=False)) and f[-1] > 0
    s = load_config("quick", ["schedule.name=step", "schedule.step_size=3", "schedule.gamma=0.1"])
    assert [lr_factor(s, e) for e in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])


def test_selection_breaks_ties_of_validation_accuracy_by_validation_nll(tmp_path: Path) -> None:
    """The key is (val WGA, -val nll): a 100 % tie goes to the epoch with the lowest validation cross-entropy."""
    from ex2l_xai.train.rundir import selection_key

    config = load_config("quick", TINY)
    rec = lambda wga, nll: {"val": {"worst_group_acc": wga, "avg_acc": wga, **({} if nll is None else {"nll": nll})}}  # noqa: E731
    assert selection_key(config, rec(1.0, 0.2)) > selection_key(config, rec(1.0, 0.5))
    assert selection_key(config, rec(0.9, 0.01)) < selection_key(config, rec(1.0, 0.5))
    assert selection_key(config, rec(1.0, None)) < selection_key(config, rec(1.0, 3.0))  # older records
    out = tmp_path / "run"
    results = train(load_config("quick", [*TINY, "train.epochs=3"]), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["val"]["nll"], float) and r["val"]["nll"] > 0 for r in records)
    best = max(records, key=lambda r: (r["val"]["worst_group_acc"], -r["val"]["nll"]))
    assert results["selected_epoch"] == best["epoch"]


def test_cudnn_flags_are_set_for_the_run_and_restored_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cudnn = torch.backends.cudnn
    seen: list[tuple[bool, bool]] = []
    real = ERM.loss

    def watched(self: ERM, batch: dict[str, torch.Tensor], epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        seen.append((cudnn.deterministic, cudnn.benchmark))
        if len(seen) == 2 and not cudnn.deterministic:
            raise RuntimeError("a step that fails")
        return real(self, batch, epoch)

    monkeypatch.setattr(ERM, "loss", watched)
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.setattr(cudnn, "benchmark", True)
    train(tiny("algorithm.name=erm", "train.epochs=1", "train.deterministic=true"), tmp_path / "a", quiet=True)
    assert seen and set(seen) == {(True, False)}  # the run's flags, on every step
    assert (cudnn.deterministic, cudnn.benchmark) == (False, True)  # the caller's, back
    seen.clear()
    cudnn.deterministic = True
    with pytest.raises(RuntimeError, match="a step that fails"):
        train(tiny("algorithm.name=erm", "train.epochs=1", "train.deterministic=false"), tmp_path / "b", quiet=True)
    assert set(seen) == {(False, True)} and len(seen) == 2
    assert (cudnn.deterministic, cudnn.benchmark) == (True, True)  # restored after an error too
