"""``fulora report RUN_DIR``: one self-contained HTML page for an experiment folder.

The page embeds every figure as a data URI, so the single ``report.html`` opens offline and can
be mailed or attached to a paper's supplement; the PNGs it shows are also written beside it in
``RUN_DIR/report/``. It is built from the files of the experiment folder alone (``config.yaml``,
``plan.csv``, the stage folders and ``results/``), so it can be rebuilt at any time.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402
from markupsafe import Markup  # noqa: E402

from fulora import __version__
from fulora.config import from_dict  # noqa: E402
from fulora.data.images import thumbnail  # noqa: E402
from fulora.data.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from fulora.errors import DataError, FuloraError  # noqa: E402
from fulora.experiment.config import ExperimentConfig
from fulora.experiment.effects import display_effects
from fulora.experiment.layout import STAGE_MARKER, ExperimentLayout
from fulora.experiment.results import display_table
from fulora.figures import image_grid, save_figure  # noqa: E402
from fulora.io import atomic_open  # noqa: E402
from fulora.lora.config import LoraTrainConfig  # noqa: E402
from fulora.planes import PLANES  # noqa: E402
from fulora.report.embedding import POINTS_NAME, embedding_figure
from fulora.runs import CONFIG_NAME, DONE_NAME, now_iso  # noqa: E402
from fulora.shipped import shipped_model  # noqa: E402

logger = logging.getLogger("fulora")

_TEMPLATES = Environment(
    loader=PackageLoader("fulora.experiment", "templates"),
    autoescape=select_autoescape(["html", "j2"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:24px}
header p{margin:2px 0;opacity:.9}
main{max-width:1200px;margin:0 auto;padding:8px 32px 40px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;padding:8px 20px 16px;
margin:18px 0}
h2{border-bottom:2px solid #e63946;padding-bottom:4px;font-size:20px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border-bottom:1px solid #dde1e7;padding:4px 8px;text-align:right}
th{background:#eef1f5}
td:first-child,th:first-child{text-align:left}
.warn{background:#fff3cd;border:1px solid #e0c36a;border-radius:6px;padding:8px 12px}
.figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:6px 0}
figure img{max-width:100%;border:1px solid #dde1e7}
figcaption{font-size:12px;color:#555}
pre{background:#f0f2f5;padding:10px;overflow:auto;font-size:12px}
dl{display:grid;grid-template-columns:max-content auto;gap:3px 14px;font-size:14px}
dt{font-weight:600}
"""


T = TypeVar("T")


class _Figures:
    """Copies the PNGs the report shows into its folder and embeds them as data URIs."""

    def __init__(self, out: Path):
        self.out = out

    def __call__(
        self, path: Path | None, caption: str, name: str | None = None, width: int = 0
    ) -> dict[str, Any] | None:
        """The template's view of one figure, or None when ``path`` is not there."""
        if path is None or not path.is_file():
            return None
        target = self.out / (name or path.name)
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target)
        data = base64.b64encode(path.read_bytes()).decode()
        return {"src": f"data:image/png;base64,{data}", "caption": caption, "width": width}


def _table(frame: pd.DataFrame) -> Markup:
    """A table as HTML: pandas escapes every cell, so the template may insert it as is."""
    return Markup(frame.to_html(index=False, border=0, na_rep="", escape=True))


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.read(path) if path.is_file() else None
    except Exception:  # a report shows what it can
        logger.warning("report: cannot read %s", path)
        return None


def _counts(manifests: dict[str, Manifest]) -> pd.DataFrame:
    planes = [p for p in PLANES if any(p in m.counts() for m in manifests.values())]
    rows = []
    for name, manifest in manifests.items():
        counts = manifest.counts()
        domains = manifest.counts("domain")
        rows.append(
            {
                "images": name,
                **{p: counts.get(p, 0) for p in planes},
                "total": len(manifest),
                "patients": len({p for p in manifest.frame["patient"] if p}),
                "domains": ", ".join(f"{d or '-'} {n}" for d, n in domains.items()),
            }
        )
    return pd.DataFrame(rows)


