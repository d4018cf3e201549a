"""Builders of what a run is made of, from its :class:`~ex2l_xai.config.Config`: device, datasets, model,
algorithm, optimiser and learning-rate schedule. Training and loading a finished run use the same ones."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ex2l_xai.algorithms import Algorithm, TrainInfo, build_algorithm
from ex2l_xai.config import Config
from ex2l_xai.data import DATASETS, SPLITS, get_dataset
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import FrozenPrefixCache, TwoHeadNet

__all__ = [
    "EVAL_SPLITS",
    "CachedDataset",
    "build_datasets",
    "build_model",
    "build_optimizer",
    "build_run_algorithm",
    "build_scheduler",
    "build_split",
    "dataset_kwargs",
    "lr_factor",
    "resolve_device",
    "seed_everything",
    "train_info",
]

EVAL_SPLITS = ("val", "test", "oracle_val")
"""The splits evaluated after every evaluated epoch (those the dataset has)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- data ----------------------------------------------------------------------------------------------------
class CachedDataset(Dataset):
    """Every sample of ``dataset`` decoded once, kept in memory; other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.samples = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def dataset_kwargs(config: Config) -> dict[str, Any]:
    """Options passed to :func:`ex2l_xai.data.get_dataset` (``data.options`` plus ``data.root``)."""
    kwargs = dict(config.data.options)
    if config.data.root is not None:
        kwargs["root"] = config.data.root
    return kwargs


def _splits_of(config: Config) -> tuple[str, ...]:
    splits = getattr(DATASETS[config.data.name], "splits", SPLITS)
    return ("train", *[s for s in EVAL_SPLITS if s in splits])


def build_split(config: Config, split: str) -> Any:
    """Split ``split`` of the config's dataset, its confounders replaced where ``data.confounders`` covers it."""
    ds = get_dataset(config.data.name, split, **dataset_kwargs(config))
    if config.data.confounders is not None:
        from ex2l_xai.data.inferred import apply_confounders, read_confounders

        ds = apply_confounders(ds, read_confounders(config.data.confounders))
    return ds


def build_datasets(config: Config) -> dict[str, Any]:
    """``train``, ``val``, ``test`` (and ``oracle_val`` where the dataset has it), cached if ``data.cache``."""
    out: dict[str, Any] = {}
    for split in _splits_of(config):
        ds = build_split(config, split)
        out[split] = CachedDataset(ds) if config.data.cache else ds
    return out


def train_info(config: Config, train_set: Any) -> TrainInfo:
    """What the algorithm may know of the training split and the run (:class:`~ex2l_xai.algorithms.TrainInfo`)."""
    envs = np.asarray(train_set.envs)
    return TrainInfo(
        n_labels=int(train_set.n_labels),
        n_confounders=int(train_set.n_confounders),
        n_groups=int(train_set.n_groups),
        group_counts=[int(c) for c in train_set.group_counts()],
        n_samples=len(train_set),
        env_counts=[int(c) for c in np.bincount(envs, minlength=len(train_set.env_names))],
        env_names=list(train_set.env_names),
        seed=config.seed,
        epochs=config.train.epochs,
        lr=config.optim.lr,
        batch_size=config.data.batch_size,
        selection=config.train.selection,
        init_from=config.model.init_from,
    )


# ---- model and algorithm -------------------------------------------------------------------------------------
def build_model(
    config: Config,
    n_labels: int,
    n_confounders: int,
    *,
    conf_head: int | None = None,
    initial_weights: bool = True,
    prefix_cache: FrozenPrefixCache | None = None,
    image_size: int | None = None,
) -> TwoHeadNet:
    """The two-head network of ``config``, with a confounder head only if the algorithm needs one.

    Parameters
    ----------
    config : Config
    n_labels, n_confounders : int
        Classes and confounder values of the dataset.
    conf_head : int, optional
        Size of the confounder head regardless of the algorithm (0: none); what a saved ``best.pt`` says.
    initial_weights : bool
        Load the weights training starts from (``model.pretrained``, ``model.init_from``) and keep the frozen
        prefix's cache (``model.cache_frozen``); False for a network whose weights are loaded next.
    prefix_cache : FrozenPrefixCache, optional
        The cache of the frozen prefix with ``model.cache_frozen`` (default: the model's own).
    image_size : int, optional
        The images' size: a ``vit_tiny``'s position embeddings are made for it (default 224).
    """
    head = conf_head if conf_head is not None else (n_confounders if config.params().needs_confounder_head() else 0)
    m = config.model
    return TwoHeadNet(
        m.backbone,
        n_labels,
        head,
        architecture=m.architecture,  # type: ignore[arg-type]
        cam_layer=m.cam_layer,
        pretrained=m.pretrained if initial_weights else "none",
        width=m.width,
        freeze=m.freeze,
        cache_frozen=m.cache_frozen if initial_weights else False,
        init_from=m.init_from if initial_weights else None,
        prefix_cache=prefix_cache,
        image_size=int(image_size) if image_size else 224,
    )


def build_run_algorithm(
    config: Config, train_set: Any, device: torch.device, prefix_cache: FrozenPrefixCache | None = None
) -> Algorithm:
    """The run's model (seeded with ``config.seed``; ``prefix_cache``: see :func:`build_model`) inside its
    algorithm, on ``device``."""
    info = train_info(config, train_set)
    torch.manual_seed(config.seed)
    model = build_model(config, train_set.n_labels, train_set.n_confounders, prefix_cache=prefix_cache,
                        image_size=getattr(train_set, "image_size", None))
    return build_algorithm(config.algorithm_name, model, config.params(), info).to(device)


# ---- optimisation --------------------------------------------------------------------------------------------
def build_optimizer(config: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``optim`` section's optimiser over ``params``."""
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(config: Config, epoch: int, epochs: int | None = None) -> float:
    """Multiplier of the learning rate during epoch ``epoch`` (0-based) of a stage of ``epochs`` epochs
    (default ``train.epochs``): linear warm-up, then the schedule."""
    s, total = config.schedule, config.train.epochs if epochs is None else epochs
    if epoch < s.warmup_epochs:
        return (epoch + 1) / (s.warmup_epochs + 1)
    t = epoch - s.warmup_epochs
    if s.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / max(1, total - s.warmup_epochs)))
    if s.name == "step":
        return s.gamma ** (t // s.step_size)
    return 1.0


def build_scheduler(
    config: Config, optimizer: torch.optim.Optimizer, epochs: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``schedule`` section as a ``LambdaLR`` stepped once per epoch of a stage of ``epochs`` epochs."""

    def factor(epoch: int) -> float:
        return lr_factor(config, epoch, epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
