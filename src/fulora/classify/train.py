"""Training plane classifiers on real, synthetic or hybrid manifests.

Two presets ship in ``configs/``. ``classify-paper.yaml`` is the FU-LoRA notebook's protocol
exactly: 224 px (PIL bilinear), SGD lr 1e-3 momentum 0.9, batch 24, 20 epochs, cross-entropy,
no normalisation, torchvision's ImageNet V1 weights, fp32, every image trains and the model
after the last epoch is the one evaluated. ``classify-sound.yaml`` is fulora's: a
patient-level held-out validation split of the real images, the best epoch by macro F1,
ImageNet normalisation and mixed precision. ``augment: da`` is the notebook's augmentation
(random rotation ±15°, RandomResizedCrop(224, scale 0.08-1), horizontal flip).

A run folder holds ``config.yaml``, ``train_manifest.csv`` and ``val_manifest.csv`` (exactly
which images were used; no validation file when there is no validation set), ``history.csv``
and ``loss_curve.png``, ``best.pt`` (the selected model: the best epoch, or the last with
``select: last``, with its classes, preprocessing and weights provenance), ``last.pt`` (full
state, for resume), ``log.txt`` and ``done.json``. An interrupted run resumes at the last
finished epoch with the same results as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fulora.classify.config import ClassifyConfig, validation_needs
from fulora.classify.mix import is_synthetic, mix_manifests
from fulora.classify.registry import ModelInfo, check_input_size, create_model, resolve_arch
from fulora.config import (
    require_device,
    resolve_device,
)
from fulora.data.cache import PreprocessCache, default_cache_dir
from fulora.data.dataset import ManifestDataset
from fulora.data.manifest import (
    Manifest,
    check_trained_on,
    describe_seen,
    images_seen,
    with_content_hashes,
)
from fulora.errors import ConfigError, DataError, NonFiniteError
from fulora.figures import training_curves
from fulora.io import atomic_path, write_text
from fulora.planes import PLANES, check_planes
from fulora.runs import DONE_NAME, TRAIN_MANIFEST_NAME, RunDir, check_finite_weights

logger = logging.getLogger("fulora")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(cfg_augment: str, size: int, normalize: str):
    """(train transform, eval transform) on float tensors (C, H, W) in [0, 1]."""
    from torchvision.transforms import v2

    norm = [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize == "imagenet" else []
    evaluation = v2.Compose(norm) if norm else None
    if cfg_augment == "da":
        train = v2.Compose(
            [
                v2.RandomRotation(15),
                v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                *norm,
            ]
        )
    else:
        train = evaluation
    return train, evaluation


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _save(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def split_train_val(
    training: Manifest, val: Manifest | None, val_fraction: float, seed: int
) -> tuple[Manifest, Manifest]:
    """Training and validation sets; without ``val``, real patients are held out.

    With ``val_fraction`` 0 and no ``val`` (nor rows marked ``val``) there is no validation
    set: the second item is None and every image trains, as in the paper's notebook.
    """
    if val is not None:
        return training, val
    marked = (training.frame["split"] == "val").to_numpy()
    if marked.any():
        return training.subset(~marked), training.subset(marked)
    if val_fraction == 0:
        return training, None
    synthetic = is_synthetic(training)
    real = training.subset(~synthetic)
    if len(real) == 0:
        raise DataError(
            "no real images to hold out for validation (the training set is all synthetic); "
            "pass --val MANIFEST"
        )
    try:
        real = real.split_by_patient(val_fraction, seed=seed)
    except DataError as err:
        raise DataError(
            f"{err}: give a validation set (--val MANIFEST), or hold out a larger share "
            "(--val-fraction), or none (--val-fraction 0 with --select last)"
        ) from None
    held = real.select(split="val")
    kept = Manifest.concat([real.select(split="train"), training.subset(synthetic)])
    return kept, held


def _evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: torch.dtype | None,
    channels_last: bool,
) -> dict[str, float]:
    """Validation loss, accuracy and macro F1 (over the classes present) of ``model``."""
    model.eval()
    losses, probs, targets = [], [], []
    criterion = nn.CrossEntropyLoss(reduction="sum")
    with torch.no_grad():
        for images, target in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=amp is not None, dtype=amp):
                logits = model(images)
            logits = logits.float().cpu()
            losses.append(criterion(logits, target).item())
            probs.append(torch.softmax(logits, 1).numpy())
            targets.append(target.numpy())
    y = np.concatenate(targets)
    predicted = np.concatenate(probs).argmax(1)
    # macro F1 over the planes present, a prediction of another plane counting against none:
    # evaluate's all-outputs F1 (fulora.evaluate sits above classify, so sklearn directly)
    f1 = f1_score(y, predicted, labels=sorted(set(y.tolist())), average="macro", zero_division=0)
    return {
        "loss": float(sum(losses) / len(y)),
        "accuracy": 100.0 * float((predicted == y).mean()),
        "f1_macro": 100.0 * float(f1),
    }


def train_classifier(
    train: Sequence[Manifest],
    out: str | Path,
    cfg: ClassifyConfig,
    *,
    val: Manifest | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one classifier into the run folder ``out`` (resuming a partial run there).

    Args:
        train: Training manifests (real and/or synthetic), mixed per ``cfg``.
        out: Run folder.
        cfg: The configuration.
        val: Validation manifest; default a patient-level split of the real training images.
        progress: Show progress bars.

    Returns:
        The run's ``done.json`` record.

    Raises:
        ConfigError: For an unknown architecture, missing weights, or a folder holding a run
            with another configuration.
        DataError: For empty sets, unknown labels, missing or unreadable images.
    """
    out = Path(out)
    require_device(cfg.device)
    cfg.arch = resolve_arch(cfg.arch)
    run = RunDir(out, command="fulora classify train")
    changed = run.changed_config_keys(cfg)
    if changed:
        raise ConfigError(
            f"{out} already holds a run with another configuration ({', '.join(changed)} "
            "differ); use a new --out folder or delete it"
        )
    present = set()
    for manifest in train:
        present |= set(manifest.labels)
    classes = check_planes(cfg.classes) if cfg.classes else [p for p in PLANES if p in present]
    if not classes:
        raise DataError("the training manifests are empty")
    if len(classes) == 1:
        origins = ", ".join(m.origin for m in train if m.origin) or "the training manifests"
        raise DataError(
            f"the training images are all of one plane ({classes[0]}) in {origins}: a "
            "classifier needs two or more"
        )
    training = mix_manifests(
        train,
        classes=classes,
        max_per_class=cfg.max_per_class,
        max_synthetic_per_class=cfg.max_synthetic_per_class,
        synthetic_ratio=cfg.synthetic_ratio,
        balance=cfg.balance,
        seed=cfg.seed,
    )
    training, validation = split_train_val(training, val, cfg.val_fraction, cfg.seed)
    if val is not None:
        _check_held_out(validation, training)
    check_trained_on(out, training)
    if changed == [] and run.is_done():
        logger.info("%s is already trained with this configuration; nothing to do", out)
        return run.read_done() or {}
    _check_validation(validation, cfg, classes)
    built = _build_model(cfg, len(classes))

    run.start(cfg)
    try:
        record = _train(run, cfg, classes, training, validation, built, progress)
    finally:
        run.close()
    return record


