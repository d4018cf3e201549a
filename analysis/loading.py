"""Models trained elsewhere, for the audit: a torchvision model by name plus a state-dict file, a timm model by name
plus a state-dict file, or a TorchScript file; and the input normalisation they expect.

Datasets yield images in [0, 1]. A model trained on normalised images gets its normalisation by wrapping:
:class:`Normalized` computes ``(x - mean) / std`` and calls the model, and is transparent to module paths
(``layer4`` still means the model's ``layer4``). ``normalization_for`` picks the default: ImageNet's statistics
for torchvision models and TorchScript files, the model's own ``pretrained_cfg`` for timm models.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["IMAGENET", "Normalized", "external_targets", "load_model", "normalization_for", "parse_normalization"]

IMAGENET: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
Stats = tuple[tuple[float, ...], tuple[float, ...]] | None


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model trained on normalised images, fed images in [0, 1].

    Parameters
    ----------
    model : the classifier. mean, std : per-channel statistics (or one number for every channel).

    Transparent to the audit: module paths are the wrapped model's (``is_wrapper``), and :meth:`prepare` is the
    normalisation alone.
    """

    is_wrapper = True

    def __init__(self, model: nn.Module, mean: Sequence[float] | float, std: Sequence[float] | float) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if (s <= 0).any():
            raise Ex2lError(f"normalization: std must be > 0, got {s.flatten().tolist()}")
        self.inner = model
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def prepare(self, x: Tensor) -> Tensor:
        """The normalised batch the wrapped model receives."""
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Any:
        """The wrapped model's output on the normalised batch."""
        return self.inner(self.prepare(x))


def parse_normalization(text: str) -> Stats | str:
    """``imagenet`` -> ImageNet's mean/std; ``none`` -> None; ``auto`` -> ``"auto"``; ``M,S`` (one mean and one std
    for every channel) or ``M1,M2,M3,S1,S2,S3`` -> those numbers; else a clear error."""
    key = str(text).strip().lower()
    if key == "imagenet":
        return IMAGENET
    if key == "none":
        return None
    if key == "auto":
        return "auto"
    try:
        nums = [float(v) for v in key.split(",")]
    except ValueError:
        nums = []
    if len(nums) == 2:
        return (nums[0],) * 3, (nums[1],) * 3
    if len(nums) == 6:
        return tuple(nums[:3]), tuple(nums[3:])
    raise Ex2lError(f"--normalize {text!r}: expected auto, imagenet, none, MEAN,STD or M1,M2,M3,S1,S2,S3")


def normalization_for(kind: str, model: nn.Module) -> Stats:
    """The default normalisation of a model of ``kind`` (``torchvision``, ``timm`` or ``torchscript``): ImageNet's
    statistics, or a timm model's own ``pretrained_cfg`` mean and std."""
    if kind == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "mean" in cfg and "std" in cfg:
            return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET


