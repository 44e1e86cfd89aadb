"""Error types whose messages are written for the user: what went wrong, where, and what to do."""


class FuloraError(Exception):
    """Base class of every error fulora reports to the user without a traceback."""


class ConfigError(FuloraError):
    """A configuration file, key or value is wrong."""


class DataError(FuloraError):
    """Input data (a CSV, a folder, a manifest) is missing or malformed."""


class LabelError(DataError):
    """A label cannot be mapped to a canonical plane."""


class ImageLoadError(DataError):
    """An image file is missing, truncated or not an image."""

    def __init__(self, path, reason: str, row: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.row = row
        where = f" (manifest row {row})" if row is not None else ""
        super().__init__(
            f"cannot read image {self.path}{where}: {reason}. Replace the file or remove its "
            "row; `fulora data inspect FOLDER_OR_CSV` lists every unreadable image at once."
        )


class DownloadError(FuloraError):
    """A download failed or its checksum did not match."""


class FolderInUseError(FuloraError):
    """Another fulora process is writing the same run or experiment folder."""


class NonFiniteError(FuloraError):
    """Weights that are no longer finite (NaN or inf): a training that diverged."""


class WriteError(FuloraError):
    """A file could not be written: full disk, read-only file system, no permission."""
