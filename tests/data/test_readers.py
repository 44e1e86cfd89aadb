"""Readers on the real CSVs from ../shared, and on the bad inputs users actually have."""

from pathlib import Path

import pytest

from fulora.data.readers import (
    detect_layout,
    read_african,
    read_any,
    read_fetal_planes_db,
    read_image_table,
    read_plane_folders,
    read_synthetic_a1111,
)
from fulora.errors import DataError, LabelError

PAPER5 = {"other", "abdomen", "brain", "femur", "thorax"}


# -- real CSVs ------------------------------------------------------------------------------
def test_fetal_planes_db_csv_with_bom_and_trailing_space_header(sample_data):
    csv = sample_data / "manifests" / "all_train_no_cer.csv"
    m = read_fetal_planes_db(csv, on_missing="ignore")
    assert len(m) == 6148
    assert m.counts("label") == {
        "other": 2601,
        "abdomen": 353,
        "brain": 1620,
        "femur": 516,
        "thorax": 1058,
    }
    assert set(m.frame["split"]) == {"train"}  # the "Train " column, trailing space and all
    assert m.frame["patient"].nunique() == 612  # as in the paper's table
    assert {"Brain_plane", "Operator", "US_Machine"} <= set(m.extra_columns)
    assert m.paths[0].name == "Patient00001_Plane1_1_of_15.png"
    assert detect_layout(csv) == "fetal_planes_db"


def test_paper_balanced_1150_numeric_codes(sample_data):
    m = read_any(sample_data / "manifests" / "spain_train_1150_balanced.csv", on_missing="ignore")
    assert m.counts("label") == {p: 230 for p in ["other", "abdomen", "brain", "femur", "thorax"]}
    assert m.frame["patient"].nunique() == 486  # patients from the file names, as in the paper
    assert set(m.frame["domain"]) == {"Spain"}


def test_paper_other_csv(sample_data):
    m = read_image_table(sample_data / "manifests" / "spain_other_train.csv", on_missing="ignore")
    assert m.counts("label") == {"other": 230}


def test_a1111_synthetic_csv(sample_data):
    m = read_synthetic_a1111(
        sample_data / "manifests" / "synthetic_train_5000.csv", on_missing="ignore"
    )
    assert len(m) == 5000 and set(m.counts("label")) == PAPER5
    first = m.frame.iloc[0]
    assert first["source"] == "synthetic" and first["domain"] == "synthetic"
    assert int(first["index"]) == 0 and int(first["seed"]) == 2671683618
    assert first["patient"] == ""
    assert Path(first["path"]).name == "00000-2671683618.png"


def test_african_cohort(sample_data):
    m = read_african(sample_data / "african_dev")
    assert len(m) == 217
    assert m.counts("label") == {"abdomen": 60, "brain": 60, "femur": 61, "thorax": 36}
    assert m.counts("domain") == {
        "Algeria": 48,
        "Egypt": 48,
        "Ghana": 36,
        "Malawi": 49,
        "Uganda": 36,
    }
    # patient numbers restart per centre: the id keeps the centre
    assert "Algeria-7" in set(m.frame["patient"])
    assert all(p.is_file() for p in m.paths)


def test_lora_plane_folders_with_captions(sample_data):
    m = read_plane_folders(sample_data / "spain_lora_train")
    assert m.counts("label") == {p: 20 for p in ["other", "abdomen", "brain", "femur", "thorax"]}
    captions = dict(zip(m.frame["label"], m.frame["caption"], strict=True))
    assert captions["brain"] == "a photo of fetal brain"
    assert captions["other"] == "a photo of fetal ultrasound"
    assert set(m.frame["source"]) == {"fetal_planes_db"}
    assert detect_layout(sample_data / "spain_lora_train") == "plane_folders"


