"""The one atomic-write helper: a file is replaced whole or not at all."""

import json

import pytest
import torch

from ex2l_xai.fileio import append_line, atomic_open, atomic_save, atomic_write, atomic_write_json


def test_atomic_write_text_bytes_and_json(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write(p, "hello")
    assert p.read_text() == "hello"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "r.json", {"x": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1}
    assert sorted(f.name for f in tmp_path.rglob("*")) == ["a.txt", "r.json", "sub"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "keep.txt"
    atomic_write(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_save_torch_and_append_line(tmp_path):
    p = tmp_path / "ck.pt"
    atomic_save(p, lambda f: torch.save({"w": torch.arange(3)}, f))
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.arange(3))
    m = tmp_path / "metrics.jsonl"
    append_line(m, {"epoch": 1})
    append_line(m, {"epoch": 2})
    assert [json.loads(line)["epoch"] for line in m.read_text().splitlines()] == [1, 2]
