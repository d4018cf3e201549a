"""Waterbirds (Sagawa et al. 2020) from its released folder: ``<root>/metadata.csv`` and the image folders.

``metadata.csv`` columns used: ``img_filename`` (path relative to root), ``y`` (0 landbird, 1 waterbird),
``split`` (0 train, 1 val, 2 test), ``place`` (0 land, 1 water). The confounder is ``place``. Waterbirds has
no environments of its own, so ``env`` = ``place`` (env_names ``land``, ``water``): MMD across environments
then measures how much the latent space separates backgrounds.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from PIL import Image

from ex2l_xai.data.base import (
    ImageFileDataset,
    check_missing_files,
    check_root,
    int_column,
    make_transform,
    read_csv,
)
from ex2l_xai.errors import DataError

WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
LABEL_NAMES = ("landbird", "waterbird")
PLACE_NAMES = ("land", "water")


class WaterbirdsDataset(ImageFileDataset):
    """Waterbirds from ``root`` (the folder holding ``metadata.csv``).

    Parameters
    ----------
    split : str
        ``train``, ``val`` or ``test`` (metadata split 0, 1, 2).
    root : str
        Folder with ``metadata.csv`` and the image folders it names.
    image_size : int
        Images are resized to ``image_size`` x ``image_size`` (default 224), in [0, 1].
    augment : bool
        Training split only: random flip, colour jitter and grayscale.
    skip_unreadable : bool
        Drop missing or unreadable images at construction (logged, counted in ``n_skipped``).
    transform : callable or None
        Replaces the default transform.
    """

    name = "waterbirds"

    def __init__(
        self,
        split: str = "train",
        root: str | None = None,
        image_size: int = 224,
        augment: bool = False,
        skip_unreadable: bool = False,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        root_path = check_root(
            root, "waterbirds", "the Waterbirds folder holding metadata.csv and the images"
        )
        if split not in self.splits:
            raise DataError(
                f"unknown split {split!r} for dataset 'waterbirds'; expected one of {', '.join(self.splits)}"
            )
        csv = root_path / "metadata.csv"
        self.root = str(root_path)
        self.csv = str(csv)
        df = read_csv(csv, ["img_filename", "y", "split", "place"], "the Waterbirds metadata")
        splits = int_column(df, "split", csv, allowed=(0, 1, 2))
        table = pd.DataFrame(
            {
                "path": [str(root_path / str(f)) for f in df["img_filename"]],
                "label": int_column(df, "y", csv, allowed=(0, 1)),
                "confounder": int_column(df, "place", csv, allowed=(0, 1)),
            }
        )
        table["env"] = table["confounder"]
        table = table[splits == WATERBIRDS_SPLITS[split]]
        table, n_missing = check_missing_files(table, skip_unreadable, str(csv))
        self.image_size = int(image_size)
        if transform is None:
            transform = make_transform(self.image_size, augment=bool(augment) and split == "train")
        super().__init__(split, table, LABEL_NAMES, PLACE_NAMES, PLACE_NAMES, transform, skip_unreadable)
        self.n_skipped += n_missing

    def _empty_hint(self) -> str:
        return f" ({self.csv!r} has no readable rows with split == {WATERBIRDS_SPLITS[self.split]})"
