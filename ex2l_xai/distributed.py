"""The distributed context of a run: the ``torchrun`` environment, the process group, and the few collectives the
trainer and the algorithms use. In a single process (no process group) every function here is the identity or a
no-op, so code written against it runs unchanged without ``torchrun``.

``torchrun --nproc_per_node N -m ex2l_xai.cli train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` opens the group from them (``gloo`` on the CPU,
``nccl`` on CUDA) and closes it on exit. Python callers of :func:`ex2l_xai.train.train` under ``torchrun`` wrap
the call the same way::

    with process_group("gloo"):
        train(config, out)

Nothing happens at import time: no process group, no environment variable set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ex2l_xai.errors import ConfigError

__all__ = [
    "TORCHRUN_VARS",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_batch",
    "is_active",
    "is_main",
    "launched_by_torchrun",
    "local_rank",
    "process_group",
    "rank",
    "world_size",
]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The variables ``torchrun`` (and ``submitit.helpers.TorchDistributedEnvironment().export()``) set per process."""


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1 and the rendezvous
    variables set)."""
    e = os.environ if env is None else env
    if not all(k in e for k in TORCHRUN_VARS):
        return False
    try:
        return int(e["WORLD_SIZE"]) > 1
    except ValueError as exc:
        raise ConfigError(f"environment variable WORLD_SIZE: expected an integer, got {e['WORLD_SIZE']!r}") from exc


def is_active() -> bool:
    """Whether a process group of more than one process is open."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """Number of processes of the run (1 without a process group)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Whether this process writes the run folder (rank 0, or the only process)."""
    return rank() == 0


def local_rank() -> int:
    """The rank within the node (``LOCAL_RANK``, 0 when unset): which GPU of the node this process takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def process_group(backend: str, *, timeout_s: float = 1800.0) -> Iterator[bool]:
    """Open the process group of a ``torchrun`` launch for the block (yields True), or do nothing outside one
    (yields False). ``backend``: ``gloo`` (CPU) or ``nccl`` (CUDA). A group opened by the caller is used as it is
    and left open."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield is_active()
        return
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"distributed backend: expected gloo or nccl, got {backend!r}")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this build of torch has no torch.distributed")
    from datetime import timedelta

    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(kwargs["device_id"])
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_active():
        dist.barrier()


_AUX: dict[int, Any] = {}  # default group's id -> the group of in-graph collectives (made on first use)


def _aux_group() -> Any:
    """A second group over the same ranks for collectives inside the autograd graph, so that their backward
    all-reduces never queue among DDP's gradient-bucket all-reduces on the default group."""
    key = id(dist.group.WORLD)
    if key not in _AUX:
        _AUX.clear()
        _AUX[key] = dist.new_group(backend=dist.get_backend())
    return _AUX[key]


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of a tensor over ranks. Backward: the sum of the incoming gradients over ranks (each rank's
    input reaches every rank's loss), by the same function, so that second derivatives exist too."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=_aux_group())
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _SumOverRanks.apply(grad)  # itself differentiable: a double backward (create_graph) goes through


def all_reduce_sum(t: Tensor, *, differentiable: bool = False) -> Tensor:
    """The sum of ``t`` over ranks (``t`` itself in one process). With ``differentiable``, gradients flow back
    to every rank's ``t``: the gradient of a loss computed from the sum, averaged over ranks by DDP, is that of
    the loss of the whole global batch (what ``nn.SyncBatchNorm`` does for batch statistics)."""
    if not is_active():
        return t
    if differentiable:
        return _SumOverRanks.apply(t)
    out = t.detach().clone()
    dist.all_reduce(out, group=_aux_group())
    return out


def gather_batch(t: Tensor, *, differentiable: bool = False) -> Tensor:
    """The global batch of a per-rank batch tensor ``t`` (B, ...), in the order of the one-process batch: the
    training loaders deal a global batch out round-robin (rank r holds its positions r, r + world, ...), so row i
    of rank r is row i * world + r (``t`` itself in one process). Every rank's batch must hold the same number of
    rows, as the training loaders' do. With ``differentiable``, gradients flow back to every rank's rows (see
    :func:`all_reduce_sum`): a loss of the gathered batch, computed alike on every rank, then gets the gradient of
    the one-process loss once DDP averages it."""
    if not is_active():
        return t
    world, me, n = world_size(), rank(), t.shape[0]
    sizes = all_reduce_sum(torch.tensor([n, n * n], dtype=torch.float64, device=t.device))
    if sizes[0].item() != world * n or sizes[1].item() != world * n * n:  # sum n and sum n^2: all equal to n
        raise RuntimeError(f"gather_batch: the ranks' batches differ in size (this rank: {n} rows); the training "
                           "loaders give every rank the same number")
    full = t.new_zeros((n * world, *t.shape[1:]))
    full = full.index_copy(0, torch.arange(me, n * world, world, device=t.device), t)
    return all_reduce_sum(full, differentiable=differentiable)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
