"""Where the Grad-CAMs look: mass inside the object mask, pointing game, label-vs-confounder overlap.

Conventions (see ``docs/auditing_metrics.md``):

* CAMs are (B, h, w) or (B, 1, h, w), masks (B, H, W) or (B, 1, H, W) with 1 = object (binarised at > 0.5).
  A CAM whose size differs from its mask's is first upsampled with
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
* Negative CAM values (possible without Grad-CAM's ReLU) count as 0.
* An all-zero CAM has no mass and no maximum: its ``cam_mass_in_mask`` is NaN, it is a miss in
  ``pointing_game``, and the aggregates in :func:`localization_summary` leave it out and report
  ``zero_cam_share`` next to them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from analysis import AnalysisError

logger = logging.getLogger(__name__)

__all__ = [
    "GAMING_CAM_RISE",
    "GAMING_LEAK_RISE",
    "cam_mass_in_mask",
    "cam_overlap",
    "gaming_warnings",
    "localization_summary",
    "pointing_game",
    "zero_cam_share",
]

#: gaming_warnings fires when cam_in_mask rises by at least this much (absolute) over the reference ...
GAMING_CAM_RISE = 0.05
#: ... and the decision-level leak (balanced accuracy) rises by at least this much (absolute) too.
GAMING_LEAK_RISE = 0.05


def _maps(x: Any, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise AnalysisError(f"{name}: expected maps of shape (B, h, w) or (B, 1, h, w), got {tuple(t.shape)}")
    return t.to(torch.float64)


def _cams_and_masks(cams: Any, masks: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative CAMs upsampled to the masks' size, and boolean masks."""
    c = _maps(cams, "cams").clamp_min(0.0)
    m = _maps(masks, "masks")
    if c.shape[0] != m.shape[0]:
        raise AnalysisError(f"cams has {c.shape[0]} maps but masks has {m.shape[0]}")
    if c.shape[1:] != m.shape[1:]:
        c = F.interpolate(c[:, None], size=tuple(m.shape[1:]), mode="bilinear", align_corners=False)[:, 0]
        c = c.clamp_min(0.0)
    return c, m > 0.5


