"""The GPU benchmark suite's --smoke mode: the same code on CPU with the tiny model, so that the
suite cannot rot between GPU runs (issue 16)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_runs_every_part_and_writes_json_and_markdown(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--smoke", "--out", str(tmp_path)]
        + ["--budget", "240"],  # the default 100 s, with room for a loaded CI machine
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report_file,) = tmp_path.glob("smoke-cpu-*.json")
    report = json.loads(report_file.read_text())
    results = report["results"]
    assert set(results) == {"model", "lora", "generate", "classify"}
    for part, data in results.items():
        assert data["exit"] == 0 and data["rows"] and not data["errors"], (part, data)
    loops = {row["loop"] for row in results["lora"]["rows"]}
    assert loops == {"fulora", "plain (diffusers example)"}  # each figure with its alternative
    ways = {row["way"] for row in results["generate"]["rows"]}
    assert ways == {"plain pipe(prompt)", "fulora generate"}
    fused = [r for r in results["generate"]["rows"] if r["options"] == "fuse_qkv"]
    assert fused and fused[0]["max_grey_diff"] <= 1  # the stated tolerance
    assert {r["way"] for r in results["classify"]["rows"]} == {
        "plain fp32",
        "fulora (AMP + channels_last)",
    }
    assert report["projection"]["total_h"] > 0
    markdown = report_file.with_suffix(".md").read_text()
    for heading in ("**LoRA training**", "**Generation**", "**Classifiers**", "paper's grid"):
        assert heading in markdown


def test_refuses_a_full_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--smoke" in done.stderr


def test_committed_results_render_again(tmp_path):
    """Every committed GPU result file is complete enough to rebuild its Markdown table."""
    for committed in sorted((REPO / "benchmarks/results").glob("*.json")):
        copy = tmp_path / committed.name
        copy.write_text(committed.read_text())
        done = subprocess.run(
            [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--render", str(copy)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert copy.with_suffix(".md").read_text() == committed.with_suffix(".md").read_text()


def _benchmark_module(name: str):
    import importlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_rows_run_in_the_order_asked_and_a_killed_row_is_named(tmp_path):
    """A short lease names rows in the order it wants them (a row's place in the process can
    change its figure), and a part killed mid-row leaves which row it was on and since when."""
    import time

    parts = _benchmark_module("gpu_parts")
    path = tmp_path / "part.json"
    rec = parts.Recorder(path, "lora", time.time() + 60, only=["b", "a"])
    seen = []

    def measure(name):
        seen.append((name, json.loads(path.read_text())["running"]["name"]))

    rec.attempt_all([(n, lambda n=n: measure(n), 0.0) for n in ("a", "b", "c")])
    assert seen == [("b", "b"), ("a", "a")]  # "c" was not asked for
    assert "running" not in json.loads(path.read_text())

    suite = _benchmark_module("gpu_suite")
    killed = {"rows": [], "exit": "killed at its time limit", "ended": 1400.0}
    killed["running"] = {"name": "fulora batch 32 compile", "started": 1000.0}
    text = suite.markdown({"machine": {}, "results": {"generate": killed}} | _header())
    assert "while measuring 'fulora batch 32 compile' after 400 s (unfinished)" in text


def _header() -> dict:
    machine = dict(device="CPU", date="today", torch="t", diffusers="d", bitsandbytes=None)
    return {"machine": machine | dict(python="3", cpus=2), "command": "python gpu_suite.py"}
