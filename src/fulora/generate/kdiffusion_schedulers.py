"""AUTOMATIC1111's k-diffusion samplers that no diffusers scheduler steps as A1111 does.

A1111 runs them with k-diffusion. **Two calls a step**: each step calls the model at the
step's sigma, then, unless the step ends at 0, once more at a sigma between, and moves on
from the second estimate:

* **DPM2** (``sample_dpm_2``): DPM-Solver-2 in k-diffusion's Euler form, to the next sigma;
* **DPM2 a** (``sample_dpm_2_ancestral``): the same to the ancestral step's lower sigma
  (``sigma_down``), then each image's step noise times ``sigma_up`` added (k-diffusion's
  ``get_ancestral_step`` at A1111's "Eta");
* **DPM++ 2S a** (``sample_dpmpp_2s_ancestral``): DPM-Solver++(2S) to ``sigma_down`` in
  log-sigma time, then the step noise;
* **DPM++ SDE** (``sample_dpmpp_sde``): DPM-Solver++ with an ancestral step in each half, its
  noise from a Brownian tree.

**Restart** (A1111's own ``restart_sampler``): Heun steps down, then back up and down again
with fresh noise from each image's generator (:class:`A1111RestartScheduler`).

**DPM fast** (``sample_dpm_fast``): DPM-Solver's fixed steps of order 3 (then 2, 1) over the
model's sigmas, ancestral at A1111's "Eta" (:class:`A1111DPMFastScheduler`).

**One call a step, with the last estimates**: **DPM++ 2M SDE** (``sample_dpmpp_2m_sde``, its
midpoint or, as "DPM++ 2M SDE Heun", its Heun correction) and **DPM++ 3M SDE**
(``sample_dpmpp_3m_sde``); their noise comes from a Brownian tree, their step to sigma 0 is
the last estimate itself.

**Churn** (A1111's "Sigma churn", "tmin", "tmax", "noise"; Karras et al.'s Algorithm 2): Euler
(:class:`A1111EulerChurnScheduler`), Heun (:class:`A1111HeunChurnScheduler`) and DPM2 start each
step from its sigma raised by 1 + gamma, each image's next draw added to match before the
model runs there (:meth:`KDiffusionScheduler.scale_model_input`); "Sigma noise" also scales
the ancestral, DPM fast and SDE samplers' step noise, as k-diffusion's ``s_noise``.

The SDE samplers' noise is A1111's: ``torchsde`` Brownian trees (through diffusers'
``BrownianTreeNoiseSampler``, k-diffusion's own, which A1111 builds in its
``create_noise_sampler``), one per image seeded with the image's seed, on the device of the
latents, in fp32: an image's noise does not depend on its batch, nor on the RNG setting, but a
GPU draws other numbers than the CPU, in A1111 too.

A1111 v1.9+ runs them on Karras or exponential sigmas unless a schedule type is named;
DPM2, DPM2 a and DPM++ 3M SDE always draw one sigma more and drop the one before the last (its
``discard_next_to_last_sigma``); ``fulora.generate.samplers`` names the variants, and
:func:`fulora.generate.sigmas.a1111_sigmas` gives the sigmas.

diffusers' ``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler`` take other
sigmas (no dropped sigma; rounded timesteps on Karras), its ``DPMSolverMultistepScheduler``
(``sde-dpmsolver++``) draws its SDE noise from the generators rather than A1111's Brownian
trees, and none takes DPM++ 2S a's ancestral step; these are built on diffusers' Euler for
its training schedule and interface. Samples stay in k-diffusion's
(variance-exploding) space, as Euler's do; the pipeline's loop gets one timestep per model
call (the fractional timestep of the call's sigma, as k-diffusion runs the model).

``tests/generate/test_kdiffusion_samplers.py`` runs each against k-diffusion's own functions.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fulora.generate.a1111_schedulers import ScheduleTypeSigmas, clean_estimate
from fulora.generate.sigmas import karras_sigmas


class KDiffusionScheduler(ScheduleTypeSigmas, EulerDiscreteScheduler):
    """A k-diffusion sampler on A1111's sigmas, one timestep per model call.

    :attr:`sigma_schedule` must be set (``fulora.generate.samplers.make_scheduler`` does).
    Subclasses list the calls (:meth:`_calls`) and step.
    """

    #: the ancestral samplers' noise source (``fulora.generate.noise.ImageNoise.step_noise``,
    #: called once per draw, in order)
    step_noise = None
    #: each image's seed, which seeds its Brownian tree (the SDE samplers)
    noise_seeds: list[int] | None = None
    eta = 1.0
    eta_setting: str | None = None
    brownian = False  # draws from Brownian trees (needs ``noise_seeds``)
    #: A1111's "Sigma churn", "tmin", "tmax" and "noise" (k-diffusion's ``s_churn``, ``s_tmin``,
    #: ``s_tmax``, ``s_noise``; ``make_scheduler`` sets them): the churn of Euler, Heun and DPM2
    #: (:attr:`churns`); ``s_noise`` also scales the ancestral and SDE samplers' step noise
    s_churn, s_tmin, s_tmax, s_noise = 0.0, 0.0, float("inf"), 1.0
    churns = False  # takes A1111's churn: each step starts from its sigma raised, noise added
    draws_noise = False  # draws each image's generator whatever the churn

    @property
    def needs_step_noise(self) -> bool:
        """Whether it draws each image's generator (and so needs :attr:`step_noise`)."""
        return self.draws_noise or (self.churns and self.s_churn > 0)

    def set_timesteps(self, num_inference_steps: int, device=None, *args, **kwargs):
        """The schedule's sigmas (``sigma_schedule``), and a timestep per model call."""
        if self.sigma_schedule is None:
            raise ValueError(f"{type(self).__name__}: set sigma_schedule before set_timesteps")
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)

    def _take_sigmas(self, sigmas: torch.Tensor, device) -> None:
        self.sigmas = sigmas
        self._starts = self._churned(sigmas)
        self._call_sigmas = torch.stack(self._calls(sigmas))
        self.timesteps = self._model_times(self._call_sigmas, device)
        self.num_inference_steps = len(sigmas) - 1
        self._call, self._step, self._draws, self._tree = 0, 0, 0, None
        self._added = None  # the churn's noise of the step that has begun

    def _churned(self, sigmas: torch.Tensor) -> list[torch.Tensor]:
        """Each step's start, k-diffusion's ``sigma_hat``: its sigma times 1 + gamma.

        gamma is ``min(s_churn / steps, sqrt(2) - 1)`` at the steps whose sigma lies within
        [``s_tmin``, ``s_tmax``], else 0 (no churn: each step starts at its sigma).
        """
        if not (self.churns and self.s_churn > 0):
            return list(sigmas[:-1])
        gamma = min(self.s_churn / (len(sigmas) - 1), 2**0.5 - 1)
        within = (bool(self.s_tmin <= sigma <= self.s_tmax) for sigma in sigmas[:-1])
        return [s * (gamma + 1 if w else 1.0) for s, w in zip(sigmas[:-1], within, strict=True)]

    def _calls(self, sigmas: torch.Tensor) -> list[torch.Tensor]:
        """The sigma of each model call: one a step, at its start."""
        return list(self._starts)

    def _begins_step(self) -> bool:
        """Whether the coming model call is its step's first (one call a step: each)."""
        return True

    def _noise_scale(self) -> float:
        """k-diffusion's start: the noise times the first sigma (A1111's SGM multiplier's)."""
        return self.sgm_start() or float(self.sigmas[0])

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The sample as the model takes it at this call's sigma: over sqrt(sigma^2 + 1).

        At a step's first call with churn, the step's noise is drawn and added first
        (:meth:`_churn_noise`); the pipeline's rows for each side of the guidance get the same.
        """
        sigma = self._call_sigmas[self._call].to(sample.device)
        if self.churns and self.s_churn > 0 and self._begins_step():
            self._added = self._churn_noise(sample)
            rows = len(sample) // len(self._added)
            wide = sample.to(torch.promote_types(sample.dtype, torch.float32))
            sample = (wide + self._added.repeat(rows, *[1] * (sample.dim() - 1))).to(sample.dtype)
        return sample / (sigma**2 + 1) ** 0.5

    def _churn_noise(self, sample: torch.Tensor) -> torch.Tensor:
        """The noise that raises the step's sigma to its start (k-diffusion's churn).

        As ``sample_euler``: each image's next draw times ``s_noise``, drawn at every step (also
        where gamma is 0), added times ``sqrt(sigma_hat^2 - sigma^2)`` where gamma is above 0.
        """
        wide = torch.promote_types(sample.dtype, torch.float32)
        eps = self._drawn(sample.to(wide)) * self.s_noise
        start, sigma = self._starts[self._step], self.sigmas[self._step]
        if start == sigma:
            return torch.zeros_like(eps)
        return eps * ((start**2 - sigma**2) ** 0.5).to(eps.device)

    def _estimate(self, model_output, sample):
        """(the sample in fp32 or wider, the model's clean estimate, the call's sigma)."""
        if self._call >= len(self._call_sigmas):
            raise ValueError(f"{type(self).__name__}: call set_timesteps before each run's steps")
        x = sample.to(torch.promote_types(sample.dtype, torch.float32))
        if self._added is not None:  # the step's churn, as the model saw it
            x, self._added = x + self._added.to(x.device), None
        sigma = self._call_sigmas[self._call].to(x.device)
        self._call += 1
        return x, clean_estimate(self, model_output.to(x.dtype), sigma, x), sigma

    def _drawn(self, x: torch.Tensor) -> torch.Tensor:
        """The next draw of each image's generator (the ancestral samplers' noise)."""
        if self.step_noise is None:
            raise ValueError(f"{type(self).__name__}: its step noise needs step_noise")
        noise = self.step_noise(self._draws).to(x.device, x.dtype)
        self._draws += 1
        return noise

    def _brownian(self, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        """The images' Brownian noise from ``sigma`` to ``sigma_next`` (A1111's SDE noise)."""
        if self._tree is None:
            if self.noise_seeds is None or len(self.noise_seeds) != len(x):
                raise ValueError(f"{type(self).__name__}: its noise needs each image's seed")
            span = self.schedule_sigmas  # an img2img pass's too: A1111's create_noise_sampler
            positive = span[span > 0].to(x.device)
            self._tree = BrownianTreeNoiseSampler(
                x.float(), positive.min(), positive.max(), seed=list(self.noise_seeds)
            )
        with warnings.catch_warnings():  # torchsde: its float64 span ends vs float32 sigmas
            warnings.filterwarnings("ignore", "Should have t", UserWarning)
            return self._tree(sigma.to(x.device), sigma_next.to(x.device)).to(x.dtype)


def _output(moved: torch.Tensor, return_dict: bool) -> SchedulerOutput | tuple[torch.Tensor]:
    return SchedulerOutput(prev_sample=moved) if return_dict else (moved,)


class _TwoCallScheduler(KDiffusionScheduler):
    """A sampler whose step calls the model at its start and at a middle sigma.

    Subclasses give :meth:`_target` (where the step goes, and the noise after it) and the
    two updates.
    """

    order = 2

    def _calls(self, sigmas: torch.Tensor) -> list[torch.Tensor]:
        """At each step's start, and at its middle sigma unless it ends at 0."""
        calls, self._steps, self._start = [], [], None
        for i in range(len(sigmas) - 1):
            sigma = self._starts[i]  # its sigma, raised by any churn
            target, noise_scale = self._target(sigma, sigmas[i + 1])
            middle = None if target == 0 else self._middle(sigma, target)
            self._steps.append((sigma, target, middle, noise_scale))
            calls += [sigma] if middle is None else [sigma, middle]
        return calls

    def _begins_step(self) -> bool:
        return self._start is None

    def _target(self, sigma: torch.Tensor, sigma_next: torch.Tensor):
        """Where the step goes, and the sigma of the noise added after it (None: none)."""
        return sigma_next, None

    def _middle(self, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The second call's sigma: the step's geometric mean, as k-diffusion computes it."""
        return sigma.log().lerp(target.log(), 0.5).exp()

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **unused):
        """One model call's part of a step: to the middle sigma, or to the step's end."""
        x, denoised, sigma = self._estimate(model_output, sample)
        start, target, middle, noise_scale = self._steps[self._step]
        if middle is not None and self._start is None:  # the first of the step's two calls
            self._start = (x, denoised)
            moved = self._to_middle(x, denoised, start, middle, target)
            return _output(moved.to(sample.dtype), return_dict)
        if middle is None:  # a step to 0: Euler's
            moved = x + (x - denoised) / sigma * (target.to(x.device) - sigma)
        else:
            first, self._start = self._start, None
            moved = self._from_middle(first, x, denoised, start, middle, target)
        if noise_scale is not None:  # the ancestral samplers' noise
            moved = moved + self._drawn(moved) * self.s_noise * noise_scale.to(x.device)
        self._step += 1
        return _output(moved.to(sample.dtype), return_dict)

    def _to_middle(self, x, denoised, sigma, middle, target) -> torch.Tensor:
        """DPM-Solver-2's first half: Euler to the middle sigma."""
        return x + (x - denoised) / sigma.to(x.device) * (middle - sigma).to(x.device)

    def _from_middle(self, start, x_middle, denoised_middle, sigma, middle, target):
        """DPM-Solver-2's step: from the start along the middle's derivative, to the target."""
        x = start[0]
        d_middle = (x_middle - denoised_middle) / middle.to(x.device)
        return x + d_middle * (target - sigma).to(x.device)


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float):
    """k-diffusion's ``get_ancestral_step`` on tensors: the sigma to step down to, the noise's."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_up = torch.minimum(sigma_next, up)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


class A1111DPM2Scheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpm_2`` (A1111's DPM2), with A1111's churn if set."""

    churns = True


