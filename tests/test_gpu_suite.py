"""The GPU benchmark suite's --smoke mode: the same code on CPU with the tiny model, so that the
suite cannot rot between GPU runs (issue 16)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    overlap = [r for r in results["generate"]["rows"] if r["options"].endswith("decode_overlap")]
    assert overlap and overlap[0]["max_grey_diff"] == 0  # a speed-only setting: the same bytes
    assert {r["way"] for r in results["classify"]["rows"]} == {
        "plain fp32",
        "fulora (AMP + channels_last)",
        "fulora (AMP + channels_last + fused SGD)",
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


def test_merge_makes_one_report_of_runs_on_one_kind_of_gpu(tmp_path):
    """Two committed H200 runs (the LoRA rows in either order) merge into one report: every
    row tagged with its run, each fulora row compared with its own run's plain loop, and the
    projection from the paper recipe's best row without cuDNN autotuning."""
    parts = REPO / "benchmarks/results/parts"
    runs = [parts / "NVIDIA-H200-2026-11-26-run2.json", parts / "NVIDIA-H200-2026-11-26-run3.json"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--out", str(tmp_path)]
        + ["--merge", *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    merged = json.loads((tmp_path / "NVIDIA-H200-2026-11-26-run2-merged.json").read_text())
    lora = merged["results"]["lora"]["rows"]
    assert {r["run"] for r in lora} == {
        "NVIDIA-H200-2026-11-26-run2",
        "NVIDIA-H200-2026-11-26-run3",
    }
    assert len(lora) == 6
    run3 = {r["loop"] + str(r.get("cudnn_benchmark")): r for r in lora if r["run"].endswith("3")}
    assert run3["fuloraFalse"]["x_plain"] == f"{3.461 / 3.164:.2f}"  # run 3's own plain loop
    assert merged["projection"] is None  # no classifier rows in these two runs
    suite = _benchmark_module("gpu_suite")
    run1 = json.loads((parts / "NVIDIA-H200-2026-11-26-run1.json").read_text())
    grid = suite.projection(merged["results"] | {"classify": run1["results"]["classify"]})
    best = 1000 * 3 / 3.461 / 3600  # 3 LoRAs at run 3's 3.461 steps/s, not autotuned 4.131
    assert grid["lora_h"] == round(best, 2)
    markdown = (tmp_path / "NVIDIA-H200-2026-11-26-run2-merged.md").read_text()
    assert "| run | loop |" in markdown and "- run `NVIDIA-H200-2026-11-26-run3`" in markdown


def test_merge_refuses_runs_of_different_gpus_and_a_rerun_overwrites_nothing(tmp_path):
    suite = _benchmark_module("gpu_suite")
    run = json.loads(
        (REPO / "benchmarks/results/parts/NVIDIA-H200-2026-11-26-run3.json").read_text()
    )
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    paths[0].write_text(json.dumps(run))
    paths[1].write_text(json.dumps(run | {"machine": run["machine"] | {"device": "NVIDIA H100"}}))
    import pytest

    with pytest.raises(SystemExit, match="a: NVIDIA H200, b: NVIDIA H100"):
        suite.merge(paths, "merge")
    (tmp_path / "other").mkdir()  # two leases' files of the same name, from two OUT folders
    twin = tmp_path / "other" / "a.json"
    twin.write_text(paths[0].read_text())
    merged = suite.merge([paths[0], twin], "merge")
    assert [r["run"] for r in merged["merged_from"]] == ["a", "a#2"]
    assert suite._free_stem(tmp_path, "X-2026") == "X-2026"
    (tmp_path / "X-2026.json").write_text("{}")
    assert suite._free_stem(tmp_path, "X-2026") == "X-2026-2"
    (tmp_path / "X-2026-2.json").write_text("{}")
    assert suite._free_stem(tmp_path, "X-2026") == "X-2026-3"


def test_a_part_saves_its_rows_while_it_runs(tmp_path):
    """A lease's limit can stop the whole command mid-part (it did, on an H100): the suite's
    files must already hold the rows measured so far, and say which part and row were running."""
    suite = _benchmark_module("gpu_suite")
    rows = tmp_path / "classify.json"
    writes_a_row_then_hangs = (
        "import json, pathlib, sys, time\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "data = {'rows': [{'arch': 'resnet18'}], 'errors': [], 'skipped': [],\n"
        "        'running': {'name': 'resnet18 compile', 'started': time.time()}}\n"
        "p.with_suffix('.tmp').write_text(json.dumps(data))\n"
        "p.with_suffix('.tmp').replace(p)\n"
        "time.sleep(60)\n"
    )
    saved = []

    def progress(code):
        saved.append((code, json.loads(rows.read_text())["rows"]))

    cmd = [sys.executable, "-c", writes_a_row_then_hangs, str(rows)]
    code = suite._run_part(cmd, rows, limit=8.0, progress=progress)
    assert code == "killed at its time limit"
    assert saved and saved[-1] == (suite.STILL_RUNNING, [{"arch": "resnet18"}])
    report = {"machine": {}, "results": {"classify": json.loads(rows.read_text())}} | _header()
    report["results"]["classify"].update(exit=suite.STILL_RUNNING, ended=time.time())
    text = suite.markdown(report)
    assert "classify: exit still running when the suite stopped, while measuring" in text
    assert "resnet18" in text


@pytest.mark.parametrize(
    "way, expected",
    [
        ("plain fp32", (None, False)),
        ("fulora (AMP + channels_last)", (torch.float16, True)),
        ("fulora (AMP + channels_last + fused SGD)", (torch.float16, True)),
        ("fulora (AMP)", (torch.float16, False)),
        ("fulora (fp32 + channels_last)", (None, True)),
        ("fulora (AMP + channels_last + compile reduce-overhead)", (torch.float16, True)),
    ],
)
def test_each_classifier_row_trains_as_its_name_says_on_cuda(way, expected):
    """A row's name is what fulora does on CUDA with its settings (autocast type,
    channels-last), as fulora's own speed_settings reads them; the CPU ignores both."""
    from fulora.classify.train import speed_settings

    parts = _benchmark_module("gpu_parts")
    cfg = parts.classify_way_config(way)
    assert speed_settings(cfg, torch.device("cuda")) == expected
    assert speed_settings(cfg, torch.device("cpu")) == (None, False)
    assert cfg.fused_optimizer == ("fused" in way) and cfg.compile == ("compile" in way)


def test_only_refuses_a_row_that_no_part_measures(tmp_path):
    """A misspelt ``--only`` row would measure nothing on a rare GPU lease: the suite stops
    before any work, naming the row and the closest one; ``--list`` prints the names."""
    suite = [sys.executable, str(REPO / "benchmarks/gpu_suite.py"), "--out", str(tmp_path)]
    misspelt = ["--parts", "model", "classify", "--only", "resnet18 plain fp32", "resnet18 plan"]
    done = subprocess.run(suite + misspelt, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not list(tmp_path.iterdir())
    assert "--only 'resnet18 plan'" in done.stderr and "'resnet18 plain fp32'" in done.stderr
    listed = subprocess.run(
        suite + ["--list", "--parts", "generate"], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and "  fulora batch 32 compile + fuse_qkv\n" in listed.stdout


def test_every_row_the_next_lease_names_is_one_the_suite_measures():
    """``benchmarks/next_lease.sh`` (and any command in BENCHMARKS.md's list for the next GPU
    lease) names its rows with ``--only``: each must be a row of the parts named with it
    (rows are renamed as the suite grows)."""
    import re

    parts = _benchmark_module("gpu_parts")
    text = (REPO / "benchmarks/next_lease.sh").read_text()
    text += (REPO / "BENCHMARKS.md").read_text().split("## Still to be measured")[1]
    only = r"--only((?:\s*\\?\s*\"[^\"]+\")+)"  # --only "a" \ "b": rows over lines
    commands = re.findall(r"--parts ([a-z ]+)" + only, text)
    assert commands  # the steps of the script that run the suite
    for part_names, rows in commands:
        known = {row for part in part_names.split() for row in parts.row_names(part, False)}
        for row in re.findall(r'"([^"]+)"', rows):
            assert row in known, (row, part_names)


def test_the_lease_script_parses_and_refuses_an_unknown_step(tmp_path):
    script = str(REPO / "benchmarks/next_lease.sh")
    assert subprocess.run(["bash", "-n", script], timeout=30).returncode == 0
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", script, "tests", "overlaps"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"OUT": str(out), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and "tests, demo, overlap, skip)" in done.stderr
    assert not out.exists()  # refused before any work


def test_the_lease_script_skips_the_steps_its_deadline_leaves_no_time_for(tmp_path):
    """Under LEASE_S a step that cannot start with the time it needs is skipped and logged, so
    one command runs every step that fits instead of being killed inside one that does not."""
    import shutil

    script = tmp_path / "benchmarks" / "next_lease.sh"
    script.parent.mkdir()
    shutil.copy(REPO / "benchmarks/next_lease.sh", script)  # a root without .whl: no install
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(script), "tests", "overlap"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"OUT": str(out), "PATH": "/usr/bin:/bin", "LEASE_S": "30"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "== tests skipped: " in done.stdout and "it needs 60" in done.stdout
    assert "== overlap skipped: " in done.stdout and "it needs 310" in done.stdout
    assert "skipped" in (out / "overlap.log").read_text()
