"""The layering of docs/architecture.md: the training core never imports the analysis layer (only the CLI reaches both)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import ex2l_xai

ROOT = Path(__file__).resolve().parents[1]


def test_training_core_never_imports_analysis() -> None:
    modules = [m.name for m in pkgutil.walk_packages(ex2l_xai.__path__, "ex2l_xai.") if m.name != "ex2l_xai.cli"]
    assert {"ex2l_xai.cam", "ex2l_xai.train", "ex2l_xai.data.synthetic", "ex2l_xai.algorithms.ex2l"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'analysis' or m.startswith('analysis.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"ex2l_xai imported {out.stdout.strip()}"
