"""DANN (Ganin et al. 2016) in DomainBed's form: an environment discriminator trained in alternation with the
model, not a gradient-reversal layer (``domainbed/algorithms.py``, classes ``AbstractDANN`` and ``DANN``;
``domainbed/networks.py``, class ``MLP``; defaults from ``domainbed/hparams_registry.py``).

Environments are the dataset's ``env`` (at least two in the training split); the discriminator is an MLP
(``mlp_depth`` linear layers of ``mlp_width``, ReLU, dropout ``mlp_dropout``) from the pooled latent to the
training environments. Steps alternate (``d_steps_per_g_step`` discriminator steps per model step, counted from
the run's first step as DomainBed's ``update_count``):

- discriminator step: D = CE(disc(z), env) + grad_penalty * mean_i ||d sum_j CE_j / d z_i||^2 on the detached
  latent z; steps the discriminator's own Adam (``lr_d``, betas (``beta1``, 0.9), ``weight_decay_d``);
- model step: CE(label head, y) - adv_weight * D, stepping the model's optimiser (the run's ``optim``
  section, as for every other algorithm; DomainBed's is Adam with betas (0.5, 0.9)). The model's gradient of
  the adversarial term is the discriminator's feature gradient with its sign flipped (scaled by adv_weight).

DomainBed draws one minibatch per environment; here the trainer's batch is split by ``env``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, autograd, nn
from torch.nn import functional as F

from ex2l_xai.algorithms.base import (
    Algorithm,
    OptimizerFactory,
    Params,
    Stage,
    StepContext,
    StepOutput,
    TrainInfo,
    register,
    require_train_envs,
)
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet


@dataclass
class DANNParams(Params):
    """DomainBed's DANN hyperparameters: ``adv_weight`` (``lambda``, 1.0), ``d_steps_per_g_step`` (1),
    ``grad_penalty`` (0), ``beta1`` (0.5), ``mlp_width`` (256), ``mlp_depth`` (3), ``mlp_dropout`` (0),
    ``lr_d`` (DomainBed: the model's lr; null here means ``optim.lr``), ``weight_decay_d`` (0)."""

    adv_weight: float = 1.0
    d_steps_per_g_step: int = 1
    grad_penalty: float = 0.0
    beta1: float = 0.5
    mlp_width: int = 256
    mlp_depth: int = 3
    mlp_dropout: float = 0.0
    lr_d: float | None = None
    weight_decay_d: float = 0.0

    def validate(self) -> None:
        checks = [
            ("adv_weight", self.adv_weight >= 0, ">= 0"),
            ("d_steps_per_g_step", self.d_steps_per_g_step >= 1, ">= 1"),
            ("grad_penalty", self.grad_penalty >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("mlp_width", self.mlp_width >= 1, ">= 1"),
            ("mlp_depth", self.mlp_depth >= 2, ">= 2"),
            ("mlp_dropout", 0 <= self.mlp_dropout < 1, "in [0, 1)"),
            ("lr_d", self.lr_d is None or self.lr_d > 0, "> 0 (or null)"),
            ("weight_decay_d", self.weight_decay_d >= 0, ">= 0"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"algorithm.{key}: expected {what}, got {getattr(self, key)}")


class MLP(nn.Module):
    """DomainBed's MLP: input layer, ``depth - 2`` hidden layers, output layer; dropout and ReLU between."""

    def __init__(self, n_in: int, n_out: int, width: int, depth: int, dropout: float) -> None:
        super().__init__()
        self.input = nn.Linear(n_in, width)
        self.dropout = nn.Dropout(dropout)
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 2)])
        self.output = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for hidden in self.hiddens:
            x = F.relu(self.dropout(hidden(x)))
        return self.output(x)


@register("dann")
class DANN(Algorithm):
    """Domain-adversarial training against an environment discriminator, alternating as DomainBed."""

    Params = DANNParams
    env_index: Tensor

    def __init__(self, model: TwoHeadNet, params: DANNParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        require_train_envs("dann", info)
        envs = info.train_envs
        index = torch.full((max(len(info.env_counts), max(envs) + 1),), -1, dtype=torch.long)
        index[torch.tensor(envs)] = torch.arange(len(envs))
        self.register_buffer("env_index", index)  # dataset env id -> discriminator class
        self.discriminator = MLP(model.latent_dim, len(envs), params.mlp_width, params.mlp_depth, params.mlp_dropout)

    def configure_optimizers(self, build: OptimizerFactory, stage: Stage) -> dict[str, torch.optim.Optimizer]:
        p = self.params
        disc = torch.optim.Adam(
            self.discriminator.parameters(),
            lr=p.lr_d if p.lr_d is not None else self.info.lr,
            weight_decay=p.weight_decay_d,
            betas=(p.beta1, 0.9),
        )
        return {"model": build(self.model.parameters()), "disc": disc}

    def ddp_find_unused_parameters(self) -> bool:
        """A discriminator step's loss does not reach the model: DDP must find the parameters it leaves out."""
        return True

    def discriminator_loss(self, z: Tensor, d: Tensor) -> Tensor:
        """CE of the discriminator on features ``z`` against environment classes ``d``, plus the gradient
        penalty on ``z`` when ``grad_penalty`` > 0 (``z`` must then require grad)."""
        out = self.discriminator(z)
        loss = F.cross_entropy(out, d)
        if self.params.grad_penalty > 0:
            (grad,) = autograd.grad(F.cross_entropy(out, d, reduction="sum"), [z], create_graph=True)
            loss = loss + self.params.grad_penalty * grad.pow(2).sum(dim=1).mean(dim=0)
        return loss

    def generator_loss(self, label_logits: Tensor, z: Tensor, y: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The model step's loss CE(label) - adv_weight * D(z), with CE and D for the logs."""
        ce = F.cross_entropy(label_logits, y)
        disc = self.discriminator_loss(z, d)
        return ce - self.params.adv_weight * disc, ce, disc

    def is_discriminator_step(self, step: int) -> bool:
        """DomainBed's alternation: update ``step + 1`` trains the discriminator when
        ``(step + 1) % (1 + d_steps_per_g_step) < d_steps_per_g_step``."""
        k = self.params.d_steps_per_g_step
        return (step + 1) % (1 + k) < k

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        d = self.env_index[batch["env"]]
        if (d < 0).any():
            raise ConfigError("algorithm dann: a training batch holds an environment absent from the training split")
        if self.is_discriminator_step(ctx.step):
            with torch.no_grad():
                z = self.model(batch["image"]).latent
            z.requires_grad_(self.params.grad_penalty > 0)
            loss = self.discriminator_loss(z, d)
            return StepOutput(loss, {"disc_loss": float(loss.detach())}, optimizers=("disc",))
        out = self.model(batch["image"])
        loss, ce, disc = self.generator_loss(out.label, out.latent, batch["label"], d)
        return StepOutput(loss, {"ce": float(ce.detach()), "adv": float(disc.detach()), "loss": float(loss.detach())})
