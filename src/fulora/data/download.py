"""``fulora data download``: fetch a public dataset or model files, resumably and checked.

Downloads resume from a ``.part`` file with an HTTP Range request, are retried with back-off,
and are checked against the checksum the host publishes (Zenodo's MD5, the Hugging Face Hub's
SHA-256 of each LFS file) or one the user pins (``--sha256``). Archives are unpacked (safely:
no path escapes the destination) and a ``manifest.csv`` is written from whatever known layouts
the data holds. Model files (the paper's released LoRAs) are kept as they are.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from fulora.data.manifest import MANIFEST_NAME, Manifest
from fulora.data.readers import detect_layout, read_any
from fulora.errors import ConfigError, DataError, DownloadError
from fulora.io import file_hash, write_json
from fulora.runs import now_iso

logger = logging.getLogger("fulora")

ZENODO_API = "https://zenodo.org/api"
HF_ENDPOINT = "https://huggingface.co"
_USER_AGENT = "fulora (+https://github.com/13204942/FU-LoRA)"
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)


@dataclass(frozen=True)
class DatasetSource:
    """Where a public dataset lives and how to cite it."""

    name: str
    description: str
    zenodo_record: str | None = None
    url: str | None = None
    archive_subdir: str | None = None  # only this folder of the archive is kept
    hf_repo: str | None = None  # a Hugging Face Hub model repository ...
    hf_files: tuple[str, ...] = ()  # ... and the files of it to fetch (model files: no manifest)
    page: str = ""
    citation: str = ""


DATASETS: dict[str, DatasetSource] = {
    "fetal-planes-db": DatasetSource(
        name="fetal-planes-db",
        description="FETAL_PLANES_DB: 12,400 images of 1,792 patients, two Spanish hospitals",
        zenodo_record="3904280",
        page="https://zenodo.org/records/3904280",
        citation="Burgos-Artizzu et al., Sci Rep 10, 10200 (2020). CC BY 4.0.",
    ),
    "african-planes": DatasetSource(
        name="african-planes",
        description="African fetal planes: Algeria, Egypt, Ghana, Malawi, Uganda",
        zenodo_record="7540448",
        page="https://zenodo.org/records/7540448",
        citation="Sendra-Balcells et al., Sci Rep 13, 2728 (2023). CC BY 4.0.",
    ),
    "fu-lora-synthetic": DatasetSource(
        name="fu-lora-synthetic",
        description="The paper's released synthetic set (synthetic_train_5000: 1000 images per "
        "plane, AUTOMATIC1111 names, labels in synthetic_train_5000.csv)",
        zenodo_record="13228158",
        page="https://zenodo.org/records/13228158",
        citation="Wang et al., MICCAI 2024 PIPPI workshop, arXiv 2407.20072.",
    ),
    "fu-lora-loras": DatasetSource(
        name="fu-lora-loras",
        description="The paper's three released LoRAs for SD1.5: v1.0 rank 128, v2.0 rank 32, "
        "v3.0 rank 8 (kohya-ss .safetensors)",
        hf_repo="fangyijie/fu-lora",
        hf_files=(
            "fetal_ultrasound_v1.0.safetensors",
            "fetal_ultrasound_v2.0.safetensors",
            "fetal_ultrasound_v3.0.safetensors",
        ),
        page="https://huggingface.co/fangyijie/fu-lora",
        citation="Wang et al., MICCAI 2024 PIPPI workshop, arXiv 2407.20072.",
    ),
    "fu-lora-sample": DatasetSource(
        name="fu-lora-sample",
        description="The FU-LoRA repository's data folder (LoRA training images, African test set)",
        url="https://github.com/13204942/FU-LoRA/archive/refs/heads/main.zip",
        archive_subdir="FU-LoRA-main/data",
        page="https://github.com/13204942/FU-LoRA",
        citation="Wang et al., MICCAI 2024 PIPPI workshop, arXiv 2407.20072. MIT licence; "
        "images CC BY 4.0 from the two datasets above.",
    ),
}


@dataclass(frozen=True)
class RemoteFile:
    """One file to download."""

    name: str
    url: str
    size: int | None = None
    checksum: str | None = None  # "md5:<hex>" or "sha256:<hex>"


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


#: Seconds to wait for a connection or for the next bytes; then the attempt counts as failed.
TIMEOUT = 15.0
#: Seconds a download may go without receiving a byte, over all its attempts.
MAX_STALL = 60.0


def fetch(
    url: str,
    dest: str | Path,
    *,
    checksum: str | None = None,
    pinned: bool = False,
    size: int | None = None,
    retries: int = 3,
    timeout: float = TIMEOUT,
    max_stall: float = MAX_STALL,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` and verifying a checksum.

    Args:
        url: HTTP(S) URL.
        dest: Final file. Bytes arrive in ``dest`` + ``.part``, renamed once complete and verified.
        checksum: ``md5:<hex>`` or ``sha256:<hex>``, checked for form before any transfer; a
            file that does not match is removed, never kept.
        pinned: The checksum is the user's (``--sha256``), not the host's: a mismatch may be
            a wrong pin, and the message says so.
        size: Expected size in bytes, if known.
        retries: How many times a failed transfer is retried (resumed, if bytes arrived).
        timeout: Seconds to wait for a connection or for the next bytes.
        max_stall: Seconds without any byte, over all attempts, before giving up.
        progress: Show a progress bar.

    Returns:
        ``dest``.

    Raises:
        ConfigError: If ``checksum`` is malformed.
        DownloadError: Saying what happened (refused, timed out, host unknown, HTTP status,
            closed early) and whether a partial file is kept to resume from.
    """
    check_checksum(checksum)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and checksum is None:
        return dest
    if dest.is_file() and _matches(dest, checksum):
        return dest
    part = dest.with_name(dest.name + ".part")
    attempt, progress_at = 0, time.monotonic()
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            _transfer(url, part, have, size, timeout, progress)
            break
        except _NETWORK_ERRORS + (_ShortRead,) as err:
            attempt += 1
            got = part.stat().st_size if part.exists() else 0
            what = _describe(err, timeout)
            if isinstance(err, urllib.error.HTTPError) and err.code not in _RETRY_HTTP:
                raise DownloadError(f"{url} answered {what}") from None
            if got > have:
                progress_at = time.monotonic()
            if attempt > retries or time.monotonic() - progress_at > max_stall:
                kept = (
                    f"the partial file {part} ({got} bytes) is kept: run the same command "
                    "again to resume"
                    if got
                    else "nothing was downloaded"
                )
                raise DownloadError(
                    f"download of {url} failed after {attempt} attempt(s): {what}; {kept}"
                ) from None
            wait = min(30.0, 0.5 * 2**attempt)
            again = f"resuming at {got} bytes" if got else "retrying"
            logger.warning("download of %s: %s; %s in %.1fs", url, what, again, wait)
            time.sleep(wait)
    _verify(part, url, checksum, pinned)
    os.replace(part, dest)
    return dest


