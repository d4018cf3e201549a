"""MMD (Li et al. 2018, MMD-AAE without the adversary) as DomainBed implements it (``domainbed/algorithms.py``,
classes ``AbstractMMD`` and ``MMD``; defaults from ``domainbed/hparams_registry.py``), and the base it shares
with CORAL (:mod:`ex2l_xai.algorithms.coral`).

Environments are the dataset's ``env`` (at least two in the training split). A batch is split by environment;
the features are the model's pooled latent (what its label head reads), and

    loss = mean_e R_e + gamma * mean_{e < e'} D(features_e, features_e')

with R_e the cross-entropy of environment e. MMD's D is the biased squared MMD with a sum of Gaussian kernels,
k(a, b) = sum_g exp(-g ||a - b||^2) for g in (0.001, 0.01, 0.1, 1, 10, 100, 1000): D = mean K(x, x) +
mean K(y, y) - 2 mean K(x, y). DomainBed draws one minibatch per environment; here the trainer's batch is split by
``env``, and only environments with at least two samples in the batch are matched. Under DDP the loss is that of
the gathered global batch (:func:`~ex2l_xai.distributed.gather_batch`): the one-process value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ex2l_xai.algorithms.base import (
    Algorithm,
    Params,
    StepContext,
    StepOutput,
    TrainInfo,
    env_members,
    env_risks,
    register,
    require_train_envs,
)
from ex2l_xai.distributed import gather_batch
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet

GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
"""Bandwidths of DomainBed's sum of Gaussian kernels."""


@dataclass
class MatchingParams(Params):
    """``gamma``: weight of the feature-matching penalty (DomainBed ``mmd_gamma``, 1.0)."""

    gamma: float = 1.0

    def validate(self) -> None:
        if self.gamma < 0:
            raise ConfigError(f"algorithm.gamma: expected >= 0, got {self.gamma}")


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_j||^2 (N, M), floored at 1e-30 as DomainBed's ``my_cdist``."""
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    return torch.addmm(y_norm.transpose(-2, -1), x, y.transpose(-2, -1), alpha=-2).add_(x_norm).clamp_min_(1e-30)


def gaussian_mmd(x: Tensor, y: Tensor, gammas: tuple[float, ...] = GAMMAS) -> Tensor:
    """Biased squared MMD of samples ``x`` (N, D) and ``y`` (M, D) under a sum of Gaussian kernels."""

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d = squared_distances(a, b)
        return sum(torch.exp(-g * d) for g in gammas)

    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


class FeatureMatching(Algorithm):
    """ERM on the mean of the environment risks plus ``gamma`` times a discrepancy of the environments'
    features, averaged over pairs of environments; subclasses give :meth:`discrepancy`."""

    Params = MatchingParams
    min_per_env: ClassVar[int] = 2

    def __init__(self, model: TwoHeadNet, params: MatchingParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        require_train_envs(self.name, info)

    def discrepancy(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        out = self.model(batch["image"])
        # under DDP the whole global batch: each environment's features are matched as in one process
        logits, latent = gather_batch(out.label, differentiable=True), gather_batch(out.latent, differentiable=True)
        members = env_members(gather_batch(batch["env"]))
        nll = env_risks(logits, gather_batch(batch["label"]), members).mean()
        feats = [latent[idx] for idx in members if idx.numel() >= self.min_per_env]
        pairs = [self.discrepancy(feats[i], feats[j]) for i in range(len(feats)) for j in range(i + 1, len(feats))]
        penalty = torch.stack(pairs).mean() if pairs else nll.new_zeros(())
        loss = nll + self.params.gamma * penalty
        return StepOutput(loss, {"nll": float(nll.detach()), "penalty": float(penalty.detach()),
                                 "loss": float(loss.detach())})


@register("mmd")
class MMD(FeatureMatching):
    """Matching the environments' feature distributions with a Gaussian-kernel MMD."""

    def discrepancy(self, x: Tensor, y: Tensor) -> Tensor:
        return gaussian_mmd(x, y)
