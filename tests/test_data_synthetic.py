"""Built-in synthetic benchmark: the Spawrious table, validation carve, determinism, masks, bad options."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import BGS, CLASSES, TABLE
from torch.utils.data import DataLoader

from ex2l_xai.data import DATASETS, get_dataset
from ex2l_xai.data.synthetic import SyntheticDataset
from ex2l_xai.errors import DataError


def expected_train(challenge: str, n: int) -> Counter:
    """(class, background, env) -> count for the two training environments, from the issue's text."""
    g, _, filler = TABLE[challenge]
    out: Counter = Counter()
    if challenge.startswith("m2m"):
        env1 = {"bulldog": g[0], "dachshund": g[1], "labrador": g[2], "corgi": g[3]}
        env2 = {"bulldog": g[1], "dachshund": g[0], "labrador": g[3], "corgi": g[2]}
        for cls in CLASSES:
            out[(cls, env1[cls], 0)] += n
            out[(cls, env2[cls], 1)] += n
    else:
        for i, cls in enumerate(CLASSES):
            for env, frac in ((0, 0.97), (1, 0.87)):
                main = int(frac * n)
                out[(cls, g[i], env)] += main
                out[(cls, filler, env)] += n - main
    return out


def expected_test(challenge: str, n: int) -> Counter:
    """(class, background, 2) -> count; M2M classes split n over two backgrounds (first gets the extra)."""
    _, t, _ = TABLE[challenge]
    out: Counter = Counter()
    if challenge.startswith("m2m"):
        pairs = {
            "bulldog": (t[0], t[1]),
            "dachshund": (t[1], t[0]),
            "labrador": (t[2], t[3]),
            "corgi": (t[3], t[2]),
        }
        for cls, (a, b) in pairs.items():
            out[(cls, a, 2)] += (n + 1) // 2
            out[(cls, b, 2)] += n // 2
    else:
        for i, cls in enumerate(CLASSES):
            out[(cls, t[i], 2)] += n
    return out


def counts(*datasets: SyntheticDataset) -> Counter:
    out: Counter = Counter()
    for ds in datasets:
        for lab, conf, env in ds.table[["label", "confounder", "env"]].itertuples(index=False):
            out[(CLASSES[lab], BGS[conf], env)] += 1
    return out


@pytest.mark.parametrize("challenge", list(TABLE))
def test_group_counts_match_spawrious_table(challenge: str) -> None:
    opts = {"challenge": challenge, "per_group": 100, "test_per_group": 31, "oracle_per_group": 7}
    train = get_dataset("synthetic", "train", **opts)
    val = get_dataset("synthetic", "val", **opts)
    assert counts(train, val) == expected_train(challenge, 100)
    assert counts(get_dataset("synthetic", "test", **opts)) == expected_test(challenge, 31)
    assert counts(get_dataset("synthetic", "oracle_val", **opts)) == expected_test(challenge, 7)
    # val: round(0.2 * n) of every (class, background, env) cell, envs of the training environments
    vc, tc = counts(val), counts(train)
    for key, n in expected_train(challenge, 100).items():
        assert vc[key] == int(0.2 * n + 0.5), key
        assert tc[key] == n - vc[key]
    assert set(val.table["env"]) == {0, 1}


