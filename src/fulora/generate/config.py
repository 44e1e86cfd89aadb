"""The configuration of ``fulora generate``.

Kept apart from the generation code (torch, diffusers) so that a bad value is refused before
those load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from fulora.config import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    POSITIVE,
    SEED,
    Checked,
    CompileMode,
    Range,
)
from fulora.errors import ConfigError
from fulora.generate.networks import plane_lora_weights
from fulora.generate.prompts import check_prompt_syntax, strip_comments
from fulora.generate.samplers import (
    BROWNIAN_NOISE,
    CHURN_SAMPLERS,
    DISCARD_PENULTIMATE,
    HIRES_SAMPLERS,
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    SIGMA_NOISE_SAMPLERS,
    SPAN_FIXED,
    STEP_NOISE,
    STEP_NOISE_WITHOUT_ETA,
    TAKE_RHO,
    Churn,
    SigmaSchedule,
    UniPCOptions,
    a1111_grid_points,
    check_steps,
    chosen_schedule_type,
    display_name,
    k_diffusion_samplers,
    own_schedule,
    own_sigma_schedule,
    resolve_sampler,
    resolve_schedule_type,
)
from fulora.generate.schedules import schedule_steps
from fulora.lora.config import DEFAULT_BASE
from fulora.planes import PAPER_PLANES

# the hires fix's settings other than its size (hires_scale, hires_resize_*), which turns it on
HIRES_SETTINGS = ("hires_upscaler", "hires_steps", "denoising_strength")
HIRES_SIZES = ("hires_scale", "hires_resize_width", "hires_resize_height")


def _noise_owners(key: str) -> str:
    """The samplers whose step noise ``key`` sets, by A1111's names (named variants left out)."""
    variant = ("karras", "exponential")  # "DPM2 a Karras": DPM2 a is named
    owners = [n for n, (k, _) in STEP_NOISE.items() if k == key and own_schedule(n) not in variant]
    return ", ".join(repr(display_name(n)) for n in owners)


# A1111's names of its churn settings (written in its settings text where set)
_CHURN_NAMES = {"sigma_churn": "Sigma churn", "sigma_tmin": "Sigma tmin"}
_CHURN_NAMES |= {"sigma_tmax": "Sigma tmax", "sigma_noise": "Sigma noise"}


_UNIPC_KEYS = ("unipc_variant", "unipc_skip_type", "unipc_order", "unipc_lower_order_final")
_UNIPC_KEYS += ("unipc_legacy_steps",)


def _unipc_steps(cfg: GenerateConfig) -> int:
    """The UniPC steps A1111 v1.6+ takes: the points of its DDIM grid (31 for 30 steps)."""
    steps = cfg.steps + (1 if cfg.discard_penultimate_sigma else 0)
    return a1111_grid_points(steps) if steps <= 1000 else 0


def check_rng_device(rng: str, device: str) -> None:
    """``rng: gpu`` draws the noise on a CUDA device, as A1111's default source does.

    Raises:
        ConfigError: Another device ("cpu"), naming ``nv``, the same numbers on the CPU.
    """
    if rng == "gpu" and not device.startswith("cuda"):
        raise ConfigError(
            f"rng: gpu draws the noise on the GPU, as A1111's default source does, and this "
            f"run is on {device}: use rng: nv, A1111's CPU imitation of the same numbers"
        )


