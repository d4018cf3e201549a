"""One batched pass over a dataset: pooled latents, logits, Grad-CAMs, labels, confounders, environments, masks.

:func:`extract` works on a run folder written by ``ex2l train`` (its selected model, ``best.pt``) and on any
torch classifier given with the layer to take CAMs at::

    from analysis.extract import extract
    ext = extract("runs/demo/ex2l", "test")                         # a run folder and a split of its dataset
    ext = extract(resnet, dataset, layer=resnet.layer4)              # a plain torchvision classifier

CAMs go through :func:`ex2l_xai.cam.head_cams`: for a :class:`~ex2l_xai.models.TwoHeadNet` ONE forward pass per
batch gives the label CAM at the true label ``y``, the confounder CAM at the true confounder ``c`` and (a second
gradient of the same graph) the label CAM at the prediction ``ŷ``. CAMs are kept at the layer's resolution;
upsample them with :func:`ex2l_xai.cam.upsample` for display. A TorchScript model (hooks do not run inside it) gets
its CAM layer's output from its own graph (:class:`analysis.scripted.ScriptedClassifier`).

:func:`extract` resolves the model once into a :class:`~analysis.adapter.ModelAdapter` (its CAM layer(s), its latent,
how one batch is computed), runs the batches (``_run``) and assembles the arrays (``_assemble``); it also takes an
adapter as given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from analysis.adapter import PRETTY, LatentSpec, ModelAdapter
from analysis.datasets import as_audit_dataset
from analysis.modules import find_cam_layer, random_copy  # re-exported (public names of this module)
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["PRETTY", "Extraction", "batch_for", "extract", "find_cam_layer", "random_copy", "subsample_indices"]


@dataclass
class Extraction:
    """Everything the audit needs about one model on one dataset, as numpy arrays (N = samples extracted).

    Attributes
    ----------
    latents : (N, D) float32 pooled features. logits : (N, K) label logits. conf_logits : (N, C) or None.
    preds : (N,) predicted labels. labels, confounders, envs : (N,) ids. indices : (N,) positions in the dataset.
    masks : (N, H, W) bool object masks, or None. cams_true : (N, h, w) label CAM at y, cams_pred : at ŷ,
    cams_conf : confounder CAM at c (None without a confounder head); all None with ``cams=False``.
    label_names, confounder_names, env_names : names of the ids. name : the model's display name.
    image_size : (H, W) of the inputs. meta : where it came from (run folder, algorithm, dataset, layer, seconds).
    """

    latents: np.ndarray
    logits: np.ndarray
    conf_logits: np.ndarray | None
    preds: np.ndarray
    labels: np.ndarray
    confounders: np.ndarray
    envs: np.ndarray
    indices: np.ndarray
    masks: np.ndarray | None
    cams_true: np.ndarray | None
    cams_pred: np.ndarray | None
    cams_conf: np.ndarray | None
    label_names: list[str]
    confounder_names: list[str]
    env_names: list[str]
    name: str = "model"
    image_size: tuple[int, int] = (0, 0)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_confounders(self) -> int:
        """Number of confounder values (from the names, else from the data)."""
        return len(self.confounder_names) or int(self.confounders.max()) + 1

    @property
    def groups(self) -> np.ndarray:
        """Group id of every sample: ``label * n_confounders + confounder``."""
        return self.labels * self.n_confounders + self.confounders

    @property
    def group_names(self) -> list[str]:
        """``"<label>/<confounder>"`` indexed by group id."""
        return [f"{lab}/{conf}" for lab in self.label_names for conf in self.confounder_names]

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: prediction equals label."""
        return self.preds == self.labels

    @classmethod
    def concat(cls, parts: Sequence[Extraction], name: str | None = None) -> Extraction:
        """Stack extractions of one model on several datasets (e.g. two splits); an array present in only some
        parts (CAMs, masks) becomes None. Names come from the first part; ``indices`` stay per-part positions."""
        if not parts:
            raise Ex2lError("Extraction.concat: expected at least one extraction")

        def stack(key: str) -> np.ndarray | None:
            arrays = [getattr(p, key) for p in parts]
            if any(a is None for a in arrays):
                return None
            if len({a.shape[1:] for a in arrays}) > 1:
                return None
            return np.concatenate(arrays)

        first = parts[0]
        keys = ("latents", "logits", "conf_logits", "preds", "labels", "confounders", "envs", "indices", "masks",
                "cams_true", "cams_pred", "cams_conf")
        return cls(
            **{k: stack(k) for k in keys},  # type: ignore[arg-type]
            label_names=first.label_names,
            confounder_names=first.confounder_names,
            env_names=first.env_names,
            name=name or first.name,
            image_size=first.image_size,
            meta={**first.meta, "parts": [p.meta for p in parts]},
        )