class A1111EulerChurnScheduler(KDiffusionScheduler):
    """k-diffusion's ``sample_euler`` with A1111's churn (diffusers' Euler steps without it).

    diffusers' ``EulerDiscreteScheduler`` takes an ``s_churn`` too, but adds the noise after
    the model has run at the step's sigma; k-diffusion adds it first and runs the model at the
    raised sigma, on the noised sample.
    """

    churns = True

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **unused):
        """An Euler step from the step's start (its raised sigma) to the next sigma."""
        x, denoised, sigma = self._estimate(model_output, sample)
        sigma_next = self.sigmas[self._step + 1].to(x.device)
        moved = x + (x - denoised) / sigma * (sigma_next - sigma)
        self._step += 1
        return _output(moved.to(sample.dtype), return_dict)


class A1111HeunChurnScheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_heun`` with A1111's churn (diffusers' Heun steps without it).

    Its second call is at the step's end; a step to 0 is an Euler step (one call).
    """

    churns = True

    def _middle(self, sigma, target):
        return target

    def _from_middle(self, start, x_middle, denoised_middle, sigma, middle, target):
        """Heun's step: the mean of the derivatives at the start and the end."""
        x, denoised = start
        d, d_end = (x - denoised) / sigma.to(x.device), (x_middle - denoised_middle) / middle
        return x + (d + d_end.to(x.device)) / 2 * (target - sigma).to(x.device)


