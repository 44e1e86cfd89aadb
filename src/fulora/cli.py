"""The ``fulora`` command: ``fulora <stage> ...``.

Each subcommand parses its arguments, builds its config and calls one library function; all
the work lives in the stage subpackages.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fulora.errors import ConfigError, FuloraError
from fulora.flags import add_config_flags, config_values

logger = logging.getLogger("fulora")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fulora: %(message)s"))
    logger.handlers[:] = [
        h
        for h in logger.handlers
        if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler)
    ]
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)  # run logs get INFO
    logger.propagate = False


# ------------------------------------------------------------------------------------------
# fulora data ...
# ------------------------------------------------------------------------------------------
def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from fulora.data.inspect import inspect_path

    report = inspect_path(
        args.path, images_dir=args.images, open_images=not args.no_images, decode=not args.quick
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from fulora.data.download import download_dataset

    manifest = download_dataset(
        args.name,
        args.dest,
        api=args.api,
        url=args.url,
        sha256=args.sha256,
        endpoint=args.endpoint,
        retries=args.retries,
    )
    if manifest is None:  # model files, not images
        names = sorted(p.name for p in Path(args.dest).glob("*.safetensors"))
        print(f"{args.name}: {', '.join(names)} in {args.dest}")
        return 0
    print(
        f"{args.name}: {len(manifest)} images in {args.dest}; manifest: "
        f"{Path(args.dest) / 'manifest.csv'}"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in manifest.counts("label").items()))
    return 0


def _cmd_data_phantom(args: argparse.Namespace) -> int:
    from fulora.config import load_config
    from fulora.data.config import PhantomConfig
    from fulora.runs import RunDir

    values = config_values(args, args.config_fields)
    values["size"] = tuple(args.size) if args.size else None
    values["grid"] = False if args.no_grid else None
    config = load_config(PhantomConfig, args.config, args.set, values=values)
    from fulora.data.phantom import generate_phantom  # SciPy: after the config's checks

    run = RunDir(args.out, command="fulora data phantom").start(config)
    try:
        manifest = generate_phantom(args.out, config)
        run.finish(
            images=len(manifest), labels=manifest.counts("label"), domains=manifest.counts("domain")
        )
    finally:
        run.close()
    print(
        f"phantom: {len(manifest)} images in {args.out} ("
        + ", ".join(f"{k} {v}" for k, v in manifest.counts("domain").items())
        + f"); manifest: {Path(args.out) / 'manifest.csv'}"
    )
    return 0


def _cmd_data_manifest(args: argparse.Namespace) -> int:
    from fulora.data.manifest import Manifest

    parts = _read_manifests(args.sources, args.on_missing, images_dir=args.images)
    manifest = Manifest.concat(parts) if len(parts) > 1 else parts[0]
    if args.labels:
        from fulora.planes import check_planes

        manifest = manifest.select(labels=check_planes(args.labels))
    if args.balance:
        manifest = manifest.balanced(args.balance, seed=args.seed)
    if args.val_fraction:
        manifest = manifest.split_by_patient(args.val_fraction, seed=args.seed)
    manifest.write(args.out)
    print(f"{len(manifest)} images -> {args.out}")
    for column in ("label", "split", "domain"):
        print(
            f"  {column}: "
            + ", ".join(f"{k or '(empty)'} {v}" for k, v in manifest.counts(column).items())
        )
    return 0


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _read_manifests(paths: Sequence[str], on_missing: str = "error", images_dir=None):
    from fulora.data.readers import read_any

    return [read_any(p, images_dir=images_dir, on_missing=on_missing) for p in paths]


def _cmd_classify_train(args: argparse.Namespace) -> int:
    from fulora.classify.config import ClassifyConfig
    from fulora.config import load_config

    values = config_values(args, args.config_fields)
    values["balance"] = args.balance or None  # a switch: --balance
    seeds = args.seeds or [None]
    # Read and check everything before any training starts.
    configs = [
        load_config(ClassifyConfig, args.config, args.set, values={**values, "seed": seed})
        for seed in seeds
    ]
    train = _read_manifests(args.train)
    val = _read_manifests([args.val])[0] if args.val else None
    from fulora.classify.train import train_classifier  # torch: after the cheap checks

    rows = []
    for cfg in configs:
        out = Path(args.out) / f"seed-{cfg.seed}" if len(configs) > 1 else Path(args.out)
        record = train_classifier(train, out, cfg, val=val)
        best = record.get("best_val", {})
        rows.append((out, cfg.seed, record.get("best_epoch"), best))
    print(f"\n{'run':<40}{'seed':>6}{'kept epoch':>12}{'val acc':>10}{'val F1':>10}")
    for out, seed, epoch, best in rows:
        acc, f1 = (best.get(k) for k in ("val_accuracy", "val_f1_macro"))
        print(
            f"{str(out):<40}{seed:>6}{epoch!s:>12}"
            + "".join("         -" if v is None else f"{v:>10.2f}" for v in (acc, f1))
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fulora.config import load_config
    from fulora.evaluate.config import EvaluateConfig

    values = config_values(args, args.config_fields)
    cfg = load_config(EvaluateConfig, args.config, args.set, values=values)
    test = _read_manifests([args.test])[0]
    from fulora.evaluate.run import HEADLINE, evaluate_model  # torch: after the cheap checks

    result = evaluate_model(args.model, test, args.out, cfg)
    print(
        f"\n{result['model']['arch']} on {args.test}: {result['images']} images, "
        f"test classes {', '.join(result['test_classes'])} of model classes "
        f"{', '.join(result['classes'])}"
    )
    header = "".join(f"{k:>17}" for k in HEADLINE)
    print(f"{'label space':<14}{header}")
    for space, entry in result["spaces"].items():
        cells = ""
        for k in HEADLINE:
            value = entry["metrics"][k]
            ci = entry["ci95"].get(k)
            cells += f"{value:>8.2f}" + (f" [{ci[0]:4.1f},{ci[1]:5.1f}]" if ci else " " * 12)
        print(f"{space:<14}{cells}")
    print(f"ECE {result['calibration']['ece']:.2f}%; files in {args.out}")
    return 0


def _cmd_lora_train(args: argparse.Namespace) -> int:
    from fulora.config import load_config
    from fulora.lora.config import LoraTrainConfig

    values = config_values(args, args.config_fields)
    cfg = load_config(LoraTrainConfig, args.config, args.set, values=values)
    data = _read_manifests([args.data])[0]
    from fulora.lora.train import train_lora  # torch, diffusers: after the cheap checks

    record = train_lora(data, args.out, cfg, resume=args.resume)
    if record:
        print(
            f"\nLoRA rank {cfg.rank}/alpha {cfg.alpha}: {record['steps']} steps on "
            f"{record['images']} images in {record['seconds_training']:.1f} s "
            f"({record['steps_per_s']} steps/s, {record['device']}); final loss "
            f"{record['final_loss']:.4f}"
        )
        print(f"  diffusers: {record['lora_diffusers']}\n  kohya:     {record['lora_kohya']}")
    return 0


def _cmd_lora_inspect(args: argparse.Namespace) -> int:
    from fulora.lora.formats import inspect_lora

    info = inspect_lora(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['path']}: {info['format']} LoRA, {info['tensors']} tensors")
    print(f"  rank {info['rank']}, alpha {info['alpha']}, dtype {info['dtype']}")
    print(f"  AUTOMATIC1111 hash {info['a1111_hash']}")
    print("  modules  " + ", ".join(f"{k} {v}" for k, v in info["modules"].items()))
    print("  targets  " + ", ".join(f"{k} {v}" for k, v in info["targets"].items()))
    for key, value in info["metadata"].items():
        text = json.dumps(value) if not isinstance(value, str) else value
        print(f"  {key}: {text if len(text) < 200 else text[:197] + '...'}")
    return 0


def _cmd_lora_tiny_model(args: argparse.Namespace) -> int:
    from fulora.lora.tiny import save_tiny_model

    out = save_tiny_model(args.out, seed=args.seed)
    print(f"tiny Stable Diffusion-architecture model (random weights, NOT pretrained) in {out}")
    return 0


def _cmd_foundation_build(args: argparse.Namespace) -> int:
    from fulora.config import load_config
    from fulora.foundation.config import FoundationConfig

    values = config_values(args, args.config_fields)
    cfg = load_config(FoundationConfig, args.config, args.set, values=values)
    from fulora.foundation.build import build_foundation  # torch: after the config's checks

    record = build_foundation(args.out, cfg)
    seconds = record.get("build_seconds", {})
    print(
        f"\nfoundation model in {args.out}: VAE {seconds.get('vae')} s, "
        f"UNet {seconds.get('unet')} s; "
        f"final losses {record.get('final_loss')}; card: {Path(args.out) / 'MODEL_CARD.md'}"
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fulora.config import load_config
    from fulora.generate.config import GenerateConfig

    values = config_values(args, args.config_fields)
    cfg = load_config(GenerateConfig, args.config, args.set, values=values)
    if args.a1111:  # an A1111 image's settings, under the flags and --set
        layer = _a1111_layer(args.a1111, cfg.planes)
        cfg = load_config(GenerateConfig, args.config, args.set, values=values, layer=layer)
    from fulora.generate.run import generate  # torch, diffusers: after the config's checks

    result = generate(args.out, cfg, only=args.only or ())
    if args.only:
        print(f"regenerated {result['generated']} image(s) in {args.out}")
    elif "images" in result:  # the main process reports; the others return their share only
        rate = result.get("this_run_images_per_s")
        print(
            f"\n{result['images']} images in {args.out} ({result['size']}): "
            + ", ".join(f"{k} {v}" for k, v in result["per_plane"].items())
        )
        print(
            f"  this run: {result['this_run_generated']} new in {result['this_run_seconds']} s"
            + (
                f" ({rate} images/s, batch {result['this_run_batch_size']}, "
                f"{result['this_run_device']})"
                if rate
                else " (nothing left to do)"
            )
        )
        print(f"  manifest: {Path(args.out) / 'manifest.csv'}")
    return 0


def _a1111_layer(path: str, planes: list[str]) -> dict:
    """The generation settings of an A1111 image (PNG or text), for the one plane it shows."""
    from fulora.generate.infotext import (
        generate_settings,
        read_a1111_parameters,
        read_parameters_file,
    )

    if len(planes) != 1:
        raise ConfigError(
            f"--a1111 {path}: an image's settings hold one prompt; name the plane it shows "
            "with --planes (for example --planes brain)"
        )
    params = read_a1111_parameters(read_parameters_file(path))
    layer = generate_settings(params, planes[0])
    model = params.fields.get("Model", "?")
    logger.info(
        "settings of %s: %s; it was made with the model %s (hash %s) and, if its prompt has "
        "<lora:...>, that LoRA: fulora uses --base and --lora",
        path,
        ", ".join(f"{k} {v}" for k, v in layer.items() if k not in ("planes", "prompts")),
        model,
        params.fields.get("Model hash", "?"),
    )
    return layer


def _cmd_demo(args: argparse.Namespace) -> int:
    from fulora.demo import run_demo

    run_demo(
        args.out,
        per_class=args.per_class,
        seed=args.seed,
        synthetic_per_class=args.synthetic_per_class,
        report=not args.no_report,
        device=args.device,
    )
    return 0


def _cmd_experiment_run(args: argparse.Namespace) -> int:
    from fulora.experiment.config import load_experiment
    from fulora.experiment.resolve import resolve_configs

    cfg = load_experiment(args.config, overrides=args.set)
    out = args.out or str(Path("runs") / cfg.name)
    ray_flags = (args.address, args.retries, args.cpus_per_task)
    if args.executor == "local" and any(flag is not None for flag in ray_flags):
        raise FuloraError("--address, --retries and --cpus-per-task go with --executor ray")
    resolve_configs(cfg, Path(out))  # every stage setting, before the stages' code loads
    from fulora.experiment.ray_executor import RayOptions
    from fulora.experiment.runner import run_experiment

    ray = RayOptions(
        args.address,
        2 if args.retries is None else args.retries,
        args.cpus_per_task or 1,
    )
    run_experiment(
        cfg,
        out,
        from_stage=args.from_stage,
        dry_run=args.dry_run,
        executor=args.executor,
        ray=ray,
    )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fulora.audit.config import AuditConfig
    from fulora.config import load_config
    from fulora.data.manifest import Manifest

    values = config_values(args, args.config_fields)
    cfg = load_config(AuditConfig, args.config, args.set, values)
    synthetic = Manifest.concat(_read_manifests(args.synthetic))
    reference = Manifest.concat(_read_manifests(args.reference))
    train_set = Manifest.concat(_read_manifests(args.train_set)) if args.train_set else None
    from fulora.audit.run import audit, judged_by  # torch: after the cheap checks

    result = audit(
        synthetic, reference, args.out, cfg, train_set=train_set, write_filtered=args.write_filtered
    )
    overall = result["fidelity"]["overall"]
    print(
        f"audit of {len(synthetic)} synthetic vs {len(reference)} reference images "
        f"({result['extractor']}):\n"
        f"  FID {overall['fid']:.2f}, KID {overall['kid_mean']:.4f} ± {overall['kid_std']:.4f} "
        f"(subsets of {overall['kid_subset_size']}), precision {overall['precision']:.3f}, "
        f"recall {overall['recall']:.3f}"
    )
    if "memorisation" in result:
        memo = result["memorisation"]
        print(
            f"  near-copies of LoRA training images: {memo['near_copies']} "
            f"({memo['share_percent']:.1f}%)"
        )
    if "consistency" in result:
        print(
            f"  agreement with the prompted plane "
            f"({judged_by(1 + len(result['consistency']['ensemble']))}): "
            f"{result['consistency']['agreement']:.1f}%"
        )
    rules = _filter_rules(result["filtering"]["rules"])
    print(f"  kept by the filter: {result['filtering']['kept']} of {len(synthetic)}{rules}")
    print(f"  tables and figures: {args.out}/per_plane.csv, similarity.png, near_copies.png")
    return 0


def _filter_rules(rules: dict) -> str:
    """The audit filter's rules in words, for its summary (an image kept passes them all)."""
    words = []
    if rules.get("drop_near_copies"):
        words.append("no near-copy")
    if rules.get("require_agreement"):
        words.append("the classifier agreeing with the prompted plane")
    if rules.get("min_confidence") is not None:
        words.append(f"its probability of that plane at least {rules['min_confidence']:g}")
    return f" ({', '.join(words)})" if words else " (no rule: every image)"


