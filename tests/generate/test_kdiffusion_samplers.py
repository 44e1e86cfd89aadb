"""A1111's DPM2, DPM2 a, DPM++ 2S a and SDE samplers against k-diffusion's own samplers.

References: ``tests/reference/a1111_dpm_samplers.json`` and ``a1111_sde_samplers.json``,
recorded by running crowsonkb/k-diffusion's ``sample_dpm_2``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde`` and
``sample_dpmpp_3m_sde`` (its code, imported in a scratch folder; the SDE samplers with its
``BrownianTreeNoiseSampler`` over torchsde, seeded as A1111 seeds it) on the sigmas A1111's
``get_sigmas`` gives them (its ``sd_schedulers.py``; DPM2, DPM2 a and DPM++ 3M SDE drop the
penultimate sigma), on an analytic model. Each file's ``source`` field says how.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fulora.errors import ConfigError
from fulora.generate.config import GenerateConfig
from fulora.generate.samplers import make_scheduler, resolve_sampler
from fulora.generate.schedules import schedule_steps
from fulora.lora.tiny import sd15_scheduler

from .analytic import relative_gap, toy_eps

_REFERENCE = Path(__file__).parents[1] / "reference"
RECORDED = json.loads((_REFERENCE / "a1111_dpm_samplers.json").read_text())
SDE_RECORDED = json.loads((_REFERENCE / "a1111_sde_samplers.json").read_text())
RESTART_RECORDED = json.loads((_REFERENCE / "a1111_restart_sampler.json").read_text())
FAST_RECORDED = json.loads((_REFERENCE / "a1111_dpm_fast.json").read_text())
# Relative L2 from k-diffusion's result: measured at most 4.7e-7 (DPM2 a, "KL Optimal", 7
# steps, fp32), the float rounding of the same formulas
GAP = 1e-6


def _settings(sampler: str, label: str) -> dict:
    """A1111's default (Karras, since v1.9) by the sampler's Karras name; a type otherwise."""
    if label == "Karras":
        return {"sampler": f"{sampler}_karras"}
    return {"sampler": sampler, "schedule_type": label}


def _sample(steps: int, eta: float = 1.0, **settings):
    """fulora's scheduler for ``settings`` stepped as diffusers' pipeline steps it, on the
    analytic model; the ancestral ones' noise (start and steps) from one CPU generator, as
    A1111's RNG "CPU" draws an image's."""
    cfg = GenerateConfig(base="unused", steps=steps, eta_ancestral=eta, **settings)
    scheduler = make_scheduler(cfg.sampler, sd15_scheduler().config, cfg.sigma_schedule())
    scheduler.eta = eta
    scheduler.set_timesteps(steps)
    if scheduler.needs_step_noise:
        return _stepped_with_cpu_noise(scheduler, RECORDED["seed"])
    return _stepped(scheduler, _start(scheduler))


def _start(scheduler) -> torch.Tensor:
    """The recorded noise (float64) times the scheduler's first sigma."""
    x = torch.tensor(RECORDED["noise"], dtype=torch.float64).reshape(1, 4, 2, 2)
    return x * scheduler.init_noise_sigma


