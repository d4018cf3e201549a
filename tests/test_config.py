from pathlib import Path

import pytest
import yaml

from ex2l_xai.config import Config, check_value, config_to_dict, dump_config, list_presets, load_config
from ex2l_xai.errors import ConfigError


def test_presets_ship_and_load() -> None:
    assert {"quick", "spawrious_m2m_hard", "waterbirds"} <= set(list_presets())
    quick = load_config("quick")
    assert quick.data.name == "synthetic" and quick.data.options["challenge"] == "m2m_hard"
    assert quick.model.backbone == "small_cnn" and quick.train.device == "cpu"
    assert quick.algorithm["name"] == "ex2l" and "penalty_weight" in quick.algorithm  # defaults resolved
    spaw = load_config("spawrious_m2m_hard")
    assert spaw.model.backbone == "resnet50" and spaw.model.pretrained == "imagenet"
    assert spaw.data.name == "spawrious" and spaw.data.options["challenge"] == "m2m_hard"
    assert spaw.train.device == "auto"
    wb = load_config("waterbirds")
    assert wb.data.name == "waterbirds" and wb.model.backbone == "resnet50"


def test_defaults_without_file() -> None:
    c = load_config(None)
    assert c == Config(algorithm={"name": "erm", "conf_weight": 0.0, "conf_detach": False})
    assert c.train.selection == "val_worst_group_acc" and c.train.eval_every == 1


