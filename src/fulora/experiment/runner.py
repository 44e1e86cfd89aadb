"""``fulora experiment run``: the whole method as a graph of stages that resumes.

Stages run in the order LoRA -> generation -> classifiers -> evaluation -> results -> report.
Before any work, the runner resolves every stage config, reads every manifest, checks the base
model and the classifier weights, and computes each stage's *key*: a hash of its resolved config
(minus settings that do not change results, such as the device) and of its inputs (manifest
fingerprints and the keys of the stages it reads from). A stage folder holds ``stage.json`` with
its key; a stage whose folder has the same key and a ``done.json`` is skipped, a stage with the
same key but no ``done.json`` resumes (LoRA from its last checkpoint, generation from its last
image, classifiers from their last epoch), and a folder with another key is moved to
``superseded/`` (never deleted) and the stage runs again. ``--from STAGE`` reruns that stage and
every later one.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from fulora.config import require_device
from fulora.errors import ConfigError, FuloraError
from fulora.experiment.config import ExperimentConfig
from fulora.experiment.layout import ExperimentLayout
from fulora.experiment.planner import Plan, plan_experiment
from fulora.experiment.ray_executor import EXECUTORS, RayOptions, check_ray, run_on_ray
from fulora.experiment.report import build_report
from fulora.experiment.results import write_results
from fulora.experiment.stages import (
    STAGES,
    StageRun,
    critical_path,
    failure_message,
    node_summary,
    rerun_readers,
    run_locally,
    stage_of,
    stage_seconds,
    write_stage_runs,
)
from fulora.generate.run import rounding_of_run, sampler_of_run
from fulora.generate.samplers import display_name
from fulora.io import atomic_open
from fulora.lora.train import resize_of_run
from fulora.runs import RunDir

logger = logging.getLogger("fulora")


def _supersede_outputs(out: Path) -> None:
    """Move the previous run's own outputs to ``superseded/experiment-<time>/`` before a rerun.

    Stage folders are superseded one by one when their key changes; this keeps the
    experiment-level config, plan, data lists, tables and report of the run before, so that a
    rerun never destroys a result.
    """
    layout = ExperimentLayout(out)
    present = [out / name for name in layout.TOP_LEVEL if (out / name).exists()]
    if not layout.done.is_file() or not present:
        return  # nothing finished before: the first run, or one that resumes
    target = layout.superseded / f"experiment-{time.strftime('%Y%m%d-%H%M%S')}"
    if target.exists():
        target = target.with_name(f"{target.name}-{time.time_ns()}")
    target.mkdir(parents=True)
    for path in present:
        shutil.move(str(path), str(target / path.name))
    logger.info("kept the previous run's %s in %s", ", ".join(p.name for p in present), target)
    print(f"previous results, report and config kept in {target}")


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    from_stage: str | None = None,
    dry_run: bool = False,
    executor: str = "local",
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """Run (or resume) an experiment into ``out``.

    Args:
        cfg: The experiment config (see :func:`fulora.experiment.config.load_experiment`).
        out: The experiment folder.
        from_stage: Rerun this stage kind (one of :data:`STAGES`) and every later one.
        dry_run: Only plan and print what would run.
        executor: ``local`` (one stage after another in this process) or ``ray`` (stages as
            Ray tasks over every GPU and CPU of a machine or cluster; needs ``fulora[ray]``).
        ray: Where and how the Ray executor runs (default: a local Ray instance, 2 retries).

    Returns:
        The experiment's ``done.json`` record (the plan's states with ``dry_run``).

    Raises:
        ConfigError: Any configuration problem, before any work starts.
        FuloraError: With the Ray executor, stages that failed (named, with their log files),
            after every stage that did not depend on them has finished.
    """
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage!r}: expected one of {', '.join(STAGES)}")
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    out, ray = Path(out), ray or RayOptions()
    require_device(cfg.device) if executor == "local" else check_ray(cfg.device, ray)
    plan = plan_experiment(cfg, out)
    states = _states_at_start(plan, from_stage)
    if dry_run:
        for stage in plan.stages:
            print(f"  {states[stage.name]:>7}  {stage.name}")
        return {"stages": states}

    run = RunDir(out, command="fulora experiment run").lock()
    if any(state != "done" for state in states.values()) or run.changed_config_keys(cfg):
        _supersede_outputs(out)
    run.start(cfg)
    _write_plan(plan, states)
    layout = ExperimentLayout(out)
    _write_inputs(plan, layout)
    try:
        runs = _run_stages(plan, states, executor, ray)
        print(f"[results] tables in {layout.results}/")
        table = write_results(plan.out, plan.cfg, plan.cells)
        report_path = None
        if cfg.report.enabled:
            print("[report] building the HTML report")
            report_path = build_report(out)
    finally:
        run.close()
    ran = sum(r.state == "ran" for r in runs if not stage_of(r.stage)[1])
    skipped = sum(r.state == "skipped" for r in runs)
    record = run.finish(
        name=cfg.name,
        executor=executor,
        stages=len(plan.stages),
        ran=ran,
        skipped=skipped,
        results=str(layout.results / "results.csv"),
        report=str(report_path) if report_path else None,
    )
    print(f"\n{ran} stages run, {skipped} already done, in {record['seconds']:.0f} s")
    if ran:
        _print_where_and_how_long(plan, runs)
    return {**record, "table": table}


def _states_at_start(plan: Plan, from_stage: str | None) -> dict[str, str]:
    """Each stage's state (``--from`` forces its kind and every later one), and a count line."""
    forced = set(STAGES[STAGES.index(from_stage) :]) if from_stage else set()
    states = {s.name: ("forced" if s.kind in forced else s.state()) for s in plan.stages}
    states = rerun_readers(plan.stages, states)
    _warn_of_older_makings(plan, states)
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    print(
        f"experiment {plan.cfg.name!r} in {plan.out}/: {len(plan.stages)} stages "
        f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})"
    )
    return states


