"""Data for the audit from anywhere: plain ``(image, label)`` datasets, a folder of images with a CSV, and object
masks from files.

The audit reads docs/architecture.md's dict samples (``image``, ``label``, ``confounder``, ``env``, ``index``, optionally
``mask``). :func:`as_audit_dataset` passes such a dataset through and wraps anything else (a ``TensorDataset``, a
torchvision ``ImageFolder``) in :class:`AuditDataset`, with the confounder given separately; a dataset that still
lacks a field gets ONE error naming the field and what to pass. :class:`FolderDataset` is what ``ex2l audit
--data DIR --csv FILE`` reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ex2l_xai.data.base import ImageFileDataset, check_missing_files, make_transform
from ex2l_xai.data.table import read_image_table, resolve_csv
from ex2l_xai.errors import DataError, Ex2lError

log = logging.getLogger(__name__)

__all__ = ["AuditDataset", "FolderDataset", "MaskedDataset", "as_audit_dataset", "csv_masks", "require_fields",
           "waterbirds_masks"]

FIELDS = ("image", "label", "confounder", "env", "index")
_HOW = {
    "image": "samples must carry the image: a dict with 'image' or a tuple (image, label)",
    "label": "samples must carry the label: a dict with 'label' or a tuple (image, label)",
    "confounder": "pass confounders= (one integer per sample) to audit()/extract()/AuditTarget, or wrap the dataset "
                  "in analysis.datasets.AuditDataset(dataset, confounders=...)",
    "env": "pass envs= (one integer per sample; without it the environment is the confounder)",
    "mask": "the interventional test needs object masks: a dataset whose samples carry 'mask' (1xHxW, 1 = object), "
            "or masks= (one HxW array per sample) to AuditDataset",
}


def _column(values: Any, n: int, what: str) -> np.ndarray:
    arr = np.asarray(values.cpu() if isinstance(values, Tensor) else values)
    if arr.shape != (n,):
        raise Ex2lError(f"{what}: expected one integer per sample ({n}), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise Ex2lError(f"{what}: expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _names(values: np.ndarray, names: Sequence[str] | None, what: str) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if values.size and (values.min() < 0 or values.max() >= len(names)):
            raise Ex2lError(f"{what}: ids must lie in [0, {len(names)}) to match the {len(names)} names given")
        return names
    return [str(i) for i in range(int(values.max()) + 1 if values.size else 0)]


class AuditDataset(torch.utils.data.Dataset):
    """docs/architecture.md's dict samples from any dataset, with the fields it lacks given separately.

    Parameters
    ----------
    dataset : a map-style dataset whose samples are dicts with ``image`` and ``label``, or tuples
        ``(image, label, ...)`` (a ``TensorDataset``, a torchvision ``ImageFolder``).
    confounders, envs : one integer per sample; default: the dataset's own (its samples' or its ``confounders`` /
        ``envs`` attribute). Without environments, ``env`` = ``confounder`` (as for Waterbirds).
    masks : optional object masks, one (H, W) array per sample (non-zero = object).
    label_names, confounder_names, env_names : names of the ids (default: the dataset's, else ``"0"``, ``"1"``...).

    Labels are read without loading images where the dataset says them (``targets`` of an ImageFolder, the
    second tensor of a TensorDataset, a ``labels`` attribute), so that subsamples can be stratified by group.
    """

    def __init__(self, dataset: Any, *, confounders: Any = None, envs: Any = None, masks: Any = None,
                 label_names: Sequence[str] | None = None, confounder_names: Sequence[str] | None = None,
                 env_names: Sequence[str] | None = None) -> None:
        self.dataset = dataset
        n = len(dataset)
        given_c, given_e = confounders is not None, envs is not None
        confounders = confounders if given_c else getattr(dataset, "confounders", None)
        envs = envs if given_e else getattr(dataset, "envs", None)
        self._conf = None if confounders is None else _column(confounders, n, "confounders")
        self._env = None if envs is None else _column(envs, n, "envs")
        self.masks = None if masks is None else list(masks)
        if self.masks is not None and len(self.masks) != n:
            raise Ex2lError(f"masks: expected one mask per sample ({n}), got {len(self.masks)}")
        if self._conf is None:
            first = dataset[0]
            if not (isinstance(first, dict) and "confounder" in first):
                raise Ex2lError(f"dataset: its samples lack the field 'confounder'; {_HOW['confounder']}")
        self.labels = self._known_labels()
        self.confounders = self._conf
        self.envs = self._env if self._env is not None else self._conf
        names = label_names or getattr(dataset, "label_names", None) or getattr(dataset, "classes", None)
        self.label_names = [str(v) for v in names] if names else (
            _names(self.labels, None, "labels") if self.labels is not None else None)
        names = confounder_names or (None if given_c else getattr(dataset, "confounder_names", None))
        self.confounder_names = (_names(self._conf, names, "confounders") if self._conf is not None
                                 else [str(v) for v in names] if names else None)
        names = env_names or (None if given_e else getattr(dataset, "env_names", None))
        if names is None and self._env is None:
            names = self.confounder_names  # the environment is the confounder
        self.env_names = (_names(self.envs, names, "envs") if self.envs is not None
                          else [str(v) for v in names] if names else None)
        self.mean, self.std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        self.has_masks = self.masks is not None or bool(getattr(dataset, "has_masks", False))

    def _known_labels(self) -> np.ndarray | None:
        d, n = self.dataset, len(self.dataset)
        for attr in ("labels", "targets"):
            v = getattr(d, attr, None)
            if v is not None and len(v) == n:
                return np.asarray(v.cpu() if isinstance(v, Tensor) else v).astype(np.int64)
        tensors = getattr(d, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) >= 2 and tensors[1].dim() == 1:
            return tensors[1].cpu().numpy().astype(np.int64)
        return None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.dataset[index]
        if isinstance(raw, dict):
            missing = [f for f in ("image", "label") if f not in raw]
            if missing:
                raise Ex2lError(f"dataset: its samples lack the field {missing[0]!r}; {_HOW[missing[0]]}")
            image, label, mask = raw["image"], raw["label"], raw.get("mask")
        elif isinstance(raw, (tuple, list)) and len(raw) >= 2:
            image, label, mask = raw[0], raw[1], None
        else:
            raise Ex2lError(f"dataset: sample {index} is a {type(raw).__name__}; expected a dict with 'image' and "
                            "'label' or a tuple (image, label)")
        if not isinstance(image, Tensor):
            raise Ex2lError(f"dataset: sample {index}'s image is a {type(image).__name__}; expected a float tensor "
                            "3xHxW (give the dataset a transform such as torchvision's ToTensor())")
        if self._conf is not None:
            conf = int(self._conf[index])
        elif isinstance(raw, dict) and "confounder" in raw:
            conf = int(raw["confounder"])
        else:
            raise Ex2lError(f"dataset: sample {index} lacks the field 'confounder'; {_HOW['confounder']}")
        if self._env is not None:
            env = int(self._env[index])
        else:
            env = int(raw["env"]) if isinstance(raw, dict) and "env" in raw and self._conf is None else conf
        sample = {"image": image.float(), "label": int(label), "confounder": conf, "env": env, "index": int(index)}
        if self.masks is not None:
            mask = torch.as_tensor(np.asarray(self.masks[index]) > 0, dtype=torch.float32)
        if mask is not None:
            sample["mask"] = mask.reshape(1, *mask.shape[-2:]).float()
        return sample


def require_fields(dataset: Any, fields: Sequence[str] = FIELDS) -> None:
    """Raise one clear error when the first sample of ``dataset`` is not a dict carrying ``fields``."""
    if len(dataset) == 0:
        raise Ex2lError("dataset: it is empty; expected at least one sample")
    sample = dataset[0]
    if not isinstance(sample, dict):
        raise Ex2lError(
            f"dataset: its samples are {type(sample).__name__}s such as (image, label), which lack the field "
            f"'confounder' (the audit reads dicts with {', '.join(FIELDS)}); {_HOW['confounder']}"
        )
    for f in fields:
        if f not in sample:
            raise Ex2lError(f"dataset: its samples lack the field {f!r} (they have {', '.join(sample)}); "
                            f"{_HOW.get(f, 'add it')}")


def as_audit_dataset(dataset: Any, *, confounders: Any = None, envs: Any = None) -> Any:
    """``dataset`` itself when its samples are complete dicts and nothing is overridden, else an
    :class:`AuditDataset` (or the one clear error of :func:`require_fields`)."""
    if confounders is None and envs is None:
        sample = dataset[0] if len(dataset) else None
        if isinstance(sample, dict) and all(f in sample for f in FIELDS):
            return dataset
        if not (isinstance(sample, dict) and "confounder" in sample) and getattr(dataset, "confounders", None) is None:
            require_fields(dataset)
    return AuditDataset(dataset, confounders=confounders, envs=envs)


# ---- files --------------------------------------------------------------------------------------------------------
def _read_mask(path: str, size: int) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            m = im.convert("L").resize((size, size), Image.NEAREST)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read mask {path!r} ({exc}); expected a PNG whose non-zero pixels mark the object") \
            from exc
    return torch.from_numpy(np.asarray(m) > 127).float()[None]


def _imagefolder_labels(root: Path, csv_path: Path, paths: list[str]) -> tuple[list[str], np.ndarray]:
    """Class names and the label of each listed path of an ImageFolder tree (DIR/<class>/<image>); DataError
    when an image of the tree has no row or a row no image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        label_names, class_to_idx = find_classes(str(root))
    except FileNotFoundError as exc:
        raise DataError(f"--data {str(root)!r}: no class folders ({exc}); expected DIR/<class>/<image>"
                        " or a CSV with a label column") from exc
    files = {os.path.normpath(p): y for p, y in make_dataset(str(root), class_to_idx, IMG_EXTENSIONS)}
    rows = {os.path.normpath(p): i for i, p in enumerate(paths)}
    unlisted = sorted(set(files) - set(rows))
    if unlisted:
        raise DataError(f"image {unlisted[0]!r} of the ImageFolder tree has no row in {str(csv_path)!r} "
                        f"({len(unlisted)} such); expected a row 'path, confounder' for every image")
    orphans = sorted(set(rows) - set(files))
    if orphans:
        raise DataError(f"CSV file {str(csv_path)!r} lists {orphans[0]!r}, which is not an image of a class "
                        f"folder of {str(root)!r} ({len(orphans)} such)")
    return list(label_names), np.asarray([files[os.path.normpath(p)] for p in paths], dtype=np.int64)


def _scan_class_folders(root: Path) -> tuple[list[str], pd.DataFrame]:
    """Class names and a table (``path``, ``label``) of a bare ``DIR/<class>/<image>`` tree (no CSV); DataError
    naming the folder or file for no class folder, a single class, an empty class folder or a non-image file.
    Hidden files (``.name``) are ignored, as are files directly in ``root``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"--data {str(root)!r}: no class folders and no CSV ({str(root / 'metadata.csv')!r} does not "
                        "exist); expected DIR/<class>/<image> or --csv FILE")
    if len(classes) == 1:
        raise DataError(f"--data {str(root)!r}: one class folder ({classes[0]!r}); expected at least two class "
                        "folders DIR/<class>/<image> (a classifier's audit compares classes)")
    paths, labels = [], []
    for y, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DataError(f"class folder {str(root / name)!r} is empty; expected at least one image in every class "
                            f"folder of {str(root)!r}")
        other = [f for f in files if not f.name.lower().endswith(IMG_EXTENSIONS)]
        if other:
            raise DataError(f"file {str(other[0])!r} is not an image ({len(other)} such in {str(root / name)!r}); "
                            f"expected only image files ({', '.join(IMG_EXTENSIONS)}) in the class folders")
        paths += [str(f) for f in files]
        labels += [y] * len(files)
    return classes, pd.DataFrame({"path": paths, "label": np.asarray(labels, dtype=np.int64)})


class FolderDataset(ImageFileDataset):
    """Images on disk plus a CSV, as ``ex2l audit --data DIR --csv FILE`` reads them; images in [0, 1].

    Three layouts:

    * **bare class folders**: ``DIR/<class>/<image>`` and no CSV (``csv`` None and no ``DIR/metadata.csv``): the
      label is the class folder (sorted), and there is no confounder (``has_confounders`` False: the audit groups
      by its discovered slices instead, :mod:`analysis.checks.slices`);
    * **CSV folder**: columns ``path, label[, confounder][, env][, mask][, split]`` (the ``csv`` dataset's layout,
      plus an optional mask; without ``confounder``, ``has_confounders`` is False);
    * **ImageFolder tree**: ``DIR/<class>/<image>`` (torchvision's ``ImageFolder``: the label is the class
      folder, classes in sorted order) and a CSV with ``path, confounder[, env][, mask][, split]`` giving each
      file's confounder. Every image of the tree must have a row, and every row an image.

    ``path`` and ``mask`` are relative to ``root`` (or absolute); a mask is an image whose non-zero pixels mark
    the object. The CSV is read by :func:`ex2l_xai.data.table.read_image_table`, with the training ``csv``
    dataset's rules: ``label``, ``confounder`` and ``env`` are integers or names (their sorted distinct values
    become ids 0, 1, ...); without ``env``, ``env`` = ``confounder``; ``split`` values are train, val (valid,
    validation), test or 0/1/2, any other value an error naming it. With a ``split`` column, ``split`` selects
    its rows; without one, every row is audited.
    """

    name = "folder"
    splits = ("train", "val", "test", "all")

    def __init__(self, root: str | os.PathLike[str], csv: str | os.PathLike[str] | None = None, *,
                 split: str = "all", image_size: int = 224, skip_unreadable: bool = False) -> None:
        root_path = Path(root).expanduser().absolute()  # a relative DIR: from the working directory, once
        if not root_path.is_dir():
            raise DataError(f"--data {str(root_path)!r} is not a folder; expected the images' root folder")
        csv_path = resolve_csv(root_path, csv)
        if csv is None and not csv_path.is_file():
            self._init_bare(root_path, split, image_size, skip_unreadable)
            return
        read = read_image_table(csv_path, root_path, require_label=False, require_confounder=False,
                                path_columns=("mask",),
                                what="columns path, [label,] [confounder][, env][, mask][, split]")
        rows = read.rows.copy()
        if read.label_names is not None:
            self.layout, label_names = "csv", read.label_names
        else:
            self.layout = "imagefolder"
            label_names, labels = _imagefolder_labels(root_path, csv_path, rows["path"].tolist())
            rows.insert(1, "label", labels)
        if "mask" in rows.columns:
            missing = [p for p in rows["mask"] if not os.path.isfile(p)]
            if missing:
                raise DataError(f"mask file {missing[0]!r} listed in {str(csv_path)!r} does not exist "
                                f"({len(missing)} missing); expected an image whose non-zero pixels mark the object")
        if split != "all":
            if not read.has_split:
                raise DataError(f"split {split!r}: CSV file {str(csv_path)!r} has no 'split' column; audit every "
                                "row (split 'all') or add the column")
            rows = rows[rows["split"] == split]
        table = rows.drop(columns="split", errors="ignore")
        conf_names, env_names = read.confounder_names, read.env_names
        table, _ = check_missing_files(table, skip_unreadable, str(csv_path))
        self.root, self.csv, self.image_size = str(root_path), str(csv_path), int(image_size)
        self.has_masks = "mask" in table.columns
        self.has_confounders = read.has_confounder
        super().__init__("test" if split == "all" else split, table, label_names, conf_names, env_names,
                         make_transform(self.image_size, normalize=False), skip_unreadable, normalize=False)
        self.split = split
        self._masks = self.table["mask"].tolist() if self.has_masks else None

    def _init_bare(self, root: Path, split: str, image_size: int, skip_unreadable: bool) -> None:
        """The bare ``DIR/<class>/<image>`` layout: labels from the folders, no confounder, no masks."""
        if split != "all":
            raise DataError(f"split {split!r}: --data {str(root)!r} has no CSV, hence no 'split' column; audit every "
                            "image (split 'all') or give a CSV with a split column")
        self.layout = "bare"
        label_names, table = _scan_class_folders(root)
        table = table.assign(confounder=0, env=0)
        self.root, self.csv, self.image_size = str(root), None, int(image_size)
        self.has_masks, self.has_confounders = False, False
        super().__init__("test", table, label_names, ["none"], ["none"],
                         make_transform(self.image_size, normalize=False), skip_unreadable, normalize=False)
        if len(self.table) == 0:
            raise DataError(f"--data {str(root)!r}: every image was unreadable and skipped; nothing to audit")
        self.split = split
        self._masks = None

    def load(self, index: int) -> tuple[Tensor, Tensor | None]:
        """The image (3xSxS in [0, 1]) and, with a mask column, its mask (1xSxS, 1 = object)."""
        image, _ = super().load(index)
        if self._masks is None:
            return image, None
        return image, _read_mask(self._masks[index], self.image_size)


class MaskedDataset(torch.utils.data.Dataset):
    """``dataset``'s samples with a ``mask`` read from ``mask_paths[i]`` (resized to the image, nearest
    neighbour; non-zero = object). Every attribute of ``dataset`` (names, labels, mean/std) is passed through."""

    has_masks = True

    def __init__(self, dataset: Any, mask_paths: Sequence[str]) -> None:
        if len(mask_paths) != len(dataset):
            raise Ex2lError(f"mask_paths: expected one path per sample ({len(dataset)}), got {len(mask_paths)}")
        missing = [p for p in mask_paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"mask file {missing[0]!r} does not exist ({len(missing)} missing)")
        self.dataset, self.mask_paths = dataset, list(mask_paths)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "mask_paths"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["mask"] = _read_mask(self.mask_paths[index], int(sample["image"].shape[-1]))
        return sample


def waterbirds_masks(dataset: Any, segmentations: str | os.PathLike[str]) -> MaskedDataset:
    """Waterbirds with the CUB-200-2011 segmentations as object masks: the mask of ``<root>/<class>/<name>.jpg`` is
    ``<segmentations>/<class>/<name>.png`` (Waterbirds pastes each CUB bird, at its own size, onto a background, so
    the bird's segmentation is the object's mask)."""
    seg = Path(segmentations).expanduser()
    if not seg.is_dir():
        raise DataError(f"segmentations {str(seg)!r} is not a folder; expected CUB-200-2011's segmentations/")
    root = Path(dataset.root)
    paths = [str((seg / Path(p).relative_to(root)).with_suffix(".png")) for p in dataset.table["path"]]
    return MaskedDataset(dataset, paths)


def csv_masks(dataset: Any) -> Any:
    """A ``csv`` dataset (:class:`ex2l_xai.data.CsvDataset`) with the object masks its CSV names in an optional
    ``mask`` column (paths relative to the dataset's root, or absolute), as a :class:`MaskedDataset`; the dataset
    itself when its CSV has no such column."""
    import pandas as pd

    path = getattr(dataset, "csv", None)
    if path is None or not os.path.isfile(path):
        return dataset
    df = pd.read_csv(path)
    df.columns = [str(c).strip() for c in df.columns]
    if "mask" not in df.columns:
        return dataset
    root = Path(dataset.root)

    def full(p: Any) -> str:
        return os.path.normpath(str(p) if Path(str(p)).is_absolute() else str(root / str(p)))

    by_image = {full(p): full(m) for p, m in zip(df["path"], df["mask"], strict=True)}
    return MaskedDataset(dataset, [by_image[os.path.normpath(p)] for p in dataset.table["path"]])