def _stepped(scheduler, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the scheduler's steps on the analytic model, as the pipeline steps it."""
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def _stepped_with_cpu_noise(scheduler, seed: int) -> torch.Tensor:
    """The run from ``seed``'s CPU noise, each step noise the same generator's next draw (A1111's
    RNG "CPU" for one image)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 2, 2), generator=generator) * scheduler.init_noise_sigma
    scheduler.step_noise = lambda draw: torch.randn((1, 4, 2, 2), generator=generator)
    return _stepped(scheduler, x)


def _sample_sde(steps: int, eta: float, seeds: list[int], **settings) -> torch.Tensor:
    """An SDE sampler's images (a batch, one seed each) on the analytic model, in fp32 as
    A1111 samples, each started from its seed's CPU noise, its Brownian trees seeded alike."""
    cfg = GenerateConfig(base="unused", steps=steps, eta_ancestral=eta, **settings)
    scheduler = make_scheduler(cfg.sampler, sd15_scheduler().config, cfg.sigma_schedule())
    scheduler.eta, scheduler.noise_seeds = eta, seeds
    scheduler.set_timesteps(steps)
    starts = [torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return _stepped(scheduler, torch.cat(starts) * scheduler.init_noise_sigma)


@pytest.mark.parametrize("key", sorted(RECORDED["x0"]))
def test_dpm2_samplers_are_k_diffusions(key):
    """Each on A1111's own sigmas (Karras, by its "... Karras" name) and on other schedule
    types ("KL Optimal" ends above 0: DPM2's last step is then a two-call step), at 30 and
    7 steps; DPM2 in float64, the ancestral two in fp32 with the image's CPU noise."""
    sampler, label, steps = key.split("/")
    x = _sample(int(steps), **_settings(sampler, label))
    assert relative_gap(x, RECORDED["x0"][key]) < GAP, key


@pytest.mark.parametrize("key", sorted(RECORDED["x0_eta"]))
def test_ancestral_dpm_samplers_at_another_eta_are_k_diffusions(key):
    """DPM2 a and DPM++ 2S a at A1111's "Eta" 0.5, 0 and 2.5, and with "Discard penultimate
    sigma". At 2.5 some steps go down to 0 before the last: DPM2 a takes an Euler step and
    draws no noise there, DPM++ 2S a draws it all the same, so every later draw depends on
    the rule (drawing at those steps too, or not, is 1e-1 away)."""
    sampler, label, steps, eta, discard = key.split("/")
    settings = _settings(sampler, label)
    if discard == "True" and sampler == "dpmpp_2s_a":  # DPM2 a drops its own
        settings["discard_penultimate_sigma"] = True
    x = _sample(int(steps), float(eta), **settings)
    assert relative_gap(x, RECORDED["x0_eta"][key]) < GAP, key


# A1111 v1.9+'s own schedule type of each SDE sampler (its option "scheduler")
_SDE_OWN = {"dpmpp_sde": "Karras", "dpmpp_2m_sde": "Exponential", "dpmpp_3m_sde": "Exponential"}
_SDE_OWN["dpmpp_2m_sde_heun"] = "Exponential"


@pytest.mark.parametrize("key", sorted(SDE_RECORDED["x0"]))
def test_sde_samplers_are_k_diffusions_with_a1111s_brownian_noise(key):
    """DPM++ SDE, 2M SDE (midpoint and Heun) and 3M SDE, each on A1111's own sigmas (by the
    variant's name) and on other types, at eta 1, 0.5 and 0; two images, each with its own
    Brownian trees (seeded with its seed, as A1111's create_noise_sampler seeds them).
    Measured at most 6.9e-7; the trees of the batch's two seeds swapped, 0.52 to 1.25 away."""
    sampler, label, steps, eta = key.split("/")
    if label == _SDE_OWN[sampler]:
        settings = {"sampler": f"{sampler}_{label.lower()}"}
    else:
        settings = {"sampler": sampler, "schedule_type": label}
    x = _sample_sde(int(steps), float(eta), SDE_RECORDED["seeds"], **settings)
    assert relative_gap(x, SDE_RECORDED["x0"][key]) < GAP, key


def test_an_sde_images_noise_is_its_own_whatever_the_batch():
    """Each image's Brownian noise comes from its own seed: an image made alone is the same
    as in a batch (bit for bit), and another seed beside it changes nothing."""
    settings = {"sampler": "DPM++ 2M SDE Karras"}
    pair = _sample_sde(12, 1.0, [3, 4], **settings)
    alone = _sample_sde(12, 1.0, [4], **settings)
    beside = _sample_sde(12, 1.0, [9, 4], **settings)
    assert torch.equal(pair[1], alone[0]) and torch.equal(beside[1], alone[0])


@pytest.mark.parametrize("key", sorted(RESTART_RECORDED["x0"]))
def test_restart_is_automatic1111s(key):
    """Restart against A1111's own restart_sampler: below 20 steps Heun on the type's sigmas,
    from 20 its Karras sigmas with 9 restart steps (from 36, steps // 4, twice), each climb's
    noise the image's next CPU draw; the model runs at A1111's sigmas, call for call."""
    label, steps = key.split("/")
    cfg = GenerateConfig(base="unused", sampler="Restart", steps=int(steps), schedule_type=label)
    scheduler = make_scheduler(cfg.sampler, sd15_scheduler().config, cfg.sigma_schedule())
    scheduler.set_timesteps(int(steps))
    calls = [float(sigma) for sigma in scheduler._call_sigmas]
    x = _stepped_with_cpu_noise(scheduler, RESTART_RECORDED["seed"])
    assert calls == RESTART_RECORDED["calls"][key]
    assert relative_gap(x, RESTART_RECORDED["x0"][key]) < GAP, key  # measured at most 1.6e-7


@pytest.mark.parametrize("key", sorted(FAST_RECORDED["x0"]))
def test_dpm_fast_is_k_diffusions_as_a1111_calls_it(key):
    """DPM fast against k-diffusion's own sample_dpm_fast as A1111 calls it: from the type's
    first sigma, over the model's sigmas in -log sigma, steps model calls (orders 3, ..., 2, 1
    or steps % 3), each step's noise the image's next CPU draw (also at eta 0, times 0)."""
    label, steps, eta = key.split("/")
    settings = {"sampler": "DPM fast", "schedule_type": label, "eta_ancestral": float(eta)}
    cfg = GenerateConfig(base="unused", steps=int(steps), **settings)
    scheduler = make_scheduler(cfg.sampler, sd15_scheduler().config, cfg.sigma_schedule())
    scheduler.eta = float(eta)
    scheduler.set_timesteps(int(steps))
    calls = [float(sigma) for sigma in scheduler._call_sigmas]
    x = _stepped_with_cpu_noise(scheduler, FAST_RECORDED["seed"])
    assert calls == FAST_RECORDED["calls"][key]
    assert relative_gap(x, FAST_RECORDED["x0"][key]) < GAP, key  # measured at most 3.2e-7


@pytest.mark.parametrize(
    ("sampler", "steps", "calls"),
    [
        ("DPM2", 30, 59),  # 31 sigmas drawn, the penultimate dropped: 29 two-call steps + Euler
        ("DPM2 a Karras", 10, 19),
        ("DPM++ 2S a", 30, 59),
        ("DPM++ SDE Karras", 30, 59),
        ("Restart", 40, 79),  # 20 + 2 x 10 Heun steps, as A1111's restart_sampler lays them
    ],
)
def test_each_step_calls_the_model_twice_but_the_last(sampler, steps, calls):
    """Two model calls a step (the step's sigma, then the middle one), one for the step to 0;
    A1111 schedules a prompt over twice the steps (its second_order samplers), as Heun."""
    scheduler = make_scheduler(sampler, sd15_scheduler().config)
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == calls
    assert schedule_steps(resolve_sampler(sampler), steps) == 2 * steps


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampler": "DPM2", "discard_penultimate_sigma": True}, r"drops the penultimate sigma"),
        ({"sampler": "DPM2", "eta_ancestral": 0.5}, r"'Euler a', 'DPM2 a', 'DPM\+\+ 2S a'"),
        ({"sampler": "DPM2 Karras", "eta_noise_seed_delta": 31337}, r"'DPM2 Karras' adds none"),
        ({"sampler": "DPM2 a Karras", "schedule_type": "exponential"}, r"set sampler: dpm2_a"),
        ({"sampler": "DPM++ 3M SDE Exponential", "schedule_type": "beta"}, r"Exponential sch"),
        ({"sampler": "DPM++ SDE", "eta_noise_seed_delta": 31337}, r"Brownian trees seeded"),
        ({"sampler": "DPM adaptive"}, r"chooses its steps as it goes"),
        ({"sampler": "LCM"}, r"latent consistency model"),
        ({"sampler": "DDIM CFG++"}, r"CFG\+\+ guidance"),
        ({"sampler": "DDIM", "schedule_rho": 5}, r"\(Euler a, Euler, Heun, DPM\+\+ 2M, LMS, DPM2,"),
    ],
)
def test_settings_that_would_change_nothing_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(base="unused", **settings)


