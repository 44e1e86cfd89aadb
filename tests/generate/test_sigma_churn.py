"""A1111's "Sigma churn", "Sigma tmin", "Sigma tmax" and "Sigma noise" against k-diffusion.

Reference: ``tests/reference/a1111_sigma_churn.json``, recorded by running
crowsonkb/k-diffusion's own ``sample_euler``, ``sample_heun``, ``sample_dpm_2`` (with
``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) and its ancestral and SDE samplers (with
``s_noise``), as A1111 v1.7+'s ``Sampler.initialize`` passes them, on A1111's sigmas, with
k-diffusion's ``torch.randn_like`` drawing the image's next CPU draw (A1111's ``TorchHijack``);
the file's ``source`` field says how.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fulora.errors import ConfigError
from fulora.generate.config import GenerateConfig
from fulora.generate.samplers import make_scheduler
from fulora.lora.tiny import sd15_scheduler

from .analytic import relative_gap, toy_eps

_REFERENCE = Path(__file__).parents[1] / "reference"
RECORDED = json.loads((_REFERENCE / "a1111_sigma_churn.json").read_text())
# Relative L2 from k-diffusion's result (fp32): measured at most 4.1e-7 (DPM++ 2M SDE)
GAP = 1e-6
_SETTING = {"s_churn": "sigma_churn", "s_tmin": "sigma_tmin", "s_tmax": "sigma_tmax"}
_SETTING["s_noise"] = "sigma_noise"


def _config(case: dict) -> GenerateConfig:
    settings = {_SETTING[k]: v for k, v in case.items() if k in _SETTING}
    if case["type"] != "Uniform":  # the plain samplers' own
        settings["schedule_type"] = case["type"]
    return GenerateConfig(base="unused", sampler=case["sampler"], steps=case["steps"], **settings)


def _scheduler(cfg: GenerateConfig):
    config = sd15_scheduler().config
    scheduler = make_scheduler(cfg.sampler, config, cfg.sigma_schedule(), cfg.churn())
    scheduler.set_timesteps(cfg.steps)
    return scheduler


def _run(scheduler, seed: int) -> torch.Tensor:
    """As diffusers' pipeline steps it, the start and step noise one CPU generator's draws
    (A1111's RNG "CPU" for one image); the SDE samplers' trees seeded with the seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 2, 2), generator=generator) * scheduler.init_noise_sigma
    scheduler.step_noise = lambda draw: torch.randn((1, 4, 2, 2), generator=generator)
    scheduler.noise_seeds = [seed]
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:Should have t")  # torchsde on float32 sigmas
@pytest.mark.parametrize("key", sorted(RECORDED["cases"]))
def test_churn_and_sigma_noise_are_k_diffusions(key):
    """Euler, Heun and DPM2 with churn (all steps; some, by tmin and tmax; gamma capped at
    sqrt(2) - 1 by a large churn; with a sigma noise), on 4 schedule types, and the ancestral,
    DPM fast and SDE samplers with a sigma noise: the model called at k-diffusion's sigmas
    (the churned steps' raised ones), call for call, and the result within 1e-6. The churn's
    noise is drawn at every step, also where gamma is 0 (the tmin/tmax cases fail otherwise)."""
    case = RECORDED["cases"][key]
    scheduler = _scheduler(_config(case))
    calls = torch.tensor(RECORDED["calls"][key])
    assert len(scheduler._call_sigmas) == len(calls)
    assert torch.allclose(scheduler._call_sigmas.float(), calls, rtol=1e-6, atol=0)
    assert scheduler.needs_step_noise or scheduler.brownian
    assert relative_gap(_run(scheduler, RECORDED["seed"]), RECORDED["x0"][key]) < GAP, key


def test_without_churn_euler_is_as_before():
    """At sigma_churn 0 Euler is diffusers' (the churn's own scheduler is not used), and the
    recorded churn changes k-diffusion's result: the cases test something."""
    cfg = GenerateConfig(base="unused", sampler="euler", steps=30, sigma_noise=0.5)
    scheduler = _scheduler(cfg)
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    plain, churned = (torch.tensor(RECORDED["x0"][k]) for k in ("euler/Uniform/30/", _EULER))
    assert (plain - churned).norm() / plain.norm() > 1e-2


_EULER = "euler/Uniform/30/s_churn=1"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampler": "LMS", "sigma_churn": 1}, "passes to 'DPM2', 'Euler', 'Heun' only"),
        ({"sampler": "DPM++ 2M SDE", "sigma_tmin": 1}, "'DPM\\+\\+ 2M SDE' takes none"),
        ({"sampler": "Euler a", "sigma_noise": 0.8}, "set sigma_noise: 1"),
        ({"sampler": "Restart", "sigma_noise": 0.8}, "'Restart' takes none"),
        ({"sampler": "Euler", "sigma_tmin": 3, "sigma_tmax": 2}, "no step would be churned"),
        ({"sampler": "Heun", "sigma_churn": -1}, "sigma_churn"),
        ({"sampler": "Euler", "eta_noise_seed_delta": 5}, "adds none at sigma_churn 0"),
    ],
)
def test_churn_settings_a1111_ignores_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(base="unused", **settings)


