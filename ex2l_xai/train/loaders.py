"""The one place that builds the trainer's data loaders (and their samplers) and moves batches to the device.

A training epoch shuffles with a generator seeded from ``(seed, epoch)``; an algorithm may name the samples an
epoch iterates (:meth:`~ex2l_xai.algorithms.Algorithm.train_indices`, repeats allowed), which are then shuffled
with the same generator. Evaluation loaders keep the dataset's order, or iterate a given subset of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler

from ex2l_xai.config import Config
from ex2l_xai.train.rng import worker_init

__all__ = ["eval_loader", "to_device", "train_loader"]


def _loader(config: Config, dataset: Any, device: torch.device, batch_size: int, **kwargs: Any) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=config.data.num_workers,
        worker_init_fn=worker_init if config.data.num_workers > 0 else None,
        pin_memory=device.type == "cuda",
        drop_last=False,
        **kwargs,
    )


def train_loader(
    config: Config, dataset: Any, *, seed: int, device: torch.device, indices: Sequence[int] | None = None
) -> DataLoader:
    """A shuffled loader of ``data.batch_size`` over ``dataset`` (or over ``indices`` of it), shuffled by a
    generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if indices is None:
        return _loader(config, dataset, device, config.data.batch_size, shuffle=True, generator=gen)
    sampler = SubsetRandomSampler([int(i) for i in indices], generator=gen)
    return _loader(config, dataset, device, config.data.batch_size, sampler=sampler)


def eval_loader(
    config: Config, dataset: Any, *, device: torch.device, indices: Sequence[int] | None = None
) -> DataLoader:
    """A loader of ``data.eval_batch_size`` over ``dataset`` (or ``indices`` of it) in order."""
    data = dataset if indices is None else Subset(dataset, [int(i) for i in indices])
    return _loader(config, data, device, config.data.eval_batch_size, shuffle=False)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (non-blocking from pinned memory on CUDA)."""
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in batch.items()}
