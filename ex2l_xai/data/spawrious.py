"""Spawrious from its released folder layout ``<root>/spawrious224/{0,1}/<background>/<class>/*.png``.

File selection (``sorted`` file names; the reference code uses unsorted ``os.listdir``):

- Training cells come from :func:`ex2l_xai.data.challenges.train_plan` with ``total`` images per class and
  environment. O2O env 1 reads folder ``0``, env 2 folder ``1``; M2M reads folder ``0``.
- ``total`` is the largest integer ``<= min(3168, per_group)`` for which every training cell fits in its
  folder (O2O cells keep the reference proportions: ``int(0.97 * total)`` / ``int(0.87 * total)`` on the
  class's own background, the rest on the filler). With the full download this is the reference 3168.
- Each folder hands out its files in sorted order, first to env 1, then env 2, then test, so no file path is
  ever used twice (train, val and test never share a file). Test reads, per class, every file left in its test
  folders (O2O: ``0/t_i`` and ``1/t_i``; M2M: ``0/t_a`` and ``0/t_b``), or ``test_per_group`` images split
  evenly over those folders.
- Validation is carved from the training cells with ``seed`` (Spawrious ships no validation split).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from ex2l_xai.data.base import (
    IMAGE_EXTENSIONS,
    ImageFileDataset,
    carve_validation,
    check_root,
    make_transform,
)
from ex2l_xai.data.challenges import (
    BACKGROUNDS,
    CLASSES,
    ENV_NAMES,
    REFERENCE_TOTAL,
    TEST_ENV,
    Challenge,
    get_challenge,
    split_evenly,
    test_sources,
    train_plan,
)
from ex2l_xai.errors import DataError

log = logging.getLogger(__name__)


def list_images(folder: Path) -> list[str]:
    """Sorted image file names (.png, .jpg, .jpeg, any case) in ``folder``."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _folder(base: Path, folder: int, background: str, cls: str, challenge: Challenge, role: str) -> Path:
    path = base / str(folder) / background / cls
    if not path.is_dir():
        raise DataError(
            f"Spawrious folder {str(path)!r} is missing; expected images of class {cls!r} on "
            f"background {background!r} ({challenge.name}, {role})"
        )
    return path


def choose_total(challenge: Challenge, available: dict[tuple[int, str, str], int], cap: int) -> int:
    """Largest ``total <= cap`` whose training cells all fit in ``available[(folder, background, class)]``.

    Every cell's count grows with ``total``, so feasibility is monotone and a bisection finds it; 0 if none
    fits.
    """

    def fits(total: int) -> bool:
        need: dict[tuple[int, str, str], int] = {}
        for c in train_plan(challenge, total):
            key = (c.folder, BACKGROUNDS[c.confounder], CLASSES[c.label])
            need[key] = need.get(key, 0) + c.count
        return all(n <= available[k] for k, n in need.items())

    lo, hi = 0, cap  # fits(lo) holds (trivially for 0); find the largest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


