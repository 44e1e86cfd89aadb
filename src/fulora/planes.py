"""The one place that knows the fetal plane vocabulary.

Canonical labels are short lowercase names. Every spelling seen in real data maps to them:
FETAL_PLANES_DB (``Fetal brain``, ``Maternal cervix``, ``Other``), the African cohort CSV
(``Fetal abdomen`` ...), LoRA folder names (``brain``), captions and the numeric codes of the
FU-LoRA paper's CSVs (``0`` other, ``1`` abdomen, ``2`` brain, ``4`` femur, ``5`` thorax).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fulora.errors import LabelError

#: Canonical plane labels, in the paper's code order.
PLANES: tuple[str, ...] = ("other", "abdomen", "brain", "cervix", "femur", "thorax")

#: The five planes FU-LoRA trains and generates (the paper drops the maternal cervix).
PAPER_PLANES: tuple[str, ...] = ("abdomen", "brain", "femur", "other", "thorax")

#: Numeric codes used by the paper's CSVs. 3 is absent from them; it is the cervix, the only
#: plane left once the others are placed in the paper's order (other first, then alphabetical).
PAPER_CODES: dict[int, str] = {
    0: "other",
    1: "abdomen",
    2: "brain",
    3: "cervix",
    4: "femur",
    5: "thorax",
}

#: Caption the paper used for every LoRA training image of a plane.
PAPER_CAPTIONS: dict[str, str] = {
    "abdomen": "a photo of fetal abdomen",
    "brain": "a photo of fetal brain",
    "femur": "a photo of fetal femur",
    "thorax": "a photo of fetal thorax",
    "other": "a photo of fetal ultrasound",
    "cervix": "a photo of maternal cervix",
}

_ALIASES: dict[str, str] = {}
for _plane in PLANES:
    _ALIASES[_plane] = _plane
    _ALIASES[f"fetal {_plane}"] = _plane
for _plane, _caption in PAPER_CAPTIONS.items():
    _ALIASES[_caption] = _plane
_ALIASES.update(
    {
        "maternal cervix": "cervix",
        "others": "other",
        "fetal ultrasound": "other",
        "fetal head": "brain",
        "fetal chest": "thorax",
    }
)


def _normalise(value: object) -> str:
    text = str(value).strip().lower()
    return re.sub(r"[\s_\-]+", " ", text)


def plane_or_none(value: object) -> str | None:
    """Map one spelling of a plane to its canonical label, or None if it is unknown.

    Args:
        value: A label as found in data: a name (any case, ``_``/``-``/spaces), a caption, or a
            paper code (``2``, ``"2"``, ``2.0``).

    Returns:
        The canonical label, or None.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        if isinstance(value, float) and not value.is_integer():
            return None
        return PAPER_CODES.get(int(value))
    text = _normalise(value)
    if re.fullmatch(r"\d+(\.0+)?", text):
        return PAPER_CODES.get(int(float(text)))
    return _ALIASES.get(text)


def to_plane(value: object, *, where: str = "") -> str:
    """Map one spelling of a plane to its canonical label.

    Args:
        value: The label as found in the data.
        where: Where it was found (file and row), used in the error message.

    Returns:
        The canonical label.

    Raises:
        LabelError: If the value is not a known spelling of any plane.
    """
    plane = plane_or_none(value)
    if plane is None:
        place = f" in {where}" if where else ""
        raise LabelError(
            f"unknown plane label {str(value)!r}{place}. Known planes: {', '.join(PLANES)} "
            f"(also their FETAL_PLANES_DB names such as 'Fetal brain' and the paper's codes "
            f"{', '.join(f'{k}={v}' for k, v in PAPER_CODES.items())})."
        )
    return plane


def map_planes(values: Iterable[object], *, file: str = "", first_line: int = 2) -> list[str]:
    """Map a column of labels to canonical planes, naming the file and line of the first bad one.

    Args:
        values: Labels in file order.
        file: The file they come from.
        first_line: The file line number of the first value (2 for a CSV with a header line).

    Returns:
        Canonical labels, same order.

    Raises:
        LabelError: On the first unknown label, naming file, line and value.
    """
    cache: dict[object, str | None] = {}
    out: list[str] = []
    for i, value in enumerate(values):
        key = value if isinstance(value, str | int | float) else str(value)
        if key not in cache:
            cache[key] = plane_or_none(value)
        plane = cache[key]
        if plane is None:
            to_plane(value, where=f"{file} line {first_line + i}" if file else f"row {i}")
        out.append(plane)  # type: ignore[arg-type]
    return out


def check_planes(planes: Iterable[str]) -> list[str]:
    """Return ``planes`` as canonical labels, raising on any unknown one (for configs and CLIs)."""
    return [to_plane(p, where="the plane list") for p in planes]
