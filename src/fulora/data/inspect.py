"""``fulora data inspect``: what is in a dataset, and what is wrong with it."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fulora.data.images import image_info, load_image
from fulora.data.manifest import Manifest
from fulora.data.readers import detect_layout, read_any
from fulora.errors import ImageLoadError


@dataclass
class InspectReport:
    """Counts, image properties and problems of a manifest."""

    origin: str
    layout: str
    images: int
    labels: dict[str, int]
    domains: dict[str, int]
    splits: dict[str, int]
    sources: dict[str, int]
    patients: int
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    modes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    missing: int = 0  # rows whose image file does not exist
    opened: bool = False  # whether the images were to be opened (not --no-images)
    hint: str = ""  # what to do about the problems, when one cause explains them

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return dict(self.__dict__)

    def format(self) -> str:
        """Human-readable summary."""

        def line(name: str, counts: dict[str, int]) -> str:
            body = ", ".join(f"{k or '(empty)'} {v}" for k, v in counts.items())
            return f"  {name:<9}{body}"

        out = [
            f"{self.origin} ({self.layout}): {self.images} images, {self.patients} patients",
            line("labels", self.labels),
            line("domains", self.domains),
            line("splits", self.splits),
            line("sources", self.sources),
        ]
        if self.checked:
            sizes = sorted(self.sizes.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k} ({v})" for k, v in sizes[:8])
            more = f", ... {len(sizes) - 8} more sizes" if len(sizes) > 8 else ""
            out.append(f"  sizes    {shown}{more}")
            out.append(line("modes", dict(sorted(self.modes.items()))))
            if len(self.modes) > 1:
                out.append("           (mixed colour modes: fulora converts all to one mode)")
        elif self.opened:
            out.append("  images   none could be opened (see the problems)")
        else:
            out.append("  images not opened (--no-images)")
        if self.problems:
            out.append(f"  problems ({len(self.problems)}):")
            out.extend(f"    - {p}" for p in self.problems[:20])
            if len(self.problems) > 20:
                out.append(f"    ... {len(self.problems) - 20} more (see --json)")
        else:
            out.append("  problems none found")
        if self.hint:
            out.append(f"  hint     {self.hint}")
        return "\n".join(out)


def inspect_manifest(
    manifest: Manifest,
    *,
    layout: str = "",
    open_images: bool = True,
    decode: bool = True,
    workers: int = 4,
) -> InspectReport:
    """Count a manifest's rows and check its images.

    Args:
        manifest: The dataset.
        layout: Name of the layout it was read from (for the report).
        open_images: Open every image to read its size and mode.
        decode: Also decode every image fully (finds truncated files; slower).
        workers: Threads for opening images.
    """
    frame = manifest.frame
    patients = frame["patient"][frame["patient"] != ""].nunique()
    report = InspectReport(
        origin=manifest.origin,
        layout=layout,
        images=len(manifest),
        labels=manifest.counts("label"),
        domains=manifest.counts("domain"),
        splits=manifest.counts("split"),
        sources=manifest.counts("source"),
        patients=int(patients),
    )
    duplicates = frame["path"][frame["path"].duplicated()]
    for path in duplicates.unique()[:20]:
        report.problems.append(f"listed more than once: {path}")
    missing = manifest.missing_files()
    report.missing = len(missing)
    for row, path in missing:
        report.problems.append(f"missing file (row {row}): {path}")
    if not open_images:
        return report
    report.opened = True
    present = sorted(set(range(len(manifest))) - {row for row, _ in missing})
    paths = manifest.paths

    def check(row: int) -> tuple[int, tuple[int, int] | None, str | None, str | None]:
        try:
            size, mode = image_info(paths[row])
            if decode:
                load_image(paths[row])
            return row, size, mode, None
        except ImageLoadError as err:
            return row, None, None, err.reason

    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(check, present)
        for row, size, mode, error in tqdm(
            results, total=len(present), desc="opening images", unit="img", leave=False
        ):
            if error is not None:
                report.problems.append(f"unreadable (row {row}): {paths[row]}: {error}")
                continue
            sizes[f"{size[0]}x{size[1]}"] += 1
            modes[mode] += 1
            report.checked += 1
    report.sizes = dict(sizes)
    report.modes = dict(modes)
    return report


def inspect_path(
    path: str | Path, *, images_dir: str | Path | None = None, **kwargs
) -> InspectReport:
    """Read any layout at ``path`` (missing images are reported, not fatal) and inspect it."""
    layout = detect_layout(path)
    manifest = read_any(path, images_dir=images_dir, on_missing="ignore")
    report = inspect_manifest(manifest, layout=layout, **kwargs)
    if layout != "manifest" and report.images and report.missing == report.images:
        # A CSV of image names whose images live elsewhere (FETAL_PLANES_DB's, the paper's);
        # a manifest's paths are its own, and --images does not apply to them.
        where = f" in {images_dir}" if images_dir is not None else " where the CSV is"
        report.hint = (
            f"none of the {report.images} images is{where}: pass the folder that holds them "
            "with --images FOLDER"
        )
    return report
