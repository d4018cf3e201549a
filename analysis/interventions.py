"""The interventional reliance test: change the background, keep the object, and see what the model does.

Correlational audit numbers (CAM mass in the object, probes) can be gamed; an intervention cannot. Following the
ImageNet-9 backgrounds challenge (Xiao et al. 2020, "Noise or Signal: The Role of Image Backgrounds in Object
Recognition"), each audited image is shown to the model in five versions, and the accuracy on each is reported:

* ``original``: the image itself;
* ``only_fg``: the object on a black background (Xiao et al.'s Only-FG);
* ``only_bg``: the background without the object;
* ``mixed_same``: the object on a background of its own class: one the class was seen on in TRAINING;
* ``mixed_rand``: the object on a random background;

with ``bg_gap = mixed_same - mixed_rand`` (how much a class-consistent background helps) and ``flip_rate`` (the
share of predictions that change when only the background changes). Formulas and sources:
docs/auditing_metrics.md.

Two ways to make the versions:

* **exact** (the built-in ``synthetic`` benchmark): the renderer draws each sample's own object on every
  background, pixel for pixel (:meth:`~ex2l_xai.data.synthetic.SyntheticDataset.render_on_background`), so
  every image is seen on EVERY background: ``mixed_same`` and ``mixed_rand`` are exact expectations over the
  backgrounds, and the accuracy of each class on each background (``per_class_background``) is a perfect
  intervention table. ``only_bg`` is the background drawn alone.
* **composite** (any dataset whose samples carry an object ``mask``): the object (mask) is pasted onto the
  background of another audited image whose own object is covered by that image's mean background colour;
  ``only_bg`` covers the object the same way. One background is drawn per image (seeded).

"Own class" is defined by the training distribution (``prior``: P(background | label) of the training split for a
run; the audited data itself otherwise): Xiao et al. take the background from the test set, whose backgrounds
follow ImageNet's training correlation; Spawrious-style test splits break that correlation on purpose.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from analysis.modules import as_logits
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["VARIANTS", "InterventionResult", "background_prior", "interventions"]

VARIANTS = ("original", "only_fg", "only_bg", "mixed_same", "mixed_rand")


@dataclass
class InterventionResult:
    """``summary``: the JSON-ready numbers (``audit.json``'s ``interventions``). ``examples``: for the first few
    samples, each version's image (H, W, 3 in [0, 1], for display) and the model's prediction on it; ``preds``: the
    prediction on every version of every sample (exact method: ``on_background`` (N, n_backgrounds) too)."""

    summary: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    preds: dict[str, np.ndarray] = field(default_factory=dict)


def background_prior(labels: Sequence[int] | np.ndarray, confounders: Sequence[int] | np.ndarray, n_labels: int,
                     n_confounders: int) -> np.ndarray:
    """P(confounder | label) as an (n_labels, n_confounders) array from co-occurrence counts (a label never seen:
    uniform). Which backgrounds count as a class's "own" in ``mixed_same``."""
    counts = np.zeros((n_labels, n_confounders), dtype=np.float64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(confounders, dtype=np.int64)), 1.0)
    rows = counts.sum(1, keepdims=True)
    return np.where(rows > 0, counts / np.where(rows > 0, rows, 1.0), 1.0 / n_confounders)


def _synthetic(dataset: Any) -> Any:
    from ex2l_xai.data.synthetic import SyntheticDataset

    return dataset if isinstance(dataset, SyntheticDataset) else None


