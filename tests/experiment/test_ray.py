"""The Ray executor against the local one (issue 15), on a local Ray instance with 2 CPUs.

Each scenario runs tests/experiment/ray_scenarios.py in a network namespace of its own
(``unshare -n``), where Ray's servers can bind only the loopback; the tests skip where Ray is
not installed or the namespace cannot be made (it needs root, as in CI).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.numpy import load_file

from .conftest import small_config, write_config

pytest.importorskip("ray", reason="the Ray executor's tests need Ray: pip install 'fulora[ray]'")

SCENARIOS = Path(__file__).with_name("ray_scenarios.py")


def _namespace_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = ["unshare", "-n", "sh", "-c", "ip link set lo up && true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespace_works(), reason="needs `unshare -n` (root) to keep Ray on the loopback"
)


def _scenario(*args: str, timeout: int = 300) -> dict:
    command = [sys.executable, str(SCENARIOS), *args]
    wrapped = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    done = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture
def ray_config(tiny_model, phantom_domains, tmp_path):
    """The small experiment (LoRA, generation, 2 regimes, one seed) as a YAML file."""
    config = copy.deepcopy(small_config(tiny_model, phantom_domains))
    return write_config(tmp_path / "experiment.yaml", config)


def test_ray_runs_the_experiment_as_the_local_executor_does(finished_experiment, tmp_path):
    # The local run is the shared fixture's (on one thread, as Ray's 1-CPU tasks): its config
    # file, run again by Ray into another folder.
    local, ray = finished_experiment, tmp_path / "ray"
    result = _scenario("sharded", str(local.parent / "experiment.yaml"), str(ray))

    # Every stage key equal: a stage done by either executor is done for both.
    plans = [pd.read_csv(run / "plan.csv") for run in (local, ray)]
    assert len(plans[0]) == 16 and plans[0][["stage", "key"]].equals(plans[1][["stage", "key"]])
    # Every metric equal, and so every table.
    for folder in plans[0]["folder"][plans[0]["kind"] == "evaluate"]:
        metrics = [json.loads((run / folder / "metrics.json").read_text()) for run in (local, ray)]
        assert metrics[0]["spaces"] == metrics[1]["spaces"], folder
    for name in ("results.csv", "per_domain.csv"):
        assert (local / "results" / name).read_text() == (ray / "results" / name).read_text()
    assert (ray / "report" / "report.html").is_file()
    # Generation in 2 shard tasks made the same images as one process, image for image.
    ran = {r["stage"] for r in result["stage_runs"] if r["state"] == "ran"}
    assert {"generate/r4 (shard 1/2)", "generate/r4 (shard 2/2)", "generate/r4"} <= ran
    images = sorted(p.relative_to(local) for p in (local / "synthetic").rglob("*.png"))
    assert len(images) == 12 + 3  # 4 per plane, and a contact sheet per plane
    for image in images:
        assert np.array_equal(_pixels(local / image), _pixels(ray / image)), image
    # The LoRA's tensors are equal; its file's bytes are not: safetensors writes the metadata
    # in the order of a hash map, which differs between processes. Hence the manifests differ
    # only in paths, times and the LoRA file's hash.
    loras = [load_file(run / "lora" / "r4" / "small.safetensors") for run in (local, ray)]
    assert loras[0].keys() == loras[1].keys()
    assert all(np.array_equal(loras[0][k], loras[1][k]) for k in loras[0])
    varying = ["path", "created", "lora", "lora_sha256"]
    manifests = [
        pd.read_csv(run / "synthetic" / "r4" / "manifest.csv").drop(columns=varying)
        for run in (local, ray)
    ]
    assert manifests[0].equals(manifests[1])
    # Each stage ran on the node named in stages.csv and logged to its own folder.
    for row in result["stage_runs"]:
        assert row["node"] and Path(row["log"]).is_file(), row


def test_a_killed_worker_is_retried_and_a_failing_stage_is_reported(ray_config, tmp_path):
    out = tmp_path / "run"
    result = _scenario("faults", str(ray_config), str(out))
    first = {r["stage"]: r for r in result["first"]}
    # The classifier whose worker died once was retried and finished.
    assert result["killed"] and first["classify/ES/tiny_cnn/seed-0"]["state"] == "ran"
    assert first["evaluate/target/ES/tiny_cnn/seed-0"]["state"] == "ran"
    # The stage that fails on its own is reported with its log; what needs it did not run;
    # its siblings (generation, the other classifier and its evaluation) finished.
    failed = first["classify/HB/tiny_cnn/seed-0"]
    assert failed["state"] == "failed" and "deliberate failure" in failed["error"]
    assert "deliberate failure of this stage" in Path(failed["log"]).read_text()
    assert first["evaluate/target/HB/tiny_cnn/seed-0"]["state"] == "blocked"
    assert first["generate/r4"]["state"] == "ran"
    assert "classify/HB/tiny_cnn/seed-0" in result["error"] and failed["log"] in result["error"]
    # The same command again runs only what is missing.
    rerun = {r["stage"]: r["state"] for r in result["rerun"]}
    assert sorted(s for s, state in rerun.items() if state == "ran") == [
        "classify/HB/tiny_cnn/seed-0",
        "embedding",  # the t-SNE of the first hybrid classifier: HB's
        "evaluate/target/HB/tiny_cnn/seed-0",
    ]
    assert (out / "results" / "results.csv").is_file() and (out / "done.json").is_file()
    assert result["left_running"], "the executor shut down a Ray instance it had joined"


def test_ctrl_c_cancels_and_the_rerun_goes_on_from_what_was_finished(ray_config, tmp_path):
    out = tmp_path / "run"
    result = _scenario("interrupt", str(ray_config), str(out))
    assert result["interrupted_rc"] not in (None, 0), result.get("output")
    assert "cancelled" in result["output"]
    assert result["ray_left"] == [], "the interrupted run left Ray running"
    done_before = result["done_before"]
    assert 0 < len(done_before) < len(result["stages"]), "Ctrl-C came before or after the work"
    # The same command again skips every stage finished before Ctrl-C and runs the rest.
    rerun = {r["stage"]: r["state"] for r in result["rerun"]}
    assert sorted(rerun) == sorted(result["stages"])
    for stage, state in rerun.items():
        assert state == ("skipped" if stage in done_before else "ran"), (stage, rerun)
    assert (out / "done.json").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], "a half-written file was left"


@pytest.mark.slow
def test_ray_runs_the_demo_experiment_as_the_local_executor_does(tmp_path):
    """The demo itself (``make demo``'s experiment, report off): about 7 minutes on 2 cores."""
    import yaml

    from fulora.data.phantom import PhantomConfig, generate_phantom
    from fulora.demo import demo_experiment

    for domain in ("source", "target"):
        config = PhantomConfig(per_class=20, domain=domain, grid=domain == "source")
        generate_phantom(tmp_path / f"phantom-{domain}", config)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(demo_experiment(tmp_path, report=False), sort_keys=False))
    local, ray = tmp_path / "local", tmp_path / "ray"
    _scenario("equal", str(path), str(local), str(ray), timeout=1200)
    plans = [pd.read_csv(run / "plan.csv") for run in (local, ray)]
    assert len(plans[0]) == 21 and plans[0][["stage", "key"]].equals(plans[1][["stage", "key"]])
    for folder in plans[0]["folder"][plans[0]["kind"] == "evaluate"]:
        metrics = [json.loads((run / folder / "metrics.json").read_text()) for run in (local, ray)]
        assert metrics[0]["spaces"] == metrics[1]["spaces"], folder
    assert (local / "results" / "results.csv").read_text() == (
        ray / "results" / "results.csv"
    ).read_text()
