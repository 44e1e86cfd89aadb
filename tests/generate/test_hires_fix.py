"""A1111's hires fix (latent upscalers) against k-diffusion under A1111's hires code.

Reference: ``tests/reference/a1111_hires_fix.json``, recorded by running crowsonkb/k-diffusion's
own samplers (and A1111's ``restart_sampler``) under A1111's ``sample_hr_pass``,
``sample_img2img`` and ``setup_img2img_steps``, retyped: the first pass, the latent upscaled
with ``torch.nn.functional.interpolate`` at the upscaler's mode and antialias, the pass's new
noise drawn from the seed at the upscaled shape, and the pass over the tail of a longer
schedule; the file's ``source`` field says how.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fulora.errors import ConfigError
from fulora.generate.config import GenerateConfig
from fulora.generate.hires import upscale_latents
from fulora.generate.hires_size import hires_target
from fulora.generate.samplers import (
    Img2ImgSteps,
    make_scheduler,
    own_schedule,
    resolve_schedule_type,
)
from fulora.lora.tiny import sd15_scheduler

from .analytic import relative_gap, toy_eps

_REFERENCE = Path(__file__).parents[1] / "reference"
RECORDED = json.loads((_REFERENCE / "a1111_hires_fix.json").read_text())
# Relative L2 from k-diffusion's result (fp32)
GAP = 1e-6
_SETTING = {"s_churn": "sigma_churn", "eta": "eta_ancestral"}


def _config(case: dict) -> GenerateConfig:
    settings = {_SETTING[k]: v for k, v in case.items() if k in _SETTING}
    if resolve_schedule_type(case["type"]) != own_schedule(case["sampler"]):
        settings["schedule_type"] = case["type"]
    if case["resize"] == [0, 0]:
        settings["hires_scale"] = case["scale"]
    else:
        settings["hires_resize_width"], settings["hires_resize_height"] = case["resize"]
    settings["hires_steps"] = case["hires_steps"]
    settings |= dict(denoising_strength=case["denoising_strength"], hires_upscaler=case["upscaler"])
    return GenerateConfig(base="unused", sampler=case["sampler"], steps=case["steps"], **settings)


def _scheduler(cfg: GenerateConfig):
    config = sd15_scheduler().config
    options = (cfg.sigma_schedule(), cfg.churn(), cfg.unipc_options())
    scheduler = make_scheduler(cfg.sampler, config, *options, hires=True)
    key = getattr(scheduler, "eta_setting", None)  # the step noise's eta, as generate sets it
    scheduler.eta = getattr(cfg, key) if key else getattr(scheduler, "eta", None)
    return scheduler


def _steps(scheduler, x: torch.Tensor, generator, seed: int) -> torch.Tensor:
    """The pass's steps as diffusers' pipeline takes them; the step noise the generator's."""
    scheduler.step_noise = lambda draw: torch.randn(x.shape, generator=generator)
    scheduler.noise_seeds = [seed]
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def hires_fix(cfg: GenerateConfig, seed: int, shape=(1, 4, 4, 6)) -> tuple[torch.Tensor, ...]:
    """The first pass, then the hires pass, as ``generate`` runs them: (first, hires)."""
    scheduler = _scheduler(cfg)
    scheduler.set_timesteps(cfg.steps)
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    first = _steps(scheduler, first, generator, seed)
    target = hires_target(shape[3] * 8, shape[2] * 8, cfg.hires_scale, cfg.hires_resize)
    upscaled = upscale_latents(first, target, cfg.hires_upscaler)
    generator = torch.Generator().manual_seed(seed)  # the pass's own, as A1111's new ImageRNG
    noise = torch.randn(upscaled.shape, generator=generator)
    steps = cfg.hires_steps or cfg.steps
    scheduler.img2img = Img2ImgSteps(steps, cfg.denoising_strength)
    scheduler.set_timesteps(steps)
    start = scheduler.img2img_start(upscaled, noise) * scheduler.init_noise_sigma
    return first, _steps(scheduler, start, generator, seed), scheduler