class A1111DPM2AncestralScheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpm_2_ancestral`` (A1111's DPM2 a) at :attr:`eta`.

    The noise is drawn after a step that ends above 0 (k-diffusion's DPM-Solver-2 branch);
    a step whose ``sigma_down`` is 0 (to the last sigma, or at a large eta) draws none.
    """

    eta_setting = "eta_ancestral"
    draws_noise = True

    def _target(self, sigma, sigma_next):
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        return sigma_down, None if sigma_down == 0 else sigma_up


class A1111DPMPP2SAncestralScheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpmpp_2s_ancestral`` (A1111's DPM++ 2S a) at :attr:`eta`.

    DPM-Solver++(2S) in log-sigma time ``t = -log sigma``, to ``sigma_down``; the noise is
    drawn after every step that ends above sigma 0, whether or not ``sigma_down`` is 0.
    """

    eta_setting = "eta_ancestral"
    draws_noise = True

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

    def _from_middle(self, start, x_middle, denoised_middle, sigma, middle, target):
        """The whole step on the middle's estimate: ``sigma_fn(t_next) / sigma_fn(t) x - ...``."""
        x = start[0]
        t, t_next = sigma.log().neg(), target.log().neg()
        ratio = (t_next.neg().exp() / t.neg().exp()).to(x.device)
        return ratio * x - (t - t_next).expm1().to(x.device) * denoised_middle


class A1111DPMPPSDEScheduler(_TwoCallScheduler):
    """k-diffusion's ``sample_dpmpp_sde`` (A1111's DPM++ SDE) at :attr:`eta`, ``r`` = 1/2.

    Each half is an ancestral DPM-Solver++ step in log-sigma time with Brownian noise: to the
    middle sigma ``sigma_fn(t + h / 2)`` from the start's estimate, then over the whole step
    from the middle's (k-diffusion's ``(1 - fac) denoised + fac denoised_2``, ``fac`` = 1).
    """

    eta_setting = "eta_ancestral"
    brownian = True

    def _middle(self, sigma, target):
        t, t_next = sigma.log().neg(), target.log().neg()
        return (t + (t_next - t) * 0.5).neg().exp()

    def _to_middle(self, x, denoised, sigma, middle, target) -> torch.Tensor:
        t = sigma.log().neg()
        down, up = ancestral_step(t.neg().exp(), middle, self.eta)
        s_ = down.log().neg()
        moved = (s_.neg().exp() / t.neg().exp()).to(x.device) * x
        moved = moved - (t - s_).expm1().to(x.device) * denoised
        return moved + self._brownian(x, t.neg().exp(), middle) * self.s_noise * up.to(x.device)

    def _from_middle(self, start, x_middle, denoised_middle, sigma, middle, target):
        x, denoised = start
        t, t_next = sigma.log().neg(), target.log().neg()
        down, up = ancestral_step(t.neg().exp(), t_next.neg().exp(), self.eta)
        t_next_ = down.log().neg()
        mixed = (1 - 1.0) * denoised + 1.0 * denoised_middle  # k-diffusion's, fac = 1 / (2 r)
        moved = (t_next_.neg().exp() / t.neg().exp()).to(x.device) * x
        moved = moved - (t - t_next_).expm1().to(x.device) * mixed
        noise = self._brownian(x, t.neg().exp(), t_next.neg().exp())
        return moved + noise * self.s_noise * up.to(x.device)


class _MultistepSDEScheduler(KDiffusionScheduler):
    """A one-call SDE sampler that combines the newest estimates; Brownian noise at :attr:`eta`.

    Its step to sigma 0 is the last estimate itself (k-diffusion's "denoising step").
    """

    eta_setting = "eta_ancestral"
    brownian = True

    def _take_sigmas(self, sigmas: torch.Tensor, device) -> None:
        super()._take_sigmas(sigmas, device)
        self._earlier: list[tuple[torch.Tensor, torch.Tensor]] = []  # (estimate, h), newest first

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **unused):
        """One step from the call's estimate and the earlier ones."""
        x, denoised, sigma = self._estimate(model_output, sample)
        sigma_next = self.sigmas[self._step + 1].to(x.device)
        h = sigma_next.log().neg() - sigma.log().neg()
        if sigma_next == 0:
            moved = denoised
        else:
            moved = self._update(x, denoised, sigma, sigma_next, h)
            if self.eta:
                noise = self._brownian(x, sigma, sigma_next) * sigma_next
                moved = moved + noise * self._noise_factor(h) * self.s_noise
        self._earlier = [(denoised, h), *self._earlier[:1]]
        self._step += 1
        return _output(moved.to(sample.dtype), return_dict)


class A1111DPMPP2MSDEScheduler(_MultistepSDEScheduler):
    """k-diffusion's ``sample_dpmpp_2m_sde`` (A1111's DPM++ 2M SDE), midpoint solver."""

    solver_type = "midpoint"

    def _update(self, x, denoised, sigma, sigma_next, h) -> torch.Tensor:
        eta_h = self.eta * h
        moved = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
        if not self._earlier:
            return moved
        old_denoised, h_last = self._earlier[0]
        r = h_last / h
        if self.solver_type == "heun":
            scale = ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r)
        else:
            scale = 0.5 * (-h - eta_h).expm1().neg() * (1 / r)
        return moved + scale * (denoised - old_denoised)

    def _noise_factor(self, h: torch.Tensor) -> torch.Tensor:
        return (-2 * (self.eta * h)).expm1().neg().sqrt()