@dataclass
class GenerateConfig(Checked):
    """Configuration of ``fulora generate``."""

    RANGES = {
        # A1111 users do use negative LoRA weights; past +-4 images break down.
        "lora_scale": Range(-4, 4),
        "per_class": AT_LEAST_1,
        "clip_skip": Range(1, 12),
        "steps": AT_LEAST_1,
        "guidance": AT_LEAST_0,  # at most 1: no classifier-free guidance
        "width": Range(8),
        "height": Range(8),
        "seed": SEED,
        "eta_noise_seed_delta": Range(0, 2**32 - 1),
        "eta_ancestral": AT_LEAST_0,
        "eta_ddim": AT_LEAST_0,
        "beta_schedule_alpha": POSITIVE,
        "skip_early_cfg": FRACTION,
        "schedule_sigma_min": AT_LEAST_0,
        "schedule_sigma_max": AT_LEAST_0,
        "schedule_rho": AT_LEAST_0,
        "ngms": AT_LEAST_0,
        "sigma_churn": AT_LEAST_0,
        "sigma_tmin": AT_LEAST_0,
        "sigma_tmax": AT_LEAST_0,
        "sigma_noise": AT_LEAST_0,
        "unipc_order": Range(1, 50),
        "hires_scale": Range(1, 8),
        "hires_resize_width": AT_LEAST_0,
        "hires_resize_height": AT_LEAST_0,
        "hires_steps": AT_LEAST_0,
        "denoising_strength": Range(0, 1, low_open=True),
        "beta_schedule_beta": POSITIVE,
        "variation_seed": SEED,
        "variation_strength": FRACTION,
        "seed_resize_from_width": Range(8),
        "seed_resize_from_height": Range(8),
        "batch_size": AT_LEAST_1,
        "contact_sheet": AT_LEAST_0,
        "write_threads": Range(0, 32),
    }

    def check(self) -> None:
        """Known sampler and planes; prompts A1111 reads alike; sides multiples of 8; fused QKV.

        Checked here rather than at generation, so that an experiment's dry run catches a
        misspelt sampler before its LoRA trains.
        """
        check_steps(self.sampler, self.steps)  # a known sampler, and steps it can take
        self._check_schedule_type()
        self._check_churn()
        self._check_unipc()
        self._check_hires()
        self._check_uncond_skips()
        self.check_planes_of("planes")
        self.check_planes_of("prompts")  # its keys: a misspelt plane would fall back silently
        steps, guided = schedule_steps(resolve_sampler(self.sampler), self.steps), self.guidance > 1
        reading = self.prompt_reading | {"hires_steps": self.hires_prompt_steps}
        for plane, prompt in self.prompts.items():
            prompt = self.as_read(prompt)
            check_prompt_syntax(prompt, f"prompts.{plane}", steps, guided=guided, **reading)
        negative = self.as_read(self.negative_prompt)
        check_prompt_syntax(negative, "negative_prompt", steps, negative=True, **reading)
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and value % 8:
                raise ConfigError(f"{key!r} must be a multiple of 8, got {value}")
        self._check_rng()
        for key, listed in (("lora_hash", "Lora hashes"), ("model_hash", "Model hash")):
            value = getattr(self, key)
            if value is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", value):
                raise ConfigError(
                    f"{key} {value!r} is not a hash: give the hex digits of an A1111 image's "
                    f"'{listed}'"
                )
        self._check_embedding_hashes()
        self.needs_switch("compile", ("compile_mode", "inductor_tuning"), "torch.compile")
        if self.fuse_qkv and self.lora and not self.fuse_lora:
            raise ConfigError(
                "fuse_qkv needs fuse_lora: true (an unfused LoRA sits on the separate q, k, v "
                "projections that fuse_qkv replaces)"
            )

    def as_read(self, prompt: str) -> str:
        """A prompt as A1111 reads it first: without its ``#`` comments, if they are on."""
        return strip_comments(prompt) if self.prompt_comments else prompt

    @property
    def prompt_reading(self) -> dict[str, Any]:
        """How A1111 reads the prompts (the settings its checks and encoding take by name)."""
        return {"emphasis": self.emphasis, "old_timelines": self.old_prompt_editing}

    @property
    def hires_fix(self) -> bool:
        """Whether A1111's hires fix is on: ``hires_scale`` or a ``hires_resize_*`` set."""
        return self.hires_scale is not None or any(self.hires_resize)

    @property
    def hires_resize(self) -> tuple[int, int]:
        """A1111's "Hires resize" (width, height); (0, 0): none."""
        return self.hires_resize_width, self.hires_resize_height

    @property
    def hires_prompt_steps(self) -> int | None:
        """The steps A1111 schedules the prompts over in the hires pass; None: no hires pass."""
        if not self.hires_fix:
            return None
        return schedule_steps(resolve_sampler(self.sampler), self.hires_steps or self.steps)

    def sigma_schedule(self) -> SigmaSchedule | None:
        """The sigmas the sampler steps through; None: its scheduler's own, as before."""
        kind = chosen_schedule_type(self.sampler, self.schedule_type)
        model = (self.downcast_alphas_cumprod, self.zero_terminal_snr, self.sgm_noise_multiplier)
        if kind is None and not self._schedule_options() and not any(model):
            return own_sigma_schedule(self.sampler)  # None: the scheduler's own
        discard = resolve_sampler(self.sampler) in DISCARD_PENULTIMATE
        return SigmaSchedule(
            kind or own_schedule(self.sampler),
            beta_shape=(self.beta_schedule_alpha, self.beta_schedule_beta),
            sigma_min=self.schedule_sigma_min,
            sigma_max=self.schedule_sigma_max,
            rho=self.schedule_rho,
            discard_penultimate=self.discard_penultimate_sigma or discard,
            downcast=self.downcast_alphas_cumprod,
            zero_terminal_snr=self.zero_terminal_snr,
            sgm_noise_multiplier=self.sgm_noise_multiplier,
        )

    def _schedule_options(self) -> list[str]:
        """The keys of A1111's sigma options set otherwise than their defaults."""
        keys = ("schedule_sigma_min", "schedule_sigma_max", "schedule_rho")
        return [key for key in (*keys, "discard_penultimate_sigma") if getattr(self, key)]

    def _check_schedule_type(self) -> None:
        """A schedule type the sampler steps on; each option only where it changes the sigmas."""
        self._check_alpha_bar()
        options = self._schedule_options()
        if resolve_sampler(self.sampler) in ("ddim", "plms", "unipc"):  # a grid of a step more
            options = [key for key in options if key != "discard_penultimate_sigma"]
        if options:
            self._refuse_off_k_diffusion(options[0], "changes the sigmas")
        if self.discard_penultimate_sigma and resolve_sampler(self.sampler) in DISCARD_PENULTIMATE:
            raise ConfigError(
                f"discard_penultimate_sigma: true changes no sigma of "
                f"{display_name(self.sampler)!r}, which drops the penultimate sigma anyway (as "
                "A1111 runs it): set discard_penultimate_sigma: false"
            )
        schedule = self.sigma_schedule()
        kind = schedule.kind if schedule is not None else None
        unused = [] if kind == "beta" else ["beta_schedule_alpha", "beta_schedule_beta"]
        unused += [] if kind in TAKE_RHO else ["schedule_rho"]
        unused += ["schedule_sigma_min", "schedule_sigma_max"] if kind in SPAN_FIXED else []
        for key in unused:
            default = self.__dataclass_fields__[key].default
            if getattr(self, key) != default:
                raise ConfigError(
                    f"{key} {getattr(self, key):g} does not change the sigmas of schedule_type "
                    f"{kind or resolve_schedule_type(self.schedule_type)} (A1111 ignores it "
                    f"there): set {key}: {default:g}, or a schedule_type it shapes"
                )
        low, high = self.schedule_sigma_min, self.schedule_sigma_max
        if low and high and low >= high:
            raise ConfigError(
                f"schedule_sigma_min {low:g} must be below schedule_sigma_max {high:g}"
            )

    def _refuse_off_k_diffusion(self, key: str, what: str) -> None:
        """A setting of the k-diffusion samplers' sigmas, refused on a sampler without them."""
        if own_schedule(self.sampler) is None:
            raise ConfigError(
                f"{key} {what} of a k-diffusion sampler ({k_diffusion_samplers()}), and "
                f"{display_name(self.sampler)!r} steps on timesteps of its own (A1111 ignores "
                f"it there): set {key} to its default"
            )

    def unipc_options(self) -> UniPCOptions | None:
        """A1111's UniPC settings (``make_scheduler``'s); None: its defaults, since v1.6."""
        options = UniPCOptions(
            self.unipc_variant,
            self.unipc_skip_type,
            self.unipc_order,
            self.unipc_lower_order_final,
            self.unipc_legacy_steps,
        )
        return None if options == UniPCOptions() else options

    def _check_unipc(self) -> None:
        """UniPC's settings with UniPC only; an order its steps allow."""
        sampler = resolve_sampler(self.sampler)
        fields = self.__dataclass_fields__
        changed = [k for k in _UNIPC_KEYS if getattr(self, k) != fields[k].default]
        if changed and sampler != "unipc":
            raise ConfigError(
                f"{changed[0]} is a setting of A1111's UniPC, and the sampler is "
                f"{display_name(sampler)!r} (A1111 ignores it there): set it to its default, "
                "or sampler: unipc"
            )
        if sampler != "unipc":
            return
        steps = self.steps if self.unipc_legacy_steps else _unipc_steps(self)
        if not steps:
            raise ConfigError(
                f"steps {self.steps}: A1111 v1.6+ spaces UniPC's steps on its grid of 1000 "
                "timesteps, which takes at most 1000 (its sampler fails past it): give fewer"
            )
        if self.unipc_order > steps:
            raise ConfigError(
                f"unipc_order {self.unipc_order} needs {self.unipc_order} UniPC steps or more, "
                f"and steps {self.steps} gives {steps} (A1111 refuses it: 'UniPC order must be "
                "< sampling steps'): lower unipc_order, or raise steps"
            )

    def _check_hires(self) -> None:
        """The hires fix's settings with it on only, on a sampler and upscaler fulora runs."""
        if not self.hires_fix:
            for key in HIRES_SETTINGS:
                default = self.__dataclass_fields__[key].default
                if getattr(self, key) != default:
                    raise ConfigError(
                        f"{key} is a setting of A1111's hires fix, which is off: set "
                        "hires_scale (its 'Hires upscale') or hires_resize_width and _height "
                        f"(its 'Hires resize'), or {key}: {default}"
                    )
            return
        for key in ("hires_resize_width", "hires_resize_height"):
            if 0 < getattr(self, key) < 8:
                raise ConfigError(f"{key} {getattr(self, key)}: give 8 or more, or 0")
        if self.hires_scale is not None and any(self.hires_resize):
            raise ConfigError(
                f"hires_scale {self.hires_scale:g} and hires_resize "
                f"{self.hires_resize_width}x{self.hires_resize_height} both set the hires "
                "pass's size (A1111 takes the resize): set one"
            )
        sampler = resolve_sampler(self.sampler)
        if sampler not in HIRES_SAMPLERS:
            raise ConfigError(
                f"the hires fix: fulora runs A1111's hires pass with A1111's samplers, and "
                f"{display_name(self.sampler)!r} is diffusers' own (kept for older runs): "
                "choose one of A1111's (fulora generate --help lists them)"
            )
        self._check_timestep_hires_pass(sampler)
        if self.hires_upscaler in IMAGE_UPSCALERS and self.rng == "nv":
            raise ConfigError(
                f"hires_upscaler {self.hires_upscaler!r} with rng: nv: A1111 encodes the resized "
                "image with a draw from torch's global generator, which its NV source leaves "
                "unseeded, so no one, A1111 included, makes that image again: choose rng cpu or "
                "gpu, or a latent upscaler"
            )
        if self.hires_upscaler not in (*LATENT_UPSCALERS, *IMAGE_UPSCALERS):
            raise ConfigError(
                f"hires_upscaler {self.hires_upscaler!r}: fulora runs A1111's latent upscalers "
                f"({', '.join(LATENT_UPSCALERS)}) and its image upscalers "
                f"{', '.join(IMAGE_UPSCALERS)}; its others (ESRGAN, SwinIR, ...) are networks "
                "whose weights fulora does not load: choose one of those (--hires-upscaler; "
                "for an A1111 image's settings, its image is then made with that one)"
            )

    def _check_timestep_hires_pass(self, sampler: str) -> None:
        """Enough hires steps for DDIM, PLMS and UniPC.

        A1111 runs their img2img pass on ``steps - 1`` points of their grid: DDIM and PLMS step
        between them, ``steps - 2`` steps.
        """
        steps = self.hires_steps or self.steps
        key = "hires_steps" if self.hires_steps else "steps"
        if sampler in ("ddim", "plms") and steps < 3:
            raise ConfigError(
                f"{key} {steps}: A1111's {display_name(sampler)} runs the model {key} - 2 = "
                f"{max(steps - 2, 0)} times in its hires pass, which returns the noise: give 3 "
                "or more"
            )
        if sampler == "unipc" and self.unipc_legacy_steps:
            raise ConfigError(
                "unipc_legacy_steps: fulora runs the hires pass of A1111 v1.6+'s UniPC, not of "
                "the versions before: generate without the hires fix, or without the legacy steps"
            )
        if sampler == "unipc" and self.unipc_order > steps - 1:
            raise ConfigError(
                f"unipc_order {self.unipc_order} needs as many UniPC steps, and A1111's hires "
                f"pass takes {key} - 1 = {steps - 1}: lower unipc_order, or raise {key}"
            )

    def _check_embedding_hashes(self) -> None:
        """Hashes of A1111's form, each for an embedding that ``embeddings`` can give."""
        for name, value in self.embedding_hashes.items():
            if not re.fullmatch(r"[0-9a-fA-F]{8,64}", value):
                raise ConfigError(
                    f"embedding_hashes.{name} {value!r} is not a hash: give the hex digits an "
                    "A1111 image's 'TI hashes' lists"
                )
        if self.embedding_hashes and not self.embeddings:
            names = ", ".join(self.embedding_hashes)
            raise ConfigError(
                f"the settings name the textual-inversion embeddings {names} (A1111's 'TI "
                "hashes'), and embeddings gives no file: give their files or folder with "
                "--embeddings"
            )

    def churn(self) -> Churn | None:
        """A1111's churn and sigma noise (``make_scheduler``'s); None: A1111's defaults."""
        if not (self.sigma_churn or self.sigma_tmin or self.sigma_tmax or self.sigma_noise != 1):
            return None
        tmax = self.sigma_tmax or float("inf")  # 0: no bound, as A1111 reads its setting
        return Churn(self.sigma_churn, self.sigma_tmin, tmax, self.sigma_noise)

    def _check_churn(self) -> None:
        """A1111's churn settings only for the samplers it passes them to; a span of sigmas."""
        sampler = resolve_sampler(self.sampler)
        for key, takers, default in (
            ("sigma_churn", CHURN_SAMPLERS, 0.0),
            ("sigma_tmin", CHURN_SAMPLERS, 0.0),
            ("sigma_tmax", CHURN_SAMPLERS, 0.0),
            ("sigma_noise", SIGMA_NOISE_SAMPLERS, 1.0),
        ):
            if getattr(self, key) != default and sampler not in takers:
                plain = sorted(n for n in takers if own_schedule(n) == "uniform")  # not variants
                named = ", ".join(repr(display_name(n)) for n in plain)
                raise ConfigError(
                    f"{key} {getattr(self, key):g} is A1111's '{_CHURN_NAMES[key]}', which it "
                    f"passes to {named} only; {display_name(sampler)!r} takes none (A1111 ignores "
                    f"it there): set {key}: {default:g}, or one of those samplers"
                )
        if self.sigma_tmax and self.sigma_tmin > self.sigma_tmax:
            raise ConfigError(
                f"sigma_tmin {self.sigma_tmin:g} is above sigma_tmax {self.sigma_tmax:g}: no "
                "sigma lies between them, so no step would be churned; set sigma_tmin below "
                "sigma_tmax (or sigma_tmax: 0, no upper bound)"
            )

    def _check_alpha_bar(self) -> None:
        """A1111's changes of alpha_bar only where fulora runs them as A1111 does."""
        names = {
            "downcast_alphas_cumprod": "Downcast alphas_cumprod, which it also reads into "
            "texts of its versions before v1.7.0-225"
        }
        names["zero_terminal_snr"] = "Noise Schedule: Zero Terminal SNR"
        timestep_samplers = ("ddim", "plms", "unipc")  # A1111's own, on its timestep grid
        runs = own_schedule(self.sampler) or resolve_sampler(self.sampler) in timestep_samplers
        for key, name in names.items():
            if getattr(self, key) and not runs:
                raise ConfigError(
                    f"{key}: true (A1111's {name}) is run for A1111's samplers, and "
                    f"{display_name(self.sampler)!r} is diffusers' own (kept for runs made "
                    "with it): choose an A1111 sampler, or set "
                    f"{key}: false (another image)"
                )
        if self.sgm_noise_multiplier:
            self._refuse_off_k_diffusion("sgm_noise_multiplier", "scales the start")
        if self.downcast_alphas_cumprod and self.zero_terminal_snr:
            raise ConfigError(
                "zero_terminal_snr: true with downcast_alphas_cumprod: true rescales alpha_bar in "
                "fp16, where its last sigma overflows to infinity (A1111's images are NaN): set "
                "one of them to false"
            )

    def _check_uncond_skips(self) -> None:
        """Skip Early CFG, NGMS and pad_conds where there is a negative pass; NGMS's sigma."""
        for key in ("skip_early_cfg", "ngms"):
            if getattr(self, key) and self.guidance <= 1:
                raise ConfigError(
                    f"{key} {getattr(self, key):g} leaves the negative prompt out of some steps, "
                    f"and guidance {self.guidance:g} runs none (no classifier-free guidance): "
                    f"set {key}: 0, or guidance above 1"
                )
        if self.pad_conds != "off" and self.guidance <= 1:
            raise ConfigError(
                f"pad_conds: {self.pad_conds} pads the prompt and negative prompt to one length, "
                f"and guidance {self.guidance:g} uses no negative prompt: set pad_conds: off, or "
                "guidance above 1"
            )
        if self.ngms_all_steps and not self.ngms:
            raise ConfigError(
                "ngms_all_steps: true is NGMS on every step rather than every other: set ngms "
                "(A1111's 'Negative Guidance minimum sigma') above 0, or ngms_all_steps: false"
            )
        if self.ngms and own_schedule(self.sampler) is None:
            raise ConfigError(
                f"ngms {self.ngms:g}: A1111 compares NGMS with the sampler's sigma, and "
                f"{display_name(self.sampler)!r} hands its model a timestep instead (A1111 "
                "compares that, skipping by timestep): use a k-diffusion sampler "
                f"({k_diffusion_samplers()}), or ngms: 0"
            )

    def _check_rng(self) -> None:
        """Seeds torch takes; eta and ENSD where step noise uses them; ``gpu`` needs a GPU."""
        unused = self._unused_step_noise_setting()
        if unused is not None:
            key, default, why = unused
            raise ConfigError(
                f"{key} {getattr(self, key):g} changes only the noise that a sampler adds at "
                f"each step (the ancestral and SDE ones: {_noise_owners('eta_ancestral')}; "
                f"DDIM at an eta_ddim above 0), and {why}, so it would change no image (A1111 "
                f"ignores it there too): set {key}: {default:g}"
            )
        consecutive = self.seed_scheme == "consecutive"
        last = self.seed + self.per_class - 1 if consecutive else 2**32 - 1  # the largest seed
        if consecutive and last > SEED.high:
            raise ConfigError(
                f"seed_scheme: consecutive gives image {self.per_class - 1} the seed "
                f"{self.seed} + {self.per_class - 1}, past the largest seed torch takes "
                f"({SEED.high}): give a smaller seed"
            )
        delta = self.eta_noise_seed_delta
        if last + delta > SEED.high:
            raise ConfigError(
                f"eta_noise_seed_delta {delta} seeds the step noise of the image seeded {last} "
                f"with {last} + {delta}, past the largest seed torch takes ({SEED.high}): give "
                "a smaller seed or delta"
            )
        self._check_variation_and_resize()
        if self.device != "auto":  # auto: checked when generate resolves it
            check_rng_device(self.rng, self.device)

    def _unused_step_noise_setting(self) -> tuple[str, float, str] | None:
        """(key, default, why) of an eta or ENSD that no step noise of this run would use."""
        sampler = resolve_sampler(self.sampler)
        own = STEP_NOISE.get(sampler)
        for key, default in dict.fromkeys(STEP_NOISE.values()):
            if getattr(self, key) != default and (own is None or own[0] != key):
                why = f"it is for {_noise_owners(key)}, not {display_name(sampler)!r}"
                return key, default, why
        if self.eta_noise_seed_delta and sampler in BROWNIAN_NOISE:
            why = (
                f"{display_name(sampler)!r} draws it from Brownian trees seeded with each "
                "image's seed, which ENSD does not change"
            )
            return "eta_noise_seed_delta", 0, why
        drawn = own and getattr(self, own[0]) or sampler in STEP_NOISE_WITHOUT_ETA
        drawn = drawn or (sampler in CHURN_SAMPLERS and self.sigma_churn > 0)
        if self.eta_noise_seed_delta and not drawn:
            why = f"{own[0]} 0 adds none" if own else f"{display_name(sampler)!r} adds none"
            why += " at sigma_churn 0" if sampler in CHURN_SAMPLERS else ""
            return "eta_noise_seed_delta", 0, why
        return None

    def variation_seed_of(self, index: int) -> int | None:
        """Image ``index``'s variation seed, as A1111 numbers a batch's (None: no variation)."""
        return self.variation_seed + index if self.variation_strength else None

    def _check_variation_and_resize(self) -> None:
        """Both sides of a seed resize; a variation seed with its strength, on A1111's batch."""
        sides = (self.seed_resize_from_width, self.seed_resize_from_height)
        if (sides[0] is None) != (sides[1] is None):
            raise ConfigError(
                f"seed_resize_from_width {sides[0]} and seed_resize_from_height {sides[1]}: "
                "give both (A1111's 'Seed resize from', width x height) or neither"
            )
        seed, strength = self.variation_seed, self.variation_strength
        if (seed is None) != (strength == 0):
            raise ConfigError(
                f"variation_seed {seed} with variation_strength {strength:g}: a variation needs "
                "both (A1111's 'Variation seed' and 'Variation seed strength'), a seed and a "
                "strength above 0; set neither for none"
            )
        if seed is None:
            return
        if self.seed_scheme != "consecutive":
            raise ConfigError(
                "a variation seed follows A1111's batch numbering (every image the seed, image "
                "i the variation seed + i): set seed_scheme: consecutive"
            )
        if seed + self.per_class - 1 > SEED.high:
            raise ConfigError(
                f"variation_seed {seed} + {self.per_class - 1} (image {self.per_class - 1}'s) "
                f"is past the largest seed torch takes ({SEED.high}): give a smaller one"
            )

    def lora_weights(
        self, prompts: dict[str, str], names: tuple[str, ...] | None
    ) -> dict[str, tuple[float, float]]:
        """Each plane's LoRA multipliers (text encoder, UNet), checked before any work.

        A plane's prompt's ``<lora:...>`` gives them, else ``lora_scale``; each tag must name
        the run's LoRA, and fuse_qkv needs one weight for every plane.

        Args:
            prompts: Plane -> its prompt as written.
            names: The names A1111 finds the run's LoRA by (file name, alias); None: the
                run has no LoRA, and a tag is refused.

        Raises:
            ConfigError: A tag names another LoRA or none is given; or fuse_qkv with planes
                of other weights.
        """
        weights = {
            plane: plane_lora_weights(prompt, f"prompts.{plane}", self.lora_scale, names)
            for plane, prompt in prompts.items()
        }
        if self.fuse_qkv and len(set(weights.values())) > 1:
            given = ", ".join(f"{plane} {te:g}/{unet:g}" for plane, (te, unet) in weights.items())
            raise ConfigError(
                "fuse_qkv needs the LoRA fused at one weight, and the prompts' <lora:...> tags "
                f"give the planes different weights (text encoder/UNet: {given}): generate "
                "those planes in runs of their own (--planes), or set fuse_qkv: false"
            )
        return weights

    base: str = DEFAULT_BASE  # hub id, diffusers folder or .safetensors/.ckpt file
    # the base checkpoint's AUTOMATIC1111 hash (an image's "Model hash"): another is refused
    model_hash: str | None = None
    base_config: str | None = None
    lora: str | None = None  # kohya .safetensors, diffusers LoRA folder, or a LoRA run folder
    lora_scale: float = 1.0  # a prompt's <lora:name:w> gives its plane's weight instead
    # the LoRA's AUTOMATIC1111 short hash (an image's "Lora hashes"): another file is refused
    lora_hash: str | None = None
    fuse_lora: bool = True  # merge the LoRA into the weights: faster, same images
    # AUTOMATIC1111's textual-inversion embeddings: files (.pt, .bin, .safetensors) or folders
    # of them, as its embeddings folder; a prompt holding a file's name (its stem) gets its
    # vectors there, as A1111 reads it
    embeddings: list[str] = field(default_factory=list)
    # name -> the embedding's AUTOMATIC1111 short hash (an image's "TI hashes"): each must be
    # among the embeddings, that file; another is refused
    embedding_hashes: dict[str, str] = field(default_factory=dict)
    planes: list[str] = field(default_factory=lambda: list(PAPER_PLANES))
    per_class: int = 1000
    # plane -> prompt, read as AUTOMATIC1111 reads it ((word:1.2), BREAK, [a:b:10], [a|b],
    # AND, <lora:name:0.8> naming the lora file); default: the LoRA's captions
    prompts: dict[str, str] = field(default_factory=dict)
    negative_prompt: str = ""  # as AUTOMATIC1111 reads it: (word:1.2), BREAK, [a:b:10], [a|b]
    # A1111's "Enable comments" (on by default, v1.8+): from '#' to the end of a line is left out
    # of the prompts, which the PNG text holds without them; false: '#' is text (older A1111s)
    prompt_comments: bool = True
    # A1111's setting "Emphasis": original (its default: weighted, then rescaled to the mean),
    # no_norm (weighted only), ignore (brackets read, no weights), none (brackets, backslashes
    # and BREAK are plain text)
    emphasis: Literal["original", "no_norm", "ignore", "none"] = "original"
    # A1111's "Use old prompt editing timelines" (its rule before v1.6): [a:b:N] changes at a
    # fraction N of the steps if N is below 1, else at step N (the default: a fraction if N has
    # a point, else a step)
    old_prompt_editing: bool = False
    # kohya/AUTOMATIC1111 clip skip (1 = CLIP's last layer), for the prompt and the negative
    # prompt alike. None: the LoRA's training clip skip (ss_clip_skip), else 1.
    clip_skip: int | None = None
    sampler: str = "dpmpp_2m_karras"  # fulora's name or AUTOMATIC1111's ("DPM++ 2M Karras")
    # A1111's "Schedule type" (v1.9+): the sigmas a k-diffusion sampler (Euler, Euler a, Heun,
    # LMS, DPM++ 2M) steps through: automatic (the sampler's own: uniform, or karras for the
    # "... Karras" samplers), uniform, karras, exponential, polyexponential, sgm_uniform,
    # kl_optimal, align_your_steps, simple, normal, ddim, beta (or A1111's name, "SGM Uniform")
    schedule_type: str = "automatic"
    # the beta type's shape (A1111's "Beta schedule alpha" and "Beta schedule beta")
    beta_schedule_alpha: float = 0.6
    beta_schedule_beta: float = 0.6
    # A1111's "Schedule min sigma" and "Schedule max sigma" (its settings sigma_min, sigma_max):
    # the sigmas a schedule type spans; 0: the model's own (all but uniform, simple, ddim and
    # align_your_steps take them)
    schedule_sigma_min: float = 0.0
    schedule_sigma_max: float = 0.0
    # A1111's "Schedule rho" (its setting rho) for karras and polyexponential; 0: 7 and 1
    schedule_rho: float = 0.0
    # A1111's "Discard penultimate sigma" (always_discard_next_to_last_sigma): a step more is
    # drawn and the sigma before the last left out
    discard_penultimate_sigma: bool = False
    # A1111's "Downcast alphas_cumprod" (use_downcasted_alpha_bar; on for its texts of versions
    # before v1.7.0-225): the sampler's sigmas from the model's alpha_bar in fp16, as A1111's
    # fp16 models had them; for every A1111 sampler
    downcast_alphas_cumprod: bool = False
    # A1111's "Noise Schedule: Zero Terminal SNR" (sd_noise_schedule): the model's alpha_bar
    # rescaled so its last step is pure noise (sigma 4519 for SD1.5), for every A1111 sampler
    zero_terminal_snr: bool = False
    # A1111's "SGM noise multiplier" (sgm_noise_multiplier): the k-diffusion samplers start from
    # the noise times sqrt(1 + sigma_max^2), as SDXL's reference code, not times sigma_max
    sgm_noise_multiplier: bool = False
    # A1111's "Sigma churn" (its setting s_churn; Karras et al.'s churn): Euler, Heun and DPM2
    # start each step from its sigma raised by 1 + min(churn / steps, 0.414), with each image's
    # next draw added to match: other images, fresh noise at every step; 0: none (A1111's)
    sigma_churn: float = 0.0
    # A1111's "Sigma tmin" and "Sigma tmax" (s_tmin, s_tmax): the churn only at the steps whose
    # sigma lies between them; tmax 0: no upper bound (A1111's 0)
    sigma_tmin: float = 0.0
    sigma_tmax: float = 0.0
    # A1111's "Sigma noise" (s_noise): the churn's noise times this, and the step noise of DPM
    # fast, DPM2 a, DPM++ 2S a and the SDE samplers (1: as drawn, A1111's default)
    sigma_noise: float = 1.0
    # A1111's UniPC settings: "UniPC variant" (bh1, bh2, vary_coeff), "UniPC
    # skip type" (its times spaced evenly: time_uniform, in sqrt(t): time_quadratic, or in
    # log-SNR: logSNR), "UniPC order" and "UniPC lower order final"
    unipc_variant: Literal["bh1", "bh2", "vary_coeff"] = "bh1"
    unipc_skip_type: Literal["time_uniform", "time_quadratic", "logSNR"] = "time_uniform"
    unipc_order: int = 3
    unipc_lower_order_final: bool = True
    # UniPC's steps as A1111 before v1.6 took them, ``steps``; since v1.6 it takes as many as
    # its DDIM grid has points (31 for 30); --a1111 sets it for an older text
    unipc_legacy_steps: bool = False
    steps: int = 30
    # A1111's hires fix ("Hires upscale"): a second, img2img pass at width and height times
    # this, from the first pass's latent upscaled (hires_upscaler) and noised again to the
    # denoising strength's sigma, with the same sampler and prompts; None: off (one pass)
    hires_scale: float | None = None
    # A1111's "Hires resize" (width, height) instead of a scale: a side 0 follows the other at
    # the first pass's aspect ratio; both: the first pass upscaled to cover them, then cut
    hires_resize_width: int = 0
    hires_resize_height: int = 0
    # A1111's "Hires upscaler": a latent one, "Latent" (bilinear, its default), "Latent
    # (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
    # "Latent (nearest-exact)"; or an image one, "None", "Lanczos", "Nearest" (the first pass
    # decoded, resized with PIL and encoded again; rng cpu or gpu)
    hires_upscaler: str = "Latent"
    # A1111's "Hires steps": the hires pass's steps; 0: steps
    hires_steps: int = 0
    # A1111's "Denoising strength" (its default 0.7): the hires pass's steps take the last
    # steps of a schedule of hires steps / this many (1: all of it, from pure noise)
    denoising_strength: float = 0.7
    guidance: float = 7.0
    # A1111's "Skip Early CFG" (its setting skip_early_cond): the share of the first steps run
    # without the negative prompt (the prompt alone, unguided); faster, other images; 0: none
    skip_early_cfg: float = 0.0
    # A1111's "NGMS" (Negative Guidance minimum sigma, s_min_uncond): every other step below
    # this sigma runs without the negative prompt (faster, images near the guided ones); 0: off
    ngms: float = 0.0
    # A1111's "NGMS all steps": every step below ngms's sigma, not every other one
    ngms_all_steps: bool = False
    # A1111's "Pad prompt/negative prompt" where the two differ in chunks: off (its default:
    # each attends to its own tokens), on ("Pad conds": the shorter gets the empty prompt's
    # chunks, encoded without the LoRA), v0 ("Pad conds v0": the negative's last token repeated,
    # or the negative cut to the prompt's length)
    pad_conds: Literal["off", "on", "v0"] = "off"
    width: int | None = None  # default: the LoRA's training size, else 512
    height: int | None = None
    seed: int = 0
    # where each image's noise is drawn, as A1111's "Random number generator source": cpu (the
    # same images on every machine), gpu (A1111's default; CUDA only), nv (A1111's imitation of
    # gpu's numbers on the CPU)
    rng: Literal["cpu", "gpu", "nv"] = "cpu"
    # A1111's "Eta noise seed delta" (ENSD; 31337 in many A1111 set-ups): Euler a's step noise
    # comes from generators seeded with each image's seed plus it; 0: from the image's own
    # generator, after its starting noise (A1111's default)
    eta_noise_seed_delta: int = 0
    # A1111's "Eta" for Euler a (its setting eta_ancestral): how much noise each step adds
    # back (1: all, A1111's default; 0: none, Euler's path with Euler a's smaller steps)
    eta_ancestral: float = 1.0
    # A1111's "Eta DDIM" (its setting eta_ddim): at 0, its default, DDIM is deterministic; above,
    # each step replaces part of its direction with noise from the image's generator
    eta_ddim: float = 0.0
    # each image's seed: hashed (fulora's, from the run seed, plane and index: other seeds in
    # every plane and run), or consecutive (seed + index, as A1111 numbers a batch's images:
    # the same in every plane, as one A1111 run per plane with this seed)
    seed_scheme: Literal["hashed", "consecutive"] = "hashed"
    # A1111's variation seed ("subseed"): image i's starting noise moved towards the noise of
    # variation_seed + i, every image keeping the run's seed, as A1111's batch does; needs
    # seed_scheme: consecutive and a variation_strength
    variation_seed: int | None = None
    # how far it moves, A1111's "Variation seed strength" (its slerp): 0 not at all, 1 all the
    # way to the variation seed's noise
    variation_strength: float = 0.0
    # A1111's "Seed resize from" (width, height): each image's noise drawn at that size in the
    # middle of its own, so a seed keeps its look at another size; None: off
    seed_resize_from_width: int | None = None
    seed_resize_from_height: int | None = None
    batch_size: int | None = None  # None: sized to the GPU memory (4 on CPU)
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    # channels-last UNet and VAE on CUDA: off, as measured (BENCHMARKS.md, H200, SD1.5 fp16 at
    # batch 32: 4.90 images/s off, 4.41 on, and 4 GiB less memory off)
    channels_last: bool = False
    vae_slicing: bool = True
    vae_tiling: bool = False
    fuse_qkv: bool = False  # one q/k/v projection per attention (needs fuse_lora with a LoRA)
    compile: bool = False  # torch.compile the UNet and the VAE decoder (first batch compiles)
    # torch.compile's mode: reduce-overhead adds CUDA graphs, the max-autotune modes search
    # kernels for each matrix product and convolution (minutes of compiling on the first batch)
    compile_mode: CompileMode = "default"
    # inductor settings of PyTorch's diffusion-fast recipe (1x1 convolutions as matrix products,
    # coordinate-descent tuning of the generated kernels, no epilogue fusion); needs compile
    inductor_tuning: bool = False
    # threads that write a batch's PNGs while the next batch denoises; 0: write them in the loop
    write_threads: int = 2
    # decode each batch with the VAE on a thread (and CUDA stream) of its own while the next
    # batch denoises: the same images, one more batch in GPU memory while it decodes
    decode_overlap: bool = False
    # how a decoded image's values in [0, 1] become 8-bit pixels: floor (AUTOMATIC1111's: 255 x
    # cut to an integer, so its PNGs of the same latents are these bytes) or round (diffusers'
    # numpy_to_pil, fulora's until session 34: on average half a grey level brighter)
    pixel_rounding: Literal["floor", "round"] = "floor"
    color: Literal["L", "RGB"] = "L"  # ultrasound is grayscale
    contact_sheet: int = 8  # thumbnails per side of each plane's contact sheet; 0: none
    device: str = "auto"  # auto (the GPU when there is one), cpu, cuda, cuda:N
