"""A decoded image's values become 8-bit pixels as AUTOMATIC1111 makes them (floored).

A1111 (``modules/processing.py``, ``process_images_inner``, the same in v1.0 to v1.10) turns
each decoded image into its PNG's bytes with

    x_samples_ddim = torch.stack(x_samples_ddim).float()
    x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)
    x_sample = 255. * np.moveaxis(x_sample.cpu().numpy(), 0, 2)
    x_sample = x_sample.astype(np.uint8)

which cuts 255 x to an integer; diffusers' ``VaeImageProcessor.numpy_to_pil`` rounds it, as
fulora did until session 34 (``pixel_rounding: round``).
"""

import json
from dataclasses import replace

import numpy as np
import torch
import yaml
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from fulora.generate.decode import to_uint8
from fulora.generate.run import GenerateConfig, generate, read_png_provenance

from .records import refused_then_finished, rewrite_png_records
from .test_generate import _cfg as generate_cfg


def _a1111_pixels(decoded: torch.Tensor) -> np.ndarray:
    """A1111's bytes of decoded images (N, 3, H, W in [-1, 1]), as retyped above."""
    x_samples = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return np.stack(
        [(255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8) for x in x_samples]
    )


def _decoded(seed: int = 0) -> torch.Tensor:
    """VAE-like outputs: random values past both ends, and the values on and beside each step
    between two grey levels (2 k / 255 - 1 and its neighbouring floats), where a floor and a
    round part."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.rand(2, 3, 16, 24, generator=generator) * 2.4 - 1.2
    steps = torch.arange(256, dtype=torch.float32) * 2 / 255 - 1
    halves = (torch.arange(255, dtype=torch.float32) + 0.5) * 2 / 255 - 1
    edges = torch.cat(
        [steps, halves, steps.nextafter(torch.tensor(2.0)), halves.nextafter(torch.tensor(-2.0))]
    )
    edges = torch.cat([edges, torch.zeros(3 * 16 * 24 - len(edges))]).reshape(1, 3, 16, 24)
    return torch.cat([spread, edges])


def test_floored_pixels_are_automatic1111s_and_rounded_ones_diffusers():
    decoded = _decoded()
    images = VaeImageProcessor().postprocess(decoded, output_type="np")  # what fulora decodes to
    assert np.array_equal(to_uint8(images, "floor"), _a1111_pixels(decoded))
    rounded = np.stack([np.asarray(img) for img in VaeImageProcessor.numpy_to_pil(images)])
    assert np.array_equal(to_uint8(images, "round"), rounded)
    # the two part on about half of the random values (those whose 255 x ends in .5 or more)
    floored, rounded = to_uint8(images, "floor")[:2], to_uint8(images, "round")[:2]
    apart = (rounded.astype(int) - floored) != 0
    assert set(np.unique(rounded.astype(int) - floored)) == {0, 1} and 0.35 < apart.mean() < 0.65


def _cfg(tiny_model, **kw):
    """test_generate's settings: one plane, three images alone, in RGB (the bytes as decoded)."""
    one_plane = dict(planes=["brain"], per_class=3, batch_size=1, contact_sheet=0, color="RGB")
    return generate_cfg(tiny_model, **one_plane | kw)


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*/*.png"))}


def test_generated_pixels_are_floored_by_default_and_say_so(tiny_model, tmp_path):
    assert GenerateConfig(base="unused").pixel_rounding == "floor"
    generate(tmp_path / "floor", _cfg(tiny_model), progress=False)
    generate(tmp_path / "round", _cfg(tiny_model, pixel_rounding="round"), progress=False)
    floored, rounded = _pixels(tmp_path / "floor"), _pixels(tmp_path / "round")
    assert floored.keys() == rounded.keys()
    gaps = np.concatenate([(rounded[k] - floored[k]).ravel() for k in floored])
    assert set(np.unique(gaps)) == {0, 1} and 0.3 < gaps.mean() < 0.7  # the same latents
    for name in ("floor", "round"):
        png = next((tmp_path / name).glob("*/*.png"))
        assert read_png_provenance(png)["pixel_rounding"] == name
        assert json.loads((tmp_path / name / "done.json").read_text())["pixel_rounding"] == name


def _as_made_before_session_34(out) -> None:
    """Rewrite a ``round`` run's records as fulora wrote them before ``pixel_rounding``."""
    rewrite_png_records(
        out, lambda record: {k: v for k, v in record.items() if k != "pixel_rounding"}
    )
    for name, load, dump in (
        ("config.yaml", yaml.safe_load, yaml.safe_dump),
        ("done.json", json.loads, json.dumps),
    ):
        record = load((out / name).read_text())
        del record["pixel_rounding"]
        (out / name).write_text(dump(record))


def test_images_rounded_before_session_34_are_finished_rounded_not_floored(tiny_model, tmp_path):
    """A run made before the floor became the default, resumed with the same command, would
    mix rounded and floored images; finished, it would say its rounded images were floored."""
    out = tmp_path / "out"
    cfg = _cfg(tiny_model)
    generate(out, replace(cfg, pixel_rounding="round"), progress=False)
    _as_made_before_session_34(out)
    old = replace(cfg, pixel_rounding="round")
    message = r"rounded to 8 bits by 'round'.*--pixel-rounding round"
    record, _ = refused_then_finished(out, cfg, old, message)
    assert record["pixel_rounding"] == "round"
