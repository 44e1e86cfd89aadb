"""The Ray executor (issue 15): the demo grid, local vs Ray, and the paper grid on N GPUs.

1. **Measured**: the demo experiment (the one ``make demo`` runs: phantom data, fulora's tiny
   model, a LoRA, 60 synthetic images per plane, 9 classifiers, the audit and 9 evaluations) by
   the local executor and by Ray on the same machine, one after the other in this process;
   wall times, their ratio, whether the tables agree, and the Ray run's total work against its
   longest chain of stages.
2. **Projected**: the paper grids (``configs/fu-lora-paper.yaml``, ``configs/fu-lora-sound.yaml``)
   expanded as the runner expands them (regimes x LoRA variants x backbones x seeds), each stage
   timed from a GPU suite result (``benchmarks/results/*.json``: LoRA steps/s, generation
   images/s, training images/s per backbone), then scheduled as the Ray executor schedules them
   (each stage on a free GPU once the stages it reads are done, in plan order; generation in N
   shards) on 1 to 16 GPUs. Compute only: the audit, evaluations and data loading are not timed.

Run it where Ray can bind its servers; on a machine without outside network, in a namespace of
its own (as root)::

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/bench_ray.py'
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.demo import demo_experiment
from fulora.experiment.config import load_experiment, regime_parts
from fulora.experiment.ray_executor import RayOptions
from fulora.experiment.runner import plan_experiment, run_experiment
from fulora.experiment.stages import Stage, StageRun, critical_path, stage_seconds

HERE = Path(__file__).resolve().parent
GPU_JSON = HERE / "results" / "NVIDIA-H200-2026-11-25.json"


def demo_grid(work: Path) -> dict:
    """The demo experiment by each executor, in this process, on this machine's CPUs."""
    for domain in ("source", "target"):
        config = PhantomConfig(per_class=20, domain=domain, grid=domain == "source")
        generate_phantom(work / f"phantom-{domain}", config)
    path = work / "experiment.yaml"
    path.write_text(yaml.safe_dump(demo_experiment(work, report=False), sort_keys=False))
    seconds, tables = {}, {}
    cpus = os.cpu_count() or 1
    # Ray with one thread per task (stages side by side), and with the local executor's threads
    # (torch's default: every core) per task, which reproduces the local numbers exactly
    ways = {"local": ("local", 1), "ray": ("ray", 1), "ray_all_threads": ("ray", cpus)}
    for way, (executor, threads) in ways.items():
        out = work / way
        started = time.perf_counter()
        options = RayOptions(num_cpus=cpus, cpus_per_task=threads)
        run_experiment(load_experiment(path), out, executor=executor, ray=options)
        seconds[way] = time.perf_counter() - started
        tables[way] = pd.read_csv(out / "results" / "results.csv")
    runs = pd.read_csv(work / "ray" / "stages.csv", keep_default_na=False)
    spent = stage_seconds([StageRun(**row) for row in runs.to_dict("records")])
    plan = plan_experiment(load_experiment(path), work / "ray")
    chain, _ = critical_path(plan.stages, spent)
    report = {"cpus": cpus, "ray_work_s": round(sum(spent.values()), 1)}
    report["ray_critical_path_s"] = round(chain, 1)
    for way, table in tables.items():
        report[f"{way}_s"] = round(seconds[way], 1)
        report[f"{way}_acc"] = table.loc[table["space"] == "all_outputs", "ACC"].round(2).tolist()
        if way != "local":
            report[f"{way}_speed_vs_local"] = round(seconds["local"] / seconds[way], 2)
            report[f"{way}_table_equals_local"] = table.equals(tables["local"])
    return report


def gpu_rates(path: Path) -> dict:
    """Per-stage rates from a GPU suite result: LoRA steps/s, images/s, training images/s."""
    results = json.loads(path.read_text())["results"]
    lora = next(
        r["steps_per_s"]
        for r in results["lora"]["rows"]
        if r.get("loop") == "fulora" and r.get("batch") == 1 and r.get("cache_latents")
    )
    generate = max(
        r["images_per_s"]
        for r in results["generate"]["rows"]
        if r.get("way") == "fulora generate" and r.get("images_per_s")
    )
    plain, fulora = {}, {}
    for row in results["classify"]["rows"]:
        (fulora if row["way"].startswith("fulora") else plain)[row["arch"]] = row[
            "train_images_per_s"
        ]
    return {"lora": lora, "generate": generate, "plain": plain, "fulora": fulora}


