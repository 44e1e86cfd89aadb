"""Guidance between a prompt and a negative prompt of different chunk counts.

Reference: AUTOMATIC1111's ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py, its
default "Pad prompt/negative prompt" off) runs the UNet on each side alone when their lengths
differ; here the alone passes are diffusers' UNet on each side's own tokens.
"""

import pytest
import torch

from fulora.generate.guidance import cross_attention_mask, padded_sides
from fulora.lora.tiny import tiny_components


@pytest.fixture(scope="module")
def unet():
    return tiny_components(seed=0)["unet"].eval()


def _text(unet, tokens: int, seed: int) -> torch.Tensor:
    width = unet.config.cross_attention_dim
    return torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed))


def _alone_and_masked(unet, sides, dtype=torch.float32):
    """(each side alone, both in one masked batch, both padded): the UNet at one timestep."""
    device = next(unet.parameters()).device
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator())
    latents = latents.to(device, dtype)
    sides = [side.to(device, dtype) for side in sides]
    with torch.no_grad():
        alone = [unet(latents[i : i + 1], 500, side).sample for i, side in enumerate(sides[::-1])]
        positive, negative, keep = padded_sides(*sides)
        assert positive.shape == negative.shape
        assert positive.shape == (1, max(s.shape[1] for s in sides), sides[0].shape[2])
        with cross_attention_mask(unet, keep):
            batch = unet(latents, 500, torch.cat([negative, positive])).sample
        unmasked = unet(latents, 500, torch.cat([negative, positive])).sample
    return torch.cat(alone), batch, unmasked


@pytest.mark.parametrize(("positive", "negative"), [(154, 77), (77, 231)])
def test_a_masked_batch_equals_each_side_alone(unet, positive, negative):
    alone, batch, unmasked = _alone_and_masked(
        unet, [_text(unet, positive, 1), _text(unet, negative, 2)]
    )
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    # unmasked, the padding changes the shorter side's result
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def test_sides_of_one_length_are_left_as_they_are(unet):
    positive, negative = _text(unet, 77, 1), _text(unet, 77, 2)
    same = padded_sides(positive, negative)
    assert same[0] is positive and same[1] is negative and same[2] is None


def test_the_mask_is_gone_after_the_block_an_error_included(unet):
    keep = torch.ones(1, 77, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="stop"), cross_attention_mask(unet, keep):
        assert len(unet._forward_pre_hooks) == 1
        raise RuntimeError("stop")
    assert not unet._forward_pre_hooks


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["MATH", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_the_masked_batch_equals_each_side_alone_in_fp16_on_cuda(unet, kernel):
    """On a GPU the UNet runs in fp16 and SDPA picks a kernel; a mask rules out flash
    attention, and each kernel that takes one must still give each side its own result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    half = tiny_components(seed=0)["unet"].eval().to("cuda", torch.float16)
    sides = [_text(unet, 154, 1), _text(unet, 77, 2)]
    with sdpa_kernel([getattr(SDPBackend, kernel), SDPBackend.MATH]):
        alone, batch, _ = _alone_and_masked(half, sides, torch.float16)
    # fp16 rounding: the CPU in fp16 gave them 1.7e-3 apart at most (outputs up to 1.3)
    torch.testing.assert_close(batch, alone, atol=5e-3, rtol=5e-3)
