"""The algorithm interface and its registry: one small class per training algorithm, one file each.

The registry is :data:`ALGORITHMS` (this module), filled by the ``@register("name")`` class decorator. Every
module of the ``ex2l_xai.algorithms`` package is imported when the package is (automatic discovery, in its
``__init__``), so adding an algorithm is adding one file; docs/training.md shows a toy one.

The loop belongs to the trainer (:mod:`ex2l_xai.train`); an algorithm overrides only the hooks it needs, as a
PyTorch Lightning module does:

- ``loss(batch, epoch)``: the loss and its logged parts. Enough for ERM, GroupDRO, eX2L, CORAL, ...
- ``training_step(batch, ctx)``: the general form; ``ctx`` (:class:`StepContext`) carries the epoch within the
  stage and the global step (IRM's and VREx's anneal), and the returned :class:`StepOutput` says which
  optimisers the loss steps (DANN alternates its discriminator's and the model's) and which have their moments
  cleared first (DomainBed's Adam reset when IRM's penalty weight jumps).
- ``configure_optimizers(build, stage)``: the optimisers, by name; ``"model"`` is built by the trainer from
  the run's ``optim`` section (``build``), others are the algorithm's own (DANN's discriminator).
- ``stages()``: the run as a list of :class:`Stage`; a ``train`` stage runs epochs of ``training_step``, a
  ``fit`` stage is one call of ``fit(stage, ctx)`` (DFR's last-layer fit). ``on_stage_start(stage, ctx)``
  looks at any split before a stage begins (JTT's error set) and may start the model afresh
  (``ctx.fresh_model()``). Only ``selectable`` stages are candidates for model selection.
- ``train_indices(stage, dataset)``: the samples (with repeats) an epoch of a stage iterates, shuffled by the
  trainer (JTT's upsampling); per-sample loss weights need no hook, every batch carries each sample's ``index``.
- ``evaluation_subset(split)``: samples of an evaluation split the algorithm fitted on, left out of its metrics
  (DFR fits on one half of ``val`` and is selected on the other).
- ``predict(x)`` (label logits), ``epoch_stats()`` (statistics of the epoch, reset on read).
- ``ddp_find_unused_parameters()``: True when a step may leave trainable parameters out of its loss (DANN's
  discriminator steps), for DDP.

Under DDP (``torchrun``, :mod:`ex2l_xai.distributed`) a step sees this rank's share of the global batch and DDP
averages the gradients over ranks: a loss that is a mean over the batch's samples needs nothing more. A loss
built from statistics of the whole batch sums them over ranks with
:func:`ex2l_xai.distributed.all_reduce_sum` (``differentiable=True``), as GroupDRO's group losses do.

State that must survive a resume lives in buffers or parameters (``state_dict``, saved in ``checkpoint.pt``).
The model is a :class:`~ex2l_xai.models.TwoHeadNet` (its ``best.pt`` is what the analysis layer loads); an
algorithm reads it only through ``model(x)`` (``label``, ``confounder``, ``latent``) and ``model.label_head``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.values import check_value

ALGORITHMS: dict[str, type[Algorithm]] = {}
"""The registry: algorithm name -> class (filled by :func:`register`)."""


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: add an algorithm to the registry under ``name``."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise ConfigError(f"algorithm {name!r} is registered twice ({ALGORITHMS[name].__module__}, {cls.__module__})")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


@dataclass
class Params:
    """Hyperparameters of an algorithm (subclasses add typed fields with defaults).

    A field may be ``int``, ``float``, ``bool``, ``str`` or an optional of one (``int | None``); ``CHOICES``
    names the allowed values of string fields; ``validate()`` checks ranges.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def needs_confounder_head(self) -> bool:
        """Whether the model needs a confounder head for this algorithm."""
        return False

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a value out of range (types are checked before)."""


@dataclass
class AnnealedPenaltyParams(Params):
    """A penalty of weight 1 for the first ``anneal_steps`` optimiser steps, then ``penalty_weight``; the model's
    optimiser state is cleared at the switch, as DomainBed rebuilds Adam (its IRM and VREx)."""

    penalty_weight: float = 1.0
    anneal_steps: int = 500

    def validate(self) -> None:
        if self.penalty_weight < 0:
            raise ConfigError(f"algorithm.penalty_weight: expected >= 0, got {self.penalty_weight}")
        if self.anneal_steps < 0:
            raise ConfigError(f"algorithm.anneal_steps: expected >= 0, got {self.anneal_steps}")

    def weight_at(self, step: int) -> tuple[float, tuple[str, ...]]:
        """The penalty's weight at global step ``step`` and the optimisers to reset before that step."""
        weight = self.penalty_weight if step >= self.anneal_steps else 1.0
        reset = ("model",) if step == self.anneal_steps and step > 0 else ()
        return weight, reset


