"""Typed configuration: dataclasses, YAML files, shipped presets and ``--set section.key=value`` overrides.

A configuration has six sections and a seed::

    seed: 0
    data:      {name, root, options: {...passed to get_dataset...}, batch_size, eval_batch_size, num_workers, cache}
    model:     {backbone, architecture, cam_layer, pretrained, width, freeze, cache_frozen, init_from}
    algorithm: {name, ...the algorithm's own keys...}
    optim:     {name, lr, weight_decay, momentum}
    schedule:  {name, step_size, gamma, warmup_epochs}
    train:     {epochs, device, selection, eval_every, quiet, deterministic, grad_clip}

:func:`load_config` reads a YAML file or a preset shipped in ``ex2l_xai/presets``, applies overrides and validates
everything; unknown keys and wrong types raise :class:`~ex2l_xai.errors.ConfigError` naming the key.
:func:`config_to_dict` gives the resolved configuration (every default filled in); loading it back gives an equal
:class:`Config`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ex2l_xai.errors import ConfigError
from ex2l_xai.values import SELECTION_METRIC, check_choice, check_value

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "SELECTION_METRIC",
    "apply_override",
    "check_value",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_config",
    "preset_path",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("val_worst_group_acc", "val_avg_acc", "val_worst_group_nll")
ARCHITECTURES = ("shared", "dual")


@dataclass
class DataConfig:
    """Dataset and loaders.

    ``options`` are passed to :func:`ex2l_xai.data.get_dataset` (``root`` too, when set). ``cache`` keeps every
    decoded sample of every split in memory after the first pass (for small datasets: the synthetic demo).
    ``confounders`` names a confounder table (:mod:`ex2l_xai.data.inferred`, written by ``ex2l infer-confounders``)
    whose ids replace the dataset's confounders on the splits it covers (GroupDRO's groups, eX2L's head).
    """

    name: str = "synthetic"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    confounders: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    cache: bool = False


@dataclass
class ModelConfig:
    """The two-head network (:class:`ex2l_xai.models.TwoHeadNet`).

    ``freeze`` keeps the stem and the stages up to the named one (``stem``, ``layer1`` ... ``layer3``) fixed;
    ``cache_frozen`` remembers their output per image (for in-memory datasets without random augmentation);
    ``init_from`` starts from a finished run's selected model (a run folder or its ``best.pt``).
    """

    backbone: str = "small_cnn"
    architecture: str = "shared"
    cam_layer: str = "layer4"
    pretrained: str = "none"
    width: int = 32
    freeze: str = "none"
    cache_frozen: bool = False
    init_from: str | None = None


@dataclass
class OptimConfig:
    """Optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per epoch: ``none``, ``cosine`` (to 0 at the last epoch) or ``step``
    (× ``gamma`` every ``step_size`` epochs), after a linear warm-up of ``warmup_epochs``."""

    name: str = "none"
    step_size: int = 10
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainConfig:
    """The loop: epochs, device (``auto`` = cuda if available), model selection and evaluation period.

    ``grad_clip`` > 0 clips the gradient norm; ``deterministic`` asks cuDNN/CUDA for deterministic kernels (CPU
    runs are deterministic anyway).
    """

    epochs: int = 10
    device: str = "auto"
    selection: str = "val_worst_group_acc"
    eval_every: int = 1
    quiet: bool = False
    deterministic: bool = True
    grad_clip: float = 0.0


@dataclass
class Config:
    """A whole training configuration. ``algorithm`` is ``{"name": ..., **params}`` with every parameter of the
    algorithm resolved (see :meth:`params`)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "erm"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def algorithm_name(self) -> str:
        """The algorithm's registry name."""
        return str(self.algorithm["name"])

    def params(self) -> Any:
        """The algorithm's validated ``Params`` dataclass."""
        from ex2l_xai.algorithms import params_from_dict

        rest = {k: v for k, v in self.algorithm.items() if k != "name"}
        return params_from_dict(self.algorithm_name, rest)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
}


