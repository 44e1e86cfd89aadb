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


# --------------------------------------------------------------------------------------------
# Prompt editing and AND. Reference: A1111's CFGDenoiser.forward and combine_denoised: at its
# call counted c, each AND part's and the negative prompt's conditioning for c
# (reconstruct_multicond_batch, reconstruct_cond_batch), and the guided prediction
# uncond + g * sum(weight * (part - uncond)); here each part's and the negative's prediction is
# the UNet on its own tokens alone.


def _scheduled(unet, tokens: int, seeds: list[int], ends: list[int]):
    from fulora.generate.guidance import Scheduled

    device, dtype = _where(unet)
    hidden = torch.cat([_text(unet, tokens, seed) for seed in seeds]).to(device, dtype)
    return Scheduled(tuple(ends), hidden)


def _where(unet) -> tuple[torch.device, torch.dtype]:
    weight = next(unet.parameters())
    return weight.device, weight.dtype


def _pipeline_call(unet, conditioning, images: int, calls: int):
    """The UNet called as diffusers' pipeline calls it under guidance, ``calls`` times."""
    from fulora.generate.guidance import guided

    size = unet.config.sample_size
    x = torch.randn(images, unet.config.in_channels, size, size, generator=torch.Generator())
    x = x.to(*_where(unet))
    positive, negative = conditioning.first()
    positive, negative, _ = padded_sides(positive, negative)
    hidden = torch.cat([negative.repeat(images, 1, 1), positive.repeat(images, 1, 1)])
    outputs = []
    with torch.no_grad(), guided(unet, conditioning, images):
        for _ in range(calls):
            outputs.append(unet(torch.cat([x, x]), 500, encoder_hidden_states=hidden).sample)
    return x, outputs


def _and_guided_and_alone(unet):
    """(the hooks' output, each part and the negative alone combined as A1111 combines them)."""
    from fulora.generate.guidance import Conditioning, stacked_parts

    parts = [(1.0, _scheduled(unet, 154, [1], [3])), (-0.5, _scheduled(unet, 77, [2], [3]))]
    conditioning = Conditioning(stacked_parts(parts), _scheduled(unet, 77, [3], [3]))
    x, [out] = _pipeline_call(unet, conditioning, images=2, calls=1)
    with torch.no_grad():

        def alone(hidden):
            return unet(x, 500, encoder_hidden_states=hidden.repeat(2, 1, 1)).sample

        uncond = alone(conditioning.negative.at(0))
        # A1111 repeats a shorter part's last embedding (stack_conds): real tokens, not masked
        short = parts[1][1].at(0)
        padded = torch.cat([short, short[:, -1:].expand(-1, 77, -1)], dim=1)
        expected = uncond + (alone(parts[0][1].at(0)) - uncond) - 0.5 * (alone(padded) - uncond)
    return out, torch.cat([uncond, expected])


def test_and_parts_are_guided_as_automatic1111_combines_them(unet):
    out, expected = _and_guided_and_alone(unet)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_and_parts_are_guided_as_automatic1111_combines_them_in_fp16_on_cuda():
    """The same in fp16 on a GPU: the negative prompt's 77 tokens masked in a batch with the
    parts' 154, under whichever SDPA kernel takes the mask."""
    half = tiny_components(seed=0)["unet"].eval().to("cuda", torch.float16)
    out, expected = _and_guided_and_alone(half)
    assert bool(torch.isfinite(out).all())
    # fp16 rounding, as for the masked batch alone (outputs up to about 1.3)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_each_call_is_conditioned_on_its_step_of_the_schedule(unet):
    """Edited prompt '[a:b:1]' and negative '[c|d]' over 3 steps: A1111's calls 0, 1, 2 use
    a, a, b and c, c, d."""
    from fulora.generate.guidance import Conditioning

    prompt = _scheduled(unet, 77, [1, 2], [1, 3])
    negative = _scheduled(unet, 77, [3, 4, 3], [1, 2, 3])
    conditioning = Conditioning(((1.0, prompt),), negative)
    assert not conditioning.plain
    x, outputs = _pipeline_call(unet, conditioning, images=1, calls=3)
    for call, (entry, negative_entry) in enumerate([(0, 0), (0, 0), (1, 1)]):
        with torch.no_grad():
            hidden = torch.cat(
                [
                    negative.embeddings[negative_entry : negative_entry + 1],
                    prompt.embeddings[entry : entry + 1],
                ]
            )
            expected = unet(torch.cat([x, x]), 500, encoder_hidden_states=hidden)
        torch.testing.assert_close(outputs[call], expected.sample, atol=1e-5, rtol=1e-5)
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_without_guidance_an_edited_prompt_is_the_only_row(unet):
    from fulora.generate.guidance import Conditioning, guided

    prompt = _scheduled(unet, 77, [1, 2], [1, 3])
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator())
    with torch.no_grad():
        with guided(unet, Conditioning(((1.0, prompt),), None), images=2):
            outputs = [unet(x, 500, prompt.at(0).repeat(2, 1, 1)).sample for _ in range(3)]
        expected = [
            unet(x, 500, prompt.embeddings[i : i + 1].repeat(2, 1, 1)).sample for i in (0, 0, 1)
        ]
    for out, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