@dataclass
class TrainInfo:
    """What an algorithm may know of the training split and the run.

    ``group_counts`` and ``env_counts`` are indexed by group id and environment id (0 where absent);
    ``seed``, ``epochs``, ``lr``, ``batch_size``, ``selection`` and ``init_from`` are the run's ``seed``,
    ``train.epochs``, ``optim.lr``, ``data.batch_size``, ``train.selection`` and ``model.init_from``.
    """

    n_labels: int
    n_confounders: int
    n_groups: int
    group_counts: list[int]
    n_samples: int = 0
    env_counts: list[int] = field(default_factory=list)
    env_names: list[str] = field(default_factory=list)
    seed: int = 0
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 64
    selection: str = "val_worst_group_acc"
    init_from: str | None = None

    @property
    def train_envs(self) -> list[int]:
        """Ids of the environments present in the training split."""
        return [e for e, n in enumerate(self.env_counts) if n > 0]


@dataclass(frozen=True)
class Stage:
    """One stage of a run: ``train`` (``epochs`` epochs of ``training_step``) or ``fit`` (one ``fit`` call,
    counted as one epoch). Evaluations of a stage that is not ``selectable`` are logged but never selected."""

    name: str
    epochs: int = 1
    kind: str = "train"
    selectable: bool = True


@dataclass(frozen=True)
class StepContext:
    """Where a training step is: ``epoch`` within its stage (0-based), ``step`` over the whole run (0-based
    index of this step), and the stage."""

    epoch: int
    step: int
    stage: Stage


@dataclass
class StepOutput:
    """A step's loss, its parts for the logs, the optimisers it steps and those whose state is cleared first."""

    loss: Tensor
    parts: dict[str, float]
    optimizers: tuple[str, ...] = ("model",)
    reset: tuple[str, ...] = ()