def _cmd_report(args: argparse.Namespace) -> int:
    from fulora.experiment.report import build_report

    path = build_report(args.run_dir)
    print(f"report: {path}")
    return 0


def _config_flags(parser, cls, **options) -> None:
    """One flag per setting of ``cls`` (:mod:`fulora.flags`), then ``--config`` and ``--set``.

    The command reads them back with ``config_values(args, args.config_fields)``.
    """
    fields = add_config_flags(parser, cls, **options)
    parser.add_argument("--config", help=f"YAML config (keys of {cls.__name__})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(config_fields=fields)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``fulora`` command.

    Args:
        only: Give only this stage its commands and flags (the others keep their name and
            help): building the data stage's flags imports the phantom renderer (SciPy,
            1.8 s on 2 cores), time that a command of another stage need not wait for. None:
            every stage's, for tests and docs.
    """
    from fulora import __version__

    parser = argparse.ArgumentParser(
        prog="fulora",
        description="FU-LoRA: LoRA-generated synthetic data for fetal ultrasound classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"fulora {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (help_text, add_commands) in _STAGES.items():
        stage_parser = stages.add_parser(name, help=help_text)
        if only is None or name == only:
            add_commands(stage_parser)
    return parser


def _add_data_parser(data: argparse.ArgumentParser) -> None:
    """The `data` stage's commands and flags."""
    from fulora.data.config import PhantomConfig

    data_cmds = data.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = data_cmds.add_parser("inspect", help="counts, image sizes and modes, and problems")
    p.add_argument("path", help="a dataset folder, image CSV or manifest")
    p.add_argument("--images", help="folder holding the images of a CSV (default: beside it)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="read image headers only (faster; does not find truncated files)",
    )
    p.add_argument("--no-images", action="store_true", help="do not open the images at all")
    p.set_defaults(func=_cmd_data_inspect)

    from fulora.data.download import DATASETS

    p = data_cmds.add_parser(
        "download",
        help="download a public dataset and write its manifest",
        description="Datasets: " + "; ".join(f"{k}: {v.description}" for k, v in DATASETS.items()),
    )
    p.add_argument("name", choices=list(DATASETS))
    p.add_argument("--dest", required=True, help="destination folder")
    p.add_argument("--api", help="Zenodo API base URL (a mirror)")
    p.add_argument("--url", help="download URL override for non-Zenodo datasets (a mirror)")
    p.add_argument("--sha256", help="expected SHA-256 of a non-Zenodo download")
    p.add_argument("--endpoint", help="Hugging Face Hub URL (a mirror; default huggingface.co)")
    p.add_argument("--retries", type=int, default=3, help="resume attempts per file")
    p.set_defaults(func=_cmd_data_download)

    p = data_cmds.add_parser("phantom", help="procedural B-mode-like images (the demo data)")
    p.add_argument("out", help="output folder (a run folder)")
    # size (two numbers) and grid (an on-by-default switch) keep their own spellings
    _config_flags(p, PhantomConfig, skip=("size", "grid"))
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.set_defaults(func=_cmd_data_phantom)

    p = data_cmds.add_parser(
        "manifest", help="read layouts into one manifest CSV; subsample, balance, split by patient"
    )
    p.add_argument("sources", nargs="+", help="dataset folders, image CSVs or manifests")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--images", help="folder holding the images of a CSV")
    p.add_argument(
        "--on-missing",
        choices=["error", "skip", "ignore"],
        default="error",
        help="rows whose image does not exist (default: error)",
    )
    p.add_argument("--labels", nargs="+", help="keep only these planes")
    p.add_argument("--balance", type=int, metavar="N", help="N random images per plane")
    p.add_argument(
        "--val-fraction", type=float, help="hold out this share of patients as split 'val'"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_manifest)