@pytest.mark.filterwarnings("ignore:Should have t")  # torchsde on float32 sigmas
@pytest.mark.parametrize("key", sorted(RECORDED["cases"]))
def test_hires_pass_is_a1111s(key):
    """14 samplers (churn and eta too), 6 latent upscalers, scales 1.25 to 2 and 5 resizes
    (one side given; both, at the first pass's aspect ratio or cut to another, the odd latent
    pixel cut from the right or bottom), denoising 0.3 to 1, hires steps 0 (the first pass's) or
    others: the hires pass calls the model at A1111's sigmas, call for call, and lands within
    1e-6 of A1111's result, at its shape."""
    case = RECORDED["cases"][key]
    first, hires, scheduler = hires_fix(_config(case), RECORDED["seed"])
    assert relative_gap(first, RECORDED["first"][key]) < GAP, key
    assert list(hires.shape) == case["shape"]
    calls = torch.tensor(RECORDED["calls"][key])
    model_sigmas = _call_sigmas(scheduler)
    assert len(model_sigmas) == len(calls), key
    assert torch.allclose(model_sigmas.float(), calls, rtol=1e-5, atol=0), key
    assert relative_gap(hires, RECORDED["x0"][key]) < GAP, key


def _call_sigmas(scheduler) -> torch.Tensor:
    """The sigma of each model call the scheduler makes (its timesteps' sigmas)."""
    if hasattr(scheduler, "_call_sigmas"):
        return scheduler._call_sigmas
    return scheduler.sigma_table().t_to_sigma(scheduler.timesteps.float())


def _generate(tiny_model, out, **settings):
    from fulora.generate.run import generate

    common = dict(planes=["brain"], per_class=2, batch_size=2, steps=4, width=48, height=32)
    common |= dict(seed=5, seed_scheme="consecutive", device="cpu", contact_sheet=0)
    record = generate(
        out, GenerateConfig(base=str(tiny_model), **(common | settings)), progress=False
    )
    images = {p.name: np.asarray(Image.open(p)) for p in sorted((out / "brain").glob("*.png"))}
    return images, record


_HIRES = dict(hires_scale=2, hires_steps=3, denoising_strength=0.6)


@pytest.mark.parametrize(
    "settings",
    [
        {"sampler": "Euler a", "rng": "nv", "eta_noise_seed_delta": 31337},
        {"sampler": "DPM++ 2M Karras", "hires_upscaler": "Latent (bicubic antialiased)"},
        {"sampler": "DPM++ SDE Karras", "variation_seed": 9, "variation_strength": 0.3},
        {"sampler": "Heun", "skip_early_cfg": 0.3},
        {"sampler": "DDIM", "eta_ddim": 0.5, "hires_steps": 4},
        {"sampler": "UniPC", "hires_steps": 4, "discard_penultimate_sigma": True},
    ],
    ids=["euler_a", "dpmpp_2m_karras", "dpmpp_sde", "heun", "ddim", "unipc"],
)
def test_hires_images_are_larger_and_each_images_own(tiny_model, tmp_path, settings):
    """Through ``generate``: the images are the hires size (2 x 48x32), other than without the
    hires pass; each image remade alone is within 1 grey level of its batch's (the pass's noise
    is each image's own: its seed, ENSD, variation seed, Brownian tree); the run's size is the
    images'."""
    settings = {**_HIRES, **settings}
    batch, record = _generate(tiny_model, tmp_path / "batch", **settings)
    alone, _ = _generate(tiny_model, tmp_path / "alone", batch_size=1, **settings)
    first_pass = {key: value for key, value in settings.items() if not key.startswith("hires")}
    first_pass.pop("denoising_strength")
    plain, _ = _generate(tiny_model, tmp_path / "plain", **first_pass)
    assert record["size"] == "96x64" and batch.keys() == alone.keys() == plain.keys()
    for key, pixels in batch.items():
        assert pixels.shape == (64, 96)
        assert np.abs(pixels.astype(int) - alone[key].astype(int)).max() <= 1
        small = np.asarray(Image.fromarray(pixels).resize((48, 32), Image.BOX)).astype(int)
        assert np.abs(small - plain[key].astype(int)).mean() > 0.5


