"""eX2L's study variants, on cases with known answers: Singh et al.'s product overlap and anchor, and the
RRR/GALS-style input-saliency share in the confounder region (``variant: gradmask``)."""

import pytest
import torch
from helpers import TINY

from ex2l_xai.algorithms import TrainInfo, build_algorithm, params_from_dict
from ex2l_xai.algorithms.ex2l import channel_evidence
from ex2l_xai.cli import main
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.penalties import similarity

INFO = TrainInfo(n_labels=4, n_confounders=6, n_groups=24, group_counts=[5] * 24)


def _alg(**hp):
    params = params_from_dict("ex2l", hp)
    torch.manual_seed(0)
    return build_algorithm("ex2l", TwoHeadNet("small_cnn", 4, 6, width=8), params, INFO)


def _batch(n: int = 6, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 3, size, size, generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),
        "confounder": torch.randint(0, 6, (n,), generator=g),
    }


def test_product_overlap_by_hand() -> None:
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert float(similarity(a, b, "product", "none")) == pytest.approx(0.25)
    # min-max normalisation of signed maps: a shift and a positive scale change nothing
    assert float(similarity(3 * a - 2, b, "product", "minmax")) == pytest.approx(0.25, abs=1e-6)


def test_gradmask_penalty_is_the_saliency_share_in_the_region() -> None:
    """A logit that reads only the left half of the image has no saliency on the right: the share is 0 when the
    confounder region is the right half, 1 when it is the left half, 0.5 for a uniform region."""
    alg = _alg(variant="gradmask")
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    w = torch.zeros(4, 3, 4, 4)
    w[:, :, :, :2] = torch.randn(4, 3, 4, 2, generator=torch.Generator().manual_seed(1))
    logits = torch.einsum("bchw,kchw->bk", x, w)
    y = torch.tensor([0, 3])
    right = torch.zeros(2, 4, 4)
    right[:, :, 2:] = 1.0
    for region, expected in ((right, 0.0), (1 - right, 1.0), (torch.ones(2, 4, 4), 1.0)):
        got = alg.gradmask_penalty(logits, y, x, region)
        torch.testing.assert_close(got, torch.full((2,), expected), atol=1e-6, rtol=0)
    half = torch.full((2, 4, 4), 0.5)  # max-normalised: a uniform region is all ones, so the share is 1
    torch.testing.assert_close(alg.gradmask_penalty(logits, y, x, half), torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grad_at", ["input", "layer1"])
def test_gradmask_moves_the_label_branch(grad_at: str) -> None:
    alg = _alg(variant="gradmask", grad_at=grad_at, penalty_weight=1.0)
    loss, parts = alg.loss(_batch(), 0)
    assert 0.0 < parts["penalty"] < 1.0
    (g,) = torch.autograd.grad(loss, [alg.model.backbone.layer1[0].weight])
    assert g.abs().sum() > 0
    ref = _alg(variant="gradmask", grad_at=grad_at, penalty_weight=0.0)
    ref_loss, _ = ref.loss(_batch(), 0)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()) + parts["penalty"], rel=1e-5)


