"""What fulora says of a base model before it loads it: the size it was trained at."""

import logging

import pytest

from fulora.generate.run import GenerateConfig, plan
from fulora.lora.base import far_from_native, load_pipeline, native_size
from fulora.shipped import PHANTOM_SD


@pytest.mark.parametrize(
    ("size", "far"),
    [
        ((64, 48), False),  # its own
        ((128, 96), False),  # 4 times its pixels: a hires pass's, or A1111's 2x
        ((32, 24), False),  # a quarter
        ((136, 96), True),
        ((24, 16), True),
        ((576, 384), True),  # the paper recipe's commonest bucket: 72 times
    ],
)
def test_a_size_far_from_the_base_models_own_is_warned_of(size, far):
    """A LoRA trained, or images made, at 512 px on fulora:phantom-sd (64x48) once went on
    silently, for minutes per batch on a CPU, to images the model never learnt."""
    assert native_size(PHANTOM_SD) == (64, 48)
    warning = far_from_native(PHANTOM_SD, *size, "the images' size")
    assert (warning is not None) == far
    if far:
        assert f"the images' size {size[0]}x{size[1]} px" in warning and "64x48" in warning
    if size == (576, 384):
        assert "72 times the pixels" in warning


def test_generation_warns_of_a_size_far_from_the_base_models_own(caplog):
    with caplog.at_level(logging.WARNING, logger="fulora"):
        plan(GenerateConfig(base=PHANTOM_SD, width=512, height=512, planes=["brain"]))
    assert "512x512 px holds 85.3 times the pixels of 64x48" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fulora"):
        plan(GenerateConfig(base=PHANTOM_SD, planes=["brain"]))  # its own size, by default
    assert "times the pixels" not in caplog.text


def test_loading_a_model_raises_no_deprecation_of_the_dtype_argument(tiny_model):
    """diffusers 0.42 deprecates ``torch_dtype`` (0.39 reads no other), with a warning that
    would come with every command; the weights still take the dtype asked for."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(tiny_model, dtype=torch.float16)
    assert not [w for w in caught if "torch_dtype" in str(w.message)]
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float16}
