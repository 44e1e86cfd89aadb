"""The pretraining corpus: unlabelled phantom scans from many simulated machines.

It plays the part of SD1.5's web-scale data (see the premise in ``fulora.data.phantom``). Image
``i`` is a scan of one of the phantom's anatomies by a machine drawn for that image alone, from
ranges much wider than the gap between the ``source`` and ``target`` machines. Its caption says
what a viewer sees, in plain visual words (shapes: "an oval ring", "a bright bar", "small dark
circles"; most shapes appear in several anatomies, and any may be left out), and what the
machine's picture looks like ("bright", "coarse speckle", "narrow sector"). No caption names a
plane or an organ, so the plane words are left for the LoRA to learn, as SD1.5 knew shapes and
textures but not "fetal femur" in ultrasound.

Why shapes and not only "an ultrasound image": with machine-only captions the text encoder
gives the five plane prompts almost the same embedding (8% apart, against 40% for two machine
words) and the UNet never learns to draw what words say, so a LoRA could not learn the planes
in a CPU budget (measured on a model built that way: judge accuracy 18-22% after 300 to 1,500
LoRA steps, chance is 20%; BENCHMARKS.md). SD1.5's text side knows what words look like.

Everything is a function of (seed, index): the corpus is defined by this module and its
config, and rebuilding it gives the same images and captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fulora.data.phantom import PHANTOM_PLANES, ScannerStyle, form_image

# Words of the corpus captions (and the plane prompts the LoRA uses): the foundation model's
# tokenizer gives each one token.
CAPTION_WORDS: tuple[str, ...] = (
    "an", "ultrasound", "image", "bright", "dark", "fine", "coarse", "speckle", "wide",
    "narrow", "sector", "with", "text", "noisy", "soft", "deep", "and", "oval", "ring",
    "thin", "line", "crescents", "round", "shape", "bubble", "three", "dots", "bar",
    "shadow", "four", "holes", "short", "lines", "band", "small", "circles", "blobs",
)  # fmt: skip

# What a viewer sees in each anatomy, in visual words only; shared shapes on purpose.
SHAPES: dict[str, tuple[str, ...]] = {
    "brain": ("an oval ring", "a thin line", "dark crescents"),
    "abdomen": ("a round shape", "a dark bubble", "three dots"),
    "femur": ("a bright bar", "a dark shadow", "a soft oval"),
    "thorax": ("a round shape", "four dark holes", "three dots", "short bright lines"),
    "other": ("a bright band", "small dark circles", "soft blobs"),
}
SHAPE_PROBABILITY = 0.8  # the rest of the captions describe the machine only


@dataclass(frozen=True)
class CorpusImage:
    """One corpus image: pixels (H, W) uint8, its caption, and what was drawn (for the card)."""

    pixels: np.ndarray
    caption: str
    anatomy: str
    style: ScannerStyle


def random_machine(rng: np.random.Generator, size: tuple[int, int]) -> ScannerStyle:
    """A machine drawn from wide ranges; the source and target machines lie inside them."""
    return ScannerStyle(
        size=size,
        half_angle_deg=float(rng.uniform(22.0, 44.0)),
        apex=float(rng.uniform(-0.14, 0.0)),
        depth=float(rng.uniform(0.88, 1.04)),
        speckle_sigma=(float(rng.uniform(0.5, 1.8)), float(rng.uniform(0.7, 2.6))),
        dynamic_range_db=float(rng.uniform(36.0, 60.0)),
        gain_db=float(rng.uniform(-4.0, 7.0)),
        gamma=float(rng.uniform(0.8, 1.2)),
        attenuation=float(rng.uniform(0.5, 2.2)),
        noise_db=float(rng.uniform(-66.0, -36.0)),
        blur=float(rng.choice([0.0, rng.uniform(0.4, 1.6)])),
        text=bool(rng.random() < 0.25),
    )


def shapes_for(anatomy: str, rng: np.random.Generator) -> str:
    """One or two of the anatomy's shapes, in random order ("" for some images)."""
    if rng.random() >= SHAPE_PROBABILITY:
        return ""
    shapes = list(SHAPES[anatomy])
    count = 1 + int(rng.random() < 0.5)
    picked = [shapes[k] for k in rng.permutation(len(shapes))[:count]]
    return " and ".join(picked)


def caption_for(style: ScannerStyle, shapes: str = "") -> str:
    """What a viewer sees (shapes) and what the machine's picture looks like; never a plane."""
    words = ["an ultrasound image" + (f" of {shapes}" if shapes else "")]
    if style.gain_db > 3.5:
        words.append("bright")
    elif style.gain_db < -1.0:
        words.append("dark")
    speckle = (style.speckle_sigma[0] + style.speckle_sigma[1]) / 2
    words.append("coarse speckle" if speckle > 1.5 else "fine speckle" if speckle < 1.0 else "")
    words.append(
        "wide sector"
        if style.half_angle_deg > 36
        else "narrow sector"
        if style.half_angle_deg < 29
        else ""
    )
    if style.noise_db > -45:
        words.append("noisy")
    if style.blur > 0:
        words.append("soft")
    if style.attenuation > 1.7:
        words.append("deep")
    if style.text:
        words.append("with text")
    return ", ".join(w for w in words if w)


def corpus_image(
    seed: int, index: int, size: tuple[int, int] = (48, 64), oversample: int = 2
) -> CorpusImage:
    """Corpus image ``index``: anatomy, machine and pixels all drawn from (seed, index).

    Args:
        seed: Corpus seed.
        index: Image index.
        size: (height, width) of the image the model trains on.
        oversample: Render this many times larger, then shrink by area averaging (less
            aliasing of the speckle than rendering small).
    """
    rng = np.random.default_rng([seed, 7_777, index])
    anatomy = PHANTOM_PLANES[int(rng.integers(len(PHANTOM_PLANES)))]
    big = (size[0] * oversample, size[1] * oversample)
    style = random_machine(rng, big)
    pixels = form_image(anatomy, style, rng, big)
    small = Image.fromarray(pixels, "L").resize((size[1], size[0]), Image.Resampling.BOX)
    return CorpusImage(
        np.asarray(small), caption_for(style, shapes_for(anatomy, rng)), anatomy, style
    )
