"""AUTOMATIC1111's schedule types: the sigmas a k-diffusion sampler steps through.

A1111 v1.9+ (``modules/sd_schedulers.py``, read at 5bbbda47) lets a k-diffusion sampler
(Euler, Euler a, Heun, LMS, DPM++ 2M) step through the noise levels of a "Schedule type"
instead of its own. Each type is a list of ``steps + 1`` sigmas from the model's largest,
``sigma_max``, down, ending at 0, computed here as A1111 computes it, on the CPU in float32
(float64 where A1111's numpy does), from the model's discrete sigmas
``sqrt((1 - alpha_bar) / alpha_bar)`` and k-diffusion's mapping between a sigma and a
fractional timestep (``DiscreteSchedule``: log sigma interpolated linearly). Two types
break the pattern, as in A1111: "KL Optimal" ends at the model's smallest sigma rather than
at 0 (the last step stops there), and "DDIM" takes every ``N // steps``-th of the model's N
sigmas from the second up, ``ceil((N - 1) / (N // steps))`` of them (31 steps for 30).

``tests/test_parity.py`` checks every type at 30, 11 and 7 steps against A1111's own
functions, and the samplers on them against k-diffusion's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Align Your Steps' ten steps for SD1.5 (NVIDIA's published sigmas, as A1111 lists them)
_ALIGN_YOUR_STEPS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399]
_ALIGN_YOUR_STEPS_SD15 += [0.152, 0.029]


class DiscreteSigmas:
    """A model's noise levels at its N training timesteps (k-diffusion's ``DiscreteSchedule``).

    Args:
        alphas_cumprod: The model's alpha_bar at each training timestep.
        downcast: A1111's "Downcast alphas_cumprod": alpha_bar cast to fp16 first, and the
            table computed and kept in fp16, as k-diffusion computes it from an fp16 tensor.
        zero_terminal_snr: A1111's "Zero Terminal SNR" noise schedule: alpha_bar rescaled
            (:func:`zero_terminal_snr`) after any downcast.
    """

    def __init__(
        self, alphas_cumprod: torch.Tensor, downcast: bool = False, zero_terminal_snr: bool = False
    ) -> None:
        alphas = a1111_alpha_bars(alphas_cumprod, downcast, zero_terminal_snr)
        self.sigmas = ((1 - alphas) / alphas) ** 0.5  # ascending, float32 as A1111's
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        """The smallest sigma (timestep 0)."""
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        """The largest sigma (timestep N - 1)."""
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep of each sigma: log sigma between its two neighbours."""
        log_sigma = sigma.log()
        above = (log_sigma - self.log_sigmas[:, None]).ge(0)  # training sigmas below each
        low = above.cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return ((1 - weight) * low + weight * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The sigma at each fractional timestep (log sigma interpolated)."""
        t = t.float()
        weight = t.frac()
        low, high = self.log_sigmas[t.floor().long()], self.log_sigmas[t.ceil().long()]
        return ((1 - weight) * low + weight * high).exp()


# A1111's last alpha_bar under "Zero Terminal SNR": not 0, which would make sigma infinite
_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


def a1111_alpha_bars(
    alphas_cumprod: torch.Tensor, downcast: bool = False, zero_terminal_snr: bool = False
) -> torch.Tensor:
    """The model's alpha_bar as A1111 samples with it (its ``apply_alpha_schedule_override``).

    Cast to fp16 with its "Downcast alphas_cumprod", then rescaled with its "Zero Terminal
    SNR" noise schedule; float32 otherwise.
    """
    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float32).cpu()
    alphas = alphas.half() if downcast else alphas
    return rescaled_to_zero_terminal_snr(alphas) if zero_terminal_snr else alphas


def rescaled_to_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar with zero terminal SNR (Lin et al., 2024, Algorithm 1), as A1111 rescales it.

    sqrt(alpha_bar) shifted so its last value is 0 and scaled so its first is unchanged, in
    the tensor's own dtype; A1111 then sets the last alpha_bar to 4.9e-8 rather than 0.
    """
    roots = alphas_cumprod.sqrt()
    first, last = roots[0].clone(), roots[-1].clone()
    roots = (roots - last) * (first / (first - last))
    rescaled = roots**2
    rescaled[-1] = _TERMINAL_ALPHA_BAR
    return rescaled


def a1111_sigmas(schedule, steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The sigmas of ``schedule`` at ``steps`` steps, as A1111's ``get_sigmas`` makes them.

    Args:
        schedule: The type and A1111's options (``fulora.generate.samplers.SigmaSchedule``).
        steps: The steps asked for ("DDIM" may take more, as in A1111).
        alphas_cumprod: The model's alpha_bar at each training timestep.

    Returns:
        Float32 sigmas, largest first; the last is the sigma the sampler ends at.
    """
    model = DiscreteSigmas(alphas_cumprod, schedule.downcast, schedule.zero_terminal_snr)
    span = _Span(
        low=schedule.sigma_min or model.sigma_min,  # A1111: a setting of 0 is the model's
        high=schedule.sigma_max or model.sigma_max,
        rho=schedule.rho or _DEFAULT_RHO.get(schedule.kind, 0.0),
        beta_shape=schedule.beta_shape,
    )
    drawn = steps + 1 if schedule.discard_penultimate else steps
    sigmas = _SCHEDULES[schedule.kind](drawn, model, span)
    if schedule.discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


@dataclass(frozen=True)
class _Span:
    """The sigmas a type spans, and its shape: A1111's kwargs of each schedule function."""

    low: float
    high: float
    rho: float
    beta_shape: tuple[float, float]


_DEFAULT_RHO = {"karras": 7.0, "polyexponential": 1.0}  # A1111's Scheduler.default_rho


def _with_zero(sigmas) -> torch.Tensor:
    """The sigmas (a float32 tensor, or numbers rounded to float32) and a last 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _uniform(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """k-diffusion's ``get_sigmas``: timesteps evenly spaced from the top to 0 (the model's)."""
    return _with_zero(model.t_to_sigma(torch.linspace(len(model.sigmas) - 1, 0, steps)))


def _karras(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    return karras_sigmas(steps, span.low, span.high, span.rho)


def karras_sigmas(steps: int, low: float, high: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): ``steps`` sigmas from ``high`` to ``low``, and a last 0.

    Evenly spaced in sigma ** (1 / rho); k-diffusion's ``get_sigmas_karras``, in float32.
    """
    ramp = torch.linspace(0, 1, steps)
    top, bottom = high ** (1 / rho), low ** (1 / rho)
    return _with_zero((top + ramp * (bottom - top)) ** rho)


def _exponential(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _with_zero(torch.linspace(math.log(span.high), math.log(span.low), steps).exp())


def _polyexponential(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """Log sigma along a polynomial ramp (A1111's default rho 1: the exponential's, in float32)."""
    ramp = torch.linspace(1, 0, steps) ** span.rho
    low, high = math.log(span.low), math.log(span.high)
    return _with_zero(torch.exp(ramp * (high - low) + low))


def _timesteps_between(model: DiscreteSigmas, span: _Span, points: int) -> torch.Tensor:
    """``points`` timesteps evenly spaced from the largest sigma's to the smallest's."""
    start = model.sigma_to_t(torch.tensor(span.high))
    end = model.sigma_to_t(torch.tensor(span.low))
    return torch.linspace(start, end, points)


def _sgm_uniform(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """``steps`` of ``steps + 1`` evenly spaced timesteps, the last one (at sigma_min) left out."""
    times = _timesteps_between(model, span, steps + 1)[:-1]
    return _with_zero([model.t_to_sigma(t).item() for t in times])


def _normal(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """``steps`` evenly spaced timesteps from sigma_max's to sigma_min's."""
    times = _timesteps_between(model, span, steps)
    return _with_zero([model.t_to_sigma(t).item() for t in times])


def _kl_optimal(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """Evenly spaced in arctan(sigma), from sigma_max down to sigma_min itself (no last 0)."""
    low, high = torch.arctan(torch.tensor(span.low)), torch.arctan(torch.tensor(span.high))
    share = torch.arange(steps + 1) / steps
    return torch.tan(share * low + (1.0 - share) * high)


def _align_your_steps(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """NVIDIA's SD1.5 sigmas, log-linearly interpolated to ``steps`` (the list itself at 11)."""
    listed = _ALIGN_YOUR_STEPS_SD15
    if steps == len(listed):
        return _with_zero(listed)
    ascending = np.log(listed[::-1])
    spread = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(listed)), ascending)
    return _with_zero(np.exp(spread)[::-1].copy())


def _simple(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """Every (N / steps)-th training sigma from the top, the index truncated."""
    stride = len(model.sigmas) / steps
    return _with_zero([model.sigmas[-(1 + int(i * stride))].item() for i in range(steps)])


def _ddim(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """Every (N // steps)-th training sigma from timestep 1 up, largest first (A1111's count)."""
    stride = max(len(model.sigmas) // steps, 1)
    return _with_zero(model.sigmas[1::stride].flip(0))


def _beta(steps: int, model: DiscreteSigmas, span: _Span) -> torch.Tensor:
    """Lee et al. (2024): the beta distribution's quantiles, mapped linearly onto sigma."""
    from scipy import stats  # loaded only for this type

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), *span.beta_shape)
    return _with_zero([span.low + q * (span.high - span.low) for q in quantiles])


_SCHEDULES = {
    "uniform": _uniform,
    "karras": _karras,
    "exponential": _exponential,
    "polyexponential": _polyexponential,
    "sgm_uniform": _sgm_uniform,
    "kl_optimal": _kl_optimal,
    "align_your_steps": _align_your_steps,
    "simple": _simple,
    "normal": _normal,
    "ddim": _ddim,
    "beta": _beta,
}
