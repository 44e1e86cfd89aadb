"""A1111's UniPC against A1111's own code: its times, its steps since v1.6, its settings.

Reference: ``tests/reference/a1111_unipc.json``, recorded by A1111 v1.6+'s
``sd_samplers_timesteps_impl.unipc`` over its vendored ``uni_pc.py`` (retyped in a scratch
script), run as its ``CompVisSampler.sample`` runs it; the file's ``source`` field says how.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fulora.errors import ConfigError
from fulora.generate.config import GenerateConfig
from fulora.generate.samplers import make_scheduler
from fulora.lora.tiny import sd15_scheduler

from .analytic import relative_gap, toy_eps

_REFERENCE = Path(__file__).parents[1] / "reference"
RECORDED = json.loads((_REFERENCE / "a1111_unipc.json").read_text())
# Relative L2 from A1111's result (fp32): measured at most 5.6e-7, but 1.2e-5 and 2.3e-5 at
# orders 5 and 4, whose linear solves amplify the rounding of each estimate's log-SNR ratio
GAP = {4: 5e-5, 5: 5e-5}


def _config(case: dict, **more) -> GenerateConfig:
    return GenerateConfig(
        base="unused",
        sampler="UniPC",
        steps=case["steps"],
        unipc_variant=case["variant"],
        unipc_skip_type=case["skip_type"],
        unipc_order=case["order"],
        unipc_lower_order_final=case["lower_order_final"],
        discard_penultimate_sigma=case["discard"],
        **more,
    )


def _run(cfg: GenerateConfig):
    """The scheduler for ``cfg`` stepped as diffusers' pipeline steps it, from the noise."""
    from test_parity import KDIFFUSION_NOISE

    scheduler = make_scheduler(
        cfg.sampler, sd15_scheduler().config, cfg.sigma_schedule(), None, cfg.unipc_options()
    )
    scheduler.set_timesteps(cfg.steps)
    x = torch.tensor(KDIFFUSION_NOISE, dtype=torch.float32).reshape(1, 4, 2, 2)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return scheduler, x


@pytest.mark.parametrize("key", sorted(RECORDED["cases"]))
def test_unipc_is_automatic1111s(key):
    """Each case (10 to 30 steps, bh1, bh2 and vary_coeff, the three skip types, orders 1 to 5,
    lower order final off, "Discard penultimate sigma"): the model called at A1111's
    fractional timesteps, as many times (31 for 30 steps, 28 for 27, 32 with the discard),
    and the result within 1e-6."""
    case = RECORDED["cases"][key]
    scheduler, x = _run(_config(case))
    assert scheduler.timesteps.tolist() == pytest.approx(RECORDED["calls"][key], abs=1e-4)
    assert len(scheduler.timesteps) == case["unipc_steps"]
    assert relative_gap(x, RECORDED["x0"][key]) < GAP.get(case["order"], 1e-6), key


@pytest.mark.parametrize("key", sorted(RECORDED["options"]))
def test_unipc_with_a1111s_alpha_bar_options_is_automatic1111s(key):
    """With A1111's "Downcast alphas_cumprod" (v1.6+ takes the log of the fp16 alpha_bar in
    fp16, its sampler before v1.6 a float32 copy of it) and "Zero Terminal SNR": the same
    timesteps, and the result within 1e-6."""
    option, steps, skip = key.split("/")
    cfg = GenerateConfig(
        base="unused",
        sampler="UniPC",
        steps=int(steps),
        unipc_skip_type=skip,
        downcast_alphas_cumprod=option.startswith("downcast"),
        zero_terminal_snr=option == "zero_terminal_snr",
        unipc_legacy_steps=option == "downcast_before_v16",
    )
    scheduler, x = _run(cfg)
    recorded = RECORDED["options"][key]
    assert scheduler.timesteps.tolist() == pytest.approx(recorded["calls"], abs=1e-4)
    assert relative_gap(x, recorded["x0"]) < 1e-6, key


def test_unipc_before_v16_takes_the_steps_asked():
    """A1111 before v1.6 (its old UniPC sampler, wl-zhao's stable-diffusion example, recorded
    in ``tests/test_parity.py`` from another scratch run) took 30 UniPC steps for 30: with
    ``unipc_legacy_steps`` fulora's is within 1e-6 of it, and v1.6's 31 steps are not."""
    from test_parity import A1111_UNIPC_X0

    case = RECORDED["cases"]["30/bh1/time_uniform/3/True/False"]
    scheduler, x = _run(_config(case, unipc_legacy_steps=True))
    assert len(scheduler.timesteps) == 30
    assert relative_gap(x, A1111_UNIPC_X0) < 1e-6
    assert relative_gap(_run(_config(case))[1], A1111_UNIPC_X0) > 1e-5


def test_diffusers_own_unipc_is_not_a1111s():
    """diffusers' UniPC as fulora ran it until session 32 (its rounded timesteps, 30 steps for
    30): 8e-5 from A1111 v1.6+'s on this analytic model (more on a real one)."""
    case = RECORDED["cases"]["30/bh1/time_uniform/3/True/False"]
    _, x = _run(GenerateConfig(base="unused", sampler="unipc_diffusers", steps=30))
    assert relative_gap(x, RECORDED["x0"]["30/bh1/time_uniform/3/True/False"]) > 1e-5
    assert case["unipc_steps"] == 31


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"unipc_order": 5, "steps": 4}, "needs 5 UniPC steps or more"),
        ({"steps": 2}, "unipc_order 3 needs 3 UniPC steps"),
        ({"steps": 1001}, "at most 1000"),
        ({"sampler": "Euler", "unipc_skip_type": "logSNR"}, "'Euler' .*sampler: unipc"),
        ({"unipc_order": 51}, "unipc_order"),
    ],
)
def test_unipc_settings_a1111_would_not_run_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(base="unused", **({"sampler": "UniPC"} | settings))