class SpawriousDataset(ImageFileDataset):
    """The released Spawrious benchmark (see the module docstring for the file-selection rule).

    Parameters
    ----------
    split : str
        ``train``, ``val`` or ``test``.
    root : str
        Folder that contains ``spawrious224/``.
    challenge : str
        One of the six challenges.
    image_size : int
        Images are resized to ``image_size`` x ``image_size`` (default 224).
    per_group : int or None
        Cap on images per class and training environment (default: the reference 3168).
    test_per_group : int or None
        Cap on test images per class (default: every remaining file).
    seed, val_fraction : int, float
        Validation carve from the training cells.
    augment : bool
        Training split only: random flip, colour jitter and grayscale as in Spawrious.
    skip_unreadable : bool
        Drop unreadable images at construction (logged, counted in ``n_skipped``).
    transform : callable or None
        Replaces the default transform (PIL image -> float tensor).
    """

    name = "spawrious"

    def __init__(
        self,
        split: str = "train",
        root: str | None = None,
        challenge: str = "m2m_hard",
        image_size: int = 224,
        per_group: int | None = None,
        test_per_group: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.2,
        augment: bool = False,
        skip_unreadable: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.challenge = ch = get_challenge(challenge)
        root_path = check_root(
            root, "spawrious", "a folder that contains spawrious224/{0,1}/<background>/<class>/"
        )
        base = root_path / "spawrious224"
        if not base.is_dir():
            raise DataError(
                f"folder {str(base)!r} is missing; expected the extracted Spawrious download "
                "spawrious224/{0,1}/<background>/<class>/*.png under root"
            )
        if split not in self.splits:
            raise DataError(
                f"unknown split {split!r} for dataset 'spawrious'; expected one of {', '.join(self.splits)}"
            )
        cap = REFERENCE_TOTAL if per_group is None else int(per_group)
        if cap < 1:
            raise DataError(f"option per_group={per_group!r}; expected an integer >= 1")
        files = _challenge_files(base, ch)
        self.total = total = _images_per_cell(base, ch, files, cap)
        table, n_train = _select_rows(base, ch, files, total, test_per_group)
        if split == "test":
            table = table.iloc[n_train:]
        else:
            train_pool = table.iloc[:n_train].reset_index(drop=True)
            kept, carved = carve_validation(train_pool, float(val_fraction), int(seed))
            table = train_pool.iloc[kept if split == "train" else carved]
        self.root = str(root_path)
        self.image_size = int(image_size)
        if transform is None:
            transform = make_transform(self.image_size, augment=bool(augment) and split == "train")
        super().__init__(split, table, CLASSES, BACKGROUNDS, ENV_NAMES, transform, skip_unreadable)

    def _empty_hint(self) -> str:
        return f" (challenge {self.challenge.name} under {self.root!r})"


FileKey = tuple[int, str, str]
"""A Spawrious folder: (top folder 0/1, background, class)."""


def _challenge_files(base: Path, ch: Challenge) -> dict[FileKey, list[str]]:
    """Every folder challenge ``ch`` reads (its training cells, then its test sources), with its sorted files;
    DataError for a missing or empty folder."""
    files: dict[FileKey, list[str]] = {}
    for c in train_plan(ch, REFERENCE_TOTAL):
        b, cls = BACKGROUNDS[c.confounder], CLASSES[c.label]
        role = f"training env {c.env + 1}" + (" filler" if b == ch.filler else "")
        files.setdefault((c.folder, b, cls), list_images(_folder(base, c.folder, b, cls, ch, role)))
    for label, sources in test_sources(ch).items():
        for folder, b in sources:
            key = (folder, b, CLASSES[label])
            if key not in files:
                files[key] = list_images(_folder(base, folder, b, CLASSES[label], ch, "test"))
    for (folder, b, cls), names in files.items():
        if not names:
            raise DataError(
                f"Spawrious folder {str(base / str(folder) / b / cls)!r} holds no images; expected "
                f"{', '.join(IMAGE_EXTENSIONS)} files"
            )
    return files


def _images_per_cell(base: Path, ch: Challenge, files: dict[FileKey, list[str]], cap: int) -> int:
    """Images per class and training environment: ``cap``, or fewer where the folders hold fewer."""
    total = choose_total(ch, {k: len(v) for k, v in files.items()}, cap)
    if total == 0:
        raise DataError(
            f"Spawrious folders under {str(base)!r} hold too few images for {ch.name}; expected at "
            "least one image per training cell"
        )
    if total < cap:
        log.info("spawrious %s: %d images per class and training env (reference %d)", ch.name, total,
                 REFERENCE_TOTAL)
    return total


def _select_rows(
    base: Path, ch: Challenge, files: dict[FileKey, list[str]], total: int, test_per_group: int | None
) -> tuple[pd.DataFrame, int]:
    """The challenge's rows (``path, label, confounder, env``), files handed out in sorted order: env 1, env 2,
    then test; and the number of training rows (they come first)."""
    cursor = {k: 0 for k in files}
    rows: list[dict[str, object]] = []

    def take(key: FileKey, n: int | None, label: int, env: int) -> None:
        start = cursor[key]
        stop = len(files[key]) if n is None else min(len(files[key]), start + n)
        folder, b, cls = key
        for name in files[key][start:stop]:
            rows.append({"path": str(base / str(folder) / b / cls / name), "label": label,
                         "confounder": BACKGROUNDS.index(b), "env": env})
        cursor[key] = stop

    for c in train_plan(ch, total):
        take((c.folder, BACKGROUNDS[c.confounder], CLASSES[c.label]), c.count, c.label, c.env)
    n_train = len(rows)
    for label, sources in test_sources(ch).items():
        caps = [None] * len(sources) if test_per_group is None else split_evenly(int(test_per_group), len(sources))
        for (folder, b), n in zip(sources, caps, strict=True):
            take((folder, b, CLASSES[label]), n, label, TEST_ENV)
    table = pd.DataFrame(rows, columns=["path", "label", "confounder", "env"])
    if table["path"].duplicated().any():  # pragma: no cover - guaranteed by the cursor
        raise DataError("Spawrious file selection used a file twice")
    return table, n_train
