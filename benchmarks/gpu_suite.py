"""Every GPU figure of fulora in one command: LoRA, generation, classifiers, the paper's grid.

    python benchmarks/gpu_suite.py --out benchmarks/results/          # GPU, at most --budget s
    python benchmarks/gpu_suite.py --out /tmp/smoke --smoke           # CPU, tiny model, < 2 min

Each part (``gpu_parts.py``) runs in its own process under its share of the time budget, so one
failure or a slow part loses nothing else; each figure has the obvious alternative measured in
the same process (see ``gpu_parts.py``). Results: ``OUT/<machine>-<date>.json`` (every row,
the machine, the versions) and ``OUT/<machine>-<date>.md`` (the tables BENCHMARKS.md carries),
both rewritten after every part (``-2``, ``-3``... for a later run the same day: nothing is
overwritten). The paper's grid is projected from the measured rates. Runs split over several
commands (a GPU lent 10 minutes at a time) become one report with ``--merge A.json B.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (part, share of the time budget); unused time passes to the parts after it
PARTS = [("model", 0.08), ("generate", 0.37), ("lora", 0.37), ("classify", 0.18)]
# One SD1.5 image at 512x512, 30 steps, CFG 7: 30 x 2 UNet passes + the VAE decode.
TFLOP_PER_IMAGE = 50.7
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device-name fragment, for the "share" column.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
# The paper's grid (configs/fu-lora-paper.yaml): 3 LoRAs of 1000 steps (100 images x 10
# repeats, batch 1), 1000 images per plane per LoRA, and 5 backbones x 3 seeds x 8 regimes
# (ES, ES+DA, and HB, HB+DA per LoRA) of 20 epochs on ~6,150 images.
GRID = {"loras": 3, "lora_steps": 1000, "images": 15_000, "classifiers_per_arch": 24}
GRID_EPOCH_IMAGES, GRID_EPOCHS = 6148, 20
# the classifier rows measured with fulora's defaults on CUDA (the other "fulora" rows are options)
FULORA_CLASSIFY_WAY = "fulora (AMP + channels_last)"


def machine() -> dict:
    """The device, the software and the date of this run."""
    import torch

    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["device"] = f"CPU ({platform.machine()})"
    # Read from the installed packages' metadata, not by importing them: importing diffusers,
    # transformers and timm took 8 s on 2 cores, before a refusal or the first part. A package
    # that is installed but does not import is reported by the part that needs it.
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "timm"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def run_parts(
    names: list[str], model: Path, work: Path, budget: float, smoke: bool, save, only=None
):
    """Run each part in its own process within its share of ``budget``; return their data.

    ``only``: just these settings (row names as in the log, e.g. ``"fulora batch 32 compile"``)
    in every part but the model's, for a short GPU lease.
    """
    end = time.time() + budget
    shares = [(n, dict(PARTS)[n]) for n in names]  # in the order given: the last gets the rest
    results = {}
    for i, (name, share) in enumerate(shares):
        left = end - time.time()
        deadline = time.time() + left * share / sum(s for _, s in shares[i:])
        path = work / f"{name}.json"
        cmd = [sys.executable, str(HERE / "gpu_parts.py"), name, "--model", str(model)]
        cmd += ["--json", str(path), "--deadline", str(deadline)] + (["--smoke"] if smoke else [])
        cmd += ["--only", *only] if only and name != "model" else []
        print(f"== {name}: up to {deadline - time.time():.0f} s", flush=True)
        collect = functools.partial(_collect, results, name, path, time.time(), save)
        # a part past its deadline gets a short grace to finish the row it is on
        collect(_run_part(cmd, path, max(5.0, deadline - time.time() + 30), collect))
    return results


def _collect(results: dict, name: str, rows: Path, started: float, save, code) -> None:
    """Put part ``name``'s rows so far, with ``code`` as its exit, into ``results``; save them."""
    data = json.loads(rows.read_text()) if rows.is_file() else {"rows": [], "errors": []}
    data.update(exit=code, seconds=round(time.time() - started, 1), ended=time.time())
    results[name] = data
    save(results)


# what a part's exit reads as in the files while it runs: if the whole command is stopped (a
# lease's time limit), the files keep the rows measured so far and say which part was running
STILL_RUNNING = "still running when the suite stopped"


