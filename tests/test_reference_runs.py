"""ERM, GroupDRO and eX2L keep their results bit for bit across refactors of the trainer and the algorithms.

``tests/reference_runs.json`` was recorded with the trainer and algorithms as they were before the algorithm
interface was rebuilt (issue 12; the commit is in the file): for each tiny two-epoch run, every
``metrics.jsonl`` record (the loss parts averaged over each epoch's steps, the evaluations, the learning rate,
the step counter), ``results.json`` and a SHA-256 digest of the final and of the selected weights. Rerun on the
platform that recorded them (same torch build, CPU capability and thread count), everything must be equal to the last bit; on
another platform the floats are compared to 1e-4 and the weights by per-tensor sums (kernels differ by vector
width), and the digests are not compared.

To record them again (only when a change of results is intended and explained in its commit)::

    .venv/bin/python tests/test_reference_runs.py            # every case
    .venv/bin/python tests/test_reference_runs.py NAME ...   # only these cases (a case whose configuration changed)

A case recorded again alone names its commit under ``rerecorded``; the others keep ``recorded_with``'s.
(``ex2l_frozen_dual`` froze small_cnn's ``stem``, the identity, i.e. nothing; the model now refuses that, and the
case freezes ``layer1``.)
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY as _TINY  # noqa: E402

from ex2l_xai.cli import main  # noqa: E402
from ex2l_xai.config import load_config  # noqa: E402
from ex2l_xai.train import train  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "reference_runs.json"
TINY = [o for o in _TINY if o != "train.epochs=1"] + ["train.epochs=2"]

# name -> overrides on the quick preset (dual backbones unless a case says shared)
CASES: dict[str, list[str]] = {
    "erm": ["algorithm.name=erm"],
    "erm_sgd_step": ["algorithm.name=erm", "optim.name=sgd", "schedule.name=step", "schedule.step_size=1",
                     "schedule.gamma=0.5", "train.grad_clip=1.0"],
    "erm_2head": ["algorithm.name=erm", "algorithm.conf_weight=1.0"],
    "erm_frozen_cached": ["algorithm.name=erm", "model.freeze=layer1", "model.cache_frozen=true"],
    "groupdro": ["algorithm.name=groupdro", "algorithm.eta=1.0", "algorithm.adjustment=1.0"],
    "ex2l_paper_dual": ["algorithm.name=ex2l"],
    "ex2l_paper_shared": ["algorithm.name=ex2l", "model.architecture=shared"],
    "ex2l_evidence": ["algorithm.name=ex2l", "model.architecture=shared", "algorithm.variant=evidence",
                      "algorithm.label_cam_classes=all", "algorithm.stop_grad=confounder",
                      "algorithm.conf_detach=true", "algorithm.penalty_weight=1.0", "algorithm.warmup_epochs=1"],
    "ex2l_gradmask": ["algorithm.name=ex2l", "algorithm.variant=gradmask", "algorithm.grad_at=layer1"],
    "ex2l_frozen_dual": ["algorithm.name=ex2l", "model.freeze=layer1"],
}
# started from the selected model of erm_2head (model.init_from), Singh et al.'s form with the anchor
ANCHORED = ["algorithm.name=ex2l", "algorithm.similarity=product", "algorithm.norm=minmax",
            "algorithm.cam_relu=false", "algorithm.anchor_weight=0.01"]
# through the command line: `ex2l train --config quick --set ...`
CLI_CASE = ["algorithm.name=ex2l", "model.architecture=shared", "algorithm.label_cam_target=pred"]


def _weights(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    h = hashlib.sha256()
    sums = {}
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
        sums[k] = float(t.double().sum()) if t.is_floating_point() else int(t.sum())
    return {"sha256": h.hexdigest(), "sums": sums}


def _model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in ckpt["algorithm"].items() if k.startswith("model.")}


def _observe(run: Path) -> dict[str, Any]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    results = json.loads((run / "results.json").read_text())
    results.pop("wall_seconds")
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    return {
        "metrics": records,
        "results": results,
        "final": _weights(_model_state(ckpt)),
        "best": _weights(best["model"]),
    }


def _run_case(name: str, root: Path, anchor_from: Path | None = None) -> dict[str, Any]:
    out = root / name
    if name == "cli":
        argv = ["train", "--config", "quick", "--out", str(out), "--quiet"]
        for o in [*TINY, *CLI_CASE]:
            argv += ["--set", o]
        assert main(argv) == 0
    elif name == "ex2l_anchored":
        assert anchor_from is not None
        train(load_config("quick", [*TINY, *ANCHORED, f"model.init_from={anchor_from}"]), out, quiet=True)
    else:
        train(load_config("quick", [*TINY, *CASES[name]]), out, quiet=True)
    return _observe(out)


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "threads": str(torch.get_num_threads())}


def _close(a: Any, b: Any, path: str) -> None:
    """Equal structure; floats within 1e-4 (relative) or 1e-6 (absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


def _recorded(got: Any, expected: Any) -> Any:
    """``got`` restricted to the keys the recording has: the run folder's contract adds keys (e.g. the metrics
    dict's per-group cross-entropy), it never renames or removes one, so what was recorded must be there, equal."""
    if isinstance(expected, dict) and isinstance(got, dict):
        return {k: _recorded(got[k], v) if k in got else got.get(k, "<missing>") for k, v in expected.items()}
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        return [_recorded(g, e) for g, e in zip(got, expected, strict=True)]
    return got


def _compare(expected: dict[str, Any], got: dict[str, Any], exact: bool) -> None:
    if exact:
        assert _recorded(got["metrics"], expected["metrics"]) == expected["metrics"]
        assert _recorded(got["results"], expected["results"]) == expected["results"]
        assert got["final"] == expected["final"]
        assert got["best"] == expected["best"]
    else:  # another platform: losses and weights close; accuracies may move by a sample, so they are not compared
        for g, e in zip(got["metrics"], expected["metrics"], strict=True):
            _close(e["loss"], g["loss"], "loss")
            assert (g["epoch"], g["step"]) == (e["epoch"], e["step"])
        _close(expected["final"]["sums"], got["final"]["sums"], "final")


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return json.loads(REFERENCE.read_text())


def test_reference_file_covers_every_case(reference: dict[str, Any]) -> None:
    assert set(reference["cases"]) == {*CASES, "ex2l_anchored", "cli"}
    assert len(reference["recorded_with"]) == 40  # the commit of the code that recorded them
    assert set(reference.get("rerecorded", {})) <= set(reference["cases"])  # cases recorded again alone
    assert all(len(c) == 40 for c in reference.get("rerecorded", {}).values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_runs_equal_the_recorded_ones(name: str, reference: dict[str, Any], tmp_path: Path) -> None:
    exact = reference["platform"] == _platform()
    _compare(reference["cases"][name], _run_case(name, tmp_path), exact)


def test_anchored_and_cli_runs_equal_the_recorded_ones(reference: dict[str, Any], tmp_path: Path) -> None:
    exact = reference["platform"] == _platform()
    _compare(reference["cases"]["erm_2head"], _run_case("erm_2head", tmp_path), exact)
    _compare(reference["cases"]["ex2l_anchored"], _run_case("ex2l_anchored", tmp_path, tmp_path / "erm_2head"),
             exact)
    _compare(reference["cases"]["cli"], _run_case("cli", tmp_path), exact)


def _record(names: list[str]) -> None:  # pragma: no cover - run by hand, see the module docstring
    import tempfile

    torch.set_num_threads(2)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            cwd=REFERENCE.parent).stdout.strip()
    everything = ["ex2l_anchored", "cli", *CASES]
    unknown = sorted(set(names) - set(everything))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; expected some of {sorted(everything)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wanted = names or everything
        if "ex2l_anchored" in wanted and "erm_2head" not in wanted:
            _run_case("erm_2head", root)  # the run the anchored case starts from
        cases = {name: _run_case(name, root) for name in CASES if name in wanted}
        if "ex2l_anchored" in wanted:
            cases["ex2l_anchored"] = _run_case("ex2l_anchored", root, root / "erm_2head")
        if "cli" in wanted:
            cases["cli"] = _run_case("cli", root)
    if names:  # only these: the others stay as recorded, and these name their commit
        data = json.loads(REFERENCE.read_text())
        if data["platform"] != _platform():
            raise SystemExit(f"recorded on {data['platform']}, this is {_platform()}: record every case here instead")
        data["cases"].update(cases)
        data.setdefault("rerecorded", {}).update({name: commit for name in names})
    else:
        data = {"recorded_with": commit, "platform": _platform(), "cases": cases}
    REFERENCE.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    _record(sys.argv[1:])
