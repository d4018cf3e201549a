"""IRM (Arjovsky et al. 2019), as DomainBed implements it (``domainbed/algorithms.py``, class ``IRM``; defaults
from ``domainbed/hparams_registry.py``).

Environments are the dataset's ``env`` (at least two in the training split). A batch is split by environment;
the loss is the mean of the environments' risks plus ``w(step)`` times the mean IRMv1 penalty, where an
environment's penalty is the product of the gradients, with respect to a dummy classifier scale ``s = 1``, of
the cross-entropy of its even and of its odd samples (an unbiased estimate of the squared gradient):

    loss = mean_e R_e + w(step) * mean_e [dR_e^even(s·logits)/ds · dR_e^odd(s·logits)/ds]  at s = 1

``w`` is 1 for the first ``anneal_steps`` optimiser steps, then ``penalty_weight``; at that step the model's
optimiser state is cleared, as DomainBed resets Adam ("it doesn't like the sharp jump in gradient magnitudes").
DomainBed draws one minibatch per environment; here the trainer's batch is split by ``env``, and an environment
with fewer than two samples in a batch adds its risk but no penalty. Under DDP the loss is computed on the
gathered global batch (:func:`~ex2l_xai.distributed.gather_batch`): the one-process value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, autograd
from torch.nn import functional as F

from ex2l_xai.algorithms.base import (
    Algorithm,
    AnnealedPenaltyParams,
    StepContext,
    StepOutput,
    TrainInfo,
    env_members,
    env_risks,
    register,
    require_train_envs,
)
from ex2l_xai.distributed import gather_batch
from ex2l_xai.models import TwoHeadNet


@dataclass
class IRMParams(AnnealedPenaltyParams):
    """``penalty_weight`` (DomainBed ``irm_lambda``, 1e2) after ``anneal_steps`` steps (``irm_penalty_anneal_iters``,
    500) of weight 1."""

    penalty_weight: float = 100.0
    anneal_steps: int = 500


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1 penalty of one environment: dR_even/ds · dR_odd/ds at the classifier scale s = 1."""
    scale = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
    loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
    (grad_1,) = autograd.grad(loss_1, [scale], create_graph=True)
    (grad_2,) = autograd.grad(loss_2, [scale], create_graph=True)
    return grad_1 * grad_2


@register("irm")
class IRM(Algorithm):
    """Invariant risk minimisation (IRMv1) over the training environments."""

    Params = IRMParams

    def __init__(self, model: TwoHeadNet, params: IRMParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        require_train_envs("irm", info)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        p = self.params
        # under DDP the whole global batch, in the one-process order: its environments' even and odd halves are
        # the one-process ones, so the penalty is the one-process penalty (not a mean of per-rank estimates)
        logits = gather_batch(self.model(batch["image"]).label, differentiable=True)
        y, members = gather_batch(batch["label"]), env_members(gather_batch(batch["env"]))
        nll = env_risks(logits, y, members).mean()
        paired = [idx for idx in members if idx.numel() >= 2]
        penalty = torch.stack([irm_penalty(logits[i], y[i]) for i in paired]).mean() if paired else nll.new_zeros(())
        weight, reset = p.weight_at(ctx.step)
        loss = nll + weight * penalty
        parts = {"nll": float(nll.detach()), "penalty": float(penalty.detach()), "penalty_weight": weight,
                 "loss": float(loss.detach())}
        return StepOutput(loss, parts, reset=reset)
