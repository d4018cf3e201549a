"""Common base of every dataset: dict samples with label, confounder, environment and index (docs/architecture.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from ex2l_xai.errors import DataError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


class GroupDataset(Dataset):
    """A split of a dataset whose samples carry a label, a confounder and an environment.

    Subclasses fill ``table`` (one row per sample) and implement :meth:`load`. ``__getitem__`` returns
    ``{"image": float 3xHxW, "label": int, "confounder": int, "env": int, "index": int}`` plus ``"mask"``
    (float 1xHxW, 1 = object) when the dataset has masks. ``index`` is the sample's position in this split.

    Attributes
    ----------
    name : str
        Registry name of the dataset.
    split : str
        The split this object holds.
    label_names, confounder_names, env_names : list of str
        Names of the integer ids.
    groups : list of str
        ``"<label>/<confounder>"`` for group id ``label * n_confounders + confounder``.
    table : pandas.DataFrame
        Columns ``label``, ``confounder``, ``env``, ``group`` (and ``path`` for file-backed datasets).
    has_masks : bool
        Whether samples carry a ``mask``.
    mean, std : tuple of float or None
        The normalisation applied to images (None: images are in [0, 1]).
    """

    name: str = "base"
    splits: tuple[str, ...] = SPLITS
    has_masks: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __init__(
        self,
        split: str,
        table: pd.DataFrame,
        label_names: Sequence[str],
        confounder_names: Sequence[str],
        env_names: Sequence[str],
    ) -> None:
        if split not in self.splits:
            raise DataError(
                f"unknown split {split!r} for dataset {self.name!r}; expected one of {', '.join(self.splits)}"
            )
        self.split = split
        self.label_names = [str(n) for n in label_names]
        self.confounder_names = [str(n) for n in confounder_names]
        self.env_names = [str(n) for n in env_names]
        table = table.reset_index(drop=True).copy()
        for col, names in (
            ("label", self.label_names),
            ("confounder", self.confounder_names),
            ("env", self.env_names),
        ):
            if col not in table.columns:
                raise DataError(f"dataset {self.name!r} table lacks column {col!r}")
            table[col] = table[col].astype(np.int64)
            bad = table[(table[col] < 0) | (table[col] >= len(names))]
            if len(bad):
                raise DataError(
                    f"dataset {self.name!r} column {col!r} has value {int(bad[col].iloc[0])}; "
                    f"expected an id in [0, {len(names)})"
                )
        table["group"] = table["label"] * len(self.confounder_names) + table["confounder"]
        self.table = table
        self._labels = table["label"].to_numpy()
        self._confounders = table["confounder"].to_numpy()
        self._envs = table["env"].to_numpy()
        if len(table) == 0:
            raise DataError(
                f"split {split!r} of dataset {self.name!r} is empty; expected at least one sample"
                f"{self._empty_hint()}"
            )

    def _empty_hint(self) -> str:
        return ""

    # ---- names and counts -------------------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def n_confounders(self) -> int:
        """Number of confounder values."""
        return len(self.confounder_names)

    @property
    def n_envs(self) -> int:
        """Number of environments."""
        return len(self.env_names)

    @property
    def n_groups(self) -> int:
        """Number of (label, confounder) groups, present or not."""
        return self.n_labels * self.n_confounders

    @property
    def groups(self) -> list[str]:
        """Group names ``"<label>/<confounder>"`` indexed by group id."""
        return [f"{lab}/{conf}" for lab in self.label_names for conf in self.confounder_names]

    @property
    def labels(self) -> np.ndarray:
        """Label id of every sample (int64 array)."""
        return self._labels

    @property
    def confounders(self) -> np.ndarray:
        """Confounder id of every sample (int64 array)."""
        return self._confounders

    @property
    def envs(self) -> np.ndarray:
        """Environment id of every sample (int64 array)."""
        return self._envs

    @property
    def group_ids(self) -> np.ndarray:
        """Group id of every sample (int64 array)."""
        return self.table["group"].to_numpy()

    def group_counts(self) -> np.ndarray:
        """Samples per group id (length ``n_groups``; 0 for groups with no samples)."""
        return np.bincount(self.group_ids, minlength=self.n_groups)

    def count_table(self) -> pd.DataFrame:
        """Counts per (label, confounder, env) present, with names: columns label, confounder, env, n."""
        counts = self.table.groupby(["label", "confounder", "env"]).size().reset_index(name="n")
        counts["label"] = [self.label_names[i] for i in counts["label"]]
        counts["confounder"] = [self.confounder_names[i] for i in counts["confounder"]]
        counts["env"] = [self.env_names[i] for i in counts["env"]]
        return counts

    # ---- samples -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(image 3xHxW float, mask 1xHxW float or None)`` of sample ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(
                f"index {index} out of range for split {self.split!r} of {self.name!r} ({n} samples)"
            )
        image, mask = self.load(index)
        sample: dict[str, Any] = {
            "image": image,
            "label": int(self._labels[index]),
            "confounder": int(self._confounders[index]),
            "env": int(self._envs[index]),
            "index": index,
        }
        if mask is not None:
            sample["mask"] = mask
        return sample

    def __repr__(self) -> str:
        present = int((self.group_counts() > 0).sum())
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"labels={self.n_labels}, confounders={self.n_confounders}, envs={self.n_envs}, "
            f"groups_present={present}/{self.n_groups})"
        )


def carve_validation(
    table: pd.DataFrame,
    fraction: float,
    seed: int,
    stream: int = 7919,
    strata: Sequence[str] = ("env", "label", "confounder"),
) -> tuple[np.ndarray, np.ndarray]:
    """Split row positions of ``table`` into (kept, carved), stratified.

    In each stratum (by default each (env, label, confounder) cell) ``round(fraction * n)`` rows, chosen by a
    permutation from ``numpy.random.default_rng([seed, stream])``, go to the carved part.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted row positions kept and carved.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation/test fraction {fraction!r}; expected a number in [0, 1)")
    if int(seed) < 0:
        raise DataError(f"seed={seed!r}; expected an integer >= 0")
    rng = np.random.default_rng([int(seed), int(stream)])
    carved: list[np.ndarray] = []
    if len(table):
        keys = table[list(strata)].to_numpy()
        order = np.lexsort(keys.T[::-1])
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, np.any(sorted_keys[1:] != sorted_keys[:-1], axis=1)])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends, strict=True):
            rows = np.sort(order[s:e])  # positions of this stratum in table order
            k = int(fraction * len(rows) + 0.5)
            if k:
                carved.append(rows[rng.permutation(len(rows))[:k]])
    carved_idx = np.sort(np.concatenate(carved)) if carved else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(table), dtype=bool)
    mask[carved_idx] = False
    return np.flatnonzero(mask), carved_idx


