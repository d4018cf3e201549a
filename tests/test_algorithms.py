"""Algorithms: registry, GroupDRO's update by hand, eX2L's options and their gradients."""

import math

import pytest
import torch
from torch.nn import functional as F

from ex2l_xai.algorithms import ALGORITHMS, TrainInfo, build_algorithm, params_from_dict
from ex2l_xai.algorithms.ex2l import Ex2l, Ex2lParams
from ex2l_xai.algorithms.groupdro import GroupDRO, GroupDROParams
from ex2l_xai.cam import head_cams
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet

INFO = TrainInfo(n_labels=4, n_confounders=6, n_groups=24, group_counts=[5] * 24)


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
        "confounder": torch.randint(0, 6, (n,), generator=g),
    }


def _alg(name: str, arch: str = "shared", **hp) -> torch.nn.Module:
    params = params_from_dict(name, hp)
    torch.manual_seed(0)
    model = TwoHeadNet("small_cnn", 4, 6 if params.needs_confounder_head() else 0, architecture=arch, width=8)
    return build_algorithm(name, model, params, INFO)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for k, p in module.named_parameters()}


def test_registry_and_params_errors() -> None:
    assert {"erm", "groupdro", "ex2l"} <= set(ALGORITHMS)
    with pytest.raises(ConfigError, match="algorithm.name"):
        params_from_dict("dann2", {})
    with pytest.raises(ConfigError, match="algorithm.lambda_"):
        params_from_dict("ex2l", {"lambda_": 1.0})
    with pytest.raises(ConfigError, match="algorithm.penalty_weight: expected a number"):
        params_from_dict("ex2l", {"penalty_weight": "big"})
    with pytest.raises(ConfigError, match="algorithm.similarity: expected one of"):
        params_from_dict("ex2l", {"similarity": "l2"})
    with pytest.raises(ConfigError, match="algorithm.eta"):
        params_from_dict("groupdro", {"eta": -1.0})
    with pytest.raises(ConfigError, match="conf_detach"):
        _alg("ex2l", arch="dual", conf_detach=True)


def test_groupdro_update_by_hand() -> None:
    torch.manual_seed(0)
    model = TwoHeadNet("small_cnn", 2, 0, width=4)
    info = TrainInfo(n_labels=2, n_confounders=2, n_groups=4, group_counts=[5, 1, 0, 4])
    alg = GroupDRO(model, GroupDROParams(eta=0.5, adjustment=1.0), info)
    torch.testing.assert_close(alg.q, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))  # group 2 never seen
    x = torch.randn(5, 3, 16, 16)
    batch = {"image": x, "label": torch.tensor([0, 0, 1, 1, 0]), "confounder": torch.tensor([0, 1, 1, 1, 0])}
    with torch.no_grad():
        logits = model(x).label.double()
    ce = [-torch.log_softmax(logits[i], 0)[int(batch["label"][i])].item() for i in range(5)]
    g_loss = {0: (ce[0] + ce[4]) / 2, 1: ce[1], 3: (ce[2] + ce[3]) / 2}
    q = [1 / 3, 1 / 3, 0.0, 1 / 3]
    for _ in range(2):  # two steps: q carries over
        for g, n in ((0, 5), (1, 1), (3, 4)):
            q[g] *= math.exp(0.5 * (g_loss[g] + 1.0 / math.sqrt(n)))
        total = sum(q)
        q = [v / total for v in q]
        loss, parts = alg.loss(batch, epoch=0)
        expected = sum(q[g] * g_loss[g] for g in g_loss)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(alg.q, torch.tensor(q, dtype=torch.float32))
    assert "q" in alg.state_dict()


def test_groupdro_absent_group_keeps_weight_ratio() -> None:
    torch.manual_seed(0)
    alg = GroupDRO(TwoHeadNet("small_cnn", 2, 0, width=4), GroupDROParams(eta=1.0), TrainInfo(2, 2, 4, [3, 3, 3, 3]))
    batch = {"image": torch.randn(2, 3, 16, 16), "label": torch.tensor([0, 0]), "confounder": torch.tensor([0, 0])}
    alg.loss(batch, epoch=0)
    q = alg.q
    assert q[0] > q[1] and q[1] == q[2] == q[3]  # only the present group grew


def test_ex2l_lambda_zero_equals_two_head_erm() -> None:
    batch = _batch()
    erm, ex2l = _alg("erm", conf_weight=1.0), _alg("ex2l", penalty_weight=0.0, conf_weight=1.0)
    for alg in (erm, ex2l):
        loss, _ = alg.loss(batch, epoch=0)
        loss.backward()
    ge, gx = _grads(erm.model), _grads(ex2l.model)
    assert ge.keys() == gx.keys()
    for k in ge:
        assert torch.equal(ge[k], gx[k]), k


def test_ex2l_penalty_changes_gradient_and_logs() -> None:
    batch = _batch()
    a0, a1 = _alg("ex2l", penalty_weight=0.0), _alg("ex2l", penalty_weight=1.0)
    for alg in (a0, a1):
        alg.loss(batch, epoch=0)[0].backward()
    g0, g1 = _grads(a0.model), _grads(a1.model)
    assert not torch.allclose(g0["backbone.layer1.0.weight"], g1["backbone.layer1.0.weight"])
    _, parts = a1.loss(batch, epoch=0)
    assert {"ce", "conf_ce", "penalty", "lambda", "zero_cam", "loss"} <= set(parts)
    stats = a1.epoch_stats()
    assert set(stats) == {"zero_cam_share", "penalty_mean"} and a1.epoch_stats() == {}


