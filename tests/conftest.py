"""Shared fixtures: the real sample data from ../shared (skipped when absent) and image makers."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fulora.lora.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(
    os.environ.get("FULORA_SAMPLE_DATA", REPO.parent / "shared" / "data" / "fu-lora-sample")
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.gpu`` tests (the CUDA-only paths, beside each stage's tests) skip without
    CUDA, so ``pytest -m gpu`` on a CPU machine reports them skipped, not failed."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@contextlib.contextmanager
def _torch_on_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_torch_thread():
    """``with one_torch_thread():`` torch on one thread, as a CLI run with OMP_NUM_THREADS=1 or a
    1-CPU Ray task runs: the thread count changes the summation order of CPU matrix products,
    so a reference made here on one thread matches such a run image for image (and costs no
    process of its own, ~10 s of imports on 2 cores)."""
    return _torch_on_one_thread


@pytest.fixture
def hub_offline(monkeypatch):
    """``hub_offline(True)``: diffusers' LoRA loader behaves as with ``HF_HUB_OFFLINE=1`` (a
    machine without network, like the lent GPU machine); diffusers reads the variable when it
    is imported, so this sets its copy of it."""
    return lambda on: monkeypatch.setattr("diffusers.loaders.lora_base.HF_HUB_OFFLINE", on)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real FU-LoRA sample folder; tests using it skip when it is absent."""
    if not (SHARED / "african_dev").is_dir():
        pytest.skip(f"real sample data not found at {SHARED} (set FULORA_SAMPLE_DATA)")
    return SHARED


def write_png(path: Path, mode: str = "L", size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """Write a small random image in ``mode`` (size is width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(path)
    elif mode == "RGB":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
    elif mode == "RGBA":
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").save(path)
    elif mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode).save(
            path
        )
    return path


@pytest.fixture
def make_png():
    return write_png


def cli_commands(parser: argparse.ArgumentParser, path=()) -> dict[tuple[str, ...], Any]:
    """Every (sub)command's parser below ``parser``, itself included, by command path."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= cli_commands(sub, (*path, name))
    return found


@pytest.fixture(name="cli_commands")
def cli_commands_fixture():
    """:func:`cli_commands`, for the tests of the CLI's commands, flags and help."""
    return cli_commands


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny SD-architecture model saved with save_pretrained, loadable from its path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def lora_images(tmp_path_factory):
    """Phantom plane folders (with caption files), a handful of images per plane."""
    from fulora.data.phantom import PhantomConfig, generate_phantom

    root = tmp_path_factory.mktemp("lora-data")
    generate_phantom(root, PhantomConfig(per_class=3, planes=["brain", "femur"], grid=False))
    return root


@pytest.fixture(scope="session")
def trained_lora(tiny_model, lora_images, tmp_path_factory):
    """A LoRA run folder from the LoRA stage (tiny model, a few steps at a high rate)."""
    from fulora.data.readers import read_any
    from fulora.lora.train import LoraTrainConfig, train_lora

    out = tmp_path_factory.mktemp("lora-run")
    cfg = LoraTrainConfig(
        base=str(tiny_model),
        rank=4,
        alpha=4,
        resolution=64,
        bucket_step=16,
        repeats=2,
        max_steps=12,
        optimizer="adamw",
        unet_lr=2e-2,
        text_encoder_lr=2e-2,
        seed=0,
        output_name="phantom_lora",
    )
    train_lora(read_any(lora_images), out, cfg, progress=False)
    return out