# ---- presets ---------------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the presets shipped in ``ex2l_xai/presets``."""
    folder = resources.files("ex2l_xai") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """Path of preset ``name``; ConfigError listing the presets if there is none."""
    folder = resources.files("ex2l_xai") / "presets"
    candidate = folder / f"{name}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"config {name!r}: not a file and not a preset; expected a YAML path or one of {list_presets()}"
        )
    return Path(str(candidate))


# ---- loading ---------------------------------------------------------------------------------------------------
def load_config(file_or_preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a configuration.

    Parameters
    ----------
    file_or_preset : str, Path or None
        A YAML file, or the name of a shipped preset (``quick``, ``pretrained``, ``spawrious_m2m_hard``, ``waterbirds``);
        None starts from the defaults.
    overrides : list of str
        ``section.key=value`` strings (``data.options.image_size=32``, ``algorithm.name=erm``, ``seed=1``);
        the value is parsed with ``yaml.safe_load``. The file's algorithm options belong to its algorithm: an
        override naming another algorithm starts that one from its own defaults and the ``algorithm.*``
        overrides (``--config pretrained --set algorithm.name=erm`` is plain ERM, without the preset's eX2L
        options).

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        For a missing file or preset, bad YAML, an unknown key or a wrong type (the message names the key).
    """
    raw: dict[str, Any] = {}
    if file_or_preset is not None:
        path = Path(file_or_preset)
        if not path.is_file():
            if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
                raise ConfigError(
                    f"config file {str(path)!r} does not exist; expected a YAML file or a preset name "
                    f"({', '.join(list_presets())})"
                )
            path = preset_path(str(file_or_preset))
        raw = _read_yaml(path)
    base_algorithm = dict(raw["algorithm"]) if isinstance(raw.get("algorithm"), dict) else None
    for item in overrides:
        apply_override(raw, item)
    _drop_other_algorithms_options(raw, base_algorithm, overrides)
    return config_from_dict(raw)


def _drop_other_algorithms_options(raw: dict[str, Any], base: dict[str, Any] | None,
                                   overrides: list[str] | tuple[str, ...]) -> None:
    """A file's (or preset's) algorithm options belong to its algorithm: when the overrides name another
    algorithm, that one starts from its own defaults, keeping only the ``algorithm.*`` overrides (the ``pretrained``
    preset's eX2L options do not reach ``--set algorithm.name=erm``)."""
    if not base or not isinstance(raw.get("algorithm"), dict) or raw["algorithm"].get("name") == base.get("name"):
        return
    given = {item.partition("=")[0].strip().split(".", 2)[1] for item in overrides
             if item.partition("=")[0].strip().startswith("algorithm.")}
    raw["algorithm"] = {k: v for k, v in raw["algorithm"].items() if k == "name" or k in given}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: cannot read it ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid YAML ({exc})".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw (not yet validated) config dict, in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {text!r} ({exc})".replace("\n", " ")) from exc
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a raw dict (as read from YAML) into a :class:`Config`; ConfigError names any bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    known = {"seed", "algorithm", *_SECTIONS}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown section; expected one of {sorted(known)}")
    kwargs: dict[str, Any] = {}
    if "seed" in raw:
        kwargs["seed"] = check_value(raw["seed"], int, "seed")
        if kwargs["seed"] < 0:
            raise ConfigError(f"seed: expected an integer >= 0, got {kwargs['seed']}")
    for name, cls in _SECTIONS.items():
        section = raw.get(name)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {section!r}")
        kwargs[name] = _build_section(name, cls, section)
    kwargs["algorithm"] = _build_algorithm(raw.get("algorithm"))
    config = Config(**kwargs)
    _validate(config)
    return config


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key; expected one of {sorted(fields)}")
        out[key] = check_value(value, hints[key], f"{name}.{key}")
    return cls(**out)