def test_churn_and_sigma_noise_are_accepted_where_a1111_passes_them():
    """A1111 writes "Sigma noise" (and tmin, tmax) where set, churn or not; ENSD seeds the
    churn's noise (A1111's ImageRNG reseeds whatever the sampler)."""
    for sampler in ("Euler", "Heun", "DPM2 Karras"):
        GenerateConfig(base="unused", sampler=sampler, sigma_churn=1, eta_noise_seed_delta=3)
        GenerateConfig(base="unused", sampler=sampler, sigma_noise=0.9, sigma_tmin=0.5)
    for sampler in ("DPM2 a", "DPM++ 2S a Karras", "DPM fast", "DPM++ 3M SDE Exponential"):
        GenerateConfig(base="unused", sampler=sampler, sigma_noise=1.2)


def _generate(tiny_model, out, **settings):
    from fulora.generate.run import generate

    common = dict(planes=["brain"], per_class=2, batch_size=2, steps=5, width=64, height=48)
    common |= dict(seed=5, seed_scheme="consecutive", device="cpu", contact_sheet=0)
    common |= {"dtype": "fp32"} if settings.get("device") == "cuda" else {}
    generate(out, GenerateConfig(base=str(tiny_model), **(common | settings)), progress=False)
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "brain").glob("*.png"))}


def test_churned_images_are_each_images_own_and_written_as_a1111_writes_them(tiny_model, tmp_path):
    """Through ``generate`` (guidance 7, NV noise, ENSD): Euler, Heun and DPM2 with churn make
    other images than without, each image remade alone within 1 grey level of its batch's
    (the churn's noise is the image's own, the same on both sides of the guidance); the PNG
    text says "Sigma churn", "Sigma tmin", "Sigma noise" as A1111 writes them, and --a1111's
    reading gives the same settings back."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    churn = {"sigma_churn": 4.0, "sigma_tmin": 0.5, "sigma_noise": 1.1}
    churn |= {"rng": "nv", "eta_noise_seed_delta": 31337}
    for sampler in ("Euler", "Heun", "DPM2"):
        name, settings = sampler.lower(), {"sampler": sampler, **churn}
        plain = _generate(tiny_model, tmp_path / f"plain-{name}", sampler=sampler)
        batch = _generate(tiny_model, tmp_path / name, **settings)
        alone = _generate(tiny_model, tmp_path / f"1-{name}", **settings, batch_size=1)
        for key, pixels in batch.items():
            assert np.abs(pixels.astype(int) - plain[key].astype(int)).mean() > 0.5, sampler
            assert np.abs(pixels.astype(int) - alone[key].astype(int)).max() <= 1, sampler
    with Image.open(next((tmp_path / "heun" / "brain").glob("*.png"))) as image:
        text = image.text["parameters"]
    assert "Sigma churn: 4, Sigma tmin: 0.5, Sigma noise: 1.1, " in text
    assert "Sigma tmax" not in text and "ENSD: 31337, " in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert {k: read[k] for k in ("sigma_churn", "sigma_tmin", "sigma_noise")} == {
        "sigma_churn": 4.0,
        "sigma_tmin": 0.5,
        "sigma_noise": 1.1,
    }
    assert "sigma_tmax" not in read  # unwritten: A1111's default, no bound


def test_a1111_sigma_fields_are_read():
    """A1111's own spelling ("Sigma churn: 1.0", from its float) is read, tmax too."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    text = (
        "a photo\nSteps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 1, "
        "Size: 512x512, Sigma churn: 1.0, Sigma tmin: 0.2, Sigma tmax: 10.0, Sigma noise: 0.9"
    )
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert (read["sigma_churn"], read["sigma_tmin"], read["sigma_tmax"]) == (1.0, 0.2, 10.0)
    GenerateConfig(base="unused", **{k: v for k, v in read.items() if k != "per_class"})


@pytest.mark.gpu
def test_churned_images_are_each_images_own_on_cuda(tiny_model, tmp_path):
    """On CUDA (fp32) the churn's noise is each image's own, as on the CPU: Heun's churned
    images alone and in a batch within 1 grey level; in fp16 they are finite."""
    settings = dict(sampler="Heun", sigma_churn=4.0, device="cuda", rng="gpu")
    runs = {size: _generate(tiny_model, tmp_path / str(size), batch_size=size, **settings)
            for size in (1, 2)}  # fmt: skip
    assert runs[1].keys() == runs[2].keys() and len(runs[1]) == 2
    for key, pixels in runs[1].items():
        assert np.abs(pixels.astype(int) - runs[2][key].astype(int)).max() <= 1
    half = _generate(tiny_model, tmp_path / "fp16", dtype="fp16", **settings)
    assert all(pixels.std() > 0 for pixels in half.values())