def test_overrides() -> None:
    c = load_config(
        "quick",
        [
            "train.epochs=3",
            "optim.lr=1",  # an int is accepted as a float
            "optim.name=sgd",
            "data.options.image_size=48",
            "algorithm.name=groupdro",
            "algorithm.eta=0.1",
            "seed=7",
            "data.root=null",
            "train.quiet=true",
        ],
    )
    assert c.train.epochs == 3 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.optim.name == "sgd" and c.data.options["image_size"] == 48 and c.seed == 7
    assert c.algorithm == {"name": "groupdro", "eta": 0.1, "adjustment": 0.0}
    assert c.params().eta == 0.1 and c.train.quiet is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=ten", "train.epochs: expected an integer, got 'ten'"),
        ("train.epoch=3", "train.epoch: unknown key"),
        ("trian.epochs=3", "trian: unknown section"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("train.quiet=maybe", "train.quiet: expected true or false"),
        ("optim.name=rmsprop", "optim.name: expected one of"),
        ("schedule.name=linear", "schedule.name: expected one of"),
        ("train.selection=test_acc", "train.selection: expected one of"),
        ("train.device=tpu", "train.device: expected one of"),
        ("train.epochs=0", "train.epochs: expected a value >= 1"),
        ("optim.lr=0", "optim.lr: expected a value > 0"),
        ("model.backbone=vgg", "model.backbone: expected one of"),
        ("data.options.colour=red", "data.options.colour: unknown option"),
        ("data.name=imagenet", "data.name: expected one of"),
        ("data.options=3", "data.options: expected a mapping"),
        ("algorithm.name=sgd", "algorithm.name: expected one of"),
        ("algorithm.penalty_weight=high", "algorithm.penalty_weight: expected a number"),
        ("algorithm.similarity=l2", "algorithm.similarity: expected one of"),
        ("seed=-1", "seed: expected an integer >= 0"),
        ("data.root=3", "data.root: expected a string or null, got 3"),
        ("model.init_from=[1]", "model.init_from: expected a string or null, got [1]"),
        ("train", "expected section.key=value"),
        ("train.=3", "expected section.key=value"),
        ("train.epochs.max=3", "train.epochs is not a section"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("quick", [override])
    assert message in str(info.value)


def test_algorithm_keys_follow_the_algorithm() -> None:
    # the quick preset's algorithm section is only its name, so switching algorithm needs nothing else
    assert load_config("quick", ["algorithm.name=erm"]).algorithm["name"] == "erm"
    with pytest.raises(ConfigError, match=r"algorithm\.penalty_weight: unknown for erm"):
        load_config("quick", ["algorithm.name=erm", "algorithm.penalty_weight=0.5"])


def test_a_files_algorithm_options_belong_to_its_algorithm(tmp_path: Path) -> None:
    """A file's eX2L options apply to eX2L (also when the override names eX2L again); an override naming another
    algorithm starts it from its own defaults plus the algorithm.* overrides, which are still checked."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"name": "ex2l", "variant": "channel", "penalty_weight": 1.0,
                                                  "conf_detach": True}}))
    same = load_config(path, ["algorithm.name=ex2l", "algorithm.penalty_weight=0.5"]).algorithm
    assert (same["variant"], same["penalty_weight"], same["conf_detach"]) == ("channel", 0.5, True)
    erm = load_config(path, ["algorithm.name=erm"]).algorithm
    assert erm == load_config(None, ["algorithm.name=erm"]).algorithm and erm["conf_detach"] is False
    assert load_config(path, ["algorithm.name=erm", "algorithm.conf_detach=true"]).algorithm["conf_detach"] is True
    paper = load_config(path, ["algorithm.name=groupdro"]).algorithm
    assert "variant" not in paper and "penalty_weight" not in paper
    with pytest.raises(ConfigError, match=r"algorithm\.variant: unknown for erm"):
        load_config(path, ["algorithm.name=erm", "algorithm.variant=paper"])


def test_bad_preset_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'quik': not a file and not a preset"):
        load_config("quik")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  backbone: small_cnn\n  widht: 8\n")
    with pytest.raises(ConfigError, match="model.widht: unknown key"):
        load_config(typo)


@pytest.mark.parametrize("preset", ["quick", "spawrious_m2m_hard", "waterbirds"])
def test_resolved_config_round_trips(tmp_path: Path, preset: str) -> None:
    c = load_config(preset, ["algorithm.name=ex2l", "algorithm.warmup_epochs=2", "data.options.image_size=112"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(c))
    again = load_config(path)
    assert again == c
    assert config_to_dict(again) == yaml.safe_load(path.read_text())
    assert list(config_to_dict(c)) == ["seed", "data", "model", "algorithm", "optim", "schedule", "train"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.name=dann", "algorithm.lr_d=fast"], "algorithm.lr_d: expected a number or null, got 'fast'"),
        (["algorithm.name=jtt", "algorithm.identify_epochs=1.5"],
         "algorithm.identify_epochs: expected an integer or null, got 1.5"),
        (["algorithm.name=jtt", "algorithm.upweight=often"], "algorithm.upweight: expected one of ['loss', 'sample']"),
        (["algorithm.name=mixup", "algorithm.mix=true"], "algorithm.mix: expected a string, got True"),
        (["algorithm.name=irm", "algorithm.anneal_steps=-1"], "algorithm.anneal_steps: expected >= 0, got -1"),
    ],
)
def test_algorithm_params_share_the_one_type_checker(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("quick", overrides)
    assert message in str(info.value)


def test_optional_algorithm_params_take_null_and_numbers() -> None:
    c = load_config("quick", ["algorithm.name=dann", "algorithm.lr_d=1"])
    assert c.algorithm["lr_d"] == 1.0 and isinstance(c.algorithm["lr_d"], float)
    assert load_config("quick", ["algorithm.name=jtt", "algorithm.identify_epochs=null"]).params().identify_epochs is None
    assert check_value(None, float | None, "k") is None
    assert check_value(2, float, "k") == 2.0 and check_value("a", str, "k", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match=r"k: expected one of \['a', 'b'\], got 'c'"):
        check_value("c", str, "k", ("a", "b"))
    with pytest.raises(ConfigError, match="k: expected true or false, got 1"):
        check_value(1, bool, "k")
    with pytest.raises(TypeError, match="unsupported annotation"):
        check_value(1, list, "k")  # a programming error in a dataclass, not the user's
