"""The experiment configuration: one YAML file for the whole FU-LoRA protocol.

An experiment file names its data (LoRA images, real training images, target cohorts), the
LoRA variants, the generation settings, the classifier grid (regimes x architectures x seeds)
and the evaluation. Stage sections hold the keys of the stage configs (``LoraTrainConfig``,
``GenerateConfig``, ``ClassifyConfig``), so everything a stage accepts on its own is accepted
here, and an unknown key is reported with its dotted path and the file.

``${name}`` in any string is replaced by ``variables[name]`` (or the environment variable of
that name; ``${config_dir}`` is the folder of the experiment file; a value that is only an
empty variable becomes null), so machine-specific paths
stay out of the protocol: ``fulora experiment run configs/fu-lora-paper.yaml --set
variables.fetal_planes_db=/data/FETAL_PLANES_DB``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fulora.audit.config import AuditConfig
from fulora.classify.config import ClassifyConfig, describe_protocol
from fulora.config import (
    AT_LEAST_0,
    AT_LEAST_1,
    SEED,
    Checked,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from fulora.errors import ConfigError
from fulora.evaluate.config import EvaluateSettings
from fulora.generate.config import GenerateConfig
from fulora.lora.config import DEFAULT_BASE, LoraTrainConfig

#: Regime keys that are not ClassifyConfig keys.
REGIME_KEYS = ("synthetic", "filtered", "real", "baseline")
#: LoRA variant keys that are not LoraTrainConfig keys: a released LoRA file (no training) or
#: a released synthetic image set (neither training nor generation), e.g. the paper's own.
VARIANT_KEYS = ("file", "images")


@dataclass
class DataSource(Checked):
    """Images read with :func:`fulora.data.readers.read_any` (a folder, CSV or manifest)."""

    path: str
    images_dir: str | None = None  # where a CSV's image files are, when not beside it
    split: str | None = None  # keep only rows of this split (e.g. the African ``test``)
    on_missing: Literal["error", "skip"] = "error"


@dataclass
class DataConfig(Checked):
    """The experiment's images."""

    lora: list[DataSource] = field(default_factory=list)  # LoRA fine-tuning images
    train: list[DataSource] = field(default_factory=list)  # real source-domain images
    targets: dict[str, DataSource] = field(default_factory=dict)  # unseen cohorts to test on
    planes: list[str] | None = None  # classes; default: the planes of the training images

    def check(self) -> None:
        """``planes``: two planes or more, each once."""
        self.check_classes_of("planes")


@dataclass
class LoraStage(Checked):
    """LoRA fine-tuning: shared settings plus named variants (e.g. ranks 8, 32, 128)."""

    recipe: str | None = None  # a `fulora lora train` YAML (e.g. configs/lora-paper.yaml)
    settings: dict[str, Any] = field(default_factory=dict)
    # name -> LoraTrainConfig keys; or {file: LORA.safetensors} to generate with a released
    # LoRA, or {images: {path: ..., images_dir: ...}} to use a released synthetic set as is
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"lora": {}})


@dataclass
class GenerateStage(Checked):
    """Generation with each LoRA variant (``base`` and ``lora`` are filled in)."""

    RANGES = {"shards": AT_LEAST_1}

    settings: dict[str, Any] = field(default_factory=dict)
    # --executor ray: split each variant's images into this many tasks (one GPU each); the
    # images equal a one-process run's. The local executor runs them in one process.
    shards: int = 1


@dataclass
class ClassifyStage(Checked):
    """The classifier grid: regimes x LoRA variants (synthetic regimes) x archs x seeds."""

    RANGES = {"seeds": SEED}

    recipe: str | None = None  # a `fulora classify train` YAML (e.g. configs/classify-paper.yaml)
    settings: dict[str, Any] = field(default_factory=dict)
    archs: list[str] = field(default_factory=lambda: ["resnet18"])
    seeds: list[int] = field(default_factory=lambda: [0])
    # name -> {synthetic: bool, filtered: bool, real: [sources], baseline: another regime
    # (results/effects.csv: the difference from it), ...ClassifyConfig keys}
    regimes: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"ES": {}, "HB": {"synthetic": True}}
    )

    def check(self) -> None:
        """Each seed once (a seed twice was one run, reported as the mean of two)."""
        self.check_once("seeds")