def paper_grid(config: Path, rates: dict, amp: bool) -> tuple[list[Stage], dict[str, float]]:
    """The stages of a paper config and their GPU seconds, expanded as plan_experiment does."""
    cfg = load_experiment(config)
    lora_steps, per_class, epochs = 1000, cfg.generate.settings["per_class"], 20
    planes = len(cfg.generate.settings["planes"])
    stages, seconds = [], {}

    def add(kind: str, name: str, spent: float, after: tuple[str, ...] = ()) -> None:
        stages.append(Stage(kind, name, Path(name), "", lambda: None, after=after))
        seconds[name] = spent

    for variant in cfg.lora.variants:
        add("lora", f"lora/{variant}", lora_steps / rates["lora"])
    for variant in cfg.lora.variants:
        images = per_class * planes
        add("generate", f"generate/{variant}", images / rates["generate"], (f"lora/{variant}",))
    speed = rates["fulora"] if amp else rates["plain"]
    for regime in cfg.classify.regimes:
        options, _ = regime_parts(cfg, regime)
        variants = list(cfg.lora.variants) if options.get("synthetic") else [None]
        real = 1150 if options.get("real") else 6148  # HB's balanced real set, else ES
        for variant, arch, seed in (
            (v, a, s) for v in variants for a in cfg.classify.archs for s in cfg.classify.seeds
        ):
            images = real + (per_class * planes if variant else 0)
            rate = speed.get(arch) or rates["plain"][arch]
            after = (f"generate/{variant}",) if variant else ()
            name = f"classify/{regime}@{variant}/{arch}/seed-{seed}"
            add("classify", name, epochs * images / rate, after)
    return stages, seconds


def schedule(stages: list[Stage], seconds: dict[str, float], gpus: int, shards: bool) -> float:
    """Wall seconds on ``gpus`` GPUs: each stage, in plan order once what it reads is done, on
    the GPU free first (the Ray executor's order); generation split in ``gpus`` shards."""
    free = [0.0] * gpus  # when each GPU is next free
    done: dict[str, float] = {}
    for stage in stages:
        ready = max((done[n] for n in stage.after), default=0.0)
        parts = gpus if shards and stage.kind == "generate" else 1
        ends = []
        for _ in range(parts):
            start = max(ready, heapq.heappop(free))
            ends.append(start + seconds[stage.name] / parts)
            heapq.heappush(free, ends[-1])
        done[stage.name] = max(ends)
    return max(done.values())


def projections(rates: dict) -> list[dict]:
    """Both paper grids on 1 to 16 GPUs."""
    rows = []
    for name, amp in (("fu-lora-paper", False), ("fu-lora-sound", True)):
        stages, seconds = paper_grid(HERE.parent / "configs" / f"{name}.yaml", rates, amp)
        chain, names = critical_path(stages, seconds)
        row = {
            "config": name,
            "stages": len(stages),
            "work_h": round(sum(seconds.values()) / 3600, 2),
            "critical_path_h": round(chain / 3600, 2),
            "critical_path": " -> ".join(names),
        }
        for gpus in (1, 2, 4, 8, 16):
            row[f"{gpus}_gpus_h"] = round(schedule(stages, seconds, gpus, True) / 3600, 2)
        rows.append(row)
    return rows


def main() -> None:
    """Run both parts and print them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-json", type=Path, default=GPU_JSON, help="a GPU suite result")
    parser.add_argument("--skip-demo", action="store_true", help="only the projection")
    args = parser.parse_args()
    report: dict = {"gpu_json": str(args.gpu_json.resolve().relative_to(HERE.parent.resolve()))}
    report["projection"] = projections(gpu_rates(args.gpu_json))
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as work:
            report["demo"] = demo_grid(Path(work))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
