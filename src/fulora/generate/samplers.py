"""Samplers by fulora's names or AUTOMATIC1111's ("Euler a", "DPM++ 2M Karras", "UniPC", ...).

Each AUTOMATIC1111 sampler maps to the diffusers scheduler that diffusers' scheduler overview
documents for it, configured the way AUTOMATIC1111 runs it:

* the k-diffusion samplers (Euler, Euler a, Heun, LMS, DPM++ 2M) step through timesteps spaced
  evenly from 999 to 0 (k-diffusion's ``get_sigmas``), which is diffusers'
  ``timestep_spacing="linspace"``; "Karras" variants use Karras sigmas instead;
* UniPC runs AUTOMATIC1111's defaults (``uni_pc_variant: bh1``, ``uni_pc_order: 3``,
  ``uni_pc_skip_type: time_uniform`` in its ``shared_options.py``), ending where its sampler
  ends, at the last training timestep (``final_sigmas_type="sigma_min"``);
* DDIM and PLMS use diffusers' default ``leading`` spacing with SD1.5's ``steps_offset=1``:
  the original LDM samplers' "uniform" discretisation when the steps divide 1000 (20, 25, 50;
  for 30, LDM's ``range(0, 1000, 33)`` holds 31 timesteps). AUTOMATIC1111 since v1.6 runs its
  own DDIM and PLMS (``sd_samplers_timesteps``) on ``range(0, 1000, 1000 // steps) + 1``
  without evaluating the last, so its DDIM and PLMS images are not these; not compared.

``tests/test_parity.py::test_samplers_are_automatic1111s`` runs each k-diffusion mapping against
k-diffusion's own sampler (A1111's): Euler, Heun and LMS (Karras too) match to 5e-7; DPM++ 2M
(Karras) is within 0.2-0.33%, since diffusers' DPM-Solver starts from the noise unscaled and
rounds timesteps, which no configuration changes. Euler a matches too (2e-6, fp32), with each
image's step noise drawn from its own generator as ``generate`` passes them, and so does UniPC
against A1111's own UniPC (6e-5, fp32). Until session 22 UniPC ended at sigma zero, where
diffusers' bh1 update divides by infinity: every UniPC image was NaN, and ``generate`` stopped.

The FU-LoRA repository's figure of synthetic images shows rows made with Euler and UniPC; the
paper does not say which sampler made its released 5,000 images.
"""

from __future__ import annotations

from typing import Any

from fulora.errors import ConfigError

_LINSPACE = {"timestep_spacing": "linspace"}

# name -> (diffusers scheduler class name, extra config, AUTOMATIC1111 display name)
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
        "DPM++ 2M Karras",
    ),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", **_LINSPACE},
        "DPM++ 2M",
    ),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict(_LINSPACE), "Euler a"),
    "euler": ("EulerDiscreteScheduler", dict(_LINSPACE), "Euler"),
    "heun": ("HeunDiscreteScheduler", dict(_LINSPACE), "Heun"),
    "lms": ("LMSDiscreteScheduler", dict(_LINSPACE), "LMS"),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "LMS Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "unipc": (
        "UniPCMultistepScheduler",
        # A1111's UniPC stops at the last training timestep (t_0 = 1/N, not denoised to zero).
        # diffusers' default final sigma, zero, is also a NaN in every image with bh1.
        {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min", **_LINSPACE},
        "UniPC",
    ),
}


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("_", "").replace("+", "p")


_BY_KEY = {_key(n): n for n in SAMPLERS} | {_key(v[2]): n for n, v in SAMPLERS.items()}


def resolve_sampler(name: str) -> str:
    """Fulora's name of a sampler given by fulora's or AUTOMATIC1111's name (any case).

    Raises:
        ConfigError: For an unknown sampler; the message lists both kinds of names.
    """
    found = _BY_KEY.get(_key(name))
    if found is None:
        choices = ", ".join(f"{n} ({v[2]!r})" for n, v in SAMPLERS.items())
        raise ConfigError(f"unknown sampler {name!r}; choose one of {choices}")
    return found


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A diffusers scheduler for sampler ``name``, built from the model's scheduler config."""
    import diffusers

    cls_name, extra, _ = SAMPLERS[resolve_sampler(name)]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


def display_name(name: str) -> str:
    """AUTOMATIC1111's name of a sampler."""
    return SAMPLERS[resolve_sampler(name)][2]
