"""The manifest: one row per image, the common language of every fulora stage.

On disk a manifest is a plain CSV with the columns ``path,label,split,source,domain,patient``
followed by any extra columns (synthetic images add their prompt, seed, sampler and so on).
``path`` is relative to the manifest's folder or absolute. In memory, paths are absolute.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fulora.data.hashes import MISSING, content_hashes
from fulora.errors import ConfigError, DataError
from fulora.io import atomic_open
from fulora.planes import PLANES, map_planes
from fulora.runs import TRAIN_MANIFEST_NAME

logger = logging.getLogger("fulora")

#: Required columns, in file order.
COLUMNS: tuple[str, ...] = ("path", "label", "split", "source", "domain", "patient")
#: What a run folder or a dataset folder calls its manifest.
MANIFEST_NAME = "manifest.csv"
#: Allowed values of ``split`` ("" means unassigned).
SPLITS: tuple[str, ...] = ("train", "val", "test", "")

#: Extra columns written by the generation stage, in this order, for synthetic images.
SYNTHETIC_COLUMNS: tuple[str, ...] = (
    "prompt",
    "negative_prompt",
    "seed",
    "sampler",
    "steps",
    "guidance",
    "clip_skip",
    "width",
    "height",
    "lora",
    "lora_sha256",
    "lora_scale",
    "base_model",
    "created",
)

_DELIMITERS = (",", ";", "\t", "|")
_OTHER_SEPARATORS = (":", " ", "/", "#")  # not accepted, but recognised to explain an error


def read_csv_table(path: str | Path) -> tuple[pd.DataFrame, str]:
    """Read a real-world CSV into strings, tolerating its usual quirks.

    Handles a UTF-8 byte-order mark, Windows line ends, ``,``/``;``/tab delimiters (detected from
    the header), header names with surrounding spaces, and unnamed index columns left by pandas.

    Args:
        path: The CSV file.

    Returns:
        The table (every cell a stripped string, empty for missing) and the delimiter used.

    Raises:
        DataError: If the file is missing, empty or not parseable, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = text.splitlines()
    header = next((line for line in lines if line.strip()), "")
    if not header:
        raise DataError(f"CSV file {path} is empty")
    delimiter = max(_DELIMITERS, key=header.count)
    if header.count(delimiter) == 0:
        delimiter = ","
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            skipinitialspace=True,
            skip_blank_lines=True,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as err:
        raise DataError(f"cannot parse CSV file {path} (delimiter {delimiter!r}): {err}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    drop = [c for c in frame.columns if c == "" or c.startswith("Unnamed:")]
    frame = frame.drop(columns=drop)
    frame = frame.apply(lambda col: col.str.strip())
    return frame, delimiter


def require_columns(
    frame: pd.DataFrame, path: str | Path, needed: Sequence[str | tuple[str, ...]], delimiter: str
) -> dict[str, str]:
    """Check that a table has the needed columns (case-insensitive), naming the file if not.

    Args:
        frame: The table.
        path: Its file, for the message.
        needed: Column names; a tuple means "any one of these".
        delimiter: The delimiter the file was read with, for the message.

    Returns:
        Map from each needed name (the first of a tuple) to the actual column name.
    """
    lower = {c.lower(): c for c in frame.columns}
    found: dict[str, str] = {}
    missing: list[str] = []
    for want in needed:
        options = (want,) if isinstance(want, str) else want
        actual = next((lower[o.lower()] for o in options if o.lower() in lower), None)
        if actual is None:
            missing.append(" or ".join(repr(o) for o in options))
        else:
            found[options[0]] = actual
    if missing:
        hint = ""
        if len(frame.columns) == 1:
            other = [d for d in _DELIMITERS + _OTHER_SEPARATORS if d in frame.columns[0]]
            hint = (
                f" The header was read as one column {frame.columns[0]!r}"
                + (f"; it seems to use {other[0]!r} as delimiter" if other else "")
                + f". fulora reads CSVs delimited by {', '.join(repr(d) for d in _DELIMITERS[:3])}."
            )
        columns = ", ".join(repr(c) for c in frame.columns) or "none"
        raise DataError(
            f"{path} is missing column {', '.join(missing)}; found columns: "
            f"{columns} (delimiter {delimiter!r}).{hint}"
        )
    return found


class Manifest:
    """A table of images with their labels and provenance, one row per image.

    Args:
        frame: A table with at least ``path`` and ``label``; missing required columns are added
            empty. Paths must be absolute (readers resolve them).
        origin: Where the manifest comes from (a file), for messages.
        validate: Check labels and splits (readers already have).
    """

    def __init__(self, frame: pd.DataFrame, *, origin: str = "", validate: bool = True):
        frame = frame.copy()
        for column in COLUMNS:
            if column not in frame.columns:
                frame[column] = ""
        extras = [c for c in frame.columns if c not in COLUMNS]
        frame = frame[list(COLUMNS) + extras].reset_index(drop=True)
        for column in COLUMNS:
            frame[column] = frame[column].fillna("").astype(str)
        self.origin = origin
        if validate:
            frame["label"] = map_planes(frame["label"], file=origin)
            bad = ~frame["split"].isin(SPLITS)
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"unknown split {frame['split'].iloc[i]!r} in {origin or 'manifest'} "
                    f"row {i}; use one of train, val, test or leave it empty"
                )
            empty = frame["path"] == ""
            if empty.any():
                i = int(np.flatnonzero(empty.to_numpy())[0])
                raise DataError(f"empty path in {origin or 'manifest'} row {i}")
        self.frame = frame

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[dict], *, origin: str = "") -> Manifest:
        """Build a manifest from dicts with at least ``path`` and ``label``."""
        frame = pd.DataFrame(list(records))
        if frame.empty:
            frame = pd.DataFrame(columns=list(COLUMNS))
        return cls(frame, origin=origin)

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read a manifest CSV written by fulora (or by hand: ``path`` and ``label`` suffice).

        Relative paths are taken relative to the CSV's folder.

        Raises:
            DataError: If the file is missing, a required column is absent, or a label or split
                is unknown; the message names the file and line.
        """
        path = Path(path)
        frame, delimiter = read_csv_table(path)
        found = require_columns(frame, path, ["path", "label"], delimiter)
        frame = frame.rename(columns={v: k for k, v in found.items()})
        base = path.resolve().parent
        frame["path"] = [str(base / p) if p and not os.path.isabs(p) else p for p in frame["path"]]
        return cls(frame, origin=str(path))

    @classmethod
    def concat(cls, manifests: Sequence[Manifest]) -> Manifest:
        """Stack manifests (extra columns are united; missing cells are empty)."""
        if not manifests:
            return cls.from_records([])
        frame = pd.concat([m.frame for m in manifests], ignore_index=True)
        frame = frame.astype(object).where(frame.notna(), "")
        origin = " + ".join(dict.fromkeys(m.origin for m in manifests if m.origin))
        return cls(frame, origin=origin, validate=False)

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts("label").items())
        return f"Manifest({len(self)} images: {counts})"

    @property
    def paths(self) -> list[Path]:
        """Absolute image paths, as a new list on every call (take it once, outside a loop)."""
        return [Path(p) for p in self.frame["path"]]

    @property
    def labels(self) -> list[str]:
        """Canonical plane labels."""
        return list(self.frame["label"])

    @property
    def extra_columns(self) -> list[str]:
        """Columns beyond the required ones."""
        return [c for c in self.frame.columns if c not in COLUMNS]

    def counts(self, column: str = "label") -> dict[str, int]:
        """Number of rows per value of ``column``, in a stable order (planes in canonical order)."""
        values = self.frame[column].value_counts()
        if column == "label":
            order = [p for p in PLANES if p in values.index]
        else:
            order = sorted(values.index, key=str)
        return {str(k): int(values[k]) for k in order}

    def subset(self, mask: Sequence[bool] | np.ndarray | pd.Series) -> Manifest:
        """Rows where ``mask`` is true."""
        mask = np.asarray(mask, dtype=bool)
        return Manifest(self.frame[mask], origin=self.origin, validate=False)

    def select(
        self,
        *,
        labels: Iterable[str] | None = None,
        split: str | Iterable[str] | None = None,
        source: str | Iterable[str] | None = None,
        domain: str | Iterable[str] | None = None,
    ) -> Manifest:
        """Rows matching every given criterion (a value or a list of values each)."""
        mask = np.ones(len(self), dtype=bool)
        for column, wanted in (
            ("label", labels),
            ("split", split),
            ("source", source),
            ("domain", domain),
        ):
            if wanted is None:
                continue
            values = [wanted] if isinstance(wanted, str) else list(wanted)
            mask &= self.frame[column].isin(values).to_numpy()
        return self.subset(mask)

    def missing_files(self) -> list[tuple[int, str]]:
        """(row, path) of every image that does not exist."""
        return [(i, p) for i, p in enumerate(self.frame["path"]) if not os.path.isfile(p)]

    def fingerprint(self, *, columns: Sequence[str] | None = None, content: bool = True) -> str:
        """SHA-256 of the rows' values and of each image's bytes: what a stage read.

        It changes when any value of ``columns`` changes (default: every column; a patient id,
        a split, a label) or an image is replaced in place; row order does not matter. Content
        hashes are remembered by (path, mtime, size) across runs (:mod:`fulora.data.hashes`),
        so an unchanged dataset is not read again. ``content=False`` leaves the bytes out.
        """
        frame = self.frame.astype(str)
        columns = sorted(c for c in (columns or frame.columns) if c in frame.columns)
        rows = ["\t".join(values) for values in frame[columns].itertuples(index=False)]
        if content:
            hashes = content_hashes(self.frame["path"])
            rows = [f"{row}\t{h}" for row, h in zip(rows, hashes, strict=True)]
        digest = hashlib.sha256("\t".join(columns).encode())
        for row in sorted(rows):
            digest.update(f"{row}\n".encode())
        return digest.hexdigest()

    def lists_the_images_of(self, other: Manifest) -> bool:
        """Whether both list the same images under the same labels, in any order."""
        columns = ["path", "label"]
        return self.fingerprint(columns=columns, content=False) == other.fingerprint(
            columns=columns, content=False
        )

    def drop_duplicate_paths(self, what: str = "training") -> Manifest:
        """The manifest with each image once; warns naming the rows that repeated one.

        Raises:
            DataError: If one image appears with two different labels.
        """
        repeated = self.frame["path"].duplicated(keep="first")
        if not repeated.any():
            return self
        labels = self.frame.groupby("path")["label"].nunique()
        conflicting = labels[labels > 1]
        if len(conflicting):
            path = conflicting.index[0]
            rows = list(np.flatnonzero((self.frame["path"] == path).to_numpy()))
            raise DataError(
                f"{path} appears in rows {rows} of {self.origin or 'the data'} with different "
                "labels; keep one row per image"
            )
        rows = list(np.flatnonzero(repeated.to_numpy()))
        logger.warning(
            "%s: %d duplicate row(s) of images already listed (rows %s%s) are used once for %s",
            self.origin or "the data",
            len(rows),
            ", ".join(map(str, rows[:10])),
            ", ..." if len(rows) > 10 else "",
            what,
        )
        return Manifest(self.frame[~repeated], origin=self.origin, validate=False)

    # -- transformations ----------------------------------------------------------------------
    def with_values(self, **columns: object) -> Manifest:
        """A copy with the given columns set to one value each (e.g. ``split="test"``)."""
        frame = self.frame.copy()
        for column, value in columns.items():
            frame[column] = value
        return Manifest(frame, origin=self.origin)

    def split_by_patient(
        self, val_fraction: float = 0.2, seed: int = 0, *, val_name: str = "val"
    ) -> Manifest:
        """Assign ``split`` train/val so that no patient is in both, stratified by plane.

        Rows without a patient id count as one patient each (synthetic images).

        Args:
            val_fraction: Share of images for validation (approximate: whole patients move).
            seed: Random seed.
            val_name: The split name of the held-out part (``val`` or ``test``).

        Returns:
            A copy with the ``split`` column set.
        """
        from sklearn.model_selection import StratifiedGroupKFold

        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        groups = np.array(
            [p if p else f"__row{i}" for i, p in enumerate(self.frame["patient"])], dtype=object
        )
        n_splits = max(2, round(1 / val_fraction))
        n_groups = len(set(groups))
        if n_groups < n_splits:
            raise DataError(
                f"cannot hold out {val_fraction:.0%} by patient: only {n_groups} patient(s) in "
                f"{self.origin or 'the manifest'}"
            )
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val_idx = next(splitter.split(np.zeros(len(self)), self.frame["label"], groups))
        split = np.full(len(self), "train", dtype=object)
        split[val_idx] = val_name
        frame = self.frame.copy()
        frame["split"] = split
        return Manifest(frame, origin=self.origin, validate=False)

    def balanced(
        self,
        per_class: int,
        seed: int = 0,
        *,
        labels: Iterable[str] | None = None,
        allow_fewer: bool = False,
    ) -> Manifest:
        """Class-balanced random subsample: ``per_class`` images of each plane.

        The paper's "1150 balanced" set is ``balanced(230, labels=PAPER_PLANES)``.

        Args:
            per_class: Images per plane.
            seed: Random seed.
            labels: Planes to keep (default: every plane present).
            allow_fewer: Keep all images of a plane that has fewer, instead of failing.

        Raises:
            DataError: If a plane has fewer images than ``per_class`` (and not ``allow_fewer``).
        """
        wanted = list(labels) if labels is not None else list(self.counts("label"))
        parts = []
        for label in wanted:
            rows = self.frame[self.frame["label"] == label]
            if len(rows) < per_class and not allow_fewer:
                raise DataError(
                    f"plane {label!r} has {len(rows)} image(s) in {self.origin or 'the manifest'}, "
                    f"fewer than the {per_class} asked for; lower the number or allow fewer"
                )
            parts.append(rows.sample(n=min(per_class, len(rows)), random_state=seed))
        frame = pd.concat(parts) if parts else self.frame.iloc[:0]
        return Manifest(frame, origin=self.origin, validate=False)

    # -- output -------------------------------------------------------------------------------
    def to_frame(self, relative_to: str | Path | None = None) -> pd.DataFrame:
        """The table as written to disk: paths inside ``relative_to`` become relative."""
        frame = self.frame.copy()
        if relative_to is not None:
            base = Path(relative_to).resolve()
            frame["path"] = [_relative_if_inside(p, base) for p in frame["path"]]
        return frame

    def write(self, path: str | Path) -> Path:
        """Write the manifest CSV atomically; images inside its folder get relative paths."""
        path = Path(path)
        frame = self.to_frame(relative_to=path.parent)
        with atomic_open(path, "w", newline="") as handle:
            frame.to_csv(handle, index=False)
        return path


def _relative_if_inside(path: str, base: Path) -> str:
    resolved = Path(path)
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return path


def images_seen(images: Manifest, seen: Iterable[str]) -> tuple[str, list[tuple[int, str]]]:
    """The rows of ``images`` that are ``seen`` images: at their path, else copied elsewhere.

    The content check finds an image copied under another name (a re-exported dataset, a set
    assembled by hand); hashes come from the shared content-hash index, so images hashed once
    are not read again. A copy re-encoded or resized is not the same bytes.

    Returns:
        ``("path", [(row, path), ...])`` for rows whose path is seen; otherwise
        ``("content", [(row, the seen image with those bytes), ...])``; ``("", [])`` if none.
    """
    seen = list(dict.fromkeys(seen))
    paths = list(images.frame["path"])
    known = set(seen)
    at_path = [(row, path) for row, path in enumerate(paths) if path in known]
    if at_path:
        return "path", at_path
    originals = {h: p for p, h in zip(seen, content_hashes(seen), strict=True) if h != MISSING}
    copies = [(row, originals[h]) for row, h in enumerate(content_hashes(paths)) if h in originals]
    return ("content", copies) if copies else ("", [])


def describe_seen(
    images: Manifest, found: tuple[str, list[tuple[int, str]]], noun: str, what: str
) -> str:
    """The message for what :func:`images_seen` found: N of the M <noun> ... (first: ...)."""
    how, rows = found
    row, seen = rows[0]
    where = f"{len(rows)} of the {len(images)} {noun} in {images.origin or 'the given set'}"
    if how == "path":
        return f"{where} are in {what} (first: row {row}, {seen})"
    copy = images.frame["path"].iloc[row]
    return (
        f"{where} are byte-for-byte copies of images in {what} (first: row {row}, {copy}, "
        f"the same bytes as {seen})"
    )


#: The column of a run's ``train_manifest.csv`` with each image's content hash when the run
#: began: a rerun or a resume compares it, so an image replaced in place is noticed.
CONTENT_COLUMN = "content_hash"


def with_content_hashes(images: Manifest) -> Manifest:
    """``images`` with each file's content hash in :data:`CONTENT_COLUMN`, as a run records it.

    The hashes come from the shared content-hash index, so a dataset hashed once (by an
    experiment's fingerprints or an earlier run) is not read again.
    """
    return images.with_values(**{CONTENT_COLUMN: content_hashes(images.frame["path"])})


def check_trained_on(folder: Path, images: Manifest) -> None:
    """The training run in ``folder``, if any, trained (or began to train) on ``images``.

    A finished run once answered for any images given with the same settings, and an
    interrupted one resumed on other images; one on images replaced in place (same names,
    other bytes) did so too, until the run recorded each image's content hash.

    Raises:
        ConfigError: Its ``train_manifest.csv`` lists other images (paths or labels), or an
            image whose bytes changed since.
    """
    saved = Path(folder) / TRAIN_MANIFEST_NAME
    if not saved.is_file():
        return
    before = Manifest.read(saved)
    advice = "use a new --out folder or delete that one"
    if not before.lists_the_images_of(images):
        raise ConfigError(
            f"{folder} holds a run trained on other images than these ({saved} lists them); "
            f"{advice}"
        )
    if CONTENT_COLUMN not in before.frame:  # written before runs recorded hashes
        return
    paths, recorded = before.frame["path"], before.frame[CONTENT_COLUMN]
    hashes = zip(paths, recorded, content_hashes(paths), strict=True)
    changed = [(path, now) for path, then, now in hashes if then != now]
    if changed:
        (path, now), more = changed[0], len(changed) - 1
        what = "is gone" if now == MISSING else "changed"
        raise ConfigError(
            f"{folder} holds a run trained on these images as they were: {path} {what} since"
            f"{f' (and {more} more)' if more else ''} ({saved} records the content hash of "
            f"each); {advice}"
        )