def _build_model(cfg: ClassifyConfig, num_classes: int) -> tuple[nn.Module, ModelInfo]:
    """The run's model, built before its folder is started.

    An unknown architecture, weights that cannot be had or a wrong image size then fail
    without leaving a config.yaml behind, which would refuse the corrected command.
    """
    _seed_everything(cfg.seed)  # the model's initial head comes from the global RNG
    model, info = create_model(
        cfg.arch,
        num_classes,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        imagenet=cfg.imagenet_weights,
        log=False,  # logged by _prepare, once the run's log.txt is open
    )
    check_input_size(info, cfg.image_size)
    return model, info


def _check_held_out(validation: Manifest, training: Manifest) -> None:
    """A ``--val`` set holds none of the training images, at their path or copied.

    Validation picks the checkpoint and stops training early: on training images it picks
    the epoch that fits them best, and its scores say nothing about other images.
    """
    found = images_seen(validation, training.frame["path"])
    if found[1]:
        raise DataError(
            f"{describe_seen(validation, found, 'validation images', 'the training set')}: "
            "a validation set must be held out; pass a --val of other images, or leave --val "
            "out to hold out real patients (--val-fraction)"
        )


def _check_validation(validation: Manifest | None, cfg: ClassifyConfig, classes: list[str]) -> None:
    """A validation set where the config needs one; its labels among the classes."""
    if validation is None:
        needs = validation_needs(cfg)
        if needs:
            raise ConfigError(
                f"{needs} a validation set, and val_fraction is 0: set "
                "val_fraction above 0, pass --val MANIFEST, or use select: last and "
                "early_stopping: 0 (the paper's notebook)"
            )
        return
    if len(validation) == 0:
        raise DataError("the validation set is empty; pass --val or raise val_fraction")
    unknown = sorted(set(validation.labels) - set(classes))
    if unknown:
        raise DataError(
            f"validation labels {unknown} ({validation.origin}) are not among the classes {classes}"
        )