# -- bad input ------------------------------------------------------------------------------
@pytest.fixture
def fpdb(tmp_path, make_png):
    """A tiny FETAL_PLANES_DB-style folder: ';' delimiter, BOM, header with trailing spaces."""
    root = tmp_path / "FPDB"
    for name in (
        "Patient00001_Plane1_1_of_2",
        "Patient00001_Plane1_2_of_2",
        "Patient00002_Plane3_1_of_1",
    ):
        make_png(root / "Images" / f"{name}.png")
    text = (
        "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train \r\n"
        "Patient00001_Plane1_1_of_2;1;Fetal brain;Trans-thalamic;Op. 1;Voluson E6;1\r\n"
        "Patient00001_Plane1_2_of_2;1;Maternal cervix;Not A Brain;Op. 1;Voluson E6;1\r\n"
        "Patient00002_Plane3_1_of_1;2;Other;Not A Brain;Op. 2;Aloka;0\r\n"
    )
    (root / "FETAL_PLANES_DB_data.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    return root


def test_semicolon_fpdb_folder(fpdb):
    m = read_any(fpdb)
    assert m.labels == ["brain", "cervix", "other"]
    assert list(m.frame["split"]) == ["train", "train", "test"]
    assert list(m.frame["patient"]) == ["1", "1", "2"]
    assert all(p.is_file() for p in m.paths)


def test_wrong_delimiter(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("Image_name:Plane:Train\nx:Fetal brain:1\n")
    with pytest.raises(DataError) as err:
        read_image_table(csv)
    message = str(err.value)
    assert "bad.csv" in message and "'Plane'" in message and "':' as delimiter" in message


def test_rows_with_the_wrong_number_of_fields(tmp_path):
    csv = tmp_path / "mixed.csv"
    csv.write_text("Image_name,Plane,Train\nx,Fetal brain,1\ny;Fetal brain;1,a,b,c\n")
    with pytest.raises(DataError, match=r"cannot parse CSV file .*mixed\.csv.*line 3"):
        read_image_table(csv)


def test_missing_column(tmp_path):
    csv = tmp_path / "African.csv"
    csv.write_text("Patient_num,Plane,Train,Image_name\n1,Fetal brain,1,patient001_DZA_plane1\n")
    with pytest.raises(DataError, match=r"African\.csv is missing column 'Center'"):
        read_african(csv)


def test_unknown_label_names_file_line_value(fpdb):
    csv = fpdb / "FETAL_PLANES_DB_data.csv"
    csv.write_bytes(csv.read_bytes().replace(b"Other", b"Fetal liver"))
    with pytest.raises(LabelError) as err:
        read_fetal_planes_db(fpdb)
    assert "'Fetal liver'" in str(err.value) and "line 4" in str(err.value)
    assert "FETAL_PLANES_DB_data.csv" in str(err.value)


def test_missing_image_is_an_error_or_skipped(fpdb):
    (fpdb / "Images" / "Patient00001_Plane1_2_of_2.png").unlink()
    with pytest.raises(DataError) as err:
        read_fetal_planes_db(fpdb)
    assert "Patient00001_Plane1_2_of_2.png" in str(err.value) and "line 3" in str(err.value)
    assert len(read_fetal_planes_db(fpdb, on_missing="skip")) == 2
    assert len(read_fetal_planes_db(fpdb, on_missing="ignore")) == 3


def test_bad_train_value(fpdb):
    csv = fpdb / "FETAL_PLANES_DB_data.csv"
    csv.write_bytes(csv.read_bytes().replace(b";0\r\n", b";maybe\r\n"))
    with pytest.raises(DataError, match=r"'maybe' in the Train column .* line 4"):
        read_fetal_planes_db(fpdb)


def test_a1111_reader_rejects_other_names(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("Image_name,Plane\n00001-123,Fetal brain\nfoo,Fetal brain\n")
    with pytest.raises(DataError, match=r"line 3.*'foo'"):
        read_synthetic_a1111(csv, on_missing="ignore")


def test_plane_folder_errors(tmp_path, make_png):
    make_png(tmp_path / "brain" / "a.png")
    make_png(tmp_path / "liver" / "a.png")
    with pytest.raises(LabelError, match=r"liver.*not named after a plane"):
        read_plane_folders(tmp_path)
    (tmp_path / "liver" / "a.png").unlink()
    (tmp_path / "liver").rmdir()
    (tmp_path / "femur").mkdir()
    with pytest.raises(DataError, match=r"femur holds no images"):
        read_plane_folders(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_plane_folders(tmp_path / "nope")


def test_plane_folders_kohya_repeats_and_per_image_captions(tmp_path, make_png):
    make_png(tmp_path / "10_brain" / "a.png")
    make_png(tmp_path / "10_brain" / "b.png")
    (tmp_path / "10_brain" / "caption.txt").write_text("a photo of fetal brain\n")
    (tmp_path / "10_brain" / "b.txt").write_text("a photo of fetal brain, axial\n")
    m = read_plane_folders(tmp_path)
    assert list(m.frame["caption"]) == ["a photo of fetal brain", "a photo of fetal brain, axial"]
    assert list(m.frame["repeats"]) == [10, 10]
    with pytest.raises(DataError, match="missing.txt does not exist"):
        read_plane_folders(tmp_path, caption_file="missing.txt")


def test_missing_csv_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_any(tmp_path / "nothing.csv")
    odd = tmp_path / "odd.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="cannot tell what kind of CSV"):
        read_any(odd)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data layout"):
        read_any(tmp_path / "empty")


def test_manifest_with_missing_images(tmp_path, make_png):
    make_png(tmp_path / "a.png")
    (tmp_path / "manifest.csv").write_text("path,label\na.png,brain\nb.png,femur\n")
    with pytest.raises(DataError, match=r"b\.png listed in .*manifest\.csv line 3 does not exist"):
        read_any(tmp_path)
    assert read_any(tmp_path, on_missing="skip").labels == ["brain"]
    assert len(read_any(tmp_path / "manifest.csv", on_missing="ignore")) == 2
