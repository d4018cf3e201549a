"""The CAM sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): cascading randomisation.

An explanation that does not change when the model's weights are replaced by random ones cannot be explaining
the model. The check re-initialises the model's layers one group at a time, from the output end towards the
input (cumulatively: "cascading"), recomputes the CAMs of the same images after each step, and compares them with
the trained model's CAMs by Spearman rank correlation and SSIM. A CAM method that depends on the weights falls
to low similarity; an edge detector dressed as an explanation stays near 1.

Which modules, in which order: those that own parameters and feed the label logits
(:func:`analysis.modules.cascade_modules`), in the reverse of the order one forward pass runs them; each is
re-initialised by :func:`analysis.modules.randomize_`. Step ``k`` of ``S`` re-initialises the first ``n_k``
modules, ``n_k`` growing geometrically from 1 (the output layer alone) to all of them, so the first steps look
closely at the layers next to the output, where Grad-CAM's weights come from.

The verdict: the CAMs **depend on the weights** when the mean rank correlation after the last step (everything
random) is below ``threshold`` (0.5 by default), else they **do not** (they fail the check). Definitions:
docs/auditing_metrics.md.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from analysis.modules import cascade_modules, module_path, randomize_, resolve_module, unwrap
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["CamFn", "SanityResult", "cam_sanity", "cascade_counts", "gradcam_fn", "rank_correlation"]

CamFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``cam_fn(model, images, labels) -> (B, h, w)``: the explanation under test, recomputed for each model copy."""


@dataclass
class SanityResult:
    """``summary``: JSON-ready numbers (``audit.json``'s ``cam_sanity``). ``example``: one image (H, W, 3), its
    map from the trained model and after each step (H, W each), for the report's figure."""

    summary: dict[str, Any]
    example: dict[str, Any] = field(default_factory=dict)


