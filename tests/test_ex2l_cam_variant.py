"""eX2L's ``cam_variant``: the penalty is computed on the chosen member of the Grad-CAM family."""

import pytest
import torch
import torch.nn.functional as F

from ex2l_xai.algorithms import TrainInfo, build_algorithm, params_from_dict
from ex2l_xai.cam import head_cams
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet

INFO = TrainInfo(n_labels=4, n_confounders=6, n_groups=24, group_counts=[5] * 24)


def _alg(**hp):
    params = params_from_dict("ex2l", hp)
    torch.manual_seed(0)
    return build_algorithm("ex2l", TwoHeadNet("small_cnn", 4, 6, width=8), params, INFO)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(6, 3, 32, 32, generator=g),
        "label": torch.randint(0, 4, (6,), generator=g),
        "confounder": torch.randint(0, 6, (6,), generator=g),
    }


def test_unknown_cam_variant_names_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"algorithm.cam_variant: expected one of \['gradcam', 'gradcam\+\+'"):
        _alg(cam_variant="gradcam+")


@pytest.mark.parametrize("variant", ["gradcam++", "hirescam", "xgradcam", "layercam"])
def test_penalty_is_the_dice_of_the_chosen_variants_cams(variant: str) -> None:
    """The logged penalty equals the paper's Dice of max-normalised ReLU CAMs computed here with head_cams(variant),
    and the penalty's gradient reaches the backbone."""
    alg = _alg(cam_variant=variant, penalty_weight=1.0)
    batch = _batch()
    loss, parts = alg.loss(batch, epoch=0)
    model = alg.model
    ref = head_cams(model, model.cam_layers(), batch["image"], [batch["label"], batch["confounder"]],
                    relu=False, create_graph=False, variant=variant)
    expected = alg.penalty(F.relu(ref.cams[0]), F.relu(ref.cams[1])).mean()
    assert parts["penalty"] == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert model.backbone.layer4[0].weight.grad.abs().sum() > 0


def test_variants_give_different_penalties() -> None:
    """Not a no-op: on the same model and batch LayerCAM's penalty differs from Grad-CAM's (W has negative
    entries, which LayerCAM's ReLU of the gradient removes)."""
    pens = {v: _alg(cam_variant=v, penalty_weight=1.0).loss(_batch(), epoch=0)[1]["penalty"]
            for v in ("gradcam", "layercam")}
    assert abs(pens["gradcam"] - pens["layercam"]) > 1e-4
