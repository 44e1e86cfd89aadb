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

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fulora.audit.run import audit
from fulora.classify.registry import create_model
from fulora.classify.train import train_classifier
from fulora.config import require_device, to_dict
from fulora.data.manifest import Manifest
from fulora.data.readers import read_any
from fulora.errors import ConfigError, FuloraError
from fulora.evaluate.run import EvaluateConfig, check_test_labels, evaluate_model
from fulora.experiment.config import (
    DataSource,
    ExperimentConfig,
    audit_config,
    classify_config,
    generate_config,
    lora_configs,
    regime_parts,
    variant_parts,
)
from fulora.experiment.layout import ExperimentLayout
from fulora.experiment.ray_executor import EXECUTORS, RayOptions, check_ray, run_on_ray
from fulora.experiment.report import build_report
from fulora.experiment.results import reference_table, write_results
from fulora.experiment.stages import (
    STAGES,
    Stage,
    StageRun,
    critical_path,
    failure_message,
    node_summary,
    run_locally,
    stage_seconds,
    write_stage_runs,
)
from fulora.generate.run import generate
from fulora.io import atomic_open, file_hash
from fulora.lora.base import check_base
from fulora.lora.train import LORA_COLUMNS, train_lora
from fulora.planes import PLANES, check_planes
from fulora.runs import RunDir

logger = logging.getLogger("fulora")

# Settings that change where or how fast a stage runs, not what it produces.
_NOT_IN_KEY = {"device", "cache_dir", "num_workers", "base", "base_config", "lora", "progress"}


def stage_key(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config_payload(config: Any) -> dict[str, Any]:
    return {k: v for k, v in to_dict(config).items() if k not in _NOT_IN_KEY}


@dataclass
class Plan:
    """Everything resolved before any work: data, stage configs and the ordered stages."""

    cfg: ExperimentConfig
    out: Path
    classes: list[str]
    lora_data: Manifest | None
    train: Manifest
    targets: dict[str, Manifest]
    stages: list[Stage] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)  # one per evaluation


def _read_source(source: DataSource, key: str, cfg_source: str) -> Manifest:

    path = Path(source.path).expanduser()
    if not path.exists():
        raise ConfigError(f"{key!r} in {cfg_source}: {path} does not exist")
    try:
        manifest = read_any(path, images_dir=source.images_dir, on_missing=source.on_missing)
    except FuloraError as err:
        raise type(err)(f"{key!r} in {cfg_source}: {err}") from None
    if source.split is not None:
        manifest = manifest.select(split=source.split)
        if len(manifest) == 0:
            raise ConfigError(
                f"{key!r} in {cfg_source}: no rows of split {source.split!r} in {path}"
            )
    return manifest


def _read_sources(sources: list[DataSource], key: str, cfg_source: str) -> Manifest:
    if not sources:
        raise ConfigError(f"{key!r} in {cfg_source} is empty: name at least one folder or CSV")
    return Manifest.concat(
        [_read_source(s, f"{key}[{i}]", cfg_source) for i, s in enumerate(sources)]
    )


