"""The analytic model that the sampler tests run fulora's schedulers and the references on.

``eps = 0.5 sin(1.3 x + t / 250) + 0.2 x`` at the timestep ``t`` the model is called at
(k-diffusion's fractional one): smooth but not linear, so a step taken at another sigma or
timestep shows. The files in ``tests/reference`` were recorded on it (their ``source`` fields
say so); ``tests/test_parity.py`` has its own copy.
"""

import torch


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's noise estimate at ``x`` and timestep ``t``."""
    return 0.5 * torch.sin(1.3 * x + t.to(x.dtype) / 250.0) + 0.2 * x


def relative_gap(x: torch.Tensor, recorded: list[float]) -> float:
    """The relative L2 distance of ``x`` from a recorded result."""
    expected = torch.tensor(recorded, dtype=x.dtype)
    return float((x.flatten() - expected).norm() / expected.norm())
