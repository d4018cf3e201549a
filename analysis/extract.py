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

:func:`extract` does four things, one function each: resolve the model and its dataset (``_resolve_model``), its
CAM layer(s) (``_resolve_layers``) and its latent (``_Latent``), run the batches (``_run``), assemble the arrays
(``_assemble``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from analysis.datasets import as_audit_dataset
from analysis.modules import (
    as_logits,
    find_cam_layer,
    module_path,
    prepare_input,
    random_copy,
    resolve_module,
    scripted_of,
    unwrap,
)
from ex2l_xai.cam import cam_from_activations, head_cams
from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["Extraction", "extract", "find_cam_layer", "random_copy", "subsample_indices"]

LatentSpec = Callable[[Tensor], Tensor] | nn.Module | str | None


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


# ---- resolving the model, its layers and its latent -----------------------------------------------------------
@dataclass
class _Source:
    """What :func:`extract` audits: the model, the dataset (dict samples), the display name and provenance."""

    model: nn.Module
    dataset: Any
    name: str
    meta: dict[str, Any]
    device: torch.device


def _resolve_model(model_or_run: Any, dataset: Any, device: Any, name: str | None, confounders: Any, envs: Any
                   ) -> _Source:
    """Load a run folder's selected model and dataset split, or take a module and its dataset as given."""
    meta: dict[str, Any] = {}
    if isinstance(model_or_run, (str, os.PathLike)):
        from ex2l_xai.train import dataset_kwargs, load_run_model

        run = Path(model_or_run)
        model, config = load_run_model(run, device or "cpu")
        if dataset is None or isinstance(dataset, str):
            split = dataset or "test"
            from ex2l_xai.data import get_dataset

            dataset = get_dataset(config.data.name, split, **dataset_kwargs(config))
            meta["split"] = split
        meta.update(run=str(run), algorithm=config.algorithm_name, dataset=config.data.name)
        name = name or _pretty(config.algorithm_name)
    elif isinstance(model_or_run, nn.Module):
        model = model_or_run
        if isinstance(dataset, str) or dataset is None:
            raise Ex2lError(f"dataset: a model needs a dataset object, got {dataset!r} (a split name needs a run folder)")
        if isinstance(model, torch.jit.ScriptModule):
            from analysis.scripted import ScriptedClassifier

            model = ScriptedClassifier(model)
        if device is not None:
            model.to(device)
        name = name or type(unwrap(model)).__name__
    else:
        raise Ex2lError(
            f"model_or_run: expected a run folder or a torch.nn.Module, got {type(model_or_run).__name__}"
        )
    dataset = as_audit_dataset(dataset, confounders=confounders, envs=envs)
    dev = next((p.device for p in model.parameters()), torch.device(device or "cpu"))
    return _Source(model, dataset, name, meta, dev)


@dataclass
class _Layers:
    """The CAM layers: the label head's, the confounder head's (two-head models), and the TorchScript path."""

    label: nn.Module
    conf: nn.Module
    two_head: bool
    path: str
    scripted: Any = None


def _resolve_layers(src: _Source, layer: nn.Module | str | None, forward_fn: Any, first: Tensor) -> _Layers:
    """The CAM layer(s): a TwoHeadNet's own, the given module or path, else :func:`find_cam_layer` on ``first``
    (an example batch)."""
    from ex2l_xai.models import TwoHeadNet

    model = src.model
    two_head = isinstance(model, TwoHeadNet) and model.conf_head is not None and layer is None
    if isinstance(model, TwoHeadNet) and layer is None:
        label_layer, conf_layer = model.cam_layers()
    else:
        if layer is not None:
            label_layer = resolve_module(model, layer, "layer")
        elif forward_fn is None:
            label_layer = find_cam_layer(model, first)
        else:
            label_layer = find_cam_layer(model)
        conf_layer = label_layer
    path = module_path(model, label_layer)
    scripted = scripted_of(model)
    if scripted is not None and forward_fn is not None:
        raise Ex2lError("forward_fn: not supported for a TorchScript model (its CAMs come from its own graph)")
    return _Layers(label_layer, conf_layer, two_head, path, scripted)


class _Latent:
    """Where the pooled latent comes from (see ``latent_fn`` of :func:`extract`) and how to read it per batch."""

    def __init__(self, src: _Source, latent_fn: LatentSpec, forward_fn: Any, layers: _Layers) -> None:
        from ex2l_xai.models import TwoHeadNet

        model = src.model
        self.pre_hooked: nn.Module | None = None
        self.call: Callable[[Tensor], Tensor] | None = None
        self.pool = False
        if layers.scripted is not None and latent_fn not in (None, "pool"):
            raise Ex2lError("latent_fn: a TorchScript model's latent is the global average pool of its CAM layer "
                            "(latent_fn=None or 'pool')")
        if latent_fn is None:
            if layers.scripted is not None:
                self.pool = True
            elif not (isinstance(model, TwoHeadNet) and forward_fn is None):
                self.pre_hooked = model.label_head if isinstance(model, TwoHeadNet) else _last_linear(model)
                self.pool = self.pre_hooked is None
        elif isinstance(latent_fn, str) and latent_fn == "pool":
            self.pool = True
        elif isinstance(latent_fn, (nn.Module, str)):
            self.pre_hooked = resolve_module(model, latent_fn, "latent_fn")
        elif callable(latent_fn):
            self.call = latent_fn
        else:
            raise Ex2lError(
                f"latent_fn: expected None, 'pool', a module, a module path or a callable, got {latent_fn!r}")
        if self.pool:
            self.description = f"global average pool of {layers.path}"
        elif self.pre_hooked is not None:
            self.description = f"input of {module_path(model, self.pre_hooked)}"
        else:
            self.description = "latent_fn" if self.call is not None else "TwoHeadOutput.latent"
        self.layer = layers.label
        self.captured: dict[str, Tensor] = {}

    def hooks(self) -> list[Any]:
        """Register the hooks the latent needs (the caller removes them)."""
        handles = []
        if self.pre_hooked is not None:
            def pre_hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
                self.captured["z"] = inputs[0]

            handles.append(self.pre_hooked.register_forward_pre_hook(pre_hook))
        if self.pool and not isinstance(self.layer, torch.jit.ScriptModule):
            def act_hook(_m: nn.Module, _i: Any, output: Tensor) -> None:
                self.captured["a"] = output

            handles.append(self.layer.register_forward_hook(act_hook))
        return handles

    def read(self, out: Any, x: Tensor, activation: Tensor | None = None) -> Tensor:
        """The (B, D) latent of the batch ``x`` whose model output is ``out``."""
        if self.pre_hooked is not None:
            return self.captured["z"].flatten(1)
        if self.pool:
            a = activation if activation is not None else self.captured["a"]
            return a.mean(dim=tuple(range(2, a.dim())))
        if self.call is not None:
            with torch.no_grad():
                return self.call(x).flatten(1)
        z = getattr(out, "latent", None)
        if not isinstance(z, Tensor):
            raise Ex2lError("latent_fn: the model output has no .latent; pass latent_fn= (a module or 'pool')")
        return z


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in unwrap(model).modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


# ---- the pass ------------------------------------------------------------------------------------------------
class _Forward:
    """Wrap a model as ``forward_fn`` for ``head_cams``: returns (label, conf?, label, latent) in that order."""

    def __init__(self, fn: Callable[[Tensor], Any], two_head: bool, latent: _Latent):
        self.fn, self.two_head, self.latent = fn, two_head, latent

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.fn(x)
        label = as_logits(out)
        z = self.latent.read(out, x)
        if self.two_head:
            return label, out.confounder, label, z
        return label, label, z


def _batch_outputs(src: _Source, layers: _Layers, latent: _Latent, fwd: _Forward, x: Tensor,
                   batch: dict[str, Any], cams: bool) -> dict[str, Tensor | None]:
    """One batch: logits (and confounder logits), latent, and with ``cams`` the label CAMs at y and at ŷ (and the
    confounder CAM at c)."""
    y = batch["label"].to(x.device)
    res: dict[str, Tensor | None] = {}
    if layers.scripted is not None:  # TorchScript: the activation comes out of the graph itself
        xin = prepare_input(src.model, x)
        with torch.set_grad_enabled(cams):
            out, act = layers.scripted.with_activation(xin.requires_grad_(cams), layers.path)
            logits = as_logits(out)
            if cams:
                res["cams_true"] = cam_from_activations(act, logits, y, retain_graph=True)
                res["cams_pred"] = cam_from_activations(act, logits, logits.detach().argmax(1), retain_graph=False)
        res["logits"] = logits
        res["latents"] = latent.read(out, x, act)
        return res
    if cams:
        layer_list = [layers.label, layers.conf, layers.label] if layers.two_head else [layers.label, layers.label]
        targets: list[Any] = [y, batch["confounder"].to(x.device), "pred"] if layers.two_head else [y, "pred"]
        hc = head_cams(fwd, layer_list, x, targets, create_graph=False, retain_graph=False)
        out = hc.output
        res["cams_true"], res["cams_pred"] = hc.cams[0], hc.cams[-1]
        if layers.two_head:
            res["cams_conf"] = hc.cams[1]
    else:
        with torch.no_grad():
            out = fwd(x)
    res["logits"] = out[0]
    if layers.two_head:
        res["conf_logits"] = out[1]
    res["latents"] = out[-1]
    return res


def _run(src: _Source, layers: _Layers, latent: _Latent, forward_fn: Any, idx: np.ndarray, *, cams: bool,
         batch_size: int, channels_last: bool | None) -> tuple[dict[str, list[np.ndarray]], tuple[int, int]]:
    """The loop over batches of ``dataset[idx]`` in eval mode (the model's mode is restored, hooks removed)."""
    model, dev = src.model, src.device
    loader = DataLoader(Subset(src.dataset, idx.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
    fwd = _Forward(forward_fn or model, layers.two_head, latent)
    parts: dict[str, list[np.ndarray]] = {}

    def put(key: str, value: Tensor | np.ndarray | None) -> None:
        if value is None:
            return
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        parts.setdefault(key, []).append(arr)

    handles = latent.hooks() if layers.scripted is None else []
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
            for key, value in _batch_outputs(src, layers, latent, fwd, x, batch, cams).items():
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


def _assemble(parts: dict[str, list[np.ndarray]], src: _Source, image_size: tuple[int, int]) -> Extraction:
    """Concatenate the per-batch arrays into an :class:`Extraction` with the dataset's names."""

    def cat(key: str, dtype: Any = None) -> np.ndarray | None:
        if key not in parts:
            return None
        a = np.concatenate(parts[key])
        return a.astype(dtype, copy=False) if dtype is not None else a

    logits, labels = cat("logits", np.float32), cat("labels", np.int64)
    confs, envs = cat("confounders", np.int64), cat("envs", np.int64)
    assert logits is not None and labels is not None and confs is not None and envs is not None
    ds = src.dataset
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
        name=src.name,
        image_size=image_size,
        meta=src.meta,
    )


def extract(
    model_or_run: nn.Module | str | os.PathLike[str],
    dataset: Any = "test",
    *,
    layer: nn.Module | str | None = None,
    forward_fn: Callable[[Tensor], Any] | None = None,
    latent_fn: LatentSpec = None,
    batch_size: int = 128,
    max_samples: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    cams: bool = True,
    name: str | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    channels_last: bool | None = None,
    confounders: Any = None,
    envs: Any = None,
) -> Extraction:
    """Latents, logits, predictions and Grad-CAMs of a model over (a seeded subsample of) a dataset.

    Parameters
    ----------
    model_or_run : a run folder (its ``best.pt`` is loaded) or a torch classifier (an
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
    batch_size : samples per forward pass. max_samples : subsample size (stratified by group, seeded by ``seed``;
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

    The model is evaluated in eval mode and its train/eval mode is restored afterwards. CAMs are computed with
    ``create_graph=False`` and detached; they stay at the layer's resolution.
    """
    import time

    t0 = time.time()
    src = _resolve_model(model_or_run, dataset, device, name, confounders, envs)
    idx = (np.asarray(indices, dtype=np.int64) if indices is not None
           else subsample_indices(src.dataset, max_samples, seed))
    if idx.size == 0:
        raise Ex2lError("extract: no samples to extract (empty dataset or indices)")
    first = torch.stack([src.dataset[int(i)]["image"] for i in idx[:2]]).to(src.device)
    layers = _resolve_layers(src, layer, forward_fn, first)
    latent = _Latent(src, latent_fn, forward_fn, layers)
    src.meta.update(layer=layers.path, latent=latent.description)
    parts, image_size = _run(src, layers, latent, forward_fn, idx, cams=cams, batch_size=batch_size,
                             channels_last=channels_last)
    src.meta.update(seconds=time.time() - t0, n_samples=int(sum(len(p) for p in parts["labels"])),
                    n_dataset=int(len(src.dataset)))
    log.debug("extract %s: %d samples in %.1f s", src.name, src.meta["n_samples"], src.meta["seconds"])
    return _assemble(parts, src, image_size)


PRETTY = {"erm": "ERM", "groupdro": "GroupDRO", "ex2l": "eX2L", "irm": "IRM", "jtt": "JTT", "dfr": "DFR"}


def _pretty(algorithm: str) -> str:
    return PRETTY.get(algorithm.lower(), algorithm)
