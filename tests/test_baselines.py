"""The eight baselines on cases whose answers are known before the code runs: CORAL, MMD, IRM, VREx, DANN,
Mixup, JTT and DFR; the data each needs; and each of the eleven algorithms training through `ex2l train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ex2l_xai.algorithms import ALGORITHMS, Stage, StageContext, StepContext, TrainInfo, build_algorithm
from ex2l_xai.algorithms import params_from_dict as params
from ex2l_xai.algorithms.coral import coral_distance
from ex2l_xai.algorithms.dfr import balanced_subsample, split_halves
from ex2l_xai.algorithms.irm import irm_penalty
from ex2l_xai.algorithms.mixup import mixup_loss, random_pairs
from ex2l_xai.algorithms.mmd import GAMMAS, gaussian_mmd
from ex2l_xai.algorithms.vrex import vrex_penalty
from ex2l_xai.cli import main
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.train import build_model, load_run_config, optimizer_step

ELEVEN = ("erm", "groupdro", "ex2l", "irm", "vrex", "coral", "mmd", "dann", "mixup", "jtt", "dfr")
INFO = TrainInfo(n_labels=4, n_confounders=6, n_groups=24, group_counts=[5] * 24, n_samples=12,
                 env_counts=[6, 6, 0], env_names=["train_env1", "train_env2", "test"], lr=0.01)


def _alg(name: str, info: TrainInfo = INFO, model: TwoHeadNet | None = None, **hp):
    p = params(name, hp)
    torch.manual_seed(0)
    model = model or TwoHeadNet("small_cnn", info.n_labels, 6 if p.needs_confounder_head() else 0, width=8)
    return build_algorithm(name, model, p, info)


def _batch(n: int = 12, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 3, size, size, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
        "confounder": torch.randint(0, 6, (n,), generator=g),
        "env": torch.arange(n) % 2,
        "index": torch.arange(n),
    }


# ---- CORAL and MMD ---------------------------------------------------------------------------------------------
def test_coral_is_zero_for_equal_moments_and_the_squared_mean_shift_otherwise() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert coral_distance(x, x[torch.randperm(50)]).item() == pytest.approx(0.0, abs=1e-12)
    assert coral_distance(x, -x + 2 * x.mean(0)).item() == pytest.approx(0.0, abs=1e-12)  # reflected: same moments
    shift = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    assert coral_distance(x, x + shift).item() == pytest.approx((1 + 4 + 0 + 9) / 4, rel=1e-12)
    assert coral_distance(x, 2 * x).item() > 0.01  # same mean direction, four times the covariance


def test_gaussian_mmd_known_values() -> None:
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert gaussian_mmd(x, x).item() == pytest.approx(0.0, abs=1e-12)
    a, b = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[0.3, 0.4]], dtype=torch.float64)  # distance 0.5
    expected = 2 * len(GAMMAS) - 2 * sum(math.exp(-g * 0.25) for g in GAMMAS)
    assert gaussian_mmd(a, b).item() == pytest.approx(expected, rel=1e-12)
    assert gaussian_mmd(x, x + 1.0).item() > 0.1


@pytest.mark.parametrize("name", ["coral", "mmd"])
def test_matching_step_adds_gamma_times_the_penalty_between_environments(name: str) -> None:
    alg = _alg(name, gamma=2.0)
    batch = _batch()
    out = alg.training_step(batch, StepContext(0, 0, Stage("train")))
    with torch.no_grad():
        o = alg.model(batch["image"])
    e0, e1 = batch["env"] == 0, batch["env"] == 1
    risks = [F.cross_entropy(o.label[m], batch["label"][m]) for m in (e0, e1)]
    d = coral_distance if name == "coral" else gaussian_mmd
    penalty = d(o.latent[e0], o.latent[e1])
    assert out.parts["penalty"] == pytest.approx(penalty.item(), rel=1e-4) and penalty.item() > 0
    assert out.loss.item() == pytest.approx((sum(risks) / 2 + 2.0 * penalty).item(), rel=1e-5)


# ---- IRM and VREx ----------------------------------------------------------------------------------------------
def _irm_case(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both halves (even and odd positions) hold 3 of 4 samples of class 0, and every logit vector is (t, 0):
    the classifier scale s = 1 is optimal exactly when sigmoid(t) = 3/4, i.e. t = ln 3."""
    y = torch.tensor([0, 0, 0, 1, 0, 0, 1, 0])
    logits = torch.tensor([[t, 0.0]], dtype=torch.float64).repeat(8, 1)
    return logits, y


