"""The one place that builds the trainer's data loaders (and their samplers) and moves batches to the device.

A training epoch shuffles with a generator seeded from ``(seed, epoch)``; an algorithm may name the samples an
epoch iterates (:meth:`~ex2l_xai.algorithms.Algorithm.train_indices`, repeats allowed), which are then shuffled
with the same generator. Evaluation loaders keep the dataset's order, or iterate a given subset of it.

Under DDP (``world`` > 1) ``data.batch_size`` is the GLOBAL batch: each rank loads ``batch_size / world`` samples
through a :class:`RankShard` sampler. It wraps the very sampler a one-process epoch uses (``RandomSampler`` or
``SubsetRandomSampler`` on a generator seeded alike, consumed by the DataLoader exactly as in one process), takes
the whole epoch's order from it and deals it out round-robin as ``torch.utils.data.DistributedSampler`` does, so
the k-th batches of all ranks together are exactly the k-th batch of a one-process run (when the epoch's sample
count is a multiple of ``world``; otherwise the first few samples of the order are repeated to even the ranks out,
as DistributedSampler pads). Evaluation is split by rank without padding (rank r takes positions r, r + world,
...), and :func:`ex2l_xai.train.evaluation.predict_split` gathers the predictions back into the split's order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, Sampler, Subset, SubsetRandomSampler

from ex2l_xai.config import Config
from ex2l_xai.errors import ConfigError
from ex2l_xai.train.rng import worker_init

__all__ = ["RankShard", "eval_loader", "local_batch_size", "to_device", "train_loader"]


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


def local_batch_size(config: Config, world: int) -> int:
    """Samples per rank of the global batch ``data.batch_size`` split over ``world`` ranks (ConfigError unless it
    divides evenly)."""
    b = config.data.batch_size
    if b % world:
        raise ConfigError(
            f"data.batch_size={b} is the global batch of a DDP run and must be a multiple of the number of "
            f"processes ({world}); use e.g. data.batch_size={max(world, b - b % world)}"
        )
    return b // world


def train_loader(
    config: Config,
    dataset: Any,
    *,
    seed: int,
    device: torch.device,
    indices: Sequence[int] | None = None,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A shuffled loader of ``data.batch_size`` over ``dataset`` (or over ``indices`` of it), shuffled by a
    generator seeded with ``seed``; with ``world`` > 1, rank ``rank``'s share of each global batch."""
    if world > 1:
        gen = torch.Generator().manual_seed(seed)
        if indices is None:  # as DataLoader(shuffle=True, generator=gen) builds it
            inner: Sampler[int] = RandomSampler(dataset, generator=gen)
            return _loader(config, dataset, device, local_batch_size(config, world),
                           sampler=RankShard(inner, rank, world), generator=gen)
        inner = SubsetRandomSampler([int(i) for i in indices], generator=gen)
        return _loader(config, dataset, device, local_batch_size(config, world), sampler=RankShard(inner, rank, world))
    gen = torch.Generator().manual_seed(seed)
    if indices is None:
        return _loader(config, dataset, device, config.data.batch_size, shuffle=True, generator=gen)
    sampler = SubsetRandomSampler([int(i) for i in indices], generator=gen)
    return _loader(config, dataset, device, config.data.batch_size, sampler=sampler)


class RankShard(Sampler[int]):
    """Rank ``rank``'s share of each epoch order of ``inner``: positions ``rank, rank + world, ...`` of it, padded
    with its own first samples to a multiple of ``world`` (``DistributedSampler``'s dealing, of another sampler's
    order). ``inner`` is iterated once per epoch, on every rank alike."""

    def __init__(self, inner: Sampler[int], rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < {world}, got {rank}")
        self.inner, self.rank, self.world = inner, rank, world

    def __iter__(self) -> Iterator[int]:
        order = list(self.inner)
        if order:
            need = -len(order) % self.world
            order += (order * (need // len(order) + 1))[:need]
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        return -(-len(self.inner) // self.world)  # type: ignore[arg-type]


def eval_loader(
    config: Config,
    dataset: Any,
    *,
    device: torch.device,
    indices: Sequence[int] | None = None,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A loader of ``data.eval_batch_size`` over ``dataset`` (or ``indices`` of it) in order; with ``world`` > 1,
    rank ``rank``'s positions ``rank, rank + world, ...`` of it (no padding)."""
    data = dataset if indices is None else Subset(dataset, [int(i) for i in indices])
    if world > 1:
        data = Subset(data, list(range(rank, len(data), world)))
    return _loader(config, data, device, config.data.eval_batch_size, shuffle=False)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (non-blocking from pinned memory on CUDA)."""
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v for k, v in batch.items()}