_RETRY_HTTP = (408, 429, 500, 502, 503, 504)


def _describe(err: BaseException, timeout: float) -> str:
    """What went wrong, in words: refused, timed out, unknown host, HTTP status, closed early."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (nothing answers on that host and port)"
    if isinstance(reason, socket.timeout | TimeoutError):
        return f"no answer within {timeout:g} s (timed out)"
    if isinstance(reason, socket.gaierror):
        return f"host name not found ({reason.strerror or reason})"
    return str(reason)


def check_checksum(checksum: str | None) -> None:
    """Reject a malformed ``algorithm:hex`` checksum before anything is downloaded.

    Raises:
        ConfigError: Naming the value and the form expected.
    """
    if checksum is None:
        return
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("md5", "sha1", "sha256", "sha512"):
        raise ConfigError(f"checksum {checksum!r}: use md5:<hex> or sha256:<hex>")
    length = hashlib.new(algorithm).digest_size * 2
    if len(digest) != length or any(c not in "0123456789abcdefABCDEF" for c in digest):
        raise ConfigError(
            f"checksum {checksum!r}: a {algorithm} digest is {length} hexadecimal digits; "
            f"got {len(digest)} characters"
        )


def _verify(part: Path, url: str, checksum: str | None, pinned: bool) -> None:
    """Remove ``part`` and raise when it does not match ``checksum`` (never keep a bad file)."""
    if checksum is None or _matches(part, checksum):
        return
    algorithm = checksum.split(":", 1)[0]
    actual = f"{algorithm}:{file_hash(part, algorithm)}"
    part.unlink()
    advice = (
        "If the host changed the file on purpose, pin the new value with --sha256; if not, "
        "the download is corrupt."
        if pinned
        else "The host's own checksum does not match: the transfer was corrupted, or the "
        "host's file changed; if a second try fails the same way, report it."
    )
    raise DownloadError(
        f"checksum mismatch for {url}: expected {checksum}, got {actual}. The file was removed "
        f"(a file that fails verification is never kept). {advice}"
    )


class _ShortRead(Exception):
    """The server closed the connection before sending everything."""


def _transfer(
    url: str, part: Path, have: int, size: int | None, timeout: float, progress: bool
) -> None:
    if size is not None and have == size:
        return
    try:
        response = _open(url, have, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: already complete
            return
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else size
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as handle,
            tqdm(
                total=expected,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            received = have
            while True:
                try:
                    block = response.read(1 << 20)
                except http.client.IncompleteRead as err:
                    handle.write(err.partial)
                    raise _ShortRead(
                        f"connection closed at {received + len(err.partial)} bytes"
                    ) from None
                if not block:
                    break
                handle.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received < expected:
        raise _ShortRead(f"connection closed at {received} of {expected} bytes")


def _matches(path: Path, checksum: str | None) -> bool:
    if checksum is None:
        return True
    algorithm, _, expected = checksum.partition(":")
    return file_hash(path, algorithm) == expected.lower()


def _get_json(url: str, timeout: float, by_hand: str):
    """A host's JSON answer (a file listing); offline, say how to do without it."""
    try:
        with _open(url, 0, timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except _NETWORK_ERRORS as err:
        raise DownloadError(
            f"cannot reach {url}: {_describe(err, timeout)}. Downloading needs network access; "
            f"without it, {by_hand}"
        ) from None
    except json.JSONDecodeError:
        raise DownloadError(f"{url} did not answer with JSON") from None


def zenodo_files(record: str, api: str = ZENODO_API, timeout: float = TIMEOUT) -> list[RemoteFile]:
    """The files of a Zenodo record, with their sizes, MD5 checksums and download links."""
    url = f"{api.rstrip('/')}/records/{record}"
    by_hand = (
        f"download the record by hand from https://zenodo.org/records/{record} and point "
        "fulora at the unpacked folder"
    )
    data = _get_json(url, timeout, by_hand)
    entries = data.get("files", [])
    if isinstance(entries, dict):  # newer API: {"entries": {name: {...}}}
        entries = list(entries.get("entries", {}).values())
    files = []
    for entry in entries:
        name = entry.get("key") or entry.get("filename")
        links = entry.get("links", {})
        link = links.get("content") or links.get("self") or links.get("download")
        if not name or not link:
            continue
        files.append(
            RemoteFile(name=name, url=link, size=entry.get("size"), checksum=entry.get("checksum"))
        )
    if not files:
        raise DownloadError(f"Zenodo record {record} at {url} lists no files")
    return files


def hub_files(
    repo: str, names: tuple[str, ...], endpoint: str = HF_ENDPOINT, timeout: float = TIMEOUT
) -> list[RemoteFile]:
    """Files of a Hugging Face Hub model repository (main branch), with size and SHA-256.

    The Hub's tree listing gives each LFS file's SHA-256 (``lfs.oid``), which the download is
    checked against; a file the listing lacks is an error naming what the repository holds.
    """
    base = endpoint.rstrip("/")
    url = f"{base}/api/models/{repo}/tree/main"
    by_hand = f"download the files by hand from {base}/{repo} and pass their paths"
    listing = _get_json(url, timeout, by_hand)
    entries = {e.get("path"): e for e in listing if isinstance(e, dict)}
    files = []
    for name in names:
        entry = entries.get(name)
        if entry is None:
            raise DownloadError(
                f"{base}/{repo} has no file {name!r}; it holds: {', '.join(sorted(entries))}"
            )
        lfs = entry.get("lfs") or {}
        files.append(
            RemoteFile(
                name=name,
                url=f"{base}/{repo}/resolve/main/{name}",
                size=lfs.get("size") or entry.get("size"),
                checksum=f"sha256:{lfs['oid']}" if lfs.get("oid") else None,
            )
        )
    return files


def _check_archive(path: Path, remote: RemoteFile, expect_zip: bool) -> None:
    """Remove and refuse a file that is not the kind expected (an HTML page for a zip)."""
    if not (expect_zip or remote.name.lower().endswith(".zip")) or zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        head = handle.read(64)
    path.unlink()
    looks = (
        "an HTML page (a login, error or redirect page?)"
        if head.lstrip().lower().startswith((b"<!doctype html", b"<html"))
        else f"{len(head)}+ bytes starting {head[:16]!r}"
    )
    raise DownloadError(
        f"{remote.url} sent {looks}, not a zip archive; the file was removed. Check the URL "
        "(--url) or download the archive by hand"
    )


def unpack(archive: Path, dest: Path, subdir: str | None = None) -> None:
    """Extract a zip into ``dest`` (only ``subdir`` of it if given), refusing paths that escape."""
    dest = dest.resolve()
    prefix = subdir.strip("/") + "/" if subdir else ""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(prefix)]
            if not members:
                raise DownloadError(f"{archive} has no folder {subdir!r}")
            for member in tqdm(members, desc=f"unpacking {archive.name}", unit="file", leave=False):
                relative = member.filename[len(prefix) :]
                if not relative:
                    continue
                target = (dest / relative).resolve()
                if dest not in target.parents and target != dest:
                    raise DownloadError(f"{archive}: member {member.filename!r} escapes the folder")
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                with zf.open(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, target)
    except zipfile.BadZipFile as err:
        raise DownloadError(
            f"{archive} is not a valid zip file ({err}); delete it and retry"
        ) from None


