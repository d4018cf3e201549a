"""GroupDRO (Sagawa et al. 2020): online exponentiated-gradient weights over (label, confounder) groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ex2l_xai.algorithms.base import Algorithm, Params, TrainInfo, group_ids, per_sample_ce, register
from ex2l_xai.distributed import all_reduce_sum
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet


@dataclass
class GroupDROParams(Params):
    """``eta``: step size of the q update; ``adjustment``: C of the generalisation adjustment C/sqrt(n_g)."""

    eta: float = 0.01
    adjustment: float = 0.0

    def validate(self) -> None:
        if self.eta <= 0:
            raise ConfigError(f"algorithm.eta: expected > 0, got {self.eta}")
        if self.adjustment < 0:
            raise ConfigError(f"algorithm.adjustment: expected >= 0, got {self.adjustment}")


@register("groupdro")
class GroupDRO(Algorithm):
    """q_g ← q_g · exp(η (loss_g + C/√n_g)) for the groups present in the batch, renormalised; the loss is
    Σ_g q_g loss_g with the updated q. ``q`` is a buffer, so it is saved in checkpoints."""

    Params = GroupDROParams
    q: Tensor

    def __init__(self, model: TwoHeadNet, params: GroupDROParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        counts = torch.tensor(info.group_counts, dtype=torch.float32)
        # q starts uniform over the groups that exist in training (a group never seen keeps q = 0)
        seen = (counts > 0).float() if counts.numel() == info.n_groups and counts.sum() > 0 else torch.ones(info.n_groups)
        self.register_buffer("q", seen / seen.sum())
        adj = torch.zeros(info.n_groups)
        if counts.numel() == info.n_groups:
            adj = torch.where(counts > 0, params.adjustment / counts.clamp_min(1).sqrt(), adj)
        self.register_buffer("adj", adj)

    def group_losses(self, losses: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss of each group (0 where absent) and a mask of the groups present, over the global batch: under
        DDP the groups' sums and counts are summed over ranks (differentiably), so every rank updates q with the
        group losses of the whole batch and the averaged gradient is that of the one-process loss."""
        n = self.info.n_groups
        sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
        counts = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, groups, torch.ones_like(losses))
        sums, counts = all_reduce_sum(sums, differentiable=True), all_reduce_sum(counts)
        present = counts > 0
        return sums / counts.clamp_min(1), present

    def loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        out = self.model(batch["image"])
        losses = per_sample_ce(out.label, batch["label"])
        g_loss, present = self.group_losses(losses, group_ids(batch, self.info.n_confounders))
        with torch.no_grad():
            step = torch.where(present, self.params.eta * (g_loss.detach() + self.adj.to(g_loss)), torch.zeros_like(g_loss))
            q = self.q * torch.exp(step)
            self.q.copy_(q / q.sum())
        loss = (self.q * g_loss).sum()
        parts = {"ce": float(losses.mean().detach()), "loss": float(loss.detach()), "q_max": float(self.q.max())}
        return loss, parts