class A1111DPMPP2MSDEHeunScheduler(A1111DPMPP2MSDEScheduler):
    """k-diffusion's ``sample_dpmpp_2m_sde``, ``solver_type='heun'`` (A1111's 2M SDE Heun)."""

    solver_type = "heun"


class A1111DPMPP3MSDEScheduler(_MultistepSDEScheduler):
    """k-diffusion's ``sample_dpmpp_3m_sde`` (A1111's DPM++ 3M SDE)."""

    def _update(self, x, denoised, sigma, sigma_next, h) -> torch.Tensor:
        h_eta = h * (self.eta + 1)
        moved = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        if not self._earlier:
            return moved
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        denoised_1, h_1 = self._earlier[0]
        if len(self._earlier) == 1:
            return moved + phi_2 * ((denoised - denoised_1) / (h_1 / h))
        denoised_2, h_2 = self._earlier[1]
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return moved + phi_2 * d1 - phi_3 * d2

    def _noise_factor(self, h: torch.Tensor) -> torch.Tensor:
        return (-2 * h * self.eta).expm1().neg().sqrt()


class A1111RestartScheduler(KDiffusionScheduler):
    """A1111's Restart (its ``restart_sampler``, v1.6+; Xu et al., 2023).

    Heun steps that go back up the sigmas and down again, each time with fresh noise. From 20
    steps, A1111 replaces the schedule's sigmas with Karras sigmas between its second smallest
    and its largest, ``steps - restart_steps x restart_times`` of them (9 x 1 restart steps,
    from 36 steps ``steps // 4`` x 2), and after the step that reaches the sigma nearest 0.1
    goes back up to the one nearest 2, ``restart_times`` times, down Karras sigmas of their
    own; each climb adds each image's next draw times ``sqrt(high^2 - low^2)``. Below 20 steps
    it is Heun's sampler on the schedule's sigmas.
    """

    order = 2
    draws_noise = True

    def _calls(self, sigmas: torch.Tensor) -> list[torch.Tensor]:
        self._moves, self._start, self._move = restart_moves(sigmas), None, 0
        calls = []
        for old, new, _ in self._moves:
            calls += [old] if new == 0 else [old, new]
        return calls

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **unused):
        """One call of a Heun step (two calls but to sigma 0), then any climb's noise."""
        x, denoised, sigma = self._estimate(model_output, sample)
        old, new, _ = self._moves[self._move]
        d = (x - denoised) / sigma
        dt = (new - old).to(x.device)
        if self._start is None and new != 0:  # to the step's end, where the model runs next
            self._start = (x, d)
            return _output((x + d * dt).to(sample.dtype), return_dict)
        if self._start is None:  # a step to 0: Euler's
            moved = x + d * dt
        else:
            (x, first), self._start = self._start, None
            moved = x + (first + d) / 2 * dt
        self._move += 1
        if self._move < len(self._moves) and self._moves[self._move][2] is not None:
            moved = moved + self._drawn(moved) * self._moves[self._move][2].to(x.device)
        return _output(moved.to(sample.dtype), return_dict)