def _add_lora_parser(lora: argparse.ArgumentParser) -> None:
    """The `lora` stage's commands and flags."""
    from fulora.lora.config import LoraTrainConfig

    lora_cmds = lora.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = lora_cmds.add_parser(
        "train",
        help="fine-tune LoRA adapters on a few captioned images",
        description="Defaults follow the paper's kohya-ss recipe (configs/lora-paper.yaml).",
    )
    p.add_argument(
        "--data",
        required=True,
        help="plane folders with caption files, or a manifest with a caption column",
    )
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --out (or a given one)",
    )
    _config_flags(p, LoraTrainConfig)
    p.set_defaults(func=_cmd_lora_train)

    p = lora_cmds.add_parser("inspect", help="format, rank, alpha, modules and metadata")
    p.add_argument("file", help="a LoRA .safetensors (kohya or diffusers) or a run folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_lora_inspect)

    p = lora_cmds.add_parser("tiny-model", help="write a tiny random SD model (tests, demos)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_lora_tiny_model)


def _add_foundation_parser(foundation: argparse.ArgumentParser) -> None:
    """The `foundation` stage's commands and flags."""
    from fulora.foundation.config import FoundationConfig

    foundation_cmds = foundation.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = foundation_cmds.add_parser(
        "build",
        help="pretrain it from nothing on the phantom corpus (resumable)",
        description="The recipe is configs/foundation.yaml; the result is a diffusers folder "
        "with MODEL_CARD.md. fulora ships one as fulora:phantom-sd.",
    )
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    _config_flags(p, FoundationConfig)
    p.set_defaults(func=_cmd_foundation_build)


def _add_generate_parser(p: argparse.ArgumentParser) -> None:
    """The `generate` stage's commands and flags."""
    from fulora.generate.config import GenerateConfig
    from fulora.generate.samplers import SAMPLERS

    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--a1111",
        metavar="PNG_OR_TEXT",
        help="the settings of an AUTOMATIC1111 image (its PNG, or a text file of them): prompt, "
        "negative prompt, steps, sampler, CFG scale, seed, size, clip skip, RNG, ENSD, etas, "
        "churn, emphasis, TI hashes (give the embeddings with --embeddings), variation seed, "
        "seed resize and hires fix, for the one plane --planes names; flags and --set "
        "override them",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="PLANE:INDEX",
        help="regenerate just these images (bit-identical to the full run's)",
    )
    helps = {
        "sampler": "fulora's or AUTOMATIC1111's name: "
        + ", ".join(f"{name} ({entry[2]!r})" for name, entry in SAMPLERS.items()),
        "seed": "run seed; each image's seed derives from it",
    }
    _config_flags(p, GenerateConfig, helps=helps)
    p.set_defaults(func=_cmd_generate)


def _add_classify_parser(classify: argparse.ArgumentParser) -> None:
    """The `classify` stage's commands and flags."""
    from fulora.classify.config import ClassifyConfig

    classify_cmds = classify.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = classify_cmds.add_parser(
        "train",
        help="train a classifier on real, synthetic or hybrid manifests",
        description="Defaults are fulora's protocol (configs/classify-sound.yaml); "
        "--config configs/classify-paper.yaml is the FU-LoRA notebook's, exactly.",
    )
    p.add_argument(
        "--train",
        nargs="+",
        required=True,
        metavar="MANIFEST",
        help="training data: manifests, image CSVs or dataset folders",
    )
    p.add_argument(
        "--val",
        metavar="MANIFEST",
        help="validation data (default: hold out real patients of --train)",
    )
    p.add_argument("--out", required=True, help="run folder (one per seed with several seeds)")
    p.add_argument("--seeds", type=int, nargs="+", help="train one model per seed")
    p.add_argument("--balance", action="store_true", help="class-balance the real images")
    helps = {
        "arch": "architecture: densenet169, mobilenet_v2, efficientnet_b0, resnet18, vit_b_16, "
        "tiny_cnn, or any timm model (default resnet18)",
        "classes": "model classes (default: the training planes)",
    }
    _config_flags(p, ClassifyConfig, skip=("seed", "balance"), helps=helps)
    p.set_defaults(func=_cmd_classify_train)


def _add_evaluate_parser(p: argparse.ArgumentParser) -> None:
    """The `evaluate` stage's commands and flags."""
    from fulora.evaluate.config import EvaluateConfig

    p.add_argument("--model", required=True, help="run folder of `fulora classify train`")
    p.add_argument("--test", required=True, help="test manifest, image CSV or dataset folder")
    p.add_argument("--out", required=True, help="output folder")
    _config_flags(p, EvaluateConfig, names={"n_bootstrap": "--bootstrap"})
    p.set_defaults(func=_cmd_evaluate)


def _add_demo_parser(p: argparse.ArgumentParser) -> None:
    """The `demo` stage's commands and flags."""
    p.add_argument("--out", default="demo-run", help="output folder (default demo-run)")
    p.add_argument(
        "--per-class", type=int, default=20, help="phantom images per plane (the paper: ~20)"
    )
    p.add_argument("--synthetic-per-class", type=int, default=60, help="synthetic images per plane")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default: the demo is sized for 2 cores), cuda, cuda:N, mps or auto",
    )
    p.set_defaults(func=_cmd_demo)