@dataclass
class Fit:
    """One run's training state between epochs: exactly what ``last.pt`` holds."""

    model: nn.Module  # what is saved: never the compiled wrapper (its keys get a prefix)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    step_model: nn.Module  # what trains: ``model``, or it compiled
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int = -1
    stale: int = 0  # epochs since the last improvement (early stopping)
    next_epoch: int = 0

    def checkpoint(self, epoch: int, data: str) -> dict[str, Any]:
        """The contents of ``last.pt`` after ``epoch`` (0-based), for data fingerprint ``data``."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "stale": self.stale,
            "data": data,
        }

    def resume(self, path: Path, data: str) -> None:
        """Continue from ``last.pt`` if it was written for the same training data."""
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("data") != data:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.next_epoch, self.history = state["epoch"] + 1, state["history"]
        self.best, self.best_epoch, self.stale = state["best"], state["best_epoch"], state["stale"]
        logger.info("resuming %s after epoch %d", path.parent, self.next_epoch)

    def keep(self, epoch: int, value: float | None, cfg: ClassifyConfig) -> bool:
        """Whether ``epoch``'s model becomes ``best.pt`` (always, with ``select: last``)."""
        higher = cfg.val_metric != "loss"
        improved = (
            cfg.select == "last"
            or self.best is None
            or (value > self.best if higher else value < self.best)
        )
        if improved:
            self.best, self.best_epoch, self.stale = value, epoch + 1, 0
        else:
            self.stale += 1
        return improved


_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def speed_settings(cfg: ClassifyConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """What ``cfg``'s speed options mean on ``device``: both are CUDA-only.

    Returns:
        (autocast type, or None for fp32; whether images and weights are channels-last)

    Raises:
        ConfigError: For bf16 on a GPU without bfloat16.
    """
    amp = _AMP_DTYPES[cfg.amp_dtype] if cfg.amp and device.type == "cuda" else None
    if amp == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(
            f"amp_dtype: bf16 needs a GPU with bfloat16 (Ampere or newer); "
            f"{torch.cuda.get_device_name(device)} has none: use --amp-dtype fp16"
        )
    return amp, cfg.channels_last and device.type == "cuda"


def start_fit(model: nn.Module, cfg: ClassifyConfig, amp: torch.dtype | None) -> Fit:
    """The optimiser, schedule, loss scaler (fp16 only) and compiled step model of ``cfg``.

    Args:
        model: The network, already on its device (and channels-last if so trained).
        cfg: The configuration (optimizer, lr, schedule, compile, fused_optimizer).
        amp: The autocast type from :func:`speed_settings` (None: fp32).

    Returns:
        The training state before the first epoch.
    """
    fused = {"fused": True} if cfg.fused_optimizer else {}  # off: torch's default (foreach)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            **fused,
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused
        )
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        if cfg.schedule == "cosine"
        else None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    step_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    return Fit(model, optimizer, scheduler, scaler, step_model)


