"""Ray executor scenarios, run by tests/experiment/test_ray.py in a network namespace of their own.

Each scenario is one process: Ray binds its servers to the machine's interface address, so the
test runs this script under ``unshare -n`` where the loopback is the only interface (see
``../shared/notes/ray-here.md``). A scenario prints one JSON line, ``RESULT {...}``, for the test.

Faults are injected by wrapping stage actions in the driver (``plan_experiment`` patched in the
runner): the wrappers are defined here, in ``__main__``, so Ray ships them to its workers by value.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import fulora.experiment.runner as runner
from fulora.errors import FuloraError
from fulora.experiment.config import load_experiment
from fulora.experiment.ray_executor import RayOptions


def _ray(config: str, out: str, sets: list[str] = (), retries: int = 2) -> dict:
    cfg = load_experiment(config, overrides=list(sets))
    started = time.perf_counter()
    options = RayOptions(num_cpus=2, retries=retries)
    record = runner.run_experiment(cfg, out, executor="ray", ray=options)
    return {"seconds": time.perf_counter() - started, "ran": record["ran"]}


def _stage_runs(out: str) -> list[dict]:
    return pd.read_csv(Path(out) / "stages.csv", keep_default_na=False).to_dict("records")


def sharded(config: str, ray_out: str) -> dict:
    """The experiment by Ray, generation in 2 shards (to compare with a local run of it)."""
    result = _ray(config, ray_out, ["generate.shards=2"])
    return {"ray_s": result["seconds"], "stage_runs": _stage_runs(ray_out)}


def equal(config: str, local_out: str, ray_out: str) -> dict:
    """The same experiment by the local executor and by Ray (generation in 2 shards)."""
    # One thread in both: a CPU's thread count changes the summation order of matrix products
    # (an image may move by one grey level); Ray gives each 1-CPU task one thread.
    torch.set_num_threads(1)
    started = time.perf_counter()
    runner.run_experiment(load_experiment(config), local_out)
    return {"local_s": time.perf_counter() - started, **sharded(config, ray_out)}


def _kill_once(action, flag: Path):
    def run():
        if not flag.exists():
            flag.write_text(str(os.getpid()))
            os._exit(1)  # the worker dies mid-stage, after the stage folder is marked
        return action()

    return run


def _always_fail():
    raise RuntimeError("deliberate failure of this stage")


def faults(config: str, out: str) -> dict:
    """One stage kills its worker once; another fails every time; then a clean rerun.

    Both runs join one Ray instance started here, as runs on a cluster do (``--executor ray
    --address``), which saves the rerun Ray's start and its workers' imports (about 20 s on 2
    cores); the executor must leave an instance it did not start running.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    plan_experiment = runner.plan_experiment
    flag = Path(out).parent / "killed-once"

    def patched(cfg, out_dir):
        plan = plan_experiment(cfg, out_dir)
        for stage in plan.stages:
            if stage.name == "classify/ES/tiny_cnn/seed-0":
                stage.action = _kill_once(stage.action, flag)
            if stage.name == "classify/HB/tiny_cnn/seed-0":
                stage.action = _always_fail
        return plan

    runner.plan_experiment = patched
    try:
        _ray(config, out)
        error = None
    except FuloraError as err:
        error = str(err)
    runner.plan_experiment = plan_experiment
    first = _stage_runs(out)
    rerun = _ray(config, out)
    left_running = ray.is_initialized()
    ray.shutdown()
    return {
        "left_running": left_running,
        "error": error,
        "killed": flag.read_text(),
        "first": first,
        "rerun": _stage_runs(out),
        "rerun_ran": rerun["ran"],
    }


HELD = "classify/HB/tiny_cnn/seed-0"  # the stage the interrupted run is held in


def _held(action, marker: Path):
    def run():
        marker.write_text("held")  # Ctrl-C comes now, while this stage runs
        # Short sleeps, as a stage's own work is short steps: Ray's cancel raises
        # KeyboardInterrupt between two of them, and the stage cleans up as after Ctrl-C.
        # One long sleep would wait out the executor's 15 s grace and be killed instead.
        for _ in range(1200):
            time.sleep(0.1)
        return action()

    return run


def interrupt(config: str, out: str) -> dict:
    """Ctrl-C while stages run (one is held running until then), then the same command again."""
    script = [sys.executable, __file__, "run", config, out, "hold"]
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default; one started in the
    # background by a non-interactive shell (`cmd &`, as some CI runners do) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt at all. Start the driver as a
    # terminal would, whatever started these tests.
    driver = subprocess.Popen(
        script,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    marker = Path(out).parent / "held"
    while time.time() < deadline and not marker.exists():
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    try:
        output, _ = driver.communicate(timeout=150)  # cancel, grace, Ray shutdown on a busy box
    except subprocess.TimeoutExpired:
        driver.kill()
        output, _ = driver.communicate()
        return {"interrupted_rc": None, "output": output}
    plan = pd.read_csv(Path(out) / "plan.csv")
    done_before = [
        s
        for s, f in zip(plan["stage"], plan["folder"], strict=True)
        if (Path(out) / f / "done.json").is_file()
    ]
    rerun = _ray(config, out)
    return {
        "interrupted_rc": driver.returncode,
        "output": output[-3000:],
        "stages": list(plan["stage"]),
        "done_before": done_before,
        "ray_left": _ray_processes_left(),
        "rerun": _stage_runs(out),
        "rerun_ran": rerun["ran"],
    }


def _ray_processes_left(wait: float = 15.0) -> list[str]:
    """Ray's own processes still alive (the interrupted driver's local instance must be gone)."""
    deadline = time.time() + wait
    while True:
        found = subprocess.run(
            ["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True
        )
        left = [line for line in found.stdout.splitlines() if "pgrep" not in line]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def run(config: str, out: str, hold: str = "") -> dict:
    """A Ray run (the interrupted driver of :func:`interrupt`, holding :data:`HELD` with hold)."""
    if hold:
        plan_experiment = runner.plan_experiment

        def patched(cfg, out_dir):
            plan = plan_experiment(cfg, out_dir)
            for stage in plan.stages:
                if stage.name == HELD:
                    stage.action = _held(stage.action, Path(out).parent / "held")
            return plan

        runner.plan_experiment = patched
    try:
        return _ray(config, out)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    scenarios = {"equal": equal, "sharded": sharded, "faults": faults, "interrupt": interrupt}
    result = {**scenarios, "run": run}[name](*args)
    print("RESULT " + json.dumps(result, default=str), flush=True)
