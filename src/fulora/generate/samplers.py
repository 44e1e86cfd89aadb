"""Samplers by name, with the names AUTOMATIC1111 shows (for the PNG ``parameters`` text)."""

from __future__ import annotations

from typing import Any

from fulora.errors import ConfigError

# name -> (diffusers scheduler class name, extra config, AUTOMATIC1111 display name)
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
        "DPM++ 2M Karras",
    ),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A diffusers scheduler for sampler ``name``, built from the model's scheduler config."""
    import diffusers

    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls_name, extra, _ = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


def display_name(name: str) -> str:
    """AUTOMATIC1111's name of a sampler."""
    return SAMPLERS[name][2]
