"""Samplers by fulora's names or AUTOMATIC1111's ("Euler a", "DPM++ 2M Karras", "UniPC", ...).

Each AUTOMATIC1111 sampler maps to the diffusers scheduler that diffusers' scheduler overview
documents for it, configured the way AUTOMATIC1111 runs it:

* the k-diffusion samplers (Euler, Euler a, Heun, LMS) step through timesteps spaced evenly
  from 999 to 0 (k-diffusion's ``get_sigmas``), which is diffusers'
  ``timestep_spacing="linspace"``; "Karras" variants use Karras sigmas instead;
* DPM++ 2M (Karras) is diffusers' DPM-Solver++ started and timed as k-diffusion's
  (``fulora.generate.a1111_schedulers``): no configuration of diffusers' own gives its start
  (the noise times sqrt(1 - alpha_bar) at the top, not times 1), its fractional timesteps, or
  (without Karras) its spacing;
* UniPC is diffusers' UniPC steps at AUTOMATIC1111's times (``fulora.generate.a1111_schedulers``:
  its continuous-time schedule, fractional timesteps, and since its v1.6 one step more than
  asked at 30 steps), at its defaults (``uni_pc_variant: bh1``, ``uni_pc_order: 3``,
  ``uni_pc_skip_type: time_uniform`` in its ``shared_options.py``) or its other settings
  (:class:`UniPCOptions`), ending where its sampler ends, at the last training timestep;
* DDIM and PLMS are AUTOMATIC1111's own (v1.6+), on its timestep grid, which no diffusers
  configuration gives (``fulora.generate.a1111_schedulers``): 30 steps evaluate the model at
  991, 958, ..., 34 and end at timestep 1; 20 steps evaluate it 19 times.

The k-diffusion samplers (Euler, Euler a, Heun, LMS, DPM++ 2M) also step through the sigmas
of any of A1111 v1.9+'s schedule types (:data:`SCHEDULE_TYPES`, ``generate``'s
``schedule_type``; ``fulora.generate.sigmas``), as A1111 lets them.

Euler a adds noise at each step, and so does DDIM at an eta above 0 (:data:`STEP_NOISE`, with
the ``generate`` setting of each one's eta): A1111's "Eta" and "Eta DDIM", and its ENSD. So do
Euler, Heun and DPM2 with A1111's "Sigma churn" (:class:`Churn`, :data:`CHURN_SAMPLERS`): Euler
and Heun are then k-diffusion's own steps (``fulora.generate.kdiffusion_schedulers``), since
diffusers' Euler adds its churn's noise after the model has run at the step's sigma.

Until session 24 ``DPM++ 2M Karras`` (the default), ``DPM++ 2M``, ``DDIM`` and ``PLMS`` were
diffusers' own schedulers, configured as near A1111's as they go; they stay, as
``dpmpp_2m_karras_diffusers``, ``dpmpp_2m_diffusers``, ``ddim_diffusers`` and ``pndm``, for
runs made with them (``generate`` refuses to finish such a run with A1111's). So does
diffusers' own UniPC, fulora's until session 32, as ``unipc_diffusers``.

``tests/test_parity.py`` runs each against AUTOMATIC1111's own code on an analytic model
(relative L2 of the result): Euler, Heun, LMS (Karras too) and DPM++ 2M (Karras too) against
k-diffusion's samplers, within 5e-7; Euler a too (2e-6, fp32), with each image's step noise
drawn from its own generator as ``generate`` passes them (and with NV noise, ENSD and other
etas, fed to the scheduler); UniPC against A1111's own UniPC (3e-7, fp32; diffusers' own 6e-5
from A1111's before v1.6, 8e-5 from v1.6's at 30 steps); DDIM and PLMS against A1111's own
functions (20, 27 and 30 steps: within 3e-10 in float64, the precision of the recorded answers;
DDIM at eta 0.5 and 1, 5.1e-7 and 2.9e-7 away). diffusers' own DPM-Solver is 2.0e-3 (Karras)
and 3.3e-3 away, its DDIM and PNDM 15% at 30 steps. Until session 22 UniPC ended at sigma zero,
where diffusers' bh1 update divides by infinity: every UniPC image was NaN.

The FU-LoRA repository's figure of synthetic images shows rows made with Euler and UniPC; the
paper does not say which sampler made its released 5,000 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fulora.errors import ConfigError

_LINSPACE = {"timestep_spacing": "linspace"}
# A1111's UniPC defaults (its shared_options.py: uni_pc_variant bh1, uni_pc_order 3,
# uni_pc_lower_order_final), ending at the last training timestep's noise level
_UNIPC = {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min", **_LINSPACE}

# name -> (diffusers scheduler class name, extra config, AUTOMATIC1111 display name)
SAMPLERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dpmpp_2m_karras": (
        "A1111DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
        "DPM++ 2M Karras",
    ),
    "dpmpp_2m": ("A1111DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "euler_a": ("A1111EulerAncestralScheduler", dict(_LINSPACE), "Euler a"),
    "euler": ("EulerDiscreteScheduler", dict(_LINSPACE), "Euler"),
    "heun": ("HeunDiscreteScheduler", dict(_LINSPACE), "Heun"),
    "lms": ("LMSDiscreteScheduler", dict(_LINSPACE), "LMS"),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "LMS Karras"),
    "ddim": ("A1111DDIMScheduler", {}, "DDIM"),
    "plms": ("A1111PLMSScheduler", {}, "PLMS"),
    # A1111's UniPC stops at the last training timestep (t_0 = 1/N, not denoised to zero).
    # diffusers' default final sigma, zero, is also a NaN in every image with bh1.
    "unipc": ("A1111UniPCScheduler", dict(_UNIPC), "UniPC"),
    # diffusers' own, configured as near A1111's as they go: fulora's until session 24
    "dpmpp_2m_karras_diffusers": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"},
        "DPM++ 2M Karras (diffusers)",
    ),
    "dpmpp_2m_diffusers": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", **_LINSPACE},
        "DPM++ 2M (diffusers)",
    ),
    "ddim_diffusers": ("DDIMScheduler", {}, "DDIM (diffusers)"),
    "pndm": ("PNDMScheduler", {}, "PNDM (diffusers)"),
    # diffusers' own UniPC on its rounded timesteps: fulora's until session 32
    "unipc_diffusers": ("UniPCMultistepScheduler", dict(_UNIPC), "UniPC (diffusers)"),
}

# A1111's k-diffusion samplers that fulora steps itself (fulora.generate.kdiffusion_schedulers),
# always on A1111's sigmas: name -> (scheduler class, A1111's name, the types of the variants
# named after their sigmas, "DPM2 Karras")
_KDIFFUSION = {
    "dpm2": ("A1111DPM2Scheduler", "DPM2", ("karras",)),
    "dpm2_a": ("A1111DPM2AncestralScheduler", "DPM2 a", ("karras",)),
    "dpmpp_2s_a": ("A1111DPMPP2SAncestralScheduler", "DPM++ 2S a", ("karras",)),
    "dpmpp_sde": ("A1111DPMPPSDEScheduler", "DPM++ SDE", ("karras",)),
    "dpmpp_2m_sde": ("A1111DPMPP2MSDEScheduler", "DPM++ 2M SDE", ("karras", "exponential")),
    "dpmpp_2m_sde_heun": (
        "A1111DPMPP2MSDEHeunScheduler",
        "DPM++ 2M SDE Heun",
        ("karras", "exponential"),
    ),
    "dpmpp_3m_sde": ("A1111DPMPP3MSDEScheduler", "DPM++ 3M SDE", ("karras", "exponential")),
    "restart": ("A1111RestartScheduler", "Restart", ()),  # on Karras sigmas unless told
    "dpm_fast": ("A1111DPMFastScheduler", "DPM fast", ()),  # a type sets only its start
}
_ALWAYS_ON_SCHEDULE = {cls for cls, _, _ in _KDIFFUSION.values()}
# Each sampler on the sigmas it is named after ("DPM++ 2M Karras"): (plain name, type) -> name
SCHEDULE_VARIANTS = {("dpmpp_2m", "karras"): "dpmpp_2m_karras", ("lms", "karras"): "lms_karras"}
for _plain, (_cls, _label, _kinds) in _KDIFFUSION.items():
    SAMPLERS[_plain] = (_cls, {}, _label)
    for _kind in _kinds:
        SCHEDULE_VARIANTS[(_plain, _kind)] = f"{_plain}_{_kind}"
        SAMPLERS[f"{_plain}_{_kind}"] = (_cls, {}, f"{_label} {_kind.capitalize()}")
_DIFFUSERS_OWN = ("dpmpp_2m_karras_diffusers", "dpmpp_2m_diffusers", "ddim_diffusers", "pndm")
for _own in (*_DIFFUSERS_OWN, "unipc_diffusers"):
    SAMPLERS[_own] = SAMPLERS.pop(_own)  # diffusers' own last
# A1111 v1.9+ runs these on the type given unless a "Schedule type" names another (its
# samplers' option "scheduler"); before v1.9 and for the others, on uniform sigmas
DEFAULT_SINCE_V19 = {name: "karras" for name in ("dpmpp_2m", "dpm2", "dpm2_a", "dpmpp_2s_a")}
DEFAULT_SINCE_V19 |= {"dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential"}
DEFAULT_SINCE_V19 |= {"dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential"}

# Samplers that draw fresh noise at each step: the setting of how much (A1111's "Eta" for the
# ancestral and SDE samplers, "Eta DDIM" for DDIM) and its A1111 default (DDIM: none)
_FAMILY = {name: plain for (plain, _), name in SCHEDULE_VARIANTS.items()}
_NOISY = ("euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun")
_NOISY += ("dpmpp_3m_sde", "dpm_fast")
STEP_NOISE = {n: ("eta_ancestral", 1.0) for n in SAMPLERS if _FAMILY.get(n, n) in _NOISY}
STEP_NOISE["ddim"] = ("eta_ddim", 0.0)
# The SDE samplers: their noise comes from Brownian trees seeded with each image's seed (A1111's
# create_noise_sampler), not from the generators that the RNG setting and ENSD seed
_SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
BROWNIAN_NOISE = frozenset(n for n in SAMPLERS if _FAMILY.get(n, n) in _SDE)

# Restart draws its noise from each image's generators, and has no eta to scale it
STEP_NOISE_WITHOUT_ETA = frozenset({"restart"})

# A1111's DPM2, DPM2 a and DPM++ 3M SDE draw one sigma more than their steps and drop the one
# before the last (their option discard_next_to_last_sigma), whatever "Discard penultimate
# sigma" says
_DISCARDING = ("dpm2", "dpm2_a", "dpmpp_3m_sde")
DISCARD_PENULTIMATE = frozenset(n for n in SAMPLERS if _FAMILY.get(n, n) in _DISCARDING)

# A1111's "Sigma churn", "Sigma tmin" and "Sigma tmax" (k-diffusion's s_churn, s_tmin, s_tmax):
# the samplers A1111 passes them to (its sampler_extra_params, v1.7+), and those that take its
# "Sigma noise" (s_noise) alone, which scales their step noise
CHURN_SAMPLERS = frozenset(n for n in SAMPLERS if _FAMILY.get(n, n) in ("euler", "heun", "dpm2"))
_S_NOISE = ("dpm_fast", "dpm2_a", "dpmpp_2s_a", *_SDE)
SIGMA_NOISE_SAMPLERS = CHURN_SAMPLERS | {n for n in SAMPLERS if _FAMILY.get(n, n) in _S_NOISE}


def a1111_grid_points(steps: int, train_timesteps: int = 1000) -> int:
    """The points of A1111's timestep grid for ``steps`` (``range(0, N, N // steps)``).

    DDIM and PLMS run the model at all but the first; UniPC, since A1111 v1.6, takes as many
    steps as there are points (31 for 30).
    """
    return len(range(0, train_timesteps, train_timesteps // steps))


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("_", "").replace("+", "p")


# AUTOMATIC1111 v1.9+ runs "DPM++ 2M" on Karras sigmas unless the text names another "Schedule
# type" (its sd_samplers_kdiffusion.py gives the sampler the default scheduler "karras", and its
# parse_generation_parameters reads a missing type as "Automatic", that default). fulora's
# DPM++ 2M is k-diffusion's get_sigmas, A1111's "Uniform" (sd_schedulers.py). A1111 v1.6-1.8
# read the setting as its k_sched_type, which has no "Uniform": pasting fails there, loudly,
# rather than make another image; before v1.6 the setting is ignored.
_WRITTEN_SCHEDULE = {name: "Uniform" for name in DEFAULT_SINCE_V19}

# AUTOMATIC1111 v1.9+'s "Schedule type" (its sd_schedulers.py): fulora's name -> A1111's label.
# Each gives the sigmas a k-diffusion sampler steps through (fulora.generate.sigmas);
# "automatic" is the sampler's own (Uniform; Karras for the samplers named "... Karras").
SCHEDULE_TYPES = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
}
# The samplers that A1111 runs with k-diffusion, on a schedule type's sigmas, and each one's
# own type. A1111's DDIM, PLMS and UniPC step on timesteps of their own and ignore the setting.
_OWN_SCHEDULE = {"euler_a": "uniform", "euler": "uniform", "heun": "uniform"}
_OWN_SCHEDULE |= {plain: "uniform" for plain, _ in SCHEDULE_VARIANTS}
_OWN_SCHEDULE |= {name: kind for (_, kind), name in SCHEDULE_VARIANTS.items()}
_OWN_SCHEDULE["restart"] = "karras"  # in every A1111 since it came (v1.6)
_OWN_SCHEDULE["dpm_fast"] = "uniform"
# The types whose sigmas span the model's own whatever sigma_min and sigma_max say, and those
# that take a rho (A1111's Scheduler.default_rho)
SPAN_FIXED = ("uniform", "align_your_steps", "simple", "ddim")
TAKE_RHO = ("karras", "polyexponential")
_SCHEDULE_KEYS = {_key(n): n for n in SCHEDULE_TYPES}
_SCHEDULE_KEYS |= {_key(label): n for n, label in SCHEDULE_TYPES.items()}


_BY_KEY = {_key(n): n for n in SAMPLERS} | {_key(v[2]): n for n, v in SAMPLERS.items()}


# A1111's samplers that fulora does not run, and why
_NOT_RUN = {
    "DPM adaptive": "it chooses its steps as it goes (k-diffusion's sample_dpm_adaptive), and "
    "fulora's pipeline takes a schedule of model calls known before the first",
    "LCM": "it needs a latent consistency model (an LCM LoRA or checkpoint)",
    "DDIM CFG++": "its CFG++ guidance (A1111's ddim_cfgpp) is not fulora's",
}


def resolve_sampler(name: str) -> str:
    """Fulora's name of a sampler given by fulora's or AUTOMATIC1111's name (any case).

    Raises:
        ConfigError: For an unknown sampler (the message lists both kinds of names), or one of
            A1111's that fulora does not run (the message says why).
    """
    for label, why in _NOT_RUN.items():
        if _key(name) == _key(label):
            raise ConfigError(
                f"sampler {name!r}: fulora does not run A1111's {label}: {why}; choose another "
                "sampler (fulora generate --help lists them)"
            )
    return _resolved(name, _BY_KEY, "sampler", {n: v[2] for n, v in SAMPLERS.items()})


def _resolved(name: str, by_key: dict[str, str], what: str, labels: dict[str, str]) -> str:
    """The fulora name that ``name`` gives (its key in ``by_key``), else an error listing all."""
    found = by_key.get(_key(name))
    if found is None:
        choices = ", ".join(f"{n} ({label!r})" for n, label in labels.items())
        raise ConfigError(f"unknown {what} {name!r}; choose one of {choices}")
    return found


def check_steps(name: str, steps: int) -> None:
    """Steps that sampler ``name`` can take.

    Raises:
        ConfigError: For DDIM or PLMS at 1 step, where AUTOMATIC1111 runs the model no time.
    """
    if resolve_sampler(name) in ("ddim", "plms") and steps < 2:
        raise ConfigError(
            f"sampler {display_name(name)!r} needs steps: 2 or more (AUTOMATIC1111 runs the "
            f"model at each point of its grid but the last; {steps} step leaves the noise)"
        )


@dataclass(frozen=True)
class SigmaSchedule:
    """The sigmas a k-diffusion sampler steps through, as A1111's ``get_sigmas`` makes them.

    Attributes:
        kind: The schedule type (a :data:`SCHEDULE_TYPES` name other than ``automatic``; None
            for DDIM and PLMS, which take only the alpha_bar options).
        beta_shape: "Beta"'s (alpha, beta) (A1111's beta_dist_alpha and beta_dist_beta).
        sigma_min: The smallest sigma the type spans (A1111's "Schedule min sigma"; 0: the
            model's). Uniform, Simple, DDIM and Align Your Steps take the model's own.
        sigma_max: The largest (A1111's "Schedule max sigma"; 0: the model's).
        rho: Karras's and Polyexponential's rho (A1111's "Schedule rho"; 0: 7 and 1).
        discard_penultimate: One more sigma drawn, and the one before the last left out
            (A1111's "Discard penultimate sigma").
        downcast: The model's sigma table computed from alpha_bar in fp16 (A1111's
            "Downcast alphas_cumprod"; ``fulora.generate.sigmas.DiscreteSigmas``).
        zero_terminal_snr: The table from alpha_bar rescaled to zero terminal SNR (A1111's
            "Noise Schedule: Zero Terminal SNR").
        sgm_noise_multiplier: The start is the noise times sqrt(1 + sigma_0^2), not times
            sigma_0 (A1111's "SGM noise multiplier").
    """

    kind: str | None
    beta_shape: tuple[float, float] = (0.6, 0.6)
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    discard_penultimate: bool = False
    downcast: bool = False
    zero_terminal_snr: bool = False
    sgm_noise_multiplier: bool = False


@dataclass(frozen=True)
class Churn:
    """A1111's "Sigma churn", "tmin", "tmax" and "noise" (k-diffusion's ``s_churn``, ...).

    Euler, Heun and DPM2 (:data:`CHURN_SAMPLERS`) start each step whose sigma lies within
    [tmin, tmax] from that sigma raised by a factor 1 + min(churn / steps, sqrt(2) - 1), with
    each image's next draw times ``noise`` added to match; the ancestral and SDE samplers
    (:data:`SIGMA_NOISE_SAMPLERS`) scale their step noise by ``noise``.
    """

    churn: float = 0.0
    tmin: float = 0.0
    tmax: float = float("inf")
    noise: float = 1.0


@dataclass(frozen=True)
class UniPCOptions:
    """A1111's UniPC settings ("UniPC variant", "skip type", "order", "lower order final").

    ``legacy_steps``: ``steps`` UniPC steps, as A1111 before v1.6 took them; since v1.6 it
    takes as many as its DDIM grid has points (31 for 30).
    """

    variant: str = "bh1"
    skip_type: str = "time_uniform"
    order: int = 3
    lower_order_final: bool = True
    legacy_steps: bool = False


# A1111's latent upscalers of the hires fix (its shared latent_upscale_modes): name ->
# (torch.nn.functional.interpolate's mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's image upscalers that need no weights: the hires pass decodes the first pass's image,
# resizes it with PIL (None: Lanczos to the size at once; Lanczos and Nearest: its Upscaler's
# resize by the scale first) and encodes it again; its model upscalers (ESRGAN, ...) are refused
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
# The samplers whose hires pass fulora runs as A1111's sample_img2img does: the k-diffusion
# samplers on the tail of their sigmas, DDIM, PLMS and UniPC on the lower points of their grid
# (not diffusers' own, kept for older runs)
_NO_HIRES = (*_DIFFUSERS_OWN, "unipc_diffusers")
HIRES_SAMPLERS = frozenset(n for n in SAMPLERS if _FAMILY.get(n, n) not in _NO_HIRES)


@dataclass(frozen=True)
class Img2ImgSteps:
    """An img2img pass's steps, as A1111's ``setup_img2img_steps`` gives the hires fix.

    A1111 draws a schedule of ``int(steps / min(denoising_strength, 0.999))`` steps and the
    pass takes its end: a k-diffusion sampler its sigmas from index ``schedule_steps - steps``
    (:attr:`skipped`) down, ``steps`` steps; DDIM, PLMS and UniPC the lowest ``steps - 1``
    points of its grid (``fulora.generate.a1111_schedulers.a1111_img2img_grid``).
    """

    steps: int
    denoising_strength: float

    @property
    def schedule_steps(self) -> int:
        """The steps of the whole schedule drawn (more than :attr:`steps` below strength 1)."""
        return int(self.steps / min(self.denoising_strength, 0.999))

    @property
    def skipped(self) -> int:
        """The index of the schedule's sigma the pass starts from."""
        return self.schedule_steps - self.steps


# The scheduler class that takes a schedule type's sigmas, for each k-diffusion sampler's
_ON_SCHEDULE_TYPE = {
    "EulerDiscreteScheduler": "A1111EulerScheduler",
    "HeunDiscreteScheduler": "A1111HeunScheduler",
    "LMSDiscreteScheduler": "A1111LMSScheduler",
}
# ... and the one that steps it with A1111's churn (k-diffusion's order: noise, then the model)
_CHURNING = {
    "EulerDiscreteScheduler": "A1111EulerChurnScheduler",
    "HeunDiscreteScheduler": "A1111HeunChurnScheduler",
}


def make_scheduler(
    name: str,
    base_config: dict[str, Any],
    schedule: SigmaSchedule | None = None,
    churn: Churn | None = None,
    unipc: UniPCOptions | None = None,
    hires: bool = False,
):
    """A diffusers scheduler for sampler ``name``, built from the model's scheduler config.

    Args:
        name: The sampler (fulora's or A1111's name).
        base_config: The model's scheduler config.
        schedule: The sigmas to step through (``GenerateConfig.sigma_schedule``); None: the
            scheduler's own.
        churn: A1111's churn and sigma noise (``GenerateConfig.churn``); None: A1111's
            defaults (none, and the step noise as drawn).
        unipc: A1111's UniPC settings (``GenerateConfig.unipc_options``); None: its defaults.
        hires: It also runs a hires pass (:class:`Img2ImgSteps`; a :data:`HIRES_SAMPLERS`
            sampler): a k-diffusion sampler is then fulora's scheduler on its sigmas, whose
            tail the pass takes.
    """
    import diffusers

    from fulora.generate import a1111_schedulers, kdiffusion_schedulers

    name = resolve_sampler(name)
    cls_name, extra, _ = SAMPLERS[name]
    if churn is not None and churn.churn > 0 and cls_name in _CHURNING:
        cls_name = _CHURNING[cls_name]
        schedule = schedule or SigmaSchedule(_OWN_SCHEDULE[name])
    if schedule is None:  # the sampler's own, where fulora computes it
        schedule = own_sigma_schedule(name, hires)
    if schedule is not None:
        cls_name = _ON_SCHEDULE_TYPE.get(cls_name, cls_name)
    modules = (a1111_schedulers, kdiffusion_schedulers)
    found = (getattr(module, cls_name, None) for module in modules)
    cls = next((c for c in found if c is not None), None) or getattr(diffusers, cls_name)
    if unipc is not None and cls is a1111_schedulers.A1111UniPCScheduler:
        solver = "bh1" if unipc.variant == "vary_coeff" else unipc.variant  # stepped apart
        extra = {**extra, "solver_type": solver, "solver_order": unipc.order}
        extra["lower_order_final"] = unipc.lower_order_final
    scheduler = cls.from_config(base_config, **extra)
    if schedule is not None:
        scheduler.sigma_schedule = schedule
    if unipc is not None and cls is a1111_schedulers.A1111UniPCScheduler:
        scheduler.skip_type, scheduler.legacy_steps = unipc.skip_type, unipc.legacy_steps
        scheduler.vary_coeff = unipc.variant == "vary_coeff"
    if churn is not None and isinstance(scheduler, kdiffusion_schedulers.KDiffusionScheduler):
        scheduler.s_churn, scheduler.s_tmin = churn.churn, churn.tmin
        scheduler.s_tmax, scheduler.s_noise = churn.tmax, churn.noise
    return scheduler


def own_sigma_schedule(name: str, hires: bool = False) -> SigmaSchedule | None:
    """The sigmas a sampler steps through at A1111's defaults, where fulora computes them.

    None where its scheduler's own are A1111's (Euler, Heun, LMS, DPM++ 2M, ...) and no
    hires pass takes their tail; the two-call samplers' (DPM2, DPM2 a, DPM++ 2S a) for the rest.
    """
    name = resolve_sampler(name)
    if name not in _OWN_SCHEDULE or (SAMPLERS[name][0] not in _ALWAYS_ON_SCHEDULE and not hires):
        return None  # DDIM, PLMS, UniPC: timesteps of their own
    return SigmaSchedule(_OWN_SCHEDULE[name], discard_penultimate=name in DISCARD_PENULTIMATE)


def resolve_schedule_type(name: str) -> str:
    """Fulora's name of a schedule type given by fulora's or A1111's name (any case).

    Raises:
        ConfigError: For an unknown type; the message lists both kinds of names.
    """
    return _resolved(name, _SCHEDULE_KEYS, "schedule_type", SCHEDULE_TYPES)


def own_schedule(sampler: str) -> str | None:
    """A k-diffusion sampler's own schedule type; None: one that steps on timesteps of its own."""
    return _OWN_SCHEDULE.get(resolve_sampler(sampler))


def k_diffusion_samplers() -> str:
    """A1111's names of the k-diffusion samplers, which step on sigmas (for messages)."""
    return ", ".join(display_name(n) for n in _OWN_SCHEDULE if n not in _FAMILY)


def chosen_schedule_type(sampler: str, schedule: str) -> str | None:
    """The schedule type chosen for ``sampler`` other than its own; None: its own (automatic).

    Raises:
        ConfigError: A type for a sampler that has no sigmas to take it (A1111's DDIM, PLMS
            and UniPC ignore it; diffusers' own samplers), or another type for a sampler
            named after its schedule ("DPM++ 2M Karras").
    """
    sampler, schedule = resolve_sampler(sampler), resolve_schedule_type(schedule)
    own = own_schedule(sampler)
    if schedule in ("automatic", own):
        return None
    if own is None:
        raise ConfigError(
            f"schedule_type {schedule} is for the samplers A1111 runs with k-diffusion "
            f"({k_diffusion_samplers()}); {display_name(sampler)!r} "
            "steps on timesteps of its own (A1111 ignores the setting there): set "
            "schedule_type: automatic"
        )
    if sampler in _FAMILY:
        plain = _FAMILY[sampler]
        raise ConfigError(
            f"sampler {display_name(sampler)!r} is {display_name(plain)!r} on the "
            f"{SCHEDULE_TYPES[own]} schedule: for schedule_type {schedule}, set sampler: {plain}"
        )
    return schedule


def schedule_type(name: str, schedule: str = "automatic") -> str | None:
    """AUTOMATIC1111's "Schedule type" to name beside the sampler, where its default differs."""
    chosen = chosen_schedule_type(name, schedule)
    if chosen is not None:
        return SCHEDULE_TYPES[chosen]
    return _WRITTEN_SCHEDULE.get(resolve_sampler(name))


def display_name(name: str) -> str:
    """AUTOMATIC1111's name of a sampler."""
    return SAMPLERS[resolve_sampler(name)][2]


def scheduler_name(name: str) -> str:
    """The class that steps sampler ``name``: diffusers' scheduler, or fulora's A1111 one."""
    return SAMPLERS[resolve_sampler(name)][0]