@dataclass
class StageContext:
    """What a stage hook may use: the datasets by split, the device, the run's seed, a non-shuffled loader over
    a split (``eval_loader("train")``) and the run's model as it was built at the start (``fresh_model()``)."""

    datasets: dict[str, Any]
    device: torch.device
    seed: int
    eval_loader: Callable[[str], Iterable[dict[str, Any]]]
    fresh_model: Callable[[], nn.Module]


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Algorithm(nn.Module):
    """A model plus how it is trained (see the module docstring for the hooks)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, model: TwoHeadNet, params: Params, info: TrainInfo) -> None:
        super().__init__()
        self.model = model
        self.params = params
        self.info = info

    # ---- the shape of the run -----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        """The stages of a run; by default one ``train`` stage of ``train.epochs`` epochs."""
        return [Stage("train", self.info.epochs)]

    def configure_optimizers(self, build: OptimizerFactory, stage: Stage) -> dict[str, torch.optim.Optimizer]:
        """The optimisers of ``stage`` by name; ``build`` makes the run's optimiser (``optim`` section)."""
        return {"model": build(self.parameters())}

    def on_stage_start(self, stage: Stage, ctx: StageContext) -> None:
        """Called once before a stage's first epoch (not again when a run resumes inside the stage)."""

    def train_indices(self, stage: Stage, dataset: Any) -> Sequence[int] | None:
        """Samples (repeats allowed) an epoch of ``stage`` iterates, in any order; None: every sample once."""
        return None

    # ---- a step -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> StepOutput:
        """One step's loss; by default :meth:`loss` at the epoch within the stage, stepping ``"model"``."""
        loss, parts = self.loss(batch, ctx.epoch)
        return StepOutput(loss, parts)

    def loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss of a batch and a dict of its parts (floats) for the logs."""
        raise NotImplementedError(f"algorithm {self.name!r} implements neither loss() nor training_step()")

    def fit(self, stage: Stage, ctx: StageContext) -> dict[str, float]:
        """Run a ``fit`` stage; returns its loss parts for the logs."""
        raise NotImplementedError(f"algorithm {self.name!r} has a fit stage {stage.name!r} but no fit()")

    # ---- evaluation ---------------------------------------------------------------------------------------
    def evaluation_subset(self, split: str) -> Sequence[int] | None:
        """Indices of ``split`` the metrics are taken on (None: all); the samples an algorithm fitted on are
        left out, so that model selection does not grade it on its own training data."""
        return None

    def predict(self, x: Tensor) -> Tensor:
        """Label logits."""
        return self.model(x).label

    def epoch_stats(self) -> dict[str, float]:
        """Statistics gathered over the epoch (reset on read)."""
        return {}

    # ---- distributed --------------------------------------------------------------------------------------
    def ddp_find_unused_parameters(self) -> bool:
        """Whether some step may leave a trainable parameter out of the loss (DDP must then look for them
        after every forward, ``find_unused_parameters=True``; it costs a walk of the graph). False: every step's
        loss reaches every parameter that requires grad."""
        return False


def params_from_dict(name: str, values: dict[str, Any]) -> Params:
    """Build the ``Params`` dataclass of algorithm ``name`` from a dict; unknown keys, wrong types and values out
    of range are :class:`ConfigError` naming the key."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: expected one of {sorted(ALGORITHMS)}, got {name!r}")
    cls = ALGORITHMS[name].Params
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"algorithm.{key}: unknown for {name}; known keys: {sorted(fields)}")
        kwargs[key] = check_value(value, hints[key], f"algorithm.{key}", cls.CHOICES.get(key))
    params = cls(**kwargs)
    params.validate()
    return params


def build_algorithm(name: str, model: TwoHeadNet, params: Params, info: TrainInfo) -> Algorithm:
    """Instantiate a registered algorithm."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: expected one of {sorted(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name](model, params, info)


# ---- helpers shared by several algorithms ----------------------------------------------------------------------
def group_ids(batch: dict[str, Tensor], n_confounders: int) -> Tensor:
    """Group id = label × n_confounders + confounder (docs/architecture.md)."""
    return batch["label"] * n_confounders + batch["confounder"]


def per_sample_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per sample."""
    return nn.functional.cross_entropy(logits, target, reduction="none")


def env_members(envs: Tensor, minimum: int = 1) -> list[Tensor]:
    """Indices of the batch's samples in each environment present (ascending env id), for environments with at
    least ``minimum`` samples in the batch."""
    out = []
    for e in torch.unique(envs):  # sorted
        idx = torch.nonzero(envs == e).flatten()
        if idx.numel() >= minimum:
            out.append(idx)
    return out


def env_risks(logits: Tensor, y: Tensor, members: list[Tensor]) -> Tensor:
    """Cross-entropy of each environment's samples (one entry per element of ``members``)."""
    return torch.stack([nn.functional.cross_entropy(logits[idx], y[idx]) for idx in members])


def require_train_envs(name: str, info: TrainInfo, minimum: int = 2) -> None:
    """ConfigError unless the training split holds at least ``minimum`` environments (the dataset's ``env``)."""
    present = info.train_envs
    if len(present) < minimum:
        names = [info.env_names[e] if e < len(info.env_names) else str(e) for e in present]
        raise ConfigError(
            f"algorithm.name={name}: needs at least {minimum} environments in the training split (the dataset's "
            f"env column), found {len(present)} ({', '.join(names) or 'none'}); use a dataset with several "
            "training environments (e.g. synthetic, spawrious, a csv with an env column) or a group-based "
            "algorithm (groupdro, jtt, dfr)"
        )


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "OptimizerFactory",
    "Params",
    "Stage",
    "StageContext",
    "StepContext",
    "StepOutput",
    "TrainInfo",
    "build_algorithm",
    "env_members",
    "env_risks",
    "group_ids",
    "params_from_dict",
    "per_sample_ce",
    "register",
    "require_train_envs",
]