def test_irm_penalty_is_zero_at_the_optimal_scale_and_the_squared_gradient_elsewhere() -> None:
    assert irm_penalty(*_irm_case(math.log(3))).item() == pytest.approx(0.0, abs=1e-12)
    t = math.log(9)  # sigmoid(t) = 0.9: dR/ds = t (1/4 · 0.9 - 3/4 · 0.1) in both halves
    assert irm_penalty(*_irm_case(t)).item() == pytest.approx((t * 0.15) ** 2, rel=1e-9)


def test_irm_anneals_by_step_and_resets_the_optimiser_at_the_switch() -> None:
    alg = _alg("irm", penalty_weight=100.0, anneal_steps=3)
    batch = _batch()
    outs = [alg.training_step(batch, StepContext(0, s, Stage("train"))) for s in (0, 2, 3, 4)]
    assert [o.parts["penalty_weight"] for o in outs] == [1.0, 1.0, 100.0, 100.0]
    assert [o.reset for o in outs] == [(), (), ("model",), ()]
    p, nll = outs[2].parts["penalty"], outs[2].parts["nll"]
    assert p != 0 and outs[2].loss.item() == pytest.approx(nll + 100.0 * p, rel=1e-5)  # a product: any sign


def test_vrex_penalty_is_the_variance_of_the_environment_risks() -> None:
    assert vrex_penalty(torch.tensor([1.0, 3.0])).item() == pytest.approx(1.0)
    assert vrex_penalty(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    alg = _alg("vrex", penalty_weight=10.0, anneal_steps=0)
    batch = _batch()
    out = alg.training_step(batch, StepContext(0, 0, Stage("train")))
    with torch.no_grad():
        logits = alg.model(batch["image"]).label
    risks = np.array([F.cross_entropy(logits[batch["env"] == e], batch["label"][batch["env"] == e]).item()
                      for e in (0, 1)])
    assert out.parts["penalty"] == pytest.approx(np.var(risks), rel=1e-4) and np.var(risks) > 0
    assert out.loss.item() == pytest.approx(risks.mean() + 10.0 * np.var(risks), rel=1e-5)


# ---- DANN ------------------------------------------------------------------------------------------------------
def test_dann_model_step_reverses_the_discriminator_feature_gradient() -> None:
    alg = _alg("dann", adv_weight=0.5)
    z = torch.randn(12, alg.model.latent_dim, requires_grad=True)
    y, d = torch.randint(0, 4, (12,)), torch.arange(12) % 2
    loss, ce, disc = alg.generator_loss(alg.model.label_head(z), z, y, d)
    (g_total,) = torch.autograd.grad(loss, z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(alg.model.label_head(z), y), z)
    (g_disc,) = torch.autograd.grad(alg.discriminator_loss(z, d), z)
    assert g_disc.abs().sum() > 0
    torch.testing.assert_close(g_total - g_ce, -0.5 * g_disc)
    assert loss.item() == pytest.approx(ce.item() - 0.5 * disc.item(), rel=1e-6)


def test_dann_alternates_and_each_step_moves_only_its_own_networks() -> None:
    model = TwoHeadNet("small_cnn", 4, 0, width=8, freeze="layer1")
    alg = _alg("dann", model=model, d_steps_per_g_step=1)
    assert [alg.is_discriminator_step(s) for s in range(4)] == [False, True, False, True]  # DomainBed's order
    opts = alg.configure_optimizers(lambda ps: torch.optim.SGD(ps, lr=0.1), Stage("train"))
    assert all(p.requires_grad for g in opts["disc"].param_groups for p in g["params"])
    batch = _batch()

    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    for step, moved in ((1, "disc"), (0, "model")):
        before_model, before_disc = snapshot(alg.model), snapshot(alg.discriminator)
        out = alg.training_step(batch, StepContext(0, step, Stage("train")))
        optimizer_step(out, opts, grad_clip=0.0)
        model_moved = any(not torch.equal(v, alg.model.state_dict()[k]) for k, v in before_model.items()
                          if "running" not in k and "num_batches" not in k)
        disc_moved = any(not torch.equal(v, alg.discriminator.state_dict()[k]) for k, v in before_disc.items())
        assert (model_moved, disc_moved) == (moved == "model", moved == "disc")
    frozen = list(alg.model.backbone.layer1.parameters())
    assert frozen and all(p.grad is None for p in frozen)  # the frozen prefix never gets a gradient


# ---- Mixup -----------------------------------------------------------------------------------------------------
def test_mixup_loss_and_environment_pairs() -> None:
    alg = _alg("mixup")
    b = _batch()
    x, y = b["image"], b["label"]
    alg.eval()  # batch norms in eval mode: the same input gives the same logits
    torch.testing.assert_close(mixup_loss(alg.model, x, y, x.flip(0), y.flip(0), 1.0),
                               F.cross_entropy(alg.model(x).label, y))
    logits = alg.model(0.3 * x + 0.7 * x.flip(0)).label
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y.flip(0))
    torch.testing.assert_close(mixup_loss(alg.model, x, y, x.flip(0), y.flip(0), 0.3), expected)
    members = [torch.tensor([0, 2, 4]), torch.tensor([1, 3]), torch.tensor([5, 6, 7, 8])]
    pairs = random_pairs(members)
    assert len(pairs) == 3 and all(a.numel() == b.numel() for a, b in pairs)
    assert sorted(min(len(m) for m in (a, b)) for a, b in pairs) == [2, 2, 3]  # each env next to one other