def _build_algorithm(section: Any) -> dict[str, Any]:
    from ex2l_xai.algorithms import ALGORITHMS, params_from_dict

    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"algorithm: expected a mapping of keys, got {section!r}")
    name = section.get("name", "erm")
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: expected one of {sorted(ALGORITHMS)}, got {name!r}")
    rest = {k: v for k, v in section.items() if k != "name"}
    params = params_from_dict(name, rest)
    return {"name": name, **dataclasses.asdict(params)}


def _at_least(key: str, value: float, minimum: float, strict: bool = False) -> None:
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{key}: expected a value {'>' if strict else '>='} {minimum}, got {value}")


def _validate(c: Config) -> None:
    from ex2l_xai.backbones import BACKBONES, STAGES
    from ex2l_xai.data import DATASETS, dataset_options

    FREEZE_POINTS = ("none", *STAGES[:-1])

    if c.data.name not in DATASETS:
        raise ConfigError(f"data.name: expected one of {sorted(DATASETS)}, got {c.data.name!r}")
    known = {k: v for k, v in dataset_options(c.data.name).items() if k != "transform"}  # callables: Python only
    for key in c.data.options:
        if key == "root" or key not in known:
            hint = "use data.root" if key == "root" else f"expected one of {sorted(k for k in known if k != 'root')}"
            raise ConfigError(f"data.options.{key}: unknown option of dataset {c.data.name!r}; {hint}")
    if c.data.root is not None and "root" not in known:
        raise ConfigError(f"data.root: dataset {c.data.name!r} takes no root (it is built in); remove the key")
    if c.data.confounders is not None and not Path(c.data.confounders).is_file():
        raise ConfigError(f"data.confounders: {c.data.confounders!r} is not a file; expected a confounder table "
                          "(a CSV written by `ex2l infer-confounders`)")
    _at_least("data.batch_size", c.data.batch_size, 1)
    _at_least("data.eval_batch_size", c.data.eval_batch_size, 1)
    _at_least("data.num_workers", c.data.num_workers, 0)
    check_choice("model.backbone", c.model.backbone, BACKBONES)
    check_choice("model.architecture", c.model.architecture, ARCHITECTURES)
    check_choice("model.freeze", c.model.freeze, FREEZE_POINTS)
    if c.data.options.get("normalize") is True:
        raise ConfigError(
            "data.options.normalize: true would normalise twice: the model normalises its own input with the "
            "statistics its backbone's weights expect; remove the key"
        )
    _at_least("model.width", c.model.width, 1)
    check_choice("optim.name", c.optim.name, OPTIMIZERS)
    _at_least("optim.lr", c.optim.lr, 0.0, strict=True)
    _at_least("optim.weight_decay", c.optim.weight_decay, 0.0)
    _at_least("optim.momentum", c.optim.momentum, 0.0)
    check_choice("schedule.name", c.schedule.name, SCHEDULES)
    _at_least("schedule.step_size", c.schedule.step_size, 1)
    _at_least("schedule.gamma", c.schedule.gamma, 0.0, strict=True)
    _at_least("schedule.warmup_epochs", c.schedule.warmup_epochs, 0)
    _at_least("train.epochs", c.train.epochs, 1)
    if c.train.device not in DEVICES and not c.train.device.startswith("cuda:"):
        raise ConfigError(f"train.device: expected one of {list(DEVICES)} or cuda:N, got {c.train.device!r}")
    check_choice("train.selection", c.train.selection, SELECTIONS)
    _at_least("train.eval_every", c.train.eval_every, 1)
    _at_least("train.grad_clip", c.train.grad_clip, 0.0)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved configuration as plain YAML-able types (what ``config.yaml`` holds)."""
    out: dict[str, Any] = {"seed": config.seed}
    for name in ("data", "model"):
        out[name] = dataclasses.asdict(getattr(config, name))
    out["algorithm"] = copy.deepcopy(dict(config.algorithm))
    for name in ("optim", "schedule", "train"):
        out[name] = dataclasses.asdict(getattr(config, name))
    return out


def dump_config(config: Config) -> str:
    """``config_to_dict`` as YAML text (sections in a fixed order)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