def _run_part(cmd: list[str], rows: Path, limit: float, progress) -> int | str:
    """Run one part's process for at most ``limit`` seconds; its exit code (or why it ended).

    Every few seconds, when the part has written a row, ``progress(STILL_RUNNING)`` saves the
    suite's files, so that a command stopped from outside loses at most the row being measured.
    """
    proc = subprocess.Popen(cmd)
    end, seen = time.time() + limit, None
    while True:
        try:
            return proc.wait(timeout=max(0.1, min(5.0, end - time.time())))
        except subprocess.TimeoutExpired:
            stamp = rows.stat().st_mtime_ns if rows.is_file() else None
            if stamp != seen:
                seen = stamp
                progress(STILL_RUNNING)
            if time.time() >= end:
                proc.kill()
                proc.wait()
                return "killed at its time limit"


def projection(results: dict) -> dict | None:
    """The paper's grid on one such GPU, from the measured rates (None if any is missing)."""
    # the paper recipe as fulora runs it (cuDNN autotuning off); of several runs' rows, the best:
    # the first row of a process reads ~10% slow (warm-up), which a 1000-step run does not pay
    lora = max(
        (
            r
            for r in results.get("lora", {}).get("rows", [])
            if r.get("loop") == "fulora"
            and (r.get("batch"), r.get("cache_latents"), r.get("checkpointing")) == (1, True, False)
            and not r.get("cudnn_benchmark")
        ),
        key=lambda r: r["steps_per_s"],
        default=None,
    )
    gen = [
        r["images_per_s"]
        for r in results.get("generate", {}).get("rows", [])
        if r.get("way") == "fulora generate" and r.get("images_per_s")
    ]
    rates, fastest = {}, {}  # arch -> training images/s: fulora's defaults (else the plain
    # loop's), and the fastest way measured (every way is a setting of ClassifyConfig; not the
    # compiled ones, whose step rate leaves out each classifier's compile time)
    for row in results.get("classify", {}).get("rows", []):
        arch, rate = row["arch"], row["train_images_per_s"]
        if row["way"] == FULORA_CLASSIFY_WAY or (row["way"] == "plain fp32" and arch not in rates):
            rates[arch] = rate
        if "compile" not in row["way"]:
            fastest[arch] = max(rate, fastest.get(arch, 0.0))
    if not (lora and gen and rates):
        return None
    lora_h = GRID["loras"] * GRID["lora_steps"] / lora["steps_per_s"] / 3600
    gen_h = GRID["images"] / max(gen) / 3600
    classify_h = _classify_hours(rates)
    return {
        "lora_h": round(lora_h, 2),
        "generate_h": round(gen_h, 2),
        "classify_h": round(classify_h, 2),
        "total_h": round(lora_h + gen_h + classify_h, 2),
        "classify_fastest_h": round(_classify_hours(fastest), 2),
        "total_fastest_h": round(lora_h + gen_h + _classify_hours(fastest), 2),
        "classifier_archs_measured": len(rates),
        "note": "compute only: LoRA at rank 128 for all three variants (ranks 32 and 8 are "
        "faster), generation at the best measured rate, classifiers from the training-step "
        "rate on GPU-resident tensors with fulora's settings (the plain loop's where those were "
        "not measured); data loading, evaluation, audit and report not counted",
    }


def _classify_hours(rates: dict[str, float]) -> float:
    """The grid's classifier training hours at these training rates (images/s per backbone; the
    mean over the measured ones stands in for any not measured)."""
    per_image = sum(1 / r for r in rates.values()) / len(rates) * 5  # 5 backbones
    return GRID["classifiers_per_arch"] * GRID_EPOCHS * GRID_EPOCH_IMAGES * per_image / 3600


