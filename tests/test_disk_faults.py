"""Disk and file-system faults end in a message, in log.txt, with nothing lost (issue 13, class 5).

The full and read-only cases are real: a 2 MiB tmpfs mounted by the test (root only; skipped
otherwise), filled by an actual classifier run whose checkpoints no longer fit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fulora.errors import ConfigError, WriteError
from fulora.io import atomic_path, check_writable_folder, write_json


def _mount(folder: Path, *options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join(("size=2m", *options))
    command = ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)]
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB file system of its own (root only)."""
    folder = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount(folder):
        pytest.skip("needs root to mount a small tmpfs")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder; give --out a folder"):
        check_writable_folder(tmp_path / "out")


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(small_disk, caplog):
    checkpoint = small_disk / "last.pt"
    torch.save({"step": 1}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(WriteError) as err:
        with atomic_path(checkpoint) as tmp:
            torch.save({"weights": torch.zeros(1 << 20)}, tmp)  # 4 MiB on a 2 MiB disk
    message = str(err.value)
    assert f"could not write {checkpoint}: the disk is full" in message
    assert (
        "the previous last.pt is as it was" in message and "run the same command again" in message
    )
    assert checkpoint.read_bytes() == before
    assert [p.name for p in small_disk.iterdir()] == ["last.pt"]  # no temporary file left
    assert "the disk is full" in caplog.text


def test_read_only_folder_is_refused_before_any_work(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteError, match="read-only \\(EROFS\\)"):
        check_writable_folder(small_disk / "run")
    with pytest.raises(WriteError, match="read-only"):
        write_json(small_disk / "x.json", {})


def test_a_run_that_fills_the_disk_logs_it_in_log_txt(small_disk):
    """A real command: the classifier's checkpoints outgrow the disk; an error, no traceback."""
    from fulora.data.phantom import PhantomConfig, generate_phantom

    data = small_disk.parent / "data"
    generate_phantom(data, PhantomConfig(per_class=10, grid=False, size=(48, 64)))
    out = small_disk / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fulora", "classify", "train", "--train", str(data)]
        + ["--out", str(out), "--arch", "resnet18", "--pretrained", "false", "--epochs", "1"]
        + ["--set", "image_size=32", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0, result.stderr
    assert "the disk is full" in result.stderr and "Traceback" not in result.stderr
    assert "the disk is full" in (out / "log.txt").read_text()