def restart_moves(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
    """A1111's Restart steps on ``sigmas``: (from, to, the noise's sigma before it or None)."""
    steps = len(sigmas) - 1
    restarts = None
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        low, high = sigmas[-2].item(), sigmas[0].item()
        sigmas = karras_sigmas(steps - restart_steps * times, low, high)
        restarts = (_nearest(sigmas, 0.1), restart_steps + 1, times, _nearest(sigmas, 2))
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if restarts is not None and i + 1 == restarts[0] and restarts[3] < restarts[0]:
            low_index, count, times, high_index = restarts
            climb = karras_sigmas(count, sigmas[low_index].item(), sigmas[high_index].item())[:-1]
            pairs += list(zip(climb[:-1], climb[1:], strict=True)) * times
    moves, last = [], None
    for old, new in pairs:
        climbing = last is not None and last < old
        moves.append((old, new, (old**2 - last**2) ** 0.5 if climbing else None))
        last = new
    return moves


def _nearest(sigmas: torch.Tensor, value: float) -> int:
    return int(torch.argmin(abs(sigmas - value), dim=0))


class A1111DPMFastScheduler(KDiffusionScheduler):
    """k-diffusion's ``sample_dpm_fast`` (A1111's DPM fast): DPM-Solver's fixed-step solver.

    As A1111 calls it: from the schedule's first sigma (the noise's scale; the rest of the
    schedule unused) over ``t = -log sigma`` evenly from the model's largest sigma to its
    smallest, where it ends (a hires pass: from the tail's first sigma to its last above 0);
    ``steps`` model calls in ``floor(steps / 3) + 1`` steps of order 3 (the last ones 2 and
    1, or ``steps % 3``), each an ancestral step at :attr:`eta` whose noise is each image's
    next draw (drawn at every step, also at eta 0).
    """

    eta_setting = "eta_ancestral"
    draws_noise = True

    def _calls(self, sigmas: torch.Tensor) -> list[torch.Tensor]:
        if self.img2img is None:  # the model's span, as A1111's txt2img passes it
            model = self.sigma_table()
            high, low = model.sigma_max, model.sigma_min
        else:  # A1111's sample_img2img: the tail's first sigma to its last above 0
            high, low = float(sigmas[0]), float(sigmas[-2])
        start, end = torch.tensor(high).log().neg(), torch.tensor(low).log().neg()
        steps = len(sigmas) - 1
        m = steps // 3 + 1
        orders = [3] * (m - 2) + [2, 1] if steps % 3 == 0 else [3] * (m - 1) + [steps % 3]
        times = torch.linspace(start, end, m + 1)
        self._steps, self._start, calls = [], None, []
        for i, order in enumerate(orders):
            t, t_next = times[i], times[i + 1]
            t_to, noise_scale = self._ancestral(t, t_next, end)
            h = t_to - t
            fractions = (1 / 3, 2 / 3) if order == 3 else (1 / 2,)
            inner = [t + r * h for r in fractions][: order - 1]
            self._steps.append((t, t_to, h, inner, noise_scale))
            calls += [time.neg().exp() for time in (t, *inner)]
        return calls

    def _ancestral(self, t, t_next, end):
        """(where the step goes in t, the noise's sigma after it), k-diffusion's at eta."""
        if not self.eta:
            return t_next, 0.0
        down, _ = ancestral_step(t.neg().exp(), t_next.neg().exp(), self.eta)
        t_to = torch.minimum(end, down.log().neg())
        return t_to, (t_next.neg().exp() ** 2 - t_to.neg().exp() ** 2) ** 0.5

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **unused):
        """One call of a step: to the next inner point, or (its last call) to the step's end."""
        x, denoised, sigma = self._estimate(model_output, sample)
        t, t_to, h, inner, noise_scale = self._steps[self._step]
        eps = (x - denoised) / sigma
        known = [] if self._start is None else self._start[1]
        if len(known) < len(inner):  # the next inner point, where the model runs next
            self._start = (x if not known else self._start[0], [*known, eps])
            moved = _dpm_solver_inner(self._start[0], self._start[1], t, h, len(inner))
            return _output(moved.to(sample.dtype), return_dict)
        start = x if self._start is None else self._start[0]
        moved = _dpm_solver_end(start, [*known, eps], t_to, h)
        self._start, self._step = None, self._step + 1
        moved = moved + noise_scale * self.s_noise * self._drawn(moved)  # k-diffusion's order
        return _output(moved.to(sample.dtype), return_dict)


