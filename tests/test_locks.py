"""One writer per run or experiment folder (issue 13, class 1).

Every command that writes a folder takes ``fulora.runs.FolderLock`` through ``RunDir.start``
(or ``RunDir.lock``); these tests hold a folder from another process or from this one and
check that each kind of writer stops before writing, naming the holder, and that a holder
killed with SIGKILL leaves nothing that blocks the next run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from fulora.classify.train import ClassifyConfig, train_classifier
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.errors import FolderInUseError
from fulora.generate.run import GenerateConfig, generate
from fulora.lora.train import LoraTrainConfig, train_lora
from fulora.runs import RunDir

HOLDER = textwrap.dedent(
    """
    import sys, time
    from fulora.runs import RunDir
    run = RunDir(sys.argv[1], command="holder-process").start()  # held while referenced
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def held_folder(tmp_path):
    """A folder locked by another live process; yields (folder, process)."""
    folder = tmp_path / "held"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        yield folder, process
    finally:
        process.kill()
        process.wait()


def test_second_writer_in_this_process_stops_and_names_the_first(tmp_path):
    first = RunDir(tmp_path / "run", command="first").start()
    with pytest.raises(FolderInUseError) as err:
        RunDir(tmp_path / "run", command="second").start()
    message = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert "first" in message and "--out" in message
    first.close()
    RunDir(tmp_path / "run", command="second").start().close()  # free again


def test_cli_writer_stops_while_another_process_holds_the_folder(held_folder):
    folder, process = held_folder
    result = subprocess.run(
        [sys.executable, "-m", "fulora", "data", "phantom", str(folder), "--per-class", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"pid {process.pid}" in result.stderr and "holder-process" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(folder.glob("*/*.png")), "the second writer wrote images"


def test_a_killed_holder_leaves_no_lock_behind(held_folder, caplog):
    folder, process = held_folder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with caplog.at_level(logging.WARNING, logger="fulora"):
        run = RunDir(folder, command="next").start()
    run.close()
    assert f"lock left by pid {process.pid}" in caplog.text and "gone" in caplog.text


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    return generate_phantom(root, PhantomConfig(per_class=10, domain="source", grid=False))


WRITERS = {
    "classify train": lambda out, source, tiny: train_classifier(
        [source],
        out,
        ClassifyConfig(arch="tiny_cnn", pretrained=False, image_size=32, epochs=1),
        progress=False,
    ),
    "lora train": lambda out, source, tiny: train_lora(
        source,
        out,
        LoraTrainConfig(
            base=str(tiny), rank=2, alpha=2, resolution=32, bucket_step=16, max_steps=1
        ),
        progress=False,
    ),
    "generate": lambda out, source, tiny: generate(
        out, GenerateConfig(base=str(tiny), per_class=1, steps=2, width=32, height=32)
    ),
    "generate --only": lambda out, source, tiny: generate(
        out,
        GenerateConfig(base=str(tiny), per_class=1, steps=2, width=32, height=32),
        only=["brain:0"],
    ),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_each_writer_stops_before_writing(writer, source, tiny_model, tmp_path):
    out = tmp_path / "out"
    holder = RunDir(out, command="holder").start()
    before = sorted(p.name for p in out.iterdir())
    try:
        with pytest.raises(FolderInUseError, match="holder"):
            WRITERS[writer](out, source, tiny_model)
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.close()