def _add_experiment_parser(experiment: argparse.ArgumentParser) -> None:
    """The `experiment` stage's commands and flags."""
    experiment_cmds = experiment.add_subparsers(dest="action", required=True)
    p = experiment_cmds.add_parser(
        "run",
        help="LoRA -> generation -> classifiers -> evaluation -> report; skips finished stages",
    )
    p.add_argument("config", help="experiment YAML (e.g. configs/fu-lora-paper.yaml)")
    p.add_argument("--out", help="experiment folder (default runs/<name>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. variables.sd15=/models/v1-5-pruned.safetensors",
    )
    p.add_argument(
        "--from",
        dest="from_stage",
        choices=["lora", "generate", "classify", "evaluate", "results", "report"],
        help="rerun this stage and every later one",
    )
    p.add_argument("--dry-run", action="store_true", help="check the config, list the stages")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: one stage after another here (default); ray: stages as Ray tasks over "
        "every GPU and CPU of this machine or a cluster (pip install 'fulora[ray]')",
    )
    p.add_argument(
        "--address",
        help="with --executor ray: join this Ray cluster (auto, HOST:PORT or ray://HOST:PORT) "
        "instead of starting one on this machine",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="with --executor ray: retries of a task whose worker died (default 2)",
    )
    p.add_argument(
        "--cpus-per-task",
        type=int,
        help="with --executor ray: CPUs and torch threads per task (default 1); on the CPU, "
        "as many as the local executor's threads reproduce its numbers exactly",
    )
    p.set_defaults(func=_cmd_experiment_run)


