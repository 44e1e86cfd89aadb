from pathlib import Path

import pandas as pd
import pytest

from fulora.data.manifest import COLUMNS, Manifest
from fulora.errors import DataError, LabelError


def _manifest(tmp_path: Path, n_patients: int = 10, per_patient: int = 3) -> Manifest:
    records = []
    planes = ["brain", "abdomen", "femur", "thorax", "other"]
    for p in range(n_patients):
        for k in range(per_patient):
            records.append(
                {
                    "path": str(tmp_path / f"p{p}_{k}.png"),
                    "label": planes[(p + k) % 5],
                    "patient": f"P{p}",
                    "source": "s",
                    "domain": "d",
                }
            )
    return Manifest.from_records(records)


def test_write_read_round_trip_relative_paths(tmp_path):
    m = _manifest(tmp_path)
    m.frame["extra"] = "kept"
    out = m.write(tmp_path / "manifest.csv")
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert frame["path"].iloc[0] == "p0_0.png"  # inside the folder: relative
    back = Manifest.read(out)
    assert back.paths == m.paths
    assert back.frame["extra"].eq("kept").all()


def test_paths_outside_the_folder_stay_absolute(tmp_path):
    m = _manifest(tmp_path)
    out = m.write(tmp_path / "sub" / "manifest.csv")
    frame = pd.read_csv(out, dtype=str)
    assert Path(frame["path"].iloc[0]).is_absolute()


def test_plain_manifest_needs_path_and_label(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("file,label\na.png,brain\n")
    with pytest.raises(DataError, match=r"missing column 'path'.*found columns: 'file', 'label'"):
        Manifest.read(csv)


def test_plain_manifest_unknown_label_and_split(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.png,brain\nb.png,liver\n")
    with pytest.raises(LabelError, match=r"'liver'.*m\.csv line 3"):
        Manifest.read(csv)
    csv.write_text("path,label,split\na.png,brain,training\n")
    with pytest.raises(DataError, match="unknown split 'training'"):
        Manifest.read(csv)


def test_split_by_patient_has_no_patient_on_both_sides(tmp_path):
    m = _manifest(tmp_path, n_patients=20).split_by_patient(0.25, seed=1)
    train = set(m.select(split="train").frame["patient"])
    val = set(m.select(split="val").frame["patient"])
    assert train and val and not (train & val)
    assert 0.1 < len(m.select(split="val")) / len(m) < 0.4
    again = _manifest(tmp_path, n_patients=20).split_by_patient(0.25, seed=1)
    assert list(again.frame["split"]) == list(m.frame["split"])


def test_split_needs_enough_patients(tmp_path):
    with pytest.raises(DataError, match="only 2 patient"):
        _manifest(tmp_path, n_patients=2).split_by_patient(0.2)


def test_balanced_subsample(tmp_path):
    m = _manifest(tmp_path, n_patients=20)
    b = m.balanced(8, seed=0)
    assert b.counts("label") == {p: 8 for p in ["other", "abdomen", "brain", "femur", "thorax"]}
    assert b.balanced(8, seed=0).fingerprint() == b.fingerprint()
    with pytest.raises(DataError, match=r"plane '.*' has 12 image\(s\).*fewer than the 50"):
        m.balanced(50)
    assert len(m.balanced(50, allow_fewer=True)) == len(m)


def test_concat_keeps_extra_columns(tmp_path):
    a = _manifest(tmp_path, 2)
    b = _manifest(tmp_path, 2).with_values(seed=7)
    both = Manifest.concat([a, b])
    assert len(both) == len(a) + len(b)
    assert list(both.frame["seed"].iloc[: len(a)]) == [""] * len(a)
    assert "seed" in both.extra_columns


def test_select(tmp_path):
    m = _manifest(tmp_path).split_by_patient(0.2)
    assert set(m.select(labels=["brain"]).labels) == {"brain"}
    assert len(m.select(split="val")) + len(m.select(split="train")) == len(m)