def _batch_source(cfg: ClassifyConfig, dataset: ManifestDataset, transform, device):
    """``batches(generator)``: the training batches of one epoch, in the generator's order.

    With ``preload`` the decoded set sits on the device as uint8 and is augmented there.
    """
    pin = device.type == "cuda"
    if not cfg.preload:
        return lambda generator: DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=cfg.num_workers,
            pin_memory=pin,
        )
    stored, stored_targets = dataset.uint8_tensor()
    stored, stored_targets = stored.to(device), stored_targets.to(device)
    logger.info("training set on %s: %.1f MB uint8", device, stored.numel() / 1e6)

    def batches(generator: torch.Generator):
        order = torch.randperm(len(stored), generator=generator).to(device)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            images = stored[idx].float().div_(255.0).expand(-1, 3, -1, -1)
            if transform is not None:
                images = torch.stack([transform(image) for image in images])
            yield images, stored_targets[idx]

    return batches


class EpochStats(NamedTuple):
    """What one training epoch did (:func:`train_epoch`)."""

    loss: float  # mean over the images
    accuracy: float  # % of the images classified right
    seen: int  # images
    batches: int
    overflowed: int  # batches whose loss was not finite (mixed precision skipped their step)


def train_epoch(
    fit: Fit,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    amp: torch.dtype | None,
    channels_last: bool,
) -> EpochStats:
    """Train one epoch (``benchmarks/gpu_suite.py`` times this very loop).

    The loss, the hits and the overflows add up on the device and are read once, at the end:
    reading them every step would make the CPU wait for the GPU before queueing the next step.

    Args:
        fit: The state from :func:`start_fit`.
        batches: (images, targets) batches, on any device.
        criterion: The loss.
        device: Where the model is.
        amp: The autocast type (None: fp32), from :func:`speed_settings`.
        channels_last: Whether images go channels-last, from :func:`speed_settings`.

    Returns:
        The epoch's :class:`EpochStats`.
    """
    fit.model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    overflowed = torch.zeros((), device=device, dtype=torch.int64)
    seen = batches_run = 0
    for images, target in batches:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        fit.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp is not None, dtype=amp):
            logits = fit.step_model(images)
            loss = criterion(logits, target)
        fit.scaler.scale(loss).backward()
        fit.scaler.step(fit.optimizer)
        fit.scaler.update()
        total_loss += loss.detach().float() * len(target)
        correct += (logits.detach().argmax(1) == target).sum()
        overflowed += ~loss.detach().isfinite()
        seen += len(target)
        batches_run += 1
    if fit.scheduler is not None:
        fit.scheduler.step()
    return EpochStats(
        float(total_loss) / seen, 100.0 * int(correct) / seen, seen, batches_run, int(overflowed)
    )


def _val_loader(cfg, validation, classes, cache, transform, device) -> DataLoader | None:
    if validation is None:
        return None
    dataset = ManifestDataset(validation, classes, cache=cache, channels=3, transform=transform)
    dataset.preload()
    return DataLoader(
        dataset,
        batch_size=max(cfg.batch_size, 64),
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )


def _prepare(cfg, built, classes, training, validation, out, device):
    """The model (``built`` by :func:`_build_model`) on ``device``, and the data of a run.

    Writes the manifests the run uses.

    Returns:
        (model, ModelInfo, best.pt metadata, training dataset, its transform, validation
        loader or None)
    """
    model, info = built
    logger.info("model %s, %s", info.arch, info.weights)
    size = cfg.image_size  # checked against the model's by _build_model
    with_content_hashes(training).write(out / TRAIN_MANIFEST_NAME)  # a rerun checks it
    if validation is not None:
        validation.write(out / "val_manifest.csv")
    cache = PreprocessCache(
        Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "preprocessed",
        size=(size, size),
        mode="L",
        resize=cfg.resize,
    )
    train_tf, eval_tf = build_transforms(cfg.augment, size, cfg.normalize)
    train_ds = ManifestDataset(training, classes, cache=cache, channels=3, transform=train_tf)
    train_ds.preload()
    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    val_loader = _val_loader(cfg, validation, classes, cache, eval_tf, device)
    meta = {
        "arch": cfg.arch,
        "classes": classes,
        "image_size": size,
        "resize": cfg.resize,
        "normalize": cfg.normalize,
        "weights": info.weights,
        "mode": "L",
        "channels": 3,
    }
    return model, info, meta, train_ds, train_tf, val_loader


