"""Readers that turn each real-world layout into a :class:`~fulora.data.manifest.Manifest`.

Layouts:

* FETAL_PLANES_DB: ``FETAL_PLANES_DB_data.csv`` + ``Images/`` (Burgos-Artizzu et al. 2020).
* The African fetal planes cohort: ``Patient_num,Plane,Train,Center,Image_name`` CSV.
* The paper's CSVs (``spain_train_1150_balanced.csv``...): ``Image_name`` + ``Plane`` (names or
  numeric codes).
* AUTOMATIC1111-style synthetic sets: ``Image_name`` = ``index-seed`` (``00012-2671683630``).
* A folder per plane (the LoRA training layout), with an optional caption file per folder and
  optional per-image caption files; kohya-style ``20_brain`` folder names give repeats.
* A manifest CSV written by fulora.

:func:`read_any` picks the reader from what it finds.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Literal

import pandas as pd

from fulora.data.manifest import MANIFEST_NAME, Manifest, read_csv_table, require_columns
from fulora.errors import DataError, LabelError
from fulora.planes import map_planes, plane_or_none

logger = logging.getLogger("fulora")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OnMissing = Literal["error", "skip", "ignore"]

#: ISO 3166 alpha-3 codes in African cohort file names, and the ``Center`` names of its CSV.
AFRICAN_CENTRES: dict[str, str] = {
    "DZA": "Algeria",
    "EGY": "Egypt",
    "GHA": "Ghana",
    "MWI": "Malawi",
    "UGA": "Uganda",
}

_FPDB_NAME = re.compile(r"^Patient(\d+)_Plane\d+_\d+_of_\d+$", re.IGNORECASE)
_AFRICAN_NAME = re.compile(r"^patient(\d+)_([A-Z]{3})_plane\d+$", re.IGNORECASE)
_A1111_NAME = re.compile(r"^(\d+)-(\d+)$")
_TRAIN_SPLIT = {"1": "train", "0": "test", "train": "train", "test": "test", "val": "val"}


def _image_path(images_dir: Path, name: str) -> Path:
    """Path of image ``name`` in ``images_dir``; names without an extension try the usual ones."""
    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        return images_dir / name
    for ext in IMAGE_EXTENSIONS:
        candidate = images_dir / f"{name}{ext}"
        if candidate.is_file():
            return candidate
    return images_dir / f"{name}.png"


def _check_missing(frame: pd.DataFrame, csv_path: Path, on_missing: OnMissing) -> pd.DataFrame:
    if on_missing == "ignore":
        return frame
    exists = [os.path.isfile(p) for p in frame["path"]]
    missing = [i for i, ok in enumerate(exists) if not ok]
    if not missing:
        return frame
    if on_missing == "error":
        i = missing[0]
        more = f" ({len(missing)} of {len(frame)} images are missing)" if len(missing) > 1 else ""
        raise DataError(
            f"image {frame['path'].iloc[i]} listed in {csv_path} line {int(frame.index[i]) + 2} "
            f"does not exist{more}. Check the images folder (images_dir / --images), or skip "
            "missing images with on_missing='skip' (CLI: --on-missing skip)."
        )
    logger.warning("%s: skipped %d image(s) that do not exist", csv_path, len(missing))
    return frame[exists]


def _split_column(values: pd.Series, csv_path: Path) -> list[str]:
    out = []
    for i, value in enumerate(values):
        split = _TRAIN_SPLIT.get(str(value).strip().lower())
        if split is None:
            raise DataError(
                f"unknown value {value!r} in the Train column of {csv_path} line {i + 2}; "
                "expected 1 (train) or 0 (test)"
            )
        out.append(split)
    return out


def _patient_from_name(name: str) -> tuple[str, str]:
    """(patient id, domain) guessed from a FETAL_PLANES_DB or African file name."""
    stem = Path(name).stem
    if match := _FPDB_NAME.match(stem):
        return str(int(match.group(1))), "Spain"
    if match := _AFRICAN_NAME.match(stem):
        centre = AFRICAN_CENTRES.get(match.group(2).upper(), match.group(2).upper())
        return f"{centre}-{int(match.group(1))}", centre
    return "", ""


def _find_images_dir(csv_path: Path, images_dir: str | Path | None) -> Path:
    if images_dir is not None:
        return Path(images_dir).resolve()
    # Images/ (FETAL_PLANES_DB), or a folder named like the table (the FU-LoRA notebook's
    # synthetic_train_5000.csv beside synthetic_train_5000/)
    here = csv_path.parent
    for candidate in (here / "Images", here / "images", here / csv_path.stem):
        if candidate.is_dir():
            return candidate.resolve()
    return csv_path.parent.resolve()


def _patients_and_domains(
    names: pd.Series, numbers: pd.Series | None, centres: pd.Series | None, domain: str
) -> tuple[list[str], list[str]]:
    """Globally unique patient ids and the domain of each row of a real-image table.

    From the ``Patient_num`` and ``Center`` columns where the table has them, else from the
    image names (``Patient01234_...``, ``patient012_GHA_...``), else the given ``domain``.
    """
    guessed = [_patient_from_name(n) for n in names]
    if centres is not None:
        domains = list(centres)
    elif domain:
        domains = [domain] * len(names)
    else:
        domains = [g[1] for g in guessed]
    if numbers is None:
        return [g[0] for g in guessed], domains
    if centres is not None:
        # African patient numbers restart at 1 in every centre: keep the centre in the id.
        patients = [
            f"{c}-{int(n) if n.isdigit() else n}" if n else ""
            for c, n in zip(centres, numbers, strict=True)
        ]
    else:
        patients = [str(int(n)) if n.isdigit() else n for n in numbers]
    return patients, domains


def read_image_table(
    csv_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    source: str = "",
    domain: str = "",
    on_missing: OnMissing = "error",
) -> Manifest:
    """Read any ``Image_name`` + ``Plane`` CSV (FETAL_PLANES_DB, African, paper, A1111 layouts).

    Recognised columns (case-insensitive, surrounding spaces ignored): ``Image_name``,
    ``Plane`` or ``category`` (label), ``Patient_num`` (patient), ``Train`` (1 train, 0 test),
    ``Center`` (domain). Other columns are kept as extras.

    Args:
        csv_path: The CSV.
        images_dir: Folder holding the images (default: ``Images/`` beside the CSV, else a
            folder named like the CSV, e.g. ``synthetic_train_5000/``, else the CSV's folder).
        source: Value of the ``source`` column (default: guessed from the columns).
        domain: Value of ``domain`` where the CSV has no ``Center`` (default: guessed from names).
        on_missing: What to do with rows whose image does not exist: ``error`` (default),
            ``skip`` (drop, with a warning), ``ignore`` (keep; for CSVs without their images).

    Raises:
        DataError: Naming the file (and line) for a missing column, unknown label or split, or a
            missing image.
    """
    csv_path = Path(csv_path)
    frame, delimiter = read_csv_table(csv_path)
    cols = require_columns(frame, csv_path, ["Image_name", ("Plane", "category")], delimiter)
    lower = {c.lower(): c for c in frame.columns}
    name_col, label_col = cols["Image_name"], cols["Plane"]
    patient_col = lower.get("patient_num")
    train_col = lower.get("train")
    centre_col = lower.get("center")
    names = frame[name_col]
    is_a1111 = len(names) > 0 and bool(names.str.fullmatch(_A1111_NAME.pattern).all())
    if not source:
        source = "synthetic" if is_a1111 else "african" if centre_col else "fetal_planes_db"
    folder = _find_images_dir(csv_path, images_dir)

    out = pd.DataFrame(index=frame.index)
    out["path"] = [str(_image_path(folder, n)) for n in names]
    out["label"] = map_planes(frame[label_col], file=str(csv_path))
    out["split"] = _split_column(frame[train_col], csv_path) if train_col else ""
    out["source"] = source
    if is_a1111:  # synthetic: no patient, the index and seed from the name
        parts = names.str.extract(_A1111_NAME)
        out["domain"] = domain or "synthetic"
        out["patient"] = ""
        out["index"] = parts[0].astype(int)
        out["seed"] = parts[1].astype("int64")
    else:
        centres = frame[centre_col] if centre_col else None
        numbers = frame[patient_col] if patient_col else None
        out["patient"], out["domain"] = _patients_and_domains(names, numbers, centres, domain)
    used = {name_col, label_col, patient_col, train_col, centre_col}
    for column in frame.columns:
        if column not in used and column not in out.columns:
            out[column] = frame[column]
    out = _check_missing(out, csv_path, on_missing)
    return Manifest(out, origin=str(csv_path), validate=False)


def read_fetal_planes_db(
    path: str | Path, *, images_dir: str | Path | None = None, on_missing: OnMissing = "error"
) -> Manifest:
    """Read FETAL_PLANES_DB (the dataset folder or its ``FETAL_PLANES_DB_data.csv``).

    Patient ids are kept; the ``Train`` column gives the split; the domain is ``Spain``; the
    ``Brain_plane``, ``Operator`` and ``US_Machine`` columns are kept as extras.
    """
    path = Path(path)
    csv_path = path / "FETAL_PLANES_DB_data.csv" if path.is_dir() else path
    return read_image_table(
        csv_path,
        images_dir=images_dir,
        source="fetal_planes_db",
        domain="Spain",
        on_missing=on_missing,
    )


def read_african(
    path: str | Path, *, images_dir: str | Path | None = None, on_missing: OnMissing = "error"
) -> Manifest:
    """Read the African fetal planes cohort (a folder with one CSV, or the CSV).

    ``Center`` becomes the domain (country); patient ids are ``<country>-<number>`` because the
    numbers restart in every centre.
    """
    path = Path(path)
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) != 1:
            raise DataError(
                f"expected one CSV (Patient_num,Plane,Train,Center,Image_name) in {path}, "
                f"found {len(csvs)}; pass the CSV itself"
            )
        path = csvs[0]
    frame, delimiter = read_csv_table(path)
    require_columns(frame, path, ["Image_name", "Plane", "Center", "Patient_num"], delimiter)
    return read_image_table(path, images_dir=images_dir, source="african", on_missing=on_missing)


def read_synthetic_a1111(
    csv_path: str | Path,
    *,
    images_dir: str | Path | None = None,
    on_missing: OnMissing = "error",
) -> Manifest:
    """Read an AUTOMATIC1111-style synthetic set: ``Image_name`` = ``index-seed``.

    The index and seed parsed from each name are kept as ``index`` and ``seed`` columns.
    """
    csv_path = Path(csv_path)
    frame, delimiter = read_csv_table(csv_path)
    cols = require_columns(frame, csv_path, ["Image_name", ("Plane", "category")], delimiter)
    names = frame[cols["Image_name"]]
    bad = ~names.str.fullmatch(_A1111_NAME.pattern)
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{csv_path} line {i + 2}: image name {names.iloc[i]!r} is not an "
            "AUTOMATIC1111 'index-seed' name such as 00012-2671683630"
        )
    return read_image_table(
        csv_path, images_dir=images_dir, source="synthetic", on_missing=on_missing
    )


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1").strip()


def _images_in(folder: Path) -> list[Path]:
    """The image files of a folder, sorted.

    Hidden files are not images of the set: macOS's ``._`` companions, a killed writer's
    ``.<name>.tmp.png``.
    """
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def read_plane_folders(
    root: str | Path,
    *,
    source: str = "",
    domain: str = "",
    caption_file: str | None = None,
) -> Manifest:
    """Read a folder per plane (the LoRA training layout).

    ``root/<plane>/*.png``; folder names are any plane spelling (``brain``, ``Fetal brain``),
    optionally with a kohya-style repeat prefix (``20_brain``, kept in a ``repeats`` column).
    A folder's caption file (``caption_file``, or the folder's only ``.txt`` that is not named
    after an image) gives the caption of all its images; ``<image>.txt`` beside an image
    overrides it for that image. Captions go in a ``caption`` column.

    Args:
        root: The folder holding one folder per plane.
        source: ``source`` column (default ``fetal_planes_db`` for FETAL_PLANES_DB file names,
            ``african`` for African ones, else ``folder``).
        domain: ``domain`` column (default guessed from file names).
        caption_file: Name of the per-folder caption file.

    Raises:
        DataError: If ``root`` is missing, a folder is not a plane, or a folder has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist")
    records = []
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root} has no plane folders (expected e.g. {root}/brain/*.png)")
    for folder in subdirs:
        match = re.fullmatch(r"(?:(\d+)_)?(.+)", folder.name)
        repeats, name = (match.group(1), match.group(2)) if match else (None, folder.name)
        plane = plane_or_none(name)
        if plane is None:
            raise LabelError(
                f"folder {folder} is not named after a plane ({name!r}); name plane folders "
                "abdomen, brain, femur, other, thorax or cervix (optionally '20_brain' for repeats)"
            )
        images = _images_in(folder)
        if not images:
            raise DataError(
                f"plane folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        stems = {p.stem for p in images}
        texts = [t for t in folder.glob("*.txt") if t.stem not in stems]
        caption = ""
        if caption_file is not None:
            if not (folder / caption_file).is_file():
                raise DataError(f"caption file {folder / caption_file} does not exist")
            caption = _read_caption(folder / caption_file)
        elif len(texts) == 1:
            caption = _read_caption(texts[0])
        elif len(texts) > 1:
            raise DataError(
                f"{folder} has several caption files ({', '.join(t.name for t in texts)}); "
                "name the one to use with caption_file"
            )
        for image in images:
            own = image.with_suffix(".txt")
            patient, guessed_domain = _patient_from_name(image.name)
            record = {
                "path": str(image.resolve()),
                "label": plane,
                "split": "",
                "source": source or _source_from_name(image.name),
                "domain": domain or guessed_domain,
                "patient": patient,
                "caption": _read_caption(own) if own.is_file() else caption,
            }
            if repeats:
                record["repeats"] = int(repeats)
            records.append(record)
    return Manifest.from_records(records, origin=str(root))


def _source_from_name(name: str) -> str:
    stem = Path(name).stem
    if _FPDB_NAME.match(stem):
        return "fetal_planes_db"
    if _AFRICAN_NAME.match(stem):
        return "african"
    return "folder"


def detect_layout(path: str | Path) -> str:
    """Name of the data layout at ``path``.

    One of ``manifest``, ``fetal_planes_db``, ``african``, ``synthetic_a1111``,
    ``image_table`` or ``plane_folders``.

    Raises:
        DataError: If ``path`` does not exist or holds no layout fulora knows.
    """
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return "manifest"
        if (path / "FETAL_PLANES_DB_data.csv").is_file():
            return "fetal_planes_db"
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) == 1:
            layout = detect_layout(csvs[0])
            if layout != "image_table" or not any(d.is_dir() for d in path.iterdir()):
                return layout
        if any(d.is_dir() and plane_or_none(re.sub(r"^\d+_", "", d.name)) for d in path.iterdir()):
            return "plane_folders"
        raise DataError(
            f"{path} holds no data layout fulora knows: expected manifest.csv, "
            "FETAL_PLANES_DB_data.csv, one image CSV, or one folder per plane"
        )
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path} is not a CSV file or a folder")
    frame, _ = read_csv_table(path)
    columns = {c.lower() for c in frame.columns}
    if {"path", "label"} <= columns:
        return "manifest"
    if "image_name" in columns and "center" in columns:
        return "african"
    if "image_name" in columns and ({"plane", "category"} & columns):
        names = frame[[c for c in frame.columns if c.lower() == "image_name"][0]]
        if len(names) and names.str.fullmatch(_A1111_NAME.pattern).all():
            return "synthetic_a1111"
        if {"patient_num", "brain_plane"} <= columns:
            return "fetal_planes_db"
        return "image_table"
    raise DataError(
        f"{path}: cannot tell what kind of CSV this is from its columns "
        f"({', '.join(frame.columns)}); a manifest needs 'path' and 'label', an image table "
        "'Image_name' and 'Plane'"
    )


def read_any(
    path: str | Path,
    *,
    images_dir: str | Path | None = None,
    on_missing: OnMissing = "error",
    source: str = "",
    domain: str = "",
) -> Manifest:
    """Read whatever layout is at ``path`` (see :func:`detect_layout`) into a manifest."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "manifest":
        manifest = Manifest.read(path / MANIFEST_NAME if path.is_dir() else path)
        frame = _check_missing(manifest.frame, Path(manifest.origin), on_missing)
        return Manifest(frame, origin=manifest.origin, validate=False)
    if layout == "plane_folders":
        return read_plane_folders(path, source=source, domain=domain)
    csv_path = path
    if path.is_dir():
        csv_path = (
            path / "FETAL_PLANES_DB_data.csv"
            if layout == "fetal_planes_db"
            else sorted(path.glob("*.csv"))[0]
        )
    if layout == "fetal_planes_db":
        return read_fetal_planes_db(csv_path, images_dir=images_dir, on_missing=on_missing)
    if layout == "african":
        return read_african(csv_path, images_dir=images_dir, on_missing=on_missing)
    if layout == "synthetic_a1111":
        return read_synthetic_a1111(csv_path, images_dir=images_dir, on_missing=on_missing)
    return read_image_table(
        csv_path, images_dir=images_dir, source=source, domain=domain, on_missing=on_missing
    )
