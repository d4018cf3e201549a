"""The study's sweeps as data: ``figures/sweeps/<regime>.yaml`` (preset, base overrides, benchmarks, methods,
seeds, which method starts from which), loaded and checked into :class:`Regime`.

A sweep file's keys: ``name``, ``title``, ``preset``, ``seeds`` (the default number per method: seeds 0..n-1),
``markers`` (the two comments around its section of docs/results.md), ``base`` (overrides of every run),
``benchmarks`` (name -> ``description``, ``overrides``, optional ``methods``: the list run there, default all),
``methods`` (name -> ``description``, ``overrides``, optional ``seeds``, ``init_from``: the method of the same
benchmark and seed whose run folder it starts from, and ``confounders_from``: the method of the same benchmark and
seed whose run infers the confounders it trains on, ``ex2l infer-confounders``), optional ``choose_on`` (the benchmarks eX2L's default is
chosen on; default all), ``lambda_sweep`` ([method, λ] pairs of the mechanism table), ``baselines`` (the methods
every other one is compared with, paired by seed) and ``lists`` (YAML anchors for lists used more than once; not
read otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
_TOP = {"name", "title", "preset", "seeds", "markers", "base", "benchmarks", "methods", "choose_on", "lambda_sweep",
        "baselines", "lists"}


class SweepError(ValueError):
    """A sweep file that does not say what the study needs; the message names the file and the key."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a sweep: its description, overrides and the methods run on it (None: all)."""

    description: str
    overrides: tuple[str, ...]
    methods: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Method:
    """One method of a sweep: its description, overrides, seeds (None: the sweep's) and starting run."""

    description: str
    overrides: tuple[str, ...]
    seeds: int | None = None
    init_from: str | None = None
    confounders_from: str | None = None

    @property
    def needs(self) -> str | None:
        """The method whose run must finish first (``init_from`` or ``confounders_from``; a method has one)."""
        return self.init_from or self.confounders_from


@dataclass(frozen=True)
class Regime:
    """One study, as its sweep file says."""

    name: str
    title: str
    preset: str
    base: tuple[str, ...]
    benchmarks: dict[str, Benchmark]
    methods: dict[str, Method]
    seeds: int = 3
    markers: tuple[str, str] = ("", "")
    choose_on: tuple[str, ...] | None = None
    lambda_sweep: tuple[tuple[str, float], ...] = ()
    baselines: tuple[str, ...] = ()
    source: str = ""
    init_from: dict[str, str] = field(default_factory=dict)
    confounders_from: dict[str, str] = field(default_factory=dict)

    def needs(self, method: str) -> str | None:
        """The method whose run ``method`` needs first, or None."""
        return self.methods[method].needs

    def methods_of(self, bench: str) -> tuple[str, ...]:
        """The methods run on benchmark ``bench``."""
        chosen = self.benchmarks[bench].methods
        return tuple(self.methods) if chosen is None else chosen

    def seeds_of(self, method: str) -> tuple[int, ...]:
        """The seeds ``method`` runs with: 0 .. n-1."""
        n = self.methods[method].seeds
        return tuple(range(self.seeds if n is None else n))


def _need(d: dict[str, Any], key: str, where: str, kind: type) -> Any:
    if key not in d:
        raise SweepError(f"{where}: missing key {key!r}")
    if not isinstance(d[key], kind):
        raise SweepError(f"{where}.{key}: expected {kind.__name__}, got {type(d[key]).__name__}")
    return d[key]


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{where}: expected a list of strings")
    return tuple(value)


def parse_regime(data: dict[str, Any], source: str = "<dict>") -> Regime:
    """A :class:`Regime` from a sweep file's contents, checked: unknown keys, methods a benchmark lists that do
    not exist, starting runs that are not run where their dependants are, λ pairs of unknown methods."""
    unknown = set(data) - _TOP
    if unknown:
        raise SweepError(f"{source}: unknown keys {sorted(unknown)}; expected some of {sorted(_TOP)}")
    methods = {}
    for m, spec in _need(data, "methods", source, dict).items():
        where = f"{source}: methods.{m}"
        methods[m] = Method(_need(spec, "description", where, str), _strings(spec.get("overrides"), f"{where}.overrides"),
                            spec.get("seeds"), spec.get("init_from"), spec.get("confounders_from"))
        for key in ("init_from", "confounders_from"):
            if spec.get(key) is not None and spec[key] not in _need(data, "methods", source, dict):
                raise SweepError(f"{where}.{key}: unknown method {spec[key]!r}")
        if methods[m].init_from and methods[m].confounders_from:
            raise SweepError(f"{where}: expected one of init_from and confounders_from, not both")
    benchmarks = {}
    for b, spec in _need(data, "benchmarks", source, dict).items():
        where = f"{source}: benchmarks.{b}"
        chosen = None if spec.get("methods") is None else _strings(spec["methods"], f"{where}.methods")
        for m in chosen or ():
            if m not in methods:
                raise SweepError(f"{where}.methods: unknown method {m!r}")
            start = methods[m].needs
            if start is not None and start not in chosen:
                raise SweepError(f"{where}.methods: {m} starts from {start}, which does not run there")
        benchmarks[b] = Benchmark(_need(spec, "description", where, str), _strings(spec.get("overrides"),
                                  f"{where}.overrides"), chosen)
    lam = tuple((str(m), float(v)) for m, v in data.get("lambda_sweep", []))
    for m, _ in lam:
        if m not in methods:
            raise SweepError(f"{source}: lambda_sweep: unknown method {m!r}")
    baselines = _strings(data.get("baselines", []), f"{source}: baselines")
    for m in baselines:
        if m not in methods:
            raise SweepError(f"{source}: baselines: unknown method {m!r}")
    choose_on = data.get("choose_on")
    markers = _strings(_need(data, "markers", source, list), f"{source}: markers")
    if len(markers) != 2:
        raise SweepError(f"{source}: markers: expected two comments, got {len(markers)}")
    return Regime(
        name=_need(data, "name", source, str), title=_need(data, "title", source, str),
        preset=_need(data, "preset", source, str), base=_strings(data.get("base"), f"{source}: base"),
        benchmarks=benchmarks, methods=methods, seeds=int(data.get("seeds", 3)), markers=(markers[0], markers[1]),
        choose_on=None if choose_on is None else _strings(choose_on, f"{source}: choose_on"), lambda_sweep=lam,
        baselines=baselines, source=source,
        init_from={m: spec.init_from for m, spec in methods.items() if spec.init_from is not None},
        confounders_from={m: spec.confounders_from for m, spec in methods.items() if spec.confounders_from},
    )


def load_regime(path: str | Path) -> Regime:
    """The regime of one sweep file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"sweep file {path}: cannot be read ({exc.strerror})") from exc
    if not isinstance(data, dict):
        raise SweepError(f"sweep file {path}: expected a mapping at the top")
    return parse_regime(data, str(path.name))


def load_regimes(folder: Path = SWEEPS) -> dict[str, Regime]:
    """Every sweep of ``folder`` by name, in file-name order."""
    regimes = [load_regime(p) for p in sorted(folder.glob("*.yaml"))]
    return {r.name: r for r in regimes}