def rank_correlation(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (B, ...) -> (B,); 0 where either map is constant (an
    all-zero CAM has no ranking to agree with)."""
    from scipy.stats import rankdata

    x = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    y = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(1) / den
    return np.where(den > 0, rho, 0.0)


def _ssim(a: Tensor, b: Tensor) -> np.ndarray:
    from ex2l_xai.penalties import normalize, ssim

    return ssim(normalize(a, "minmax"), normalize(b, "minmax")).numpy()


def gradcam_fn(layer: str) -> CamFn:
    """Grad-CAM of the label logits at the true label, at module path ``layer`` of whatever model it is given
    (:func:`analysis.adapter.layer_gradcam`). The input requires grad, so no cached or frozen path is skipped."""
    from analysis.adapter import layer_gradcam

    def cams(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return layer_gradcam(model, layer, x, y)

    return cams


def cascade_counts(n_modules: int, steps: int) -> list[int]:
    """How many modules are random after each step: ``steps`` distinct counts growing geometrically from 1 to
    ``n_modules`` (fewer when there are fewer modules)."""
    if n_modules < 1 or steps < 1:
        raise Ex2lError(f"cascade: need at least one module and one step, got {n_modules} and {steps}")
    if steps == 1:
        return [n_modules]
    raw = np.geomspace(1, n_modules, steps)
    return sorted({int(round(v)) for v in raw} | {n_modules})


def cam_sanity(
    model: nn.Module,
    dataset: Any,
    *,
    layer: nn.Module | str | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    max_samples: int = 32,
    steps: int = 5,
    cam_fn: CamFn | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> SanityResult:
    """Cascading-randomisation check of a model's CAMs (see the module docstring).

    Parameters
    ----------
    model : a classifier (label logits, or a tuple/TwoHeadOutput whose first entry is); it is not modified (a
        copy is randomised).
    dataset : docs/architecture.md's dict samples.
    layer : the CAM layer (module or path) of the default Grad-CAM; default the model's own
        (:func:`analysis.modules.find_cam_layer`).
    indices, max_samples : the images (default a seeded, group-stratified subsample of ``max_samples``).
    steps : cascade steps (counts from :func:`cascade_counts`).
    cam_fn : the explanation under test, ``cam_fn(model, x, y) -> (B, h, w)``; default Grad-CAM at ``layer`` at
        the true label (:func:`gradcam_fn`).
    threshold : the verdict's bound on the last step's mean rank correlation.
    seed : seeds the subsample and the re-initialisation.

    Returns
    -------
    SanityResult
        ``summary``: ``passes`` (bool), ``verdict`` (one sentence), ``threshold``, ``n`` (images with a non-zero
        trained CAM), ``n_zero_original``, ``layer``, ``n_modules``, ``steps``: one entry per step with
        ``randomized`` (the modules re-initialised so far, output end first: ``first`` and ``last`` paths,
        ``n_modules``), ``spearman`` and ``ssim`` (mean, with ``_std``), ``zero_share`` (all-zero maps).
    """
    from analysis.extract import subsample_indices

    t0 = time.time()
    idx = (np.asarray(indices, dtype=np.int64) if indices is not None
           else subsample_indices(dataset, max_samples, seed))
    samples = [dataset[int(i)] for i in idx]
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.stack([s["image"].float() for s in samples]).to(dev)
    y = torch.as_tensor([int(s["label"]) for s in samples], device=dev)
    if cam_fn is None:
        layer_path = _layer_path(model, layer, x[:2])
        cam_fn = gradcam_fn(layer_path)
    else:
        layer_path = "custom cam_fn"
    maps = _Maps(cam_fn, x, y, batch_size)
    clone = _trainable_copy(model, dev)
    base = maps(clone)
    nonzero = base.flatten(1).amax(1) > 0
    if not bool(nonzero.any()):
        raise Ex2lError(f"cam_sanity: every trained CAM of the {len(idx)} images is all-zero; nothing to compare")
    order = cascade_modules(clone, x[:2])
    ex = int(torch.nonzero(nonzero)[0])
    records, example_maps = _cascade(clone, order, cascade_counts(len(order), steps), maps, base, nonzero, ex, seed)
    summary = {
        **_verdict(records[-1]["spearman"], threshold), "n": int(nonzero.sum()),
        "n_zero_original": int((~nonzero).sum()), "layer": layer_path, "n_modules": len(order),
        "order": "output end first (reverse execution order)", "steps": records, "seconds": time.time() - t0,
    }
    from analysis.overlays import display_image

    example = {"index": int(idx[ex]), "image": display_image(x[ex].cpu(), dataset), "trained": base[ex].numpy(),
               "steps": example_maps, "labels": [r["randomized"]["last"] for r in records]}
    return SanityResult(summary, example)


def _layer_path(model: nn.Module, layer: nn.Module | str | None, example: Tensor) -> str:
    """Module path of the CAM layer (given, else :func:`analysis.modules.find_cam_layer` on ``example``)."""
    from analysis.modules import find_cam_layer

    target = resolve_module(model, layer, "layer") if layer is not None else find_cam_layer(model, example)
    path = module_path(model, target)
    if path in ("<model>", "") or path == type(target).__name__:
        raise Ex2lError("cam_sanity: the CAM layer must be a sub-module of the model")
    return path


class _Maps:
    """The maps of one model copy on the check's images: ``cam_fn`` per batch, upsampled to the image, ReLU'd."""

    def __init__(self, cam_fn: CamFn, x: Tensor, y: Tensor, batch_size: int) -> None:
        self.cam_fn, self.x, self.y, self.batch_size = cam_fn, x, y, batch_size
        self.size = tuple(x.shape[-2:])

    def __call__(self, m: nn.Module) -> Tensor:
        from ex2l_xai.cam import upsample

        out = []
        for s in range(0, self.x.shape[0], self.batch_size):
            c = self.cam_fn(m, self.x[s: s + self.batch_size], self.y[s: s + self.batch_size]).detach().float()
            if c.dim() == 4:
                c = c[:, 0]
            out.append(upsample(c, self.size).clamp_min(0).cpu() if c.shape[-2:] != self.size
                       else c.clamp_min(0).cpu())
        return torch.cat(out)


def _trainable_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    """A deep copy in eval mode on ``dev`` whose parameters all require grad (frozen weights cut no path)."""
    clone = copy.deepcopy(model)
    if next((p.device for p in clone.parameters()), dev) != dev:
        clone.to(dev)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def _cascade(clone: nn.Module, order: list[str], counts: list[int], maps: _Maps, base: Tensor, nonzero: Tensor,
             ex: int, seed: int) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Re-initialise ``order``'s modules cumulatively (``counts`` after each step, seeded) and compare the maps
    after each step with ``base``; returns the step records and the example image's map after each step."""
    modules = dict(unwrap(clone).named_modules())
    records, example_maps = [], []
    done = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n in counts:
            for path in order[done:n]:
                randomize_(modules[path])
            done = n
            after = maps(clone)
            rho = rank_correlation(base[nonzero], after[nonzero])
            sim = _ssim(base[nonzero], after[nonzero])
            records.append({
                "randomized": {"n_modules": n, "first": order[0], "last": order[n - 1]},
                "spearman": float(rho.mean()), "spearman_std": float(rho.std()),
                "ssim": float(sim.mean()), "ssim_std": float(sim.std()),
                "zero_share": float((after[nonzero].flatten(1).amax(1) <= 0).float().mean()),
            })
            example_maps.append(after[ex].numpy())
    return records, example_maps


def _verdict(final: float, threshold: float) -> dict[str, Any]:
    """``passes``, the one-sentence ``verdict`` and the ``threshold``, from the last step's mean rank correlation."""
    passes = bool(final < threshold)
    verdict = (f"The CAMs depend on the weights: with every layer re-initialised their rank correlation with the "
               f"trained model's falls to {final:.2f} (below {threshold})." if passes else
               f"The CAMs do NOT depend enough on the weights: with every layer re-initialised their rank "
               f"correlation with the trained model's is still {final:.2f} (at or above {threshold}); do not read "
               "them as explanations of this model.")
    return {"passes": passes, "verdict": verdict, "threshold": threshold}
