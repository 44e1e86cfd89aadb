"""``fulora experiment run --executor ray``: the stage graph as Ray tasks, over every GPU a lab has.

The runner plans the same stages, with the same keys, as for the local executor; here each stage
becomes a Ray task once the stages it reads from are done, so that the five backbones, the seeds
and the regimes train side by side and an experiment takes the time of its longest chain rather
than the sum of its stages. Ray does the scheduling (resources per task, retries when a worker
dies, placement over nodes); fulora only says what each stage needs and in which order.

- Resources come from the stage's kind: LoRA, generation (and each of its shards), classifier
  training and the audit take one GPU when the experiment runs on CUDA; an evaluation takes a
  quarter of one (it runs on the configured device, and Ray hides the GPUs from a task that asks
  for none); on the CPU every task takes one CPU.
- A stage starts the way the local executor starts it (:func:`~fulora.experiment.stages.
  begin_stage`), so skip, resume, supersede and ``--from`` mean the same for both, and a stage
  done by either is done for both.
- A task whose worker dies (killed, out of memory, node lost) is retried ``retries`` times and
  resumes from the stage's saved work; a stage that fails on its own is not retried: it is reported
  with its log file while every stage that does not need it runs to the end.
- Ctrl-C cancels every task; since each stage writes atomically and resumes, the next run goes on
  from what was finished.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fulora.errors import ConfigError
from fulora.experiment.layout import STAGE_MARKER
from fulora.experiment.stages import (
    Stage,
    StageRun,
    execute_stage,
    node_name,
    shard_name,
    supersede_outdated,
)
from fulora.runs import LOG_NAME

logger = logging.getLogger("fulora")

#: The executors ``fulora experiment run --executor`` takes.
EXECUTORS = ("local", "ray")

#: GPUs a task of each kind asks for when the experiment runs on CUDA (others: none).
GPUS_PER_TASK = {
    "lora": 1.0,
    "generate": 1.0,
    "classify": 1.0,
    "audit": 1.0,
    "evaluate": 0.25,
    "embedding": 0.25,
}

_INSTALL_HINT = "--executor ray needs Ray: pip install 'fulora[ray]' (or pip install ray)"


@dataclass
class RayOptions:
    """Where and how the Ray executor runs."""

    address: str | None = None  # None: start a local instance; auto, HOST:PORT, ray://HOST:PORT
    retries: int = 2  # per task, when its worker dies; a stage that raises is not retried
    # CPUs (and torch threads) per task. On the CPU, results depend on the thread count (float
    # summation order): as many as the local executor uses (all cores) reproduce its numbers.
    cpus_per_task: int = 1
    num_cpus: int | None = None  # a local instance's CPUs (default: all of this machine's)
    num_gpus: int | None = None  # a local instance's GPUs (default: all of this machine's)


def check_ray(device: str, options: RayOptions) -> None:
    """Fail before any work if Ray is missing or the device cannot be shared out by Ray.

    Raises:
        ConfigError: Ray is not installed, ``device`` names one GPU (``cuda:N``), or the
            options are out of range.
    """
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(_INSTALL_HINT)
    if options.retries < 0:
        raise ConfigError(f"--retries {options.retries}: expected 0 or more")
    if options.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {options.cpus_per_task}: expected 1 or more")
    if device.startswith("cuda:"):
        raise ConfigError(
            f"device {device!r} with --executor ray: set device: cuda (or auto); Ray gives each "
            "task its own GPU"
        )


@dataclass
class _Unit:
    """A Ray task: a stage, or one shard of a generation stage."""

    stage: Stage
    shard: tuple[int, int] | None = None
    needs: set[str] = field(default_factory=set)  # names of the units it waits for
    submitted: float = 0.0

    @property
    def name(self) -> str:
        """The stage's name, with the shard for a shard (as :func:`execute_stage` reports it)."""
        return shard_name(self.stage.name, self.shard)