def test_hires_settings_are_written_as_a1111_writes_them_and_read_back(tiny_model, tmp_path):
    """The PNG text keeps the first pass's Size and adds A1111's hires fields; --a1111's
    reading gives the same settings back, and they make the same pixels."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    settings = dict(sampler="Euler", hires_upscaler="Latent (nearest-exact)", **_HIRES)
    images, _ = _generate(tiny_model, tmp_path / "run", **settings)
    path = next((tmp_path / "run" / "brain").glob("*.png"))
    with Image.open(path) as image:
        text = image.text["parameters"]
    assert "Size: 48x32, " in text
    assert "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 3, " in text
    assert "Hires upscaler: Latent (nearest-exact)" in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    expected = dict(hires_scale=2.0, hires_steps=3, denoising_strength=0.6)
    expected["hires_upscaler"] = "Latent (nearest-exact)"
    assert {key: read[key] for key in expected} == expected
    from_text = {key: read[key] for key in expected}
    again, _ = _generate(tiny_model, tmp_path / "again", **{**settings, **from_text})
    assert np.array_equal(again[path.name], images[path.name])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hires_steps": 10}, "hires fix, which is off"),
        ({"denoising_strength": 0.5}, "set hires_scale"),
        ({"hires_scale": 2, "sampler": "ddim_diffusers"}, "diffusers' own"),
        ({"hires_scale": 2, "sampler": "PLMS", "hires_steps": 2}, "give 3 or more"),
        ({"hires_scale": 2, "sampler": "DDIM", "steps": 2}, "steps 2: A1111's DDIM"),
        ({"hires_scale": 2, "sampler": "UniPC", "hires_steps": 3}, "lower unipc_order"),
        ({"hires_scale": 2, "sampler": "UniPC", "unipc_legacy_steps": True}, "versions before"),
        ({"hires_scale": 2, "hires_upscaler": "SwinIR 4x"}, "latent upscalers"),
        ({"hires_scale": 2, "denoising_strength": 0}, "denoising_strength"),
        ({"hires_scale": 0.5}, "hires_scale"),
        ({"hires_scale": 2, "hires_resize_width": 64}, "set one"),
        ({"hires_resize_height": 4}, "hires_resize_height 4: give 8 or more"),
        ({"hires_scale": 2, "prompts": {"brain": "[x:(a: 1.3):35]"}}, "of the hires pass read"),
    ],
)
def test_hires_settings_fulora_does_not_run_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(base="unused", **settings)


_TEXT = "a photo\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("Denoising strength: 0.7, Hires upscale: 2, Hires schedule type: Karras", "type: Kar"),
        ("Denoising strength: 0.7, Hires resize: 0x1024, Hires prompt: x", "Hires prompt: x"),
        ("Denoising strength: 0.7, Hires upscale: 2, Hires sampler: Euler", "Hires sampler"),
        ("Denoising strength: 0.75", "img2img"),
        ("Hires upscale: 2", "no Denoising strength"),
        ("Denoising strength: 0.7, Hires upscale: 2, Hires CFG Scale: 5", "Hires CFG Scale 5"),
    ],
)
def test_a1111_hires_texts_fulora_does_not_run_are_refused(fields, message):
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    with pytest.raises(ConfigError, match=message):
        generate_settings(read_a1111_parameters(_TEXT + fields), "brain")


def test_a_hires_resize_cuts_to_its_size_and_is_written_as_a1111_writes_it(tiny_model, tmp_path):
    """ "Hires resize" 96x48 of a 48x32 first pass: upscaled to 96x64 (its aspect ratio), cut
    to 96x48 from the top and bottom; written as A1111 writes it, read back, the same pixels."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    settings = dict(sampler="Euler a", hires_resize_width=96, hires_resize_height=48)
    images, record = _generate(tiny_model, tmp_path / "run", **settings)
    assert record["size"] == "96x48"
    assert all(pixels.shape == (48, 96) for pixels in images.values())
    path = next((tmp_path / "run" / "brain").glob("*.png"))
    with Image.open(path) as image:
        text, provenance = image.text["parameters"], json.loads(image.text["fulora"])
    assert "Size: 48x32, " in text  # A1111's: the first pass's
    assert (provenance["width"], provenance["height"]) == (96, 48)  # the manifest's: the image's
    assert "Denoising strength: 0.7, Hires resize: 96x48, Hires upscaler: Latent" in text
    assert "Hires upscale:" not in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert (read["hires_resize_width"], read["hires_resize_height"]) == (96, 48)
    from_text = {key: read[key] for key in ("hires_resize_width", "hires_resize_height")}
    again, _ = _generate(tiny_model, tmp_path / "again", **{**settings, **from_text})
    assert np.array_equal(again[path.name], images[path.name])