def test_names_groups_and_table() -> None:
    ds = get_dataset("synthetic", "train", per_group=10)
    assert isinstance(ds, SyntheticDataset) and DATASETS["synthetic"] is SyntheticDataset
    assert ds.label_names == CLASSES and ds.confounder_names == BGS
    assert ds.env_names == ["train_env1", "train_env2", "test"]
    assert ds.n_groups == 24 and len(ds.groups) == 24 and ds.groups[1 * 6 + 2] == "dachshund/dirt"
    assert (ds.table["group"] == ds.table["label"] * 6 + ds.table["confounder"]).all()
    assert ds.group_counts().sum() == len(ds) and len(ds.group_counts()) == 24
    assert set(ds.table.columns) >= {"label", "confounder", "env", "group"}
    s = ds[3]
    assert set(s) == {"image", "label", "confounder", "env", "index", "mask"}
    assert s["index"] == 3 and s["label"] == ds.table["label"][3] and s["env"] == ds.table["env"][3]
    assert ds[-1]["index"] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_minority_fraction_moves_images_to_other_group_backgrounds() -> None:
    # m2m_hard g = dirt, jungle, snow, beach: bulldog/dachshund minority images go to the env's
    # labrador/corgi backgrounds
    opts = {"challenge": "m2m_hard", "per_group": 40, "minority_fraction": 0.25, "val_fraction": 0.0}
    c = counts(get_dataset("synthetic", "train", **opts))
    assert (
        c[("bulldog", "dirt", 0)] == 30 and c[("bulldog", "snow", 0)] == 5 and c[("bulldog", "beach", 0)] == 5
    )
    assert (
        c[("bulldog", "jungle", 1)] == 30
        and c[("bulldog", "beach", 1)] == 5
        and c[("bulldog", "snow", 1)] == 5
    )
    assert c[("corgi", "beach", 0)] == 30 and c[("corgi", "dirt", 0)] == 5 and c[("corgi", "jungle", 0)] == 5
    assert sum(c.values()) == 40 * 4 * 2
    # o2o_easy: 10 minority images of bulldog spread over the other classes' backgrounds (4, 3, 3);
    # the filler stays
    opts = {"challenge": "o2o_easy", "per_group": 40, "minority_fraction": 0.25, "val_fraction": 0.0}
    c = counts(get_dataset("synthetic", "train", **opts))
    assert c[("bulldog", "desert", 0)] == int(0.97 * 40) - 10 and c[("bulldog", "beach", 0)] == 40 - int(
        0.97 * 40
    )
    assert [c[("bulldog", b, 0)] for b in ("jungle", "dirt", "snow")] == [4, 3, 3]
    # the test table is unchanged
    assert counts(get_dataset("synthetic", "test", **opts)) == expected_test("o2o_easy", 40)


def test_images_masks_and_determinism() -> None:
    a = get_dataset("synthetic", "train", per_group=20, seed=3)
    b = get_dataset("synthetic", "train", per_group=20, seed=3)
    c = get_dataset("synthetic", "train", per_group=20, seed=4)
    for i in (0, 7, len(a) - 1):
        sa, sb = a[i], b[i]
        assert sa["image"].dtype == torch.float32 and sa["image"].shape == (3, 64, 64)
        assert sa["mask"].shape == (1, 64, 64) and set(sa["mask"].unique().tolist()) <= {0.0, 1.0}
        assert 0.0 <= sa["image"].min() and sa["image"].max() <= 1.0
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["mask"], sb["mask"])
        assert not torch.equal(sa["image"], c[i]["image"])
    shares = [a[i]["mask"].mean().item() for i in range(0, len(a), 5)]
    assert 0.02 < min(shares) and max(shares) < 0.25  # a modest share of the image
    small = get_dataset("synthetic", "test", per_group=4, image_size=32)
    assert small[0]["image"].shape == (3, 32, 32) and small[0]["mask"].shape == (1, 32, 32)


def test_dataloader_workers_give_identical_batches() -> None:
    ds = get_dataset("synthetic", "val", per_group=20)
    b0 = next(iter(DataLoader(ds, batch_size=16, num_workers=0)))
    b2 = next(iter(DataLoader(ds, batch_size=16, num_workers=2)))
    assert torch.equal(b0["image"], b2["image"]) and torch.equal(b0["index"], b2["index"])
    assert b0["label"].dtype == torch.int64 and b0["mask"].shape == (16, 1, 64, 64)


def test_splits_draw_distinct_images() -> None:
    opts = {"challenge": "o2o_easy", "per_group": 10}
    imgs = [get_dataset("synthetic", s, **opts)[0]["image"] for s in ("train", "val", "test", "oracle_val")]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not torch.equal(imgs[i], imgs[j])