# ---- helpers -------------------------------------------------------------------------------------------------
def _names(dataset: Any, attr: str, values: np.ndarray) -> list[str]:
    names = getattr(dataset, attr, None)
    if names is None and isinstance(dataset, Subset):
        names = getattr(dataset.dataset, attr, None)
    if names is not None:
        return [str(n) for n in names]
    n = int(values.max()) + 1 if values.size else 0
    return [str(i) for i in range(n)]


def _dataset_columns(dataset: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels and confounders of every sample without loading images, if the dataset exposes them."""
    labels, confs = getattr(dataset, "labels", None), getattr(dataset, "confounders", None)
    if labels is None or confs is None:
        return None
    labels, confs = np.asarray(labels), np.asarray(confs)
    if labels.shape != (len(dataset),) or confs.shape != (len(dataset),):
        return None
    return labels.astype(np.int64), confs.astype(np.int64)


def subsample_indices(dataset: Any, max_samples: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_samples`` samples of ``dataset``, seeded.

    Stratified by group (label × confounder) when the dataset exposes ``labels`` and ``confounders``: each group
    keeps its share (every group present keeps at least one sample when ``max_samples`` ≥ the number of groups);
    otherwise uniform without replacement. ``None`` or ``max_samples >= len(dataset)`` keeps every sample.
    """
    n = len(dataset)
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples < 1:
        raise Ex2lError(f"max_samples: expected a positive integer or None, got {max_samples}")
    rng = np.random.default_rng(seed)
    cols = _dataset_columns(dataset)
    if cols is None:
        return np.sort(rng.choice(n, size=max_samples, replace=False))
    labels, confs = cols
    groups = labels * (int(confs.max()) + 1) + confs
    # Each sample's key is its (random) rank inside its group divided by the group's size: taking the smallest
    # keys takes the same fraction of every group, the first sample of each group before any second one.
    key = np.empty(n, dtype=np.float64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        ranks = rng.permutation(members.size)
        key[members] = (ranks + 0.5) / members.size
    order = np.lexsort((rng.random(n), key))
    return np.sort(order[:max_samples])


# ---- resolving the model and its dataset ----------------------------------------------------------------------
def _adapter_and_dataset(model_or_run: Any, dataset: Any, *, device: Any, name: str | None, layer: Any,
                         forward_fn: Any, latent_fn: LatentSpec, confounders: Any, envs: Any
                         ) -> tuple[ModelAdapter, Any, dict[str, Any]]:
    """The model's :class:`~analysis.adapter.ModelAdapter` (a run folder's selected model, a module, or an adapter
    as given) and the dataset in dict samples (a split name: of the run's own dataset)."""
    meta: dict[str, Any] = {}
    if isinstance(model_or_run, ModelAdapter):
        adapter = model_or_run
    elif isinstance(model_or_run, (str, os.PathLike)):
        adapter = ModelAdapter.from_run(model_or_run, device, name, layer=layer, forward_fn=forward_fn,
                                        latent_fn=latent_fn)
    elif isinstance(model_or_run, nn.Module):
        adapter = ModelAdapter(model_or_run, name=name, layer=layer, forward_fn=forward_fn, latent_fn=latent_fn,
                               device=device)
    else:
        raise Ex2lError(
            f"model_or_run: expected a run folder or a torch.nn.Module, got {type(model_or_run).__name__}"
        )
    if adapter.config is not None:
        if dataset is None or isinstance(dataset, str):
            from ex2l_xai.data import get_dataset
            from ex2l_xai.train import dataset_kwargs

            split = dataset or "test"
            dataset = get_dataset(adapter.config.data.name, split, **dataset_kwargs(adapter.config))
            meta["split"] = split
        if adapter.run is not None:
            meta.update(run=str(adapter.run), algorithm=adapter.config.algorithm_name,
                        dataset=adapter.config.data.name)
    elif isinstance(dataset, str) or dataset is None:
        raise Ex2lError(f"dataset: a model needs a dataset object, got {dataset!r} (a split name needs a run folder)")
    return adapter, as_audit_dataset(dataset, confounders=confounders, envs=envs), meta


# ---- batch size ----------------------------------------------------------------------------------------------
#: Pixels per batch of the extraction on a CPU when no batch size is given: 32 images at 128 px. On the 2-core
#: development machine benchmarks/extract_batch.py (200 images, two-head EfficientNet-Lite0) took 0.88 s in batches
#: of 32, 0.97 s of 16 and 3.50 s of 128 (2026-12-07, docs/performance.md): large batches' activations leave the cache.
CPU_PIXELS = 32 * 128 * 128
#: Images per batch elsewhere (a GPU wants large batches).
DEVICE_BATCH = 128


def batch_for(batch_size: int | None, device: torch.device | str, image_hw: tuple[int, int]) -> int:
    """``batch_size`` if given, else the default for ``device`` and images of ``image_hw`` (H, W): ``CPU_PIXELS``
    pixels a batch on a CPU, ``DEVICE_BATCH`` images elsewhere."""
    if batch_size is not None:
        if batch_size < 1:
            raise Ex2lError(f"batch_size: expected a positive number of samples or None, got {batch_size}")
        return int(batch_size)
    if torch.device(device).type != "cpu":
        return DEVICE_BATCH
    return max(1, CPU_PIXELS // max(1, int(image_hw[0]) * int(image_hw[1])))


# ---- the pass ------------------------------------------------------------------------------------------------
def _run(adapter: ModelAdapter, dataset: Any, idx: np.ndarray, *, cams: bool, batch_size: int,
         channels_last: bool | None, variant: str = "gradcam") -> tuple[dict[str, list[np.ndarray]], tuple[int, int]]:
    """The loop over batches of ``dataset[idx]`` in eval mode (the model's mode is restored, hooks removed)."""
    model, dev = adapter.model, adapter.device
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
    parts: dict[str, list[np.ndarray]] = {}

    def put(key: str, value: Tensor | np.ndarray | None) -> None:
        if value is None:
            return
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        parts.setdefault(key, []).append(arr)

    handles = adapter.hooks()
    use_cl = dev.type == "cpu" if channels_last is None else channels_last
    was_training = model.training
    model.eval()
    image_size = (0, 0)
    try:
        for batch in loader:
            x = batch["image"].to(dev)
            if use_cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            image_size = (int(x.shape[-2]), int(x.shape[-1]))
            y, c = batch["label"].to(dev), batch["confounder"].to(dev)
            for key, value in adapter.batch(x, y, c, cams, variant).items():
                put(key, value)
            for key, field_name in (("labels", "label"), ("confounders", "confounder"), ("envs", "env"),
                                    ("indices", "index")):
                put(key, batch[field_name])
            if "mask" in batch:
                put("masks", batch["mask"].reshape(x.shape[0], *batch["mask"].shape[-2:]) > 0.5)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return parts, image_size


def _assemble(parts: dict[str, list[np.ndarray]], dataset: Any, name: str, meta: dict[str, Any],
              image_size: tuple[int, int]) -> Extraction:
    """Concatenate the per-batch arrays into an :class:`Extraction` with the dataset's names."""

    def cat(key: str, dtype: Any = None) -> np.ndarray | None:
        if key not in parts:
            return None
        a = np.concatenate(parts[key])
        return a.astype(dtype, copy=False) if dtype is not None else a

    logits, labels = cat("logits", np.float32), cat("labels", np.int64)
    confs, envs = cat("confounders", np.int64), cat("envs", np.int64)
    assert logits is not None and labels is not None and confs is not None and envs is not None
    ds = dataset
    return Extraction(
        latents=cat("latents", np.float32),  # type: ignore[arg-type]
        logits=logits,
        conf_logits=cat("conf_logits", np.float32),
        preds=logits.argmax(1).astype(np.int64),
        labels=labels,
        confounders=confs,
        envs=envs,
        indices=cat("indices", np.int64),  # type: ignore[arg-type]
        masks=cat("masks", bool),
        cams_true=cat("cams_true", np.float32),
        cams_pred=cat("cams_pred", np.float32),
        cams_conf=cat("cams_conf", np.float32),
        label_names=_names(ds, "label_names", labels),
        confounder_names=_names(ds, "confounder_names", confs),
        env_names=_names(ds, "env_names", envs),
        name=name,
        image_size=image_size,
        meta=meta,
    )


def extract(
    model_or_run: ModelAdapter | nn.Module | str | os.PathLike[str],
    dataset: Any = "test",
    *,
    layer: nn.Module | str | None = None,
    forward_fn: Callable[[Tensor], Any] | None = None,
    latent_fn: LatentSpec = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    cams: bool = True,
    name: str | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    channels_last: bool | None = None,
    confounders: Any = None,
    envs: Any = None,
    variant: str = "gradcam",
) -> Extraction:
    """Latents, logits, predictions and Grad-CAMs of a model over (a seeded subsample of) a dataset.

    Parameters
    ----------
    model_or_run : a run folder (its ``best.pt`` is loaded), a :class:`~analysis.adapter.ModelAdapter` (``layer``,
        ``forward_fn``, ``latent_fn``, ``device`` and ``name`` are then the adapter's), or a torch classifier (an
        :class:`~ex2l_xai.models.TwoHeadNet`, any module whose output is label logits, a TorchScript module, or one
        wrapped in :class:`analysis.loading.Normalized`).
    dataset : a dataset with docs/architecture.md's dict samples, or any ``(image, label)`` dataset with ``confounders=``;
        with a run folder also a split name (default ``"test"``) of the run's own dataset.
    layer : module (or module path) to take CAMs at; default: the TwoHeadNet's ``cam_layers()``, else the last
        module whose output is a spatial map the logits depend on (:func:`analysis.modules.find_cam_layer`, probed
        on the first two images: ``layer4`` of a ResNet, ``bn2`` of a timm EfficientNet).
    forward_fn : maps an input batch to the model output (default: the model).
    latent_fn : how to get the pooled latent of a plain model. ``None``: the TwoHeadNet's ``latent``, else the
        input of the model's last ``nn.Linear`` (``model.fc`` of a ResNet), else ``"pool"`` (a TorchScript model:
        always ``"pool"``). An ``nn.Module`` (or a module path): the latent is that module's (flattened) input.
        ``"pool"``: global average pool of the CAM layer's output. Any other callable: ``latent_fn(x)``, called
        without gradients (an extra pass).
    batch_size : samples per forward pass (default :func:`batch_for`: 32 images of 128 px on a CPU, 128 elsewhere;
        the extraction's ``meta["batch_size"]`` says which). max_samples : subsample size (stratified by group, seeded by ``seed``;
        None = all). indices : explicit dataset positions to extract instead (overrides ``max_samples``).
    device : where to compute; default ``"cpu"`` for a run folder, the model's own device for a module (a module
        is moved when another device is given).
    cams : also compute the CAMs (False: latents and logits only, under ``torch.no_grad``).
    name : display name (default: the run's algorithm, or the model's class name).
    channels_last : pass image batches in channels-last memory layout (the values are the same up to float
        rounding; convolutions over a batch run up to 2x faster on CPUs); default: on CPU only.
    confounders, envs : one integer per sample, for datasets whose samples lack them (a ``TensorDataset``, an
        ``ImageFolder``; see :class:`analysis.datasets.AuditDataset`); without ``envs`` the environment is the
        confounder.
    variant : the CAM variant (:mod:`ex2l_xai.cam_variants`; default Grad-CAM).

    The model is evaluated in eval mode and its train/eval mode is restored afterwards. CAMs are computed with
    ``create_graph=False`` and detached; they stay at the layer's resolution.
    """
    import time

    t0 = time.time()
    adapter, ds, meta = _adapter_and_dataset(model_or_run, dataset, device=device, name=name, layer=layer,
                                             forward_fn=forward_fn, latent_fn=latent_fn, confounders=confounders,
                                             envs=envs)
    idx = (np.asarray(indices, dtype=np.int64) if indices is not None
           else subsample_indices(ds, max_samples, seed))
    if idx.size == 0:
        raise Ex2lError("extract: no samples to extract (empty dataset or indices)")
    first = torch.stack([ds[int(i)]["image"] for i in idx[:2]]).to(adapter.device)
    adapter.bind(first)
    batch_size = batch_for(batch_size, adapter.device, tuple(first.shape[-2:]))
    meta.update(layer=adapter.layer_path, latent=adapter.latent.description, batch_size=batch_size)
    parts, image_size = _run(adapter, ds, idx, cams=cams, batch_size=batch_size, channels_last=channels_last,
                             variant=variant)
    meta.update(variant=variant, seconds=time.time() - t0, n_samples=int(sum(len(p) for p in parts["labels"])),
                n_dataset=int(len(ds)))
    label = name or adapter.name
    log.debug("extract %s: %d samples in %.1f s", label, meta["n_samples"], meta["seconds"])
    return _assemble(parts, ds, label, meta, image_size)
