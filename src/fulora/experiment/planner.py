"""Planning an experiment: every config, input and stage resolved and checked before any work.

:func:`plan_experiment` works in three passes, so that the cheapest mistakes fail first:

1. :func:`~fulora.experiment.resolve.resolve_configs`: every stage config from the experiment
   file (key errors name their dotted path and file, before any file is read; its module
   imports no stage's code, so the CLI runs this pass before torch loads);
2. :func:`_read_inputs`: the manifests, the target labels, the base model and the classifier
   weights;
3. :class:`_Planner`: one method per stage kind turns them into :class:`Stage` objects, each
   with its key (a hash of its resolved config minus placement settings, and of its inputs:
   manifest fingerprints and the keys of the stages it reads) and ``after`` (the stages whose
   outputs it reads).

A stage's action is a :func:`functools.partial` of a module-level function over configs,
manifests and paths: cheap to pickle, as the Ray executor ships each to a worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fulora.audit.config import AuditConfig
from fulora.audit.run import audit
from fulora.classify.config import validation_needs
from fulora.classify.registry import ModelInfo, check_input_size, create_model, resolve_arch
from fulora.classify.train import ClassifyConfig, train_classifier
from fulora.config import to_dict
from fulora.data.manifest import Manifest
from fulora.data.readers import read_any
from fulora.errors import ConfigError, DataError, FuloraError
from fulora.evaluate.run import EvaluateConfig, check_test_labels, check_unseen, evaluate_model
from fulora.experiment.config import (
    DataSource,
    EvaluateStage,
    ExperimentConfig,
)
from fulora.experiment.layout import ExperimentLayout
from fulora.experiment.resolve import Cell, StageConfigs, resolve_configs
from fulora.experiment.results import EvaluationCell, reference_table
from fulora.experiment.stages import Stage
from fulora.generate.run import GenerateConfig, generate
from fulora.generate.samplers import resolve_sampler
from fulora.io import file_hash
from fulora.lora.base import check_base
from fulora.lora.config import LoraTrainConfig
from fulora.lora.data import LORA_COLUMNS
from fulora.lora.train import train_lora
from fulora.planes import PLANES, check_planes
from fulora.report.embedding import embed

logger = logging.getLogger("fulora")

# Settings that change where or how fast a stage runs, not what it produces.
_NOT_IN_KEY = {
    "device",
    "cache_dir",
    "num_workers",
    "write_threads",
    "decode_overlap",
    "base",
    "base_config",
    "lora",
    "lora_hash",  # checks of the files, not settings of the images
    "model_hash",
    "embedding_hashes",
    "progress",
}


def stage_key(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Settings added to a stage's config after experiments existed, with the default that keeps
# the earlier behaviour: in a stage's key only when set otherwise, so that upgrading fulora
# re-runs nothing. Per config class: a name may be old in one class and new in another.
_IN_KEY_WHEN_SET: dict[type, dict[str, Any]] = {
    GenerateConfig: {
        "compile_mode": "default",
        "inductor_tuning": False,
        "rng": "cpu",
        "seed_scheme": "hashed",
        "eta_noise_seed_delta": 0,
        "eta_ancestral": 1.0,
        "eta_ddim": 0.0,
        "schedule_type": "automatic",
        "beta_schedule_alpha": 0.6,
        "beta_schedule_beta": 0.6,
        "skip_early_cfg": 0.0,
        "ngms": 0.0,
        "ngms_all_steps": False,
        "pad_conds": "off",
        "old_prompt_editing": False,
        "schedule_sigma_min": 0.0,
        "schedule_sigma_max": 0.0,
        "schedule_rho": 0.0,
        "discard_penultimate_sigma": False,
        "downcast_alphas_cumprod": False,
        "zero_terminal_snr": False,
        "sgm_noise_multiplier": False,
        "sigma_churn": 0.0,
        "sigma_tmin": 0.0,
        "sigma_tmax": 0.0,
        "sigma_noise": 1.0,
        "embeddings": [],
        "prompt_comments": True,
        "unipc_variant": "bh1",
        "unipc_skip_type": "time_uniform",
        "unipc_order": 3,
        "unipc_lower_order_final": True,
        "unipc_legacy_steps": False,
        "hires_scale": None,
        "hires_resize_width": 0,
        "hires_resize_height": 0,
        "hires_upscaler": "Latent",
        "hires_steps": 0,
        "denoising_strength": 0.7,
        "emphasis": "original",
        "variation_seed": None,
        "variation_strength": 0.0,
        "seed_resize_from_width": None,
        "seed_resize_from_height": None,
        # Not the earlier behaviour: until session 34 the pixels were rounded as diffusers rounds
        # them. Such a generation stays done under its key, and the runner says so.
        "pixel_rounding": "floor",
    },
    ClassifyConfig: {
        "amp_dtype": "fp16",
        "compile": False,
        "compile_mode": "default",
        "fused_optimizer": False,
    },
    EvaluateStage: {"seed": 0},
    AuditConfig: {"ensemble": []},
    # Not the earlier behaviour: a LoRA finished before session 25 shrank its images with PIL's
    # BOX filter. It stays done under its key, and the runner says so (``--from lora``).
    LoraTrainConfig: {"resize": "area"},
}


def _config_payload(config: Any, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The settings of ``config`` that go into a stage key (only ``keys``, when given)."""
    added = _IN_KEY_WHEN_SET.get(type(config), {})
    return {
        k: v
        for k, v in to_dict(config).items()
        if k not in _NOT_IN_KEY
        and (keys is None or k in keys)
        and not (k in added and v == added[k])
    }


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
    cells: list[EvaluationCell] = field(default_factory=list)  # one per evaluation


