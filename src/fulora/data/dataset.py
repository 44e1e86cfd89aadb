"""A torch Dataset over a manifest."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fulora.data.cache import PreprocessCache, preprocess
from fulora.data.images import ColorMode, Resize
from fulora.data.manifest import Manifest
from fulora.errors import DataError, ImageLoadError

logger = logging.getLogger("fulora")


class ManifestDataset(Dataset):
    """Images of a manifest as tensors, with class indices.

    Items are ``(image, target)``: ``image`` a float tensor (C, H, W) in [0, 1] (C = 1 for
    ``L``, 3 for ``RGB``; with ``channels=3`` grayscale is repeated for ImageNet backbones),
    ``target`` the index of the row's label in ``classes``.

    Args:
        manifest: The images.
        classes: Class names in output order (default: the manifest's planes).
        size: (height, width) to resize to; None keeps each image's size.
        mode: ``L`` or ``RGB`` decoding.
        channels: Output channels (1 or 3); default 1 for ``L`` and 3 for ``RGB``.
        resize: Resize method.
        cache: A :class:`PreprocessCache` (its size/mode/resize win), or None to decode every time.
        transform: Applied to the float tensor (e.g. torchvision v2 augmentations).
        on_error: ``raise`` (default: a bad image raises, naming it) or ``skip`` (every image is
            checked once up front; bad ones are dropped and listed in :attr:`skipped`).
        in_memory: Keep decoded arrays in memory after first use.
        workers: Threads for the up-front check.
    """

    def __init__(
        self,
        manifest: Manifest,
        classes: Sequence[str] | None = None,
        *,
        size: tuple[int, int] | None = (224, 224),
        mode: ColorMode = "L",
        channels: int | None = None,
        resize: Resize = "stretch",
        cache: PreprocessCache | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        in_memory: bool = False,
        workers: int = 4,
    ):
        if len(manifest) == 0:
            raise DataError(f"no images in {manifest.origin or 'the manifest'}: nothing to load")
        self.manifest = manifest
        self.classes = list(classes) if classes is not None else list(manifest.counts("label"))
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [(i, lab) for i, lab in enumerate(manifest.labels) if lab not in index]
        if unknown:
            row, label = unknown[0]
            raise DataError(
                f"label {label!r} of {manifest.origin or 'manifest'} row {row} "
                f"({manifest.paths[row]}) is not one of the classes {self.classes}"
            )
        if cache is not None:
            size, mode, resize = cache.size, cache.mode, cache.resize
        self.size, self.mode, self.resize, self.cache = size, mode, resize, cache
        self.channels = channels or (1 if mode == "L" else 3)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        self.transform = transform
        self.in_memory = in_memory
        self._memory: dict[int, np.ndarray] = {}
        # once: Manifest.paths builds a list of every path on each call
        self._paths = manifest.paths
        self._row_targets = [index[lab] for lab in manifest.labels]
        self.rows = list(range(len(manifest)))
        self.skipped: list[tuple[str, str]] = []
        if on_error == "skip":
            self._check_all(workers)
        elif on_error != "raise":
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")

    def _array(self, row: int) -> np.ndarray:
        if row in self._memory:
            return self._memory[row]
        path = self._paths[row]
        if self.cache is not None:
            array = self.cache.get(path, row=row)
        else:
            array = preprocess(path, self.size, self.mode, self.resize, row=row)
        if self.in_memory:
            self._memory[row] = array
        return array

    def _check_all(self, workers: int) -> None:
        """Decode every image once (filling the cache); drop and record the bad ones."""

        def check(row: int) -> str | None:
            try:
                self._array(row)
            except ImageLoadError as err:
                return err.reason
            return None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(
                tqdm(
                    pool.map(check, self.rows),
                    total=len(self.rows),
                    desc="checking images",
                    unit="img",
                    leave=False,
                    disable=len(self.rows) < 50,
                )
            )
        keep = [r for r, err in zip(self.rows, results, strict=True) if err is None]
        self.skipped = [
            (str(self._paths[r]), err)
            for r, err in zip(self.rows, results, strict=True)
            if err is not None
        ]
        if self.skipped:
            logger.warning(
                "skipped %d unreadable image(s) of %d, e.g. %s: %s",
                len(self.skipped),
                len(self.rows),
                *self.skipped[0],
            )
        if not keep:
            raise DataError(
                f"none of the {len(self.rows)} images of {self.manifest.origin} could be read"
            )
        self.rows = keep

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def targets(self) -> list[int]:
        """Class index of every item, in item order (for samplers and class weights)."""
        return [self._row_targets[r] for r in self.rows]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.rows[i]
        array = self._array(row)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        if self.channels == 3 and tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        elif self.channels == 1 and tensor.shape[0] == 3:
            tensor = tensor.float().mean(0, keepdim=True).round().to(torch.uint8)
        image = tensor.float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self._row_targets[row]

    def uint8_tensor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one uint8 tensor (N, C, H, W), and their targets (N,).

        Needs a fixed ``size``. Meant for keeping a whole training set on the GPU (1,000
        images at 224 px grayscale are 50 MB) and augmenting it there; ``transform`` is not
        applied.
        """
        if self.size is None:
            raise ValueError("uint8_tensor needs a fixed size")
        arrays = [self._array(r) for r in self.rows]
        stacked = torch.from_numpy(np.stack(arrays))
        stacked = stacked.unsqueeze(1) if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)
        return stacked.contiguous(), torch.tensor(self.targets, dtype=torch.long)

    def preload(self, workers: int = 4) -> None:
        """Decode every image now (filling the cache) with a progress bar."""
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in tqdm(
                pool.map(self._array, self.rows),
                total=len(self.rows),
                desc="preprocessing",
                unit="img",
                leave=False,
            ):
                pass