def _real_vs_synthetic(out: Path, real: Manifest, synthetic: Manifest, k: int, title: str) -> Path:
    rng = np.random.default_rng(0)
    planes = [p for p in PLANES if p in real.counts() or p in synthetic.counts()]
    rows, labels = [], []
    sources = [(manifest, manifest.paths) for manifest in (real, synthetic)]
    for plane in planes:
        row = []
        for manifest, paths in sources:
            idx = np.flatnonzero(manifest.frame["label"].to_numpy() == plane)
            idx = np.sort(rng.choice(idx, min(k, len(idx)), replace=False)) if len(idx) else idx
            cells = [thumbnail(paths[i]) for i in idx]
            row += cells + [np.zeros((96, 128), np.uint8)] * (k - len(cells))
        rows.append(row)
        labels.append(plane)
    cols = [f"real {i + 1}" for i in range(k)] + [f"synthetic {i + 1}" for i in range(k)]
    return image_grid(out, rows, row_labels=labels, col_labels=cols, title=title, cell_inches=1.1)


def _bars(path: Path, table: pd.DataFrame, target: str) -> Path | None:
    part = table[(table["target"] == target) & (table["space"] == "all_outputs")]
    if part.empty:
        return None
    part = part.assign(
        group=part["Data"] + np.where(part["LoRA"] != "", " (" + part["LoRA"] + ")", "")
    )
    groups = list(dict.fromkeys(part["group"]))
    models = list(dict.fromkeys(part["Model"]))
    legend_rows = -(-len(groups) // 4)  # below the panels, 4 groups a row: never over a bar
    height = 3.4 + 0.22 * legend_rows
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 2.2 * len(models) * 1.5), height), sharey=True)
    width = 0.8 / len(groups)
    for ax, metric in zip(axes, ("ACC", "F-score", "AUC"), strict=True):
        for g, group in enumerate(groups):
            rows = part[part["group"] == group].set_index("Model").reindex(models)
            ax.bar(
                np.arange(len(models)) + (g - (len(groups) - 1) / 2) * width,
                rows[metric],
                width,
                yerr=rows[f"{metric} std"],
                capsize=2,
                label=group,
            )
        ax.set_title(metric)
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("% (mean over seeds, ± std)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(groups), 4), fontsize=7)
    fig.suptitle(f"Zero-shot on {target} (all outputs)", fontsize=11)
    fig.tight_layout(rect=(0, (0.1 + 0.22 * legend_rows) / height, 1, 1))
    return save_figure(fig, path)


def _read_protocol(run: Path) -> str:
    """The classifier protocol the results stage recorded (``results/protocol.txt``)."""
    path = ExperimentLayout(run).protocol
    return path.read_text().strip() if path.is_file() else "not recorded (results not written)"


@dataclass
class _StageRecord:
    """One stage of ``plan.csv`` and what its folder holds (stage marker, ``done.json``)."""

    stage: str
    kind: str
    path: Path
    state_at_start: str
    info: dict[str, Any]  # the stage marker: variant, regime, arch, seed, ...
    done: dict[str, Any]  # empty until the stage finished

    def config(self, kind: type[T]) -> T | None:
        """The stage's resolved config (its ``config.yaml``) as ``kind``.

        None when absent or unreadable: a report shows what it can, as for manifests.
        """
        path = self.path / CONFIG_NAME
        if not path.is_file():
            return None
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            return from_dict(kind, raw, source=str(path))
        except (OSError, yaml.YAMLError, FuloraError) as err:
            logger.warning("report: cannot read %s: %s", path, err)
            return None


def _stages(run: Path) -> list[_StageRecord]:
    plan = pd.read_csv(ExperimentLayout(run).plan, keep_default_na=False)
    return [
        _StageRecord(
            stage=row["stage"],
            kind=row["kind"],
            path=run / row["folder"],
            state_at_start=row["state_at_start"],
            info=_json(run / row["folder"] / STAGE_MARKER),
            done=_json(run / row["folder"] / DONE_NAME),
        )
        for _, row in plan.iterrows()
    ]


def _read_config(layout: ExperimentLayout) -> ExperimentConfig:
    """The experiment's resolved config, from a folder that ``fulora experiment run`` wrote.

    Raises:
        DataError: If the folder has no plan and config (not an experiment folder).
    """
    if not layout.plan.is_file() or not layout.config.is_file():
        raise DataError(
            f"{layout.root} is not an experiment folder (no plan.csv/config.yaml); pass the "
            "--out folder of `fulora experiment run`"
        )
    raw = yaml.safe_load(layout.config.read_text(encoding="utf-8")) or {}
    return from_dict(ExperimentConfig, raw, source=str(layout.config))


@dataclass
class _Experiment:
    """What every section reads: the folder, its config, stages and data."""

    run: Path
    layout: ExperimentLayout
    cfg: ExperimentConfig
    stages: list[_StageRecord]
    data: dict[str, Manifest]  # every image set by its name in the counts table
    synthetic: dict[str, Manifest]  # LoRA variant -> its generated images
    targets: dict[str, Manifest]
    figure: _Figures

    def of_kind(self, kind: str) -> list[_StageRecord]:
        """The stages of one kind, in plan order."""
        return [stage for stage in self.stages if stage.kind == kind]


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/report.html`` (self-contained) and its PNGs; return its path.

    Each section has its renderer (``_section_*``), which reads the experiment folder and
    returns the template's context; the HTML is ``templates/report.html.j2``.

    Raises:
        DataError: If ``run_dir`` is not the folder of ``fulora experiment run``.
    """
    run = Path(run_dir)
    layout = ExperimentLayout(run)
    cfg = _read_config(layout)
    layout.report.mkdir(exist_ok=True)
    experiment = _read_experiment(run, layout, cfg)
    title = f"fulora report: {cfg.name}"
    document = _TEMPLATES.get_template("report.html.j2").render(
        title=title,
        css=_CSS,
        built=now_iso(),
        source=str(run.resolve()),
        run=_section_run(experiment),
        loras=_section_loras(experiment),
        audits=_section_audits(experiment),
        results=_section_results(experiment),
        confusions=_section_confusions(experiment),
        embedding=_section_embedding(experiment),
        curves=_section_curves(experiment),
    )
    path = layout.report / "report.html"
    with atomic_open(path, "w") as handle:
        handle.write(document)
    logger.info("report: %s", path)
    return path


def _read_experiment(run: Path, layout: ExperimentLayout, cfg: ExperimentConfig) -> _Experiment:
    stages = _stages(run)
    data = {
        "LoRA training": _read_manifest(layout.data / "lora_train.csv"),
        "real training": _read_manifest(layout.data / "train.csv"),
    }
    synthetic: dict[str, Manifest] = {}
    for stage in (s for s in stages if s.kind == "generate"):
        manifest = _read_manifest(stage.path / MANIFEST_NAME)
        if manifest is not None:
            synthetic[stage.info.get("variant", stage.stage)] = manifest
            data[f"synthetic ({stage.info.get('variant', '')})"] = manifest
    targets = {
        p.stem.removeprefix("target-"): m
        for p in sorted(layout.data.glob("target-*.csv"))
        if (m := _read_manifest(p)) is not None
    }
    data.update({f"target: {k}": v for k, v in targets.items()})
    present = {k: v for k, v in data.items() if v is not None}
    figure = _Figures(layout.report)
    return _Experiment(run, layout, cfg, stages, present, synthetic, targets, figure)


def _section_run(e: _Experiment) -> dict[str, Any]:
    """What was run: the facts, images per plane and source, the stages, the config."""
    cfg, stages = e.cfg, e.stages
    tiny = Path(cfg.base).expanduser().joinpath("FULORA_TINY_MODEL.txt").is_file()
    loras = [
        f"{s.info.get('variant')}: rank {c.rank}, alpha {c.alpha}, {s.done.get('steps', '?')} steps"
        for s in e.of_kind("lora")
        if (c := s.config(LoraTrainConfig)) is not None
    ]
    regimes = [
        f"{name}: {', '.join(f'{k}={v}' for k, v in (r or {}).items()) or 'defaults'}"
        for name, r in cfg.classify.regimes.items()
    ]
    finished = sorted(s.done["finished"] for s in stages if s.done.get("finished"))
    compute = sum(float(s.done.get("seconds", 0)) for s in stages)
    shipped = (
        " (fulora's tiny foundation model, pretrained on phantom ultrasound: SD1.5's "
        "stand-in; see its MODEL_CARD.md)"
    )
    facts = {
        "Experiment": cfg.name + (f": {cfg.description}" if cfg.description else ""),
        "Stages": f"{len(finished)} of {len(stages)} finished"
        + (f", last at {finished[-1]}" if finished else ""),
        "Compute time": f"{compute / 60:.1f} min (sum over stages, all runs)",
        "Base model": cfg.base
        + (" (tiny, random weights)" if tiny else "")
        + (shipped if shipped_model(cfg.base) else ""),
        "LoRA variants": "; ".join(loras) or "none (no synthetic regime)",
        "Regimes": "; ".join(regimes),
        "Architectures": ", ".join(cfg.classify.archs),
        "Seeds": ", ".join(map(str, cfg.classify.seeds)),
        "Classifier protocol": _read_protocol(e.run),
        "Targets": ", ".join(cfg.data.targets),
        "fulora": __version__,
    }
    stage_rows = [
        {
            "stage": s.stage,
            "at start of last run": s.state_at_start,
            "finished": s.done.get("finished", "no"),
            "seconds": round(float(s.done.get("seconds", 0)), 1),
        }
        for s in stages
    ]
    return {
        "tiny": tiny,
        "facts": facts,
        "counts": _table(_counts(e.data)),
        "stages": _table(pd.DataFrame(stage_rows)),
        "config": e.layout.config.read_text(encoding="utf-8"),
    }


def _section_loras(e: _Experiment) -> list[dict[str, Any]]:
    """Per LoRA: real vs synthetic images per plane, the loss curve, end-of-training samples."""
    real = e.data.get("LoRA training") or e.data.get("real training")
    sections = []
    for stage in e.of_kind("lora"):
        variant = stage.info.get("variant", "")
        grid = None
        if real is not None and variant in e.synthetic:
            path = _real_vs_synthetic(
                e.layout.report / f"grid_{variant}.png",
                real,
                e.synthetic[variant],
                e.cfg.report.grid_per_plane,
                f"Real (LoRA training) vs synthetic ({variant}) per plane",
            )
            grid = e.figure(path, f"Real vs synthetic images, LoRA {variant}")
        latest = stage.path / "samples" / "latest.txt"
        sample = stage.path / "samples" / latest.read_text().strip() if latest.is_file() else None
        sections.append(
            {
                "variant": variant,
                "grid": grid,
                "loss": e.figure(
                    stage.path / "loss.png",
                    f"LoRA {variant}: training loss",
                    f"lora_loss_{variant}.png",
                    520,
                ),
                "samples": e.figure(
                    sample,
                    f"LoRA {variant}: fixed-seed samples at the end of training",
                    f"lora_samples_{variant}.png",
                    520,
                ),
            }
        )
    return sections


_AUDIT_FIGURES = (
    ("similarity.png", "nearest-neighbour similarities"),
    ("near_copies.png", "most similar synthetic/training pairs"),
    ("consistency.png", "prompted plane vs classifier"),
)


def _section_audits(e: _Experiment) -> list[dict[str, Any]]:
    """Per audited LoRA: the per-plane table and the audit's three figures."""
    audits = []
    for stage in e.of_kind("audit"):
        if not (stage.path / "audit.json").is_file():
            continue
        variant = stage.info.get("variant", "")
        per_plane = _table(pd.read_csv(stage.path / "per_plane.csv", keep_default_na=False))
        figures = [
            e.figure(stage.path / name, f"{variant}: {caption}", f"audit_{variant}_{name}", 520)
            for name, caption in _AUDIT_FIGURES
        ]
        audits.append(
            {
                "variant": variant,
                "extractor": _json(stage.path / "audit.json").get("extractor", ""),
                "table": per_plane,
                "figures": figures,
            }
        )
    return audits


def _section_results(e: _Experiment) -> dict[str, Any] | None:
    """The results tables per target and label space, bars, the paper comparison, domains."""
    results = e.layout.results / "results.csv"
    if not results.is_file():
        return None
    table = pd.read_csv(results, keep_default_na=False)
    targets = []
    for target in dict.fromkeys(table["target"]):
        spaces = []
        for space in ("all_outputs", "test_classes"):
            part = table[(table["target"] == target) & (table["space"] == space)]
            if not part.empty:
                spaces.append(
                    {
                        "title": space.replace("_", " "),
                        "images": int(part["# test"].iloc[0]),
                        "table": _table(display_table(table, space, target)),
                    }
                )
        bars = _bars(e.layout.report / f"bars_{target}.png", table, target)
        caption = f"ACC, F-score and AUC per architecture and regime on {target}"
        targets.append({"name": target, "spaces": spaces, "bars": e.figure(bars, caption)})
    comparison = e.layout.results / "comparison.csv"
    return {
        "targets": targets,
        "effects": _effects(e.layout.results / "effects.csv"),
        "protocol": _read_protocol(e.run),
        "comparison": _table(pd.read_csv(comparison).round(2)) if comparison.is_file() else None,
        "per_domain": _per_domain(e.layout.results / "per_domain.csv"),
    }


def _effects(path: Path) -> list[dict[str, Any]]:
    """Each regime against its baseline (``effects.csv``), one table per target, all outputs."""
    if not path.is_file():
        return []
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    return [
        {"target": target, "table": _table(display_effects(table, "all_outputs", target))}
        for target in dict.fromkeys(table["target"])
    ]


def _per_domain(path: Path) -> list[dict[str, Any]]:
    """Accuracy per domain (country / site), all outputs, one table per target."""
    if not path.is_file() or path.stat().st_size <= 2:
        return []
    per = pd.read_csv(path, keep_default_na=False)
    per = per[per["space"] == "all_outputs"]
    parts = []
    for target in dict.fromkeys(per["target"]):
        part = per[per["target"] == target]
        pivot = part.pivot_table(
            index=["Data", "LoRA", "Model"], columns="domain", values="ACC", sort=False
        ).round(1)
        counts = part.groupby("domain")["images"].first()
        pivot.columns = [f"{d} ({counts[d]})" for d in pivot.columns]
        parts.append({"target": target, "table": _table(pivot.reset_index())})
    return parts


def _first_seed(stages: list[_StageRecord], *keys: str) -> list[dict[str, Any]]:
    """One stage per distinct ``info`` values of ``keys`` (the first seed of each cell)."""
    seen, chosen = set(), []
    for stage in stages:
        key = tuple(stage.info.get(k) for k in keys)
        if key not in seen:
            seen.add(key)
            chosen.append(stage)
    return chosen


def _section_confusions(e: _Experiment) -> list[dict[str, Any]]:
    """A confusion matrix per target, cell and architecture (first seed)."""
    figures = []
    for stage in _first_seed(e.of_kind("evaluate"), "target", "label", "arch"):
        info = stage.info
        key = (info.get("target"), info.get("label"), info.get("arch"))
        name = "cm_" + "_".join(str(k).replace("/", "-") for k in key) + ".png"
        caption = f"{info.get('target')}: {info.get('label')}, {info.get('arch')}"
        path = stage.path / "confusion_matrix_all_outputs.png"
        figures.append(e.figure(path, caption, name, 360))
    return [f for f in figures if f]


def _section_embedding(e: _Experiment) -> dict[str, Any] | None:
    """The t-SNE that the ``embedding`` stage computed: real training, synthetic and target."""
    stage = next(iter(e.of_kind("embedding")), None)
    points = stage.path / POINTS_NAME if stage is not None else None
    if points is None or not stage.done or not points.is_file():
        return None
    info = stage.info
    path = embedding_figure(
        e.layout.report / "embedding_tsne.png",
        pd.read_csv(points, keep_default_na=False),
        title=f"t-SNE of {info.get('arch')} ({info.get('label')}, seed {info.get('seed')}) "
        "penultimate features per plane",
    )
    return e.figure(path, "t-SNE of classifier embeddings per plane, coloured by source")


def _section_curves(e: _Experiment) -> list[dict[str, Any]]:
    """Each classifier cell's loss and validation curves (first seed)."""
    figures = []
    for stage in _first_seed(e.of_kind("classify"), "label", "arch"):
        info = stage.info
        name = f"curve_{info.get('label')}_{info.get('arch')}.png"
        caption = f"{info.get('label')}, {info.get('arch')}"
        figures.append(e.figure(stage.path / "loss_curve.png", caption, name, 520))
    return [f for f in figures if f]
