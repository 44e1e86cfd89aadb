import pytest

from fulora.errors import LabelError
from fulora.planes import PAPER_CODES, PLANES, map_planes, plane_or_none, to_plane


@pytest.mark.parametrize(
    ("spelling", "plane"),
    [
        ("Fetal brain", "brain"),
        ("Fetal abdomen", "abdomen"),
        ("Fetal femur", "femur"),
        ("Fetal thorax", "thorax"),
        ("Maternal cervix", "cervix"),
        ("Other", "other"),
        ("  fetal_brain ", "brain"),
        ("FETAL-THORAX", "thorax"),
        ("brain", "brain"),
        ("a photo of fetal ultrasound", "other"),
        ("a photo of fetal femur", "femur"),
        (0, "other"),
        ("1", "abdomen"),
        (2, "brain"),
        ("4", "femur"),
        (5.0, "thorax"),
        ("5.0", "thorax"),
        (3, "cervix"),
    ],
)
def test_every_real_spelling_maps(spelling, plane):
    assert to_plane(spelling) == plane


@pytest.mark.parametrize("bad", ["Fetal liver", "", "7", 2.5, None, True, "brain plane"])
def test_unknown_labels(bad):
    assert plane_or_none(bad) is None


def test_paper_codes_cover_every_plane():
    assert sorted(PAPER_CODES.values()) == sorted(PLANES)


def test_unknown_label_error_names_file_line_and_value():
    with pytest.raises(LabelError) as err:
        map_planes(["Fetal brain", "Other", "Fetal liver"], file="x.csv")
    message = str(err.value)
    assert "'Fetal liver'" in message and "x.csv line 4" in message
    assert "brain" in message  # lists the known planes