def test_ancestral_dpm_samplers_take_eta_and_ensd():
    """A1111 writes "Eta" and "ENSD" for DPM2 a and DPM++ 2S a (their step noise): accepted;
    ENSD with Restart too, whose climbs draw from the generators ENSD seeds (A1111 applies its
    ENSD there, though its text does not say so)."""
    for sampler in ("DPM2 a", "DPM++ 2S a Karras"):
        GenerateConfig(base="unused", sampler=sampler, eta_ancestral=0.7, eta_noise_seed_delta=3)
    GenerateConfig(base="unused", sampler="Restart", eta_noise_seed_delta=3)  # its climbs' noise


def _generate(tiny_model, out, **settings):
    from fulora.generate.run import generate

    common = dict(planes=["brain"], per_class=2, batch_size=2, steps=4, width=64, height=48)
    common |= dict(seed=5, seed_scheme="consecutive", device="cpu", contact_sheet=0)
    cfg = GenerateConfig(base=str(tiny_model), **(common | settings))
    generate(out, cfg, progress=False)
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "brain").glob("*.png"))}


def _text(folder: Path) -> str:
    with Image.open(next((folder / "brain").glob("*.png"))) as image:
        return image.text["parameters"]


def test_kdiffusion_samplers_make_their_images_and_are_written_as_a1111_writes_them(
    tiny_model, tmp_path
):
    """Through ``generate``: DPM2 a (NV noise, ENSD, eta), DPM++ 2S a Karras, DPM++ 2M SDE
    Karras (eta) and Restart (20 steps: one climb; ENSD) make images of their own (and Euler
    with A1111's "Downcast alphas_cumprod", DPM++ 2M Karras with its "SGM noise multiplier" run
    and say so), all but
    2S a's remade in a batch of one within 1 grey level (the UNet's rounding: each image's
    noise is its own); the PNG text names each as A1111 v1.9+ does (a variant by its name,
    "Uniform" for the plain name), and --a1111's reading gives the same settings back."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    runs = {
        "euler_a": {"sampler": "Euler a"},
        "dpm2_a": {"sampler": "DPM2 a", "rng": "nv", "eta_noise_seed_delta": 31337}
        | {"eta_ancestral": 0.7},
        "dpmpp_2s_a_karras": {"sampler": "DPM++ 2S a Karras"},
        "sde": {"sampler": "DPM++ 2M SDE Karras", "eta_ancestral": 0.8},
        "restart": {"sampler": "Restart", "steps": 20, "eta_noise_seed_delta": 31337},
        "downcast": {"sampler": "Euler", "downcast_alphas_cumprod": True},
        "sgm": {"sampler": "DPM++ 2M Karras", "sgm_noise_multiplier": True},
    }
    images = {name: _generate(tiny_model, tmp_path / name, **s) for name, s in runs.items()}
    for name in ("dpm2_a", "dpmpp_2s_a_karras", "sde", "restart"):  # not Euler a's images
        for key, pixels in images[name].items():
            assert np.abs(pixels.astype(int) - images["euler_a"][key].astype(int)).mean() > 0.5
    for name in ("dpm2_a", "sde", "restart"):  # the step noise of each image its own
        one = _generate(tiny_model, tmp_path / f"one-{name}", batch_size=1, **runs[name])
        for key, pixels in one.items():  # the UNet's batch of 2 rounds otherwise: 1 level
            assert np.abs(pixels.astype(int) - images[name][key].astype(int)).max() <= 1
    text = _text(tmp_path / "dpm2_a")
    assert "Sampler: DPM2 a, Schedule type: Uniform, " in text
    assert "ENSD: 31337, Eta: 0.7, RNG: NV, " in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert (read["sampler"], read["schedule_type"], read["eta_ancestral"]) == (
        "dpm2_a",
        "uniform",
        0.7,
    )
    assert not read["discard_penultimate_sigma"]  # its own drop is not A1111's option
    text = _text(tmp_path / "dpmpp_2s_a_karras")
    assert "Sampler: DPM++ 2S a Karras, " in text and "Schedule type" not in text
    text = _text(tmp_path / "sde")
    assert "Sampler: DPM++ 2M SDE Karras, " in text and "Eta: 0.8, " in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert (read["sampler"], read["eta_ancestral"]) == ("dpmpp_2m_sde_karras", 0.8)
    text = _text(tmp_path / "restart")
    assert "Sampler: Restart, " in text and "ENSD: 31337, " in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert (read["sampler"], read["eta_noise_seed_delta"]) == ("restart", 31337)
    text = _text(tmp_path / "downcast")
    assert "Downcast alphas_cumprod: True, " in text
    assert generate_settings(read_a1111_parameters(text), "brain")["downcast_alphas_cumprod"]
    assert "SGM noise multiplier: True, " in _text(tmp_path / "sgm")


@pytest.mark.gpu
def test_sde_samplers_draw_their_brownian_noise_where_the_latents_are(tiny_model, tmp_path):
    """On CUDA, as in A1111, each image's Brownian tree is built and drawn on the GPU: DPM++
    2M SDE's images there (fp32) are each image's own, alone or in a batch (within 1 grey
    level), and finite."""
    settings = dict(sampler="DPM++ 2M SDE Karras", device="cuda", dtype="fp32")
    runs = {size: _generate(tiny_model, tmp_path / str(size), batch_size=size, **settings)
            for size in (1, 2)}  # fmt: skip
    assert runs[1].keys() == runs[2].keys() and len(runs[1]) == 2
    for key, pixels in runs[1].items():
        assert np.abs(pixels.astype(int) - runs[2][key].astype(int)).max() <= 1


# A1111's "Downcast alphas_cumprod": the sigma table in fp16 (reference: a1111_downcast.json)
DOWNCAST_RECORDED = json.loads((_REFERENCE / "a1111_downcast.json").read_text())


def _downcast_schedule(sampler: str, label: str, steps: int = 30):
    return _alpha_bar_schedule(sampler, label, steps, downcast_alphas_cumprod=True)


def _alpha_bar_schedule(sampler: str, label: str, steps: int, **alpha_bar):
    """The sigmas ``generate`` takes for ``sampler`` on ``label`` with A1111's alpha_bar options."""
    settings = {"sampler": sampler, **alpha_bar}
    if label != "Uniform":
        settings["schedule_type"] = label
    return GenerateConfig(base="unused", steps=steps, **settings).sigma_schedule()


