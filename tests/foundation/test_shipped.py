"""The shipped fulora:phantom-sd is what its model card says, and loads without fulora."""

from __future__ import annotations

import re

from fulora.io import file_hash
from fulora.shipped import PHANTOM_SD, SHIPPED_MODELS

from .helpers import plain_diffusers_image

FOLDER = SHIPPED_MODELS[PHANTOM_SD]


def test_every_file_matches_the_sha256_in_its_model_card():
    card = (FOLDER / "MODEL_CARD.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|$", card, re.M)
    listed = {name for name, _, _ in rows}
    weights = {str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*.safetensors")}
    assert weights and weights <= listed  # every weights file is on the card
    for name, size, digest in rows:
        assert (FOLDER / name).stat().st_size == int(size.replace(",", "")), name
        assert file_hash(FOLDER / name) == digest, name


def test_it_fits_the_package_budget_and_loads_in_plain_diffusers():
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024
    pipe, image = plain_diffusers_image(FOLDER)
    assert pipe.unet.config.sample_size == [12, 16]  # 64x48 px through a factor-4 VAE
    assert image.shape == (48, 64, 3) and image.std() > 0.01
