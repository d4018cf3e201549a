"""Mixup. ``mix: env`` (default) is DomainBed's inter-environment mixup (Yan et al. 2020; Wang et al. 2020;
``domainbed/algorithms.py``, class ``Mixup``, and ``domainbed/lib/misc.py``, ``random_pairs_of_minibatches``);
``mix: batch`` is SubpopBench's mixup of a batch with a permutation of itself (Zhang et al. 2018;
``subpopbench/learning/algorithms.py``, class ``Mixup``, and ``subpopbench/utils/misc.py``, ``mixup_data``).
``alpha`` is 0.2 in both registries.

For one pair (x_i, y_i), (x_j, y_j) and lam ~ Beta(alpha, alpha), the model sees x = lam x_i + (1 - lam) x_j
and the loss is lam CE(f(x), y_i) + (1 - lam) CE(f(x), y_j).

- ``env``: the batch is split by the dataset's ``env``; the environments are put in a random order and each is
  paired with the next (the last with the first), both cut to the smaller size, one lam per pair; the loss is
  the mean over pairs (each pair is a forward pass of its own, as in DomainBed). Needs at least two training
  environments.
- ``batch``: one lam for the batch, x_j a random permutation of the batch.

Mixed images are new images every step, so ``model.cache_frozen`` (which remembers each image's features) is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ex2l_xai.algorithms.base import (
    Algorithm,
    Params,
    StepContext,
    StepOutput,
    TrainInfo,
    env_members,
    register,
    require_train_envs,
)
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet


@dataclass
class MixupParams(Params):
    """``alpha`` of Beta(alpha, alpha) (``mixup_alpha``, 0.2); ``mix``: ``env`` (DomainBed) or ``batch``
    (SubpopBench)."""

    CHOICES = {"mix": ("env", "batch")}

    alpha: float = 0.2
    mix: str = "env"

    def validate(self) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"algorithm.alpha: expected > 0, got {self.alpha}")


def mixup_loss(model: nn.Module, xi: Tensor, yi: Tensor, xj: Tensor, yj: Tensor, lam: float) -> Tensor:
    """lam CE(f(x), yi) + (1 - lam) CE(f(x), yj) at x = lam xi + (1 - lam) xj; ``model(x).label`` are logits."""
    logits = model(lam * xi + (1 - lam) * xj).label
    return lam * F.cross_entropy(logits, yi) + (1 - lam) * F.cross_entropy(logits, yj)


def random_pairs(members: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """DomainBed's pairs of environments: a random order (torch's RNG), each with the next (the last with the
    first), both cut to the smaller size."""
    perm = torch.randperm(len(members)).tolist()
    pairs = []
    for i in range(len(members)):
        a, b = members[perm[i]], members[perm[i + 1 if i < len(members) - 1 else 0]]
        n = min(a.numel(), b.numel())
        pairs.append((a[:n], b[:n]))
    return pairs


@register("mixup")
class Mixup(Algorithm):
    """Mixup across environments (DomainBed) or within the batch (SubpopBench)."""

    Params = MixupParams

    def __init__(self, model: TwoHeadNet, params: MixupParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        if params.mix == "env":
            require_train_envs("mixup", info)
        if model.prefix_cache is not None:
            raise ConfigError(
                "algorithm mixup: model.cache_frozen=true would remember the features of every mixed image, each "
                "seen once; set model.cache_frozen=false"
            )

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        x, y, a = batch["image"], batch["label"], self.params.alpha
        if self.params.mix == "batch":
            lam = float(np.random.beta(a, a))
            perm = torch.randperm(x.shape[0]).to(x.device)
            loss = mixup_loss(self.model, x, y, x[perm], y[perm], lam)
        else:
            pairs = random_pairs(env_members(batch["env"]))
            terms = []
            for i, j in pairs:
                lam = float(np.random.beta(a, a))
                terms.append(mixup_loss(self.model, x[i], y[i], x[j], y[j], lam))
            loss = torch.stack(terms).mean()
        return StepOutput(loss, {"loss": float(loss.detach())})