@pytest.mark.parametrize("key", sorted(DOWNCAST_RECORDED["sigmas"]))
def test_downcast_sigmas_are_automatic1111s(key):
    """Each schedule type's sigmas on k-diffusion's fp16 table, bit for bit (up to 0.07% from
    the float32 table's)."""
    from fulora.generate.sigmas import a1111_sigmas

    label, steps = key.split("/")
    schedule = _downcast_schedule("Euler", label)
    sigmas = a1111_sigmas(schedule, int(steps), sd15_scheduler().alphas_cumprod)
    assert torch.equal(sigmas, torch.tensor(DOWNCAST_RECORDED["sigmas"][key]))


@pytest.mark.parametrize("key", sorted(DOWNCAST_RECORDED["x0"]))
def test_samplers_on_downcast_sigmas_are_k_diffusions(key):
    """Euler, Heun, LMS, DPM++ 2M and DPM2 on the fp16 table's sigmas, the model at its
    timesteps, against k-diffusion's samplers on a DiscreteEpsDDPMDenoiser built from fp16
    alpha_bar (float64; measured at most 5.1e-7; without the downcast, 1.2e-4 to 6.7e-3 away)."""
    sampler, label, steps = key.split("/")
    schedule = _downcast_schedule(sampler, label, int(steps))
    scheduler = make_scheduler(sampler, sd15_scheduler().config, schedule)
    scheduler.set_timesteps(int(steps))
    x = _stepped(scheduler, _start(scheduler))
    assert relative_gap(x, DOWNCAST_RECORDED["x0"][key]) < GAP, key