@dataclass
class _Inputs:
    """Pass 2: the manifests every stage reads, checked."""

    train: Manifest
    classes: list[str]
    regime_real: dict[str, Manifest]  # regimes with their own real images
    targets: dict[str, Manifest]
    lora_data: Manifest | None
    released_images: dict[str, Manifest]


def plan_experiment(cfg: ExperimentConfig, out: str | Path) -> Plan:
    """Resolve and check an experiment before any work.

    Raises:
        ConfigError: An unknown key (named with its file), a missing path, an unknown
            architecture or plane, or weights that cannot be had.
        DataError: A manifest that cannot be read (named with its file and row).
    """
    out = Path(out)
    configs = resolve_configs(cfg, out)
    inputs = _read_inputs(cfg, configs)
    return _Planner(cfg, out, configs, inputs).build()


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


def _read_inputs(cfg: ExperimentConfig, configs: StageConfigs) -> _Inputs:
    """Pass 2: the data, the base model and the classifier weights."""
    source = configs.source
    train = _read_sources(cfg.data.train, "data.train", source)
    present = set(train.labels)
    classes = (
        check_planes(cfg.data.planes) if cfg.data.planes else [p for p in PLANES if p in present]
    )
    if len(classes) == 1:  # found out by the first classifier, after the LoRA and images
        raise ConfigError(
            f"'data.train' in {source}: its images are all of one plane ({classes[0]}): a "
            "classifier needs two or more"
        )
    regime_real = {
        name: _read_sources(options["real"], f"classify.regimes.{name}.real", source)
        for name, (options, _) in configs.regimes.items()
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
    if configs.loras or (configs.synthetic and cfg.data.lora):  # the audit compares with it too
        lora_data = _read_sources(cfg.data.lora, "data.lora", source)
    trained_on = [train, *regime_real.values(), *([lora_data] if lora_data else [])]
    seen = {path for manifest in trained_on for path in manifest.frame["path"]}
    for name, manifest in targets.items():
        try:  # a cohort that overlaps them once gave zero-shot numbers inflated by it
            check_unseen(manifest, seen, "the experiment's training or LoRA images")
        except DataError as err:
            raise DataError(f"'data.targets.{name}' in {source}: {err}") from None
    released_images = {
        v: _read_source(parts["images"], f"lora.variants.{v}.images", source).with_values(
            source="synthetic"  # whatever the layout: these images are not real
        )
        for v, parts in configs.released.items()
        if "images" in parts
    }
    _check_models(cfg, configs, classes)
    inputs = _Inputs(train, classes, regime_real, targets, lora_data, released_images)
    _check_validation_sets(configs, inputs)
    return inputs


def _check_validation_sets(configs: StageConfigs, inputs: _Inputs) -> None:
    """Validation images for every classifier: rows of split val, or real patients held out.

    The experiment passes no --val. Found out by the first classifier, a missing validation
    set (val_fraction 0 with select: best) or too few patients to hold out a share of would
    fail after the LoRA and images were made.
    """
    split_checked = set()
    for (regime, variant, _, _), ccfg in configs.classifiers.items():
        real = inputs.regime_real.get(regime, inputs.train)
        sets = [
            real,
            *([inputs.released_images[variant]] if variant in inputs.released_images else []),
        ]
        if any((m.frame["split"] == "val").any() for m in sets):
            continue
        where = f"'classify.regimes.{regime}' in {configs.source}"
        if ccfg.val_fraction > 0 and (regime, ccfg.val_fraction) not in split_checked:
            split_checked.add((regime, ccfg.val_fraction))
            try:  # the classifier's own split of its real images (whether it can: any seed)
                real.split_by_patient(ccfg.val_fraction, seed=ccfg.seed)
            except DataError as err:
                raise ConfigError(
                    f"{where}: {err}: set classify.settings.val_fraction to a larger share, or "
                    "to 0 with select: last and early_stopping: 0, or mark validation rows "
                    "(split val)"
                ) from None
        needs = validation_needs(ccfg)
        if needs and ccfg.val_fraction == 0:
            raise ConfigError(
                f"{where}: {needs} validation images, and val_fraction is 0 with no image of "
                "split val: set classify.settings.val_fraction above 0, or select: last and "
                "early_stopping: 0 (the paper's notebook)"
            )


def _check_models(cfg: ExperimentConfig, configs: StageConfigs, classes: list[str]) -> None:
    """The base model (when anything is generated), the reference table, classifier weights."""
    if configs.generation:
        try:
            check_base(cfg.base, cfg.base_config)
        except ConfigError as err:
            raise ConfigError(f"'base' in {configs.source}: {err}") from None
        for variant, gcfg in configs.generation.items():
            missing = [p for p in classes if p not in gcfg.planes]
            if missing:
                logger.warning("generation with %s makes no images of %s", variant, missing)
    reference_table(cfg.compare)
    _check_archs(cfg.classify.archs, configs.source)
    _check_classifier_weights(configs.classifiers.values(), classes, configs.source)


def _check_archs(archs: list[str], source: str) -> None:
    """Each architecture once, under any of its spellings.

    ResNet18 and resnet18 trained the same model twice, shown as two in the results table.
    """
    seen: dict[str, str] = {}
    for arch in archs:
        canonical = resolve_arch(arch)
        if canonical in seen:
            spellings = f" ({seen[canonical]!r} and {arch!r})" if seen[canonical] != arch else ""
            raise ConfigError(f"'classify.archs' in {source} names {canonical} twice{spellings}")
        seen[canonical] = arch


def _check_classifier_weights(classify_cfgs, classes: list[str], source: str) -> None:
    """Fill in the classes; build each distinct classifier once and check every cell against it.

    Missing weights and an image size the architecture cannot take (vit_b_16: 224 px) fail
    here, not in the classifier's stage after the LoRA and the images were made.
    """
    built: dict[tuple, ModelInfo] = {}
    for ccfg in classify_cfgs:
        if ccfg.classes is None:
            ccfg.classes = list(classes)
        weights = (ccfg.arch, ccfg.pretrained, ccfg.weights, ccfg.imagenet_weights)
        if weights not in built:
            try:
                _, built[weights] = create_model(
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
        try:
            check_input_size(built[weights], ccfg.image_size)
        except ConfigError as err:
            raise ConfigError(f"'classify.settings.image_size' in {source}: {err}") from None


# Stage actions: module-level functions, bound with functools.partial (picklable by reference).


def _as_is(manifest: Manifest) -> Manifest:
    return manifest


def _train_on(real: Manifest, synthetic, folder: Path, ccfg: ClassifyConfig) -> Any:
    """Train a classifier on ``real`` plus ``synthetic()`` (a loader, read when the stage runs)."""
    manifests = [real] + ([synthetic()] if synthetic is not None else [])
    return train_classifier(manifests, folder, ccfg)


def _audit_into(synthetic, train: Manifest, folder: Path, cfg, lora_data, filtered: Path) -> Any:
    return audit(synthetic(), train, folder, cfg, train_set=lora_data, write_filtered=filtered)


class _Planner:
    """Pass 3: the stages, one method per stage kind, in an order that respects ``after``."""

    def __init__(self, cfg: ExperimentConfig, out: Path, configs: StageConfigs, inputs: _Inputs):
        self.cfg, self.configs, self.inputs = cfg, configs, inputs
        self.layout = ExperimentLayout(out)
        self.plan = Plan(cfg, out, inputs.classes, inputs.lora_data, inputs.train, inputs.targets)
        self.keys: dict[str, str] = {}  # "lora/v", "generate/v", "audit/v" -> key
        self.classifiers: dict[Cell, Stage] = {}
        self._fingerprints: dict[tuple[int, tuple[str, ...] | None], str] = {}

    def fingerprint(self, manifest: Manifest, columns: tuple[str, ...] | None = None) -> str:
        """Once per manifest: a fingerprint hashes every image (stat + index lookup)."""
        key = (id(manifest), columns)
        if key not in self._fingerprints:
            self._fingerprints[key] = manifest.fingerprint(columns=columns)
        return self._fingerprints[key]

    def build(self) -> Plan:
        """Every stage, in an order the local executor can run one after another.

        LoRAs, generation, real-only classifiers (the audit labels with one of them), audits,
        hybrid classifiers, evaluations.
        """
        self.add_loras()
        self.add_generation()
        cells = self.configs.classifiers.items()
        for cell, ccfg in cells:
            if cell[1] is None:
                self.add_classifier(cell, ccfg)
        self.add_audits()
        for cell, ccfg in cells:
            if cell[1] is not None:
                self.add_classifier(cell, ccfg)
        self.add_evaluations()
        self.add_embedding()
        names = {stage.name for stage in self.plan.stages}  # released artifacts have no stage
        for stage in self.plan.stages:
            stage.after = tuple(name for name in stage.after if name in names)
        return self.plan

    def add_loras(self) -> None:
        """One LoRA fine-tune per variant to train; a released LoRA is keyed by its content."""
        data = self.inputs.lora_data
        for variant, lcfg in self.configs.loras.items():
            assert data is not None
            payload = {
                "config": _config_payload(lcfg),
                "data": self.fingerprint(data, LORA_COLUMNS),
                "base": self.cfg.base,
            }
            folder = self.layout.lora(variant)
            action = partial(train_lora, data, folder, lcfg, resume="latest")
            key = stage_key(payload)
            stage = self._add("lora", f"lora/{variant}", folder, key, action, variant)
            stage.info["resize"] = lcfg.resize  # for the runner's word on older LoRAs
        for variant, parts in self.configs.released.items():
            if "file" in parts:
                self.keys[f"lora/{variant}"] = "file:" + file_hash(parts["file"])

    def add_generation(self) -> None:
        """One generation per LoRA variant; a released image set is keyed by its fingerprint."""
        for variant, manifest in self.inputs.released_images.items():
            self.keys[f"generate/{variant}"] = "images:" + self.fingerprint(manifest)
        for variant, gcfg in self.configs.generation.items():
            payload = {
                "config": _config_payload(gcfg),
                "lora": self.keys[f"lora/{variant}"],
                "base": self.cfg.base,
            }
            folder = self.layout.synthetic(variant)
            stage = self._add(
                "generate",
                f"generate/{variant}",
                folder,
                stage_key(payload),
                partial(generate, folder, gcfg),
                variant,
                after=(f"lora/{variant}",),
            )
            stage.shards = self.cfg.generate.shards
            stage.shard_action = partial(_generate_shard, folder, gcfg)
            stage.info["sampler"] = resolve_sampler(gcfg.sampler)
            stage.info["pixel_rounding"] = gcfg.pixel_rounding

    def synthetic_loader(self, variant: str):
        """A variant's synthetic set, read when a stage runs: released, or generated."""
        if variant in self.inputs.released_images:
            return partial(_as_is, self.inputs.released_images[variant])
        return partial(Manifest.read, self.layout.synthetic_manifest(variant))

    def add_classifier(self, cell: Cell, ccfg: ClassifyConfig) -> None:
        """A classifier of the grid: its regime's real images, plus a variant's synthetic set.

        A ``filtered`` regime takes only what the audit kept.
        """
        regime, variant, arch, seed = cell
        real = self.inputs.regime_real.get(regime, self.inputs.train)
        filtered = bool(self.configs.regimes[regime][0].get("filtered"))
        label = regime + (f"@{variant}" if variant and len(self.configs.variants) > 1 else "")
        upstream, after, synthetic = None, (), None
        if variant is not None:
            after = (f"audit/{variant}",) if filtered else (f"generate/{variant}",)
            upstream = self.keys[after[0]]
            synthetic = (
                partial(Manifest.read, self.layout.filtered(variant))
                if filtered
                else self.synthetic_loader(variant)
            )
        payload = {
            "config": _config_payload(ccfg),
            "real": self.fingerprint(real),
            "synthetic": upstream,
            "filtered": filtered,
            "classes": self.inputs.classes,
        }
        folder = self.layout.classifier(label, arch, seed)
        info = {"regime": regime, "lora": variant, "arch": arch, "seed": seed, "label": label}
        name = f"classify/{label}/{arch}/seed-{seed}"
        action = partial(_train_on, real, synthetic, folder, ccfg)
        stage = Stage("classify", name, folder, stage_key(payload), action, info, after=after)
        self.classifiers[cell] = stage
        self.plan.stages.append(stage)

    def add_audits(self) -> None:
        """One audit per variant, labelling its images with the chosen real-only classifiers."""
        if self.configs.audit is None or not self.configs.audit_classifiers:
            return
        judges = [
            (self.classifiers.get(cell) if cell else None, folder)
            for cell, folder in self.configs.audit_classifiers
        ]
        # the classifiers by their keys, not their paths: a moved experiment stays done
        judge_keys = [clf.key if clf else str(folder) for clf, folder in judges]
        after = tuple(clf.name for clf, _ in judges if clf)
        inputs = self.inputs
        for variant in self.configs.variants:
            config = {**_config_payload(self.configs.audit), "classifier": None}
            if "ensemble" in config:  # paths out of the key: the judges' keys are below
                config["ensemble"] = None
            payload = {
                "config": config,
                "synthetic": self.keys[f"generate/{variant}"],
                # one classifier: as before session 23, so an audit by one seed stays done
                "classifier": judge_keys[0] if len(judge_keys) == 1 else judge_keys,
                "reference": self.fingerprint(inputs.train),
                "train_set": self.fingerprint(inputs.lora_data) if inputs.lora_data else None,
            }
            folder = self.layout.audit(variant)
            action = partial(
                _audit_into,
                self.synthetic_loader(variant),
                inputs.train,
                folder,
                self.configs.audit,
                inputs.lora_data,
                self.layout.filtered(variant),
            )
            self._add(
                "audit",
                f"audit/{variant}",
                folder,
                stage_key(payload),
                action,
                variant,
                (f"generate/{variant}", *after),
            )

    def add_evaluations(self) -> None:
        """Every classifier on every target cohort."""
        eval_cfg = EvaluateConfig(
            **to_dict(self.cfg.evaluate),
            device=self.cfg.device,
            cache_dir=str(self.configs.cache),
        )
        for target, manifest in self.inputs.targets.items():
            for clf in self.classifiers.values():
                payload = {
                    "classifier": clf.key,
                    "target": self.fingerprint(manifest),
                    # not batch_size: it changes no result
                    **_config_payload(self.cfg.evaluate, ("n_bootstrap", "seed")),
                }
                folder = self.layout.evaluation(target, clf.folder)
                info = {**clf.info, "target": target, "classifier": str(clf.folder)}
                self.plan.stages.append(
                    Stage(
                        "evaluate",
                        f"evaluate/{target}/{clf.name.removeprefix('classify/')}",
                        folder,
                        stage_key(payload),
                        partial(evaluate_model, clf.folder, manifest, folder, eval_cfg),
                        info,
                        after=(clf.name,),
                    )
                )
                self.plan.cells.append(
                    EvaluationCell(
                        target=target,
                        regime=clf.info["regime"],
                        lora=clf.info["lora"],
                        arch=clf.info["arch"],
                        seed=clf.info["seed"],
                        classifier=clf.folder,
                        folder=folder,
                    )
                )

    def add_embedding(self) -> None:
        """The t-SNE points of one classifier's features, for the report.

        Planned when ``report.enabled`` and ``report.embedding`` are on. The classifier is
        ``report.embedding_model`` (``REGIME/ARCH/seed-N``), else the first hybrid one, else
        the first; its real training set, its variant's synthetic images and the first target
        cohort are the groups.
        """
        report = self.cfg.report
        if not (report.enabled and report.embedding and self.classifiers):
            return
        clf = self._embedding_classifier(report.embedding_model)
        variant = clf.info["lora"] or next(iter(self.configs.variants), None)
        groups: dict[str, Any] = {"real training": self.inputs.train}
        after = [clf.name]
        if variant is not None:
            groups["synthetic"] = self.synthetic_loader(variant)
            after.append(f"generate/{variant}")
        target = next(iter(self.inputs.targets.items()), None)
        if target is not None:
            groups["target cohort"] = target[1]
        payload = {
            "classifier": clf.key,
            "synthetic": self.keys.get(f"generate/{variant}"),
            "real": self.fingerprint(self.inputs.train),
            "target": self.fingerprint(target[1]) if target else None,
            "per_group": report.embedding_per_group,
        }
        action = partial(
            embed,
            self.layout.embedding,
            clf.folder,
            groups,
            per_group=report.embedding_per_group,
            cache_dir=self.configs.cache,
            device=self.cfg.device,
        )
        info = {**clf.info, "classifier": clf.name}
        self.plan.stages.append(
            Stage(
                "embedding",
                "embedding",
                self.layout.embedding,
                stage_key(payload),
                action,
                info,
                after=tuple(after),
            )
        )

    def _embedding_classifier(self, wanted: str | None) -> Stage:
        """The classifier named ``REGIME/ARCH/seed-N`` (or by stage name), else the default."""
        stages = list(self.classifiers.values())
        if wanted:
            for stage in stages:
                if wanted in (stage.name.removeprefix("classify/"), stage.name):
                    return stage
            raise ConfigError(
                f"report.embedding_model {wanted!r} in {self.configs.source} is not a classifier "
                "of this experiment; use one of "
                + ", ".join(s.name.removeprefix("classify/") for s in stages)
            )
        hybrid = [s for s in stages if s.info.get("lora")]
        return (hybrid or stages)[0]

    def _add(self, kind, name, folder, key, action, variant, after=()) -> Stage:
        stage = Stage(kind, name, folder, key, action, {"variant": variant}, after=after)
        self.keys[name] = key
        self.plan.stages.append(stage)
        return stage


def _generate_shard(folder: Path, gcfg: GenerateConfig, k: int, n: int) -> Any:
    return generate(folder, gcfg, shard=(k, n))