def _add_audit_parser(p: argparse.ArgumentParser) -> None:
    """The `audit` stage's commands and flags."""
    from fulora.audit.config import AuditConfig

    p.add_argument("--synthetic", nargs="+", required=True, help="synthetic images (manifest)")
    p.add_argument("--reference", nargs="+", required=True, help="real images to compare with")
    p.add_argument("--train-set", nargs="+", help="the LoRA's training images (memorisation)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--write-filtered", metavar="MANIFEST", help="write the images that pass")
    _config_flags(p, AuditConfig)
    p.set_defaults(func=_cmd_audit)


def _add_report_parser(p: argparse.ArgumentParser) -> None:
    """The `report` stage's commands and flags."""
    p.add_argument("run_dir", help="the --out folder of `fulora experiment run`")
    p.set_defaults(func=_cmd_report)


# The stages of `fulora --help`, in its order: (help, the function adding the commands and flags)
_STAGES = {
    "data": ("read, check, download and synthesise datasets", _add_data_parser),
    "lora": ("LoRA fine-tuning of Stable Diffusion", _add_lora_parser),
    "foundation": ("the tiny foundation model fulora ships", _add_foundation_parser),
    "generate": ("generate a labelled synthetic dataset with a LoRA", _add_generate_parser),
    "classify": ("train plane classifiers", _add_classify_parser),
    "evaluate": ("evaluate a trained classifier on a test cohort", _add_evaluate_parser),
    "demo": ("run fulora end to end on embedded phantom data", _add_demo_parser),
    "experiment": ("the whole method from one config file", _add_experiment_parser),
    "audit": (
        "fidelity, diversity, memorisation and class consistency of synthetic data",
        _add_audit_parser,
    ),
    "report": ("(re)build the HTML report of an experiment folder", _add_report_parser),
}


