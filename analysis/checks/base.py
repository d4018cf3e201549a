"""What an audit check is: :class:`Check` (a name, what it needs, its per-model numbers, its figures, its report
section), the :class:`CheckContext` it reads, and the one loop that runs the checks (:func:`run_checks`).

A check never asks what kind of model it audits: it talks to ``ctx.adapter`` (:class:`analysis.adapter.ModelAdapter`)
and reads the model's :class:`~analysis.extract.Extraction`. A missing need, a setting that turns the check off, or
a project error (:class:`~ex2l_xai.errors.Ex2lError`, e.g. :class:`SkipCheck`) records a skip with its reason in the
model's entry (``skipped``: {check: reason}) and the check's own "not available" record, never a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["NEEDS", "Check", "CheckContext", "FigureContext", "ReportSection", "SkipCheck", "register",
           "registered", "run_checks"]

#: What a check may need, and how the context tells whether the audited model and data have it.
NEEDS: dict[str, str] = {
    "cams": "the extraction has no CAMs",
    "masks": "the dataset has no object masks",
    "confounder_head": "the model has no confounder head",
    "recomputable_cams": "the model's CAMs cannot be recomputed on a copy",
    "run": "not a run folder",
}


class SkipCheck(Ex2lError):
    """Raised by a check that cannot run on this model or data; the message is the reason recorded."""


@dataclass
class CheckContext:
    """What a check reads about one model (and writes: ``entry``, its ``audit.json`` entry; ``artifacts``, objects
    for later checks and the figures; ``shared``, objects shared by every model of the audit, e.g. random
    baselines by fingerprint)."""

    adapter: Any
    extraction: Any
    env_extraction: Any
    env_note: str
    dataset: Any
    dataset_key: str
    settings: Any
    entry: dict[str, Any]
    target: Any = None
    results: dict[str, Any] | None = None
    split_loader: Callable[[str], Any] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def missing(self, need: str) -> str | None:
        """None when the model and data have ``need`` (a key of :data:`NEEDS`), else the reason."""
        if need not in NEEDS:
            raise Ex2lError(f"check needs: unknown need {need!r}; expected one of {', '.join(NEEDS)}")
        have = {
            "cams": lambda: self.extraction.cams_true is not None,
            "masks": lambda: self.extraction.masks is not None,
            "confounder_head": lambda: self.extraction.cams_conf is not None,
            "recomputable_cams": lambda: self.adapter.recomputable_cams is None,
            "run": lambda: self.adapter.config is not None,
        }[need]()
        if have:
            return None
        if need == "recomputable_cams":
            return self.adapter.recomputable_cams
        return NEEDS[need]

    def run_split(self, split: str) -> Any:
        """Another split of the run's dataset (cached), or None (with a warning) where there is none."""
        if self.split_loader is None:
            return None
        try:
            return self.split_loader(split)
        except Ex2lError as exc:
            log.warning("audit: no %s split (%s)", split, exc)
            return None


@dataclass
class FigureContext:
    """What a check's figures read: every model's audit (``analysis.audit.ModelAudit``), the figure folder, the
    settings; ``timings`` and ``notes`` (merged into ``audit.json``'s ``settings``) are written to."""

    audits: Sequence[Any]
    fig_dir: Path
    settings: Any
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def path(self, key: str, filename: str) -> tuple[Path, str]:
        """The file of figure ``key`` and its path relative to the audit folder."""
        return self.fig_dir / filename, f"figures/{filename}"


@dataclass
class ReportSection:
    """A section of report.html drawn by the generic template block: a title, a paragraph, a table
    (:class:`analysis.html.Table`) and figures (figure key, caption)."""

    id: str
    title: str
    text: str = ""
    table: Any = None
    figures: list[tuple[str, str]] = field(default_factory=list)


class Check:
    """One audit check (subclass it, set ``name`` and ``order``, decorate the class with :func:`register`).

    ``needs``: keys of :data:`NEEDS`; ``files``: its figure files by key; ``run(ctx)`` writes the model's numbers into ``ctx.entry``;
    ``disabled(settings)`` says why the settings turn it off (None: on); ``skip(ctx, reason)`` writes the "not
    available" record; ``figures(fc)`` draws the figures over all models and returns {figure key: relative path};
    ``section(data)`` returns the check's :class:`ReportSection` (None: the template has a section of its own, or
    there is nothing to show).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    needs: ClassVar[tuple[str, ...]] = ()
    #: The figure files :meth:`figures` may draw, by figure key (the report and the HTML look them up here).
    files: ClassVar[dict[str, str]] = {}

    def disabled(self, settings: Any) -> str | None:
        """Why the settings turn this check off, or None."""
        return None

    def run(self, ctx: CheckContext) -> None:
        """Compute this model's numbers into ``ctx.entry``."""

    def skip(self, ctx: CheckContext, reason: str) -> None:
        """Write what the entry holds when the check did not run (default: nothing)."""

    def figures(self, fc: FigureContext) -> dict[str, str]:
        """Draw this check's figures over every model; {figure key: path relative to the audit folder}."""
        return {}

    def section(self, data: dict[str, Any]) -> ReportSection | None:
        """This check's section of report.html, from ``audit.json``'s content."""
        return None


_REGISTRY: dict[str, type[Check]] = {}


def register(cls: type[Check]) -> type[Check]:
    """Class decorator: add a check to the registry (its ``name`` must be new)."""
    if not cls.name:
        raise Ex2lError(f"check {cls.__name__}: set a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise Ex2lError(f"check {cls.name!r}: registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    bad = [n for n in cls.needs if n not in NEEDS]
    if bad:
        raise Ex2lError(f"check {cls.name!r}: unknown need(s) {bad}; expected keys of {', '.join(NEEDS)}")
    taken = {k: other.name for other in _REGISTRY.values() if other is not cls for k in other.files}
    clash = [k for k in cls.files if k in taken]
    if clash:
        raise Ex2lError(f"check {cls.name!r}: figure key(s) {clash} already belong to {[taken[k] for k in clash]}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Check]]:
    """The registered check classes by name, in run order."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def run_checks(ctx: CheckContext, checks: Sequence[Check]) -> dict[str, float]:
    """Run ``checks`` in order on one model; time each; record a skip with its reason when the settings turn a check
    off, a need is missing, or the check raises a project error. Returns {check name: seconds}."""
    timings: dict[str, float] = {}
    for check in checks:
        t = time.time()
        reason = check.disabled(ctx.settings) or next(
            (r for r in (ctx.missing(n) for n in check.needs) if r is not None), None)
        if reason is None:
            try:
                check.run(ctx)
            except Ex2lError as exc:
                reason = str(exc)
                log.warning("audit: %s skipped for %s: %s", check.name, ctx.entry.get("name"), reason)
        if reason is not None:
            check.skip(ctx, reason)
            ctx.entry.setdefault("skipped", {})[check.name] = reason
        timings[check.name] = time.time() - t
    return timings
