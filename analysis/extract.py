"""One batched pass over a dataset: pooled latents, logits, Grad-CAMs, labels, confounders, environments, masks.

:func:`extract` works on a run folder written by ``ex2l train`` (its selected model, ``best.pt``) and on any
torch classifier given with the layer to take CAMs at::

    from analysis.extract import extract
    ext = extract("runs/demo/ex2l", "test")                         # a run folder and a split of its dataset
    ext = extract(resnet, dataset, layer=resnet.layer4)              # a plain torchvision classifier

CAMs go through :func:`ex2l_xai.cam.head_cams`: for a :class:`~ex2l_xai.models.TwoHeadNet` ONE forward pass per
batch gives the label CAM at the true label ``y``, the confounder CAM at the true confounder ``c`` and (a second
gradient of the same graph) the label CAM at the prediction ``ŷ``. CAMs are kept at the layer's resolution;
upsample them with :func:`ex2l_xai.cam.upsample` for display.
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

from ex2l_xai.cam import head_cams
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


def find_cam_layer(model: nn.Module) -> nn.Module:
    """The default CAM layer of a plain classifier: ``model.layer4`` when it exists (torchvision ResNets), else
    the last module that contains a ``Conv2d``'s output (the last ``Conv2d`` itself)."""
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Module):
        return layer4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise Ex2lError(f"layer: {type(model).__name__} has no Conv2d; pass layer= (the module to take CAMs at)")
    return convs[-1]


def _resolve_module(model: nn.Module, spec: nn.Module | str, what: str) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    try:
        return model.get_submodule(spec)
    except AttributeError as exc:
        raise Ex2lError(f"{what}: {spec!r} is not a module path of {type(model).__name__}") from exc


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _as_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    label = getattr(out, "label", None)
    if isinstance(label, Tensor):
        return label
    raise Ex2lError(
        f"forward_fn must return label logits (B, n_classes) or a sequence whose first entry is, got {type(out).__name__}"
    )