def make_transform(
    image_size: int, augment: bool = False, normalize: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """Transform of real images: resize to ``image_size`` square, optional augmentation; images in [0, 1]
    (``normalize=True`` adds ImageNet's normalisation, for models that do not normalise their input; the
    toolkit's own backbones do: :mod:`ex2l_xai.backbones`).

    Augmentation (training only) follows Spawrious: horizontal flip, ``ColorJitter(0.3, 0.3, 0.3, 0.3)``,
    random grayscale.
    """
    from torchvision import transforms as T

    steps: list[Any] = [T.Resize((int(image_size), int(image_size)))]
    if augment:
        steps += [T.RandomHorizontalFlip(), T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale()]
    steps.append(T.ToTensor())
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def check_root(root: str | os.PathLike[str] | None, dataset: str, expected: str) -> Path:
    """Return ``root`` as a Path, or raise DataError if it is missing or not a folder."""
    if root is None or str(root) == "":
        raise DataError(f"dataset {dataset!r} needs option 'root': {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset root {str(path)!r} does not exist or is not a folder; expected {expected}")
    return path


def read_image(path: str) -> Image.Image:
    """Open and fully decode an RGB image, or raise DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises OSError for truncated/unidentified files
        raise DataError(
            f"cannot read image {path!r} ({e}); expected a readable PNG or JPEG file "
            f"(to skip such files: `ex2l audit --skip-unreadable`, `ex2l train --set data.options.skip_unreadable=true`, "
            "or skip_unreadable=True in Python)"
        ) from e


class ImageFileDataset(GroupDataset):
    """A :class:`GroupDataset` whose images are files listed in ``table["path"]``.

    Parameters
    ----------
    transform : callable
        PIL image -> float tensor 3xHxW.
    skip_unreadable : bool
        If True, every image is decoded once at construction; files that fail are dropped, their count logged
        and kept in ``n_skipped``. If False (default), a bad file raises :class:`DataError` when it is loaded.
    """

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __init__(
        self,
        split: str,
        table: pd.DataFrame,
        label_names: Sequence[str],
        confounder_names: Sequence[str],
        env_names: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_unreadable: bool = False,
        normalize: bool = False,
    ) -> None:
        self.n_skipped = 0
        if normalize:  # the images are ImageNet-normalised: analysis undoes it for display
            self.mean = IMAGENET_MEAN
            self.std = IMAGENET_STD
        table = table.reset_index(drop=True)
        if skip_unreadable and len(table):
            ok = np.ones(len(table), dtype=bool)
            for i, p in enumerate(table["path"]):
                try:
                    read_image(p)
                except DataError as e:
                    log.debug("skipping %s", e)
                    ok[i] = False
            self.n_skipped = int((~ok).sum())
            if self.n_skipped:
                log.warning(
                    "%s/%s: skipped %d unreadable image(s) of %d",
                    self.name,
                    split,
                    self.n_skipped,
                    len(table),
                )
            table = table[ok]
        self.transform = transform
        super().__init__(split, table, label_names, confounder_names, env_names)
        self._paths = self.table["path"].tolist()

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read, transform and return the image of sample ``index`` (no mask)."""
        image = self.transform(read_image(self._paths[index]))
        if not isinstance(image, torch.Tensor):
            raise DataError(
                f"transform of dataset {self.name!r} returned {type(image).__name__}; expected a "
                "float tensor 3xHxW"
            )
        return image.float(), None


def check_missing_files(table: pd.DataFrame, skip: bool, where: str) -> tuple[pd.DataFrame, int]:
    """Drop (``skip``) or raise on rows whose ``path`` does not exist; returns (table, n_missing)."""
    exists = np.fromiter((os.path.isfile(p) for p in table["path"]), dtype=bool, count=len(table))
    n_missing = int((~exists).sum())
    if n_missing and not skip:
        first = table["path"][~exists].iloc[0]
        raise DataError(
            f"image file {first!r} listed in {where} does not exist ({n_missing} missing); expected "
            "an existing image file (to skip missing files: `ex2l audit --skip-unreadable`, "
            "`ex2l train --set data.options.skip_unreadable=true`, or skip_unreadable=True in Python)"
        )
    if n_missing:
        log.warning("skipped %d missing image file(s) listed in %s", n_missing, where)
    return table[exists], n_missing


def read_csv(path: str | os.PathLike[str], required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a CSV and check it has the ``required`` columns, or raise DataError naming the file and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {str(path)!r} does not exist; expected {what}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"cannot parse CSV file {str(path)!r} ({e}); expected {what}") from e
    df.columns = [str(c).strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            raise DataError(
                f"CSV file {str(path)!r} lacks column {col!r}; expected columns "
                f"{', '.join(required)} ({what}); found {', '.join(map(str, df.columns)) or 'none'}"
            )
    return df


def int_column(
    df: pd.DataFrame, col: str, path: str | os.PathLike[str], allowed: Sequence[int] | None = None
) -> np.ndarray:
    """Column ``col`` as int64, or DataError naming the file, column, row and value that is not an integer.

    ``row`` in messages is the 1-based data row (the header is row 0). ``allowed`` restricts the values.
    """
    values = df[col].tolist()
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            f = float(str(v).strip())
            ok = f == int(f)
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise DataError(
                f"CSV file {str(path)!r} column {col!r} row {i + 1} has value {v!r}; expected an integer"
            )
        out[i] = int(f)
        if allowed is not None and out[i] not in allowed:
            raise DataError(
                f"CSV file {str(path)!r} column {col!r} row {i + 1} has value {v!r}; expected one of "
                f"{', '.join(map(str, allowed))}"
            )
    return out