@dataclass
class EvaluateStage(EvaluateSettings):
    """Zero-shot evaluation of every classifier on every target cohort (``evaluate:``).

    Its keys are :class:`~fulora.evaluate.run.EvaluateSettings`'s; the experiment's ``device``
    and cache complete them into each evaluation's ``EvaluateConfig``.
    """


@dataclass
class AuditStage(Checked):
    """The synthetic-data audit of each LoRA variant (needed by ``filtered`` regimes)."""

    enabled: bool | None = None  # None: only when a regime is filtered; true: always
    # Who labels the synthetic images: "REGIME/ARCH" (every seed of a real-only classifier,
    # probabilities averaged; default: the first real-only regime and arch), "REGIME/ARCH/
    # seed-N" (that seed alone, fulora's filter before session 23), or a classifier run folder.
    classifier: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # AuditConfig keys


@dataclass
class ReportStage(Checked):
    """The HTML report (the experiment's last stage)."""

    RANGES = {"grid_per_plane": AT_LEAST_0, "embedding_per_group": AT_LEAST_1}

    enabled: bool = True
    grid_per_plane: int = 6  # real and synthetic images shown per plane
    embedding: bool = True  # t-SNE of classifier embeddings per plane
    embedding_per_group: int = 120  # images per plane and source in the t-SNE
    embedding_model: str | None = None  # "REGIME/ARCH/seed-N"; default the first hybrid one


