"""``fulora report RUN_DIR``: one self-contained HTML page for an experiment folder.

The page embeds every figure as a data URI, so the single ``report.html`` opens offline and can
be mailed or attached to a paper's supplement; the PNGs it shows are also written beside it in
``RUN_DIR/report/``. It is built from the files of the experiment folder alone (``config.yaml``,
``plan.csv``, the stage folders and ``results/``), so it can be rebuilt at any time.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from fulora import __version__
from fulora.config import from_dict  # noqa: E402
from fulora.data.images import thumbnail  # noqa: E402
from fulora.data.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from fulora.errors import DataError  # noqa: E402
from fulora.experiment.config import ExperimentConfig
from fulora.experiment.layout import STAGE_MARKER, ExperimentLayout
from fulora.experiment.results import display_table
from fulora.figures import image_grid, save_figure  # noqa: E402
from fulora.io import atomic_open  # noqa: E402
from fulora.planes import PLANES  # noqa: E402
from fulora.report.embedding import embedding_figure
from fulora.runs import CONFIG_NAME, DONE_NAME, now_iso  # noqa: E402
from fulora.shipped import shipped_model  # noqa: E402

logger = logging.getLogger("fulora")

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


class _Page:
    """Collects HTML parts and the PNGs they show."""

    def __init__(self, out: Path):
        self.out = out
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def table(self, frame: pd.DataFrame) -> None:
        self.add(frame.to_html(index=False, border=0, na_rep="", escape=True))

    def image(self, path: Path, caption: str = "", name: str | None = None, width: int = 0) -> None:
        """Embed a PNG (and copy it into the report folder under ``name``)."""
        if not path.is_file():
            return
        target = self.out / (name or path.name)
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target)
        data = base64.b64encode(path.read_bytes()).decode()
        style = f' style="width:{width}px"' if width else ""
        self.add(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}"'
            f"{style}><figcaption>{html.escape(caption)}</figcaption></figure>"
        )


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
    for plane in planes:
        row = []
        for manifest in (real, synthetic):
            idx = np.flatnonzero(manifest.frame["label"].to_numpy() == plane)
            idx = np.sort(rng.choice(idx, min(k, len(idx)), replace=False)) if len(idx) else idx
            cells = [thumbnail(manifest.paths[i]) for i in idx]
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
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 2.2 * len(models) * 1.5), 3.4), sharey=True)
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
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Zero-shot on {target} (all outputs)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def _read_protocol(run: Path) -> str:
    """The classifier protocol the results stage recorded (``results/protocol.txt``)."""
    path = ExperimentLayout(run).protocol
    return path.read_text().strip() if path.is_file() else "not recorded (results not written)"


def _stages(run: Path) -> list[dict[str, Any]]:
    plan = pd.read_csv(ExperimentLayout(run).plan, keep_default_na=False)
    rows = []
    for _, row in plan.iterrows():
        folder = run / row["folder"]
        info = _json(folder / STAGE_MARKER)
        done = _json(folder / DONE_NAME)
        rows.append({**row.to_dict(), "path": folder, "info": info, "done": done})
    return rows


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


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/report.html`` (self-contained) and its PNGs; return its path.

    Raises:
        DataError: If ``run_dir`` is not the folder of ``fulora experiment run``.
    """
    run = Path(run_dir)
    layout = ExperimentLayout(run)
    cfg = _read_config(layout)
    out = layout.report
    out.mkdir(exist_ok=True)
    page = _Page(out)
    stages = _stages(run)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for stage in stages:
        by_kind.setdefault(stage["kind"], []).append(stage)

    # ---- what was run ----------------------------------------------------------------------
    data = {
        "LoRA training": _read_manifest(layout.data / "lora_train.csv"),
        "real training": _read_manifest(layout.data / "train.csv"),
    }
    synthetic: dict[str, Manifest] = {}
    for stage in by_kind.get("generate", []):
        manifest = _read_manifest(stage["path"] / MANIFEST_NAME)
        if manifest is not None:
            synthetic[stage["info"].get("variant", stage["stage"])] = manifest
            data[f"synthetic ({stage['info'].get('variant', '')})"] = manifest
    targets = {
        p.stem.removeprefix("target-"): m
        for p in sorted(layout.data.glob("target-*.csv"))
        if (m := _read_manifest(p)) is not None
    }
    data.update({f"target: {k}": v for k, v in targets.items()})
    data = {k: v for k, v in data.items() if v is not None}

    page.add("<section><h2>What was run</h2>")
    tiny = Path(cfg.base).expanduser().joinpath("FULORA_TINY_MODEL.txt").is_file()
    if tiny:
        page.add(
            '<p class="warn"><b>Tiny random model.</b> The base model of this run is fulora\'s '
            "tiny Stable Diffusion-architecture model with random weights: its synthetic images "
            "are not ultrasound, and the numbers below show the plumbing, not the method. For "
            "real results set <code>base</code> to SD1.5 weights (a hub id, a diffusers folder "
            "or <code>v1-5-pruned.safetensors</code>).</p>"
        )
    loras = []
    for stage in by_kind.get("lora", []):
        lcfg = (
            yaml.safe_load((stage["path"] / CONFIG_NAME).read_text())
            if (stage["path"] / CONFIG_NAME).is_file()
            else {}
        )
        loras.append(
            f"{stage['info'].get('variant')}: rank {lcfg.get('rank')}, alpha {lcfg.get('alpha')}, "
            f"{stage['done'].get('steps', '?')} steps"
        )
    regimes = [
        f"{name}: {', '.join(f'{k}={v}' for k, v in (r or {}).items()) or 'defaults'}"
        for name, r in cfg.classify.regimes.items()
    ]
    finished = sorted(s["done"]["finished"] for s in stages if s["done"].get("finished"))
    compute = sum(float(s["done"].get("seconds", 0)) for s in stages)
    facts = {
        "Experiment": cfg.name + (f": {cfg.description}" if cfg.description else ""),
        "Stages": f"{len(finished)} of {len(stages)} finished"
        + (f", last at {finished[-1]}" if finished else ""),
        "Compute time": f"{compute / 60:.1f} min (sum over stages, all runs)",
        "Base model": cfg.base
        + (" (tiny, random weights)" if tiny else "")
        + (
            " (fulora's tiny foundation model, pretrained on phantom ultrasound: SD1.5's "
            "stand-in; see its MODEL_CARD.md)"
            if shipped_model(cfg.base)
            else ""
        ),
        "LoRA variants": "; ".join(loras) or "none (no synthetic regime)",
        "Regimes": "; ".join(regimes),
        "Architectures": ", ".join(cfg.classify.archs),
        "Seeds": ", ".join(map(str, cfg.classify.seeds)),
        "Classifier protocol": _read_protocol(run),
        "Targets": ", ".join(cfg.data.targets),
        "fulora": __version__,
    }
    page.add(
        "<dl>"
        + "".join(
            f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()
        )
        + "</dl>"
    )
    page.add("<h3>Images per plane and source</h3>")
    page.table(_counts(data))
    page.add("<h3>Stages</h3>")
    page.table(
        pd.DataFrame(
            [
                {
                    "stage": s["stage"],
                    "at start of last run": s["state_at_start"],
                    "finished": s["done"].get("finished", "no"),
                    "seconds": round(float(s["done"].get("seconds", 0)), 1),
                }
                for s in stages
            ]
        )
    )
    page.add(
        "<details><summary>Resolved configuration (config.yaml)</summary><pre>"
        + html.escape(layout.config.read_text(encoding="utf-8"))
        + "</pre></details></section>"
    )

    # ---- images and LoRA training ----------------------------------------------------------
    if by_kind.get("lora"):
        page.add("<section><h2>Real and synthetic images; LoRA training</h2>")
        real = data.get("LoRA training") or data.get("real training")
        for stage in by_kind["lora"]:
            variant = stage["info"].get("variant", "")
            page.add(f"<h3>LoRA {html.escape(variant)}</h3>")
            if real is not None and variant in synthetic:
                grid = _real_vs_synthetic(
                    out / f"grid_{variant}.png",
                    real,
                    synthetic[variant],
                    cfg.report.grid_per_plane,
                    f"Real (LoRA training) vs synthetic ({variant}) per plane",
                )
                page.image(grid, f"Real vs synthetic images, LoRA {variant}")
            page.add('<div class="figs">')
            page.image(
                stage["path"] / "loss.png",
                f"LoRA {variant}: training loss",
                f"lora_loss_{variant}.png",
                520,
            )
            latest = stage["path"] / "samples" / "latest.txt"
            if latest.is_file():
                sample = stage["path"] / "samples" / latest.read_text().strip()
                page.image(
                    sample,
                    f"LoRA {variant}: fixed-seed samples at the end of training",
                    f"lora_samples_{variant}.png",
                    520,
                )
            page.add("</div>")
        page.add("</section>")

    # ---- synthetic-data audit ------------------------------------------------------------
    audits = [s for s in by_kind.get("audit", []) if (s["path"] / "audit.json").is_file()]
    if audits:
        page.add("<section><h2>Synthetic data audit</h2>")
        page.add(
            "<p>Fidelity and diversity against the real training images (FID, KID with its "
            "subset size, precision/recall of Kynkäänniemi et al.), near-copies of the LoRA "
            "training images (SSIM of aligned images at or above the threshold), and agreement "
            "of a classifier trained on real images with the prompted plane. The similarity "
            "figure calibrates the threshold: real images against other real patients.</p>"
        )
        for stage in audits:
            variant = stage["info"].get("variant", "")
            result = _json(stage["path"] / "audit.json")
            page.add(
                f"<h3>LoRA {html.escape(variant)} ({html.escape(result.get('extractor', ''))})</h3>"
            )
            page.table(pd.read_csv(stage["path"] / "per_plane.csv", keep_default_na=False))
            page.add('<div class="figs">')
            for name, caption in (
                ("similarity.png", "nearest-neighbour similarities"),
                ("near_copies.png", "most similar synthetic/training pairs"),
                ("consistency.png", "prompted plane vs classifier"),
            ):
                page.image(
                    stage["path"] / name, f"{variant}: {caption}", f"audit_{variant}_{name}", 520
                )
            page.add("</div>")
        page.add("</section>")

    # ---- results ---------------------------------------------------------------------------
    results = layout.results / "results.csv"
    if results.is_file():
        table = pd.read_csv(results, keep_default_na=False)
        page.add("<section><h2>Zero-shot results</h2>")
        page.add(
            "<p>Mean ± std over seeds, with the 95% interval of the seed mean from a "
            "patient-level bootstrap in brackets. <i>All outputs</i>: the model's arg-max over "
            "every class it was trained on (a prediction of a plane absent from the target "
            "counts as wrong), as in the paper; <i>test classes</i>: arg-max over the planes "
            "present in the target only. AUC: macro one-vs-rest from probabilities. AUC "
            "(paper): the FU-LoRA notebook's function, as every AUC in the paper's table was "
            "computed: one-vs-rest from hard predictions, where a prediction of a plane absent "
            "from the target (<i>other</i>) counts as a positive for every plane.</p>"
        )
        for target in dict.fromkeys(table["target"]):
            for space in ("all_outputs", "test_classes"):
                part = table[(table["target"] == target) & (table["space"] == space)]
                if part.empty:
                    continue
                page.add(
                    f"<h3>{html.escape(str(target))}: {space.replace('_', ' ')} "
                    f"({int(part['# test'].iloc[0])} test images)</h3>"
                )
                page.table(display_table(table, space, target))
            bars = _bars(out / f"bars_{target}.png", table, target)
            if bars is not None:
                page.image(bars, f"ACC, F-score and AUC per architecture and regime on {target}")
        comparison = layout.results / "comparison.csv"
        if comparison.is_file():
            page.add("<h3>Against the paper's table (all outputs; diff = ours - paper)</h3>")
            page.add(
                "<p>Ours: " + html.escape(_read_protocol(run)) + ". The paper's AUC column is "
                "compared with our <i>AUC (paper)</i>: its notebook's formula, which counts a "
                "prediction of <i>other</i> (absent from the test set) as a positive for every "
                "plane; <i>AUC</i> is the proper one-vs-rest AUC from probabilities.</p>"
            )
            page.table(pd.read_csv(comparison).round(2))
        domains = layout.results / "per_domain.csv"
        if domains.is_file() and domains.stat().st_size > 2:
            per = pd.read_csv(domains, keep_default_na=False)
            per = per[per["space"] == "all_outputs"]
            if not per.empty:
                page.add(
                    "<h3>Per domain (country / site): accuracy, all outputs, mean over seeds</h3>"
                )
                for target in dict.fromkeys(per["target"]):
                    part = per[per["target"] == target]
                    pivot = part.pivot_table(
                        index=["Data", "LoRA", "Model"], columns="domain", values="ACC", sort=False
                    ).round(1)
                    counts = part.groupby("domain")["images"].first()
                    pivot.columns = [f"{d} ({counts[d]})" for d in pivot.columns]
                    page.add(f"<p>{html.escape(str(target))}</p>")
                    page.table(pivot.reset_index())
        page.add("</section>")

    # ---- confusion matrices -------------------------------------------------------------------
    evaluations = by_kind.get("evaluate", [])
    if evaluations:
        page.add("<section><h2>Confusion matrices</h2><p>First seed of each cell, all outputs.</p>")
        seen = set()
        page.add('<div class="figs">')
        for stage in evaluations:
            info = stage["info"]
            key = (info.get("target"), info.get("label"), info.get("arch"))
            if key in seen:
                continue
            seen.add(key)
            name = "cm_" + "_".join(str(k).replace("/", "-") for k in key) + ".png"
            page.image(
                stage["path"] / "confusion_matrix_all_outputs.png",
                f"{info.get('target')}: {info.get('label')}, {info.get('arch')}",
                name,
                360,
            )
        page.add("</div></section>")

    # ---- embeddings --------------------------------------------------------------------------
    classifiers = by_kind.get("classify", [])
    if cfg.report.embedding and classifiers and data.get("real training") is not None:
        chosen = _embedding_model(classifiers, cfg.report.embedding_model)
        if chosen is not None:
            info = chosen["info"]
            groups = {"real training": data["real training"]}
            variant = info.get("lora") or next(iter(synthetic), None)
            if variant in synthetic:
                groups["synthetic"] = synthetic[variant]
            if targets:
                groups["target cohort"] = next(iter(targets.values()))
            figure = embedding_figure(
                out / "embedding_tsne.png",
                chosen["path"],
                groups,
                per_group=cfg.report.embedding_per_group,
                cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else layout.cache,
                device=cfg.device,
                title=f"t-SNE of {info.get('arch')} ({info.get('label')}, seed {info.get('seed')}) "
                "penultimate features per plane",
            )
            if figure is not None:
                page.add("<section><h2>Embeddings</h2>")
                page.add(
                    "<p>t-SNE per plane of the chosen classifier's penultimate-layer features: "
                    "real training images, synthetic images and the target cohort. Overlap of "
                    "the synthetic and target clouds means the synthetic data carried the "
                    "classifier's view of the training data towards the unseen site.</p>"
                )
                page.image(figure, "t-SNE of classifier embeddings per plane, coloured by source")
                page.add("</section>")

    # ---- audit (issue 7) and classifier training curves ---------------------------------------
    if classifiers:
        page.add(
            "<section><h2>Classifier training</h2><details><summary>Loss and validation "
            "curves (first seed of each cell)</summary><div class='figs'>"
        )
        seen = set()
        for stage in classifiers:
            info = stage["info"]
            key = (info.get("label"), info.get("arch"))
            if key in seen:
                continue
            seen.add(key)
            page.image(
                stage["path"] / "loss_curve.png",
                f"{info.get('label')}, {info.get('arch')}",
                "curve_" + "_".join(str(k) for k in key) + ".png",
                520,
            )
        page.add("</div></details></section>")

    body = "\n".join(page.parts)
    title = f"fulora report: {cfg.name}"
    document = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1>"
        f"<p>FU-LoRA: LoRA-tuned diffusion, synthetic images, zero-shot classifiers.</p>"
        f"<p>Built {now_iso()} from {html.escape(str(run.resolve()))}</p></header>"
        f"<main>{body}</main></body></html>"
    )
    path = out / "report.html"
    with atomic_open(path, "w") as handle:
        handle.write(document)
    logger.info("report: %s", path)
    return path


def _embedding_model(
    classifiers: list[dict[str, Any]], wanted: str | None
) -> dict[str, Any] | None:
    finished = [s for s in classifiers if s["done"]]
    if wanted:
        for stage in finished:
            info = stage["info"]
            if wanted in (
                f"{info.get('label')}/{info.get('arch')}/seed-{info.get('seed')}",
                stage["stage"],
            ):
                return stage
        raise DataError(
            f"report.embedding_model {wanted!r} is not a finished classifier; use one of "
            + ", ".join(s["stage"].removeprefix("classify/") for s in finished)
        )
    hybrid = [s for s in finished if s["info"].get("lora")]
    return (hybrid or finished or [None])[0]
