"""A1111's hires fix with an image upscaler ("None", "Lanczos", "Nearest").

A1111's ``sample_hr_pass`` decodes the first pass, floors it to 8 bits, resizes each image
with ``images.resize_image(0, ...)`` and the upscaler's ``Upscaler.upscale`` (recorded from a
scratch transcription, ``tests/reference/a1111_hires_resize.json``), and encodes it again
(``images_tensor_to_samples``), its VAE's sample drawn from torch's global generator, which its
``ImageRNG`` seeded with the last image's seed. The pass itself is the latent upscalers'
(``test_hires_fix.py``).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fulora.errors import ConfigError
from fulora.generate.config import GenerateConfig
from fulora.generate.hires import encode_images, upscale_image
from fulora.generate.hires_size import hires_target

from .test_hires_fix import _generate

RESIZES = json.loads(
    (Path(__file__).parents[1] / "reference" / "a1111_hires_resize.json").read_text()
)


def _input(case: dict) -> np.ndarray:
    """The recording's input image of a case (its source says how it was made)."""
    w, h = case["size"]
    if case["image"] == "noise":
        return np.random.default_rng([34, case["case"]]).integers(0, 256, (h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    wave = np.sin(xx / 5.0)[..., None] * np.cos(yy / 7.0)[..., None] * np.array([1, 0.8, 0.6])
    return (127 + 120 * wave).astype(np.uint8)


@pytest.mark.parametrize(
    "case",
    RESIZES["cases"],
    ids=[
        f"{c['size'][0]}x{c['size'][1]}-{c['scale'] or c['resize']}-{c['image']}-{c['upscaler']}"
        for c in RESIZES["cases"]
    ],
)
def test_image_upscalers_resize_as_automatic1111(case):
    """The same bytes, at A1111's hr_upscale_to_x and _y (whole: 100x60 for 80x48 at 1.25,
    where the latent upscalers take 96x56). Lanczos differs from None in 14 of the 28 inputs
    (its resize by the scale, then to the multiple of 8 below, then to the size); where the
    first pass covers that multiple of 8 already (80x48 to 84x50, to 86x51), v1.8+ does not
    resize it by the scale, as A1111 before v1.8 did."""
    width, height = case["size"]
    scale, resize = case["scale"] or None, tuple(case["resize"])
    target = hires_target(width, height, scale, resize)
    assert list(target.resized) == case["target"]
    resized = upscale_image(Image.fromarray(_input(case)), *target.resized, case["upscaler"])
    assert hashlib.sha256(np.asarray(resized).tobytes()).hexdigest() == case["sha256"]


@pytest.fixture(scope="module")
def tiny_vae(tiny_model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval()


@pytest.mark.parametrize("skipped", [(), (4, 5, 7)])
def test_the_vaes_sample_is_drawn_as_automatic1111_draws_it(tiny_vae, skipped):
    """A1111's ``DiagonalGaussianDistribution.sample``: ``mean + std * torch.randn(mean.shape)``
    from the global generator, which its ImageRNG seeded with the seed (at batch size 1; and
    drew "Seed resize from"'s noise from, with its CPU source: ``skipped``). The mean alone,
    or a draw not skipped, is other latents."""
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    seeds = [11, 4_000_000_000]
    latents = encode_images(tiny_vae, pixels, seeds, skipped)
    with torch.no_grad():
        latents = latents.clone()
        for image, seed, latent in zip(pixels, seeds, latents, strict=True):
            torch.manual_seed(seed)  # A1111's rng.randn -> manual_seed, as its ImageRNG seeds
            if skipped:
                torch.randn(skipped)
            posterior = tiny_vae.encode(image[None] * 2 - 1).latent_dist
            drawn = posterior.mean + posterior.std * torch.randn(posterior.mean.shape)
            assert torch.equal(latent[None], drawn * tiny_vae.config.scaling_factor)
            mean_only = posterior.mean * tiny_vae.config.scaling_factor
            assert (latent[None] - mean_only).abs().max() > 1e-3
        if skipped:
            assert not torch.equal(latents, encode_images(tiny_vae, pixels, seeds))


_HIRES = dict(hires_scale=2, hires_steps=3, denoising_strength=0.6)


@pytest.mark.parametrize(
    "settings",
    [
        {"sampler": "Euler a", "hires_upscaler": "Lanczos"},
        {"sampler": "DPM++ 2M Karras", "hires_upscaler": "Nearest", "rng": "cpu"},
        {"sampler": "DDIM", "hires_upscaler": "None", "hires_steps": 4},
        {
            "sampler": "Euler",
            "hires_upscaler": "Lanczos",
            "seed_resize_from_width": 64,
            "seed_resize_from_height": 40,
        },
    ],
    ids=["euler_a_lanczos", "dpmpp_2m_nearest", "ddim_none", "euler_seed_resize"],
)
def test_image_upscaled_hires_images_are_each_images_own_and_read_back(
    tiny_model, tmp_path, settings
):
    """Through ``generate``: the hires size; each image remade alone within 1 grey level of its
    batch's (its VAE sample from its own seed); other pixels than the latent upscaler's; the
    PNG text names the upscaler as A1111 writes it, and read back remakes the image."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    settings = {**_HIRES, **settings}
    batch, record = _generate(tiny_model, tmp_path / "batch", **settings)
    alone, _ = _generate(tiny_model, tmp_path / "alone", batch_size=1, **settings)
    latent, _ = _generate(
        tiny_model, tmp_path / "latent", **{**settings, "hires_upscaler": "Latent"}
    )
    assert record["size"] == "96x64"
    for key, pixels in batch.items():
        assert pixels.shape == (64, 96)
        assert np.abs(pixels.astype(int) - alone[key].astype(int)).max() <= 1
        assert np.abs(pixels.astype(int) - latent[key].astype(int)).mean() > 0.5
    path = next((tmp_path / "batch" / "brain").glob("*.png"))
    with Image.open(path) as image:
        text = image.text["parameters"]
    assert f"Hires upscaler: {settings['hires_upscaler']}" in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert read["hires_upscaler"] == settings["hires_upscaler"]
    again, _ = _generate(tiny_model, tmp_path / "again", **{**settings, **read, "prompts": {}})
    # remade alone, from its own seed: as the batch's within 1 grey level
    assert np.abs(again[path.name].astype(int) - batch[path.name].astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hires_upscaler": "Lanczos", "rng": "nv"}, r"NV source leaves unseeded"),
        ({"hires_upscaler": "R-ESRGAN 4x+"}, r"weights fulora does not load"),
        ({"hires_upscaler": "lanczos"}, r"'lanczos'.*None, Lanczos, Nearest"),
    ],
)
def test_image_upscalers_fulora_cannot_run_as_a1111_does_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(base="unused", **_HIRES, **settings)


@pytest.mark.gpu
def test_image_upscaled_hires_images_are_each_images_own_on_cuda(tiny_model, tmp_path):
    """On CUDA (fp32) an image upscaler's pass alone and in a batch are within 1 grey level
    (the VAE's sample from each image's seed on the CPU, as A1111 draws it, moved to the GPU);
    in fp16, where the VAE encodes and samples in half precision, they are finite."""
    settings = dict(sampler="Euler a", hires_upscaler="Lanczos", device="cuda", **_HIRES)
    runs = {
        size: _generate(
            tiny_model, tmp_path / str(size), batch_size=size, dtype="fp32", **settings
        )[0]
        for size in (1, 2)
    }
    for key, pixels in runs[1].items():
        assert pixels.shape == (64, 96)
        assert np.abs(pixels.astype(int) - runs[2][key].astype(int)).max() <= 1
    half, _ = _generate(tiny_model, tmp_path / "fp16", dtype="fp16", **settings)
    assert all(pixels.std() > 0 for pixels in half.values())


@pytest.mark.parametrize(
    ("version", "upscale", "refused"),
    [
        ("v1.7.0", "1.05", True),  # 80x48 to 84x50: it covers 80x48, the eighths of 84x50
        ("v1.8.0", "1.05", False),
        ("v1.7.0", "2", False),  # 160x96: upscaled by both versions
        ("", "1.05", False),  # no Version: the newest
    ],
)
def test_a1111_texts_whose_version_resized_otherwise_are_refused(version, upscale, refused):
    """A1111 before v1.8 resized a first pass by the scale even where it already covered the
    scaled size cut to a multiple of 8; v1.8+ (and fulora) only resizes it to the size."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    text = (
        "a photo\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 80x48, "
        f"Denoising strength: 0.7, Hires upscale: {upscale}, Hires upscaler: Lanczos"
        + (f", Version: {version}" if version else "")
    )
    if refused:
        with pytest.raises(ConfigError, match=r"v1\.7\.0, whose Lanczos upscaler resized a 80x48"):
            generate_settings(read_a1111_parameters(text), "brain")
    else:
        assert (
            generate_settings(read_a1111_parameters(text), "brain")["hires_upscaler"] == "Lanczos"
        )
