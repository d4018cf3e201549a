"""Test-split diagnostics of a finished run, measured by the audit's own checks (``analysis``): the share of
all-zero label CAMs, the label-CAM mass inside the object, the label–confounder CAM overlap (``localization``),
and the decision-level leak, a probe that reads the background off the label logits within each label
(``leakage``), on the audit's seeded, group-stratified sample of the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKS = ("localization", "leakage")
"""The audit checks the study's diagnostics come from."""
MAX_SAMPLES = 800
"""Test images measured per run (the group-stratified subsample the audit draws, seed 0)."""


def measure_run(out: Path, max_samples: int = MAX_SAMPLES) -> dict[str, Any]:
    """The study's diagnostics of the run folder ``out``: the audit's ``localization`` and ``leakage`` checks on
    ``max_samples`` test images (no environment set, no figures)."""
    from analysis.audit import audit_one
    from analysis.settings import AuditSettings

    settings = AuditSettings(split="test", max_samples=max_samples, seed=0)
    entry = audit_one(Path(out), settings, checks=list(CHECKS), env=False).entry
    leak = entry.get("leakage") or {}
    return {
        "n": entry.get("n_samples"),
        "zero_cam_share": entry.get("zero_cam_share"),
        "cam_in_mask": entry.get("cam_in_mask"),
        "cam_overlap": entry.get("cam_overlap"),
        "logit_leak": leak.get("logit_leak"),
        "within_label_acc": leak.get("within_label_acc"),
        "chance": leak.get("within_label_chance"),
        "source": "analysis.audit_one checks " + ", ".join(CHECKS),
    }