def run_on_ray(
    stages: list[Stage],
    out: Path,
    states: dict[str, str],
    options: RayOptions,
    device: str = "auto",
) -> list[StageRun]:
    """Run every stage that is not done as a Ray task, each once the stages it reads are done.

    Args:
        stages: The plan's stages (:func:`fulora.experiment.runner.plan_experiment`).
        out: The experiment folder: on storage every Ray node sees.
        states: Each stage's state at the start (``done`` stages are skipped).
        options: Where Ray runs and how often a task whose worker died is retried.
        device: The experiment's device: what resources the tasks ask for.

    Returns:
        Each stage's outcome: ``ran``, ``skipped``, ``failed`` (with its error and log) or
        ``blocked`` (it needs a failed stage).

    Raises:
        ConfigError: The experiment folder is not visible from every node, or the config asks
            for CUDA on a cluster without GPUs.
        KeyboardInterrupt: After cancelling every task.
    """
    import ray

    started_here = _connect(ray, options)
    try:
        check_shared_storage(ray, out)
        gpu = _uses_gpus(ray, device)
        units = _units(stages, out, states)
        runs = [StageRun(s.name, s.kind, "skipped") for s in stages if states[s.name] == "done"]
        resources = ray.cluster_resources()
        print(
            f"[ray] {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs: {len(units)} tasks, "
            f"{'one GPU' if gpu else f'{options.cpus_per_task} CPU(s)'} per training task"
        )
        return runs + _schedule(ray, units, options, gpu)
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray: Any, options: RayOptions) -> bool:
    """Join the cluster at ``options.address`` or start a local instance; True if started here."""
    if ray.is_initialized():
        return False
    # a task's output goes to its stage's log.txt (execute_stage), not the driver's terminal
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


def _read_probe(path: str) -> tuple[str, str | None]:
    """(node, the probe file's text or None): run on each node by :func:`check_shared_storage`."""
    try:
        return node_name(), Path(path).read_text(encoding="utf-8")
    except OSError:
        return node_name(), None


def check_shared_storage(ray: Any, out: Path) -> None:
    """Check that a file the driver writes in ``out`` is read by a task on every node.

    Raises:
        ConfigError: Naming the nodes that do not see the experiment folder.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = out / f".storage-check-{token}"
    probe.write_text(token, encoding="utf-8")
    try:
        read = ray.remote(num_cpus=0)(_read_probe)
        refs = [
            read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(probe.resolve()))
            for node in ray.nodes()
            if node.get("Alive")
        ]
        seen = ray.get(refs, timeout=300)
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(node for node, text in seen if text != token)
    if blind:
        raise ConfigError(
            f"the experiment folder {out.resolve()} is not visible from Ray node(s) "
            f"{', '.join(blind)}: put --out on storage that every node mounts at the same path "
            "(NFS, Lustre, ...) and run the same command again"
        )


def _uses_gpus(ray: Any, device: str) -> bool:
    """Whether training tasks ask for a GPU: ``cuda``, or ``auto`` on a cluster with GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise ConfigError(
            "device: cuda, but the Ray cluster has no GPU: join nodes with GPUs to it, or "
            "set device: cpu"
        )
    return device == "cuda" or (device == "auto" and gpus > 0)


def _units(stages: list[Stage], out: Path, states: dict[str, str]) -> list[_Unit]:
    """The tasks to run, with what each waits for; outdated folders are superseded first."""
    todo = {s.name for s in stages if states[s.name] != "done"}
    units = []
    for stage in stages:
        if stage.name not in todo:
            continue
        supersede_outdated(out, stage, states[stage.name])
        needs = {name for name in stage.after if name in todo}
        shards = []
        if stage.shards > 1 and stage.shard_action is not None:
            shards = [_Unit(stage, (k, stage.shards), set(needs)) for k in range(stage.shards)]
        units += shards
        # a sharded stage's own task finds every image made and writes its manifest
        units.append(_Unit(stage, None, needs | {u.name for u in shards}))
    return units


