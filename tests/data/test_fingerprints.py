"""Stage fingerprints follow what a stage reads, not only the paths (issue 13, class 2)."""

from __future__ import annotations

import logging
import shutil

import pandas as pd
import pytest

from fulora.data import hashes
from fulora.data.hashes import content_hashes
from fulora.data.manifest import Manifest
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.data.readers import read_any
from fulora.errors import DataError


@pytest.fixture
def phantom(tmp_path):
    generate_phantom(tmp_path / "data", PhantomConfig(per_class=2, grid=False))
    return tmp_path / "data"


CHANGES = {  # what changes in place, without any path changing
    "patient ids": lambda m: m.frame.assign(patient=m.frame["patient"] + "-new"),
    "a split": lambda m: m.frame.assign(split=["test"] + list(m.frame["split"][1:])),
    "an extra column": lambda m: m.frame.assign(site="Madrid"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_column_change_changes_the_fingerprint(phantom, change):
    manifest = read_any(phantom)
    changed = Manifest(CHANGES[change](manifest), origin="changed")
    assert changed.fingerprint() != manifest.fingerprint()


def test_row_order_does_not_matter(phantom):
    manifest = read_any(phantom)
    shuffled = Manifest(manifest.frame.sample(frac=1.0, random_state=0), validate=False)
    assert shuffled.fingerprint() == manifest.fingerprint()


def test_pixels_replaced_in_place_change_the_fingerprint(phantom):
    manifest = read_any(phantom)
    before = manifest.fingerprint()
    first, second = manifest.paths[0], manifest.paths[1]
    shutil.copyfile(second, first)  # same path, other pixels
    assert manifest.fingerprint() != before
    assert manifest.fingerprint(content=False) == Manifest(manifest.frame).fingerprint(
        content=False
    )


def test_hashes_are_remembered_until_mtime_or_size_changes(phantom, tmp_path, monkeypatch):
    paths = read_any(phantom).paths
    index = tmp_path / "index.sqlite"
    calls = []
    real = hashes.content_hash
    monkeypatch.setattr(hashes, "content_hash", lambda p: calls.append(p) or real(p))
    first = content_hashes(paths, index)
    assert len(calls) == len(paths)
    assert content_hashes(paths, index) == first and len(calls) == len(paths)  # no re-reading
    paths[0].write_bytes(paths[0].read_bytes() + b"\0")  # size and mtime change
    third = content_hashes(paths, index)
    assert len(calls) == len(paths) + 1 and third[0] != first[0] and third[1:] == first[1:]
    assert content_hashes([tmp_path / "gone.png"], index) == [hashes.MISSING]


def test_duplicate_rows_are_used_once_with_a_warning_naming_them(phantom, caplog):
    manifest = read_any(phantom)
    doubled = Manifest(pd.concat([manifest.frame, manifest.frame.iloc[[0, 3]]]), origin="x.csv")
    with caplog.at_level(logging.WARNING, logger="fulora"):
        once = doubled.drop_duplicate_paths()
    assert len(once) == len(manifest)
    assert f"rows {len(manifest)}, {len(manifest) + 1}" in caplog.text and "x.csv" in caplog.text
    relabelled = manifest.frame.iloc[[0]].assign(
        label="femur" if manifest.labels[0] != "femur" else "brain"
    )
    with pytest.raises(DataError, match="different labels"):
        Manifest(pd.concat([manifest.frame, relabelled]), origin="y.csv").drop_duplicate_paths()