@pytest.mark.parametrize("key", sorted(DOWNCAST_RECORDED["ancestral_x0"]))
def test_ancestral_samplers_on_downcast_sigmas_are_k_diffusions(key):
    """Euler a and DPM++ 2S a on them, their noise the image's CPU draws (fp32)."""
    sampler, label, steps = key.split("/")
    schedule = _downcast_schedule(sampler, label, int(steps))
    scheduler = make_scheduler(sampler, sd15_scheduler().config, schedule)
    scheduler.set_timesteps(int(steps))
    x = _stepped_with_cpu_noise(scheduler, RECORDED["seed"])
    assert relative_gap(x, DOWNCAST_RECORDED["ancestral_x0"][key]) < GAP, key  # measured 3.1e-7


@pytest.mark.parametrize(
    ("fields", "downcast"),
    [
        ({"Version": "v1.6.0"}, True),  # A1111's backcompat: before v1.7.0-225
        ({"Version": "v1.7.0"}, True),
        ({"Version": "v1.7.0-RC-5-gf92d6149"}, True),
        ({"Version": "v1.7.0-225-g0e4e9a0d"}, False),
        ({"Version": "v1.10.1"}, False),
        ({"Version": "v1.10.1", "Downcast alphas_cumprod": "True"}, True),
        ({}, False),  # no version: no backcompat
        ({"Version": "fulora 0.1.0"}, False),
    ],
)
def test_downcast_is_read_as_automatic1111_reads_it(fields, downcast):
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    line = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x48"
    line += "".join(f", {key}: {value}" for key, value in fields.items())
    read = generate_settings(read_a1111_parameters(f"a photo of fetal brain\n{line}"), "brain")
    assert read["downcast_alphas_cumprod"] is downcast