def _warn_of_older_makings(plan: Plan, states: dict[str, str]) -> None:
    """Finished stages whose outputs were made otherwise than their config now says.

    Since session 24 ``DPM++ 2M (Karras)`` and ``DDIM`` are A1111's samplers, not diffusers';
    since session 25 a LoRA shrinks its images as kohya does (OpenCV's INTER_AREA), not with
    PIL's BOX filter; since session 34 generated pixels are floored to 8 bits as A1111 floors
    them, not rounded as diffusers rounds them. Such a stage stays done under its key; stages
    still to run use the new way.
    """
    for stage in plan.stages:
        if states[stage.name] == "done" and (older := _older_making(stage)):
            logger.warning("%s: done, %s", stage.name, older)


def _older_making(stage) -> str | None:
    """How a finished stage's outputs were made, where its config now says otherwise."""
    said = [
        words(made, stage.info[key])
        for key, made_in, words in _OLDER_MAKINGS
        if key in stage.info and (made := made_in(stage.folder)) not in (None, stage.info[key])
    ]
    return "; and ".join(said) or None


def _older_sampler(made: str, wanted: str) -> str:
    return (
        f"with images from the sampler {display_name(made)!r}; its config's "
        f"{display_name(wanted)!r} is AUTOMATIC1111's since session 24, and generations still "
        "to run use that. For every variant's images from one sampler, run again with --from "
        "generate (all are made again)"
    )


def _older_rounding(made: str, wanted: str) -> str:
    return (
        f"with pixels rounded to 8 bits by {made!r}; its config's pixel_rounding is {wanted!r} "
        "(AUTOMATIC1111's floor is the default since session 34), which generations still to "
        "run use. For every variant's images rounded alike, run again with --from generate "
        "(all are made again)"
    )


def _older_resize(made: str, wanted: str) -> str:
    return (
        f"trained on images shrunk with {made!r}; its config's resize is {wanted!r} (kohya's, "
        "since session 25), which LoRAs still to train use. For LoRAs trained alike, run "
        f"again with --from lora (all are trained again), or set lora.settings.resize: {made}"
    )


#: (stage.info key, how a finished stage's folder says it was made, the words for an older one)
_OLDER_MAKINGS = (
    ("sampler", sampler_of_run, _older_sampler),
    ("pixel_rounding", rounding_of_run, _older_rounding),
    ("resize", resize_of_run, _older_resize),
)


def _print_where_and_how_long(plan: Plan, runs: list[StageRun]) -> None:
    """Which node ran what, the total work and its longest chain of stages."""
    seconds = stage_seconds(runs)
    chain, names = critical_path(plan.stages, seconds)
    print(node_summary(runs))
    print(
        f"  work {sum(seconds.values()):.0f} s; its longest chain {chain:.0f} s "
        f"({' -> '.join(names)}): the least time any number of workers can take"
    )


def _run_stages(
    plan: Plan, states: dict[str, str], executor: str, ray: RayOptions
) -> list[StageRun]:
    """Every stage that is not done, by the chosen executor; ``stages.csv`` records each."""
    if executor == "ray":
        runs = run_on_ray(plan.stages, plan.out, states, ray, plan.cfg.device)
    else:
        runs = run_locally(plan.stages, plan.out, states)
    write_stage_runs(ExperimentLayout(plan.out).stage_runs, runs)
    if any(r.state == "failed" for r in runs):
        raise FuloraError(failure_message(runs))
    return runs


def _write_inputs(plan: Plan, layout: ExperimentLayout) -> None:
    """The manifests the run read, as it read them (``data/``)."""
    for name, manifest in (("train", plan.train), ("lora_train", plan.lora_data)):
        if manifest is not None:
            manifest.write(layout.data / f"{name}.csv")
    for name, manifest in plan.targets.items():
        manifest.write(layout.target_manifest(name))


def _write_plan(plan: Plan, states: dict[str, str]) -> None:

    rows = [
        {
            "stage": s.name,
            "kind": s.kind,
            "state_at_start": states[s.name],
            "key": s.key,
            "folder": s.folder.relative_to(plan.out).as_posix(),
        }
        for s in plan.stages
    ]
    with atomic_open(ExperimentLayout(plan.out).plan, "w", newline="") as handle:
        pd.DataFrame(rows).to_csv(handle, index=False)
