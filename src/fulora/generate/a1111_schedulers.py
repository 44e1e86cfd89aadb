"""AUTOMATIC1111's samplers where no diffusers configuration gives them, as diffusers schedulers.

**DPM++ 2M (Karras)**, k-diffusion's ``sample_dpmpp_2m`` in A1111: diffusers'
``DPMSolverMultistepScheduler`` takes the same steps with two differences, each measured
against k-diffusion on ``tests/test_parity.py``'s analytic model (30 steps, relative L2):

* it starts from the noise as it is, where k-diffusion starts from the noise times sigma_max,
  which in diffusers' (variance-preserving) space is the noise times sqrt(1 - alpha_bar) at the
  top timestep, 0.9977 of it on SD1.5's schedule (alone: 2.0e-3 of the result);
* it runs the model at timesteps rounded to integers, where k-diffusion runs it at the exact
  (fractional) timestep of each sigma (with the start scaled, rounding alone: 5.9e-5).
  "DPM++ 2M", without Karras, also spaces the steps otherwise: k-diffusion's ``get_sigmas``
  takes ``steps`` timesteps from the top to 0, log-interpolating sigma.

**DDIM and PLMS**: since v1.6 A1111 runs them itself (``modules/sd_samplers_timesteps.py`` and
``sd_samplers_timesteps_impl.py``), on timesteps that no diffusers scheduler configuration gives:

* the grid ``T = clip(range(0, N, N // steps) + 1, 0, N - 1)`` (N training timesteps), whose
  top point is evaluated first and whose bottom point, timestep 1, never is: the model runs at
  ``T[-1], ..., T[1]``, each step moving to the next point down, the last to ``T[0] = 1``. So
  20 steps evaluate the model 19 times (50 does 49), 30 steps 30 times (``range`` holds 31
  points), and 27 steps start at 999, where ``+ 1`` is clipped;
* the sample ends at timestep 1's noise level; it is decoded as it is.

diffusers' DDIM and PNDM step by ``N // steps`` from their own grid (``leading``: 958 down to 1
for 30 steps, then to timestep 0). The update is the same: the model's noise estimate moves the
sample from one timestep's noise level to the next (deterministic DDIM, A1111's default eta 0);
PLMS combines the last estimates (Adams-Bashforth up to fourth order) after a first step that
averages two evaluations.

**UniPC** (:class:`A1111UniPCScheduler`) is diffusers' UniPC steps at A1111's times: its
vendored ``uni_pc.py`` solves on a continuous time with fractional model timesteps, and since
v1.6 takes as many steps as its DDIM grid has points (31 for 30).

**Euler a** is diffusers' ``EulerAncestralDiscreteScheduler``, whose steps are k-diffusion's
``sample_euler_ancestral`` (eta 1), with one addition: each step's noise can come from a
function instead of diffusers' generators (:attr:`A1111EulerAncestralScheduler.step_noise`), so
that A1111's "NV" source, which is not a torch generator, gives it.

**Schedule types** (A1111 v1.9+): each k-diffusion sampler here (Euler, Euler a, Heun, LMS,
DPM++ 2M) can step through the sigmas of one of A1111's schedule types
(:mod:`fulora.generate.sigmas`) instead of its own: set :attr:`ScheduleTypeSigmas.sigma_schedule`
(:func:`fulora.generate.samplers.make_scheduler` does). The model then runs at each sigma's
fractional timestep, as k-diffusion runs it.

``tests/test_parity.py`` runs each against A1111's own code (k-diffusion for DPM++ 2M, Euler a
and the schedule types); ``tests/generate/test_unipc.py`` UniPC.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fulora.generate.samplers import a1111_grid_points
from fulora.generate.sigmas import DiscreteSigmas, a1111_alpha_bars, a1111_sigmas

# Adams-Bashforth weights of the newest estimate and the earlier ones (newest first), by the
# number of earlier estimates: PLMS's second to fourth order.
_ADAMS_BASHFORTH = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12)}
_ADAMS_BASHFORTH[3] = (55 / 24, -59 / 24, 37 / 24, -9 / 24)


def a1111_timesteps(steps: int, train_timesteps: int = 1000) -> np.ndarray:
    """AUTOMATIC1111's grid for DDIM and PLMS at ``steps`` (ascending; ``T[0]`` is not evaluated).

    Raises:
        ValueError: For steps that leave no step to take (under 2) or no grid (over N).
    """
    if not 2 <= steps <= train_timesteps:
        raise ValueError(
            f"DDIM and PLMS take 2 to {train_timesteps} steps (AUTOMATIC1111 evaluates the model "
            f"once less than its grid's points; 1 step returns the noise), got {steps}"
        )
    grid = np.arange(0, train_timesteps, train_timesteps // steps) + 1
    return np.clip(grid, 0, train_timesteps - 1).astype(np.int64)


def a1111_img2img_grid(img2img, discard: bool, train_timesteps: int = 1000):
    """A1111's img2img pass of DDIM, PLMS or UniPC (its ``CompVisSampler.sample_img2img``).

    Args:
        img2img: The pass's steps (``fulora.generate.samplers.Img2ImgSteps``).
        discard: "Discard penultimate sigma" (a grid of a step more).
        train_timesteps: The model's.

    Returns:
        (the grid the pass steps through, ``timesteps[:t_enc]`` with ``t_enc = steps - 1``;
        the timestep its start is noised to, ``timesteps[t_enc]``, one point above the first
        it runs the model at, as in A1111).
    """
    grid = a1111_timesteps(img2img.schedule_steps + discard, train_timesteps)
    t_enc = img2img.steps - 1
    return grid[:t_enc], int(grid[t_enc])


def noised_to(bars: torch.Tensor, timestep: int, latents, noise) -> torch.Tensor:
    """A1111's img2img start for DDIM, PLMS and UniPC, in fp32 or wider.

    The latents and the noise mixed at a timestep's alpha_bar, ``x * sqrt(a) + noise *
    sqrt(1 - a)``, the roots in the table's dtype (fp16 with "Downcast alphas_cumprod").
    """
    bar = bars[timestep]
    wide = torch.promote_types(latents.dtype, torch.float32)
    keep, add = (root.to(latents.device, wide) for root in (torch.sqrt(bar), torch.sqrt(1 - bar)))
    return latents.to(wide) * keep + noise.to(latents.device, wide) * add


def alpha_bar_options(schedule) -> tuple[bool, bool]:
    """A ``SigmaSchedule``'s (downcast, zero terminal SNR); both off without a schedule."""
    return (schedule.downcast, schedule.zero_terminal_snr) if schedule else (False, False)