def _state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise Ex2lError(f"--weights {path}: no such file; expected a state dict saved with torch.save(model.state_dict())")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise Ex2lError(f"--weights {path}: cannot read it with torch.load(weights_only=True) ({exc}); expected a "
                        "state dict saved with torch.save(model.state_dict())") from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise Ex2lError(f"--weights {path}: holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    state = _state_dict(path)
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise Ex2lError(f"--weights {path} does not fit {spec}: {'; '.join(bad[:3])} (a different number of classes? "
                        "pass --num-classes)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise Ex2lError(f"--weights {path} does not fit {spec}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                        f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")


def load_model(spec: str, weights: str | os.PathLike[str] | None = None, *, num_classes: int,
               normalize: str = "auto", device: str | torch.device = "cpu", pretrained: bool = False
               ) -> tuple[nn.Module, dict[str, Any]]:
    """A model trained elsewhere, ready to audit on images in [0, 1].

    Parameters
    ----------
    spec : ``torchvision:NAME`` or a bare torchvision name (``resnet18``: ``torchvision.models.get_model``),
        ``timm:NAME`` (``timm.create_model``; timm must be installed), or ``torchscript:PATH`` / the path of a
        TorchScript file.
    weights : the state-dict file (``torch.save(model.state_dict(), PATH)``) of a torchvision or timm model;
        nothing is downloaded unless ``pretrained``.
    num_classes : the size of the model's output (the data's number of labels, usually; not with ``pretrained``).
    pretrained : a torchvision or timm model with the library's own pretrained weights and classes
        (:func:`ex2l_xai.pretrained.library_model`; offline, a one-line error naming ``--weights``), instead of
        ``weights``.
    normalize : ``auto`` (:func:`normalization_for`), ``imagenet``, ``none``, ``M,S`` or six numbers.

    Returns
    -------
    (model, info)
        The model in eval mode (wrapped in :class:`Normalized` unless ``none``) and ``{"kind", "name", "weights",
        "normalization"}`` for the report.
    """
    from analysis.scripted import load_torchscript

    kind, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if not kind:
        kind = "torchscript" if Path(spec).is_file() else "torchvision"
        name = spec
    if kind == "torchscript":
        if weights is not None:
            raise Ex2lError(f"--weights: a TorchScript file ({name}) carries its own weights; drop --weights")
        model: nn.Module = load_torchscript(name, device)
    elif kind in ("torchvision", "timm") and pretrained:
        from ex2l_xai.pretrained import library_model

        if weights is not None:
            raise Ex2lError(f"--model {spec}: give --pretrained or --weights, not both")
        model = library_model(spec if kind == "timm" else name, pretrained=True)
    elif kind in ("torchvision", "timm"):
        if weights is None:
            raise Ex2lError(f"--model {spec}: needs --weights FILE (its state dict) or --pretrained (the library's "
                            "own weights, downloaded)")
        if kind == "torchvision":
            import torchvision

            try:
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            except (ValueError, KeyError) as exc:
                raise Ex2lError(f"--model {spec}: not a torchvision model name (e.g. resnet18, resnet50, "
                                f"efficientnet_b0, vgg16, convnext_tiny) ({exc})") from exc
        else:
            try:
                import timm
            except ImportError as exc:
                raise Ex2lError(f"--model {spec}: timm is not installed (pip install timm)") from exc
            try:
                model = timm.create_model(name, pretrained=False, num_classes=num_classes)
            except RuntimeError as exc:
                raise Ex2lError(f"--model {spec}: timm does not know {name!r} ({exc})") from exc
        _load_weights(model, Path(weights), spec)
    else:
        raise Ex2lError(f"--model {spec!r}: expected torchvision:NAME, timm:NAME, torchscript:PATH, a torchvision "
                        "name or a TorchScript file")
    stats = parse_normalization(normalize)
    if stats == "auto":
        stats = normalization_for(kind, model)
    if stats is not None:
        model = Normalized(model, stats[0], stats[1])
    model = model.to(device).eval()
    info = {"kind": kind, "name": name,
            "weights": str(weights) if weights is not None else ("pretrained" if pretrained else None),
            "normalization": None if stats is None else {"mean": list(stats[0]), "std": list(stats[1])}}
    return model, info


WHERE_NAMES = ("a torchvision model name (e.g. resnet18, resnet50, efficientnet_b0, vit_b_16; the full list: "
               "torchvision.models.list_models()), timm:NAME (a timm model: timm.list_models()), or a TorchScript "
               "file (torchscript:PATH or an existing PATH)")


def check_model_spec(spec: str) -> None:
    """Raise one clear error when ``spec`` names no model :func:`load_model` can build (an unknown torchvision name,
    a missing TorchScript file), listing where names come from."""
    kind, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if not kind:
        if Path(spec).is_file():
            return
        kind = "torchvision"
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise Ex2lError(f"--model {spec}: unknown model name {name!r}; expected {WHERE_NAMES}")
    elif kind == "torchscript":
        if not Path(name).is_file():
            raise Ex2lError(f"--model {spec}: TorchScript file {name!r} does not exist; expected {WHERE_NAMES}")
    elif kind != "timm":
        raise Ex2lError(f"--model {spec}: unknown kind {kind!r}; expected {WHERE_NAMES}")


def external_targets(
    specs: Sequence[str],
    weights: Sequence[str] = (),
    *,
    data: str | os.PathLike[str],
    csv: str | os.PathLike[str] | None = None,
    names: Sequence[str] = (),
    split: str | None = None,
    image_size: int = 224,
    normalize: str = "auto",
    layer: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    skip_unreadable: bool = False,
    pretrained: bool = False,
) -> list[Any]:
    """:class:`~analysis.audit.AuditTarget` objects for models trained elsewhere on a folder of images + CSV (what
    ``ex2l audit --model ... --data ...`` audits).

    ``specs[i]`` is loaded by :func:`load_model`; the torchvision and timm specs take the ``weights`` files in
    order (a TorchScript file takes none). ``data``/``csv``/``split``/``image_size`` build one
    :class:`analysis.datasets.FolderDataset` shared by every model (``split`` None: the CSV's ``test`` rows when it
    has a ``split`` column, else every row; a bare ``DIR/<class>/<image>`` tree without CSV: every image).
    ``skip_unreadable``: skip (and count in the log) image files that are missing or cannot be decoded.
    ``layer``: the CAM layer's module path (default: found per model).
    ``pretrained``: the torchvision and timm specs take the library's own weights (no ``weights`` files).
    """
    from analysis.audit import AuditTarget
    from analysis.datasets import FolderDataset

    if not specs:
        raise Ex2lError("--model: expected at least one model")
    if names and len(names) != len(specs):
        raise Ex2lError(f"--name: {len(names)} names for {len(specs)} models (give one per --model)")
    for spec in specs:  # an unknown name fails before any file is read
        check_model_spec(spec)
    if split is None:
        from ex2l_xai.data.base import read_csv
        from ex2l_xai.data.table import resolve_csv

        path = resolve_csv(Path(data).expanduser().absolute(), csv)  # DIR joined once (DIR/metadata.csv)
        if csv is None and not path.is_file():
            split = "all"  # a bare DIR/<class>/<image> tree: every image
        else:
            cols = read_csv(path, ["path"], "columns path, [label,] [confounder][, env][, mask][, split]").columns
            split = "test" if "split" in cols else "all"
    dataset = FolderDataset(data, csv, split=split, image_size=image_size, skip_unreadable=skip_unreadable)
    n_classes = num_classes or dataset.n_labels
    queue = list(weights)
    targets = []
    for i, spec in enumerate(specs):
        kind = spec.partition(":")[0] if ":" in spec else ("torchscript" if Path(spec).is_file() else "torchvision")
        w = None
        if kind in ("torchvision", "timm") and not pretrained:
            if not queue:
                raise Ex2lError(f"--model {spec}: no --weights left for it (give one --weights per torchvision or "
                                "timm model, in the same order)")
            w = queue.pop(0)
        model, info = load_model(spec, w, num_classes=n_classes, normalize=normalize, device=device,
                                 pretrained=pretrained)
        info["source"] = f"{spec}" + (f" + {w}" if w else "")
        name = names[i] if names else (Path(spec).stem if kind == "torchscript" else spec.partition(":")[2] or spec)
        targets.append(AuditTarget(model=model, name=name, dataset=dataset, layer=layer, info=info))
    if queue:
        raise Ex2lError(f"--weights: {len(queue)} more file(s) than torchvision/timm models ({', '.join(queue)})")
    return targets
