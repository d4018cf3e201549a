"""JTT, Just Train Twice (Liu et al. 2021), as SubpopBench defines it (``subpopbench/learning/algorithms.py``,
classes ``AbstractTwoStage``, ``JTT_Stage2`` and ``JTT``; defaults from ``subpopbench/hparams_registry.py``).

Two stages in one run folder (resumable at any epoch, the error set is part of the checkpoint):

1. ``identify``: ERM for ``identify_epochs`` epochs (SubpopBench: the first half of the steps,
   ``first_stage_step_frac`` 0.5, so by default as many epochs as the second stage, ``train.epochs``). Its
   evaluations are logged but never selected.
2. ``retrain``: the error set E (training samples the identification model misclassifies, predicted in eval
   mode once, when the stage starts) is fixed, the model starts again from the run's initial weights, and is
   trained for ``train.epochs`` epochs with E upweighted by ``lambda_up`` (SubpopBench ``jtt_lambda``, 10):
   ``upweight: loss`` (SubpopBench) multiplies each sample's cross-entropy by lambda_up if in E, else 1, and
   averages over the batch; ``upweight: sample`` (the paper's upsampling) iterates each epoch over the
   training set with E repeated lambda_up times (an integer).

Model selection and results are those of stage 2. JTT needs neither groups nor environments to train (the
validation split's groups choose the epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ex2l_xai.algorithms.base import (
    Algorithm,
    Params,
    Stage,
    StageContext,
    StepContext,
    StepOutput,
    TrainInfo,
    register,
)
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet


@dataclass
class JTTParams(Params):
    """``identify_epochs`` T (null: ``train.epochs``), ``lambda_up`` (10), ``upweight``: ``loss`` or
    ``sample``."""

    CHOICES = {"upweight": ("loss", "sample")}

    identify_epochs: int | None = None
    lambda_up: float = 10.0
    upweight: str = "loss"

    def validate(self) -> None:
        if self.identify_epochs is not None and self.identify_epochs < 1:
            raise ConfigError(f"algorithm.identify_epochs: expected >= 1 (or null), got {self.identify_epochs}")
        if self.lambda_up < 1:
            raise ConfigError(f"algorithm.lambda_up: expected >= 1, got {self.lambda_up}")
        if self.upweight == "sample" and self.lambda_up != int(self.lambda_up):
            raise ConfigError(
                f"algorithm.lambda_up: upweight=sample repeats the error set, so it takes an integer, got {self.lambda_up}"
            )


@register("jtt")
class JTT(Algorithm):
    """ERM, then ERM again from the start with the first model's training errors upweighted."""

    Params = JTTParams
    error_set: Tensor

    def __init__(self, model: TwoHeadNet, params: JTTParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        self.register_buffer("error_set", torch.zeros(info.n_samples, dtype=torch.bool))
        self.stage = "identify"

    def stages(self) -> list[Stage]:
        t = self.params.identify_epochs or self.info.epochs
        return [Stage("identify", t, selectable=False), Stage("retrain", self.info.epochs)]

    @torch.no_grad()
    def find_errors(self, loader: Any) -> Tensor:
        """The training samples the current model misclassifies (eval mode), as a mask over sample indices."""
        was_training = self.model.training
        self.model.eval()
        errors = torch.zeros(self.info.n_samples, dtype=torch.bool)
        try:
            for batch in loader:
                pred = self.predict(batch["image"].to(self.error_set.device)).argmax(1).cpu()
                errors[batch["index"]] = pred != batch["label"]
        finally:
            self.model.train(was_training)
        return errors

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        if stage.name == "retrain":
            self.error_set.copy_(self.find_errors(ctx.eval_loader("train")))
            self.model.load_state_dict(ctx.fresh_model().state_dict())

    def train_indices(self, stage: Stage, dataset: Any) -> Sequence[int] | None:
        if stage.name != "retrain" or self.params.upweight != "sample":
            return None
        extra = torch.nonzero(self.error_set).flatten().tolist() * (int(self.params.lambda_up) - 1)
        return list(range(self.info.n_samples)) + extra

    def sample_weights(self, index: Tensor) -> Tensor:
        """Loss weight of each sample: lambda_up in the error set, else 1 (``upweight: loss``)."""
        in_set = self.error_set[index].to(torch.float32)
        return 1.0 + (self.params.lambda_up - 1.0) * in_set

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        self.stage = ctx.stage.name
        losses = F.cross_entropy(self.model(batch["image"]).label, batch["label"], reduction="none")
        if ctx.stage.name == "retrain" and self.params.upweight == "loss":
            loss = (losses * self.sample_weights(batch["index"])).mean()
        else:
            loss = losses.mean()
        return StepOutput(loss, {"ce": float(losses.mean().detach()), "loss": float(loss.detach())})

    def epoch_stats(self) -> dict[str, float]:
        if self.stage != "retrain":
            return {}
        n = int(self.error_set.sum())
        return {"error_set": float(n), "error_share": n / max(1, self.info.n_samples)}