def _schedule(ray: Any, units: list[_Unit], options: RayOptions, gpu: bool) -> list[StageRun]:
    """Submit each unit once what it needs is done; collect outcomes; cancel all on Ctrl-C."""
    retries, cpus = options.retries, options.cpus_per_task
    task = ray.remote(max_retries=retries, retry_exceptions=False)(execute_stage)
    waiting = {u.name: u for u in units}
    running: dict[Any, _Unit] = {}
    finished: set[str] = set()
    runs: list[StageRun] = []
    bar = tqdm(total=len(units), desc="stages", unit="stage", dynamic_ncols=True)
    shown = ""
    try:
        while waiting or running:
            runs += _block_dependents(waiting, runs)
            for unit in [u for u in waiting.values() if u.needs <= finished]:
                del waiting[unit.name]
                gpus = GPUS_PER_TASK.get(unit.stage.kind, 0) if gpu else 0
                ref = task.options(name=unit.name, num_cpus=cpus, num_gpus=gpus).remote(
                    unit.stage, unit.shard, cpus
                )
                unit.submitted = time.time()
                running[ref] = unit
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                unit = running.pop(ref)
                outcome = _outcome(ray, ref, unit, retries)
                runs.append(outcome)
                if outcome.state == "ran":
                    finished.add(unit.name)
                else:
                    tqdm.write(f"[ray] {outcome.stage} failed: {outcome.error} (log {outcome.log})")
                bar.update(1)
            now = _running_names(running.values())
            if now != shown:  # a log file gets changes only
                shown = now
                bar.set_postfix_str(shown, refresh=True)
    except KeyboardInterrupt:
        bar.close()
        _cancel(ray, list(running))
        print(f"\n[ray] cancelled {len(running)} running task(s); run again to resume")
        raise
    bar.close()
    return runs + _block_dependents(waiting, runs, everything=True)


def _cancel(ray: Any, refs: list[Any], grace_s: float = 15.0) -> None:
    """Interrupt every task (each cleans up as after Ctrl-C), then kill what is still running."""
    if not refs:
        return
    for ref in refs:
        ray.cancel(ref)
    _, stuck = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    for ref in stuck:
        ray.cancel(ref, force=True)


def _block_dependents(
    waiting: dict[str, _Unit], runs: list[StageRun], everything: bool = False
) -> list[StageRun]:
    """Take the units that need a failed or blocked one out of ``waiting``, as ``blocked``.

    With ``everything``, all units still waiting are taken (the scheduler ran out of work).
    """
    bad = {r.stage for r in runs if r.state in ("failed", "blocked")}
    blocked = []
    changed = True
    while changed:
        changed = False
        for name, unit in list(waiting.items()):
            if everything or unit.needs & bad:
                del waiting[name]
                bad.add(name)
                blocked.append(StageRun(name, unit.stage.kind, "blocked", log=_log(unit)))
                changed = True
    return blocked


def _outcome(ray: Any, ref: Any, unit: _Unit, retries: int) -> StageRun:
    """The unit's :class:`StageRun`; a failure says whether the stage raised or its worker died."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:  # the stage itself raised: not retried
        cause = getattr(err, "cause", None) or err
        lines = str(cause).strip().splitlines()
        error = f"{type(cause).__name__}: {lines[-1] if lines else ''}"
    except ray.exceptions.RayError as err:  # the worker or its node died, every retry
        error = f"{type(err).__name__} after {retries + 1} attempt(s): {str(err).splitlines()[0]}"
    return StageRun(unit.name, unit.stage.kind, "failed", log=_log(unit), error=error)


def _log(unit: _Unit) -> str:
    return str(unit.stage.folder / LOG_NAME)


def _running_names(units: Any, shown: int = 3) -> str:
    """The submitted units that have started (their stage marker is newer than the submission)."""
    units = list(units)
    started = []
    for unit in units:
        try:
            if (unit.stage.folder / STAGE_MARKER).stat().st_mtime >= unit.submitted - 1:
                started.append(unit.name)
        except OSError:
            pass
    text = ", ".join(started[:shown]) + (
        f" +{len(started) - shown}" if len(started) > shown else ""
    )
    queued = len(units) - len(started)
    return f"running: {text or '-'}" + (f"; {queued} queued" if queued else "")
