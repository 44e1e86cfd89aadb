"""Loading the base latent diffusion model: a hub id, a diffusers folder or a single file.

Without network access or weights, loading stops at once with a message naming what to pass;
it never waits on a download that cannot happen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from fulora.errors import ConfigError
from fulora.io import file_hash
from fulora.lora.clip_layout import check_readable_layout
from fulora.lora.config import DEFAULT_BASE
from fulora.shipped import SHIPPED_MODELS, shipped_model

logger = logging.getLogger("fulora")

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("FULORA_OFFLINE"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(base: str) -> bool:
    return (
        base.startswith((".", "/", "~"))
        or base.endswith(_SINGLE_FILE_SUFFIXES)
        or (os.sep in base and base.count("/") != 1)
    )


@contextlib.contextmanager
def _torch_dtype_taken():
    """Pass diffusers the ``torch_dtype`` that 0.39 and 0.42 both read, without 0.42's warning.

    diffusers 0.42 deprecates it for ``dtype``, which 0.39's ``from_pretrained`` does not take.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
        yield


@_torch_dtype_taken()
def load_pipeline(
    base: str | Path = DEFAULT_BASE,
    *,
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
):
    """Load a StableDiffusionPipeline (no safety checker) from a hub id, folder or file.

    Args:
        base: Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local diffusers folder,
            or a single ``.safetensors``/``.ckpt`` checkpoint (such as ``v1-5-pruned.safetensors``).
        dtype: Weight dtype.
        config: For a single file offline: a diffusers folder (or hub id in the local cache)
            whose configs describe the architecture.

    Raises:
        ConfigError: If the model cannot be had; the message says which path or id to pass.
    """
    from diffusers import StableDiffusionPipeline

    kwargs = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    text = resolve_base(base)
    path = Path(text).expanduser()
    kind = _local_kind(text)
    if kind == "dir":
        check_readable_layout(path)
        return StableDiffusionPipeline.from_pretrained(path, **kwargs)
    if kind == "file":
        try:
            return StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config) if config else None,
                local_files_only=not _hub_reachable(),
                **kwargs,
            )
        except Exception as err:
            hint = (
                f"Is it a checkpoint of the architecture whose configs --base-config {config} "
                "holds? Pass the diffusers folder of its architecture"
                if config
                else "Offline, a single file needs its architecture's configs: pass "
                "--base-config PATH (a diffusers SD1.5 folder; only its config files are read)"
            )
            message = f"cannot load the single-file checkpoint {path}: {err}. {hint}"
            raise ConfigError(message) from None
    try:
        return StableDiffusionPipeline.from_pretrained(text, local_files_only=True, **kwargs)
    except Exception:
        pass  # not in the local Hugging Face cache
    if not _hub_reachable():
        raise ConfigError(
            f"cannot load base model {text!r}: it is not in the local Hugging Face cache and "
            "huggingface.co cannot be reached. Pass --base PATH to a local diffusers folder or "
            "a single .safetensors/.ckpt checkpoint (e.g. v1-5-pruned.safetensors); for tests "
            "and demos, `fulora lora tiny-model DIR` writes a tiny random model"
        )
    logger.info("downloading %s from the Hugging Face hub", text)
    return StableDiffusionPipeline.from_pretrained(text, **kwargs)


def resolve_base(base: str | Path) -> str:
    """The path of a model fulora ships (``fulora:phantom-sd``), else ``base`` unchanged.

    Raises:
        ConfigError: For an unknown ``fulora:`` name, or a shipped model missing from this
            installation.
    """
    text = str(base)
    if not text.startswith("fulora:"):
        return text
    folder = shipped_model(text)
    if folder is None:
        raise ConfigError(f"unknown model {text!r}; fulora ships {', '.join(SHIPPED_MODELS)}")
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"{text} is missing from this installation ({folder}); reinstall fulora, or "
            "rebuild it: fulora foundation build --config configs/foundation.yaml --out DIR"
        )
    return str(folder)


