"""The algorithm interface and registry: one small class per training algorithm."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: add an algorithm to the registry under ``name``."""

    def deco(cls: type[Algorithm]) -> type[Algorithm]:
        if name in ALGORITHMS:
            raise ConfigError(f"algorithm {name!r} is registered twice")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return deco


@dataclass
class Params:
    """Hyperparameters common to every algorithm (subclasses add their own)."""

    def needs_confounder_head(self) -> bool:
        """Whether the model needs a confounder head for this algorithm."""
        return False


@dataclass
class TrainInfo:
    """What an algorithm may know of the training set."""

    n_labels: int
    n_confounders: int
    n_groups: int
    group_counts: list[int]


class Algorithm(nn.Module):
    """A model plus its training loss.

    ``loss(batch, epoch)`` returns the scalar loss and a dict of its parts (floats) for the logs;
    ``predict(x)`` returns label logits; ``epoch_stats()`` returns per-epoch statistics and resets them.
    Buffers (e.g. GroupDRO's q) live in ``state_dict()`` and so in the checkpoints.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, model: TwoHeadNet, params: Params, info: TrainInfo) -> None:
        super().__init__()
        self.model = model
        self.params = params
        self.info = info

    def loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Label logits."""
        return self.model(x).label

    def epoch_stats(self) -> dict[str, float]:
        """Statistics gathered over the epoch (reset on read)."""
        return {}


def params_from_dict(name: str, values: dict[str, Any]) -> Params:
    """Build the ``Params`` dataclass of algorithm ``name`` from a dict; unknown keys and wrong types are errors
    naming the key."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: expected one of {sorted(ALGORITHMS)}, got {name!r}")
    cls = ALGORITHMS[name].Params
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"algorithm.{key}: unknown for {name}; known keys: {sorted(fields)}")
        kwargs[key] = _coerce(f"algorithm.{key}", value, fields[key].type, getattr(cls, "CHOICES", {}).get(key))
    params = cls(**kwargs)
    validate = getattr(params, "validate", None)
    if validate is not None:
        validate()
    return params


def _coerce(key: str, value: Any, annotation: Any, choices: tuple[str, ...] | None) -> Any:
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if ann == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if ann == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if ann == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    return value


def build_algorithm(name: str, model: TwoHeadNet, params: Params, info: TrainInfo) -> Algorithm:
    """Instantiate a registered algorithm."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: expected one of {sorted(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name](model, params, info)


def group_ids(batch: dict[str, Tensor], n_confounders: int) -> Tensor:
    """Group id = label × n_confounders + confounder (DESIGN.md)."""
    return batch["label"] * n_confounders + batch["confounder"]


def per_sample_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per sample."""
    return nn.functional.cross_entropy(logits, target, reduction="none")


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Params",
    "TrainInfo",
    "build_algorithm",
    "group_ids",
    "params_from_dict",
    "per_sample_ce",
    "register",
]

