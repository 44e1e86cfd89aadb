import os
import stat

import pytest

from fulora.io import atomic_open, atomic_path, file_hash, write_json


def test_atomic_open_replaces_only_on_success(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half-writ")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left behind
    with atomic_open(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"


def test_atomic_path_keeps_suffix_and_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "img.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == target.parent
        tmp.write_bytes(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_write_json_and_hash(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    assert len(file_hash(tmp_path / "a.json")) == 64
    assert len(file_hash(tmp_path / "a.json", "md5")) == 32