def _local_kind(text: str) -> str | None:
    """Say whether a base model is a local "dir", a local "file" or (None) a hub id.

    Raises:
        ConfigError: If the text names a local path that does not exist or cannot be a model.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"{path} is not a diffusers model folder (no model_index.json); pass a folder "
                "saved with save_pretrained, a .safetensors/.ckpt file or a hub id"
            )
        return "dir"
    if path.is_file():
        if path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise ConfigError(f"base model file {path} must be .safetensors or .ckpt")
        return "file"
    if _looks_like_path(text):
        raise ConfigError(f"base model path {path} does not exist")
    return None


def check_base(base: str | Path, config: str | Path | None = None) -> None:
    """Check, without loading it, that a base model can be had (for checks before long runs).

    Raises:
        ConfigError: With the same advice as :func:`load_pipeline` when it cannot.
    """
    text = resolve_base(base)
    if _local_kind(text) is not None:
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(text, "model_index.json"), str):
            return
    except Exception:  # not a valid repo id for the cache
        pass
    if not _hub_reachable():
        raise ConfigError(
            f"cannot load base model {text!r}: it is not in the local Hugging Face cache and "
            "huggingface.co cannot be reached. Pass a local diffusers folder or a single "
            ".safetensors/.ckpt checkpoint (e.g. v1-5-pruned.safetensors) as the base model"
        )


def native_size(base: str | Path) -> tuple[int, int] | None:
    """(width, height) a local diffusers model generates by default, or None if unknown.

    diffusers' default: the UNet's ``sample_size`` (an int, or (height, width)) times the VAE's
    downsampling factor. Only local folders are read (no download to learn a size).
    """
    folder = Path(resolve_base(base)).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    size = unet.get("sample_size")
    if isinstance(size, int):
        return size * factor, size * factor
    if isinstance(size, list | tuple) and len(size) == 2:
        return int(size[1]) * factor, int(size[0]) * factor
    return None


def far_from_native(base: str | Path, width: int, height: int, what: str) -> str | None:
    """A warning where a size is far from the one ``base`` generates by default; else None.

    Far: over 4 times, or under a quarter of, the pixels of :func:`native_size`. A model's
    images far from the size it was trained at are not what it learnt, and nothing else says
    so: ``fulora:phantom-sd`` was trained at 64x48 px, and the paper recipe's buckets (576x384
    for most of its images) hold 72 times its pixels.
    """
    native = native_size(base)
    if native is None:
        return None
    ratio = width * height / (native[0] * native[1])
    if 1 / 4 <= ratio <= 4:
        return None
    return (
        f"{what} {width}x{height} px holds {ratio:.3g} times the pixels of {native[0]}x"
        f"{native[1]}, the size {base} was trained at: its images there are not what it "
        "learnt. Give a size near its own (width, height; a LoRA's resolution)"
    )


def base_identity(base: str | Path) -> tuple[str, str]:
    """(name, sha256) of a base model: the file's hash, or the UNet weights' hash of a folder."""
    text = resolve_base(base)
    path = Path(text).expanduser()
    candidates: list[Path] = []
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors")) or sorted(
            (path / "unet").glob("diffusion_pytorch_model*.bin")
        )
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(text, "unet/diffusion_pytorch_model.safetensors")
            if isinstance(found, str):
                candidates = [Path(found)]
        except Exception:  # an id the cache does not know
            candidates = []
    digest = _file_sha256(candidates[0]) if candidates else ""
    return (path.name if path.exists() else text), digest


def _file_sha256(path: Path) -> str:
    """A file's sha256, computed once per process for the same size and modification time."""
    stat = path.stat()
    return _hashed(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _hashed(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: the cache's key
    return file_hash(path)


def check_model_hash(base: str | Path, wanted: str) -> None:
    """The base must be the checkpoint an A1111 image names by its ``Model hash``.

    A1111 names a checkpoint file by the first 10 hex digits of its sha256, or (before late
    2022) by 8 of a sha256 of the 64 KiB at 1 MiB into the file. A diffusers folder or hub
    id has no such hash: it is not checked, and the log says so.

    Raises:
        ConfigError: The base file has another hash.
    """
    path = Path(resolve_base(base)).expanduser()
    if not path.is_file():
        logger.warning(
            "the image names the model hash %s; the base %s is not a checkpoint file, whose "
            "hash A1111 lists, so it is not checked",
            wanted,
            base,
        )
        return
    wanted = wanted.lower()
    if len(wanted) == 8:  # A1111's old hash
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            found = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
    else:
        found = _file_sha256(path)[: len(wanted)]
    if found != wanted:
        raise ConfigError(
            f"the base model {path} has the A1111 hash {found}, and model_hash asks for "
            f"{wanted} (the image's 'Model hash'): give the checkpoint the image was made with "
            "(--base), or leave model_hash out"
        )