def _train(
    run: RunDir,
    cfg: ClassifyConfig,
    classes: list[str],
    training: Manifest,
    validation: Manifest | None,
    built: tuple[nn.Module, ModelInfo],
    progress: bool,
) -> dict[str, Any]:
    out = run.path
    device = resolve_device(cfg.device)
    amp, channels_last = speed_settings(cfg, device)
    data_fingerprint = training.fingerprint()  # hashes every image: once per run
    model, info, meta, train_ds, train_tf, val_loader = _prepare(
        cfg, built, classes, training, validation, out, device
    )
    fit = start_fit(model, cfg, amp)
    fit.resume(out / "last.pt", data_fingerprint)
    batches = _batch_source(cfg, train_ds, train_tf, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bar = tqdm(
        range(fit.next_epoch, cfg.epochs),
        desc=f"train {cfg.arch}",
        unit="epoch",
        disable=not progress,
        initial=fit.next_epoch,
        total=cfg.epochs,
    )
    for epoch in bar:
        # Every epoch draws from its own seed, so a resumed run repeats the same batches.
        epoch_seed = cfg.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        started = time.perf_counter()
        epoch_batches = batches(torch.Generator().manual_seed(epoch_seed))
        stats = train_epoch(fit, epoch_batches, criterion, device, amp, channels_last)
        loss, accuracy, seen = stats.loss, stats.accuracy, stats.seen
        if not math.isfinite(loss):
            _check_not_diverged(fit.model, epoch, cfg, stats)
        seconds = time.perf_counter() - started
        scores = (
            _evaluate(fit.model, val_loader, device, amp, channels_last)
            if val_loader is not None
            else dict.fromkeys(("loss", "accuracy", "f1_macro"))  # no validation set
        )
        fit.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                "train_accuracy": accuracy,
                **{f"val_{k}": scores[k] for k in ("loss", "accuracy", "f1_macro")},
                "lr": fit.optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 3),
                "images_per_s": round(seen / seconds, 1),
            }
        )
        if _end_of_epoch(fit, epoch, scores, cfg, meta, out, data_fingerprint, bar):
            break
    bar.close()
    training_curves(out / "loss_curve.png", fit.history, title=f"{cfg.arch} ({cfg.augment})")
    best_row = fit.history[fit.best_epoch - 1] if fit.best_epoch > 0 else {}
    return run.finish(
        arch=cfg.arch,
        weights=info.weights,
        classes=classes,
        epochs_run=len(fit.history),
        best_epoch=fit.best_epoch,
        best_val={k: v for k, v in best_row.items() if k.startswith("val_")},
        train_images=len(training),
        train_synthetic=int(is_synthetic(training).sum()),
        val_images=len(validation) if validation is not None else 0,
        selected=cfg.select,
        train_fingerprint=data_fingerprint,
        device=str(device),
    )


def _check_not_diverged(
    model: nn.Module, epoch: int, cfg: ClassifyConfig, stats: EpochStats
) -> None:
    """After an epoch whose mean loss is not finite: stop if the weights went with it.

    Mixed precision's scaler skips a step whose loss overflowed, and the weights stay finite;
    without it (fp32, bf16) that step's NaN gradients reach every weight. Weights grown too
    large for fp16 stay finite but overflow at every step: an epoch whose every step was
    skipped learnt nothing, and the next would not either, so that stops the run too.
    """
    what = f"the classifier after epoch {epoch + 1}"
    advice = (
        f"Nothing of that epoch was saved. Lower the learning rate (lr {cfg.lr:g}: --lr with a "
        "new --out folder, or classify.settings.lr in an experiment)."
    )
    check_finite_weights(model.named_parameters(), what, advice)
    if stats.overflowed == stats.batches:
        raise NonFiniteError(
            f"the loss was not finite at every one of the {stats.batches} steps of epoch "
            f"{epoch + 1}: mixed precision skipped them all, so the classifier stopped learning "
            f"(its weights overflow in {cfg.amp_dtype}); the training diverged. {advice}"
        )
    logger.warning(
        "epoch %d: the mean loss is not finite; mixed precision skipped the steps that overflowed",
        epoch + 1,
    )