def _stage_named(argv: Sequence[str]) -> str:
    """The stage an argument list names, or "" for none or an unknown one.

    Its first word not an option: the top-level options take no value.
    """
    words = [word for word in argv if not word.startswith("-")]
    return words[0] if words and words[0] in _STAGES else ""


def _parser_of(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)parser a command line ends in: its stage's, then its command's."""
    words = [word for word in argv if not word.startswith("-")]
    while True:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not commands:
            return parser
        chosen = next((commands[0].choices[w] for w in words if w in commands[0].choices), None)
        if chosen is None:
            return parser
        parser = chosen


def _did_you_mean(parser: argparse.ArgumentParser, argv: Sequence[str], unknown: list[str]) -> str:
    """`` (did you mean --per-class?)`` for flags close to one of the command's own."""
    own = [o for a in _parser_of(parser, argv)._actions for o in a.option_strings]
    close = {
        flag: difflib.get_close_matches(flag, own, n=2, cutoff=0.6)
        for flag in (word.split("=", 1)[0] for word in unknown if word.startswith("--"))
    }
    hints = [f"{' or '.join(found)} for {flag}" for flag, found in close.items() if found]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fulora`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_stage_named(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _parser_of(parser, argv).error(
            f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(parser, argv, unknown)}"
        )
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except FuloraError as err:
        print(f"fulora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fulora: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