def test_mixup_batch_mode_uses_one_beta_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    alg = _alg("mixup", mix="batch")
    alg.eval()
    monkeypatch.setattr(np.random, "beta", lambda a, b: 0.25)
    b = _batch()
    torch.manual_seed(5)
    out = alg.training_step(b, StepContext(0, 0, Stage("train")))
    torch.manual_seed(5)
    perm = torch.randperm(12)
    expected = mixup_loss(alg.model, b["image"], b["label"], b["image"][perm], b["label"][perm], 0.25)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---- JTT -------------------------------------------------------------------------------------------------------
class _Samples(torch.utils.data.Dataset):
    def __init__(self, labels: list[int], confounders: list[int], size: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.items = [{"image": torch.rand(3, size, size, generator=g), "label": lab, "confounder": c, "env": 0,
                       "index": i} for i, (lab, c) in enumerate(zip(labels, confounders, strict=True))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _ctx(datasets: dict, fresh: TwoHeadNet) -> StageContext:
    return StageContext(datasets=datasets, device=torch.device("cpu"), seed=0,
                        eval_loader=lambda split: DataLoader(datasets[split], batch_size=5), fresh_model=lambda: fresh)


def _always_class_0(model: TwoHeadNet) -> TwoHeadNet:
    with torch.no_grad():
        model.label_head.weight.zero_()
        model.label_head.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    return model


@pytest.mark.parametrize("upweight", ["loss", "sample"])
def test_jtt_error_set_and_upweighting_on_a_planted_case(upweight: str) -> None:
    labels = [0, 1, 2, 0, 3, 0, 1, 0, 0, 2]  # a model that always says 0 misses 5 of them
    info = TrainInfo(4, 2, 8, [1] * 8, n_samples=10, env_counts=[10], epochs=2)
    alg = _alg("jtt", info, lambda_up=3.0, upweight=upweight)
    assert [(s.name, s.epochs, s.selectable) for s in alg.stages()] == [("identify", 2, False), ("retrain", 2, True)]
    _always_class_0(alg.model)
    fresh = TwoHeadNet("small_cnn", 4, 0, width=8)
    train = _Samples(labels, [0] * 10)
    retrain = alg.stages()[1]
    alg.on_stage_start(retrain, _ctx({"train": train}, fresh))
    assert alg.error_set.tolist() == [y != 0 for y in labels]
    for k, v in fresh.state_dict().items():  # retraining starts from the initial weights
        assert torch.equal(alg.model.state_dict()[k], v), k
    idx = alg.train_indices(retrain, train)
    b = {k: torch.stack([torch.as_tensor(train[i][k]) for i in range(10)]) for k in ("image", "label", "index")}
    out = alg.training_step(b, StepContext(0, 0, retrain))
    losses = F.cross_entropy(alg.model(b["image"]).label, b["label"], reduction="none")
    if upweight == "sample":
        assert len(idx) == 10 + 2 * 5 and np.bincount(idx).tolist() == [1 if y == 0 else 3 for y in labels]
        assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-5)
    else:
        assert idx is None
        assert alg.sample_weights(b["index"]).tolist() == [1.0 if y == 0 else 3.0 for y in labels]
        weighted = (losses * torch.tensor([1.0 if y == 0 else 3.0 for y in labels])).mean()
        assert out.loss.item() == pytest.approx(weighted.item(), rel=1e-5)
    assert alg.epoch_stats() == {"error_set": 5.0, "error_share": 0.5}
    assert alg.train_indices(alg.stages()[0], train) is None  # identification: plain ERM


def test_jtt_upsampling_needs_an_integer_factor() -> None:
    with pytest.raises(ConfigError, match="algorithm.lambda_up: upweight=sample .* integer"):
        params("jtt", {"upweight": "sample", "lambda_up": 2.5})


# ---- DFR -------------------------------------------------------------------------------------------------------
def test_dfr_halves_and_group_balance() -> None:
    groups = np.array([0] * 10 + [1] * 4 + [2] * 7)
    fit, select = split_halves(groups, seed=0)
    assert set(fit).isdisjoint(select) and len(fit) + len(select) == len(groups)
    assert np.bincount(groups[fit]).tolist() == [5, 2, 3] and np.bincount(groups[select]).tolist() == [5, 2, 4]
    bal = balanced_subsample(fit, groups, seed=0)
    assert np.bincount(groups[bal]).tolist() == [2, 2, 2] and set(bal) <= set(fit)
    again = split_halves(groups, seed=0)
    assert np.array_equal(again[0], fit) and not np.array_equal(split_halves(groups, seed=1)[0], fit)


def test_dfr_changes_only_the_last_layer_fits_balanced_and_selects_on_the_other_half() -> None:
    labels = [0, 1] * 12
    confs = [0] * 16 + [1] * 8  # groups (label, confounder): 0/0 x8, 1/0 x8, 0/1 x4, 1/1 x4
    info = TrainInfo(2, 2, 4, [1] * 4, n_samples=24, env_counts=[24], epochs=1, batch_size=4)
    alg = _alg("dfr", info, fit_steps=30, select_every=10)
    assert [(s.name, s.kind, s.selectable) for s in alg.stages()] == [("erm", "train", False),
                                                                      ("last_layer", "fit", True)]
    val = _Samples(labels, confs)
    before = {k: v.clone() for k, v in alg.model.state_dict().items()}
    assert alg.evaluation_subset("val") is None
    parts = alg.fit(alg.stages()[1], _ctx({"val": val}, alg.model))
    after = alg.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["label_head.bias", "label_head.weight"]
    stats = alg.epoch_stats()
    assert stats["fit_group_size"] == 2.0 and stats["fit_samples"] == 8.0  # 4 groups x the smallest (4 // 2)
    held = alg.evaluation_subset("val")
    groups = np.array(labels) * 2 + np.array(confs)
    fit_half, select_half = split_halves(groups, seed=0)
    assert held == sorted(select_half.tolist()) and len(held) == 12
    assert alg.evaluation_subset("test") is None
    assert parts["loss"] == pytest.approx(parts["ce"] + 0.1 * parts["l1"], rel=1e-6)


def test_dfr_without_erm_epochs_needs_a_trained_model() -> None:
    with pytest.raises(ConfigError, match="model.init_from"):
        _alg("dfr", erm_epochs=0)
    info = TrainInfo(4, 6, 24, [5] * 24, init_from="runs/erm")
    assert [s.name for s in _alg("dfr", info, erm_epochs=0).stages()] == ["last_layer"]


# ---- what each needs of the data -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["irm", "vrex", "coral", "mmd", "dann", "mixup"])
def test_environment_methods_refuse_one_training_environment(name: str) -> None:
    one_env = TrainInfo(4, 6, 24, [5] * 24, env_counts=[12, 0], env_names=["land", "water"])
    with pytest.raises(ConfigError, match=rf"algorithm.name={name}: needs at least 2 environments .* found 1 \(land\)"):
        _alg(name, one_env)
    if name == "mixup":
        _alg(name, one_env, mix="batch")  # within-batch mixup needs no environments


def test_mixup_refuses_the_frozen_prefix_cache() -> None:
    model = TwoHeadNet("small_cnn", 4, 0, width=8, freeze="layer1", cache_frozen=True)
    with pytest.raises(ConfigError, match="cache_frozen"):
        _alg("mixup", model=model)


def _one_env_csv(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    rows = ["path,label,confounder,env,split"]
    for i in range(24):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{i % 2},{(i // 2) % 2},0,{('train', 'val', 'test')[i % 3]}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_one_environment_is_a_one_line_error_of_ex2l_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _one_env_csv(tmp_path / "data")
    sets = ["data.name=csv", f"data.root={root}", "data.options={image_size: 16}", "data.batch_size=4",
            "model.width=8", "train.epochs=1", "train.device=cpu", "algorithm.name=vrex"]
    argv = ["train", "--config", "quick", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*argv, *[f"--set={s}" for s in sets]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ex2l: error: algorithm.name=vrex: needs at least 2 environments") and err.count("\n") == 1


# ---- every algorithm through `ex2l train` ----------------------------------------------------------------------
def test_the_registry_holds_the_eleven() -> None:
    assert set(ELEVEN) <= set(ALGORITHMS)


@pytest.mark.parametrize("name", ELEVEN)
def test_each_algorithm_trains_through_ex2l_train(name: str, tmp_path: Path) -> None:
    run = tmp_path / name
    sets = [*TINY, f"algorithm.name={name}", "train.epochs=2"]
    if name == "dfr":
        sets.append("algorithm.fit_steps=20")
    assert main(["train", "--config", "quick", "--out", str(run), "--quiet", *[f"--set={s}" for s in sets]]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["algorithm"] == name and (run / "done").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    staged = name in ("jtt", "dfr")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4][: 3 if name == "dfr" else 4 if name == "jtt" else 2]
    assert all(("stage" in r) == staged for r in records)
    assert records[-1]["step"] > 0 and all(math.isfinite(v) for r in records for v in r["loss"].values())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == records[-1]["epoch"]
    config = load_run_config(run)
    torch.manual_seed(config.seed)
    initial = build_model(config, 4, 6).state_dict()["label_head.weight"]
    assert not torch.equal(ckpt["algorithm"]["model.label_head.weight"], initial)  # the label head was trained
    if staged:  # the model is selected in the last stage only
        last = "retrain" if name == "jtt" else "last_layer"
        assert records[results["selected_epoch"] - 1]["stage"] == last