def _end_of_epoch(fit, epoch, scores, cfg, meta, out, data_fingerprint, bar) -> bool:
    """Keep the model if chosen, checkpoint, log; whether to stop early."""
    value = scores[cfg.val_metric]
    if fit.keep(epoch, value, cfg):
        _save(
            {"model": fit.model.state_dict(), **meta, "epoch": epoch + 1, "val": scores},
            out / "best.pt",
        )
    _save(fit.checkpoint(epoch, data_fingerprint), out / "last.pt")
    _write_csv(out / "history.csv", fit.history)
    bar.set_postfix(loss=f"{fit.history[-1]['train_loss']:.3f}", val=_fmt(value))
    logger.info(
        "epoch %d: train loss %.4f, val %s %s (%s %s @ %d)",
        epoch + 1,
        fit.history[-1]["train_loss"],
        cfg.val_metric,
        _fmt(value),
        "kept" if cfg.select == "last" else "best",
        _fmt(fit.best),
        fit.best_epoch,
    )
    if cfg.early_stopping and fit.stale >= cfg.early_stopping:
        logger.info("early stop: no improvement for %d epochs", fit.stale)
        return True
    return False


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _runs_below(folder: Path) -> str:
    """A hint naming the training runs under ``folder``, or ``""`` where there are none.

    An experiment's arch folder holds one run per seed: its users pass it for one of them.
    """
    if not folder.is_dir():
        return ""
    runs = sorted(p.parent for p in folder.glob("*/best.pt")) or sorted(
        p.parent for p in folder.glob("*/*/best.pt")
    )
    if not runs:
        return ""
    shown = ", ".join(str(run) for run in runs[:4]) + (", ..." if len(runs) > 4 else "")
    return f". {folder} holds {len(runs)} such run folder(s): {shown}"


def load_classifier(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Load ``best.pt`` of a finished training run (or a ``.pt`` file as it is).

    Returns:
        ``(model in eval mode, metadata dict)`` with ``classes``, ``image_size``, ``resize``,
        ``normalize``, ``arch`` and ``weights``.

    Raises:
        DataError: If the folder holds no trained model, or a run that did not finish (its
            best.pt is from an epoch before the end; once evaluated as if it were the model).
        NonFiniteError: If its weights are not finite (for evaluate, the audit and t-SNE).
    """
    folder = Path(run_dir)
    path = folder / "best.pt" if folder.is_dir() else folder
    if not path.is_file():
        raise DataError(
            f"no trained model at {path}; pass the run folder of `fulora classify train`"
            + _runs_below(folder)
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if folder.is_dir() and not (folder / DONE_NAME).is_file():
        raise DataError(
            f"the training in {folder} has not finished (no {DONE_NAME}; its best.pt is from "
            f"epoch {state.get('epoch')}): run its `fulora classify train` command again to "
            f"finish it, or pass {path} itself to use these weights as they are"
        )
    check_finite_weights(
        state["model"].items(),
        f"the classifier {path}",
        "Retrain it with a lower learning rate: its outputs would be NaN, and each would count "
        "as a prediction of one class.",
    )
    model, _ = create_model(state["arch"], len(state["classes"]), pretrained=False, log=False)
    model.load_state_dict(state["model"])
    logger.info(
        "model %s, trained weights from %s (epoch %s)", state["arch"], path, state.get("epoch")
    )
    model.to(device).eval()
    meta = {k: v for k, v in state.items() if k != "model"}
    return model, meta
