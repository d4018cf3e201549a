"""The layering of docs/architecture.md, read from the source: the training core never imports the analysis layer
(only ex2l_xai/cli.py may, inside its commands), the modules of ex2l_xai import each other without a circle, and
importing them writes no environment variable and switches no backend flag.

The imports are read with ``ast`` from every ``import`` and ``from ... import`` statement anywhere in a module,
inside functions too, so an import made lazily (to dodge a circle or the layering) counts as much as one at the
top. A package whose ``__init__`` imports its modules by name at run time (``importlib.import_module``, the
automatic discovery of ``ex2l_xai.algorithms``) is taken to import every module in it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("analysis", "figures")
MAY_IMPORT_UPPER = {"ex2l_xai.cli"}


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``root/package`` (a package is its ``__init__``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` (source ``path``) imports anywhere: ``from a.b import c`` counts as ``a.b.c`` when that
    is a module of ``known``, else as ``a.b``; relative imports are resolved against ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                out.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
        elif (isinstance(node, ast.Call) and path.name == "__init__.py" and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module"):
            out.update(m for m in known if m.startswith(name + ".") and m.count(".") == name.count(".") + 1)
    return out


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges inside ``package``: module -> the package's modules it imports, every import of each module)."""
    modules = package_modules(root, package)
    known = set(modules)
    every = {m: imported_names(m, p, known) for m, p in modules.items()}
    inside = {m: {t for t in targets if t in known and t != m} for m, targets in every.items()}
    return inside, every


def upward_imports(every: dict[str, set[str]]) -> list[str]:
    """``"module -> target"`` for each import of an upper layer by a module not allowed one."""
    return sorted(f"{m} -> {t}" for m, targets in every.items() if m not in MAY_IMPORT_UPPER
                  for t in targets if t.split(".")[0] in UPPER_LAYERS)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (``[a, b, ..., a]``), or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*path[path.index(t):], t]
            if t not in state and (cycle := visit(t)) is not None:
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def test_training_core_never_imports_an_upper_layer() -> None:
    graph, every = import_graph(ROOT, "ex2l_xai")
    assert {"ex2l_xai.cam", "ex2l_xai.train.loop", "ex2l_xai.data.synthetic", "ex2l_xai.algorithms.ex2l"} <= set(every)
    assert upward_imports(every) == []
    # the CLI does reach the analysis layer (lazily), so the reader does see imports inside functions
    assert any(t.startswith("analysis") for t in every["ex2l_xai.cli"])


def test_no_import_circle_in_the_training_core() -> None:
    graph, _ = import_graph(ROOT, "ex2l_xai")
    # the reader sees lazy imports and the automatic discovery of the algorithms
    assert "ex2l_xai.algorithms" in graph["ex2l_xai.config"]
    assert "ex2l_xai.algorithms.dfr" in graph["ex2l_xai.algorithms"]
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_reader_catches_a_lazy_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The checks above fail on a package that has what they forbid, hidden the ways it was hidden before."""
    pkg = tmp_path / "core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from core.sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n\ndef g():\n    import analysis.report\n")
    (pkg / "c.py").write_text("import os\n")
    graph, every = import_graph(tmp_path, "core")
    assert graph["core.sub.b"] == {"core.a"} and graph["core.a"] == {"core.sub.b"}
    assert upward_imports(every) == ["core.sub.b -> analysis.report"]
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"core.a", "core.sub.b"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None


def test_importing_the_training_core_has_no_global_side_effect() -> None:
    """Importing every module of ex2l_xai (the CLI included) writes no environment variable, switches no cuDNN
    flag and loads no analysis module. The third-party packages ex2l_xai imports are loaded first, so what they
    do at import (timm sets TORCHINDUCTOR_CACHE_DIR) is not laid at ex2l_xai's door."""
    _, every = import_graph(ROOT, "ex2l_xai")
    modules = sorted(every)
    own = {"ex2l_xai", *UPPER_LAYERS, "__future__"}
    third_party = sorted({t.split(".")[0] for ts in every.values() for t in ts} - own - set(sys.stdlib_module_names))
    assert {"torch", "timm", "yaml"} <= set(third_party)
    code = (
        "import importlib, json, os, sys\n"
        f"for m in {third_party!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError:\n"
        "        pass\n"
        "import torch\n"
        "env = dict(os.environ)\n"
        "flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))\n"
        "upper = sorted(m for m in sys.modules if m.split('.')[0] in ('analysis', 'figures'))\n"
        "same = flags == (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)\n"
        "print(json.dumps({'env': changed, 'upper': upper, 'cudnn_same': same}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"env": [], "upper": [], "cudnn_same": True}


def test_the_cli_sets_openmp_waiting_only_when_run() -> None:
    """``ex2l``'s entry point asks OpenMP to wait passively (unless the environment says otherwise), in main(),
    before torch is loaded; importing the module does not."""
    code = (
        "import os\n"
        "import ex2l_xai.cli as cli\n"
        "before = os.environ.get('OMP_WAIT_POLICY')\n"
        "try:\n"
        "    cli.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(before, os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert run.stdout.split()[-2:] == ["None", "PASSIVE"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # an explicit choice wins
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert run.stdout.split()[-2:] == ["ACTIVE", "ACTIVE"]