def build_manifest(root: Path) -> Manifest:
    """A manifest of every known layout found under ``root`` (CSV tables and plane folders)."""
    parts: list[Manifest] = []
    csvs = [p for p in sorted(root.rglob("*.csv")) if p != root / MANIFEST_NAME]
    folders = sorted(p for p in root.rglob("*") if p.is_dir())
    for candidate in csvs + folders:
        if any(part.startswith(".") for part in candidate.relative_to(root).parts):
            continue
        try:
            layout = detect_layout(candidate)
            if candidate.is_dir() and layout != "plane_folders":
                continue  # folders count only as plane folders; their CSVs are read above
            manifest = read_any(candidate, on_missing="skip")
        except DataError as err:
            if candidate.is_file():
                logger.info("skipping %s: %s", candidate, err)
            continue
        if len(manifest):
            logger.info("%s: %d images (%s)", candidate, len(manifest), layout)
            parts.append(manifest)
    if not parts:
        raise DataError(f"found no images in a layout fulora reads under {root}")
    combined = Manifest.concat(parts)
    keep = ~combined.frame["path"].duplicated()
    return combined.subset(keep.to_numpy())


def download_dataset(
    name: str,
    dest: str | Path,
    *,
    api: str | None = None,
    url: str | None = None,
    sha256: str | None = None,
    endpoint: str | None = None,
    retries: int = 3,
    progress: bool = True,
) -> Manifest | None:
    """Download and verify a public dataset (unpacked, with ``dest/manifest.csv``) or model files.

    Args:
        name: One of :data:`DATASETS`.
        dest: Destination folder.
        api: Zenodo API base URL (default ``https://zenodo.org/api``; env ``FULORA_ZENODO_API``).
        url: Override the download URL of a non-Zenodo dataset (a mirror).
        sha256: Pin the SHA-256 of a non-Zenodo download (GitHub publishes none).
        endpoint: Hugging Face Hub URL (default ``https://huggingface.co``; env ``HF_ENDPOINT``).
        retries: Resume attempts per file.
        progress: Show progress bars.

    Returns:
        The manifest written to ``dest/manifest.csv``; None for model files (kept in ``dest``).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    source = DATASETS[name]
    check_checksum(f"sha256:{sha256}" if sha256 else None)  # before any network traffic
    dest = Path(dest)
    files = _remote_files(source, api, url, sha256, endpoint)
    record: dict[str, object] = {
        "dataset": name,
        "source": source.page,
        "citation": source.citation,
        "files": [],
    }
    for remote in files:
        # model files are the result; archives and tables wait in .downloads to be unpacked
        folder = dest if source.hf_repo else dest / ".downloads"
        target = fetch(
            remote.url,
            folder / remote.name,
            checksum=remote.checksum,
            pinned=sha256 is not None,
            size=remote.size,
            retries=retries,
            progress=progress,
        )
        if not source.hf_repo:
            _check_archive(target, remote, expect_zip=source.archive_subdir is not None)
        entry = _file_record(target, remote)
        record["files"].append(entry)  # type: ignore[union-attr]
        if zipfile.is_zipfile(target) and not source.hf_repo:
            _unpack_once(target, str(entry["sha256"]), dest, source.archive_subdir)
    if source.hf_repo:
        write_json(dest / "download.json", {**record, "finished": now_iso()})
        logger.info("%s: %d files in %s", name, len(files), dest)
        return None
    manifest = build_manifest(dest)
    manifest.write(dest / MANIFEST_NAME)
    record.update(finished=now_iso(), images=len(manifest), labels=manifest.counts("label"))
    write_json(dest / "download.json", record)
    logger.info("%s: %d images, manifest at %s", name, len(manifest), dest / MANIFEST_NAME)
    return manifest


def _remote_files(
    source: DatasetSource,
    api: str | None,
    url: str | None,
    sha256: str | None,
    endpoint: str | None,
) -> list[RemoteFile]:
    """What to fetch for ``source``: a Zenodo record, Hub files or one URL."""
    if source.zenodo_record:
        return zenodo_files(
            source.zenodo_record, api or os.environ.get("FULORA_ZENODO_API", ZENODO_API)
        )
    if source.hf_repo:
        hub = endpoint or os.environ.get("HF_ENDPOINT", HF_ENDPOINT)
        return hub_files(source.hf_repo, source.hf_files, hub)
    link = url or source.url
    assert link is not None
    return [
        RemoteFile(
            name=Path(link).name or f"{source.name}.zip",
            url=link,
            checksum=f"sha256:{sha256}" if sha256 else None,
        )
    ]


def _file_record(target: Path, remote: RemoteFile) -> dict[str, object]:
    """What ``download.json`` says of one file; warns when nothing could check it."""
    digest = file_hash(target, "sha256")
    if remote.checksum is None:
        logger.warning(
            "%s has no published checksum; its SHA-256 is %s (pin it with --sha256 to check "
            "later downloads)",
            remote.name,
            digest,
        )
    return {
        "name": remote.name,
        "url": remote.url,
        "sha256": digest,
        "published_checksum": remote.checksum,
    }


def _unpack_once(archive: Path, digest: str, dest: Path, subdir: str | None) -> None:
    """Unpack ``archive`` (SHA-256 ``digest``) unless this very file was unpacked before.

    A marker beside the archive holds the digest of what was unpacked; the caller passes the
    digest it computed for ``download.json`` so a multi-GB archive is hashed once.
    """
    marker = archive.parent / f".{archive.name}.unpacked"
    if marker.is_file() and marker.read_text() == digest:
        return
    unpack(archive, dest, subdir)
    marker.write_text(digest)
