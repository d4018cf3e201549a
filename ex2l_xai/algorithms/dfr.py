"""DFR, Deep Feature Reweighting (Kirichenko et al. 2023), as SubpopBench defines it
(``subpopbench/learning/algorithms.py``, class ``DFR``; ``subpopbench/train.py`` for its data;
``subpopbench/dataset/datasets.py``, ``subsample``; defaults from ``subpopbench/hparams_registry.py``): the
feature extractor of a trained ERM model is kept, and its last layer is retrained, from a fresh initialisation,
on group-balanced held-out data with an L1 penalty:

    min_{W, b} mean_i CE(W z_i + b, y_i) + reg * ||W||_1      (SubpopBench ``dfr_reg`` 0.1)

by SGD (momentum 0.9, no weight decay, as SubpopBench's ``get_sgd_optim``) on minibatches of ``data.batch_size``.

Stages, in one run folder:

1. ``erm``: ERM for ``erm_epochs`` epochs (null: ``train.epochs``; 0 skips it, for a run that starts from a
   trained model with ``model.init_from``). Logged, never selected; the features are those of its last epoch.
2. ``last_layer`` (a fit stage): the pooled latent z of every ``val`` sample is computed once (eval mode).
   SubpopBench trains on the group-balanced validation split and selects on the same split; here, to keep the
   selection honest, ``val`` is split in two halves, stratified by group and seeded by the run's seed: the fit
   half is subsampled to the size of its smallest group (as SubpopBench's ``subsample``, at random), the head is
   trained on it for ``fit_steps`` steps, and every ``select_every`` steps it is scored on the other half (the
   run's ``train.selection``); the best head is kept. The run's ``val`` metrics (``metrics.jsonl``,
   ``results.json``, ``ex2l evaluate``) are taken on the selection half only; ``test`` is never used.

Only the label head changes in stage 2; the model needs no confounder head. DFR uses the groups of ``val``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
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
from ex2l_xai.metrics import add_group_nll, group_metrics
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.values import SELECTION_METRIC, SELECTION_MINIMISES


@dataclass
class DFRParams(Params):
    """``erm_epochs`` (null: ``train.epochs``), ``reg`` (``dfr_reg``, 0.1), ``lr`` of the last layer's SGD
    (null: ``optim.lr``), ``fit_steps`` (5000, SubpopBench's default number of steps), ``select_every`` (100,
    SubpopBench's default checkpoint frequency)."""

    erm_epochs: int | None = None
    reg: float = 0.1
    lr: float | None = None
    fit_steps: int = 5000
    select_every: int = 100

    def validate(self) -> None:
        if self.erm_epochs is not None and self.erm_epochs < 0:
            raise ConfigError(f"algorithm.erm_epochs: expected >= 0 (or null), got {self.erm_epochs}")
        if self.reg < 0:
            raise ConfigError(f"algorithm.reg: expected >= 0, got {self.reg}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"algorithm.lr: expected > 0 (or null), got {self.lr}")
        if self.fit_steps < 1:
            raise ConfigError(f"algorithm.fit_steps: expected >= 1, got {self.fit_steps}")
        if self.select_every < 1:
            raise ConfigError(f"algorithm.select_every: expected >= 1, got {self.select_every}")


def split_halves(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a fit half and a selection half, stratified by group: of each group's n samples, n // 2
    (at random) go to the fit half and the rest to the selection half."""
    rng = np.random.default_rng([seed, 0xDF])
    fit, select = [], []
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        fit.append(members[: len(members) // 2])
        select.append(members[len(members) // 2 :])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(select))


def balanced_subsample(positions: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """``positions`` subsampled to the same number of samples in every group present (the smallest group's
    size), at random."""
    rng = np.random.default_rng([seed, 0xBA])
    present = np.unique(groups[positions])
    m = min(int((groups[positions] == g).sum()) for g in present)
    return np.sort(np.concatenate([rng.permutation(positions[groups[positions] == g])[:m] for g in present]))


@register("dfr")
class DFR(Algorithm):
    """ERM, then the last layer retrained on group-balanced held-out data (half of ``val``)."""

    Params = DFRParams

    def __init__(self, model: TwoHeadNet, params: DFRParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        if self.erm_epochs == 0 and not info.init_from:
            raise ConfigError(
                "algorithm.erm_epochs=0 retrains the last layer of the initial model; give a trained ERM model "
                "with model.init_from, or erm_epochs > 0"
            )
        self.held_out: np.ndarray | None = None  # val indices the run's val metrics are taken on
        self.stats: dict[str, float] = {}

    @property
    def erm_epochs(self) -> int:
        """Epochs of the ERM stage."""
        return self.info.epochs if self.params.erm_epochs is None else self.params.erm_epochs

    def stages(self) -> list[Stage]:
        fit = Stage("last_layer", 1, kind="fit")
        return [Stage("erm", self.erm_epochs, selectable=False), fit] if self.erm_epochs else [fit]

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        ce = F.cross_entropy(self.model(batch["image"]).label, batch["label"])
        return StepOutput(ce, {"ce": float(ce.detach()), "loss": float(ce.detach())})

    @torch.no_grad()
    def features(self, loader: Any) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
        """Pooled latent (N, D), labels, group ids and sample indices of a split, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        feats, labels, groups, index = [], [], [], []
        device = self.model.label_head.weight.device
        try:
            for batch in loader:
                feats.append(self.model(batch["image"].to(device)).latent)
                labels.append(batch["label"])
                groups.append(batch["label"] * self.info.n_confounders + batch["confounder"])
                index.append(batch["index"])
        finally:
            self.model.train(was_training)
        return torch.cat(feats), torch.cat(labels).numpy(), torch.cat(groups).numpy(), torch.cat(index).numpy()

    @torch.no_grad()
    def _select_score(self, head: nn.Module, z: Tensor, y: Tensor, g: np.ndarray) -> float:
        """The run's selection score of ``head`` on the held-out half (higher is better; -inf for NaN)."""
        logits = head(z)
        m = group_metrics(logits.argmax(1).cpu().numpy(), y.cpu().numpy(), g, self._group_names())
        if self.info.selection in SELECTION_MINIMISES:
            add_group_nll(m, F.cross_entropy(logits, y, reduction="none").cpu().numpy(), g, self._group_names())
        score = float(m[SELECTION_METRIC[self.info.selection]])
        score = -score if self.info.selection in SELECTION_MINIMISES else score
        return -np.inf if np.isnan(score) else score

    def fit(self, stage: Stage, ctx: StageContext) -> dict[str, float]:
        p = self.params
        z, y, g, index = self.features(ctx.eval_loader("val"))
        fit_pos, select_pos = split_halves(g, ctx.seed)
        train_pos = balanced_subsample(fit_pos, g, ctx.seed)
        if len(select_pos) == 0:
            raise ConfigError("algorithm dfr: the val split is too small to hold out a selection half")
        device = z.device
        yt = torch.as_tensor(y, device=device)
        head = nn.Linear(z.shape[1], self.info.n_labels).to(device)  # fresh, from the epoch's seeded RNG
        opt = torch.optim.SGD(head.parameters(), lr=p.lr if p.lr is not None else self.info.lr, momentum=0.9)
        train_idx = torch.as_tensor(train_pos, device=device)
        select_idx = torch.as_tensor(select_pos, device=device)
        bs = self.info.batch_size
        best: tuple[float, int, dict[str, Tensor]] | None = None
        order = torch.empty(0, dtype=torch.long, device=device)
        sums = {"ce": 0.0, "l1": 0.0, "loss": 0.0}
        for step in range(1, p.fit_steps + 1):
            if order.numel() < bs:  # a new random pass over the balanced fit set
                order = torch.cat([order, train_idx[torch.randperm(len(train_idx)).to(device)]])
            pick, order = order[:bs], order[bs:]
            ce = F.cross_entropy(head(z[pick]), yt[pick])
            l1 = head.weight.abs().sum()
            loss = ce + p.reg * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (("ce", ce), ("l1", l1), ("loss", loss)):
                sums[k] += float(v.detach())
            if step % p.select_every == 0 or step == p.fit_steps:
                score = self._select_score(head, z[select_idx], yt[select_idx], g[select_pos])
                if best is None or score > best[0]:
                    best = (score, step, {k: v.detach().clone() for k, v in head.state_dict().items()})
        assert best is not None
        with torch.no_grad():
            self.model.label_head.weight.copy_(best[2]["weight"])
            self.model.label_head.bias.copy_(best[2]["bias"])
        self.held_out = np.sort(index[select_pos])
        self.stats = {
            "fit_samples": float(len(train_pos)),
            "fit_group_size": float(len(train_pos) / len(np.unique(g[train_pos]))),
            "select_samples": float(len(select_pos)),
            "best_step": float(best[1]),
        }
        return {k: v / p.fit_steps for k, v in sums.items()}

    def _group_names(self) -> list[str]:
        return [str(i) for i in range(self.info.n_groups)]

    def evaluation_subset(self, split: str) -> Sequence[int] | None:
        return self.held_out.tolist() if split == "val" and self.held_out is not None else None

    def epoch_stats(self) -> dict[str, float]:
        stats, self.stats = self.stats, {}
        return stats