def test_anchor_is_zero_at_the_start_and_grows_as_the_model_moves() -> None:
    """In eval mode (both with running batch-norm statistics) the model IS the anchor at the start: term 0."""
    alg = _alg(similarity="product", norm="minmax", cam_relu=False, anchor_weight=0.01)
    batch = _batch()
    alg.eval()
    _, parts = alg.loss(batch, 0)
    assert parts["anchor"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        alg.model.label_head.weight.add_(torch.randn_like(alg.model.label_head.weight))
    loss, parts = alg.loss(batch, 0)
    assert parts["anchor"] > 0.01
    grads = torch.autograd.grad(loss, [alg.model.label_head.weight])
    assert grads[0].abs().sum() > 0
    alg.train()
    assert alg.model.training and not alg.anchor.training
    assert not any(p.requires_grad for p in alg.anchor.parameters())


def test_gradmask_bad_stage() -> None:
    with pytest.raises(ConfigError, match="algorithm.grad_at"):
        _alg(variant="gradmask", grad_at="layer9")


def test_variants_train_through_the_cli(tmp_path) -> None:
    """Two-head ERM, then Singh et al.'s form started from it, then gradmask at an early stage: `ex2l train`."""
    erm = tmp_path / "erm2"
    assert main(["train", "--config", "quick", "--out", str(erm), "--quiet", *[f"--set={s}" for s in TINY],
                 "--set=algorithm.name=erm", "--set=algorithm.conf_weight=1.0"]) == 0
    singh = tmp_path / "singh"
    sets = ["algorithm.similarity=product", "algorithm.norm=minmax", "algorithm.cam_relu=false",
            "algorithm.anchor_weight=0.01", f"model.init_from={erm}"]
    assert main(["train", "--config", "quick", "--out", str(singh), "--quiet", *[f"--set={s}" for s in TINY],
                 *[f"--set={s}" for s in sets]]) == 0
    line = (singh / "metrics.jsonl").read_text().splitlines()[0]
    assert '"anchor"' in line
    grad = tmp_path / "gradmask"
    assert main(["train", "--config", "quick", "--out", str(grad), "--quiet", *[f"--set={s}" for s in TINY],
                 "--set=algorithm.variant=gradmask", "--set=algorithm.grad_at=layer2"]) == 0
    assert (grad / "done").exists()


def _shared(**hp):
    params = params_from_dict("ex2l", {"variant": "channel", **hp})
    torch.manual_seed(0)
    return build_algorithm("ex2l", TwoHeadNet("small_cnn", 4, 6, width=8, architecture="shared"), params, INFO)


def test_channel_evidence_of_a_linear_head_is_its_row_times_the_latent() -> None:
    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]]))
        head.bias.fill_(7.0)
    f = torch.tensor([[2.0, 1.0, 4.0], [1.0, 1.0, 1.0]])
    ev = channel_evidence(head, f, torch.tensor([0, 1]), create_graph=False)
    torch.testing.assert_close(ev, torch.tensor([[2.0, -2.0, 2.0], [0.0, 3.0, 1.0]]))
    # the evidence sums to the logit minus its bias
    torch.testing.assert_close(ev.sum(1), head(f).gather(1, torch.tensor([[0], [1]])).squeeze(1) - 7.0)


def test_channel_penalty_is_the_label_evidence_share_in_the_confounders_channels() -> None:
    """Label evidence (2, -1, 1) and confounder evidence (0, 3, 1.5): the region is (0, 1, 0.5) after max
    normalisation, so the share is (2·0 + 0·1 + 1·0.5) / 3 = 1/6; label evidence only on channels the confounder
    head does not read gives 0; negative evidence counts as none."""
    alg = _shared()
    label = torch.nn.Linear(3, 4, bias=False)
    conf = torch.nn.Linear(3, 6, bias=False)
    with torch.no_grad():
        label.weight.zero_()
        conf.weight.zero_()
        label.weight[1] = torch.tensor([2.0, -1.0, 1.0])
        conf.weight[4] = torch.tensor([0.0, 3.0, 1.5])
    alg.model.label_head, alg.model.conf_head = label, conf
    f = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], requires_grad=True)
    share, n_zero = alg.channel_penalty(f, torch.tensor([1, 1]), torch.tensor([4, 4]))
    torch.testing.assert_close(share, torch.tensor([1 / 6, 0.0]))
    assert int(n_zero) == 0
    share.sum().backward()  # differentiable in the latent (the backbone) and the label head
    assert f.grad is not None and float(f.grad.abs().sum()) > 0
    assert label.weight.grad is not None and conf.weight.grad is None


def test_channel_variant_needs_one_shared_backbone_and_moves_the_label_branch() -> None:
    with pytest.raises(ConfigError, match="variant=channel needs model.architecture=shared"):
        build_algorithm("ex2l", TwoHeadNet("small_cnn", 4, 6, width=8, architecture="dual"),
                        params_from_dict("ex2l", {"variant": "channel"}), INFO)
    alg = _shared(penalty_weight=1.0, conf_detach=True)
    loss, parts = alg.loss(_batch(), epoch=0)
    assert parts["penalty"] > 0
    loss.backward()
    assert alg.model.label_head.weight.grad is not None
    assert float(alg.model.label_head.weight.grad.abs().sum()) > 0
