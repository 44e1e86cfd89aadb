"""The configuration of ``fulora classify train`` and the one-line protocol it describes.

Kept apart from the training code (torch, torchvision, scikit-learn) so that a bad value is
refused before those load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fulora.config import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION_BELOW_1,
    POSITIVE,
    SEED,
    Checked,
    CompileMode,
    Range,
)


@dataclass
class ClassifyConfig(Checked):
    """Configuration of ``fulora classify train`` (defaults: fulora's protocol, classify-sound)."""

    RANGES = {
        "image_size": Range(8),
        "batch_size": AT_LEAST_1,
        "epochs": AT_LEAST_1,
        "lr": POSITIVE,
        "momentum": FRACTION_BELOW_1,
        "weight_decay": AT_LEAST_0,
        "label_smoothing": FRACTION_BELOW_1,
        "val_fraction": FRACTION_BELOW_1,  # of patients; 0: no validation split
        "early_stopping": AT_LEAST_0,  # epochs without improvement; 0: off
        "max_per_class": AT_LEAST_1,
        "max_synthetic_per_class": AT_LEAST_0,
        "synthetic_ratio": FRACTION_BELOW_1,  # share of synthetic images in the set
        "seed": SEED,
        "num_workers": AT_LEAST_0,
    }

    def check(self) -> None:
        """Compile's mode only with compile, the autocast type only with amp; two classes up."""
        self.needs_switch("compile", ("compile_mode",), "torch.compile")
        self.needs_switch("amp", ("amp_dtype",), "mixed precision")
        self.check_classes_of("classes")

    arch: str = "resnet18"
    pretrained: bool = True
    # torchvision's DEFAULT (V2 for MobileNet v2) or IMAGENET1K_V1 (the notebook's, all five)
    imagenet_weights: Literal["DEFAULT", "IMAGENET1K_V1"] = "DEFAULT"
    weights: str | None = None  # a state dict to start from instead of ImageNet
    classes: list[str] | None = None  # default: the planes of the training data
    image_size: int = 224
    # stretch: bicubic; stretch-bilinear: the notebook's transforms.Resize((224, 224)) on PIL
    resize: Literal["stretch", "stretch-bilinear", "letterbox", "crop"] = "stretch"
    normalize: Literal["imagenet", "none"] = "imagenet"
    augment: Literal["none", "da"] = "none"
    batch_size: int = 24
    epochs: int = 20
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    label_smoothing: float = 0.0
    amp: bool = True  # mixed precision on CUDA
    # autocast's type: fp16 (with loss scaling, which reads the GPU every step) or bf16 (no
    # scaling, so no per-step wait for the GPU; Ampere and newer)
    amp_dtype: Literal["fp16", "bf16"] = "fp16"
    channels_last: bool = True  # on CUDA
    # torch.compile the training forward and backward; compile_mode reduce-overhead adds CUDA
    # graphs (small networks at batch 24 wait on kernel launches); first steps compile
    compile: bool = False
    compile_mode: CompileMode = "default"
    # torch's fused SGD/AdamW: one kernel updates every weight, and with fp16 the loss scaler
    # hands it the overflow flag on the device instead of reading it every step (which makes
    # the CPU wait for the GPU); the same update up to float rounding
    fused_optimizer: bool = False
    val_fraction: float = 0.2  # of real patients held out; 0: train on every image
    val_metric: Literal["f1_macro", "accuracy", "loss"] = "f1_macro"
    # which epoch best.pt holds: the best by val_metric, or the last (the notebook evaluates
    # the model after its 20th epoch; needs no validation set)
    select: Literal["best", "last"] = "best"
    early_stopping: int = 0  # epochs without improvement before stopping; 0: never
    max_per_class: int | None = None
    max_synthetic_per_class: int | None = None
    synthetic_ratio: float | None = None
    balance: bool = False
    seed: int = 0
    num_workers: int = 0
    # Keep the decoded training set on the device as uint8 and augment there (fast on GPU).
    preload: bool = False
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free notes recorded with the run


def validation_needs(cfg: ClassifyConfig) -> str:
    """The settings of ``cfg`` that need a validation set, with their verb, for a message.

    ``"select: best needs"``, ``"select: best and early_stopping need"``, or ``""`` when every
    image may train.
    """
    needs = [
        key
        for key, on in (
            ("select: best", cfg.select == "best"),
            ("early_stopping", cfg.early_stopping > 0),
        )
        if on
    ]
    if not needs:
        return ""
    return f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''}"


def describe_protocol(cfg: ClassifyConfig) -> str:
    """One line saying how a classifier was trained and chosen (results and report show it)."""
    validation = (
        f"{cfg.val_fraction:.0%} of real patients held out"
        if cfg.val_fraction
        else "none (every image trains)"
    )
    chosen = "the last epoch" if cfg.select == "last" else f"the best epoch by {cfg.val_metric}"
    weights = f"ImageNet {cfg.imagenet_weights}" if cfg.pretrained else "random init"
    precision = f"{cfg.amp_dtype} autocast on CUDA" if cfg.amp else "fp32"
    return (
        f"validation: {validation}; model tested: {chosen} of {cfg.epochs}; input: "
        f"{'ImageNet mean/std' if cfg.normalize == 'imagenet' else 'raw [0, 1] pixels'}, "
        f"{cfg.image_size} px {cfg.resize}; weights: {weights}; {precision}; "
        f"{cfg.optimizer.upper()} lr {cfg.lr:g}, batch {cfg.batch_size}"
    )
