"""AUTOMATIC1111's DPM2, DPM2 a and DPM++ 2S a: k-diffusion's two-call samplers, as schedulers.

A1111 runs them with k-diffusion (``sample_dpm_2``, ``sample_dpm_2_ancestral`` and
``sample_dpmpp_2s_ancestral``). Each step calls the model at the step's sigma, then, unless the
step ends at 0, once more at a sigma between (the geometric mean of the step's ends), and moves
on from the second estimate:

* **DPM2**: DPM-Solver-2 in k-diffusion's Euler form, to the next sigma;
* **DPM2 a**: the same to the ancestral step's lower sigma (``sigma_down``), then each image's
  step noise times ``sigma_up`` added (k-diffusion's ``get_ancestral_step`` at A1111's "Eta");
* **DPM++ 2S a**: DPM-Solver++(2S) to ``sigma_down`` in log-sigma time, then the step noise.

A1111 v1.9+ runs all three on Karras sigmas unless a schedule type is named, and DPM2 and
DPM2 a always draw one sigma more and drop the one before the last (its
``discard_next_to_last_sigma``); ``fulora.generate.samplers`` names the variants, and
:func:`fulora.generate.sigmas.a1111_sigmas` gives the sigmas.

diffusers' ``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler`` are these
samplers with other sigmas (no dropped sigma; rounded timesteps on Karras), and no diffusers
scheduler is DPM++ 2S a; these are built on diffusers' Euler for its training schedule and
interface. Samples stay in k-diffusion's (variance-exploding) space, as Euler's do; the
pipeline's loop gets one timestep per model call (the fractional timestep of the call's
sigma, as k-diffusion runs the model).

``tests/generate/test_dpm2_samplers.py`` runs each against k-diffusion's own functions.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fulora.generate.a1111_schedulers import ScheduleTypeSigmas


class _TwoCallScheduler(ScheduleTypeSigmas, EulerDiscreteScheduler):
    """A k-diffusion sampler whose step calls the model at its start and at a middle sigma.

    :attr:`sigma_schedule` must be set (``fulora.generate.samplers.make_scheduler`` does).
    Subclasses give :meth:`_target` (where the step goes, and the noise after it) and the
    two updates.
    """

    order = 2
    #: the step's noise source (``fulora.generate.noise.ImageNoise.step_noise``, called once
    #: per draw, in order); the ancestral samplers need it
    step_noise = None
    eta = 1.0
    eta_setting: str | None = None
    needs_step_noise = False

    def set_timesteps(self, num_inference_steps: int, device=None, *args, **kwargs):
        """The schedule's sigmas (``sigma_schedule``), and a timestep per model call."""
        if self.sigma_schedule is None:
            raise ValueError(f"{type(self).__name__}: set sigma_schedule before set_timesteps")
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)

    def _take_sigmas(self, sigmas: torch.Tensor, device) -> None:
        """Each step's calls: at its sigma, and at the middle sigma unless it ends at 0."""
        self.sigmas, calls, self._steps = sigmas, [], []
        for i in range(len(sigmas) - 1):
            sigma, target, noise_scale = sigmas[i], *self._target(sigmas[i], sigmas[i + 1])
            middle = None if target == 0 else self._middle(sigma, target)
            self._steps.append((sigma, target, middle, noise_scale, sigmas[i + 1]))
            calls += [sigma] if middle is None else [sigma, middle]
        self._call_sigmas = torch.stack(calls)
        self.timesteps = self._model_times(self._call_sigmas, device)
        self.num_inference_steps = len(sigmas) - 1
        self._call, self._step, self._draws, self._start = 0, 0, 0, None

    def _target(self, sigma: torch.Tensor, sigma_next: torch.Tensor):
        """Where the step goes, and the sigma of the noise added after it (None: none)."""
        return sigma_next, None

    def _middle(self, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The second call's sigma: the step's geometric mean, as k-diffusion computes it."""
        return sigma.log().lerp(target.log(), 0.5).exp()

    @property
    def init_noise_sigma(self) -> float:
        """k-diffusion's start: the noise times the first sigma."""
        return float(self.sigmas[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The sample as the model takes it at this call's sigma: over sqrt(sigma^2 + 1)."""
        sigma = self._call_sigmas[self._call].to(sample.device)
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **unused):
        """One model call's part of a step: to the middle sigma, or to the step's end."""
        if self._call >= len(self._call_sigmas):
            raise ValueError(f"{type(self).__name__}: call set_timesteps before each run's steps")
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        sigma = self._call_sigmas[self._call].to(x.device)
        denoised = self._denoised(model_output.to(x.dtype), sigma, x)
        start, target, middle, noise_scale, sigma_next = self._steps[self._step]
        self._call += 1
        if middle is not None and self._start is None:  # the first of the step's two calls
            self._start = (x, denoised)
            moved = self._to_middle(x, denoised, start, middle, target)
            return _output(moved.to(sample.dtype), return_dict)
        if middle is None:  # a step to 0: Euler's
            moved = x + (x - denoised) / sigma * (target.to(x.device) - sigma)
        else:
            first, self._start = self._start, None
            moved = self._from_middle(first[0], x, denoised, start, middle, target)
        moved = self._add_noise(moved, noise_scale, sigma_next)
        self._step += 1
        return _output(moved.to(sample.dtype), return_dict)

    def _denoised(self, model_output, sigma, sample: torch.Tensor) -> torch.Tensor:
        """The model's clean estimate (k-diffusion's denoiser on an eps or v prediction)."""
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        raise ValueError(f"{type(self).__name__}: prediction_type {self.config.prediction_type}")

    def _to_middle(self, x, denoised, sigma, middle, target) -> torch.Tensor:
        """DPM-Solver-2's first half: Euler to the middle sigma."""
        return x + (x - denoised) / sigma.to(x.device) * (middle - sigma).to(x.device)

    def _from_middle(self, x, x_middle, denoised_middle, sigma, middle, target) -> torch.Tensor:
        """DPM-Solver-2's step: from the start along the middle's derivative, to the target."""
        d_middle = (x_middle - denoised_middle) / middle.to(x.device)
        return x + d_middle * (target - sigma).to(x.device)

    def _add_noise(self, x: torch.Tensor, noise_scale, sigma_next) -> torch.Tensor:
        """The step's noise (the ancestral samplers'), one draw of each image's source."""
        if noise_scale is None:
            return x
        if self.step_noise is None:
            raise ValueError(f"{type(self).__name__}: its step noise needs step_noise")
        noise = self.step_noise(self._draws).to(x.device, x.dtype)
        self._draws += 1
        return x + noise * noise_scale.to(x.device)


def _output(moved: torch.Tensor, return_dict: bool) -> SchedulerOutput | tuple[torch.Tensor]:
    return SchedulerOutput(prev_sample=moved) if return_dict else (moved,)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float):
    """k-diffusion's ``get_ancestral_step`` on tensors: the sigma to step down to, the noise's."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_up = torch.minimum(sigma_next, up)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


class A1111DPM2Scheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpm_2`` (A1111's DPM2; its churn at A1111's default, none)."""


class A1111DPM2AncestralScheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpm_2_ancestral`` (A1111's DPM2 a) at :attr:`eta`.

    The noise is drawn after a step that ends above 0 (k-diffusion's DPM-Solver-2 branch);
    a step whose ``sigma_down`` is 0 (to the last sigma, or at a large eta) draws none.
    """

    eta_setting = "eta_ancestral"
    needs_step_noise = True

    def _target(self, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        return sigma_down, None if sigma_down == 0 else sigma_up


class A1111DPMPP2SAncestralScheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpmpp_2s_ancestral`` (A1111's DPM++ 2S a) at :attr:`eta`.

    DPM-Solver++(2S) in log-sigma time ``t = -log sigma``, to ``sigma_down``; the noise is
    drawn after every step that ends above sigma 0, whether or not ``sigma_down`` is 0.
    """

    eta_setting = "eta_ancestral"
    needs_step_noise = True

    def _target(self, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        return sigma_down, sigma_up if sigma_next > 0 else None

    def _middle(self, sigma, target):
        """``sigma_fn(t + h / 2)`` with ``t = -log sigma``, ``h = -log target - t``."""
        t, t_next = sigma.log().neg(), target.log().neg()
        return (t + 0.5 * (t_next - t)).neg().exp()

    def _to_middle(self, x, denoised, sigma, middle, target) -> torch.Tensor:
        """To the middle on the data prediction: ``sigma_fn(s) / sigma_fn(t) x - expm1(-h / 2)``."""
        t, t_next = sigma.log().neg(), target.log().neg()
        ratio = (middle / t.neg().exp()).to(x.device)
        return ratio * x - (-(t_next - t) * 0.5).expm1().to(x.device) * denoised

    def _from_middle(self, x, x_middle, denoised_middle, sigma, middle, target) -> torch.Tensor:
        """The whole step on the middle's estimate: ``sigma_fn(t_next) / sigma_fn(t) x - ...``."""
        t, t_next = sigma.log().neg(), target.log().neg()
        ratio = (t_next.neg().exp() / t.neg().exp()).to(x.device)
        return ratio * x - (t - t_next).expm1().to(x.device) * denoised_middle