def test_warmup_schedule() -> None:
    p = Ex2lParams(penalty_weight=2.0, warmup_epochs=4)
    assert [p.lam(e) for e in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert Ex2lParams(penalty_weight=2.0).lam(0) == 2.0


def _cams(alg: Ex2l, batch: dict[str, torch.Tensor]):
    return head_cams(alg.model, alg.model.cam_layers(), batch["image"], [batch["label"], batch["confounder"]])


@pytest.mark.parametrize("stop_grad", ["none", "confounder"])
def test_stop_gradient_on_confounder_cam(stop_grad: str) -> None:
    alg = _alg("ex2l", stop_grad=stop_grad)
    batch = _batch()
    res = _cams(alg, batch)
    alg.penalty(*res.cams).mean().backward()
    g = alg.model.conf_head.weight.grad
    moved = g is not None and g.abs().sum() > 0
    assert moved == (stop_grad == "none")
    assert alg.model.label_head.weight.grad.abs().sum() > 0


def test_conf_detach_keeps_confounder_ce_out_of_backbone() -> None:
    batch = _batch()
    plain = _alg("erm")
    plain.loss(batch, 0)[0].backward()
    detached = _alg("erm", conf_weight=1.0, conf_detach=True)
    detached.loss(batch, 0)[0].backward()
    attached = _alg("erm", conf_weight=1.0)
    attached.loss(batch, 0)[0].backward()
    k = "backbone.layer2.0.weight"
    torch.testing.assert_close(_grads(detached.model)[k], _grads(plain.model)[k])
    assert not torch.allclose(_grads(attached.model)[k], _grads(plain.model)[k])
    assert _grads(detached.model)["conf_head.weight"].abs().sum() > 0


def test_all_class_penalty_is_mean_over_classes() -> None:
    alg = _alg("ex2l", label_cam_classes="all")
    batch = _batch()
    res = head_cams(alg.model, alg.model.cam_layers(), batch["image"], ["all", batch["confounder"]])
    from ex2l_xai.penalties import similarity

    expected = torch.stack([similarity(res.cams[0][:, k], res.cams[1]) for k in range(4)]).mean(0)
    torch.testing.assert_close(alg.penalty(*res.cams), expected)
    loss, parts = alg.loss(batch, 0)
    assert math.isfinite(loss.item()) and parts["penalty"] >= 0


def test_evidence_penalty_value_and_zero_cam_cannot_meet_it() -> None:
    alg = _alg("ex2l", variant="evidence")
    label_cam = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]])
    conf_cam = torch.tensor([[[4.0, 2.0], [0.0, -1.0]]])  # region = [[1, .5], [0, 0]]
    torch.testing.assert_close(alg.penalty(label_cam, conf_cam), torch.tensor([1.0 * 1 + 2.0 * 0.5]), atol=1e-6, rtol=0)
    # the paper's Dice is met (0) by killing the ReLU'd label CAM; the evidence penalty sees negative evidence
    paper = _alg("ex2l")
    killed = torch.tensor([[[-1.0, -2.0], [-0.5, 0.0]]])
    assert paper.penalty(torch.relu(killed), conf_cam).item() == 0.0
    assert alg.penalty(killed, conf_cam).item() == pytest.approx(2.0)


def test_zero_cam_alarm_counts_dead_label_cams() -> None:
    alg = _alg("ex2l")
    with torch.no_grad():
        alg.model.label_head.weight.zero_()
    alg.loss(_batch(), 0)
    assert alg.epoch_stats()["zero_cam_share"] == 1.0


@pytest.mark.parametrize(
    "hp",
    [
        {"label_cam_target": "pred"},
        {"cam_relu": False, "norm": "minmax"},
        {"similarity": "ssim"},
        {"variant": "evidence", "label_cam_classes": "all", "stop_grad": "confounder"},
        {"warmup_epochs": 3},
    ],
)
@pytest.mark.parametrize("arch", ["shared", "dual"])
def test_variants_train_one_step(hp: dict, arch: str) -> None:
    """Each variant's penalty is not 0, enters the loss with weight λ, and moves the backbone: a penalty
    that silently returned 0 (or was left out of the loss) fails here, not only a NaN."""
    alg = _alg("ex2l", arch=arch, **hp)
    ref = _alg("ex2l", arch=arch, **{**hp, "penalty_weight": 0.0})
    opt = torch.optim.SGD(alg.parameters(), lr=0.01)
    before = alg.model.label_head.weight.detach().clone()
    loss, parts = alg.loss(_batch(), epoch=1)
    lam = alg.params.lam(1)
    assert lam > 0 and parts["lambda"] == lam and abs(parts["penalty"]) > 1e-4  # SSIM may be negative
    assert parts["loss"] == pytest.approx(parts["ce"] + parts["conf_ce"] + lam * parts["penalty"], rel=1e-5)
    loss.backward()
    ref.loss(_batch(), epoch=1)[0].backward()
    k = "backbone.layer3.0.weight"
    assert not torch.allclose(_grads(alg.model)[k], _grads(ref.model)[k])
    opt.step()
    assert math.isfinite(parts["loss"]) and not torch.equal(before, alg.model.label_head.weight)


def test_ce_parts_match_functional() -> None:
    alg = _alg("erm", conf_weight=0.5)
    batch = _batch()
    loss, parts = alg.loss(batch, 0)
    out = alg.model(batch["image"])
    expected = F.cross_entropy(out.label, batch["label"]) + 0.5 * F.cross_entropy(out.confounder, batch["confounder"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