def test_a1111_hires_text_is_read_with_its_defaults():
    """No "Hires steps" (0: the first pass's) and no "Hires upscaler" (A1111's default,
    "Latent"); a "Hires CFG Scale" equal to the CFG scale is accepted."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    text = _TEXT + "Denoising strength: 0.45, Hires upscale: 1.5, Hires CFG Scale: 7.0"
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert (read["hires_scale"], read["hires_steps"], read["hires_upscaler"]) == (1.5, 0, "Latent")
    assert read["denoising_strength"] == 0.45
    GenerateConfig(base="unused", **{k: v for k, v in read.items() if k != "per_class"})


# A1111's get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps,
# use_old_scheduling), from the scratch copy of its prompt_parser, which gave fulora's
# schedules for 2 x 10,000 random prompts (first-pass steps 1 to 30, hires steps 1 to 40), each
# read as a prompt and as a negative prompt, with the new rule and with the old (1,143 and
# 1,703 of their 20,000 sides scheduled; session 33): (prompt, first pass's steps, hires
# pass's, old rule) -> the hires pass's schedule. Its own doctests hold the first two.
A1111_HIRES_SCHEDULES = {
    ("a [b:.5] c", 10, 10, False): [(10, "a b c")],
    ("a [b:1.5] c", 10, 10, False): [(5, "a  c"), (10, "a b c")],
    ("[brain:femur:25] photo", 20, 10, False): [(5, "brain photo"), (10, "femur photo")],
    ("[brain:femur:25] photo", 20, 10, True): [(20, "brain photo")],
    ("[brain:femur:0.5] photo", 20, 8, False): [(8, "femur photo")],
    ("[brain:femur:0.5] photo", 20, 8, True): [(10, "brain photo"), (20, "femur photo")],
    ("[a|b] c", 4, 3, False): [(1, "a c"), (2, "b c"), (3, "a c")],
    ("[a:[b:c:1.25]:22]", 20, 8, False): [(2, "a"), (8, "c")],
    ("x [y::24] z", 20, 6, False): [(4, "x y z"), (6, "x  z")],
}


@pytest.mark.parametrize("case", list(A1111_HIRES_SCHEDULES))
def test_prompts_are_scheduled_over_the_hires_pass_as_a1111_schedules_them(case):
    from fulora.generate.schedules import read_prompt

    prompt, steps, hires_steps, old = case
    [part] = read_prompt(prompt, steps, old_timelines=old, hires_steps=hires_steps)
    assert list(part.schedule) == A1111_HIRES_SCHEDULES[case]


def test_a_prompts_edits_are_scheduled_anew_in_the_hires_pass(tiny_model, tmp_path):
    """Three prompts with the same first pass (brain until step 3 of 4, then femur): in the
    hires pass (3 steps) ``[A:B:3]`` and ``[A:[B:A:7]:3]`` are femur throughout (3 - 4 and
    7 - 4 = 3), the same pixels; ``[A:[B:A:5]:3]`` turns to brain after its first step, other
    pixels (a few: the tiny model's text moves its images little)."""
    brain, femur = "a photo of fetal brain", "a photo of fetal femur"
    prompts = {
        "femur": f"[{brain}:{femur}:3]",
        "femur_too": f"[{brain}:[{femur}:{brain}:7]:3]",
        "brain_again": f"[{brain}:[{femur}:{brain}:5]:3]",
    }
    settings = dict(sampler="Euler", per_class=1, **_HIRES)
    made = {
        name: _generate(tiny_model, tmp_path / name, prompts={"brain": text}, **settings)[0]
        for name, text in prompts.items()
    }
    [femur], [femur_too], [brain_again] = (list(made[name].values()) for name in prompts)
    assert np.array_equal(femur, femur_too)
    assert np.abs(femur.astype(int) - brain_again.astype(int)).max() > 0


TIMESTEPS = json.loads((_REFERENCE / "a1111_hires_timesteps.json").read_text())


def _timesteps_config(case: dict) -> GenerateConfig:
    settings = dict(hires_scale=case["scale"], hires_steps=case["hires_steps"])
    settings |= dict(denoising_strength=case["denoising_strength"], hires_upscaler=case["upscaler"])
    settings |= {"unipc_variant": case["variant"]} if "variant" in case else {}
    settings |= {"unipc_skip_type": case["skip"]} if "skip" in case else {}
    settings |= {"unipc_order": case["order"]} if "order" in case else {}
    settings |= {"discard_penultimate_sigma": True} if case.get("discard") else {}
    settings |= {"downcast_alphas_cumprod": True} if case.get("downcast") else {}
    return GenerateConfig(base="unused", sampler=case["sampler"], steps=case["steps"], **settings)


@pytest.mark.parametrize("key", sorted(TIMESTEPS["cases"]))
def test_hires_pass_of_ddim_plms_and_unipc_is_a1111s(key):
    """DDIM, PLMS and UniPC (bh1, bh2; time_uniform, logSNR, time_quadratic; discard; DDIM on
    the downcast fp16 alpha_bar, its start's roots in fp16 as A1111 takes them), 3 upscalers:
    the pass runs the model at A1111's timesteps (the lower ``hires steps - 1`` points of the
    longer grid, its start noised to the point above, as A1111 does; UniPC from that point's
    time plus 1/N), and lands within 1e-6 of A1111's result."""
    case = TIMESTEPS["cases"][key]
    cfg = _timesteps_config(case)
    first, hires, scheduler = hires_fix(cfg, TIMESTEPS["seed"])
    assert relative_gap(first, TIMESTEPS["first"][key]) < GAP, key
    assert list(hires.shape) == case["shape"]
    assert scheduler.timesteps.tolist() == pytest.approx(TIMESTEPS["calls"][key], rel=1e-5)
    assert relative_gap(hires, TIMESTEPS["x0"][key]) < GAP, key


@pytest.mark.gpu
def test_hires_images_are_each_images_own_on_cuda(tiny_model, tmp_path):
    """On CUDA (fp32) the hires pass's images alone and in a batch are within 1 grey level
    (Euler a, its step noise from the pass's GPU generators; DPM++ SDE, its trees on the GPU);
    in fp16 they are finite, and the upscale runs on the fp16 latents."""
    for sampler in ("Euler a", "DPM++ SDE"):
        settings = dict(sampler=sampler, device="cuda", rng="gpu", dtype="fp32", **_HIRES)
        runs = {size: _generate(tiny_model, tmp_path / f"{sampler}{size}", batch_size=size,
                                **settings)[0] for size in (1, 2)}  # fmt: skip
        for key, pixels in runs[1].items():
            assert pixels.shape == (64, 96)
            assert np.abs(pixels.astype(int) - runs[2][key].astype(int)).max() <= 1
    half, _ = _generate(tiny_model, tmp_path / "fp16", **{**settings, "dtype": "fp16"})
    assert all(pixels.std() > 0 for pixels in half.values())