def random_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised copy of ``model`` (same architecture): ``copy.deepcopy`` then ``reset_parameters``
    of every sub-module that has one, under ``torch.manual_seed(seed)`` (the global RNG state is restored)."""
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.reset_running_stats()
    return clone


# ---- the pass ------------------------------------------------------------------------------------------------
class _Forward:
    """Wrap a model as ``forward_fn`` for ``head_cams``: returns (label, conf?, label, latent) in that order."""

    def __init__(self, fn: Callable[[Tensor], Any], two_head: bool, latent: Callable[[Any, Tensor], Tensor]):
        self.fn, self.two_head, self.latent = fn, two_head, latent

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.fn(x)
        label = _as_logits(out)
        z = self.latent(out, x)
        if self.two_head:
            return label, out.confounder, label, z
        return label, label, z


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
) -> Extraction:
    """Latents, logits, predictions and Grad-CAMs of a model over (a seeded subsample of) a dataset.

    Parameters
    ----------
    model_or_run : a run folder (its ``best.pt`` is loaded) or a torch classifier (an
        :class:`~ex2l_xai.models.TwoHeadNet` or any module whose output is label logits).
    dataset : a dataset with DESIGN.md's dict samples; with a run folder also a split name (default ``"test"``)
        of the run's own dataset.
    layer : module (or module path) to take CAMs at; default: the TwoHeadNet's ``cam_layers()``, else
        ``model.layer4`` or the last ``Conv2d`` (:func:`find_cam_layer`).
    forward_fn : maps an input batch to the model output (default: the model).
    latent_fn : how to get the pooled latent of a plain model. ``None``: the TwoHeadNet's ``latent``, else the
        input of the model's last ``nn.Linear`` (``model.fc`` of a ResNet), else ``"pool"``. An ``nn.Module``
        (or a module path): the latent is that module's (flattened) input. ``"pool"``: global average pool of
        the CAM layer's output. Any other callable: ``latent_fn(x)``, called without gradients (an extra pass).
    batch_size : samples per forward pass. max_samples : subsample size (stratified by group, seeded by ``seed``;
        None = all). indices : explicit dataset positions to extract instead (overrides ``max_samples``).
    device : where to compute; default ``"cpu"`` for a run folder, the model's own device for a module (a module
        is moved when another device is given).
    cams : also compute the CAMs (False: latents and logits only, under ``torch.no_grad``).
    name : display name (default: the run's algorithm, or the model's class name).
    channels_last : pass image batches in channels-last memory layout (the values are the same up to float
        rounding; convolutions over a batch run up to 2x faster on CPUs); default: on CPU only.

    The model is evaluated in eval mode and its train/eval mode is restored afterwards. CAMs are computed with
    ``create_graph=False`` and detached; they stay at the layer's resolution.
    """
    import time

    t0 = time.time()
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
        if device is not None:
            model.to(device)
        name = name or type(model).__name__
    else:
        raise Ex2lError(
            f"model_or_run: expected a run folder or a torch.nn.Module, got {type(model_or_run).__name__}"
        )
    dev = next((p.device for p in model.parameters()), torch.device(device or "cpu"))

    from ex2l_xai.models import TwoHeadNet

    two_head = isinstance(model, TwoHeadNet) and model.conf_head is not None and layer is None
    if isinstance(model, TwoHeadNet) and layer is None:
        label_layer, conf_layer = model.cam_layers()
    else:
        label_layer = _resolve_module(model, layer, "layer") if layer is not None else find_cam_layer(model)
        conf_layer = label_layer
    meta["layer"] = _module_path(model, label_layer)

    # latent
    pre_hooked: nn.Module | None = None
    latent_call: Callable[[Tensor], Tensor] | None = None
    pool = False
    if latent_fn is None:
        if isinstance(model, TwoHeadNet) and forward_fn is None:
            pass  # TwoHeadOutput.latent
        else:
            pre_hooked = model.label_head if isinstance(model, TwoHeadNet) else _last_linear(model)
            pool = pre_hooked is None
    elif isinstance(latent_fn, str) and latent_fn == "pool":
        pool = True
    elif isinstance(latent_fn, (nn.Module, str)):
        pre_hooked = _resolve_module(model, latent_fn, "latent_fn")
    elif callable(latent_fn):
        latent_call = latent_fn
    else:
        raise Ex2lError(f"latent_fn: expected None, 'pool', a module, a module path or a callable, got {latent_fn!r}")
    if pool:
        meta["latent"] = f"global average pool of {meta['layer']}"
    elif pre_hooked is not None:
        meta["latent"] = f"input of {_module_path(model, pre_hooked)}"
    else:
        meta["latent"] = "latent_fn" if latent_call is not None else "TwoHeadOutput.latent"


    captured: dict[str, Tensor] = {}
    pool_acts: dict[str, Tensor] = {}

    def pre_hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        captured["z"] = inputs[0]

    def act_hook(_m: nn.Module, _i: Any, output: Tensor) -> None:
        pool_acts["a"] = output

    base_fn = forward_fn or model

    def latent_of(out: Any, x: Tensor) -> Tensor:
        if pre_hooked is not None:
            return captured["z"].flatten(1)
        if pool:
            a = pool_acts["a"]
            return a.mean(dim=tuple(range(2, a.dim())))
        if latent_call is not None:
            with torch.no_grad():
                return latent_call(x).flatten(1)
        z = getattr(out, "latent", None)
        if not isinstance(z, Tensor):
            raise Ex2lError("latent_fn: the model output has no .latent; pass latent_fn= (a module or 'pool')")
        return z

    fwd = _Forward(base_fn, two_head, latent_of)

    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
    else:
        idx = subsample_indices(dataset, max_samples, seed)
    if idx.size == 0:
        raise Ex2lError("extract: no samples to extract (empty dataset or indices)")
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)

    parts: dict[str, list[np.ndarray]] = {}

    def put(key: str, value: Tensor | np.ndarray | None) -> None:
        if value is None:
            return
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        parts.setdefault(key, []).append(arr)

    handles = []
    if pre_hooked is not None:
        handles.append(pre_hooked.register_forward_pre_hook(pre_hook))
    if pool:
        handles.append(label_layer.register_forward_hook(act_hook))
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
            if cams:
                layers = [label_layer, conf_layer, label_layer] if two_head else [label_layer, label_layer]
                y = batch["label"].to(dev)
                targets: list[Any] = [y, batch["confounder"].to(dev), "pred"] if two_head else [y, "pred"]
                hc = head_cams(fwd, layers, x, targets, create_graph=False, retain_graph=False)
                out = hc.output
                put("cams_true", hc.cams[0])
                put("cams_pred", hc.cams[-1])
                if two_head:
                    put("cams_conf", hc.cams[1])
            else:
                with torch.no_grad():
                    out = fwd(x)
            put("logits", out[0])
            if two_head:
                put("conf_logits", out[1])
            put("latents", out[-1])
            put("labels", batch["label"])
            put("confounders", batch["confounder"])
            put("envs", batch["env"])
            put("indices", batch["index"])
            if "mask" in batch:
                put("masks", batch["mask"].reshape(x.shape[0], *batch["mask"].shape[-2:]) > 0.5)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def cat(key: str, dtype: Any = None) -> np.ndarray | None:
        if key not in parts:
            return None
        a = np.concatenate(parts[key])
        return a.astype(dtype, copy=False) if dtype is not None else a

    logits = cat("logits", np.float32)
    labels = cat("labels", np.int64)
    confs = cat("confounders", np.int64)
    envs = cat("envs", np.int64)
    assert logits is not None and labels is not None and confs is not None and envs is not None
    meta["seconds"] = time.time() - t0
    meta["n_samples"] = int(labels.shape[0])
    meta["n_dataset"] = int(len(dataset))
    log.debug("extract %s: %d samples in %.1f s", name, labels.shape[0], meta["seconds"])
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
        label_names=_names(dataset, "label_names", labels),
        confounder_names=_names(dataset, "confounder_names", confs),
        env_names=_names(dataset, "env_names", envs),
        name=name,
        image_size=image_size,
        meta=meta,
    )


PRETTY = {"erm": "ERM", "groupdro": "GroupDRO", "ex2l": "eX2L", "irm": "IRM", "jtt": "JTT", "dfr": "DFR"}


def _pretty(algorithm: str) -> str:
    return PRETTY.get(algorithm.lower(), algorithm)


def _module_path(model: nn.Module, module: nn.Module | None) -> str:
    if module is None:
        return ""
    for path, m in model.named_modules():
        if m is module:
            return path or "<model>"
    return type(module).__name__