@dataclass
class ExperimentConfig(Checked):
    """``fulora experiment run`` configuration."""

    name: str = "experiment"
    description: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    base: str = DEFAULT_BASE  # Stable Diffusion model for the LoRA and generation
    base_config: str | None = None
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    cache_dir: str | None = None  # preprocessing cache; default OUT/cache
    compare: str | None = None  # "paper" (the FU-LoRA table) or a CSV in its format
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraStage = field(default_factory=LoraStage)
    generate: GenerateStage = field(default_factory=GenerateStage)
    classify: ClassifyStage = field(default_factory=ClassifyStage)
    audit: AuditStage = field(default_factory=AuditStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    report: ReportStage = field(default_factory=ReportStage)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(node: Any, variables: dict[str, str], source: str, key: str = "") -> Any:
    if isinstance(node, dict):
        return {
            k: _substitute(v, variables, source, f"{key}.{k}" if key else str(k))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, variables, source, f"{key}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name in variables:
            return str(variables[name])
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(
            f"{key!r} in {source} uses ${{{name}}}, which is not set: add it under 'variables' "
            f"or pass --set variables.{name}=VALUE"
        )

    whole = _VARIABLE.fullmatch(node)
    value = _VARIABLE.sub(replace, node)
    return None if whole and value == "" else value  # "${x}" with x empty means "not set"


def _sources(node: Any) -> Any:
    """Let a data source be written as a bare path."""
    if isinstance(node, str):
        return {"path": node}
    if isinstance(node, list):
        return [_sources(v) for v in node]
    return node


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("lora", "train"):
            if key in section:
                value = section[key]
                section[key] = _sources(value if isinstance(value, list) else [value])
        if isinstance(section.get("targets"), dict):
            section["targets"] = {k: _sources(v) for k, v in section["targets"].items()}
    regimes = (data.get("classify") or {}).get("regimes")
    if isinstance(regimes, dict):
        for regime in regimes.values():
            if isinstance(regime, dict) and "real" in regime:
                value = regime["real"]
                regime["real"] = _sources(value if isinstance(value, list) else [value])
    return data


def read_recipe(path: str | Path, relative_to: Path | None) -> tuple[dict[str, Any], str]:
    """A stage recipe YAML (path relative to the experiment file first); (keys, file name).

    A recipe's ``device`` is dropped: an experiment runs every stage on its own ``device``.
    """
    candidate = Path(path).expanduser()
    if (
        not candidate.is_absolute()
        and relative_to is not None
        and (relative_to / candidate).is_file()
    ):
        candidate = relative_to / candidate
    recipe = read_yaml_mapping(candidate, "recipe")
    recipe.pop("device", None)
    return recipe, str(candidate)


def load_experiment(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Load an experiment file, apply ``key=value`` overrides, substitute variables, check keys.

    Args:
        path: The experiment YAML (None: defaults and ``values`` only).
        overrides: ``section.key=value`` strings (``--set``).
        values: An already-built mapping merged over the file (used by ``fulora demo``).

    Returns:
        The experiment config; the stage sections' keys are checked when it is planned
        (:func:`fulora.experiment.planner.plan_experiment`, before any work).

    Raises:
        ConfigError: Naming the key and the file.
    """
    data: dict[str, Any] = {}
    source = "command line"
    config_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        source = str(path)
        config_dir = path.resolve().parent
        data = read_yaml_mapping(path, "experiment file")
    data.update(copy.deepcopy(values or {}))
    apply_overrides(data, overrides)
    variables = {"config_dir": str(config_dir), **(data.get("variables") or {})}
    data = _substitute(_normalise(data), {k: str(v) for k, v in variables.items()}, source)
    cfg = from_dict(ExperimentConfig, data, source=source)
    cfg._source = source  # type: ignore[attr-defined]  # for messages of later checks
    cfg._config_dir = config_dir  # type: ignore[attr-defined]
    return cfg


def _stage_config(cls: type, layers: list[tuple[dict[str, Any], str, str]]) -> Any:
    """Merge key layers (mapping, file, key prefix) into one stage config, naming bad keys.

    A layer with a prefix is a section of the experiment file, where ``device`` is refused:
    the runner checks the top-level device, and the Ray executor gives tasks GPUs by it.
    """
    merged: dict[str, Any] = {}
    for mapping, source, prefix in layers:
        if not isinstance(mapping, dict):
            raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source}: expected a mapping")
        if prefix and "device" in mapping:
            raise ConfigError(
                f"'{prefix}device' in {source}: an experiment runs every stage on its top-level "
                "'device'; remove this one and set device at the top of the file (or --set "
                "device=...)"
            )
        from_dict(cls, mapping, source=source, prefix=prefix)  # errors name this layer
        merged.update(mapping)
    return from_dict(cls, merged, source=layers[-1][1])


def lora_configs(cfg: ExperimentConfig) -> dict[str, LoraTrainConfig]:
    """The resolved LoRA config of every variant."""
    source = cfg._source  # type: ignore[attr-defined]
    layers: list[tuple[dict[str, Any], str, str]] = [
        ({"base": cfg.base, "base_config": cfg.base_config, "device": cfg.device}, source, "")
    ]
    if cfg.lora.recipe:
        recipe, recipe_source = read_recipe(cfg.lora.recipe, cfg._config_dir)  # type: ignore[attr-defined]
        recipe.pop("base", None)  # the experiment's base model wins over a recipe's
        recipe.pop("base_config", None)
        layers.append((recipe, recipe_source, ""))
    layers.append((cfg.lora.settings, source, "lora.settings."))
    if not cfg.lora.variants:
        raise ConfigError(f"'lora.variants' in {source} is empty; name at least one variant")
    return {
        name: _stage_config(
            LoraTrainConfig, [*layers, (variant or {}, source, f"lora.variants.{name}.")]
        )
        for name, variant in cfg.lora.variants.items()
        if not variant_parts(cfg, name)
    }


def lora_replicates(cfg: ExperimentConfig) -> list[list[str]]:
    """Groups of two or more LoRA variants to train that differ only by ``seed``.

    Each is one recipe trained several times: the effects table pools them
    (:func:`~fulora.experiment.effects.pooled_difference_ci`), so that its interval holds how
    much another LoRA run and its images would differ. Read from the config; no data.
    """
    groups: dict[str, dict[int, str]] = {}
    for name, lora in lora_configs(cfg).items():
        recipe = {k: v for k, v in to_dict(lora).items() if k != "seed"}
        # a second variant with the same seed is the same run again, not another draw
        groups.setdefault(repr(sorted(recipe.items())), {}).setdefault(lora.seed, name)
    return [list(by_seed.values()) for by_seed in groups.values() if len(by_seed) > 1]


def variant_parts(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """The released artifact a LoRA variant stands for, if any.

    Returns:
        ``{}`` (a LoRA to train), ``{"file": Path}`` (a released LoRA to generate with) or
        ``{"images": DataSource}`` (a released synthetic set to use as it is).

    Raises:
        ConfigError: For both keys at once, or training keys beside either.
    """
    variant = cfg.lora.variants[name] or {}
    source = cfg._source  # type: ignore[attr-defined]
    key = f"lora.variants.{name}"
    if not isinstance(variant, dict):
        raise ConfigError(f"'{key}' in {source}: expected a mapping")
    given = [k for k in VARIANT_KEYS if k in variant]
    if not given:
        return {}
    others = sorted(set(variant) - {given[0]})
    if others:
        raise ConfigError(
            f"'{key}' in {source}: {given[0]!r} stands for a released artifact and takes no "
            f"other key (got {', '.join(others)})"
        )
    if given[0] == "file":
        path = Path(str(variant["file"])).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"'{key}.file' in {source}: {path} does not exist (the paper's LoRAs: "
                "fulora data download fu-lora-loras --out DIR)"
            )
        return {"file": path}
    images = variant["images"]
    if isinstance(images, str):
        images = {"path": images}
    return {"images": from_dict(DataSource, images, source=source, prefix=f"{key}.images.")}


def generate_config(cfg: ExperimentConfig, lora_dir: str) -> GenerateConfig:
    """The resolved generation config for the LoRA in run folder ``lora_dir``."""
    source = cfg._source  # type: ignore[attr-defined]
    for key in ("base", "lora"):
        if key in cfg.generate.settings:
            raise ConfigError(
                f"'generate.settings.{key}' in {source}: set by the experiment "
                f"({'the top-level base' if key == 'base' else 'each LoRA variant'}); remove it"
            )
    layers = [
        (
            {
                "base": cfg.base,
                "base_config": cfg.base_config,
                "lora": lora_dir,
                "device": cfg.device,
            },
            source,
            "",
        ),
        (cfg.generate.settings, source, "generate.settings."),
    ]
    return _stage_config(GenerateConfig, layers)


def audit_config(cfg: ExperimentConfig, classifiers: list[str], cache_dir: str) -> Any:
    """The resolved audit config, labelling with the classifier run folders ``classifiers``.

    The first gives the features too; an empty list (none chosen yet) only checks the keys.
    """
    source = cfg._source  # type: ignore[attr-defined]
    for key in ("classifier", "ensemble"):
        if key in cfg.audit.settings:
            raise ConfigError(
                f"'audit.settings.{key}' in {source}: set 'audit.classifier' instead "
                "(REGIME/ARCH for every seed of a real-only classifier, REGIME/ARCH/seed-N "
                "for one, or a classifier run folder)"
            )
    chosen = {"classifier": classifiers[0] if classifiers else "", "ensemble": classifiers[1:]}
    layers = [
        ({"device": cfg.device, "cache_dir": cache_dir, **chosen}, source, ""),
        (cfg.audit.settings, source, "audit.settings."),
    ]
    return _stage_config(AuditConfig, layers)


def regime_parts(cfg: ExperimentConfig, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(regime options, ClassifyConfig keys) of regime ``name``."""
    regime = cfg.classify.regimes[name] or {}
    source = cfg._source  # type: ignore[attr-defined]
    if not isinstance(regime, dict):
        raise ConfigError(f"'classify.regimes.{name}' in {source}: expected a mapping")
    options = {k: regime[k] for k in REGIME_KEYS if k in regime}
    for key in ("synthetic", "filtered"):
        if key in options and not isinstance(options[key], bool):
            raise ConfigError(
                f"'classify.regimes.{name}.{key}' in {source}: expected true or false, "
                f"got {options[key]!r}"
            )
    if options.get("filtered") and not options.get("synthetic", True):
        raise ConfigError(
            f"'classify.regimes.{name}' in {source}: filtered: true needs synthetic images"
        )
    if options.get("filtered"):
        options["synthetic"] = True
    baseline = options.get("baseline")
    if baseline is not None and (baseline == name or baseline not in cfg.classify.regimes):
        raise ConfigError(
            f"'classify.regimes.{name}.baseline' in {source}: {baseline!r} is not another "
            f"regime; expected one of {', '.join(r for r in cfg.classify.regimes if r != name)}"
        )
    if "real" in options:
        options["real"] = [
            from_dict(DataSource, s, source=source, prefix=f"classify.regimes.{name}.real.")
            for s in options["real"]
        ]
    return options, {k: v for k, v in regime.items() if k not in REGIME_KEYS}


def regime_baselines(cfg: ExperimentConfig) -> dict[str, str]:
    """Each regime's baseline, the regime ``results/effects.csv`` measures it against.

    A regime's ``baseline`` key names it; without one, a regime with synthetic images is
    measured against the only regime without any, if there is exactly one (the demo's
    real-only). The paper's grid has two (ES, ES+DA), so its presets name them.
    """
    options = {name: regime_parts(cfg, name)[0] for name in cfg.classify.regimes}
    real_only = [name for name, o in options.items() if not o.get("synthetic")]
    baselines = {}
    for name, o in options.items():
        base = o.get("baseline")
        if base and options[base].get("synthetic") and not o.get("synthetic"):
            source = cfg._source  # type: ignore[attr-defined]
            raise ConfigError(
                f"'classify.regimes.{name}.baseline' in {source}: {base} has synthetic images "
                f"and {name} has none; name the baseline on {base} instead ({name} is its)"
            )
        if base:
            baselines[name] = base
        elif o.get("synthetic") and len(real_only) == 1:
            baselines[name] = real_only[0]
    return baselines


def classify_config(cfg: ExperimentConfig, regime: str, arch: str, seed: int) -> ClassifyConfig:
    """The resolved classifier config of one cell of the grid."""
    source = cfg._source  # type: ignore[attr-defined]
    layers: list[tuple[dict[str, Any], str, str]] = [({"device": cfg.device}, source, "")]
    if cfg.classify.recipe:
        recipe, recipe_source = read_recipe(cfg.classify.recipe, cfg._config_dir)  # type: ignore[attr-defined]
        layers.append((recipe, recipe_source, ""))
    _, keys = regime_parts(cfg, regime)
    layers += [
        (cfg.classify.settings, source, "classify.settings."),
        (keys, source, f"classify.regimes.{regime}."),
        ({"arch": arch, "seed": seed}, source, "classify."),
    ]
    return _stage_config(ClassifyConfig, layers)


def classifier_protocol(cfg: ExperimentConfig) -> str:
    """How the grid's classifiers are trained and chosen, and over which seeds.

    Resolved from the first cell (regimes differ only in data and augmentation); the results
    and the report print it next to the numbers, so a table always says which preset made it.
    """
    regime = next(iter(cfg.classify.regimes))
    first = classify_config(cfg, regime, cfg.classify.archs[0], cfg.classify.seeds[0])
    seeds = cfg.classify.seeds
    runs = f"one run (seed {seeds[0]})" if len(seeds) == 1 else f"mean of seeds {seeds}"
    recipe = f"{Path(cfg.classify.recipe).name}: " if cfg.classify.recipe else ""
    return f"{recipe}{describe_protocol(first)}; {runs}"