def test_downcast_with_a_sampler_fulora_does_not_downcast_is_refused():
    """diffusers' own samplers, kept for runs made with them, are not A1111's: refused (A1111's
    UniPC takes it since session 32, ``tests/generate/test_unipc.py``)."""
    with pytest.raises(ConfigError, match=r"'UniPC \(diffusers\)' is diffusers' own"):
        GenerateConfig(base="unused", sampler="unipc_diffusers", downcast_alphas_cumprod=True)
    GenerateConfig(base="unused", sampler="UniPC", downcast_alphas_cumprod=True)


# A1111's "Noise Schedule: Zero Terminal SNR" (reference: a1111_zero_terminal_snr.json)
ZTSNR_RECORDED = json.loads((_REFERENCE / "a1111_zero_terminal_snr.json").read_text())


def _ztsnr_schedule(sampler: str, label: str, steps: int):
    return _alpha_bar_schedule(sampler, label, steps, zero_terminal_snr=True)


@pytest.mark.parametrize("key", sorted(ZTSNR_RECORDED["sigmas"]))
def test_zero_terminal_snr_sigmas_are_automatic1111s(key):
    """Each type's sigmas on the table of A1111's rescaled alpha_bar (its top sigma 4519 where
    the model's is 14.6), bit for bit."""
    from fulora.generate.sigmas import a1111_sigmas

    _, label, steps = key.split("/")
    schedule = _ztsnr_schedule("Euler", label, int(steps))
    sigmas = a1111_sigmas(schedule, int(steps), sd15_scheduler().alphas_cumprod)
    assert torch.equal(sigmas, torch.tensor(ZTSNR_RECORDED["sigmas"][key]))


@pytest.mark.parametrize("key", sorted(ZTSNR_RECORDED["x0"]))
def test_samplers_on_zero_terminal_snr_are_k_diffusions(key):
    """Euler, Heun, DPM++ 2M and DPM2 on them, against k-diffusion's on that table (float64)."""
    _, sampler, label, steps = key.split("/")
    scheduler = make_scheduler(
        sampler, sd15_scheduler().config, _ztsnr_schedule(sampler, label, int(steps))
    )
    scheduler.set_timesteps(int(steps))
    x = _stepped(scheduler, _start(scheduler))
    assert relative_gap(x, ZTSNR_RECORDED["x0"][key]) < GAP, key  # measured at most 6.4e-7


# A1111's DDIM and PLMS with its alpha_bar options (reference: a1111_ddim_alpha_bar.json)
DDIM_RECORDED = json.loads((_REFERENCE / "a1111_ddim_alpha_bar.json").read_text())


@pytest.mark.parametrize("key", sorted(DDIM_RECORDED["x0"]))
def test_ddim_and_plms_with_a1111s_alpha_bar_options_are_its_own(key):
    """DDIM and PLMS on the downcast (fp16) or zero-terminal-SNR alpha_bar, against A1111's own
    ddim and plms: they index the table and take sqrt(1 - alpha_bar) in its dtype (DDIM also
    at eta 0.5, its noise the image's CPU draws), at 30, 20 and 27 steps (float64): measured
    at most 2.9e-8; without the option, 3.2e-4 to 1.0 away."""
    sampler, table, steps, eta = key.split("/")
    option = {"downcast": "downcast_alphas_cumprod", "ztsnr": "zero_terminal_snr"}[table]
    settings = {"sampler": sampler, option: True, "eta_ddim": float(eta)}
    cfg = GenerateConfig(base="unused", steps=int(steps), **settings)
    scheduler = make_scheduler(sampler, sd15_scheduler().config, cfg.sigma_schedule())
    scheduler.eta = float(eta)
    scheduler.set_timesteps(int(steps))
    generator = torch.Generator().manual_seed(DDIM_RECORDED["seed"])
    scheduler.step_noise = lambda step: torch.randn((1, 4, 2, 2), generator=generator).double()
    x = _stepped(scheduler, _start(scheduler))
    assert relative_gap(x, DDIM_RECORDED["x0"][key]) < GAP, key


