"""``fulora audit``: is the synthetic data faithful, diverse, new and of the right class.

Writes into the output folder:

* ``audit.json``: everything below, with the extractor, sample sizes and thresholds;
* ``per_plane.csv``: per plane and overall, FID, KID (mean, std, subset size), precision and
  recall (Kynkäänniemi et al.) against the reference images, the share of near-copies of the
  LoRA training images, the classifier's agreement and the share kept by the filter;
* ``synthetic_audit.csv``: one row per synthetic image (nearest training image by cosine and by
  SSIM, near-copy flag, the classifier's label and confidence, kept or not);
* ``similarity.png``: synthetic-to-training nearest-neighbour similarities next to the
  real-to-real ones (training images against other training patients), with the thresholds:
  the calibration of "near-copy"; ``near_copies.png``: the most similar pairs side by side;
  ``consistency.png``: prompted plane vs the classifier's label;
* with ``write_filtered``: a manifest of the synthetic images that pass the rules.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fulora.audit.config import AuditConfig
from fulora.audit.extractors import ClassifierExtractor, InceptionExtractor
from fulora.audit.fidelity import fidelity_metrics  # noqa: E402
from fulora.audit.memorisation import (  # noqa: E402
    aligned_pixels,
    cosine_nearest,
    same_image_or_patient,
    ssim_nearest,
)
from fulora.data.images import thumbnail  # noqa: E402
from fulora.data.manifest import Manifest  # noqa: E402
from fulora.errors import ConfigError, DataError  # noqa: E402
from fulora.figures import confusion_matrix_figure, image_grid, save_figure  # noqa: E402
from fulora.io import atomic_open, write_json  # noqa: E402
from fulora.planes import PLANES  # noqa: E402
from fulora.runs import RunDir  # noqa: E402

logger = logging.getLogger("fulora")


def _extractor(cfg: AuditConfig):

    kind = cfg.extractor
    if kind == "auto":
        kind = "classifier" if cfg.classifier else "inception"
    if kind == "classifier":
        if not cfg.classifier:
            raise ConfigError(
                "the classifier extractor needs --classifier RUN_DIR (a `fulora classify train` "
                "run trained on real images)"
            )
        return ClassifierExtractor(cfg.classifier, cfg.device, cfg.cache_dir)
    return InceptionExtractor(cfg.inception_weights, cfg.device)


def _planes(*manifests: Manifest) -> list[str]:
    present = set().union(*(set(m.labels) for m in manifests))
    return [p for p in PLANES if p in present]


def audit(
    synthetic: Manifest,
    reference: Manifest,
    out: str | Path,
    cfg: AuditConfig,
    *,
    train_set: Manifest | None = None,
    write_filtered: str | Path | None = None,
) -> dict[str, Any]:
    """Audit ``synthetic`` against ``reference`` (and ``train_set``, the LoRA's images).

    Args:
        synthetic: The synthetic images (their labels are the prompted planes).
        reference: Real images for fidelity and diversity (e.g. the real training set).
        out: Output folder.
        cfg: The configuration.
        train_set: The LoRA training images, for memorisation; None skips that part.
        write_filtered: Write the synthetic images that pass the rules to this manifest.

    Returns:
        The content of ``audit.json``.

    Raises:
        ConfigError: For a missing extractor or classifier.
        DataError: For empty inputs or unreadable images.
    """
    for name, manifest in (("synthetic", synthetic), ("reference", reference)):
        if len(manifest) == 0:
            raise DataError(f"the {name} manifest {manifest.origin} has no images")
    extractor = _extractor(cfg)  # fails fast (weights, classifiers) before any image is read
    classifier = extractor if cfg.extractor != "inception" and cfg.classifier else None
    if classifier is None and cfg.classifier:
        classifier = ClassifierExtractor(cfg.classifier, cfg.device, cfg.cache_dir)
    judges = _judges(classifier, cfg)
    run = RunDir(out, command="fulora audit").start(cfg)
    out = run.path
    try:
        result = _audit(synthetic, reference, out, cfg, train_set, extractor, judges)
        frame = result.pop("_rows")
        if write_filtered is not None:
            kept = frame["keep"].to_numpy()
            extra = frame.drop(columns=["path", "label"])
            filtered = Manifest(
                pd.concat([synthetic.frame.reset_index(drop=True), extra], axis=1)[kept],
                origin=str(write_filtered),
            )
            filtered.write(write_filtered)
            result["filtering"]["manifest"] = str(write_filtered)
            logger.info("kept %d of %d synthetic images: %s", kept.sum(), len(kept), write_filtered)
        write_json(out / "audit.json", result)
        run.finish(
            synthetic=len(synthetic),
            reference=len(reference),
            kept=int(frame["keep"].sum()),
            filtered_manifest=str(write_filtered) if write_filtered else None,
        )
    finally:
        run.close()
    return result


def _judges(classifier, cfg: AuditConfig) -> list[ClassifierExtractor]:
    """The classifiers whose mean probabilities label the synthetic images (none: no labels).

    Raises:
        ConfigError: An ensemble run knows other planes than ``--classifier``'s.
    """
    if classifier is None:
        return []
    judges = [classifier]
    for run_dir in cfg.ensemble:
        judge = ClassifierExtractor(run_dir, cfg.device, cfg.cache_dir)
        if judge.classes != classifier.classes:
            raise ConfigError(
                f"the ensemble's {run_dir} knows the planes {judge.classes}, --classifier's "
                f"{classifier.run_dir} {classifier.classes}: average runs trained on the same "
                "planes"
            )
        judges.append(judge)
    return judges


def _audit(synthetic, reference, out, cfg, train_set, extractor, judges) -> dict[str, Any]:
    syn_proba = None
    if judges and judges[0] is extractor:
        syn_feats, syn_proba = extractor.run(synthetic, "synthetic")
    else:
        syn_feats = extractor.features(synthetic, "synthetic")
        if judges:
            syn_proba = judges[0].run(synthetic, "synthetic (classifier)")[1]
    if len(judges) > 1:  # the mean of every judge's probabilities
        others = [
            j.run(synthetic, f"synthetic (ensemble {k})")[1]
            for k, j in enumerate(judges[1:], start=2)
        ]
        syn_proba = np.mean([syn_proba, *others], axis=0)
    ref_feats = extractor.features(reference, "reference")
    labels = np.array(synthetic.labels)
    ref_labels = np.array(reference.labels)
    result: dict[str, Any] = {
        "extractor": extractor.name,
        "images": {"synthetic": len(synthetic), "reference": len(reference)},
        "thresholds": {"ssim": cfg.near_copy_ssim, "cosine": cfg.near_copy_cosine},
    }
    rows = pd.DataFrame({"path": synthetic.frame["path"].to_numpy(), "label": labels})

    # Fidelity and diversity, per plane and overall.
    def fidelity(mask_s, mask_r):
        return fidelity_metrics(
            syn_feats[mask_s],
            ref_feats[mask_r],
            kid_subsets=cfg.kid_subsets,
            kid_subset_size=cfg.kid_subset_size,
            neighborhood=cfg.prc_neighborhood,
            seed=cfg.seed,
        )

    planes = _planes(synthetic)
    per_plane = {p: fidelity(labels == p, ref_labels == p) for p in planes}
    overall = fidelity(np.ones(len(labels), bool), np.ones(len(ref_labels), bool))
    result["fidelity"] = {"overall": overall, "per_plane": per_plane}

    # Memorisation against the LoRA training images.
    keep = np.ones(len(synthetic), bool)
    if train_set is not None and len(train_set):
        result["images"]["train_set"] = len(train_set)
        memo, rows = _memorisation(synthetic, train_set, syn_feats, extractor, cfg, rows, out)
        result["memorisation"] = memo
        if cfg.drop_near_copies:
            keep &= ~rows["near_copy"].to_numpy()

    # Class consistency with a classifier trained on real images.
    if syn_proba is not None:
        summary, agrees, p_label = _consistency(syn_proba, judges, labels, planes, rows, out)
        result["consistency"] = summary
        if cfg.require_agreement:
            keep &= agrees
        keep &= p_label >= cfg.min_confidence
    rows["keep"] = keep
    result["filtering"] = {
        "rules": {
            "drop_near_copies": cfg.drop_near_copies and "memorisation" in result,
            "require_agreement": cfg.require_agreement and syn_proba is not None,
            "min_confidence": cfg.min_confidence if syn_proba is not None else None,
        },
        "kept": int(keep.sum()),
        "per_plane": {p: int(keep[labels == p].sum()) for p in planes},
    }
    table = _per_plane_table(planes, labels, per_plane, overall, rows, keep)
    with atomic_open(out / "per_plane.csv", "w", newline="") as handle:
        pd.DataFrame(table).to_csv(handle, index=False)
    with atomic_open(out / "synthetic_audit.csv", "w", newline="") as handle:
        rows.to_csv(handle, index=False)
    result["_rows"] = rows
    return result


def _consistency(syn_proba, judges, labels, planes, rows, out):
    """Do the classifiers trained on real images see the prompted plane? Adds columns to rows.

    ``syn_proba`` is their mean probabilities (one classifier: its own).

    Returns:
        (summary for ``audit.json``, agreement per image, probability of the prompted plane)
    """
    classes = judges[0].classes
    predicted = np.array(classes)[syn_proba.argmax(1)]
    p_label = np.array(
        [syn_proba[i, classes.index(y)] if y in classes else 0.0 for i, y in enumerate(labels)]
    )
    agrees = predicted == labels
    rows["predicted"] = predicted
    rows["p_label"] = p_label.round(6)
    rows["agrees"] = agrees
    cm = np.array(
        [[int(((labels == a) & (predicted == b)).sum()) for b in classes] for a in planes]
    )
    confusion_matrix_figure(
        out / "consistency.png",
        cm,
        planes,
        classes,
        title=f"Prompted plane vs {judged_by(len(judges))} ({100 * agrees.mean():.1f}% agree)",
    )
    summary = {
        "classifier": str(judges[0].run_dir),
        "ensemble": [str(j.run_dir) for j in judges[1:]],
        "classes": classes,
        "agreement": 100 * float(agrees.mean()),
        "per_plane": {p: 100 * float(agrees[labels == p].mean()) for p in planes},
        "mean_confidence": {p: float(p_label[labels == p].mean()) for p in planes},
        "confusion": {"rows": planes, "columns": classes, "counts": cm.tolist()},
    }
    return summary, agrees, p_label


def judged_by(n_classifiers: int) -> str:
    """Who labelled the synthetic images, for titles: one classifier or a mean of several."""
    return "classifier" if n_classifiers == 1 else f"{n_classifiers} classifiers (mean)"


def _per_plane_table(planes, labels, per_plane, overall, rows, keep) -> list[dict[str, Any]]:
    """``per_plane.csv``: fidelity, near-copies, agreement and kept images per plane."""
    table = []
    for plane in [*planes, "overall"]:
        mask = labels == plane if plane != "overall" else np.ones(len(labels), bool)
        fid = per_plane.get(plane, overall)
        row = {
            "plane": plane,
            "synthetic": int(mask.sum()),
            "reference": fid["n_reference"],
            "FID": round(fid["fid"], 3),
            "KID": round(fid["kid_mean"], 5),
            "KID std": round(fid["kid_std"], 5),
            "KID subset": fid["kid_subset_size"],
            "precision": round(fid["precision"], 3),
            "recall": round(fid["recall"], 3),
        }
        if "near_copy" in rows:
            row["near-copies %"] = round(100 * float(rows["near_copy"][mask].mean()), 2)
        if "agrees" in rows:
            row["agreement %"] = round(100 * float(rows["agrees"][mask].mean()), 2)
        row["kept"] = int(keep[mask].sum())
        table.append(row)
    return table


def _memorisation(synthetic, train_set, syn_feats, extractor, cfg, rows, out):
    train_feats = extractor.features(train_set, "LoRA training images")
    syn_px = aligned_pixels(synthetic, cfg.image_size, "synthetic pixels")
    train_px = aligned_pixels(train_set, cfg.image_size, "training pixels")
    # Centred on the training images' mean: post-ReLU features all point the same way, and
    # raw cosines crowd near 1 whatever the image.
    centre = train_feats.mean(axis=0, keepdims=True)
    syn_feats, train_feats = syn_feats - centre, train_feats - centre
    cos_idx, cos = cosine_nearest(syn_feats, train_feats)
    ssim_idx, ssim = ssim_nearest(syn_px, train_px, extra=cos_idx, shortlist=cfg.shortlist)
    # Calibration: each training image against the other training patients.
    same = same_image_or_patient(train_set)
    real_cos = real_ssim = np.zeros(0)
    if (~same).any(axis=1).all():
        r_idx, real_cos = cosine_nearest(train_feats, train_feats, exclude=same)
        _, real_ssim = ssim_nearest(
            train_px, train_px, extra=r_idx, exclude=same, shortlist=cfg.shortlist
        )
    near = ssim >= cfg.near_copy_ssim
    if cfg.near_copy_cosine is not None:
        near |= cos >= cfg.near_copy_cosine
    train_paths = np.array(train_set.paths)
    rows["nn_cosine_path"] = train_paths[cos_idx]
    rows["nn_cosine"] = cos.round(6)
    rows["nn_ssim_path"] = train_paths[ssim_idx]
    rows["nn_ssim"] = ssim.round(6)
    rows["near_copy"] = near
    labels = rows["label"].to_numpy()

    def share_above(values, threshold):
        return 100 * float((values >= threshold).mean()) if len(values) else math.nan

    memo = {
        "near_copies": int(near.sum()),
        "share_percent": 100 * float(near.mean()),
        "per_plane_percent": {p: 100 * float(near[labels == p].mean()) for p in _planes(synthetic)},
        "synthetic_to_train": _summary(cos, ssim),
        "real_to_real": _summary(real_cos, real_ssim),
        "real_to_real_above_threshold_percent": {
            "ssim": share_above(real_ssim, cfg.near_copy_ssim),
            "cosine": share_above(real_cos, cfg.near_copy_cosine)
            if cfg.near_copy_cosine is not None
            else None,
        },
    }
    _similarity_figure(out / "similarity.png", cos, ssim, real_cos, real_ssim, cfg)
    order = np.argsort(-ssim)[: cfg.gallery]
    if len(order):
        synthetic_paths = synthetic.paths
        grid_rows = [
            [thumbnail(synthetic_paths[i]), thumbnail(train_paths[ssim_idx[i]])] for i in order
        ]
        image_grid(
            out / "near_copies.png",
            grid_rows,
            row_labels=[
                f"{labels[i]}\nSSIM {ssim[i]:.2f}\ncos {cos[i]:.3f}" + (" *" if near[i] else "")
                for i in order
            ],
            col_labels=["synthetic", "nearest training image (SSIM)"],
            title="Most similar synthetic/training pairs (* = flagged near-copy)",
            cell_inches=1.8,
        )
    return memo, rows


def _summary(cos: np.ndarray, ssim: np.ndarray) -> dict[str, Any]:
    def stats(v):
        if not len(v):
            return None
        return {
            "n": int(len(v)),
            "median": float(np.median(v)),
            "p95": float(np.quantile(v, 0.95)),
            "max": float(v.max()),
        }

    return {"cosine": stats(cos), "ssim": stats(ssim)}


def _similarity_figure(path, cos, ssim, real_cos, real_ssim, cfg) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, syn, real, threshold, name in (
        (axes[0], ssim, real_ssim, cfg.near_copy_ssim, "SSIM (aligned grayscale)"),
        (axes[1], cos, real_cos, cfg.near_copy_cosine, "embedding cosine (centred)"),
    ):
        low = min(float(np.min(syn)), float(np.min(real)) if len(real) else 1.0, 0.0)
        bins = np.linspace(low, 1, 41)
        ax.hist(
            syn, bins=bins, alpha=0.6, density=True, label=f"synthetic -> training ({len(syn)})"
        )
        if len(real):
            ax.hist(
                real,
                bins=bins,
                alpha=0.6,
                density=True,
                label=f"real -> other real patients ({len(real)})",
            )
        if threshold is not None:
            ax.axvline(
                threshold, color="red", linestyle="--", label=f"near-copy threshold {threshold}"
            )
        ax.set_xlabel(f"nearest-neighbour {name}")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(
        "Memorisation: how close is each image to its nearest LoRA training image?", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path)