def test_a1111_unipc_texts_are_read_as_their_version_ran_them():
    """A text of A1111 before v1.6 ran UniPC for its steps, and wrote its settings where they
    were not the defaults; since v1.6 it runs as many steps as its grid has."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    text = "fetal brain\nSteps: 20, Sampler: UniPC, CFG scale: 7, Seed: 1, Size: 64x64"
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert not read["unipc_legacy_steps"] and "unipc_variant" not in read
    old = (
        f"{text}, UniPC variant: bh2, UniPC skip type: logSNR, UniPC order: 2, "
        "UniPC lower order final: False, Version: v1.5.1"
    )
    read = generate_settings(read_a1111_parameters(old), "brain")
    assert (read["unipc_variant"], read["unipc_skip_type"], read["unipc_order"]) == (
        "bh2",
        "logSNR",
        2,
    )
    assert read["unipc_legacy_steps"] and not read["unipc_lower_order_final"]
    assert read["downcast_alphas_cumprod"]  # as A1111 reads every text before v1.7.0-225
    assert read["pad_conds"] == "v0"  # its UniPC padded the shorter side so before v1.6
    GenerateConfig(base="unused", **{k: v for k, v in read.items() if k != "per_class"})


def test_ddim_and_plms_texts_before_v16_are_refused():
    """A1111 before v1.6 ran DDIM and PLMS as CompVis's samplers (every point of its grid,
    the last step to timestep 0): not the v1.6 ones fulora runs, so such a text is refused
    rather than remade otherwise; v1.6's are read."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    text = "fetal brain\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64"
    for version, refused in (("v1.5.2", True), ("v1.6.0", False)):
        parameters = read_a1111_parameters(f"{text}, Version: {version}")
        if refused:
            with pytest.raises(ConfigError, match="v1.5.2, whose DDIM was CompVis's sampler"):
                generate_settings(parameters, "brain")
        else:
            assert generate_settings(parameters, "brain")["sampler"] == "ddim"


def test_unipc_settings_are_written_as_a1111_wrote_them(tiny_model, tmp_path):
    """Through ``generate``: UniPC at its defaults writes none of its settings; other ones are
    written as A1111 wrote them and read back; the images differ from the defaults'."""
    import numpy as np

    from fulora.generate.infotext import generate_settings, read_a1111_parameters
    from fulora.generate.run import generate

    common = dict(planes=["brain"], per_class=1, steps=6, width=64, height=48, sampler="UniPC")
    common |= dict(seed=5, seed_scheme="consecutive", device="cpu", contact_sheet=0)
    runs = {"default": {}, "bh2": {"unipc_variant": "bh2", "unipc_order": 2}}
    pixels, texts = {}, {}
    for name, settings in runs.items():
        cfg = GenerateConfig(base=str(tiny_model), **(common | settings))
        generate(tmp_path / name, cfg, progress=False)
        with Image.open(next((tmp_path / name / "brain").glob("*.png"))) as image:
            texts[name], pixels[name] = image.text["parameters"], np.asarray(image).astype(int)
    assert "UniPC variant" not in texts["default"] and "UniPC order" not in texts["default"]
    assert "UniPC variant: bh2, UniPC order: 2, " in texts["bh2"]
    read = generate_settings(read_a1111_parameters(texts["bh2"]), "brain")
    assert (read["unipc_variant"], read["unipc_order"]) == ("bh2", 2)
    assert np.abs(pixels["bh2"] - pixels["default"]).mean() > 0.1


def test_a_run_made_with_diffusers_unipc_is_finished_with_it():
    """Images whose record names diffusers' UniPC scheduler (fulora's UniPC until session 32)
    are the ``unipc_diffusers`` sampler's, so a rerun does not mix them with A1111's."""
    from fulora.generate.run import _sampler_that_made

    old = {"sampler": "unipc", "scheduler": "UniPCMultistepScheduler"}
    assert _sampler_that_made(old) == "unipc_diffusers"
    assert _sampler_that_made({"sampler": "unipc", "scheduler": "A1111UniPCScheduler"}) == "unipc"


@pytest.mark.gpu
def test_unipc_variants_run_on_cuda_in_fp16(tiny_model, tmp_path):
    """On CUDA in fp16 each UniPC variant (its schedule and solves computed in fp32 on the
    CPU, the steps on the GPU) makes finite images, as A1111 v1.6+ steps them."""
    import numpy as np

    from fulora.generate.run import generate

    common = dict(planes=["brain"], per_class=2, steps=8, width=64, height=48, sampler="UniPC")
    common |= dict(seed=5, device="cuda", dtype="fp16", rng="gpu", contact_sheet=0)
    for variant in ("bh1", "bh2", "vary_coeff"):
        cfg = GenerateConfig(base=str(tiny_model), **common, unipc_variant=variant)
        generate(tmp_path / variant, cfg, progress=False)
        for path in sorted((tmp_path / variant).rglob("*.png")):
            assert np.asarray(Image.open(path)).std() > 0, (variant, path)