# A1111's DDIM and PLMS with "Discard penultimate sigma" (reference: a1111_ddim_discard.json)
DISCARD_RECORDED = json.loads((_REFERENCE / "a1111_ddim_discard.json").read_text())


@pytest.mark.parametrize("key", sorted(DISCARD_RECORDED["x0"]))
def test_ddim_and_plms_with_discard_penultimate_sigma_are_a1111s(key):
    """A1111's CompVisSampler gives DDIM and PLMS the grid of a step more with its "Discard
    penultimate sigma": against its own ddim and plms on that grid (30, 20 and 27 steps,
    float64), within 1e-6; on the usual grid, far more."""
    sampler, steps = key.split("/")
    cfg = GenerateConfig(base="unused", sampler=sampler, steps=int(steps))
    for discard in (True, False):
        cfg.discard_penultimate_sigma = discard
        scheduler = make_scheduler(sampler, sd15_scheduler().config, cfg.sigma_schedule())
        scheduler.set_timesteps(int(steps))
        gap = relative_gap(_stepped(scheduler, _start(scheduler)), DISCARD_RECORDED["x0"][key])
        assert gap < GAP if discard else gap > 1e-5, (key, discard, gap)


# A1111's "SGM noise multiplier" (reference: a1111_sgm_noise_multiplier.json)
SGM_RECORDED = json.loads((_REFERENCE / "a1111_sgm_noise_multiplier.json").read_text())


@pytest.mark.parametrize("key", sorted(SGM_RECORDED["x0"]))
def test_sgm_noise_multiplier_starts_as_automatic1111s(key):
    """From the noise times sqrt(1 + sigma_0^2), as A1111's KDiffusionSampler.sample: Euler,
    Heun, DPM++ 2M (in its variance-preserving space, from the noise itself), DPM2, LMS,
    Euler a and DPM++ 2S a against k-diffusion's from there: measured at most 3.0e-7; from
    the usual start, 1.3e-3 to 2.5e-3 away."""
    sampler, label, steps = key.split("/")
    schedule = _alpha_bar_schedule(sampler, label, int(steps), sgm_noise_multiplier=True)
    scheduler = make_scheduler(sampler, sd15_scheduler().config, schedule)
    scheduler.set_timesteps(int(steps))
    if sampler in ("euler_a", "dpmpp_2s_a"):
        x = _stepped_with_cpu_noise(scheduler, RECORDED["seed"])
    else:
        x = _stepped(scheduler, _start(scheduler))
    assert relative_gap(x, SGM_RECORDED["x0"][key]) < GAP, key


def test_sgm_noise_multiplier_keeps_a_named_samplers_own_sigmas():
    """ "DPM2 Karras" with the multiplier still drops its penultimate sigma: the same run as
    DPM2 on the Karras type, k-diffusion's recorded one (until the review of session 31 it
    kept that sigma)."""
    cfg = GenerateConfig(base="unused", sampler="DPM2 Karras", steps=20, sgm_noise_multiplier=True)
    schedule = cfg.sigma_schedule()
    assert schedule == _alpha_bar_schedule("dpm2", "Karras", 20, sgm_noise_multiplier=True)
    scheduler = make_scheduler(cfg.sampler, sd15_scheduler().config, schedule)
    scheduler.set_timesteps(20)
    x = _stepped(scheduler, _start(scheduler))
    assert relative_gap(x, SGM_RECORDED["x0"]["dpm2/Karras/20"]) < GAP


def test_sgm_noise_multiplier_is_written_read_and_refused_where_a1111_ignores_it():
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    line = "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x48"
    line += ", SGM noise multiplier: True"
    read = generate_settings(read_a1111_parameters(f"a photo of fetal brain\n{line}"), "brain")
    assert read["sgm_noise_multiplier"] is True
    with pytest.raises(ConfigError, match=r"scales the start .* 'DDIM' steps on timesteps"):
        GenerateConfig(base="unused", sampler="DDIM", sgm_noise_multiplier=True)