def plan_experiment(cfg: ExperimentConfig, out: str | Path) -> Plan:
    """Resolve and check an experiment before any work.

    Raises:
        ConfigError: An unknown key (named with its file), a missing path, an unknown
            architecture or plane, or weights that cannot be had.
        DataError: A manifest that cannot be read (named with its file and row).
    """
    out = Path(out)
    layout = ExperimentLayout(out)
    source = getattr(cfg, "_source", "the experiment config")
    if not cfg.classify.regimes:
        raise ConfigError(f"'classify.regimes' in {source} is empty: name at least one regime")
    if not cfg.classify.archs or not cfg.classify.seeds:
        raise ConfigError(f"'classify.archs' and 'classify.seeds' in {source} must not be empty")
    if not cfg.data.targets:
        raise ConfigError(f"'data.targets' in {source} is empty: name at least one cohort")
    regimes = {name: regime_parts(cfg, name) for name in cfg.classify.regimes}
    synthetic_needed = any(o.get("synthetic") for o, _ in regimes.values())
    audit_needed = synthetic_needed and (
        cfg.audit.enabled or any(o.get("filtered") for o, _ in regimes.values())
    )
    if cfg.audit.enabled is False and any(o.get("filtered") for o, _ in regimes.values()):
        raise ConfigError(f"'audit.enabled' in {source} is false but a regime is filtered")

    # Every config first: key errors come before any file is read.
    all_variants = list(cfg.lora.variants) if synthetic_needed else []
    released = {v: variant_parts(cfg, v) for v in all_variants}  # {} for a LoRA to train
    loras = lora_configs(cfg) if synthetic_needed else {}
    cache = Path(cfg.cache_dir) if cfg.cache_dir else layout.cache
    grid: list[tuple[str, str | None, str, int]] = []
    for regime, (options, _) in regimes.items():
        variants: list[str | None] = list(all_variants) if options.get("synthetic") else [None]
        for variant in variants:
            for arch in cfg.classify.archs:
                for seed in cfg.classify.seeds:
                    grid.append((regime, variant, arch, seed))
    classify_cfgs = {}
    for regime, variant, arch, seed in grid:
        ccfg = classify_config(cfg, regime, arch, seed)
        ccfg.cache_dir = str(cache)
        classify_cfgs[regime, variant, arch, seed] = ccfg
    gen_cfgs = {  # a released image set needs no generation
        v: generate_config(cfg, str(released[v].get("file") or layout.lora(v)))
        for v in all_variants
        if "images" not in released[v]
    }
    audit_config(cfg, "", str(cache))  # its keys are checked even when no regime needs it
    audit_classifier = _audit_classifier(cfg, grid, regimes, out) if audit_needed else None
    audit_cfg = (
        audit_config(cfg, str(audit_classifier[1]), str(cache)) if audit_classifier else None
    )

    # Then the data, the base model and the classifier weights.
    train = _read_sources(cfg.data.train, "data.train", source)
    present = set(train.labels)
    classes = (
        check_planes(cfg.data.planes) if cfg.data.planes else [p for p in PLANES if p in present]
    )
    regime_real = {
        name: _read_sources(options["real"], f"classify.regimes.{name}.real", source)
        for name, (options, _) in regimes.items()
        if "real" in options
    }
    targets = {}
    for name, src in cfg.data.targets.items():
        manifest = _read_source(src, f"data.targets.{name}", source)
        try:
            check_test_labels(manifest, classes)
        except FuloraError as err:
            raise type(err)(f"'data.targets.{name}' in {source}: {err}") from None
        targets[name] = manifest
    lora_data = None
    if loras or (synthetic_needed and cfg.data.lora):  # the audit compares with it too
        lora_data = _read_sources(cfg.data.lora, "data.lora", source)
    released_images = {
        v: _read_source(parts["images"], f"lora.variants.{v}.images", source).with_values(
            source="synthetic"  # whatever the layout: these images are not real
        )
        for v, parts in released.items()
        if "images" in parts
    }
    if gen_cfgs:
        try:
            check_base(cfg.base, cfg.base_config)
        except ConfigError as err:
            raise ConfigError(f"'base' in {source}: {err}") from None
        for variant, gcfg in gen_cfgs.items():
            missing = [p for p in classes if p not in gcfg.planes]
            if missing:
                logger.warning("generation with %s makes no images of %s", variant, missing)

    reference_table(cfg.compare)
    _check_classifier_weights(classify_cfgs.values(), classes, source)

    plan = Plan(cfg, out, classes, lora_data, train, targets)
    fingerprints: dict[tuple[int, tuple[str, ...] | None], str] = {}

    def fingerprint(manifest: Manifest, columns: tuple[str, ...] | None = None) -> str:
        """Once per manifest: a fingerprint hashes every image (stat + index lookup)."""
        key = (id(manifest), columns)
        if key not in fingerprints:
            fingerprints[key] = manifest.fingerprint(columns=columns)
        return fingerprints[key]

    lora_keys: dict[str, str] = {}
    gen_keys: dict[str, str] = {}
    for variant, lcfg in loras.items():
        folder = layout.lora(variant)
        assert lora_data is not None
        key = stage_key(
            {
                "config": _config_payload(lcfg),
                "data": fingerprint(lora_data, LORA_COLUMNS),
                "base": cfg.base,
            }
        )
        lora_keys[variant] = key
        plan.stages.append(
            Stage(
                "lora",
                f"lora/{variant}",
                folder,
                key,
                lambda d=lora_data, f=folder, c=lcfg: train_lora(d, f, c, resume="latest"),
                {"variant": variant},
            )
        )
    if (
        cfg.generate.shards > 1
        and gen_cfgs
        and any(g.batch_size is None for g in gen_cfgs.values())
    ):
        raise ConfigError(
            f"'generate.shards' in {source} needs generate.settings.batch_size: every shard "
            "must cut the same fixed batches for its images to equal a one-process run's"
        )
    for variant, parts in released.items():  # a released LoRA is keyed by its content
        if "file" in parts:
            lora_keys[variant] = "file:" + file_hash(parts["file"])
    for variant, manifest in released_images.items():
        gen_keys[variant] = "images:" + fingerprint(manifest)
    for variant, gcfg in gen_cfgs.items():
        folder = layout.synthetic(variant)
        key = stage_key(
            {"config": _config_payload(gcfg), "lora": lora_keys[variant], "base": cfg.base}
        )
        gen_keys[variant] = key
        plan.stages.append(
            Stage(
                "generate",
                f"generate/{variant}",
                folder,
                key,
                lambda f=folder, c=gcfg: generate(f, c),
                {"variant": variant},
                after=(f"lora/{variant}",) if variant in loras else (),
                shards=cfg.generate.shards,
                shard_action=lambda k, n, f=folder, c=gcfg: generate(f, c, shard=(k, n)),
            )
        )
    several = len(all_variants) > 1

    def synthetic_images(variant: str) -> Manifest:
        """A variant's synthetic set: released as is, or what its generation stage wrote."""
        if variant in released_images:
            return released_images[variant]
        return Manifest.read(layout.synthetic_manifest(variant))

    classify_stages: dict[tuple, Stage] = {}
    audit_keys: dict[str, str] = {}

    def add_classifier(regime, variant, arch, seed, ccfg) -> None:
        options = regimes[regime][0]
        real = regime_real.get(regime, train)
        filtered = bool(options.get("filtered"))
        label = regime + (f"@{variant}" if variant and several else "")
        folder = layout.classifier(label, arch, seed)
        upstream, after = None, ()
        if variant is not None:
            upstream = audit_keys[variant] if filtered else gen_keys[variant]
            after = (f"audit/{variant}",) if filtered else (f"generate/{variant}",)
        key = stage_key(
            {
                "config": _config_payload(ccfg),
                "real": fingerprint(real),
                "synthetic": upstream,
                "filtered": filtered,
                "classes": classes,
            }
        )

        def train_one(real=real, variant=variant, folder=folder, ccfg=ccfg, filtered=filtered):
            manifests = [real]
            if variant is not None and filtered:
                manifests.append(Manifest.read(layout.filtered(variant)))
            elif variant is not None:
                manifests.append(synthetic_images(variant))
            return train_classifier(manifests, folder, ccfg)

        info = {"regime": regime, "lora": variant, "arch": arch, "seed": seed, "label": label}
        name = f"classify/{label}/{arch}/seed-{seed}"
        stage = Stage("classify", name, folder, key, train_one, info, after=after)
        classify_stages[regime, variant, arch, seed] = stage
        plan.stages.append(stage)

    # Real-only classifiers first: the audit labels synthetic images with one of them.
    for cell, ccfg in classify_cfgs.items():
        if cell[1] is None:
            add_classifier(*cell, ccfg)
    if audit_cfg is not None and audit_classifier is not None:
        cell, clf_folder = audit_classifier
        clf_key = classify_stages[cell].key if cell in classify_stages else str(clf_folder)
        for variant in all_variants:
            folder = layout.audit(variant)
            key = stage_key(
                {
                    # the classifier by its key, not its path: a moved experiment stays done
                    "config": {**_config_payload(audit_cfg), "classifier": None},
                    "synthetic": gen_keys[variant],
                    "classifier": clf_key,
                    "reference": fingerprint(train),
                    "train_set": fingerprint(lora_data) if lora_data is not None else None,
                }
            )
            audit_keys[variant] = key

            def run_audit(variant=variant, folder=folder):
                return audit(
                    synthetic_images(variant),
                    train,
                    folder,
                    audit_cfg,
                    train_set=lora_data,
                    write_filtered=layout.filtered(variant),
                )

            clf_name = classify_stages[cell].name if cell in classify_stages else ""
            after = (f"generate/{variant}", clf_name)
            plan.stages.append(
                Stage(
                    "audit", f"audit/{variant}", folder, key, run_audit, {"variant": variant}, after
                )
            )
    for cell, ccfg in classify_cfgs.items():
        if cell[1] is not None:
            add_classifier(*cell, ccfg)
    eval_cfg = EvaluateConfig(
        batch_size=cfg.evaluate.batch_size,
        n_bootstrap=cfg.evaluate.n_bootstrap,
        device=cfg.device,
        cache_dir=str(cache),
    )
    for target, manifest in targets.items():
        for clf in classify_stages.values():
            folder = layout.evaluation(target, clf.folder)
            key = stage_key(
                {
                    "classifier": clf.key,
                    "target": fingerprint(manifest),
                    "n_bootstrap": cfg.evaluate.n_bootstrap,
                }
            )
            info = {**clf.info, "target": target, "classifier": str(clf.folder)}
            plan.stages.append(
                Stage(
                    "evaluate",
                    f"evaluate/{target}/{clf.name.removeprefix('classify/')}",
                    folder,
                    key,
                    lambda c=clf.folder, m=manifest, f=folder: evaluate_model(c, m, f, eval_cfg),
                    info,
                    after=(clf.name,),
                )
            )
            plan.cells.append({**info, "folder": str(folder)})
    names = {stage.name for stage in plan.stages}  # released LoRAs and image sets have no stage
    for stage in plan.stages:
        stage.after = tuple(name for name in stage.after if name in names)
    return plan