class _Predictor:
    """Label predictions of a model on image batches (eval mode, no grad, channels-last on CPU), in chunks."""

    def __init__(self, model: nn.Module, forward_fn: Callable[[Tensor], Any] | None, device: torch.device,
                 batch_size: int, dataset: Any) -> None:
        self.fn, self.device, self.batch_size = forward_fn or model, device, batch_size
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        self.norm = None if mean is None or std is None else (
            torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.n_images = 0

    def to_model(self, images01: Tensor) -> Tensor:
        """Images in [0, 1] in the dataset's own space (normalised when the dataset normalises)."""
        return images01 if self.norm is None else (images01 - self.norm[0]) / self.norm[1]

    def __call__(self, images: Tensor) -> np.ndarray:
        out = []
        with torch.no_grad():
            for s in range(0, images.shape[0], self.batch_size):
                x = images[s: s + self.batch_size].to(self.device)
                if self.device.type == "cpu":
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append(as_logits(self.fn(x)).argmax(1).cpu().numpy())
        self.n_images += int(images.shape[0])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _display(img: Tensor, predictor: _Predictor) -> np.ndarray:
    x = img[None] if predictor.norm is None else img[None] * predictor.norm[1] + predictor.norm[0]
    return x[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _acc(preds: np.ndarray, labels: np.ndarray) -> float | None:
    return float((preds == labels).mean()) if preds.size else None


def _exact(ds: Any, idx: np.ndarray, prior: np.ndarray, predict: _Predictor, n_examples: int, seed: int
           ) -> InterventionResult:
    """Every sample on every background (the synthetic renderer)."""
    n_bg = len(ds.confounder_names)
    labels, confs = ds.labels[idx], ds.confounders[idx]
    p_bg = np.zeros((len(idx), n_bg), dtype=np.int64)
    p_fg = np.zeros(len(idx), dtype=np.int64)
    p_only_bg = np.zeros(len(idx), dtype=np.int64)
    kept: list[dict[str, np.ndarray]] = []
    chunk = max(1, predict.batch_size // (n_bg + 2))
    for s in range(0, len(idx), chunk):  # render and predict a few samples at a time: memory stays small
        grid, fg, bg = [], [], []
        for k in range(s, min(s + chunk, len(idx))):
            i, c = int(idx[k]), int(confs[k])
            per_bg = [ds.render_on_background(i, b) for b in range(n_bg)]
            grid.extend(img for img, _ in per_bg)
            fg.append(per_bg[c][0] * per_bg[c][1][None])
            bg.append(ds.render_on_background(i, c, draw_object=False)[0])
            if k < n_examples:
                kept.append({"grid": np.stack([img for img, _ in per_bg]), "only_fg": fg[-1], "only_bg": bg[-1]})
        n = len(fg)
        p_bg[s: s + n] = predict(predict.to_model(torch.from_numpy(np.stack(grid)))).reshape(n, n_bg)
        p_fg[s: s + n] = predict(predict.to_model(torch.from_numpy(np.stack(fg))))
        p_only_bg[s: s + n] = predict(predict.to_model(torch.from_numpy(np.stack(bg))))
    rows = np.arange(len(idx))
    p_orig = p_bg[rows, confs]
    correct = p_bg == labels[:, None]
    same = prior[labels]  # (N, n_bg): P(background | the sample's label) in training
    others = np.ones_like(correct)
    others[rows, confs] = False
    summary: dict[str, Any] = {
        "original_acc": _acc(p_orig, labels),
        "only_fg_acc": _acc(p_fg, labels),
        "only_bg_acc": _acc(p_only_bg, labels),
        "mixed_same_acc": float((same * correct).sum(1).mean()),
        "mixed_rand_acc": float(correct.mean()),
        "flip_rate": float((p_bg != p_orig[:, None])[others].mean()) if n_bg > 1 else None,
    }
    names = ds.confounder_names
    table: dict[str, Any] = {}
    for y in np.unique(labels):
        sel = labels == y
        table[ds.label_names[int(y)]] = {
            "n": int(sel.sum()),
            "acc": {names[b]: float(correct[sel, b].mean()) for b in range(n_bg)},
            "train_share": {names[b]: float(prior[int(y), b]) for b in range(n_bg)},
        }
    summary["per_class_background"] = table
    # examples: the class's most frequent training background and a background it never had (or the rarest)
    examples = []
    for k in range(len(kept)):
        i, y = int(idx[k]), int(labels[k])
        b_same = int(np.argmax(prior[y]))
        order = np.argsort(prior[y], kind="stable")
        b_rand = int(order[np.random.default_rng([seed, k]).integers(0, max(1, int((prior[y] == prior[y].min()).sum())))])
        g = kept[k]["grid"]
        examples.append({
            "index": i, "label": y,
            "images": {"original": g[confs[k]], "only_fg": kept[k]["only_fg"], "only_bg": kept[k]["only_bg"],
                       "mixed_same": g[b_same], "mixed_rand": g[b_rand]},
            "preds": {"original": int(p_orig[k]), "only_fg": int(p_fg[k]), "only_bg": int(p_only_bg[k]),
                      "mixed_same": int(p_bg[k, b_same]), "mixed_rand": int(p_bg[k, b_rand])},
            "backgrounds": {"original": names[confs[k]], "mixed_same": names[b_same], "mixed_rand": names[b_rand]},
        })
    for ex in examples:
        ex["images"] = {v: np.transpose(np.asarray(img), (1, 2, 0)) for v, img in ex["images"].items()}
    preds = {"original": p_orig, "only_fg": p_fg, "only_bg": p_only_bg, "on_background": p_bg}
    return InterventionResult(summary, examples, preds)


def _composite(dataset: Any, idx: np.ndarray, prior: np.ndarray, predict: _Predictor, n_examples: int, seed: int
               ) -> InterventionResult:
    """Object masks pasted onto other images' backgrounds (any dataset with masks)."""
    samples = [dataset[int(i)] for i in idx]
    if any("mask" not in s for s in samples):
        raise Ex2lError("interventions: some samples lack a 'mask'; the composite method needs one per sample")
    x = torch.stack([s["image"].float() for s in samples])
    m = torch.stack([s["mask"].reshape(1, *s["mask"].shape[-2:]) for s in samples]).float().gt(0.5).float()
    if m.shape[-2:] != x.shape[-2:]:
        raise Ex2lError(f"interventions: masks of size {tuple(m.shape[-2:])} do not match images of size "
                        f"{tuple(x.shape[-2:])}")
    labels = np.asarray([int(s["label"]) for s in samples])
    confs = np.asarray([int(s["confounder"]) for s in samples])
    black = predict.to_model(torch.zeros(1, x.shape[1], 1, 1))
    bg_area = (1 - m).sum((2, 3), keepdim=True).clamp_min(1.0)
    fill = (x * (1 - m)).sum((2, 3), keepdim=True) / bg_area  # each image's mean background colour
    only_bg = x * (1 - m) + fill * m
    only_fg = x * m + black * (1 - m)
    rng = np.random.default_rng(seed)
    present = np.unique(confs)
    by_conf = {int(c): np.flatnonzero(confs == c) for c in present}

    def donor(k: int, c: int) -> int:
        pool = by_conf[c]
        same_label = pool[(labels[pool] == labels[k]) & (pool != k)]
        choice = same_label if same_label.size else pool[pool != k] if (pool != k).any() else pool
        return int(rng.choice(choice))

    same_src, rand_src, same_c, rand_c = [], [], [], []
    for k in range(len(idx)):
        w = prior[labels[k], present]
        w = w / w.sum() if w.sum() > 0 else np.full(present.size, 1.0 / present.size)
        c_same = int(rng.choice(present, p=w))
        c_rand = int(rng.choice(present))
        same_c.append(c_same)
        rand_c.append(c_rand)
        same_src.append(donor(k, c_same))
        rand_src.append(donor(k, c_rand))
    mixed_same = x * m + only_bg[same_src] * (1 - m)
    mixed_rand = x * m + only_bg[rand_src] * (1 - m)
    versions = {"original": x, "only_fg": only_fg, "only_bg": only_bg, "mixed_same": mixed_same,
                "mixed_rand": mixed_rand}
    preds = {v: predict(t) for v, t in versions.items()}
    summary: dict[str, Any] = {f"{v}_acc": _acc(p, labels) for v, p in preds.items()}
    summary["flip_rate"] = float((preds["mixed_rand"] != preds["original"]).mean())
    names = getattr(dataset, "confounder_names", None) or [str(c) for c in range(int(confs.max()) + 1)]
    examples = []
    for k in range(min(n_examples, len(idx))):
        examples.append({
            "index": int(idx[k]), "label": int(labels[k]),
            "images": {v: _display(t[k], predict) for v, t in versions.items()},
            "preds": {v: int(p[k]) for v, p in preds.items()},
            "backgrounds": {"original": names[confs[k]], "mixed_same": names[same_c[k]],
                            "mixed_rand": names[rand_c[k]]},
        })
    return InterventionResult(summary, examples, preds)


def interventions(
    model: nn.Module,
    dataset: Any,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    max_samples: int | None = 240,
    prior: np.ndarray | None = None,
    forward_fn: Callable[[Tensor], Any] | None = None,
    method: str = "auto",
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    n_examples: int = 3,
) -> InterventionResult:
    """Accuracy of ``model`` on the object alone, the background alone, and the object on backgrounds of its own
    class and of random classes (see the module docstring).

    Parameters
    ----------
    model : a classifier (its output: label logits, or a tuple/TwoHeadOutput whose first entry is).
    dataset : docs/architecture.md's dict samples; the built-in ``synthetic`` benchmark (exact method) or any dataset whose
        samples carry a ``mask`` (composite method).
    indices : dataset positions to use; default a seeded, group-stratified subsample of ``max_samples``.
    prior : (n_labels, n_confounders) P(background | label) defining a class's own backgrounds
        (:func:`background_prior` of the training split); default: the co-occurrence in ``dataset`` itself.
    method : ``auto`` (exact for the synthetic benchmark, else composite), ``exact`` or ``composite``.
    seed : seeds the subsample and the composite method's background draws.
    n_examples : samples whose versions are kept (``examples``) for the report's figure.

    Returns
    -------
    InterventionResult
        ``summary`` has ``method``, ``n``, ``original_acc``, ``only_fg_acc``, ``only_bg_acc``, ``mixed_same_acc``,
        ``mixed_rand_acc``, ``bg_gap``, ``flip_rate``, ``prior_source``, ``seconds``, ``n_forward``; the exact
        method adds ``per_class_background``. Without masks (and not synthetic): ``{"available": False,
        "reason": ...}``.
    """
    from analysis.extract import subsample_indices

    t0 = time.time()
    syn = _synthetic(dataset)
    if method not in ("auto", "exact", "composite"):
        raise Ex2lError(f"method: expected auto, exact or composite, got {method!r}")
    if method == "exact" and syn is None:
        raise Ex2lError("method='exact' needs the built-in synthetic benchmark (its renderer redraws the object)")
    use_exact = syn is not None and method != "composite"
    if not use_exact and not (getattr(dataset, "has_masks", False) or "mask" in dataset[0]):
        return InterventionResult({"available": False, "reason": "the dataset has no object masks (give a mask per "
                                   "image: a 'mask' column in the CSV, CUB segmentations for Waterbirds)"})
    idx = (np.asarray(indices, dtype=np.int64) if indices is not None
           else subsample_indices(dataset, max_samples, seed))
    if idx.size < 2:
        raise Ex2lError(f"interventions: need at least 2 samples, got {idx.size}")
    prior, prior_source = _resolve_prior(dataset, prior)
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    predict = _Predictor(model, forward_fn, dev, batch_size, dataset)
    was_training = model.training
    model.eval()
    try:
        if use_exact:
            res = _exact(syn, idx, prior, predict, n_examples, seed)
        else:
            res = _composite(dataset, idx, prior, predict, n_examples, seed)
    finally:
        model.train(was_training)
    res.summary = _summary(res.summary, dataset, prior, method="exact" if use_exact else "composite", n=int(idx.size),
                           prior_source=prior_source, n_forward=predict.n_images, seconds=time.time() - t0)
    return res


def _resolve_prior(dataset: Any, prior: np.ndarray | None) -> tuple[np.ndarray, str]:
    """P(background | label) as given (checked against the dataset's label and confounder counts), else the
    co-occurrence in ``dataset``; and where it came from."""
    n_labels = len(getattr(dataset, "label_names", []) or []) or None
    n_conf = len(getattr(dataset, "confounder_names", []) or []) or None
    labels_all, confs_all = getattr(dataset, "labels", None), getattr(dataset, "confounders", None)
    if n_labels is None or n_conf is None:
        if labels_all is None or confs_all is None:
            raise Ex2lError("interventions: the dataset needs label_names and confounder_names (or labels and "
                            "confounders arrays)")
        n_labels, n_conf = int(np.max(labels_all)) + 1, int(np.max(confs_all)) + 1
    source = "given"
    if prior is None:
        if labels_all is None or confs_all is None:
            raise Ex2lError("interventions: pass prior= (P(background | label)); the dataset has no labels and "
                            "confounders arrays to take it from")
        prior = background_prior(labels_all, confs_all, n_labels, n_conf)
        source = "the audited data"
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (n_labels, n_conf):
        raise Ex2lError(f"prior: expected shape ({n_labels}, {n_conf}) (labels x confounders), got {prior.shape}")
    return prior, source


def _summary(s: dict[str, Any], dataset: Any, prior: np.ndarray, **extra: Any) -> dict[str, Any]:
    """The JSON-ready summary in its documented key order: the accuracies, ``bg_gap``, ``flip_rate``, where the
    prior came from, each class's own backgrounds, the cost."""
    s["bg_gap"] = s["mixed_same_acc"] - s["mixed_rand_acc"]
    s.update(available=True, **extra,
             same_backgrounds={dataset.label_names[y] if hasattr(dataset, "label_names") else str(y):
                               {str(_name(dataset, b)): float(prior[y, b]) for b in np.flatnonzero(prior[y] > 0)}
                               for y in range(prior.shape[0])})
    return {k: s[k] for k in ("available", "method", "n", *(f"{v}_acc" for v in VARIANTS), "bg_gap",
                              "flip_rate", "prior_source", "same_backgrounds", "n_forward", "seconds")
            } | ({"per_class_background": s["per_class_background"]} if "per_class_background" in s else {})


def _name(dataset: Any, b: int) -> str:
    names = getattr(dataset, "confounder_names", None)
    return str(names[b]) if names is not None and b < len(names) else str(b)
