"""Random-number state of a run: the per-epoch seeds that make a resumed run equal an uninterrupted one, and
the RNG states saved in ``checkpoint.pt`` (plain types only, so ``weights_only`` loading works)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["epoch_seed", "rng_state", "seed_epoch", "set_rng_state", "worker_init"]


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 32-bit seed of stream ``stream`` for epoch ``epoch`` (0-based, counted over the whole run)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint32)[0])


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed python, numpy and torch from ``(seed, epoch)``: what an epoch draws does not depend on resumes."""
    random.seed(epoch_seed(seed, epoch, 1))
    np.random.seed(epoch_seed(seed, epoch, 2))
    torch.manual_seed(epoch_seed(seed, epoch, 3))


def worker_init(worker_id: int) -> None:
    """DataLoader worker: seed python and numpy from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's (and CUDA's) RNG states as plain types and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
