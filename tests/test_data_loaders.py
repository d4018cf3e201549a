"""Real-data loaders on tiny fixtures in the released layouts (Spawrious, Waterbirds, CSV); bad input."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BGS, CLASSES, TABLE
from PIL import Image

from ex2l_xai.data import get_dataset
from ex2l_xai.errors import DataError

N_FILES = 12  # images per spawrious224/<folder>/<background>/<class>


def png_bytes(size: int = 8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_spawrious(root: Path, n: int = N_FILES) -> Path:
    data = png_bytes()
    for folder in ("0", "1"):
        for bg in BGS:
            for cls in CLASSES:
                d = root / "spawrious224" / folder / bg / cls
                d.mkdir(parents=True)
                for k in range(n):
                    (d / f"{bg}_{cls}_{k:03d}.{'png' if k % 3 else 'jpg'}").write_bytes(data)
                (d / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def spawrious_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_spawrious(tmp_path_factory.mktemp("spw"))


def counts(*datasets) -> Counter:
    out: Counter = Counter()
    for ds in datasets:
        for lab, conf, env in ds.table[["label", "confounder", "env"]].itertuples(index=False):
            out[(CLASSES[lab], BGS[conf], env)] += 1
    return out


def expected_spawrious(
    challenge: str,
    o2o_counts: tuple[tuple[int, int], tuple[int, int]] | None = None,
    test_per_folder: int = N_FILES,
) -> tuple[Counter, Counter]:
    """Expected (train + val, test) counts on the fixture with N_FILES images per folder."""
    g, t, filler = TABLE[challenge]
    train: Counter = Counter()
    test: Counter = Counter()
    if challenge.startswith("m2m"):
        env1 = dict(zip(CLASSES, [g[0], g[1], g[2], g[3]], strict=True))
        env2 = dict(zip(CLASSES, [g[1], g[0], g[3], g[2]], strict=True))
        pairs = dict(zip(CLASSES, [(t[0], t[1]), (t[1], t[0]), (t[2], t[3]), (t[3], t[2])], strict=True))
        for cls in CLASSES:
            train[(cls, env1[cls], 0)] += N_FILES
            train[(cls, env2[cls], 1)] += N_FILES
            for b in pairs[cls]:  # folder 0, two backgrounds
                test[(cls, b, 2)] += test_per_folder
    else:
        for i, cls in enumerate(CLASSES):
            for env, (main, fill) in enumerate(o2o_counts):
                train[(cls, g[i], env)] += main
                train[(cls, filler, env)] += fill
            test[(cls, t[i], 2)] += 2 * test_per_folder  # folders 0 and 1
    return train, test


@pytest.mark.parametrize("challenge", list(TABLE))
def test_spawrious_group_counts(spawrious_root: Path, challenge: str) -> None:
    opts = {"root": str(spawrious_root), "challenge": challenge}
    train, val, test = (get_dataset("spawrious", s, **opts) for s in ("train", "val", "test"))
    # O2O with 12 files per folder: the largest total whose cells fit is 13 (env 1: int(0.97*13) = 12 own + 1
    # filler; env 2: int(0.87*13) = 11 own + 2 filler); M2M: 12 per class and environment.
    exp_train, exp_test = expected_spawrious(challenge, ((12, 1), (11, 2)))
    assert counts(train, val) == exp_train
    assert counts(test) == exp_test
    assert train.total == (13 if challenge.startswith("o2o") else 12)
    paths = [set(d.table["path"]) for d in (train, val, test)]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert all(p.endswith((".png", ".jpg")) for p in paths[2])
    assert set(val.table["env"]) <= {0, 1} and set(test.table["env"]) == {2}


def test_spawrious_caps_and_sorted_selection(spawrious_root: Path) -> None:
    opts = {
        "root": str(spawrious_root),
        "challenge": "o2o_easy",
        "per_group": 5,
        "test_per_group": 5,
        "val_fraction": 0.0,
    }
    train = get_dataset("spawrious", "train", **opts)
    exp_train, _ = expected_spawrious("o2o_easy", ((int(0.97 * 5), 1), (int(0.87 * 5), 1)))
    assert counts(train) == exp_train
    # the first files of the sorted listing
    first = sorted(
        p.name
        for p in (spawrious_root / "spawrious224/0/desert/bulldog").iterdir()
        if p.suffix in (".png", ".jpg")
    )[:4]
    t = train.table
    chosen = t[(t.label == 0) & (t.confounder == 0) & (t.env == 0)]["path"]
    assert sorted(Path(p).name for p in chosen) == first
    test = get_dataset("spawrious", "test", **opts)
    assert Counter(test.table["label"]) == {0: 5, 1: 5, 2: 5, 3: 5}  # 3 from folder 0 + 2 from folder 1


def test_spawrious_samples(spawrious_root: Path) -> None:
    ds = get_dataset(
        "spawrious", "train", root=str(spawrious_root), challenge="m2m_hard", image_size=16, augment=True
    )
    s = ds[0]
    assert set(s) == {"image", "label", "confounder", "env", "index"}  # no masks for real data
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    # images in [0, 1]: the backbones normalise their own input (ex2l_xai.backbones)
    assert ds.mean is None and 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    assert ds.label_names == CLASSES and ds.confounder_names == BGS


def test_spawrious_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        get_dataset("spawrious", "train", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="root"):
        get_dataset("spawrious", "train")
    with pytest.raises(DataError, match="spawrious224"):
        get_dataset("spawrious", "train", root=str(tmp_path))
    root = make_spawrious(tmp_path / "a", n=3)
    shutil.rmtree(root / "spawrious224/1/beach/corgi")  # o2o_easy's filler folder for corgi in env 2
    with pytest.raises(DataError, match=r"1/beach/corgi.*missing.*'corgi'.*'beach'"):
        get_dataset("spawrious", "train", root=str(root), challenge="o2o_easy")
    shutil.rmtree(root / "spawrious224/0/desert")  # a whole background folder
    with pytest.raises(DataError, match=r"0/desert/bulldog"):
        get_dataset("spawrious", "test", root=str(root), challenge="o2o_easy")
    for f in (root / "spawrious224/0/snow/bulldog").iterdir():  # m2m_hard test folder emptied
        f.unlink()
    with pytest.raises(DataError, match=r"0/snow/bulldog.*no images"):
        get_dataset("spawrious", "test", root=str(root), challenge="m2m_hard")


# ---- Waterbirds --------------------------------------------------------------------------------------------
WB_ROWS = [  # (y, split, place)
    *[(0, 0, 0)] * 6,
    *[(0, 0, 1)] * 2,
    *[(1, 0, 1)] * 5,
    *[(1, 0, 0)] * 1,
    *[(0, 1, 0)] * 2,
    *[(1, 1, 1)] * 2,
    *[(0, 1, 1)] * 1,
    *[(1, 1, 0)] * 1,
    *[(0, 2, 0)] * 3,
    *[(0, 2, 1)] * 3,
    *[(1, 2, 0)] * 2,
    *[(1, 2, 1)] * 2,
]


def make_waterbirds(root: Path, rows: list[tuple[int, int, int]] = WB_ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    data = png_bytes(seed=1)
    for i, (y, split, place) in enumerate(rows):
        folder = "001.Black_footed_Albatross" if y else "002.Laysan_Albatross"
        (root / folder).mkdir(exist_ok=True)
        name = f"{folder}/bird_{i:04d}.jpg"
        Image.open(io.BytesIO(data)).save(root / name, format="JPEG")
        lines.append(f"{i + 1},{name},{y},{split},{place},/b/bamboo_forest/00000{i}.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_waterbirds_counts_and_samples(tmp_path: Path) -> None:
    root = make_waterbirds(tmp_path / "wb")
    want = Counter((y, place, split) for y, split, place in WB_ROWS)
    for split_id, split in enumerate(("train", "val", "test")):
        ds = get_dataset("waterbirds", split, root=str(root), image_size=16)
        got = Counter(
            (lab, conf, split_id) for lab, conf in ds.table[["label", "confounder"]].itertuples(index=False)
        )
        assert got == Counter({k: v for k, v in want.items() if k[2] == split_id})
        assert (ds.table["env"] == ds.table["confounder"]).all()
    assert ds.label_names == ["landbird", "waterbird"] and ds.confounder_names == ["land", "water"]
    assert ds.env_names == ["land", "water"] and ds.groups == [
        "landbird/land",
        "landbird/water",
        "waterbird/land",
        "waterbird/water",
    ]
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and "mask" not in s
    assert Path(ds.table["path"][0]).is_file()


def test_waterbirds_bad_input(tmp_path: Path) -> None:
    root = make_waterbirds(tmp_path / "wb")
    csv = root / "metadata.csv"
    text = csv.read_text()
    csv.write_text(text.replace(",place,", ",location,", 1))
    with pytest.raises(DataError, match=r"metadata\.csv.*lacks column 'place'"):
        get_dataset("waterbirds", "train", root=str(root))
    lines = text.splitlines()
    lines[3] = lines[3].replace(",0,0,0,", ",bird,0,0,", 1)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"column 'y' row 3 has value 'bird'; expected an integer"):
        get_dataset("waterbirds", "train", root=str(root))
    csv.write_text(text)
    (root / "002.Laysan_Albatross/bird_0000.jpg").unlink()
    with pytest.raises(DataError, match=r"bird_0000\.jpg.*does not exist"):
        get_dataset("waterbirds", "train", root=str(root))
    ds = get_dataset("waterbirds", "train", root=str(root), skip_unreadable=True)
    assert ds.n_skipped == 1 and len(ds) == 13
    no_test = make_waterbirds(tmp_path / "wb2", [r for r in WB_ROWS if r[1] != 2])
    with pytest.raises(DataError, match=r"'test'.*empty.*split == 2"):
        get_dataset("waterbirds", "test", root=str(no_test))


# ---- CSV and unreadable images -----------------------------------------------------------------------------
def make_csv_root(
    root: Path, header: str = "path,label,confounder,env,split", n: int = 24, with_split: bool = True
) -> Path:
    (root / "img").mkdir(parents=True)
    lines = [header]
    data = png_bytes(seed=2)
    splits = ["train", "val", "test", "0"]
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(data)
        label, conf, env = [3, 7][i % 2], i % 3, i % 2
        row = f"img/{i}.png,{label},{conf},{env}"
        lines.append(row + (f",{splits[i % 4]}" if with_split else ""))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_csv_names_and_splits(tmp_path: Path) -> None:
    root = make_csv_root(tmp_path / "c")
    train = get_dataset("csv", "train", root=str(root), image_size=8)
    assert train.label_names == ["3", "7"] and train.confounder_names == ["0", "1", "2"]
    assert len(train) == 12 and len(get_dataset("csv", "val", root=str(root))) == 6
    assert set(train.table["label"]) == {0, 1}
    named = get_dataset("csv", "test", root=str(root), confounder_names=["a", "b", "c"])
    assert named.confounder_names == ["a", "b", "c"] and named.groups[0] == "3/a"
    assert train[0]["image"].shape == (3, 8, 8)
    # no split column: seeded, disjoint, covers all rows; no env column: env = confounder
    plain = make_csv_root(tmp_path / "p", header="path,label,confounder", with_split=False, n=60)
    lines = [
        ln.rsplit(",", 1)[0] if i else ln for i, ln in enumerate((plain / "metadata.csv").read_text().split())
    ]
    (plain / "metadata.csv").write_text("\n".join(lines) + "\n")
    parts = [get_dataset("csv", s, root=str(plain), seed=5) for s in ("train", "val", "test")]
    paths = [set(p.table["path"]) for p in parts]
    assert sum(len(p) for p in paths) == 60 and len(set.union(*paths)) == 60
    assert [len(p) for p in parts] == [
        len(p) for p in (get_dataset("csv", s, root=str(plain), seed=5) for s in ("train", "val", "test"))
    ]
    assert (parts[0].table["env"] == parts[0].table["confounder"]).all()


def test_csv_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        get_dataset("csv", "train", root=str(tmp_path / "missing"))
    root = make_csv_root(tmp_path / "c")
    csv = root / "metadata.csv"
    text = csv.read_text()
    csv.write_text(text.replace("path,label,confounder", "path,label,spurious", 1))
    with pytest.raises(DataError, match=r"lacks column 'confounder'"):
        get_dataset("csv", "train", root=str(root))
    csv.write_text(text.replace("img/5.png,7,", "img/5.png,seven,", 1))
    with pytest.raises(DataError, match=r"column 'label' mixes integers \(row 1: '3'\) and names \(row 6: 'seven'\)"):
        get_dataset("csv", "train", root=str(root))
    csv.write_text(text.replace("img/5.png,7,", "img/5.png,7.5,", 1))
    with pytest.raises(DataError, match=r"column 'label' row 6 has value 7.5; expected an integer or a name"):
        get_dataset("csv", "train", root=str(root))
    csv.write_text(text.replace(",train", ",training", 1))
    with pytest.raises(DataError, match=r"column 'split' row 1 has value 'training'"):
        get_dataset("csv", "train", root=str(root))
    csv.write_text(text)
    with pytest.raises(DataError, match=r"label_names has 1"):
        get_dataset("csv", "train", root=str(root), label_names=["only"])
    with pytest.raises(DataError, match=r"unknown option 'csv_file'"):
        get_dataset("csv", "train", root=str(root), csv_file="x.csv")
    with pytest.raises(DataError, match=r"other\.csv.*does not exist"):
        get_dataset("csv", "train", root=str(root), csv="other.csv")


def test_unreadable_and_truncated_images(tmp_path: Path) -> None:
    root = make_csv_root(tmp_path / "c")
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, "PNG")
    (root / "img/0.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])  # truncated (train row)
    (root / "img/4.png").write_text("this is not a picture")  # unreadable (train row)
    ds = get_dataset("csv", "train", root=str(root))
    assert len(ds) == 12
    with pytest.raises(DataError, match=r"cannot read image '.*img/0\.png'"):
        ds[0]
    with pytest.raises(DataError, match=r"cannot read image '.*img/4\.png'"):
        ds[2]
    ds[1]  # good images still load
    skipped = get_dataset("csv", "train", root=str(root), skip_unreadable=True)
    assert skipped.n_skipped == 2 and len(skipped) == 10
    assert not any(p.endswith(("/0.png", "/4.png")) for p in skipped.table["path"])
