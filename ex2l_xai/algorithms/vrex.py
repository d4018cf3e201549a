"""V-REx (Krueger et al. 2021), as DomainBed implements it (``domainbed/algorithms.py``, class ``VREx``; defaults
from ``domainbed/hparams_registry.py``).

Environments are the dataset's ``env`` (at least two in the training split). A batch is split by environment;
with R_e the cross-entropy of environment e's samples,

    loss = mean_e R_e + w(step) * mean_e (R_e - mean_e R_e)^2

(the variance of the environment risks, population form). ``w`` is 1 for the first ``anneal_steps`` steps,
then ``penalty_weight``; at that step the model's optimiser state is cleared, as DomainBed resets Adam.
DomainBed draws one minibatch per environment; here the trainer's batch is split by ``env``. Under DDP the risks
are those of the gathered global batch (:func:`~ex2l_xai.distributed.gather_batch`): the one-process value.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

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
class VRExParams(AnnealedPenaltyParams):
    """``penalty_weight`` (DomainBed ``vrex_lambda``, 10) after ``anneal_steps`` steps (``vrex_penalty_anneal_iters``,
    500) of weight 1."""

    penalty_weight: float = 10.0
    anneal_steps: int = 500


def vrex_penalty(risks: Tensor) -> Tensor:
    """The variance (population form) of the environment risks ``risks`` (E,)."""
    return ((risks - risks.mean()) ** 2).mean()


@register("vrex")
class VREx(Algorithm):
    """Variance risk extrapolation over the training environments."""

    Params = VRExParams

    def __init__(self, model: TwoHeadNet, params: VRExParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        require_train_envs("vrex", info)

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        p = self.params
        logits = gather_batch(self.model(batch["image"]).label, differentiable=True)  # DDP: the global batch
        risks = env_risks(logits, gather_batch(batch["label"]), env_members(gather_batch(batch["env"])))
        mean, penalty = risks.mean(), vrex_penalty(risks)
        weight, reset = p.weight_at(ctx.step)
        loss = mean + weight * penalty
        parts = {"nll": float(mean.detach()), "penalty": float(penalty.detach()), "penalty_weight": weight,
                 "loss": float(loss.detach())}
        return StepOutput(loss, parts, reset=reset)
