"""The ``fulora`` command: ``fulora <stage> ...``.

Each subcommand parses its arguments, builds its config and calls one library function; all
the work lives in the stage subpackages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fulora.errors import FuloraError

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
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


# ------------------------------------------------------------------------------------------
# fulora data ...
# ------------------------------------------------------------------------------------------
def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from fulora.data.inspect import inspect_manifest
    from fulora.data.readers import detect_layout, read_any

    layout = detect_layout(args.path)
    manifest = read_any(args.path, images_dir=args.images, on_missing="ignore")
    report = inspect_manifest(
        manifest, layout=layout, open_images=not args.no_images, decode=not args.quick
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from fulora.data.download import download_dataset

    manifest = download_dataset(
        args.name, args.dest, api=args.api, url=args.url, sha256=args.sha256, retries=args.retries
    )
    print(
        f"{args.name}: {len(manifest)} images in {args.dest}; manifest: "
        f"{Path(args.dest) / 'manifest.csv'}"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in manifest.counts("label").items()))
    return 0


def _cmd_data_phantom(args: argparse.Namespace) -> int:
    from fulora.config import load_config
    from fulora.data.phantom import PhantomConfig, generate_phantom
    from fulora.runs import RunDir

    config = load_config(
        PhantomConfig,
        args.config,
        args.set,
        values={
            "per_class": args.per_class,
            "domain": args.domain,
            "seed": args.seed,
            "planes": args.planes,
            "size": tuple(args.size) if args.size else None,
            "grid": False if args.no_grid else None,
        },
    )
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
    from fulora.data.readers import read_any

    parts = [read_any(p, images_dir=args.images, on_missing=args.on_missing) for p in args.sources]
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from fulora.demo import run_demo

    run_demo(args.out, per_class=args.per_class, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fulora`` command."""
    from fulora import __version__

    parser = argparse.ArgumentParser(
        prog="fulora",
        description="FU-LoRA: LoRA-generated synthetic data for fetal ultrasound classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"fulora {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)

    data = stages.add_parser("data", help="read, check, download and synthesise datasets")
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
    p.add_argument("--retries", type=int, default=3, help="resume attempts per file")
    p.set_defaults(func=_cmd_data_download)

    p = data_cmds.add_parser("phantom", help="procedural B-mode-like images (the demo data)")
    p.add_argument("out", help="output folder (a run folder)")
    p.add_argument("--per-class", type=int, help="images per plane and domain (default 20)")
    p.add_argument(
        "--domain",
        choices=["source", "target", "both"],
        help="which simulated machine (default source)",
    )
    p.add_argument("--seed", type=int, help="dataset seed (default 0)")
    p.add_argument("--planes", nargs="+", help="planes to draw (default the paper's five)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--config", help="YAML config (keys of PhantomConfig)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
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

    p = stages.add_parser("demo", help="run fulora end to end on embedded phantom data")
    p.add_argument("--out", default="demo-run", help="output folder (default demo-run)")
    p.add_argument("--per-class", type=int, default=24, help="phantom images per plane")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fulora`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except FuloraError as err:
        print(f"fulora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fulora: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