def _mean_colours(ds: SyntheticDataset, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    idx = np.linspace(0, len(ds) - 1, n).astype(int)
    bg, obj = [], []
    for i in idx:
        img, mask = ds.render_numpy(int(i))
        bg.append(img[:, ~mask].mean(axis=1))
        obj.append(img[:, mask].mean(axis=1))
    return np.array(bg), np.array(obj), ds.labels[idx], ds.confounders[idx]


def _nearest_centroid_acc(x: np.ndarray, y: np.ndarray) -> float:
    half = len(x) // 2
    tr, te = np.arange(len(x)) % 2 == 0, np.arange(len(x)) % 2 == 1
    classes = np.unique(y[tr])
    cents = np.stack([x[tr][y[tr] == k].mean(0) for k in classes])
    pred = classes[np.argmin(((x[te][:, None] - cents[None]) ** 2).sum(-1), axis=1)]
    assert half > 0
    return float((pred == y[te]).mean())


def test_backgrounds_distinct_and_object_colour_uninformative() -> None:
    # minority images put every class on several backgrounds, so both cues can be checked on one split
    ds = get_dataset(
        "synthetic", "train", challenge="o2o_easy", per_group=60, minority_fraction=0.5, val_fraction=0.0
    )
    bg, obj, labels, confs = _mean_colours(ds, 240)
    assert _nearest_centroid_acc(bg, confs) > 0.95  # background colour alone tells the background
    assert _nearest_centroid_acc(obj, labels) < 0.5  # object colour does not tell the class (chance 0.25)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"challenge": "m2m_impossible"}, "m2m_impossible"),
        ({"per_group": 0}, "per_group"),
        ({"image_size": "big"}, "image_size"),
        ({"minority_fraction": 0.99, "challenge": "o2o_easy"}, "minority_fraction"),
        ({"minority_fraction": -0.1}, "minority_fraction"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_options_raise(options: dict, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        get_dataset("synthetic", "train", **options)


def test_bad_split_and_empty_split_raise() -> None:
    with pytest.raises(DataError, match="holdout"):
        get_dataset("synthetic", "holdout")
    with pytest.raises(DataError, match="'val'.*empty"):
        get_dataset("synthetic", "val", val_fraction=0.0)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        get_dataset("imagenet", "train")


def test_golden_checksum() -> None:
    """Same options, same bytes on any machine: a fixed digest of a few images and masks.

    If this fails after an intentional change to the drawing code, update the digest and say so.
    """
    import hashlib

    h = hashlib.sha256()
    for split in ("train", "test"):
        ds = get_dataset("synthetic", split, challenge="o2o_medium", per_group=10, seed=11)
        for i in (0, 5, len(ds) - 1):
            s = ds[i]
            h.update(np.round(s["image"].numpy() * 255).astype(np.uint8).tobytes())
            h.update(s["mask"].numpy().astype(np.uint8).tobytes())
    assert h.hexdigest() == "f94543958a4917fff10a897e8c66aeb44e5316d2781f80aac08e100f8cf68fe0"


def test_object_scale_grows_the_object_and_is_validated() -> None:
    import numpy as np
    import pytest

    from ex2l_xai.data import get_dataset
    from ex2l_xai.errors import DataError

    small = get_dataset("synthetic", "train", per_group=4, image_size=64)
    big = get_dataset("synthetic", "train", per_group=4, image_size=64, object_scale=1.5)
    area_small = np.mean([small[i]["mask"].mean().item() for i in range(len(small))])
    area_big = np.mean([big[i]["mask"].mean().item() for i in range(len(big))])
    assert 1.8 < area_big / area_small < 2.6  # area grows with the square of the scale (1.5^2 = 2.25)
    assert big[0]["label"] == small[0]["label"] and big[0]["confounder"] == small[0]["confounder"]
    with pytest.raises(DataError, match="object_scale"):
        get_dataset("synthetic", "train", per_group=4, object_scale=3)


def test_named_benchmark_sets_its_options_and_draws_the_same_images() -> None:

    named = SyntheticDataset("train", benchmark="m2m_hard_salient", image_size=32, per_group=4)
    plain = SyntheticDataset("train", challenge="m2m_hard", object_scale=1.5, image_size=32, per_group=4)
    assert named.object_scale == 1.5 and named.challenge.name == "m2m_hard" and named.benchmark == "m2m_hard_salient"
    assert torch.equal(named[3]["image"], plain[3]["image"])
    assert not torch.equal(named[3]["image"], SyntheticDataset("train", image_size=32, per_group=4)[3]["image"])
    min5 = SyntheticDataset("train", benchmark="m2m_hard_min5", image_size=32, per_group=40)
    assert min5.minority_fraction == 0.05


def test_named_benchmark_refuses_a_contradicting_option_and_unknown_names() -> None:

    with pytest.raises(DataError, match=r"object_scale=1.2 contradicts benchmark='m2m_hard_salient'"):
        SyntheticDataset("train", benchmark="m2m_hard_salient", object_scale=1.2)
    with pytest.raises(DataError, match=r"benchmark='nope'; expected one of m2m_hard_salient"):
        SyntheticDataset("train", benchmark="nope")
