"""Every option of an audit, with its default, written once: :class:`AuditSettings`.

``analysis.report.audit``, ``analysis.audit.audit_one``, ``analysis.paper.paper_figures``, ``ex2l audit``,
``ex2l figures`` and ``figures/fig*.py`` all read their options (and defaults) from this class; ``audit.json``'s
``settings`` is :meth:`AuditSettings.dump`. A field's ``metadata`` carries its command-line flag and help, so the
CLI builds its options from the fields (:func:`cli_options`) instead of repeating the defaults.

This module imports nothing heavy (no torch): the CLI reads it when it builds its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ex2l_xai.errors import Ex2lError

__all__ = ["DEMO", "AuditSettings", "CliOption", "cli_options"]

RULES = ("worst_groups", "disagreement", "random")
CAM_VARIANTS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")  # ex2l_xai.cam_variants.VARIANTS
FAITH_BASELINES = ("blur", "mean")  # analysis.faithfulness.BASELINES
EMBEDDINGS = ("umap", "pca")


def _opt(default: Any, flag: str | None = None, help: str = "", *, zero_is_none: bool = False,  # noqa: A002
         choices: tuple[str, ...] | None = None, metavar: str | None = None, repeat: bool = False) -> Any:
    """A settings field; ``flag`` (e.g. ``--max-samples``) makes it a command-line option of ``ex2l audit``
    (``repeat``: a tuple field whose flag may be given several times)."""
    meta = {"flag": flag, "help": help, "zero_is_none": zero_is_none, "choices": choices, "metavar": metavar,
            "repeat": repeat}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class AuditSettings:
    """The options of one audit (frozen: an audit never changes its settings half-way).

    Build one with keywords (``AuditSettings(max_samples=480)``) or change a few with :meth:`replace`.
    Subsample sizes of ``None`` mean "all"; ``intervention_samples`` / ``sanity_samples`` of 0 or None skip that
    check (with the reason in ``audit.json``).
    """

    split: str = _opt("test", None, "split of each run's dataset to audit")
    max_samples: int | None = _opt(2000, "--max-samples", "seeded, group-stratified subsample of the split",
                                   zero_is_none=True, metavar="N")
    env_max_samples: int | None = _opt(None, None, "cap of the extra val extraction of a single-environment split "
                                       "(None: max_samples)")
    seed: int = _opt(0, "--seed", "seed of the subsamples, probes, UMAP, rows, background draws and "
                     "re-initialisations")
    device: str | None = _opt(None, "--device", "cpu or cuda (default: cpu for run folders, a model's own device)")
    batch_size: int | None = _opt(None, None, "samples per forward pass of the extraction (None: 32 images of "
                                  "128 px on a CPU, 128 on a GPU; analysis.extract.batch_for)")
    probe_max_samples: int | None = _opt(5000, None, "rows each leakage probe subsamples to")
    intervention_samples: int | None = _opt(240, "--interventions", "images for the background swaps",
                                            metavar="N")
    sanity_samples: int | None = _opt(32, "--sanity-samples", "images for the CAM sanity check", metavar="N")
    sanity_steps: int = _opt(5, "--sanity-steps", "cascade steps of the CAM sanity check", metavar="K")
    rule: str = _opt("worst_groups", "--rule", "how the Grad-CAM grid's rows are chosen", choices=RULES)
    n_rows: int = _opt(6, "--rows", "rows of the Grad-CAM grid", metavar="N")
    umap_epochs: int | None = _opt(None, "--umap-epochs", "UMAP epochs (default: UMAP's own, 200 for large samples and 500 for small)", metavar="N")
    umap_neighbors: int = _opt(15, None, "UMAP neighbourhood size")
    embedding: str = _opt("umap", None, "2-D embedding of the latents: umap or pca", choices=EMBEDDINGS)
    slice_k_max: int = _opt(6, None, "slice discovery: the most slices per class (k is chosen in 1..slice_k_max by BIC)")
    slice_min_size: int = _opt(5, None, "slice discovery: the fewest images a slice may hold")
    slice_dims: int = _opt(8, None, "slice discovery: PCA components the class's latents are reduced to")
    spurious_features: int = _opt(5, None, "spuriosity: the head's top features per class that are candidates")
    reference: int | str = _opt(0, None, "the model the gaming warnings compare with (index or name)")
    cam_variants: tuple[str, ...] = _opt(("gradcam",), "--cam", "CAM variant; repeat to compare variants side by "
                                         "side (the grids and localisation use the first)", choices=CAM_VARIANTS,
                                         repeat=True)
    faithfulness: bool = _opt(True, "--faithfulness", "deletion/insertion and ROAD of each CAM variant "
                              "(--no-faithfulness: skip)")
    faith_steps: int = _opt(10, "--faith-steps", "steps of the deletion and insertion curves (8-20)", metavar="K")
    faith_samples: int | None = _opt(64, "--faith-samples", "images for the faithfulness checks", metavar="N")
    faith_baseline: str = _opt("blur", "--faith-baseline", "what deleted pixels become: a blurred image or the "
                               "mean colour", choices=FAITH_BASELINES)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise Ex2lError(f"rule: expected one of {', '.join(RULES)}, got {self.rule!r}")
        if self.embedding not in EMBEDDINGS:
            raise Ex2lError(f"embedding: expected one of {', '.join(EMBEDDINGS)}, got {self.embedding!r}")
        for name in ("max_samples", "env_max_samples", "probe_max_samples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise Ex2lError(f"{name}: expected a positive integer or None, got {v!r}")
        for name in ("slice_k_max", "slice_min_size", "slice_dims", "spurious_features"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise Ex2lError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if isinstance(self.cam_variants, str) or not self.cam_variants:
            raise Ex2lError(f"cam_variants: expected a non-empty tuple of variant names, got {self.cam_variants!r}")
        bad = [v for v in self.cam_variants if v not in CAM_VARIANTS]
        if bad:
            raise Ex2lError(f"cam_variants: unknown variant(s) {bad}; expected some of {', '.join(CAM_VARIANTS)}")
        object.__setattr__(self, "cam_variants", tuple(dict.fromkeys(self.cam_variants)))
        if not 8 <= self.faith_steps <= 20:
            raise Ex2lError(f"faith_steps: expected 8 to 20 steps, got {self.faith_steps}")
        if self.faith_baseline not in FAITH_BASELINES:
            raise Ex2lError(f"faith_baseline: expected one of {', '.join(FAITH_BASELINES)}, got "
                            f"{self.faith_baseline!r}")
        if self.sanity_steps < 1:
            raise Ex2lError(f"sanity_steps: expected at least 1, got {self.sanity_steps}")

    def replace(self, **changes: Any) -> AuditSettings:
        """A copy with ``changes`` (unknown names are an error naming them)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise Ex2lError(f"audit settings: unknown option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def dump(self) -> dict[str, Any]:
        """Every option and its value (JSON-ready: a tuple as a list): ``audit.json``'s ``settings``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: What ``ex2l demo`` audits with (fast: subsamples, fewer UMAP epochs, a short sanity cascade). Faithfulness is
#: off there: on 6 images in 8 steps it adds 21 % to the demo's audit (14.6 s on the idle 2-core CPU; 8 images
#: 29-37 %), and with it `make demo` took 5 min 5 s on a fresh clone, past its 5-minute bar (docs/performance.md);
#: ``DEMO.replace(faithfulness=True)`` is that setting, ``ex2l audit`` runs faithfulness on 64 images in 10 steps.
DEMO = AuditSettings(max_samples=480, umap_epochs=200, intervention_samples=64, sanity_samples=16, sanity_steps=4,
                     faithfulness=False, faith_samples=6, faith_steps=8)


class RepeatOption(argparse.Action):
    """A repeatable option whose default is the field's tuple: the first use replaces the default, later uses add
    to it (argparse's ``append`` would add to the default)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = f"_{self.dest}_given"
        prior = getattr(namespace, self.dest) if getattr(namespace, given, False) else ()
        setattr(namespace, self.dest, (*prior, values))
        setattr(namespace, given, True)


@dataclass(frozen=True)
class CliOption:
    """One command-line option made from a settings field: ``add_argument(flag, **kwargs)``."""

    name: str
    flag: str
    kwargs: dict[str, Any]

    def value(self, parsed: Any) -> Any:
        """The setting's value from the parsed option (0 means None where the field says so)."""
        f = next(f for f in dataclasses.fields(AuditSettings) if f.name == self.name)
        if f.metadata["repeat"]:
            return tuple(parsed)
        return (parsed or None) if f.metadata["zero_is_none"] else parsed


def cli_options(names: tuple[str, ...] | None = None) -> Iterator[CliOption]:
    """The fields with a flag (or those in ``names``), as ``argparse`` options with the default from the field and
    the help text ending in "(default X)" (and "0 = all"/"0 = skip" where that is what 0 means)."""
    for f in dataclasses.fields(AuditSettings):
        meta = f.metadata
        if meta["flag"] is None or (names is not None and f.name not in names):
            continue
        kwargs: dict[str, Any] = {"default": f.default, "dest": f.name}
        zero = "; 0 = all" if meta["zero_is_none"] else "; 0 = skip" if f.name.endswith("_samples") else ""
        shown = ", ".join(f.default) if meta["repeat"] else f.default
        default = "" if f.default is None else f" (default {shown}{zero})"
        kwargs["help"] = meta["help"] + default
        if meta["repeat"]:
            kwargs["action"] = RepeatOption
        elif f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        elif f.type in ("int", "int | None"):
            kwargs["type"] = int
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        yield CliOption(f.name, meta["flag"], kwargs)
