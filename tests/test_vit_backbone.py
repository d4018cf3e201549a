"""The ``vit_tiny`` backbone (timm ViT-tiny, patch 16): eX2L trains on it, its weights files load, and a failed
download of library weights is one clear line naming the offline route (nothing is downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ex2l_xai.backbones import build_backbone, vit_image_size
from ex2l_xai.cli import main
from ex2l_xai.errors import Ex2lError
from ex2l_xai.models import TwoHeadNet

# few samples per group, all in one batch: one optimiser step per epoch
ONE_STEP = [
    "data.options.image_size=32",
    "data.options.per_group=5",
    "data.options.test_per_group=1",
    "data.batch_size=256",
    "data.eval_batch_size=64",
    "train.epochs=2",
    "train.device=cpu",
]


def test_ex2l_trains_on_vit_tiny_one_step_per_epoch(tmp_path: Path) -> None:
    from ex2l_xai.train import load_run_model

    out = tmp_path / "vit"
    sets = [*ONE_STEP, "algorithm.name=ex2l", "algorithm.cam_variant=layercam", "algorithm.penalty_weight=1.0",
            "model.backbone=vit_tiny"]
    assert main(["train", "--config", "quick", "--out", str(out), "--quiet", *[f"--set={s}" for s in sets]]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]  # one optimiser step per epoch
    assert all(x["loss"]["penalty"] > 0 and x["loss"]["lambda"] == 1.0 for x in lines)
    assert (out / "done").exists()
    # the saved model is rebuilt at the data's size (4 + 1 position embeddings for 32 px) and loads
    model, _ = load_run_model(out)
    assert model.backbone.stem.vit.pos_embed.shape == (1, 2 * 2 + 1, 192)
    assert model(torch.rand(1, 3, 32, 32)).label.shape[1] == 4


def test_vit_tiny_pools_the_patch_tokens_and_declares_its_class_token() -> None:
    torch.manual_seed(0)
    model = TwoHeadNet("vit_tiny", 3, 0, image_size=48).eval()
    assert model.num_prefix_tokens == 1
    x = torch.rand(2, 3, 48, 48)
    feats = model.backbone(x)
    assert feats.shape == (2, 192, 3, 3)
    torch.testing.assert_close(model(x).latent, feats.mean((2, 3)))
    # the map is the final norm's patch tokens: the class token (first) is not in it
    tokens = model.backbone.layer4[:-1](model.backbone(x, stop=4))
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), tokens[:, 1:])
    assert vit_image_size({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}) == 48


def test_vit_tiny_loads_a_timm_weights_file_made_for_another_size(tmp_path: Path) -> None:
    """A timm state dict (224 px: 14x14 position embeddings) loads into a 32 px backbone: blocks renamed into the
    stages, the position embeddings resampled, the head dropped."""
    import timm

    torch.manual_seed(1)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "vit.pt"
    torch.save(net.state_dict(), path)
    bb = build_backbone("vit_tiny", str(path), image_size=32)
    torch.testing.assert_close(bb.layer2[1].attn.qkv.weight, net.blocks[4].attn.qkv.weight)
    torch.testing.assert_close(bb.layer4[3].weight, net.norm.weight)
    torch.testing.assert_close(bb.stem.vit.cls_token, net.cls_token)
    assert bb.stem.vit.pos_embed.shape == (1, 5, 192)
    torch.testing.assert_close(bb.stem.vit.pos_embed[:, :1], net.pos_embed[:, :1])  # the class token's, as it was


def test_failed_download_is_one_line_naming_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's and torchvision's download functions replaced by ones that fail as an offline machine does."""
    import timm.models._builder as timm_builder
    import torchvision.models._api as tv_api

    from ex2l_xai.pretrained import library_model

    def offline(*_a: object, **_k: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(timm_builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(timm_builder, "load_state_dict_from_url", offline)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    for name in ("timm:vit_tiny_patch16_224", "resnet18"):
        with pytest.raises(Ex2lError) as info:
            library_model(name, pretrained=True)
        msg = str(info.value)
        assert "\n" not in msg and name in msg and "--weights" in msg and "name resolution" in msg
    with pytest.raises(Ex2lError, match="model.pretrained=<state-dict path>"):
        build_backbone("vit_tiny", "imagenet", image_size=32)
    # random init needs no network; an unknown name is its own error, not a download error
    assert library_model("timm:vit_tiny_patch16_224").num_prefix_tokens == 1
    with pytest.raises(Ex2lError, match="timm has no model"):
        library_model("timm:not_a_model")