def _pick(results: dict, part: str, **match) -> dict | None:
    for row in results.get(part, {}).get("rows", []):
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    columns = (["run"] if any("run" in r for r in rows) else []) + columns
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    """The tables BENCHMARKS.md carries (adds the ratio columns to the rows)."""
    m, results = report["machine"], report["results"]
    lines = [
        f"### {m['device']}, {m['date']}",
        "",
        f"`{report['command']}`: torch {m['torch']}, diffusers {m['diffusers']}, "
        f"bitsandbytes {m['bitsandbytes']}, Python {m['python']}, {m['cpus']} CPUs.",
    ]
    for run in report.get("merged_from", []):
        lines.append(f"- run `{run['run']}` ({run['date']}): `{run['command']}`")
    lines += _lora_lines(results.get("lora", {}))
    lines += _generate_lines(results, m["device"])
    cls = results.get("classify", {})
    if cls.get("rows"):
        lines += ["", f"**Classifiers** ({cls.get('setting', '')})", ""]
        cols = ["arch", "way", "train_images_per_s", "infer_images_per_s", "epoch_6148_s"]
        lines += _table(cls["rows"], cols + ["train_peak_gib"])
    grid = report.get("projection")
    if grid:
        lines += [
            "",
            f"**The paper's grid, projected** ({grid['note']}): LoRA {grid['lora_h']} h, "
            f"generation {grid['generate_h']} h, classifiers {grid['classify_h']} h "
            f"({grid['classifier_archs_measured']} of 5 backbones measured): "
            f"**{grid['total_h']} h** on one such GPU.",
        ]
        if grid.get("classify_fastest_h", grid["classify_h"]) < grid["classify_h"]:
            lines[-1] += (
                f" With each backbone's fastest measured classifier setting instead of the "
                f"defaults: classifiers {grid['classify_fastest_h']} h, "
                f"**{grid['total_fastest_h']} h**."
            )
    problems = _problems(results)
    if problems:
        lines += ["", "Not measured in this run:", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def _lora_lines(lora: dict) -> list[str]:
    if not lora.get("rows"):
        return []
    # against the plain loop of the same run (merged reports hold several)
    plain = {
        (r.get("run"), r["batch"]): r["steps_per_s"] for r in lora["rows"] if r["loop"] != "fulora"
    }
    for row in lora["rows"]:
        base = plain.get((row.get("run"), row["batch"]))
        row["x_plain"] = f"{row['steps_per_s'] / base:.2f}" if base else None
    cols = ["loop", "batch", "cache_latents", "checkpointing"]
    cols += ["cudnn_benchmark"] if any("cudnn_benchmark" in r for r in lora["rows"]) else []
    cols += ["steps_per_s", "images_per_s", "x_plain", "peak_gib", "optimizer"]
    cols += ["paper_1000_steps_min"]
    return ["", f"**LoRA training** ({lora.get('setting', '')})", ""] + _table(lora["rows"], cols)


def _generate_lines(results: dict, device: str) -> list[str]:
    gen = results.get("generate", {})
    if not gen.get("rows"):
        return []
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    for row in gen["rows"]:
        rate = row.get("images_per_s") or 0
        plain = _pick(results, "generate", way="plain pipe(prompt)", run=row.get("run"))
        row["x_plain"] = f"{rate / plain['images_per_s']:.2f}" if plain else None
        row["pct_of_peak"] = (
            f"{100 * rate * TFLOP_PER_IMAGE / peak:.0f}%"
            if peak and "512x512, 30 steps" in gen.get("setting", "")
            else None
        )
    cols = ["way", "batch", "options", "images_per_s", "x_plain", "pct_of_peak"]
    cols += ["first_batch_s", "peak_gib", "mean_grey_diff", "max_grey_diff"]
    return ["", f"**Generation** ({gen.get('setting', '')})", ""] + _table(gen["rows"], cols)


def _problems(results: dict) -> list[str]:
    """What a run did not measure: errors, rows skipped for time, parts that did not exit 0."""
    problems = [
        f"{part}: {e['name']}: {e['error'][:200]}"
        for part, data in results.items()
        for e in data.get("errors", [])
    ]
    problems += [
        f"{part}: skipped (time budget): {', '.join(data['skipped'])}"
        for part, data in results.items()
        if data.get("skipped")
    ]
    return problems + [
        f"{part}: exit {data['exit']}" + _cut_short(data)
        for part, data in results.items()
        if data.get("exit")
    ]


def merge(paths: list[Path], command: str) -> dict:
    """One report from several runs on one kind of GPU: each part's rows together, each row
    tagged with its run (the file's name), so that split or repeated runs give one projection.

    Raises:
        SystemExit: The runs are of different devices (a projection must not mix GPUs).
    """
    reports, runs = [], set()
    for i, path in enumerate(paths, 1):
        # each lease's OUT is a fresh folder, so two files may share a name: tag them apart
        run = path.stem if path.stem not in runs else f"{path.stem}#{i}"
        runs.add(run)
        reports.append((run, json.loads(path.read_text())))
    devices = {run: report["machine"]["device"] for run, report in reports}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{run}: {device}" for run, device in devices.items())
        raise SystemExit(f"--merge: the runs are of different devices ({listed}); merge one kind")
    results: dict = {}
    for run, report in reports:
        for part, data in report["results"].items():
            into = results.setdefault(part, {"part": part, "rows": [], "errors": [], "skipped": []})
            into.setdefault("setting", data.get("setting"))
            into["rows"] += [dict(row, run=run) for row in data.get("rows", [])]
            into["errors"] += [dict(e, name=f"{run}: {e['name']}") for e in data.get("errors", [])]
            into["skipped"] += [f"{run}: {name}" for name in data.get("skipped", [])]
            if data.get("exit"):
                error = f"exit {data['exit']}{_cut_short(data)}"
                into["errors"].append({"name": run, "error": error})
    return {
        "machine": reports[0][1]["machine"],
        "command": command,
        "merged_from": [
            {"run": run, "date": r["machine"]["date"], "command": r["command"]}
            for run, r in reports
        ],
        "results": results,
        "projection": projection(results),
    }


def _free_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``-3``... when a run of the same machine and day is already there
    (a second run the same day must not overwrite the first's figures)."""
    taken = {p.name.removesuffix(".json") for p in out.glob(f"{stem}*.json")}
    n, name = 1, stem
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return name


def _cut_short(data: dict) -> str:
    """Which row a killed part was measuring, and for how long (a lower bound on its cost)."""
    running, ended = data.get("running"), data.get("ended")
    if not running:
        return ""
    took = f" after {ended - running['started']:.0f} s" if ended else ""
    return f", while measuring {running['name']!r}{took} (unfinished)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, small sizes")
    parser.add_argument(
        "--budget", type=float, help="seconds for all parts (default 1100; 100 with --smoke)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=[n for n, _ in PARTS],
        choices=[n for n, _ in PARTS],
        help="parts to run, in this order (the model's always first)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SETTING", help="just these settings (names as in the log)"
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the row names of --parts (what --only takes; --smoke's differ) and stop",
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="rewrite the .md of an earlier run's JSON"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="combine earlier runs on one kind of GPU into OUT/<first>-merged.json and .md",
    )
    return parser


def check_only(parser, only: list[str], parts: list[str], smoke: bool) -> None:
    """Stop with a usage error naming each ``--only`` row that no part in ``parts`` measures."""
    from gpu_parts import row_names  # torch: not for --render and --merge

    known = [name for part in parts for name in row_names(part, smoke)]
    for name in only:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (the closest: {close[0]!r})" if close else ""
            kind = " --smoke" if smoke else ""
            parser.error(
                f"--only {name!r}: no{kind} row of the parts {' '.join(parts)} has this "
                f"name{hint}; --list prints them"
            )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = "python benchmarks/gpu_suite.py " + " ".join(argv or sys.argv[1:])
    if args.merge:
        report = merge(args.merge, command.strip())
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / f"{args.merge[0].stem}-merged.json"
        target.with_suffix(".md").write_text(markdown(report))
        target.write_text(json.dumps(report, indent=1))
        print(f"merged {len(args.merge)} runs: {target} and .md")
        return 0
    if args.render:
        report = json.loads(args.render.read_text())
        report["projection"] = projection(report["results"])
        args.render.with_suffix(".md").write_text(markdown(report))
        args.render.write_text(json.dumps(report, indent=1))
        return 0
    if args.list:
        from gpu_parts import row_names

        for part in args.parts:
            print("\n".join([f"{part}:", *(f"  {name}" for name in row_names(part, args.smoke))]))
        return 0
    if args.only:  # a misspelt row would measure nothing, silently, on a rare GPU lease
        check_only(parser, args.only, args.parts, args.smoke)
    budget = args.budget or (100.0 if args.smoke else 1100.0)
    info = machine()
    if not args.smoke and "CPU" in info["device"]:
        parser.error("no CUDA GPU here: run with --smoke (CPU, tiny model) or on a GPU machine")
    slug = "smoke-cpu" if args.smoke else re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(args.out, f"{slug}-{info['date'][:10]}")
    report = {"machine": info, "command": command.strip(), "budget_s": budget, "results": {}}

    def save(results: dict) -> None:
        report["results"] = results
        report["projection"] = projection(results)
        md = markdown(report)  # adds the ratio columns to the rows, so before the JSON
        for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", md)):
            tmp = args.out / f".{stem}{suffix}.tmp"
            tmp.write_text(text)
            tmp.replace(args.out / f"{stem}{suffix}")

    with tempfile.TemporaryDirectory(prefix="fulora-gpu-suite-") as work:
        work = Path(work)
        parts = ["model", *(p for p in args.parts if p != "model")]
        run_parts(parts, work / "model", work, budget, args.smoke, save, args.only)
    print(markdown(report))
    print(f"results: {args.out / stem}.json and .md")
    failed = [p for p, d in report["results"].items() if d.get("exit") or not d.get("rows")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