def _dpm_solver_inner(x, eps, t, h, inner_points: int) -> torch.Tensor:
    """DPM-Solver's point ``s1`` (from eps) or ``s2`` (from eps and eps_r1) of a step."""
    if len(eps) == 1:
        r1 = 1 / 3 if inner_points == 2 else 1 / 2
        return x - (t + r1 * h).neg().exp() * (r1 * h).expm1() * eps[0]
    r1, r2 = 1 / 3, 2 / 3
    sigma_s2 = (t + r2 * h).neg().exp()
    first = x - sigma_s2 * (r2 * h).expm1() * eps[0]
    return first - sigma_s2 * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps[1] - eps[0])


def _dpm_solver_end(x, eps, t_to, h) -> torch.Tensor:
    """DPM-Solver-1, -2 or -3's step to ``t_to`` from its estimates (k-diffusion's formulas)."""
    sigma_to = t_to.neg().exp()
    first = x - sigma_to * h.expm1() * eps[0]
    if len(eps) == 1:
        return first
    if len(eps) == 2:  # r1 = 1/2
        return first - sigma_to / (2 * (1 / 2)) * h.expm1() * (eps[1] - eps[0])
    return first - sigma_to / (2 / 3) * (h.expm1() / h - 1) * (eps[2] - eps[0])
