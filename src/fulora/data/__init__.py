"""The data layer: manifests, readers of real layouts, images, datasets, cache, phantom.

Names are imported lazily so that ``fulora data inspect`` does not pay for importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "COLUMNS": "manifest",
    "SYNTHETIC_COLUMNS": "manifest",
    "Manifest": "manifest",
    "ManifestDataset": "dataset",
    "PreprocessCache": "cache",
    "load_image": "images",
    "detect_layout": "readers",
    "read_african": "readers",
    "read_any": "readers",
    "read_fetal_planes_db": "readers",
    "read_image_table": "readers",
    "read_plane_folders": "readers",
    "read_synthetic_a1111": "readers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"fulora.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fulora.data' has no attribute {name!r}")