def _check_classifier_weights(classify_cfgs, classes: list[str], source: str) -> None:
    """Fill in the classes and build each distinct classifier once (missing weights fail here)."""
    checked = set()
    for ccfg in classify_cfgs:
        if ccfg.classes is None:
            ccfg.classes = list(classes)
        weights = (ccfg.arch, ccfg.pretrained, ccfg.weights, ccfg.imagenet_weights)
        if weights in checked:
            continue
        checked.add(weights)
        try:
            create_model(
                ccfg.arch,
                len(classes),
                pretrained=ccfg.pretrained,
                weights=ccfg.weights,
                imagenet=ccfg.imagenet_weights,
                log=False,
            )
        except ConfigError as err:
            raise ConfigError(
                f"'classify.archs' in {source}: {err} (in an experiment: "
                "classify.settings.weights or classify.settings.pretrained=false)"
            ) from None


def _audit_classifier(cfg, grid, regimes, out) -> tuple[tuple | None, Path]:
    """(grid cell or None, run folder) of the classifier that labels synthetic images."""
    source = getattr(cfg, "_source", "the experiment config")
    wanted = cfg.audit.classifier
    real_cells = [c for c in grid if not regimes[c[0]][0].get("synthetic")]

    def folder(cell) -> Path:
        return ExperimentLayout(out).classifier(cell[0], cell[2], cell[3])

    if wanted is None:
        if not real_cells:
            raise ConfigError(
                f"the audit in {source} needs a classifier trained on real images: add a "
                "real-only regime (e.g. ES: {}) or set audit.classifier to a classifier run folder"
            )
        return real_cells[0], folder(real_cells[0])
    for cell in real_cells:
        if wanted == f"{cell[0]}/{cell[2]}/seed-{cell[3]}":
            return cell, folder(cell)
    path = Path(wanted).expanduser()
    if (path / "best.pt").is_file():
        return None, path
    names = ", ".join(f"{c[0]}/{c[2]}/seed-{c[3]}" for c in real_cells) or "none"
    raise ConfigError(
        f"'audit.classifier' in {source}: {wanted!r} is neither a real-only cell ({names}) "
        "nor a classifier run folder"
    )


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
        table = write_results(plan)
        report_path = None
        if cfg.report.enabled:
            print("[report] building the HTML report")
            report_path = build_report(out)
    finally:
        run.close()
    ran = sum(r.state == "ran" for r in runs if "(shard" not in r.stage)
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
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    print(
        f"experiment {plan.cfg.name!r} in {plan.out}/: {len(plan.stages)} stages "
        f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})"
    )
    return states


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
