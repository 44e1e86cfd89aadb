"""fulora: FU-LoRA, LoRA-generated synthetic data for fetal ultrasound plane classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fulora")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from fulora.errors import ConfigError, DataError, FuloraError, ImageLoadError, LabelError

__all__ = [
    "ConfigError",
    "DataError",
    "FuloraError",
    "ImageLoadError",
    "LabelError",
    "__version__",
]
