"""fulora.runs.RunDir: the contract every run folder keeps (config first, done.json last)."""

import json
import logging
from dataclasses import dataclass

import pytest
import yaml

from fulora.runs import CONFIG_NAME, DONE_NAME, LOG_NAME, RunDir


@dataclass
class _Config:
    rank: int = 8
    lr: float = 1e-4
    planes: tuple = ("brain", "femur")


def test_start_saves_the_config_and_drops_a_stale_done_marker(tmp_path):
    (tmp_path / DONE_NAME).write_text("{}")
    run = RunDir(tmp_path, command="fulora test").start(_Config())
    try:
        assert yaml.safe_load((tmp_path / CONFIG_NAME).read_text())["rank"] == 8
        assert not run.is_done() and run.read_done() is None
        logging.getLogger("fulora").info("hello")
    finally:
        record = run.finish(steps=3)
    assert "hello" in (tmp_path / LOG_NAME).read_text()
    done = json.loads((tmp_path / DONE_NAME).read_text())
    assert done == record and done["steps"] == 3 and done["command"] == "fulora test"
    assert {"finished", "seconds", "fulora_version", "python"} <= set(done)


@pytest.mark.parametrize(
    "changed, expected",
    [
        ({}, []),
        ({"rank": 16}, ["rank"]),
        ({"rank": 16, "lr": 1e-3}, ["lr", "rank"]),
        ({"planes": ("brain",)}, ["planes"]),
    ],
)
def test_changed_config_keys_names_what_differs(tmp_path, changed, expected):
    assert RunDir(tmp_path).changed_config_keys(_Config()) is None  # nothing here yet
    RunDir(tmp_path).start(_Config()).close()
    assert RunDir(tmp_path).changed_config_keys(_Config(**changed)) == expected


@pytest.mark.parametrize("value, expected", [(8, []), (16, ["rank"])])
def test_a_key_added_since_the_run_counts_as_its_default(tmp_path, value, expected):
    """An older run's config.yaml lacks settings added later; absent means the default (which
    keeps the old behaviour), so the run resumes unless the new setting is set otherwise."""
    RunDir(tmp_path).start(_Config()).close()
    saved = yaml.safe_load((tmp_path / CONFIG_NAME).read_text())
    del saved["rank"]
    (tmp_path / CONFIG_NAME).write_text(yaml.safe_dump(saved))
    assert RunDir(tmp_path).changed_config_keys(_Config(rank=value)) == expected


def test_close_stops_logging_to_the_folder(tmp_path):
    run = RunDir(tmp_path).start()
    run.close()
    logging.getLogger("fulora").warning("after close")
    assert "after close" not in (tmp_path / LOG_NAME).read_text()