def _is_zero(c: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    return c.reshape(c.shape[0], -1).abs().amax(1) <= atol


def cam_mass_in_mask(cams: Any, masks: Any) -> torch.Tensor:
    """Share of each CAM's mass inside its object mask.

    Parameters
    ----------
    cams : (B, h, w) CAMs (upsampled bilinearly to the mask size when it differs).
    masks : (B, H, W) object masks, 1 = object.

    Returns
    -------
    Tensor
        (B,) float64 values ``sum(cam * mask) / sum(cam)`` in [0, 1]; NaN for an all-zero CAM.
    """
    c, m = _cams_and_masks(cams, masks)
    total = c.reshape(c.shape[0], -1).sum(1)
    inside = (c * m).reshape(c.shape[0], -1).sum(1)
    out = inside / total
    out[total <= 0] = float("nan")
    return out


def pointing_game(cams: Any, masks: Any, *, tolerance: float = 0.0) -> torch.Tensor:
    """Pointing game: does the CAM's maximum fall on the object?

    Parameters
    ----------
    cams : (B, h, w) CAMs (upsampled bilinearly to the mask size when it differs).
    masks : (B, H, W) object masks.
    tolerance : a hit also counts when a mask pixel lies within this Euclidean distance (pixels) of the
        maximum (Zhang et al. use 15 px at 224 px).

    Returns
    -------
    Tensor
        (B,) bool; the first maximum in row-major order is used; an all-zero CAM is a miss.
    """
    c, m = _cams_and_masks(cams, masks)
    b, h, w = c.shape
    flat_idx = c.reshape(b, -1).argmax(1)
    r, col = flat_idx // w, flat_idx % w
    if tolerance <= 0:
        hit = m.reshape(b, -1).gather(1, flat_idx[:, None])[:, 0]
    else:
        rows = torch.arange(h, dtype=torch.float64)[None, :, None]
        cols = torch.arange(w, dtype=torch.float64)[None, None, :]
        d2 = (rows - r[:, None, None].double()) ** 2 + (cols - col[:, None, None].double()) ** 2
        hit = ((d2 <= tolerance * tolerance) & m).reshape(b, -1).any(1)
    return hit & ~_is_zero(c)


def cam_overlap(cam_a: Any, cam_b: Any, kind: str = "dice", norm: str = "max") -> torch.Tensor:
    """Per-sample overlap of two CAM batches (label CAM vs confounder CAM), e.g. soft Dice.

    Uses ``ex2l_xai.penalties.similarity`` (the same measure as the eX2L penalty): with the defaults, each
    map divided by its max, then ``2 sum(ab) / (sum(a^2) + sum(b^2) + eps)``: 1 for identical maps, 0 for
    disjoint ones and 0 when either map is all-zero.

    Parameters
    ----------
    cam_a, cam_b : (B, h, w) maps of one shape. kind, norm : see ``ex2l_xai.penalties``.

    Returns
    -------
    Tensor
        (B,) float64 overlaps.
    """
    from ex2l_xai.penalties import similarity  # lazy: analysis imports only numpy/scipy/sklearn/torch eagerly

    a, b = _maps(cam_a, "cam_a"), _maps(cam_b, "cam_b")
    if a.shape != b.shape:
        raise AnalysisError(f"cam_overlap: cam_a {tuple(a.shape)} and cam_b {tuple(b.shape)} differ in shape")
    return similarity(a, b, kind=kind, norm=norm)


def zero_cam_share(cams: Any, atol: float = 0.0) -> float:
    """Share of CAMs whose every value is within ``atol`` of zero (e.g. a ReLU'd Grad-CAM that vanished)."""
    c = _maps(cams, "cams")
    if c.shape[0] == 0:
        return float("nan")
    return float(_is_zero(c, atol).double().mean())


def _nanmean(x: torch.Tensor) -> float | None:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else None


def localization_summary(
    label_cams: Any,
    masks: Any = None,
    conf_cams: Any = None,
    *,
    tolerance: float = 0.0,
    kind: str = "dice",
    norm: str = "max",
) -> dict[str, Any]:
    """Aggregate localisation numbers of one model on one dataset.

    Parameters
    ----------
    label_cams : (B, h, w) label-head CAMs. masks : optional (B, H, W) object masks.
    conf_cams : optional (B, h, w) confounder-head CAMs. tolerance : pointing-game tolerance (pixels).
    kind, norm : overlap measure for ``cam_overlap``.

    Returns
    -------
    dict
        ``n``, ``zero_cam_share`` (label CAMs); ``cam_in_mask`` (mean over non-zero CAMs) and
        ``pointing_game`` (hit rate over non-zero CAMs) with ``n_nonzero``, or None without masks;
        ``cam_overlap`` (mean over samples where both CAMs are non-zero) with ``cam_overlap_n``, or None
        without confounder CAMs; ``conf_zero_cam_share`` when conf_cams are given.
    """
    lc = _maps(label_cams, "label_cams")
    zero = _is_zero(lc)
    out: dict[str, Any] = {
        "n": int(lc.shape[0]),
        "zero_cam_share": zero_cam_share(lc),
        "n_nonzero": int((~zero).sum()),
        "cam_in_mask": None,
        "pointing_game": None,
        "cam_overlap": None,
        "cam_overlap_n": 0,
    }
    if masks is not None:
        out["cam_in_mask"] = _nanmean(cam_mass_in_mask(lc, masks))
        hits = pointing_game(lc, masks, tolerance=tolerance)
        out["pointing_game"] = float(hits[~zero].double().mean()) if bool((~zero).any()) else None
    if conf_cams is not None:
        cc = _maps(conf_cams, "conf_cams")
        out["conf_zero_cam_share"] = zero_cam_share(cc)
        both = ~zero & ~_is_zero(cc)
        out["cam_overlap_n"] = int(both.sum())
        if bool(both.any()):
            out["cam_overlap"] = float(cam_overlap(lc, cc, kind=kind, norm=norm)[both].mean())
    return out


def gaming_warnings(
    rows: Sequence[Mapping[str, Any]],
    *,
    reference: int | str = 0,
    cam_rise: float = GAMING_CAM_RISE,
    leak_rise: float = GAMING_LEAK_RISE,
) -> list[str]:
    """Warn where CAM mass in the object rises together with the decision-level leak.

    Rule: for every row other than the reference with both numbers present, warn when
    ``cam_in_mask - ref.cam_in_mask >= cam_rise`` **and** ``logit_leak - ref.logit_leak >= leak_rise``
    (absolute differences; defaults 0.05 each). The CAM then looks at the object while the decision
    carries more confounder information than the reference's: the CAM is being gamed, not obeyed.

    Parameters
    ----------
    rows : per-model mappings with ``cam_in_mask`` and ``logit_leak`` (within-label balanced accuracy of the
        confounder probed from the logits), and optionally ``name``.
    reference : index of the reference row (e.g. 0 = the ERM run) or its ``name``.
    cam_rise, leak_rise : thresholds of the rule.

    Returns
    -------
    list of str
        One sentence per flagged row (empty when none).
    """
    if not rows:
        return []
    if isinstance(reference, str):
        matches = [i for i, r in enumerate(rows) if r.get("name") == reference]
        if not matches:
            raise AnalysisError(f"gaming_warnings: no row named {reference!r}")
        ref_i = matches[0]
    else:
        ref_i = reference
        if not -len(rows) <= ref_i < len(rows):
            raise AnalysisError(f"gaming_warnings: reference index {ref_i} out of range for {len(rows)} rows")
    ref = rows[ref_i]
    ref_name = ref.get("name", f"row {ref_i}")
    ref_cam, ref_leak = ref.get("cam_in_mask"), ref.get("logit_leak")
    if ref_cam is None or ref_leak is None:
        logger.info("gaming_warnings: reference %s lacks cam_in_mask or logit_leak; no warnings", ref_name)
        return []
    warnings_out = []
    for i, row in enumerate(rows):
        if i == ref_i % len(rows):
            continue
        cam, leak = row.get("cam_in_mask"), row.get("logit_leak")
        if cam is None or leak is None or np.isnan(cam) or np.isnan(leak):
            continue
        d_cam, d_leak = cam - ref_cam, leak - ref_leak
        if d_cam >= cam_rise and d_leak >= leak_rise:
            name = row.get("name", f"row {i}")
            warnings_out.append(
                f"{name}: CAM mass in the object rose by {d_cam:+.3f} ({ref_cam:.3f} -> {cam:.3f}) while the "
                f"decision-level confounder leak rose by {d_leak:+.3f} ({ref_leak:.3f} -> {leak:.3f}) "
                f"relative to {ref_name}: the CAM is being gamed, not obeyed."
            )
    return warnings_out
