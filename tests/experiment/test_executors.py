"""What both executors share: the stage graph, stages.csv, and the checks before any work."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from fulora.cli import main
from fulora.errors import ConfigError
from fulora.experiment.config import load_experiment
from fulora.experiment.ray_executor import RayOptions, check_ray
from fulora.experiment.runner import plan_experiment, run_experiment
from fulora.experiment.stages import (
    StageRun,
    critical_path,
    failure_message,
    node_summary,
    stage_seconds,
)

from .conftest import write_config


def test_each_stage_waits_for_the_stages_it_reads(finished_experiment):
    plan = plan_experiment(
        load_experiment(finished_experiment / "config.yaml"), finished_experiment
    )
    after = {stage.name: stage.after for stage in plan.stages}
    expected = {  # stage: the stages whose outputs it reads
        "lora/r4": (),
        "generate/r4": ("lora/r4",),
        "classify/ES/tiny_cnn/seed-0": (),
        # every seed of the real-only classifier labels the images (their mean)
        "audit/r4": ("generate/r4", "classify/ES/tiny_cnn/seed-0", "classify/ES/tiny_cnn/seed-1"),
        "classify/HB/tiny_cnn/seed-1": ("generate/r4",),
        "classify/HB-filtered/tiny_cnn/seed-0": ("audit/r4",),
        "evaluate/target/HB-filtered/tiny_cnn/seed-1": ("classify/HB-filtered/tiny_cnn/seed-1",),
    }
    for stage, needs in expected.items():
        assert after[stage] == needs, stage
    order = [stage.name for stage in plan.stages]  # the local executor's order respects them
    for stage, needs in after.items():
        assert all(order.index(n) < order.index(stage) for n in needs), stage


def test_the_local_executor_records_each_stage_in_stages_csv(finished_experiment):
    runs = pd.read_csv(finished_experiment / "stages.csv", keep_default_na=False)
    plan = pd.read_csv(finished_experiment / "plan.csv")
    assert list(runs["stage"]) == list(plan["stage"]) and set(runs["state"]) == {"ran"}
    assert (runs["seconds"] > 0).all() and runs["node"].str.len().min() > 0
    assert all(log.endswith("log.txt") for log in runs["log"])


@pytest.mark.parametrize(
    ("device", "options", "message"),
    [
        ("cuda:1", RayOptions(), "set device: cuda"),
        ("cpu", RayOptions(retries=-1), "--retries -1"),
    ],
)
def test_ray_options_are_checked_before_any_work(device, options, message):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed")
    with pytest.raises(ConfigError, match=message):
        check_ray(device, options)


def test_without_ray_the_executor_says_how_to_get_it(monkeypatch, experiment_config, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    with pytest.raises(ConfigError, match=r"pip install 'fulora\[ray\]'"):
        run_experiment(load_experiment(path), tmp_path / "run", executor="ray")
    assert not (tmp_path / "run").exists()  # nothing written


def test_cli_ray_flags_need_the_ray_executor(experiment_config, tmp_path, capsys):
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    code = main(["experiment", "run", str(path), "--out", str(tmp_path / "r"), "--retries", "3"])
    assert code == 2 and "--executor ray" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_shards_need_a_fixed_batch_size(experiment_config, tmp_path):
    experiment_config["generate"]["settings"].pop("batch_size")
    experiment_config["generate"]["shards"] = 2
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    with pytest.raises(ConfigError, match="generate.settings.batch_size"):
        plan_experiment(load_experiment(path), tmp_path / "run")
    experiment_config["generate"]["shards"] = 0
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    with pytest.raises(ConfigError, match="shards"):
        load_experiment(path)


def test_the_summary_says_which_node_ran_what_and_what_failed():
    runs = [
        StageRun("lora/a", "lora", "ran", "gpu-1", 120.0, "lora/a/log.txt"),
        StageRun("classify/x", "classify", "ran", "gpu-2", 30.0, "x/log.txt"),
        StageRun("classify/y", "classify", "ran", "gpu-2", 40.0, "y/log.txt"),
        StageRun("classify/z", "classify", "failed", log="z/log.txt", error="ValueError: bad"),
        StageRun("evaluate/z", "evaluate", "blocked", log="e/log.txt"),
        StageRun("lora/b", "lora", "skipped"),
    ]
    summary = node_summary(runs).splitlines()
    assert summary == [
        "  gpu-1: 1 stages, 120 s of work (lora/a 120 s)",
        "  gpu-2: 2 stages, 70 s of work (classify/y 40 s, classify/x 30 s)",
    ]
    message = failure_message(runs)
    assert "classify/z: ValueError: bad (log: z/log.txt)" in message
    assert "1 stage(s) not run because they need a failed one" in message


def test_ctrl_c_interrupts_every_task_and_kills_only_those_still_running_after_the_grace():
    """The executor's cancel, against a stand-in for Ray's API (``cancel``, ``wait``): Ray's own
    Ctrl-C scenario (test_ray.py) has its held stage stop within the grace, so the kill after
    it is checked here."""
    from fulora.experiment.ray_executor import _cancel

    class Ray:
        def __init__(self):
            self.calls = []

        def cancel(self, ref, force=False):
            self.calls.append(("cancel", ref, force))

        def wait(self, refs, num_returns, timeout):
            self.calls.append(("wait", tuple(refs), num_returns, timeout))
            return [r for r in refs if r != "stuck"], [r for r in refs if r == "stuck"]

    ray = Ray()
    _cancel(ray, ["a", "stuck", "b"], grace_s=2.0)
    assert ray.calls == [
        ("cancel", "a", False),  # KeyboardInterrupt in each task: it cleans up as after Ctrl-C
        ("cancel", "stuck", False),
        ("cancel", "b", False),
        ("wait", ("a", "stuck", "b"), 3, 2.0),
        ("cancel", "stuck", True),  # still running after the grace: its worker is killed
    ]
    ray.calls.clear()
    _cancel(ray, [])
    assert ray.calls == []


def test_the_critical_path_is_the_longest_chain_of_waiting_stages(finished_experiment):
    plan = plan_experiment(
        load_experiment(finished_experiment / "config.yaml"), finished_experiment
    )
    seconds = {stage.name: 1.0 for stage in plan.stages}
    seconds["lora/r4"] = 50.0
    chain, names = critical_path(plan.stages, seconds)
    # LoRA -> generation -> audit -> a filtered classifier -> its evaluation
    assert chain == 54.0 and names[:3] == ["lora/r4", "generate/r4", "audit/r4"]
    assert names[3].startswith("classify/HB-filtered/") and names[4].startswith("evaluate/")
    # A slow real-only classifier: the audit waits for it (every real-only seed labels the
    # synthetic images), and so the filtered classifiers behind the audit do.
    seconds["classify/ES/tiny_cnn/seed-1"] = 100.0
    chain, names = critical_path(plan.stages, seconds)
    assert chain == 103.0 and names[:2] == ["classify/ES/tiny_cnn/seed-1", "audit/r4"]
    assert names[2].startswith("classify/HB-filtered/") and names[3].startswith("evaluate/")
    # A sharded stage takes its longest shard plus its own merge.
    runs = [
        StageRun("generate/r4 (shard 1/2)", "generate", "ran", seconds=5.0),
        StageRun("generate/r4 (shard 2/2)", "generate", "ran", seconds=7.0),
        StageRun("generate/r4", "generate", "ran", seconds=1.0),
    ]
    assert stage_seconds(runs) == {"generate/r4": 8.0}


NODE_A, NODE_B = "0a" * 28, "0b" * 28  # Ray's node ids are 56 hex digits


class _FakeRay:
    """Just enough of Ray for the storage check: nodes, remote tasks pinned to a node, get."""

    def __init__(self, blind: set[str]):
        self.blind = blind  # nodes that do not see the experiment folder

    def nodes(self):
        return [
            {"NodeID": NODE_A, "Alive": True},
            {"NodeID": NODE_B, "Alive": True},
            {"NodeID": "0c" * 28, "Alive": False},  # a dead node is not asked
        ]

    def remote(self, **_):
        fake = self

        class Task:
            def __init__(self, function):
                self.function = function

            def options(self, scheduling_strategy):
                node = scheduling_strategy.node_id
                return type("Pinned", (), {"remote": lambda _, path: fake._read(node, path)})()

        return Task

    def _read(self, node, path):
        from pathlib import Path

        return (node, None if node in self.blind else Path(path).read_text())

    def get(self, refs, timeout=None):
        return refs


@pytest.mark.parametrize(
    ("blind", "message"), [(set(), None), ({NODE_B}, f"Ray node.s. {NODE_B}:")]
)
def test_the_run_folder_must_be_seen_by_every_node(tmp_path, blind, message):
    pytest.importorskip("ray")
    from fulora.experiment.ray_executor import check_shared_storage

    fake = _FakeRay(blind)
    if message is None:
        check_shared_storage(fake, tmp_path)
    else:
        with pytest.raises(ConfigError, match=message) as caught:
            check_shared_storage(fake, tmp_path)
        assert "storage that every node mounts" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # the probe file is removed either way


def test_the_slurm_script_parses_and_names_only_real_flags():
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from fulora.cli import build_parser

    script = Path(__file__).parents[2] / "scripts" / "fulora-ray.sbatch"
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    call = text[text.index("fulora experiment run") :].split("\nray stop")[0]
    flags = set(re.findall(r"(--[a-z][a-z-]*)", call))
    assert {"--executor", "--address", "--out", "--set"} <= flags
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["experiment"]
    run = run._subparsers._group_actions[0].choices["run"]
    known = {o for action in run._actions for o in action.option_strings}
    assert flags <= known, flags - known
