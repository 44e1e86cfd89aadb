"""Pass 1 of planning an experiment: every stage config resolved from the experiment file.

Apart from the planner, which imports every stage's code (torch, diffusers, scikit-learn), so
that ``fulora experiment run`` refuses a bad stage setting before those load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fulora.audit.config import AuditConfig
from fulora.classify.config import ClassifyConfig
from fulora.errors import ConfigError
from fulora.experiment.config import (
    ExperimentConfig,
    audit_config,
    classify_config,
    generate_config,
    lora_configs,
    regime_baselines,
    regime_parts,
    variant_parts,
)
from fulora.experiment.layout import ExperimentLayout
from fulora.generate.config import GenerateConfig
from fulora.lora.config import LoraTrainConfig

Cell = tuple[str, str | None, str, int]  # (regime, LoRA variant or None, arch, seed)


@dataclass
class StageConfigs:
    """Pass 1: every stage config, resolved from the experiment file."""

    source: str  # the experiment file, for messages
    cache: Path
    synthetic: bool  # some regime adds synthetic images
    regimes: dict[str, tuple[dict[str, Any], Any]]
    variants: list[str]  # LoRA variants, when a regime uses synthetic images
    released: dict[str, dict[str, Any]]  # variant -> {} (trained), {"file"} or {"images"}
    loras: dict[str, LoraTrainConfig]
    generation: dict[str, GenerateConfig]  # a released image set needs none
    classifiers: dict[Cell, ClassifyConfig]
    audit_classifiers: list[tuple[Cell | None, Path]]  # the audit's labellers (none: no audit)
    audit: AuditConfig | None


def _check_grid(cfg: ExperimentConfig, source: str) -> None:
    if not cfg.classify.regimes:
        raise ConfigError(f"'classify.regimes' in {source} is empty: name at least one regime")
    if not cfg.classify.archs or not cfg.classify.seeds:
        raise ConfigError(f"'classify.archs' and 'classify.seeds' in {source} must not be empty")
    if not cfg.data.targets:
        raise ConfigError(f"'data.targets' in {source} is empty: name at least one cohort")


def resolve_configs(cfg: ExperimentConfig, out: Path) -> StageConfigs:
    """Every stage config of ``cfg`` for the experiment folder ``out``; reads no data.

    Raises:
        ConfigError: A bad key or value, named with its dotted path and file.
    """
    source = getattr(cfg, "_source", "the experiment config")
    _check_grid(cfg, source)
    regimes = {name: regime_parts(cfg, name) for name in cfg.classify.regimes}
    regime_baselines(cfg)  # a baseline that cannot be compared is refused now, not at the end
    filtered = any(o.get("filtered") for o, _ in regimes.values())
    synthetic = any(o.get("synthetic") for o, _ in regimes.values())
    if cfg.audit.enabled is False and filtered:
        raise ConfigError(f"'audit.enabled' in {source} is false but a regime is filtered")
    layout = ExperimentLayout(out)
    variants = list(cfg.lora.variants) if synthetic else []
    released = {v: variant_parts(cfg, v) for v in variants}  # {} for a LoRA to train
    cache = Path(cfg.cache_dir) if cfg.cache_dir else layout.cache
    grid = [
        (regime, variant, arch, seed)
        for regime, (options, _) in regimes.items()
        for variant in (variants if options.get("synthetic") else [None])
        for arch in cfg.classify.archs
        for seed in cfg.classify.seeds
    ]
    classifiers = {}
    for cell in grid:
        classifiers[cell] = classify_config(cfg, cell[0], cell[2], cell[3])
        classifiers[cell].cache_dir = str(cache)
    generation = {
        v: generate_config(cfg, str(released[v].get("file") or layout.lora(v)))
        for v in variants
        if "images" not in released[v]
    }
    _check_shards(cfg, generation, source)
    loras = lora_configs(cfg) if synthetic else {}
    for variant, gcfg in generation.items():  # a prompt's <lora:...>, before the LoRA trains
        if variant in loras:  # kohya's file and its ss_output_name: output_name
            _check_lora_tags(gcfg, loras[variant].output_name, variant, source)
    audit_config(cfg, [], str(cache))  # its keys are checked even when no regime needs it
    wanted = synthetic and (cfg.audit.enabled or filtered)
    chosen = _audit_classifier(cfg, grid, regimes, out) if wanted else []
    return StageConfigs(
        source=source,
        cache=cache,
        synthetic=synthetic,
        regimes=regimes,
        variants=variants,
        released=released,
        loras=loras,
        generation=generation,
        classifiers=classifiers,
        audit_classifiers=chosen,
        audit=audit_config(cfg, [str(path) for _, path in chosen], str(cache)) if chosen else None,
    )


def _check_lora_tags(gcfg: GenerateConfig, output_name: str, variant: str, source: str) -> None:
    prompts = {plane: gcfg.as_read(gcfg.prompts.get(plane, "")) for plane in gcfg.planes}
    try:
        gcfg.lora_weights(prompts, (output_name,))
    except ConfigError as err:
        raise ConfigError(
            f"generate.settings in {source}, for the LoRA of variant {variant!r} (its "
            f"output_name {output_name!r}): {err}"
        ) from None


def _check_shards(cfg: ExperimentConfig, generation: dict, source: str) -> None:
    if cfg.generate.shards > 1 and any(g.batch_size is None for g in generation.values()):
        raise ConfigError(
            f"'generate.shards' in {source} needs generate.settings.batch_size: every shard "
            "must cut the same fixed batches for its images to equal a one-process run's"
        )


def _audit_classifier(cfg, grid, regimes, out) -> list[tuple[Cell | None, Path]]:
    """The (grid cell or None, run folder) of each classifier that labels synthetic images.

    ``audit.classifier`` unset or ``REGIME/ARCH``: every seed of that real-only classifier (the
    first real-only regime and arch by default), whose probabilities the audit averages;
    ``REGIME/ARCH/seed-N`` or a run folder: that one.
    """
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
        wanted = f"{real_cells[0][0]}/{real_cells[0][2]}"
    seeds = [c for c in real_cells if wanted == f"{c[0]}/{c[2]}"]
    seeds += [c for c in real_cells if wanted == f"{c[0]}/{c[2]}/seed-{c[3]}"]
    if seeds:
        return [(cell, folder(cell)) for cell in seeds]
    path = Path(wanted).expanduser()
    if (path / "best.pt").is_file():
        return [(None, path)]
    names = ", ".join(f"{c[0]}/{c[2]}/seed-{c[3]}" for c in real_cells) or "none"
    raise ConfigError(
        f"'audit.classifier' in {source}: {wanted!r} is neither a real-only classifier "
        f"(REGIME/ARCH for all its seeds, or one of {names}) nor a classifier run folder"
    )
