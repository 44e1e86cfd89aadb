"""A preprocessing cache: decode and resize each image once, reuse it every epoch.

Entries are keyed by a hash of the file's content and of the preprocessing (size, colour mode,
resize method), so an edited image or a new size is never served stale, and two copies of one
file share an entry. Each entry is a ``.npy`` of uint8 written atomically, so several data-loader
workers or processes may fill one cache concurrently.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from fulora.data.images import ColorMode, Resize, load_image, resize_image, to_array
from fulora.io import atomic_path

_VERSION = "1"  # bump when the preprocessing changes


def default_cache_dir() -> Path:
    """``$FULORA_CACHE`` or ``~/.cache/fulora``."""
    return Path(os.environ.get("FULORA_CACHE", Path.home() / ".cache" / "fulora"))


def content_hash(path: str | Path) -> str:
    """BLAKE2b digest of a file's bytes (fast; collisions are not a concern here)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def preprocess(
    path: str | Path,
    size: tuple[int, int] | None,
    mode: ColorMode = "L",
    resize: Resize = "stretch",
    *,
    row: int | None = None,
) -> np.ndarray:
    """Decode ``path`` and resize it to ``size`` = (H, W) (None keeps the size); uint8 array."""
    img = load_image(path, mode, row=row)
    if size is not None and (img.height, img.width) != tuple(size):
        img = resize_image(img, size, resize)
    return to_array(img)


class PreprocessCache:
    """Disk cache of preprocessed images.

    Args:
        root: Cache folder (default :func:`default_cache_dir` / ``preprocessed``).
        size: Target (height, width); None keeps the original size.
        mode: ``L`` or ``RGB``.
        resize: Resize method (see :func:`fulora.data.images.resize_image`).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        size: tuple[int, int] | None = (224, 224),
        mode: ColorMode = "L",
        resize: Resize = "stretch",
    ):
        self.root = Path(root) if root is not None else default_cache_dir() / "preprocessed"
        self.size = tuple(size) if size is not None else None
        self.mode = mode
        self.resize = resize
        self.hits = 0
        self.misses = 0
        # Content hashes of files seen in this process, reused while (mtime, size) is unchanged.
        self._hashes: dict[str, tuple[tuple[int, int], str]] = {}
        self._suffix = f"{_VERSION}-{mode}-{resize}-{'x'.join(map(str, self.size or ('orig',)))}"

    def key(self, path: str | Path) -> str:
        """Cache key of an image file: its content hash and the preprocessing."""
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        known = self._hashes.get(str(path))
        if known is None or known[0] != stamp:
            known = (stamp, content_hash(path))
            self._hashes[str(path)] = known
        return f"{known[1]}-{self._suffix}"

    def entry(self, path: str | Path) -> Path:
        """File that holds (or will hold) the preprocessed ``path``."""
        key = self.key(path)
        return self.root / key[:2] / f"{key}.npy"

    def get(self, path: str | Path, *, row: int | None = None) -> np.ndarray:
        """The preprocessed image, from the cache or computed and stored.

        Raises:
            ImageLoadError: If the image is missing or cannot be decoded.
        """
        if not os.path.isfile(path):
            # Let load_image name the missing file rather than failing inside the hash.
            return preprocess(path, self.size, self.mode, self.resize, row=row)
        entry = self.entry(path)
        if entry.is_file():
            try:
                array = np.load(entry, allow_pickle=False)
                self.hits += 1
                return array
            except (OSError, ValueError):
                entry.unlink(missing_ok=True)  # a damaged entry is recomputed
        array = preprocess(path, self.size, self.mode, self.resize, row=row)
        with atomic_path(entry) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        self.misses += 1
        return array