def discards_penultimate(schedule) -> bool:
    """A ``SigmaSchedule``'s "Discard penultimate sigma"; off without a schedule.

    DDIM, PLMS and UniPC take it as a grid of a step more.
    """
    return bool(schedule and schedule.discard_penultimate)


def alpha_bar_table(scheduler) -> torch.Tensor:
    """The model's alpha_bar as A1111's timestep samplers take it (its options applied)."""
    return a1111_alpha_bars(scheduler.alphas_cumprod, *alpha_bar_options(scheduler.sigma_schedule))


def _output(moved: torch.Tensor, return_dict: bool) -> SchedulerOutput | tuple[torch.Tensor]:
    """A step's result as diffusers' schedulers return it."""
    return SchedulerOutput(prev_sample=moved) if return_dict else (moved,)


class ScheduleTypeSigmas:
    """A k-diffusion sampler's scheduler on the sigmas of one of A1111's schedule types.

    With :attr:`sigma_schedule` None the scheduler is as it is. Set, ``set_timesteps`` sets the
    scheduler's state as it would, then replaces its sigmas with the schedule's and its
    timesteps with theirs (k-diffusion's fractional timestep of each sigma).
    """

    #: the type and A1111's options (``fulora.generate.samplers.SigmaSchedule``); None: own
    sigma_schedule = None
    #: an img2img pass, A1111's hires fix (``fulora.generate.samplers.Img2ImgSteps``; needs
    #: :attr:`sigma_schedule`): the tail of the schedule's sigmas, from the sample that
    #: :meth:`img2img_start` makes; None: the whole schedule, from the noise
    img2img = None

    @property
    def init_noise_sigma(self) -> float:
        """The noise's scale at the start; sqrt(1 + sigma_0^2) with A1111's SGM multiplier.

        1 for an img2img pass, whose start (:meth:`img2img_start`) is the pipeline's latents.
        """
        if self.img2img is not None:
            return 1.0
        return self._noise_scale()

    @init_noise_sigma.setter
    def init_noise_sigma(self, value: float) -> None:
        self.__dict__["_init_noise_sigma"] = value

    def _noise_scale(self) -> float:
        """The start's scale from the noise (not an img2img pass)."""
        if "_init_noise_sigma" in self.__dict__:  # a scheduler that sets its own (DPM-Solver)
            return self.__dict__["_init_noise_sigma"]
        start = self.sgm_start()
        return start if start is not None else super().init_noise_sigma

    def sgm_start(self) -> float | None:
        """A1111's "SGM noise multiplier" start, sqrt(1 + sigma_0^2) in float32; None: off."""
        schedule = self.sigma_schedule
        if schedule is None or not schedule.sgm_noise_multiplier:
            return None
        return float(torch.sqrt(1.0 + self.sigmas[0] ** 2.0))

    def set_timesteps(self, num_inference_steps: int, device=None, *args, **kwargs):
        """The scheduler's own state, then the schedule type's sigmas (when one is set).

        For an img2img pass (:attr:`img2img`), the sigmas of its whole schedule from the one it
        starts at, as A1111's ``sample_img2img`` takes them.
        """
        img2img = self.img2img
        other = img2img is not None and img2img.steps != num_inference_steps
        if img2img is not None and (self.sigma_schedule is None or other):
            raise ValueError(
                f"{type(self).__name__}: an img2img pass of {img2img.steps} steps needs "
                f"sigma_schedule and set_timesteps({img2img.steps}), got {num_inference_steps}"
            )
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)
        if self.sigma_schedule is None:
            return
        steps = img2img.schedule_steps if img2img is not None else num_inference_steps
        sigmas = a1111_sigmas(self.sigma_schedule, steps, self.alphas_cumprod)
        self.schedule_sigmas = sigmas  # all of them: the SDE samplers' noise spans them
        self._take_sigmas(sigmas[img2img.skipped :] if img2img is not None else sigmas, device)

    def img2img_start(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """An img2img pass's first sample: the latents plus the noise times its first sigma.

        A1111's ``xi = x + noise * sigma_sched[0]``, in fp32 or wider; call after
        ``set_timesteps``.
        """
        wide = torch.promote_types(latents.dtype, torch.float32)
        top = self.sigmas[0].to(latents.device, wide)
        return latents.to(wide) + noise.to(latents.device, wide) * top

    def _model_times(self, sigmas: torch.Tensor, device) -> torch.Tensor:
        """The fractional timestep the model runs at for each sigma (k-diffusion's)."""
        return self.sigma_table().sigma_to_t(sigmas).to(device)

    def sigma_table(self) -> DiscreteSigmas:
        """The model's sigmas as the sampler maps them (fp16 with A1111's downcast)."""
        return DiscreteSigmas(self.alphas_cumprod, *alpha_bar_options(self.sigma_schedule))

    def _take_sigmas(self, sigmas: torch.Tensor, device) -> None:
        """One model call per sigma but the last (Euler, Euler a, LMS): each step to the next."""
        self.sigmas = sigmas
        self.timesteps = self._model_times(sigmas[:-1], device)
        self.num_inference_steps = len(self.timesteps)  # A1111's "DDIM" type may take more


class A1111EulerScheduler(ScheduleTypeSigmas, EulerDiscreteScheduler):
    """diffusers' Euler (k-diffusion's ``sample_euler``), on a schedule type's sigmas."""


class A1111LMSScheduler(ScheduleTypeSigmas, LMSDiscreteScheduler):
    """diffusers' LMS (k-diffusion's ``sample_lms``), on a schedule type's sigmas."""


class A1111HeunScheduler(ScheduleTypeSigmas, HeunDiscreteScheduler):
    """diffusers' Heun (k-diffusion's ``sample_heun``), on a schedule type's sigmas."""

    def _take_sigmas(self, sigmas: torch.Tensor, device) -> None:
        """Two model calls per step, as diffusers lays them out.

        As k-diffusion's Heun: one call for a step to sigma 0 (an Euler step), but two for a
        step that ends above it (A1111's "KL Optimal" ends at the smallest sigma).
        """
        ends_above_0 = sigmas[-1].item() > 0
        times = self._model_times(sigmas if ends_above_0 else sigmas[:-1], device)
        first, inner, last = sigmas[:1], sigmas[1:-1], sigmas[-1:]
        repeated = [first, inner.repeat_interleave(2)]
        if ends_above_0:  # the last step's two calls: at its start, then at its end
            self.sigmas = torch.cat([*repeated, last, last])
            self.timesteps = torch.cat([times[:1], times[1:-1].repeat_interleave(2), times[-1:]])
        else:
            self.sigmas = torch.cat([*repeated, last])
            self.timesteps = torch.cat([times[:1], times[1:].repeat_interleave(2)])
        self.num_inference_steps = len(sigmas) - 1


class A1111DPMSolverMultistepScheduler(ScheduleTypeSigmas, DPMSolverMultistepScheduler):
    """k-diffusion's DPM++ 2M as A1111 runs it: its start, its sigmas, fractional timesteps."""

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The solver's state as diffusers sets it; k-diffusion's sigmas, start and timesteps."""
        super().set_timesteps(num_inference_steps, device)  # a schedule type's sigmas, if set
        if self.sigma_schedule is not None:
            return
        log_sigmas = np.log(((1 - self.alphas_cumprod) / self.alphas_cumprod).numpy() ** 0.5)
        if self.config.use_karras_sigmas:
            sigmas = self.sigmas[:-1].numpy()
        else:  # k-diffusion's get_sigmas: evenly spaced timesteps, sigma interpolated in log
            spaced = np.linspace(len(log_sigmas) - 1, 0, num_inference_steps)
            sigmas = np.exp(np.interp(spaced, np.arange(len(log_sigmas)), log_sigmas))
            self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        times = [float(self._sigma_to_t(sigma, log_sigmas)) for sigma in sigmas]
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        # k-diffusion's first sample is the noise times sigma_max (variance-exploding); here,
        # variance-preserving, that is the noise times sqrt(1 - alpha_bar) at the top timestep.
        # The pipeline scales its starting latents by this after set_timesteps.
        self.init_noise_sigma = float(1 - self.alphas_cumprod[-1]) ** 0.5

    def img2img_start(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """k-diffusion's img2img start, variance-preserving: over sqrt(sigma_0^2 + 1)."""
        top = float(self.sigmas[0])
        return super().img2img_start(latents, noise) / (top**2 + 1) ** 0.5

    def _take_sigmas(self, sigmas: torch.Tensor, device) -> None:
        """The type's sigmas and timesteps, and k-diffusion's start from its first sigma."""
        super()._take_sigmas(sigmas, device)
        top = float(sigmas[0])  # the noise times sigmas[0], variance-exploding, here scaled
        self.init_noise_sigma = (self.sgm_start() or top) / (top**2 + 1) ** 0.5
        # k-diffusion's DPM++ 2M takes its second-order step to any sigma but 0; diffusers' takes
        # a first-order last step unless told otherwise ("KL Optimal" ends above 0)
        if sigmas[-1].item() > 0:
            self.register_to_config(lower_order_final=False, final_sigmas_type="sigma_min")

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        """The solver's step; a last step that ends above sigma 0 returns k-diffusion's sample.

        diffusers' samples are variance-preserving, x / sqrt(sigma^2 + 1) of k-diffusion's,
        which A1111 decodes as it ends: the same at sigma 0, and 4e-4 apart at "KL Optimal"'s
        last sigma, unless scaled back.
        """
        out = super().step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        last = self.sigmas[-1].item()
        if self.sigma_schedule is not None and last > 0 and self.step_index == len(self.timesteps):
            out.prev_sample = out.prev_sample * (last**2 + 1) ** 0.5
        return out if return_dict else (out.prev_sample,)


class A1111DDIMScheduler(DDIMScheduler):
    """AUTOMATIC1111's DDIM: one model evaluation per step of its grid, top down.

    At A1111's default eta 0 it is deterministic. At another :attr:`eta` (A1111's "Eta DDIM")
    each step adds noise of ``eta`` times DDIM's sigma, taken from :attr:`step_noise`, as
    A1111's ``ddim`` takes it from each image's generator at every step.
    """

    #: step index -> the batch's noise for that step (needed at an eta above 0)
    step_noise = None
    eta = 0.0
    eta_setting: str | None = "eta_ddim"  # the generate setting that gives eta
    #: A1111's alpha_bar options (``SigmaSchedule.downcast``, ``zero_terminal_snr``) and its
    #: "Discard penultimate sigma" (a grid of a step more); None: off
    sigma_schedule = None
    #: an img2img pass, A1111's hires fix (``fulora.generate.samplers.Img2ImgSteps``): the
    #: lower points of a longer grid (:func:`a1111_img2img_grid`), from :meth:`img2img_start`
    img2img = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The timesteps the model runs at (the pipeline's loop), and each step's target.

        With A1111's "Discard penultimate sigma" its grid is that of a step more; an img2img
        pass takes the lower points of the grid of its whole schedule.
        """
        discard = discards_penultimate(self.sigma_schedule)
        total = self.config.num_train_timesteps
        if self.img2img is not None:
            grid, self._noised_to = a1111_img2img_grid(self.img2img, discard, total)
        else:
            grid = a1111_timesteps(num_inference_steps + discard, total)
        self._bars = alpha_bar_table(self)
        self.num_inference_steps = num_inference_steps
        # (from, to) per step, top down; a list, since a clipped grid repeats a timestep
        self._moves = list(zip(grid[:0:-1].tolist(), grid[-2::-1].tolist(), strict=True))
        self._taken = 0
        self.timesteps = torch.tensor(self._evaluated(grid), device=device)

    def _evaluated(self, grid: np.ndarray) -> list[int]:
        return grid[:0:-1].tolist()

    def img2img_start(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """An img2img pass's first sample (:func:`noised_to`); call after ``set_timesteps``."""
        return noised_to(self._bars, self._noised_to, latents, noise)

    def _epsilon(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The noise estimate; a v-prediction converted as A1111's CompVisTimestepsVDenoiser."""
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            a_t = float(self._bars[t])
            return math.sqrt(a_t) * model_output + math.sqrt(1 - a_t) * sample
        raise ValueError(f"{type(self).__name__}: prediction_type {self.config.prediction_type}")

    def _move(self, sample: torch.Tensor, eps: torch.Tensor, t: int, to: int) -> torch.Tensor:
        """The sample at timestep ``t`` moved to ``to`` along ``eps``: its x0 estimate renoised."""
        a_t, a_to = float(self._bars[t]), float(self._bars[to])
        pred_x0 = (sample - self._root_of_one_minus(t) * eps) / math.sqrt(a_t)
        return math.sqrt(a_to) * pred_x0 + math.sqrt(1 - a_to) * eps

    def _root_of_one_minus(self, t: int) -> float:
        """sqrt(1 - alpha_bar) at ``t``; in fp16 from a downcast table, as A1111's ddim takes it."""
        if self._bars.dtype == torch.float16:
            return float(torch.sqrt(1 - self._bars[t]))
        return math.sqrt(1 - float(self._bars[t]))

    def _move_with_noise(self, sample, eps, t: int, to: int, noise: torch.Tensor):
        """DDIM's step at eta (A1111's ``ddim``): part of the direction replaced by noise."""
        a_t, a_to = float(self._bars[t]), float(self._bars[to])
        ratio = (1 - a_to) / (1 - a_t)
        if self._bars.dtype == torch.float16:  # A1111's numpy / fp16 tensor: torch multiplies
            ratio = (1 - a_to) * float(torch.reciprocal(1 - self._bars[t]))  # by an fp16 inverse
        sigma = self.eta * math.sqrt(ratio * (1 - a_t / a_to))
        pred_x0 = (sample - self._root_of_one_minus(t) * eps) / math.sqrt(a_t)
        direction = math.sqrt(1 - a_to - sigma**2) * eps
        return math.sqrt(a_to) * pred_x0 + direction + sigma * noise.to(sample.device)

    def _next_move(self) -> tuple[int, int]:
        if self.num_inference_steps is None or self._taken >= len(self._moves):
            raise ValueError(f"{type(self).__name__}: call set_timesteps before each run's steps")
        self._taken += 1
        return self._moves[self._taken - 1]

    def step(self, model_output, timestep, sample, return_dict: bool = True, **unused):
        """One step down the grid. ``timestep`` is the one the model ran at (as in the loop)."""
        t, to = self._next_move()
        eps = self._epsilon(model_output, t, sample)
        if not self.eta:
            return _output(self._move(sample, eps, t, to), return_dict)
        if self.step_noise is None:
            raise ValueError(f"{type(self).__name__}: eta {self.eta} needs step_noise")
        noise = self.step_noise(self._taken - 1)
        return _output(self._move_with_noise(sample, eps, t, to, noise), return_dict)


class A1111PLMSScheduler(A1111DDIMScheduler):
    """AUTOMATIC1111's PLMS.

    Its first step averages the estimates at both ends of the step (two evaluations); later
    steps combine the newest estimate with up to three earlier ones.
    """

    eta_setting = None  # deterministic: A1111's PLMS takes no eta

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """As DDIM's, with the first step's second evaluation (at its end) in the loop."""
        super().set_timesteps(num_inference_steps, device)
        self._earlier: list[torch.Tensor] = []  # the estimates of the last steps, oldest first
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None  # its start and estimate

    def _evaluated(self, grid: np.ndarray) -> list[int]:
        top_down = grid[:0:-1].tolist()
        return top_down[:1] + [int(grid[-2])] + top_down[1:]

    def step(self, model_output, timestep, sample, return_dict: bool = True, **unused):
        """One evaluation's step (the first step takes two)."""
        if self._first is not None:  # the estimate at the first step's end: step again, averaged
            start, first_eps = self._first
            self._first = None
            t, to = self._moves[0]
            averaged = (first_eps + self._epsilon(model_output, to, sample)) / 2
            moved = self._move(start, averaged, t, to)
            return _output(moved, return_dict)
        t, to = self._next_move()
        eps = self._epsilon(model_output, t, sample)
        if not self._earlier:
            self._first = (sample, eps)
            combined = eps  # a provisional end, where the model runs next
        else:
            weights = _ADAMS_BASHFORTH[len(self._earlier)]
            combined = sum(w * e for w, e in zip(weights, [eps, *self._earlier[::-1]], strict=True))
        self._earlier = [*self._earlier, eps][-3:]
        moved = self._move(sample, combined, t, to)
        return _output(moved, return_dict)


class A1111UniPCScheduler(UniPCMultistepScheduler):
    """AUTOMATIC1111's UniPC (its vendored ``uni_pc.py``): diffusers' UniPC steps at A1111's times.

    A1111 solves on a continuous time t in [1/N, 1] (N training timesteps): log alpha_bar / 2
    interpolated linearly in t between the training timesteps (at t = (i + 1) / N), the times
    spaced by its "UniPC skip type" (:attr:`skip_type`: evenly in t, in sqrt(t), or in
    log-SNR), the model run at the fractional timestep (t - 1/N) N (999, 966.77, ... for 31
    steps), the last step ending at timestep 0's noise level. diffusers' UniPC takes the same
    B(h) predictor-corrector steps (its "UniPC variant" bh1 or bh2, order, lower order final)
    on rounded timesteps and its own sigmas: this gives it A1111's, and A1111's third variant,
    vary_coeff (:meth:`_vary_coeff_update`; A1111's own fails on it for a batch of more than
    one image, whose log-SNR ratios it turns into one tensor).

    Since v1.6 A1111 runs UniPC for as many steps as its DDIM grid has points
    (``len(range(0, N, N // steps))``: 31 for 30 steps, 28 for 27; one more step with
    "Discard penultimate sigma"); before it, for ``steps`` (:attr:`legacy_steps`).
    """

    skip_type = "time_uniform"  # A1111's uni_pc_skip_type: time_uniform, time_quadratic, logSNR
    legacy_steps = False  # A1111 before v1.6: ``steps`` UniPC steps
    #: an img2img pass, A1111's hires fix (``fulora.generate.samplers.Img2ImgSteps``): as many
    #: steps as the lower points of a longer DDIM grid (:func:`a1111_img2img_grid`), from the
    #: time just above the highest, from :meth:`img2img_start`
    img2img = None
    vary_coeff = False  # A1111's "UniPC variant" vary_coeff (:meth:`_vary_coeff_update`)
    #: A1111's "Discard penultimate sigma" (a grid of steps + 1) and alpha_bar options
    #: (``SigmaSchedule``: downcast, zero terminal SNR); None: off
    sigma_schedule = None

    def unipc_steps(self, steps: int) -> int:
        """The UniPC steps A1111 takes for ``steps`` (its sampler's ``len(timesteps)``)."""
        if self.legacy_steps:
            return steps
        steps += discards_penultimate(self.sigma_schedule)
        return a1111_grid_points(steps, self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The solver's state for A1111's number of steps, then A1111's times and sigmas.

        An img2img pass starts from the time of its grid's highest point plus 1/N (A1111's
        ``t_start``), where A1111 starts it, and takes a step per point.
        """
        first, total = 1.0, self.config.num_train_timesteps
        if self.img2img is not None:
            discard = discards_penultimate(self.sigma_schedule)
            grid, self._noised_to = a1111_img2img_grid(self.img2img, discard, total)
            steps = len(grid)
            first = float(torch.tensor(grid[-1]) / total + 1 / total)  # A1111's float32
        else:
            steps = self.unipc_steps(num_inference_steps)
        super().set_timesteps(steps, device)
        times = self.continuous_times(steps, first)
        log_alpha = self._log_alpha(times)
        sigma = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
        self.sigmas = sigma / torch.exp(log_alpha)  # diffusers' sigma: sigma_t / alpha_t
        self.timesteps = ((times[:-1] - 1.0 / total) * total).to(device)

    def continuous_times(self, steps: int, first: float = 1.0) -> torch.Tensor:
        """A1111's times from t = ``first`` to 1/N (float32), spaced as :attr:`skip_type` says."""
        last = 1.0 / self.config.num_train_timesteps
        if self.skip_type == "time_uniform":
            return torch.linspace(first, last, steps + 1)
        if self.skip_type == "time_quadratic":
            return torch.linspace(first**0.5, last**0.5, steps + 1).pow(2)
        if self.skip_type == "logSNR":
            ends = [self._half_log_snr(torch.tensor([t])).item() for t in (first, last)]
            return self._time_of_half_log_snr(torch.linspace(*ends, steps + 1))
        raise ValueError(f"{type(self).__name__}: skip_type {self.skip_type!r}")

    def img2img_start(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """An img2img pass's first sample (:func:`noised_to`); call after ``set_timesteps``."""
        return noised_to(alpha_bar_table(self), self._noised_to, latents, noise)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training timesteps' times (i + 1) / N and their log alpha, as A1111's.

        With A1111's downcast its v1.6+ sampler takes the log of the fp16 alpha_bar in fp16;
        its sampler before v1.6 took a float32 copy of it first.
        """
        total = self.config.num_train_timesteps
        times = torch.linspace(0.0, 1.0, total + 1)[1:]
        bars = alpha_bar_table(self)
        return times, 0.5 * torch.log(bars.float() if self.legacy_steps else bars)

    def _log_alpha(self, times: torch.Tensor) -> torch.Tensor:
        return _piecewise_linear(times, *self._grid())

    def _half_log_snr(self, times: torch.Tensor) -> torch.Tensor:
        log_alpha = self._log_alpha(times)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def _time_of_half_log_snr(self, half_log_snr: torch.Tensor) -> torch.Tensor:
        """The inverse: log alpha from the half log-SNR, then t interpolated from the grid."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros(1), -2.0 * half_log_snr)
        times, log_alphas = self._grid()
        return _piecewise_linear(log_alpha, log_alphas.flip(0), times.flip(0))

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        """The B(h) predictor (diffusers'), or with ``vary_coeff`` A1111's vary_coeff one."""
        if not self.vary_coeff:
            return super().multistep_uni_p_bh_update(
                model_output, *args, sample=sample, order=order, **kwargs
            )
        return self._vary_coeff_update(sample, None, self.step_index, order)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        """The B(h) corrector (diffusers'), or with ``vary_coeff`` A1111's vary_coeff one."""
        if not self.vary_coeff:
            return super().multistep_uni_c_bh_update(
                this_model_output,
                *args,
                last_sample=last_sample,
                this_sample=this_sample,
                order=order,
                **kwargs,
            )
        return self._vary_coeff_update(last_sample, this_model_output, self.step_index - 1, order)

    def _vary_coeff_update(self, x, model_t, start: int, order: int) -> torch.Tensor:
        """UniPC's varying-coefficient step (A1111's ``multistep_uni_pc_vary_update``, x0 form).

        From sigma index ``start`` to the next, on the last ``order`` estimates: the predictor,
        or with the model's estimate at the end (``model_t``) the corrector. Its coefficients
        come from the inverse of the matrix of each earlier estimate's log-SNR ratio r_k raised
        to the powers 0, 1, ... over their factorials.
        """
        device = x.device

        def half_log_snr(index: int) -> torch.Tensor:
            alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index].to(device))
            return torch.log(alpha) - torch.log(sigma)

        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[start + 1].to(device))
        sigma_s0 = self._sigma_to_alpha_sigma_t(self.sigmas[start].to(device))[1]
        h = half_log_snr(start + 1) - half_log_snr(start)
        m0 = self.model_outputs[-1]
        ratios = [(half_log_snr(start - i) - half_log_snr(start)) / h for i in range(1, order)]
        diffs = [(self.model_outputs[-(i + 1)] - m0) / r for i, r in enumerate(ratios, 1)]
        rks = torch.stack([*ratios, torch.ones((), device=device)])
        columns, column = [], torch.ones_like(rks)
        for k in range(1, len(rks) + 1):
            columns.append(column)
            column = column * rks / (k + 1)
        matrix = torch.stack(columns, dim=1)
        phis, phi, factorial = [], torch.expm1(-h), 1  # h phi_k(h) of -h, k = 1, 2, ...
        for k in range(1, len(rks) + 2):
            phis.append(phi)
            phi, factorial = phi / -h - 1 / factorial, factorial * (k + 1)
        x_t = sigma_t / sigma_s0 * x - alpha_t * phis[0] * m0
        inverse = torch.linalg.inv(matrix if model_t is not None else matrix[:-1, :-1])
        for k in range(len(rks) - 1):
            weights = inverse[k][:-1] if model_t is not None else inverse[k]
            residual = torch.einsum("bkc...,k->bc...", torch.stack(diffs, dim=1), weights)
            x_t = x_t - alpha_t * phis[k + 1] * residual
        if model_t is not None:  # A1111 weighs it with the last row its loop reached
            last = inverse[max(len(rks) - 2, 0)][-1]
            x_t = x_t - alpha_t * phis[len(rks)] * ((model_t - m0) * last)
        return x_t


def _piecewise_linear(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """The value at each ``x`` on the lines between the points (xp ascending; ends extended).

    A point on a knot takes the line that ends there (as A1111's ``interpolate_fn`` does
    where its sort puts ``x`` before the knot).
    """
    knots = xp.float()  # an fp16 grid's values, compared in float32 as A1111's sort does
    right = torch.searchsorted(knots, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = knots[right - 1], knots[right], yp[right - 1], yp[right]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class A1111EulerAncestralScheduler(ScheduleTypeSigmas, EulerAncestralDiscreteScheduler):
    """diffusers' Euler a, which can take each step's noise from :attr:`step_noise`.

    With ``step_noise`` None (fulora's ``rng`` cpu and gpu) it is diffusers' scheduler as it is,
    drawing the noise from the pipeline's generators. Set (``rng: nv``), step ``i``'s noise is
    ``step_noise(i)``, fp32 as A1111's, and the update is k-diffusion's ``sample_euler_ancestral``
    (the same formulas as diffusers'), which draws no noise for the last step (to sigma 0).
    """

    #: step index -> the batch's noise for that step (fp32, the latents' shape); None: diffusers'
    step_noise = None
    #: how much of each step's noise is added (A1111's "Eta", its setting eta_ancestral; 1: all,
    #: diffusers' own; another eta needs :attr:`step_noise`)
    eta = 1.0
    eta_setting = "eta_ancestral"  # the generate setting that gives eta

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        """One step, its noise from :attr:`step_noise` when set, else from ``generator``."""
        if self.step_noise is None:
            if self.eta != 1:
                raise ValueError(f"{type(self).__name__}: eta {self.eta} needs step_noise")
            return super().step(model_output, timestep, sample, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x = sample.to(torch.float32)
        denoised = clean_estimate(self, model_output, sigma, x)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_to, self.eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_to > 0:
            x = x + self.step_noise(self.step_index).to(x.device) * sigma_up
        self._step_index += 1
        moved = x.to(model_output.dtype)
        if not return_dict:
            return moved, denoised
        return EulerAncestralDiscreteSchedulerOutput(
            prev_sample=moved, pred_original_sample=denoised
        )


def clean_estimate(scheduler, model_output, sigma, sample: torch.Tensor) -> torch.Tensor:
    """The model's estimate of the clean sample at ``sigma`` (variance-exploding ``sample``).

    k-diffusion's denoiser on an eps or v prediction, the same as diffusers' Euler steps.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return sample - sigma * model_output
    if kind == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    raise ValueError(f"{type(scheduler).__name__}: prediction_type {kind}")


def _ancestral_step(sigma, sigma_to, eta: float):
    """k-diffusion's ``get_ancestral_step``: the sigma to step down to, and the noise's sigma."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up
