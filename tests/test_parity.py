"""Parity with the paper's tools, checked against code fulora did not write.

* **kohya-ss sd-scripts** (what trained the paper's LoRAs). The answers below were recorded by
  running kohya's own code, commit 48d368fa of github.com/kohya-ss/sd-scripts, on this
  project's inputs: ``library/train_util.py`` ``BucketManager.select_bucket`` and
  ``library/model_util.py`` ``make_bucket_resolutions`` for the bucket tables, and
  ``networks/lora.py`` ``create_network(1.0, 128, 128, None, text_encoder, unet)`` on kohya's own
  SD1.5 UNet (``library/original_unet.py``) and the CLIP ViT-L/14 text encoder, built on the meta
  device, for the module names and parameter count; ``trim_and_resize_if_required`` for the
  training images' pixels. None of kohya's code is in this repository.
* **plain diffusers** (``StableDiffusionPipeline.load_lora_weights`` / ``set_adapters`` /
  ``fuse_lora``), loading the files fulora writes.
* **transformers** CLIP hidden states, for clip skip as kohya and AUTOMATIC1111 define it
  (hidden state ``n`` layers from the end, then the final layer norm).
* **diffusers' scheduler overview**, for AUTOMATIC1111 sampler names, and AUTOMATIC1111's
  ``modules/shared_options.py`` for its UniPC defaults.
* **kohya's** ``precalculate_safetensors_hashes`` (the LoRA file's header hashes) and
  **AUTOMATIC1111's** ``addnet_hash_safetensors`` and ``parse_generation_parameters`` (the hash
  it lists a LoRA under; its PNG Info reading a fulora image's settings), run on this
  project's inputs with the answers recorded below.
* **AUTOMATIC1111's** prompt parser, tokenization and default emphasis (``prompt_parser.py``,
  ``sd_hijack_clip.py``, ``sd_emphasis.py``), run on this project's prompts and shipped model.
* **diffusers' single-file loader** (``from_single_file``), reading a checkpoint in the original
  layout, as AUTOMATIC1111 users hold SD1.5, as the same model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from fulora.config import load_config
from fulora.lora.buckets import make_buckets, select_bucket
from fulora.lora.clip_layout import kohya_layout, model_path
from fulora.lora.data import build_examples
from fulora.lora.targets import kohya_module_name
from fulora.lora.train import LoraTrainConfig, add_lora_adapters

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Buckets: kohya's BucketManager answers, (resolution, step, upscale, image size) ->
# (bucket, resized size). upscale=False is kohya's bucket_no_upscale (the paper's setting);
# upscale=True uses kohya's fixed bucket list with min/max bucket sides 256/1024 at 512 px and
# 256/1536 at 768 px. The eleven 512/64 sizes from (384, 259) to (1495, 787) are the sizes of
# the paper's 100 LoRA images.
# --------------------------------------------------------------------------------------------
KOHYA_BUCKETS = [
    (512, 64, False, (64, 64), (64, 64), (64, 64)),
    (512, 64, False, (100, 90), (64, 64), (100, 90)),
    (512, 64, False, (300, 800), (256, 768), (300, 800)),
    (512, 64, False, (384, 259), (384, 256), (384, 259)),
    (512, 64, False, (480, 640), (384, 512), (384, 512)),
    (512, 64, False, (500, 2000), (256, 1024), (256, 1024)),
    (512, 64, False, (512, 512), (512, 512), (512, 512)),
    (512, 64, False, (513, 511), (512, 448), (513, 511)),
    (512, 64, False, (640, 392), (640, 384), (640, 392)),
    (512, 64, False, (640, 480), (512, 384), (512, 384)),
    (512, 64, False, (647, 381), (640, 320), (647, 381)),
    (512, 64, False, (692, 480), (576, 384), (576, 400)),
    (512, 64, False, (740, 448), (640, 384), (640, 387)),
    (512, 64, False, (768, 519), (576, 384), (576, 389)),
    (512, 64, False, (777, 333), (768, 320), (777, 333)),
    (512, 64, False, (800, 600), (512, 384), (512, 384)),
    (512, 64, False, (959, 661), (576, 384), (576, 397)),
    (512, 64, False, (961, 498), (576, 320), (618, 320)),
    (512, 64, False, (961, 663), (576, 384), (576, 397)),
    (512, 64, False, (1024, 1024), (512, 512), (512, 512)),
    (512, 64, False, (1137, 787), (576, 384), (576, 399)),
    (512, 64, False, (1280, 720), (640, 384), (683, 384)),
    (512, 64, False, (1495, 787), (576, 320), (608, 320)),
    (512, 64, False, (1920, 1080), (640, 384), (683, 384)),
    (512, 64, False, (2000, 500), (1024, 256), (1024, 256)),
    (512, 64, True, (64, 64), (512, 512), (512, 512)),
    (512, 64, True, (100, 90), (512, 512), (569, 512)),
    (512, 64, True, (300, 800), (320, 768), (320, 853)),
    (512, 64, True, (384, 259), (640, 384), (640, 432)),
    (512, 64, True, (480, 640), (448, 576), (448, 597)),
    (512, 64, True, (500, 2000), (256, 1024), (256, 1024)),
    (512, 64, True, (512, 512), (512, 512), (512, 512)),
    (512, 64, True, (513, 511), (512, 512), (514, 512)),
    (512, 64, True, (640, 392), (640, 384), (640, 392)),
    (512, 64, True, (640, 480), (576, 448), (597, 448)),
    (512, 64, True, (647, 381), (640, 384), (652, 384)),
    (512, 64, True, (692, 480), (576, 448), (646, 448)),
    (512, 64, True, (740, 448), (640, 384), (640, 387)),
    (512, 64, True, (768, 519), (640, 384), (640, 433)),
    (512, 64, True, (777, 333), (768, 320), (768, 329)),
    (512, 64, True, (800, 600), (576, 448), (597, 448)),
    (512, 64, True, (959, 661), (576, 448), (650, 448)),
    (512, 64, True, (961, 498), (640, 384), (741, 384)),
    (512, 64, True, (961, 663), (576, 448), (649, 448)),
    (512, 64, True, (1024, 1024), (512, 512), (512, 512)),
    (512, 64, True, (1137, 787), (576, 448), (647, 448)),
    (512, 64, True, (1280, 720), (640, 384), (683, 384)),
    (512, 64, True, (1495, 787), (640, 384), (729, 384)),
    (512, 64, True, (1920, 1080), (640, 384), (683, 384)),
    (512, 64, True, (2000, 500), (1024, 256), (1024, 256)),
    (768, 32, False, (64, 64), (64, 64), (64, 64)),
    (768, 32, False, (100, 90), (96, 64), (100, 90)),
    (768, 32, False, (300, 800), (288, 800), (300, 800)),
    (768, 32, False, (480, 640), (480, 640), (480, 640)),
    (768, 32, False, (500, 2000), (384, 1536), (384, 1536)),
    (768, 32, False, (512, 512), (512, 512), (512, 512)),
    (768, 32, False, (513, 511), (512, 480), (513, 511)),
    (768, 32, False, (640, 480), (640, 480), (640, 480)),
    (768, 32, False, (777, 333), (768, 320), (777, 333)),
    (768, 32, False, (800, 600), (800, 576), (800, 600)),
    (768, 32, False, (1024, 1024), (768, 768), (768, 768)),
    (768, 32, False, (1280, 720), (1024, 576), (1024, 576)),
    (768, 32, False, (1920, 1080), (1024, 576), (1024, 576)),
    (768, 32, False, (2000, 500), (1536, 384), (1536, 384)),
    (768, 32, True, (64, 64), (768, 768), (768, 768)),
    (768, 32, True, (100, 90), (800, 736), (818, 736)),
    (768, 32, True, (300, 800), (448, 1248), (468, 1248)),
    (768, 32, True, (480, 640), (672, 864), (672, 896)),
    (768, 32, True, (500, 2000), (384, 1536), (384, 1536)),
    (768, 32, True, (512, 512), (768, 768), (768, 768)),
    (768, 32, True, (513, 511), (768, 768), (771, 768)),
    (768, 32, True, (640, 480), (864, 672), (896, 672)),
    (768, 32, True, (777, 333), (1152, 512), (1195, 512)),
    (768, 32, True, (800, 600), (864, 672), (896, 672)),
    (768, 32, True, (1024, 1024), (768, 768), (768, 768)),
    (768, 32, True, (1280, 720), (1024, 576), (1024, 576)),
    (768, 32, True, (1920, 1080), (1024, 576), (1024, 576)),
    (768, 32, True, (2000, 500), (1536, 384), (1536, 384)),
]
# kohya's make_bucket_resolutions((512, 512), 256, 1024, 64)
KOHYA_BUCKET_LIST_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]  # fmt: skip
# kohya's buckets of the paper's 100 images with the paper's config (bucket_no_upscale).
KOHYA_PAPER_BUCKETS = {(576, 384): 66, (640, 384): 28, (576, 320): 3, (384, 256): 2, (640, 320): 1}


@pytest.mark.parametrize(
    ("resolution", "step", "upscale", "size", "bucket", "resized"), KOHYA_BUCKETS
)
def test_buckets_equal_kohyas(resolution, step, upscale, size, bucket, resized):
    max_side = 1024 if resolution == 512 else 1536
    choice = select_bucket(
        size,
        resolution=resolution,
        step=step,
        upscale=upscale,
        buckets=make_buckets(resolution, step, min_side=256, max_side=max_side),
    )
    assert (choice.bucket, choice.resized) == (bucket, resized)


def test_bucket_list_equals_kohyas():
    assert make_buckets(512, 64, min_side=256, max_side=1024) == KOHYA_BUCKET_LIST_512


def test_paper_images_land_in_kohyas_buckets(sample_data):
    from fulora.data.readers import read_any

    cfg = load_config(LoraTrainConfig, REPO / "configs" / "lora-paper.yaml")
    examples = build_examples(read_any(sample_data / "spain_lora_train"), cfg)
    assert len(examples) == 100
    assert Counter(e.bucket for e in examples) == KOHYA_PAPER_BUCKETS
    # the generation default follows: the most common training bucket
    assert Counter(e.bucket for e in examples).most_common(1)[0][0] == (576, 384)


# --------------------------------------------------------------------------------------------
# Shrinking a training image to its bucket: kohya's trim_and_resize_if_required (sd-scripts
# 48d368fa, library/train_util.py, with library/utils.py resize_image: OpenCV's INTER_AREA when
# shrinking), run from a scratch script with opencv-python-headless 5.0.0.93 on images loaded
# as kohya loads them (PIL, RGB). SHA-256 (first 16 hex) of its output array's bytes.
# --------------------------------------------------------------------------------------------
KOHYA_RESIZED_PAPER = {  # (bucket, resized) from the bucket table above
    "abdomen/Patient00305_Plane2_1_of_2.png": ((576, 384), (576, 399), "81c6d973ee75d3ad"),
    "brain/Patient00216_Plane3_5_of_5.png": ((576, 384), (576, 397), "751ebcc2a98d9150"),
    "femur/Patient00305_Plane5_1_of_1.png": ((576, 384), (576, 399), "b810b93393be1ab0"),
}
# uniform noise, numpy.random.default_rng(h * 10000 + w).integers(0, 256, (h, w, 3), uint8):
# fractional factors, whole factors (OpenCV's integer path: 2x2 and 3x3), and the paper's
# largest image size
KOHYA_RESIZED_NOISE = {
    ((200, 288), (64, 44), (64, 40)): "65c51d4b4b96fe13",
    ((96, 128), (64, 48), (64, 48)): "4c3ee3c1ce4a09ae",
    ((99, 99), (33, 33), (32, 32)): "eaf73d9d176e37c3",
    ((787, 1495), (640, 337), (640, 320)): "f6297bbbcce85cb9",
}


def _hash16(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize(("shape", "resized", "bucket"), list(KOHYA_RESIZED_NOISE))
def test_images_shrink_to_their_bucket_as_kohya_shrinks_them(shape, resized, bucket):
    """The same bytes as kohya's (OpenCV's INTER_AREA); PIL's BOX filter (fulora's until
    session 25, still ``resize: box``) gives others."""
    from fulora.lora.buckets import BucketChoice, fit_to_bucket

    h, w = shape
    noise = np.random.default_rng(h * 10000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    choice = BucketChoice(bucket, resized)
    img, kohyas = Image.fromarray(noise), KOHYA_RESIZED_NOISE[(shape, resized, bucket)]
    assert _hash16(fit_to_bucket(img, choice)) == kohyas
    assert _hash16(fit_to_bucket(img, choice, "box")) != kohyas


def test_paper_images_shrink_to_their_bucket_as_kohya_shrinks_them(sample_data):
    from fulora.lora.buckets import BucketChoice, fit_to_bucket

    for name, (bucket, resized, expected) in KOHYA_RESIZED_PAPER.items():
        img = Image.open(sample_data / "spain_lora_train" / name).convert("RGB")
        assert select_bucket(img.size) == BucketChoice(bucket, resized)
        assert _hash16(fit_to_bucket(img, BucketChoice(bucket, resized))) == expected, name


# --------------------------------------------------------------------------------------------
# Which modules get a LoRA: kohya's networks/lora.py on SD1.5, rank 128, alpha 128.
# --------------------------------------------------------------------------------------------
KOHYA_SD15_MODULES = {
    "unet": (192, "bdfc29d0bf3d9ac65c7fa59ebed1e95ebdcacaa740eb561446353b489c14244c"),
    "text_encoder": (72, "8da961b9692b4294b54cc39cbeef6b3917cc9450df998138dca1ff9f56c308ee"),
}  # count and sha256 of kohya's lora_name list, sorted and joined by newlines
KOHYA_SD15_PARAMS = 75_497_472
# The attention-only set on SD1.5 (diffusers' LoRA example scripts): 128 + 48 modules.
ATTENTION_SD15 = ({"unet": 128, "text_encoder": 48}, 34_947_072)


def _lora_layers_sd15(preset: str) -> dict[str, list[str]]:
    """Module names wrapped by the paper recipe on SD1.5's architecture, built on meta."""
    from accelerate import init_empty_weights
    from peft.tuners.lora import LoraLayer

    from fulora.lora.tiny import sd15_components

    cfg = load_config(LoraTrainConfig, REPO / "configs" / "lora-paper.yaml")
    assert (cfg.rank, cfg.alpha, cfg.targets) == (128, 128.0, "kohya")
    cfg.targets = preset
    with init_empty_weights():
        parts = sd15_components()
        add_lora_adapters(parts["unet"], parts["text_encoder"], cfg)
    out = {}
    for part in ("unet", "text_encoder"):
        model = parts[part]
        out[part] = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        out[f"{part}_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return out


def test_paper_recipe_wraps_kohyas_modules_on_sd15():
    layers = _lora_layers_sd15("kohya")
    for part, (count, digest) in KOHYA_SD15_MODULES.items():
        names = sorted(kohya_module_name(part, n) for n in layers[part])
        assert len(names) == count
        assert hashlib.sha256("\n".join(names).encode()).hexdigest() == digest, part
    assert layers["unet_params"] + layers["text_encoder_params"] == KOHYA_SD15_PARAMS
    assert "down_blocks.0.attentions.0.proj_in" in layers["unet"]
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in layers["unet"]
    wrapped = {kohya_layout("text_encoder", name) for name in layers["text_encoder"]}
    assert "text_model.encoder.layers.11.mlp.fc1" in wrapped


def test_attention_only_is_a_named_option():
    layers = _lora_layers_sd15("attention")
    counts, params = ATTENTION_SD15
    assert {p: len(layers[p]) for p in counts} == counts
    assert layers["unet_params"] + layers["text_encoder_params"] == params
    assert not any(n.endswith(("ff.net.2", "proj_in", "fc1")) for p in counts for n in layers[p])


def _lora_weights(tiny_model, **cfg) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pipe = _pipe(tiny_model)
    add_lora_adapters(pipe.unet, pipe.text_encoder, LoraTrainConfig(rank=8, alpha=8, **cfg))
    named = [
        (n, p.detach()) for m in (pipe.unet, pipe.text_encoder) for n, p in m.named_parameters()
    ]
    return [p for n, p in named if "lora_A" in n], [p for n, p in named if "lora_B" in n]


def test_lora_init_is_kohyas(tiny_model):
    """kohya: down = kaiming_uniform_(a=sqrt(5)), so |w| <= 1/sqrt(fan_in); up = 0."""
    downs, ups = _lora_weights(tiny_model)
    assert len(downs) == 48 + 18 and all(float(p.abs().max()) == 0.0 for p in ups)
    for weight in downs:
        bound = 1 / weight[0].numel() ** 0.5  # fan_in = in_features (x 1 x 1 for a 1x1 conv)
        assert 0.5 * bound < float(weight.abs().max()) <= bound + 1e-7


def test_gaussian_init_is_a_named_option(tiny_model):
    downs, ups = _lora_weights(tiny_model, init="gaussian")  # peft: down ~ N(0, 1/rank)
    assert all(float(p.abs().max()) == 0.0 for p in ups)
    assert abs(float(torch.cat([p.flatten() for p in downs]).std()) - 1 / 8) < 0.01


# --------------------------------------------------------------------------------------------
# Files fulora writes, loaded by plain diffusers.
# --------------------------------------------------------------------------------------------
RANK, ALPHA, SCALE = 8, 4.0, 0.5


def _pipe(tiny_model):
    return StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )


def _outputs(pipe):
    """Text-encoder hidden states and UNet output on fixed inputs (fp32, CPU)."""
    ids = pipe.tokenizer(
        ["a photo of fetal brain"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        latents = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
        unet_out = pipe.unet(latents, torch.tensor([500]), hidden).sample
    return hidden, unet_out


@pytest.fixture(scope="module")
def saved_lora(tiny_model, tmp_path_factory):
    """fulora's files for the default targets, rank 8, alpha 4, random (non-zero) weights, and
    the in-memory model's outputs at scale 0.5 (its up matrices halved)."""
    from fulora.lora.formats import save_lora_files

    pipe = _pipe(tiny_model)
    unet_lora, te_lora = add_lora_adapters(
        pipe.unet, pipe.text_encoder, LoraTrainConfig(rank=RANK, alpha=ALPHA)
    )
    generator = torch.Generator().manual_seed(1)
    for module in (pipe.unet, pipe.text_encoder):
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.2
    out = tmp_path_factory.mktemp("parity") / "lora"
    save_lora_files(
        out, pipe.unet, pipe.text_encoder, unet_lora, te_lora, output_name="k", save_dtype="fp32"
    )
    for module in (pipe.unet, pipe.text_encoder):
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data *= SCALE
    return out, _outputs(pipe)


@pytest.mark.parametrize(
    "which, name",
    [("k.safetensors", None), (".", None), (".", "k.safetensors")],
    ids=["kohya-file", "diffusers-folder", "kohya-offline-form"],
)
def test_plain_diffusers_loads_the_whole_lora(saved_lora, tiny_model, which, name, hub_offline):
    from peft.tuners.lora import LoraLayer

    folder, (hidden, unet_out) = saved_lora
    pipe = _pipe(tiny_model)
    base_hidden, base_unet = _outputs(pipe)
    # The README's forms: a file or folder online; folder + weight_name, the one diffusers
    # takes with HF_HUB_OFFLINE=1
    hub_offline(name is not None)
    kwargs = {"weight_name": name} if name else {}
    pipe.load_lora_weights(str((folder / which).resolve()), adapter_name="x", **kwargs)
    pipe.set_adapters(["x"], adapter_weights=[SCALE])
    wrapped = {
        part: sum(isinstance(m, LoraLayer) for m in getattr(pipe, part).modules())
        for part in ("unet", "text_encoder")
    }
    assert wrapped == {"unet": 48, "text_encoder": 18}  # every module, not a silent subset
    new_hidden, new_unet = _outputs(pipe)
    assert (base_unet - unet_out).abs().max() > 1e-2  # the LoRA matters...
    torch.testing.assert_close(new_hidden, hidden, atol=1e-5, rtol=1e-5)  # ...and survives
    torch.testing.assert_close(new_unet, unet_out, atol=1e-5, rtol=1e-5)


def test_diffusers_file_uses_one_naming_scheme(saved_lora):
    tensors = load_file(str(saved_lora[0] / "pytorch_lora_weights.safetensors"))
    assert all(
        k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora_B." in k)
        for k in tensors
    )
    assert sum(".lora_A." in k for k in tensors) == 48 + 18


@pytest.mark.parametrize("fuse", [False, True], ids=["adapter", "fused"])
@pytest.mark.parametrize("text_encoder_scale", [None, -0.3], ids=["one-scale", "te-apart"])
def test_scale_is_applied_once(saved_lora, tiny_model, fuse, text_encoder_scale):
    """scale s: every wrapped layer computes (W + s * alpha/rank * up @ down) x, from the file,
    as A1111's network_lora computes it; the text encoder's at its own multiplier when A1111's
    ``<lora:name:te:unet>`` gives one."""
    from fulora.lora.formats import load_lora_into

    folder, _ = saved_lora
    kohya = load_file(str(folder / "k.safetensors"))
    base = _pipe(tiny_model)
    pipe = _pipe(tiny_model)
    load_lora_into(
        pipe, folder / "k.safetensors", scale=0.8, text_encoder_scale=text_encoder_scale, fuse=fuse
    )
    scales = {"unet": 0.8, "text_encoder": 0.8 if text_encoder_scale is None else -0.3}
    for part, name in [
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("unet", "down_blocks.0.attentions.0.proj_in"),  # a 1x1 convolution
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc2"),
    ]:
        key = kohya_module_name(part, name)
        up, down = kohya[f"{key}.lora_up.weight"], kohya[f"{key}.lora_down.weight"]
        alpha = float(kohya[f"{key}.alpha"])
        assert alpha == ALPHA and down.shape[0] == RANK
        original = getattr(base, part).get_submodule(model_path(getattr(base, part), name))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(original.weight.shape)
        expected = original.weight + scales[part] * (alpha / RANK) * delta
        module = getattr(pipe, part).get_submodule(model_path(getattr(pipe, part), name))
        if original.weight.dim() == 2:
            x = torch.randn(2, original.weight.shape[1])
            reference = F.linear(x, expected, original.bias)
        else:
            x = torch.randn(2, original.weight.shape[1], 3, 3)
            reference = F.conv2d(x, expected, original.bias)
        with torch.no_grad():
            torch.testing.assert_close(module(x), reference, atol=1e-5, rtol=1e-5)
        if fuse:
            torch.testing.assert_close(module.weight, expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Clip skip: both halves of classifier-free guidance, as kohya and AUTOMATIC1111 encode them.
# --------------------------------------------------------------------------------------------
def _clip_reference(tiny_model, texts: list[str], clip_skip: int) -> torch.Tensor:
    """transformers' CLIP: hidden state clip_skip layers from the end, then the final norm."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_model / "text_encoder", dtype=torch.float32)
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        # transformers 5 flattened CLIPTextModel: the final norm is its own module there
        return getattr(model, "text_model", model).final_layer_norm(states[-clip_skip])


def _capture_unet_conditioning(monkeypatch, module) -> list[torch.Tensor]:
    """Record the encoder_hidden_states of every UNet call of pipelines ``module`` loads."""
    seen: list[torch.Tensor] = []
    original = module.load_pipeline

    def load(*args, **kwargs):
        pipe = original(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(
                (kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)).clone()
            ),
            with_kwargs=True,
        )
        return pipe

    monkeypatch.setattr(module, "load_pipeline", load)
    return seen


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_generation_encodes_the_negative_prompt_at_the_same_clip_skip(
    tiny_model, tmp_path, monkeypatch, clip_skip
):
    from fulora.generate import run as generate_module

    seen = _capture_unet_conditioning(monkeypatch, generate_module)
    cfg = generate_module.GenerateConfig(
        base=str(tiny_model),
        planes=["brain"],
        per_class=1,
        steps=2,
        width=32,
        height=32,
        negative_prompt="blurry image",
        clip_skip=clip_skip,
        device="cpu",
        contact_sheet=0,
    )
    generate_module.generate(tmp_path / "gen", cfg, progress=False)
    negative, positive = seen[0].chunk(2)  # diffusers stacks [unconditional, conditional]
    expected = _clip_reference(tiny_model, ["blurry image", "a photo of fetal brain"], clip_skip)
    torch.testing.assert_close(negative[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(positive[0], expected[1], atol=1e-5, rtol=1e-5)


def test_training_samples_encode_the_empty_prompt_at_the_training_clip_skip(
    tiny_model, lora_images, tmp_path, monkeypatch
):
    from fulora.data.readers import read_any
    from fulora.lora import train as train_module

    seen = _capture_unet_conditioning(monkeypatch, train_module)
    cfg = LoraTrainConfig(
        base=str(tiny_model),
        rank=4,
        alpha=4,
        resolution=64,
        bucket_step=16,
        repeats=1,
        max_steps=1,
        optimizer="adamw",
        train_text_encoder=False,  # the text encoder stays the base one: a fixed reference
        sample_steps=1,
        clip_skip=2,
    )
    train_module.train_lora(read_any(lora_images), tmp_path / "run", cfg, progress=False)
    # The sample grid's calls: both planes in one batch with CFG, [2 negatives, 2 positives];
    # the training calls have batch 1.
    sampling = [h for h in seen if h.shape[0] == 4]
    assert sampling
    expected = _clip_reference(tiny_model, [""], 2)[0]
    for hidden in sampling:
        for negative in hidden[:2]:
            torch.testing.assert_close(negative, expected, atol=1e-5, rtol=1e-5)


def test_generation_takes_clip_skip_from_the_lora(trained_lora, tiny_model):
    from fulora.generate.run import GenerateConfig, plan
    from fulora.lora.formats import read_lora

    assert read_lora(trained_lora / "phantom_lora.safetensors").metadata["ss_clip_skip"] == "2"
    common = dict(base=str(tiny_model), lora=str(trained_lora))
    assert plan(GenerateConfig(**common)).clip_skip == 2
    assert plan(GenerateConfig(**common, clip_skip=1)).clip_skip == 1
    assert plan(GenerateConfig(base=str(tiny_model))).clip_skip == 1  # A1111's default
    # the run's diffusers file carries kohya's training entries too (until session 35 it had
    # none: generating with it took clip skip 1, other images than its kohya file's)
    diffusers_file = trained_lora / "pytorch_lora_weights.safetensors"
    assert read_lora(diffusers_file).metadata["ss_clip_skip"] == "2"
    assert plan(GenerateConfig(base=str(tiny_model), lora=str(diffusers_file))).clip_skip == 2


# --------------------------------------------------------------------------------------------
# Cached latents: kohya caches vae.encode(x).latent_dist.sample(), not the mean.
# --------------------------------------------------------------------------------------------
def test_cached_latents_are_draws_from_the_vae_distribution(tiny_model):
    from fulora.lora.data import cache_latents as _cache_latents

    vae = _pipe(tiny_model).vae
    images = [
        torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)
    ]

    class Pixels:
        def __len__(self):
            return len(images)

        def pixels(self, i):
            return images[i]

    scaling = vae.config.scaling_factor
    draws = _cache_latents(vae, Pixels(), LoraTrainConfig(), "cpu", False)
    again = _cache_latents(vae, Pixels(), LoraTrainConfig(), "cpu", False)
    means = _cache_latents(vae, Pixels(), LoraTrainConfig(cached_latent="mean"), "cpu", False)
    for i, image in enumerate(images):
        with torch.no_grad():
            dist = vae.encode(image[None]).latent_dist
        torch.testing.assert_close(means[i], dist.mean[0] * scaling)
        z = (draws[i] / scaling - dist.mean[0]) / dist.std[0]  # a standard normal draw
        assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.3
        torch.testing.assert_close(draws[i], again[i])  # seeded: a rerun caches the same


# --------------------------------------------------------------------------------------------
# Samplers by AUTOMATIC1111's names (diffusers' scheduler overview maps them).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a1111", "scheduler", "settings"),
    [
        ("Euler a", "A1111EulerAncestralScheduler", {"timestep_spacing": "linspace"}),
        ("Euler", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
        ("UniPC", "A1111UniPCScheduler", {"solver_type": "bh1", "solver_order": 3}),
        ("UniPC (diffusers)", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3}),
        ("DPM++ 2M Karras", "A1111DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("DPM++ 2M", "A1111DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
        ("DPM++ 2M Karras (diffusers)", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("DDIM", "A1111DDIMScheduler", {}),
        ("PLMS", "A1111PLMSScheduler", {}),
        ("DDIM (diffusers)", "DDIMScheduler", {}),
        ("PNDM (diffusers)", "PNDMScheduler", {}),
    ],
)
def test_a1111_sampler_names(tiny_model, a1111, scheduler, settings):
    from fulora.generate.samplers import display_name, make_scheduler, resolve_sampler

    made = make_scheduler(a1111, _pipe(tiny_model).scheduler.config)
    assert type(made).__name__ == scheduler
    assert {k: made.config[k] for k in settings} == settings
    assert display_name(resolve_sampler(a1111)) == a1111


def test_unknown_sampler_lists_both_kinds_of_names():
    from fulora.errors import ConfigError
    from fulora.generate.samplers import resolve_sampler

    with pytest.raises(ConfigError, match=r"euler_a \('Euler a'\)"):
        resolve_sampler("Euler b")


# --------------------------------------------------------------------------------------------
# The hash AUTOMATIC1111 lists a LoRA under, and its PNG Info reading a fulora image. Recorded
# by running kohya's precalculate_safetensors_hashes (sd-scripts 48d368fa,
# library/train_util.py) on _hashing_example, and AUTOMATIC1111's addnet_hash_safetensors
# (modules/hashes.py) and parse_generation_parameters (modules/infotext_utils.py, commit
# 0365002, its settings at their defaults) on the files and text below.
# --------------------------------------------------------------------------------------------
def _hashing_example() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Fixed kohya tensors over 1.1 MB (kohya's legacy hash reads 64 KiB at 1 MiB), metadata."""
    values = (torch.arange(400 * 1000) % 251 / 251 - 0.5).to(torch.float16)
    module = "lora_unet_mid_block_attentions_0_proj_in"
    tensors = {
        f"{module}.alpha": torch.tensor(8.0),
        f"{module}.lora_down.weight": values.reshape(400, 1000),
        f"{module}.lora_up.weight": values.flip(0).reshape(1000, 400),
    }
    return tensors, {"ss_network_dim": "400", "ss_clip_skip": "2", "fulora_size": "64x48"}


KOHYA_MODEL_HASH = "f7637d3dab64002415e7ed3928835039d63e1177dfd1723d003ab46590017c2a"
KOHYA_LEGACY_HASH = "9ad5c726"
# AUTOMATIC1111's addnet_hash_safetensors of the same tensors saved with other metadata
A1111_ADDNET_HASH = "f7637d3dab64002415e7ed3928835039d63e1177dfd1723d003ab46590017c2a"


def test_kohya_file_hashes_are_kohyas(tmp_path):
    """kohya writes sshs_model_hash and sshs_legacy_hash; AUTOMATIC1111 lists the LoRA under
    the first, which is also its own hash of the file's bytes after the header."""
    from fulora.lora.formats import kohya_hashes, read_lora, save_kohya, webui_lora_hash

    tensors, metadata = _hashing_example()
    assert kohya_hashes(tensors, metadata) == (KOHYA_MODEL_HASH, KOHYA_LEGACY_HASH)
    path = save_kohya(tmp_path / "fetal.safetensors", tensors, metadata, dtype=None)
    written = read_lora(path).metadata
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == (
        KOHYA_MODEL_HASH,
        KOHYA_LEGACY_HASH,
    )
    assert webui_lora_hash(path, written) == webui_lora_hash(path, {}) == KOHYA_MODEL_HASH


def test_a_lora_without_kohyas_hashes_is_hashed_as_automatic1111_does(tmp_path):
    """A diffusers-layout file has no sshs_model_hash: AUTOMATIC1111 hashes the bytes after
    the header, so the header's metadata does not change it (the file's sha256 would)."""
    from safetensors.torch import save_file

    from fulora.io import file_hash
    from fulora.lora.formats import webui_lora_hash

    tensors, _ = _hashing_example()
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert webui_lora_hash(path, {"format": "pt"}) == A1111_ADDNET_HASH
    assert file_hash(path) != A1111_ADDNET_HASH


# What AUTOMATIC1111's parse_generation_parameters returned for A1111_TEXT (the defaults it
# fills in for settings a text lacks, hires fix, inpainting and schedules, left out; a missing
# "RNG" it reads as "GPU"). Its "Version" is none A1111 parses, so none of its
# back-compatibility switches for old versions turns on.
A1111_TEXT = (
    "a photo of fetal brain, 2D <lora:fetal,lora v2:0.8>\n"
    "Negative prompt: blurry, text: none\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2671683630, Size: 512x384, "
    'Model hash: e1441589a6, Model: "sd15, pruned: v1-5", Clip skip: 2, RNG: CPU, '
    'Lora hashes: "fetallora v2: f7637d3dab64", Version: fulora 0.1.0'
)
A1111_READS = {
    "Prompt": "a photo of fetal brain, 2D <lora:fetal,lora v2:0.8>",
    "Negative prompt": "blurry, text: none",
    "Steps": "30",
    "Sampler": "DPM++ 2M Karras",
    "CFG scale": "7",
    "Seed": "2671683630",
    "Size-1": "512",
    "Size-2": "384",
    "Model hash": "e1441589a6",
    "Model": "sd15, pruned: v1-5",
    "Clip skip": "2",
    "RNG": "CPU",
    "Lora hashes": "fetallora v2: f7637d3dab64",
    "Version": "fulora 0.1.0",
}


def test_automatic1111_reads_back_every_setting_of_a_fulora_image():
    """The PNG's parameters text, with a model name holding a comma and a colon (A1111 quotes
    such a value; unquoted, it read back as Model "sd15" and a setting "pruned")."""
    from fulora.generate.output import a1111_parameters
    from fulora.generate.run import GenerateConfig, _Plan

    cfg = GenerateConfig(
        base="unused", steps=30, guidance=7.0, lora_scale=0.8, negative_prompt="blurry, text: none"
    )
    row = {
        "prompt": "a photo of fetal brain, 2D",
        "negative_prompt": cfg.negative_prompt,
        "sampler": "dpmpp_2m_karras",
        "seed": 2671683630,
        "width": 512,
        "height": 384,
        "base_model": "sd15, pruned: v1-5",
        "clip_skip": 2,
        "fulora_version": "0.1.0",
        "variation_seed": None,
        "seed_resize_from": "",
    }
    resolved = _Plan(
        planes=["brain"],
        prompts={"brain": row["prompt"]},
        width=512,
        height=384,
        lora=Path("/loras/fetal,lora v2.safetensors"),
        lora_sha256="0" * 64,  # the file's sha256 is not what A1111 lists a LoRA under
        batch_size=8,
        lora_webui_hash=KOHYA_MODEL_HASH,
    )
    assert a1111_parameters(row, cfg, "e1441589a6" + "0" * 54, resolved) == A1111_TEXT
    assert A1111_READS["Model"] == row["base_model"]
    assert A1111_READS["Lora hashes"] == f"fetallora v2: {KOHYA_MODEL_HASH[:12]}"
    assert A1111_READS["Prompt"].startswith(row["prompt"])
    assert A1111_READS["Negative prompt"] == cfg.negative_prompt
    assert A1111_READS["RNG"] == "CPU"  # the noise source of test_initial_noise_is_a1111s_cpu_noise


# AUTOMATIC1111's infotext_utils.parse_generation_parameters (its reading: the prompt, the
# negative prompt and the settings line; the defaults it fills in left out), run from a
# scratch transcription outside the repository on each text. Two scratch runs on 20,000 random
# texts each (prompts, "Negative prompt:", keys, quotes, escapes, sizes, newlines) read every
# one alike.
A1111_PARSED = [
    (
        "a photo of fetal brain\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, "
        "Size: 512x512, Model hash: 45dee52b",
        {"Prompt": "a photo of fetal brain", "Negative prompt": "", "Steps": "20"}
        | {"Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512"}
        | {"Size-2": "512", "Model hash": "45dee52b"},
    ),
    (
        "fetal brain,\n(skull:1.2)\nNegative prompt: blurry\ntext, watermark\nSteps: 30, "
        "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1, Size: 768x512, "
        "Clip skip: 2",
        {"Prompt": "fetal brain,\n(skull:1.2)", "Negative prompt": "blurry\ntext, watermark"}
        | {"Steps": "30", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5"}
        | {"Seed": "1", "Size-1": "768", "Size-2": "512", "Clip skip": "2"},
    ),
    (
        "\n\nfetal femur\nNegative prompt:\nSteps: 20, Sampler: UniPC, CFG scale: 7",
        {"Prompt": "fetal femur", "Negative prompt": "", "Steps": "20", "Sampler": "UniPC"}
        | {"CFG scale": "7"},
    ),
    (
        "just a prompt, with: a colon",
        {"Prompt": "just a prompt, with: a colon"} | {"Negative prompt": ""},
    ),
    (
        'p\nSteps: 20, Sampler: "Euler a", CFG scale: 7, Key: , Hires upscale: 2, '
        'Hires resize: 1024x768, Note: "say \\"hi\\", ok"',
        {"Prompt": "p", "Negative prompt": "", "Steps": "20", "Sampler": "Euler a"}
        | {"CFG scale": "7", "Hires upscale": "2", "Hires resize-1": "1024"}
        | {"Hires resize-2": "768", "Note": 'say "hi", ok'},
    ),
    (
        "p\nNegative prompt: a\nNegative prompt: b\nSteps: 20, Seed: 3, Size: 64x48",
        {"Prompt": "p", "Negative prompt": "a\nb", "Steps": "20", "Seed": "3", "Size-1": "64"}
        | {"Size-2": "48"},
    ),
    (A1111_TEXT, A1111_READS),  # fulora's own text, as A1111 reads it
]


@pytest.mark.parametrize(("text", "parsed"), A1111_PARSED)
def test_a1111_settings_text_is_read_as_automatic1111_reads_it(text, parsed):
    from fulora.generate.infotext import read_a1111_parameters

    read = read_a1111_parameters(text)
    assert {"Prompt": read.prompt, "Negative prompt": read.negative_prompt} | read.fields == parsed


@pytest.mark.parametrize(
    ("sampler", "written"),
    [
        ("dpmpp_2m", "Sampler: DPM++ 2M, Schedule type: Uniform, "),
        ("dpmpp_2m_karras", "Sampler: DPM++ 2M Karras, "),  # A1111 v1.9+ splits off "Karras"
        ("euler", "Sampler: Euler, "),
    ],
)
def test_the_text_names_the_schedule_where_a1111s_default_differs(sampler, written):
    """AUTOMATIC1111 v1.9+ gives "DPM++ 2M" Karras sigmas by default (sd_samplers_kdiffusion.py:
    ``('DPM++ 2M', 'sample_dpmpp_2m', ['k_dpmpp_2m'], {'scheduler': 'karras'})``) and reads a
    text without "Schedule type" as "Automatic", that default (infotext_utils.py). fulora's
    DPM++ 2M is k-diffusion's ``get_sigmas``, which A1111's sd_schedulers.py calls "Uniform";
    without the setting, pasting its settings into A1111 made a Karras image."""
    from fulora.generate.output import a1111_parameters
    from fulora.generate.run import GenerateConfig, _Plan

    row = {"prompt": "p", "negative_prompt": "", "sampler": sampler, "seed": 1, "width": 64}
    row |= {"height": 64, "base_model": "m", "clip_skip": 1, "fulora_version": "0.1.0"}
    row |= {"variation_seed": None, "seed_resize_from": ""}
    resolved = _Plan(["brain"], {"brain": "p"}, 64, 64, lora=None, lora_sha256="", batch_size=1)
    text = a1111_parameters(row, GenerateConfig(base="unused", steps=30), "", resolved)
    assert f"Steps: 30, {written}CFG scale: 7, " in text


# AUTOMATIC1111 modules/rng.py randn() with its RNG setting "CPU" (what fulora's PNGs say), the
# noise ImageRNG.first() starts an image from: seed 2671683630, a 512x384 SD1.5 image, latent
# shape (4, 48, 64). Values at (channel, row, column) and the sum, recorded by running that
# function (from a scratch script outside the repository) with stubs for its settings.
A1111_CPU_NOISE = {(0, 0, 0): 0.74126816, (0, 0, 1): 0.7993626, (1, 20, 30): 0.37893444}
A1111_CPU_NOISE_SUM = 124.0145663


def test_initial_noise_is_a1111s_cpu_noise():
    """An A1111 user who pastes a fulora image's settings starts from the same noise."""
    from fulora.generate.noise import ImageNoise

    sd15_384x512 = torch.Size((1, 4, 48, 64))
    noise = ImageNoise("cpu", [2671683630, 1], sd15_384x512, torch.device("cpu")).first()
    assert noise.shape == (2, 4, 48, 64) and noise.dtype == torch.float32
    for (c, y, x), value in A1111_CPU_NOISE.items():
        assert noise[0, c, y, x].item() == pytest.approx(value, rel=1e-6)
    assert noise[0].double().sum().item() == pytest.approx(A1111_CPU_NOISE_SUM, rel=1e-8)


# AUTOMATIC1111's "NV" source (modules/rng_philox.py, Generator.randn), run from a scratch
# transcription outside the repository: an image's first draw (its starting noise) and its
# second (Euler a's first step noise in A1111), latent shape (4, 48, 64), for a 32-bit and a
# 64-bit seed: (first: values at (0,0,0), (0,0,1), (1,20,30), sum; second: values at (0,0,0),
# (3,47,63), sum). The same scratch run compared 900 draws (300 random seeds, 64-bit ones too,
# 1 to 20,000 numbers, offsets 0 to 2) bit for bit.
A1111_NV_NOISE = {
    2671683630: (
        [-0.21825094521045685, 1.3307585716247559, -0.24024789035320282],
        -115.89240284892367,
        [0.42577195167541504, 0.5074195265769958],
        -161.86931195044235,
    ),
    2**40 + 12345: (
        [0.8861610293388367, 0.12506484985351562, -0.06736759841442108],
        -103.51523653020922,
        [-1.047513484954834, -0.022443778812885284],
        -22.21576896993065,
    ),
}
# CUDA's torch.randn((3, 4)) after torch.manual_seed(0), as A1111's rng_philox.py records it
# (the numbers its NV source imitates)
CUDA_RANDN_SEED_0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


@pytest.mark.parametrize("seed", list(A1111_NV_NOISE))
def test_nv_noise_is_automatic1111s_bit_for_bit(seed):
    from fulora.generate.noise import philox_randn

    first_values, first_sum, second_values, second_sum = A1111_NV_NOISE[seed]
    first = philox_randn(seed, 4 * 48 * 64).reshape(4, 48, 64)
    second = philox_randn(seed, 4 * 48 * 64, offset=1).reshape(4, 48, 64)
    assert [first[0, 0, 0].item(), first[0, 0, 1].item(), first[1, 20, 30].item()] == first_values
    assert first.double().sum().item() == pytest.approx(first_sum, rel=1e-12)
    assert [second[0, 0, 0].item(), second[3, 47, 63].item()] == second_values
    assert second.double().sum().item() == pytest.approx(second_sum, rel=1e-12)


def test_nv_noise_is_cudas_randn():
    """The numbers A1111 records for CUDA's torch.randn at seed 0 (a GPU test compares with
    CUDA itself): A1111's default source, GPU, on a machine without one."""
    from fulora.generate.noise import philox_randn

    got = philox_randn(0, 12).reshape(3, 4)
    torch.testing.assert_close(got, torch.tensor(CUDA_RANDN_SEED_0), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Prompt emphasis, '(word:1.3)' and '[word]', as AUTOMATIC1111 reads it. Recorded by running
# A1111's own functions (from a scratch script outside the repository, stubs for its settings
# at their defaults): modules/prompt_parser.py parse_prompt_attention (commit 28bd8e14) for
# PARSE; modules/sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWords.tokenize_line and forward
# with sd_emphasis.EmphasisOriginal (commit 00e09382), on fulora:phantom-sd's tokenizer and
# text encoder (fp32, CPU), for TOKENS and EMBEDDINGS (sum, sum of magnitudes, token 4's first
# three channels). The same script drew 40,000 random prompts of brackets, colons, numbers,
# backslashes, AND, BREAK and '|': each one fulora accepts (26,000 positive and negative
# readings) A1111 reads with one prompt for every step, guidance weight 1, and the same token
# ids and weights as fulora. Session 26 (BREAK and chunks): parse_prompt_attention read at
# commit 0674fabd (its BREAK split is the same function), tokenize_line and forward as above with
# comma_padding_backtrack 20; a scratch run of both on 20,000 random prompts of words, commas,
# brackets, weights, escapes and BREAK (11,653 accepted, 4,452 of them over one chunk) found the
# same pieces, chunks, ids and weights; on 20,000 more, each BREAK fulora refuses inside
# brackets (3,166) A1111 reads as a word, and in the other 16,834 each BREAK as a break.
# --------------------------------------------------------------------------------------------
A1111_PARSE = {
    "a photo of fetal brain": [("a photo of fetal brain", 1.0)],
    "a photo of (fetal brain:1.3)": [("a photo of ", 1.0), ("fetal brain", 1.3)],
    "[[fetal]] femur, (((ultrasound)))": [
        ("fetal", 0.8264462809917354),
        (" femur, ", 1.0),
        ("ultrasound", 1.3310000000000004),
    ],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ],
    "(unbalanced": [("unbalanced", 1.1)],
    "[unbalanced (and:0.8)": [("unbalanced ", 0.9090909090909091), ("and", 0.7272727272727273)],
    r"\(literal\] \\ slash": [("(literal] \\ slash", 1.0)],
    "stray ) and ] and :1.2) text": [("stray ) and ] and :1.2) text", 1.0)],
    "(fetal (brain:-0.5):1.2)": [("fetal ", 1.2), ("brain", -0.6)],
    "(abdomen:.7)": [("abdomen", 0.7)],
    "": [("", 1.0)],
    # BREAK's marker is ("BREAK", -1) in A1111 (an int; equal to fulora's -1.0)
    "fetal BREAK brain": [("fetal", 1.0), ("BREAK", -1.0), ("brain", 1.0)],
    "BREAK fetal": [("", 1.0), ("BREAK", -1.0), ("fetal", 1.0)],
    "(fetal) BREAK [brain]": [
        ("fetal", 1.1),
        ("", 1.0),
        ("BREAK", -1.0),
        ("", 1.0),
        ("brain", 0.9090909090909091),
    ],
    "[(a BREAK b)] c": [("a", 1.0), ("BREAK", -1.0), ("b c", 1.0)],
    "fetalBREAK brain,BREAK,femur": [
        ("fetalBREAK brain,", 1.0),
        ("BREAK", -1.0),
        (",femur", 1.0),
    ],
}
A1111_TOKENS = {  # the chunk's ids and weights up to its end token (then padding, weight 1)
    "a photo of fetal brain": ([689, 320, 515, 516, 520, 539, 690], [1.0] * 7),
    "a photo of (fetal brain:1.3)": (
        [689, 320, 515, 516, 520, 539, 690],
        [1.0, 1.0, 1.0, 1.0, 1.3, 1.3, 1.0],
    ),
    "[fetal] (femur), ((thorax))": (
        [689, 520, 542, 267, 547, 690],
        [1.0, 0.9090909090909091, 1.1, 1.0, 1.2100000000000002, 1.0],
    ),
    "": ([689, 690], [1.0, 1.0]),
}
A1111_EMBEDDINGS = {  # (prompt, clip skip): (sum, sum of |z|, z[token 4, :3])
    ("a photo of (fetal brain:1.3)", 1): (
        -5.614494323730469,
        3484.887939453125,
        [1.3739407062530518, -1.3651366233825684, -1.701316475868225],
    ),
    ("[fetal] (femur), ((thorax))", 1): (
        -5.68212890625,
        3467.028076171875,
        [1.3641910552978516, -1.4753479957580566, -1.4470773935317993],
    ),
    ("a photo of fetal brain", 1): (
        -5.614463806152344,
        3456.099609375,
        [1.0568186044692993, -1.050046682357788, -1.308632254600525],
    ),
    ("a photo of (fetal brain:1.3)", 2): (
        -7.227699279785156,
        3606.199462890625,
        [0.9712866544723511, -0.6693675518035889, -1.4162774085998535],
    ),
    ("[fetal] (femur), ((thorax))", 2): (
        -7.7826080322265625,
        3566.211181640625,
        [0.9908648133277893, -0.8552693724632263, -1.141908049583435],
    ),
    ("a photo of fetal brain", 2): (
        -7.2276458740234375,
        3576.67236328125,
        [0.7471609711647034, -0.514910101890564, -1.0894695520401],
    ),
}


# A1111's tokenize_line on prompts of more than one chunk: the prompt's tokens in each chunk,
# and the SHA-256 of json.dumps([[ids, weights] for each chunk]) (its PromptChunk tokens and
# multipliers). "comma" fills its first chunk with a comma 2 tokens before the end: the word
# after the comma opens the second chunk (comma_padding_backtrack 20, the default).
A1111_CHUNKS = {
    "fetal brain, " * 40: (
        [75, 45],
        "ef051069714a1049399df74f94875a4ea875137e26ffcbf812fba00e5d18da0b",
    ),
    "a photo of fetal brain " * 14 + ", fetal (femur:1.2) " * 8: (
        [74, 20],
        "ebe376df7f4145be15125c88cb4ea2767c60f70198ec44a1695f2a552799d0e9",
    ),
    "fetal brain " * 50: (
        [75, 25],
        "c03983d2a9a5e5d2dff5c8562fa96a3caeaf7793f2f57e67ccb626a222c334ff",
    ),
    "a photo of (fetal brain:1.3) BREAK [thorax], abdomen BREAK": (
        [5, 3],
        "66abeb21339707d27ec40694a7cc080c0bad7ae09eb13cd0e667f4ada0ab809f",
    ),
    "BREAK fetal femur": (
        [0, 2],
        "cf4fc3af32d030659972e56e9eeae104925ba5af2788a00f85ce97d454978212",
    ),
}
# A1111's forward on two of them: (sum, sum of |z|, z[token 80, :3]), z of shape (1, 154, 64)
A1111_CHUNK_EMBEDDINGS = {
    ("fetal brain, " * 40, 1): (
        0.089599609375,
        6957.0869140625,
        [1.1115907430648804, -1.2279820442199707, -1.2274590730667114],
    ),
    ("fetal brain, " * 40, 2): (
        3.5220947265625,
        7133.3994140625,
        [0.767295241355896, -0.7087908983230591, -0.9572928547859192],
    ),
    ("a photo of (fetal brain:1.3) BREAK [thorax], abdomen BREAK", 1): (
        -11.801025390625,
        6945.4111328125,
        [1.3520560264587402, -1.333821415901184, -1.4252630472183228],
    ),
    ("a photo of (fetal brain:1.3) BREAK [thorax], abdomen BREAK", 2): (
        -15.275909423828125,
        7182.6796875,
        [1.1149320602416992, -0.8852027654647827, -1.19800865650177],
    ),
}


@pytest.mark.parametrize(("prompt", "pieces"), list(A1111_PARSE.items()))
def test_emphasis_is_parsed_as_automatic1111_parses_it(prompt, pieces):
    from fulora.generate.prompts import parse_emphasis

    assert parse_emphasis(prompt) == pieces  # exactly: the same products in the same order


@pytest.fixture(scope="module")
def phantom_text():
    from transformers import CLIPTextModel, CLIPTokenizer

    from fulora.shipped import PHANTOM_SD, shipped_model

    folder = shipped_model(PHANTOM_SD)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return tokenizer, CLIPTextModel.from_pretrained(
        folder / "text_encoder", dtype=torch.float32
    ).eval()


@pytest.mark.parametrize(("prompt", "expected"), list(A1111_TOKENS.items()))
def test_emphasised_prompts_are_tokenized_as_automatic1111_does(phantom_text, prompt, expected):
    from fulora.generate.prompts import a1111_chunks

    [(ids, weights, _)] = a1111_chunks(phantom_text[0], prompt)
    end = len(expected[0])
    assert (ids[:end], weights[:end]) == expected
    assert len(ids) == len(weights) == 77
    assert set(ids[end:]) == {phantom_text[0].eos_token_id} and set(weights[end:]) == {1.0}


@pytest.mark.parametrize(("prompt", "expected"), list(A1111_CHUNKS.items()))
def test_long_and_break_prompts_are_chunked_as_automatic1111_does(phantom_text, prompt, expected):
    from fulora.generate.prompts import a1111_chunks

    tokenizer = phantom_text[0]
    chunks = a1111_chunks(tokenizer, prompt)
    words = [chunk.ids.index(tokenizer.eos_token_id) - 1 for chunk in chunks]
    laid_out = [[chunk.ids, chunk.weights] for chunk in chunks]  # A1111's tokens, multipliers
    digest = hashlib.sha256(json.dumps(laid_out).encode()).hexdigest()
    assert (words, digest) == expected


def _a1111_embedding(text, text_prompt, clip_skip, emphasis="original"):
    """The prompt's embeddings as ``encode_prompts`` makes them in that emphasis mode."""
    from fulora.generate.prompts import a1111_chunks
    from fulora.lora.conditioning import chunked_embeddings

    tokenizer, text_encoder = text
    chunks = a1111_chunks(tokenizer, text_prompt, emphasis)
    normalise = emphasis != "no_norm"
    return chunked_embeddings(text_encoder, [[chunks]], clip_skip, "cpu", normalise)[0]


@pytest.mark.parametrize(("prompt", "clip_skip"), list(A1111_EMBEDDINGS))
def test_emphasised_embeddings_are_automatic1111s(phantom_text, prompt, clip_skip):
    """Weighted per token, then rescaled to the unweighted mean (A1111's "Original")."""
    z = _a1111_embedding(phantom_text, prompt, clip_skip)
    total, magnitude, values = A1111_EMBEDDINGS[(prompt, clip_skip)]
    assert z.sum().item() == pytest.approx(total, rel=1e-5)
    assert z.abs().sum().item() == pytest.approx(magnitude, rel=1e-6)
    assert z[0, 4, :3].tolist() == pytest.approx(values, rel=1e-5)


@pytest.mark.parametrize(("prompt", "clip_skip"), list(A1111_CHUNK_EMBEDDINGS))
def test_chunked_embeddings_are_automatic1111s(phantom_text, prompt, clip_skip):
    """Each chunk encoded and emphasised on its own, the chunks one after the other."""
    z = _a1111_embedding(phantom_text, prompt, clip_skip)
    total, magnitude, values = A1111_CHUNK_EMBEDDINGS[(prompt, clip_skip)]
    assert z.shape == (1, 154, 64)
    assert z.sum().item() == pytest.approx(total, abs=1e-3)  # a sum of 9,856 values near 0
    assert z.abs().sum().item() == pytest.approx(magnitude, rel=1e-6)
    assert z[0, 80, :3].tolist() == pytest.approx(values, rel=1e-5)


# AUTOMATIC1111's other settings of "Emphasis" (modules/sd_emphasis.py, v1.8+): "None" (its
# tokenize_line does not parse the prompt: brackets, backslashes and BREAK are text), "Ignore"
# (parsed; the multipliers go unused) and "No norm" (weighted, no rescaling), and the default
# "Original", from a second scratch transcription (sd_hijack_clip @00e09382 with each mode's
# after_transformers) on fulora:phantom-sd's text encoder at clip skip 1. Its "Original" rows
# are A1111_EMBEDDINGS' numbers.
# (mode, prompt): (ids per chunk to its end token, sum, sum of |z|, z[0, 4, :3])
A1111_EMPHASIS_MODES = {
    ("none", "a photo of (fetal brain:1.3)"): (
        [[689, 320, 515, 516, 263, 520, 539, 281, 272, 269, 274, 264, 690]],
        -5.7397918701171875,
        3486.940673828125,
        [1.1243951320648193, -1.024610996246338, -1.2655229568481445],
    ),
    ("none", "[fetal] (femur), ((thorax)) BREAK abdomen"): (
        [[689, 314, 520, 316, 263, 542, 8, 267, 7, 263, 547, 8, 264, 536, 68, 64, 330, 535, 690]],
        -4.140476226806641,
        3501.405517578125,
        [0.9113884568214417, -1.02098548412323, -1.173697829246521],
    ),
    ("none", "fe(tal) brain"): (
        [[689, 69, 324, 263, 83, 64, 331, 264, 539, 690]],
        -5.891868591308594,
        3485.6103515625,
        [0.9794164896011353, -1.0834596157073975, -1.0813976526260376],
    ),
    ("ignore", "a photo of (fetal brain:1.3)"): (
        [[689, 320, 515, 516, 520, 539, 690]],
        -5.614463806152344,
        3456.099609375,
        [1.0568186044692993, -1.050046682357788, -1.308632254600525],
    ),
    ("ignore", "[fetal] (femur), ((thorax)) BREAK abdomen"): (
        [[689, 520, 542, 267, 547, 690], [689, 535, 690]],
        -12.38458251953125,
        6938.5,
        [1.1270158290863037, -1.2188472747802734, -1.1954917907714844],
    ),
    ("ignore", "fe(tal) brain"): (
        [[689, 69, 324, 83, 64, 331, 539, 690]],
        -5.612457275390625,
        3472.055908203125,
        [0.9705544114112854, -1.075868010520935, -1.1371428966522217],
    ),
    ("original", "a photo of (fetal brain:1.3)"): (
        [[689, 320, 515, 516, 520, 539, 690]],
        -5.614494323730469,
        3484.887939453125,
        [1.3739407062530518, -1.3651366233825684, -1.701316475868225],
    ),
    ("original", "[fetal] (femur), ((thorax)) BREAK abdomen"): (
        [[689, 520, 542, 267, 547, 690], [689, 535, 690]],
        -12.384521484375,
        6950.11767578125,
        [1.3641910552978516, -1.4753479957580566, -1.4470773935317993],
    ),
    ("original", "fe(tal) brain"): (
        [[689, 69, 324, 83, 64, 331, 539, 690]],
        -5.61248779296875,
        3485.93505859375,
        [1.0675779581069946, -1.1834194660186768, -1.2508198022842407],
    ),
    ("no_norm", "a photo of (fetal brain:1.3)"): (
        [[689, 320, 515, 516, 520, 539, 690]],
        -5.6141510009765625,
        3484.694091796875,
        [1.3738641738891602, -1.3650606870651245, -1.7012218236923218],
    ),
    ("no_norm", "[fetal] (femur), ((thorax)) BREAK abdomen"): (
        [[689, 520, 542, 267, 547, 690], [689, 535, 690]],
        -12.38250732421875,
        6948.8427734375,
        [1.3636891841888428, -1.474805235862732, -1.446545124053955],
    ),
    ("no_norm", "fe(tal) brain"): (
        [[689, 69, 324, 83, 64, 331, 539, 690]],
        -5.6126251220703125,
        3486.039306640625,
        [1.0676099061965942, -1.1834548711776733, -1.2508572340011597],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("mode", "prompt"), list(A1111_EMPHASIS_MODES))
def test_emphasis_modes_are_automatic1111s(phantom_text, mode, prompt):
    """Each mode's token ids and embeddings as A1111's (measured: the same to the last digit
    printed; on this model "No norm" is 5.6e-5 of the magnitude from "Original", and "Ignore"
    0.8%, both told apart by the 1e-6 bound)."""
    from fulora.generate.prompts import a1111_chunks

    ids, total, magnitude, values = A1111_EMPHASIS_MODES[(mode, prompt)]
    chunks = a1111_chunks(phantom_text[0], prompt, mode)
    end = phantom_text[0].eos_token_id
    assert [chunk.ids[: chunk.ids.index(end) + 1] for chunk in chunks] == ids
    z = _a1111_embedding(phantom_text, prompt, 1, mode)
    assert z.sum().item() == pytest.approx(total, rel=1e-5, abs=1e-3)
    assert z.abs().sum().item() == pytest.approx(magnitude, rel=1e-6)
    assert z[0, 4, :3].tolist() == pytest.approx(values, rel=1e-5)


# AUTOMATIC1111's prompt editing, alternation and AND: its prompt_parser.py (the current
# scheduling, as in v1.8+: get_multicond_prompt_list, then
# get_learned_conditioning_prompt_schedules on each part), run on these prompts and steps in a
# scratch script with A1111's own lark grammar; (weight, [(last step, text)]) per AND part.
# The first rows include A1111's own doctests.
A1111_SCHEDULES = {
    ("fetal brain", 30): [(1.0, [(30, "fetal brain")])],
    ("a [fetal:3] brain", 10): [(1.0, [(3, "a  brain"), (10, "a fetal brain")])],
    ("a [[[b]]:2]", 10): [(1.0, [(2, "a "), (10, "a [[b]]")])],
    ("a[b:[c:d:2]:1]e", 10): [(1.0, [(1, "abe"), (2, "ace"), (10, "ade")])],
    ("a [b:.5] c", 10): [(1.0, [(5, "a  c"), (10, "a b c")])],
    ("a [b:c:1.0] d", 10): [(1.0, [(10, "a b d")])],
    ("[fe|||]male", 6): [
        (1.0, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female"), (6, "male")])
    ],
    ("[fetal|(brain:1.1)]", 4): [
        (1.0, [(1, "fetal"), (2, "(brain:1.1)"), (3, "fetal"), (4, "(brain:1.1)")])
    ],
    ("x | y [a:b:3]", 10): [(1.0, [(10, "x | y [a:b:3]")])],  # its grammar fails: as written
    ("[a:b:0]", 10): [(1.0, [(10, "b")])],
    ("[femur:bone:15]", 10): [(1.0, [(10, "femur")])],
    ("[a: 2 ]", 4): [(1.0, [(2, ""), (4, "a")])],
    ("fetal brain :1.5", 20): [(1.5, [(20, "fetal brain")])],
    ("fetal AND brain:0.5 AND femur : -1", 20): [
        (1.0, [(20, "fetal")]),
        (0.5, [(20, " brain")]),
        (-1.0, [(20, " femur")]),
    ],
    ("[fetal:femur:0.25] AND [a|b]:2", 4): [
        (1.0, [(1, "fetal"), (4, "femur")]),
        (2.0, [(1, " a"), (2, " b"), (3, " a"), (4, " b")]),
    ],
    ("[blurry::0.5], text", 20): [(1.0, [(10, "blurry, text"), (20, ", text")])],
}
# A1111's reconstruct_cond_batch: the entry it conditions each model call on (counted from 0),
# for schedules ending at these steps, over two calls more than the last step
A1111_PICKS = {
    (2, 4): [0, 0, 0, 1, 1, 0],
    (1, 2, 3, 4): [0, 0, 1, 2, 3, 0],
    (3, 10): [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
}
# A1111's forward on each prompt's texts at once (its get_learned_conditioning), fulora:phantom-sd:
# (shape, sum, sum of |z|, z[1, 4, :3], z[0, 4, :3]). The emphasis of a batch is rescaled to the
# mean of all its texts; the second prompt's short text gets an empty chunk.
_LONG_EDIT = "[" + "(fetal:1.2) brain, " * 30 + ":femur:2]"
A1111_SCHEDULE_EMBEDDINGS = {
    ("[(fetal:1.3) brain:femur, (bone:0.8):2]", 1): (
        (2, 77, 64),
        -11.826080322265625,
        6925.92138671875,
        [0.8728325366973877, -0.8328564763069153, -0.909977912902832],
        [0.9993168711662292, -1.121131420135498, -1.3017675876617432],
    ),
    ("[(fetal:1.3) brain:femur, (bone:0.8):2]", 2): (
        (2, 77, 64),
        -16.481689453125,
        7181.2373046875,
        [0.6470110416412354, -0.39217299222946167, -0.6736288666725159],
        [0.6536659598350525, -0.5700706839561462, -1.0622295141220093],
    ),
    (_LONG_EDIT, 1): (
        (2, 154, 64),
        -16.848388671875,
        14156.05078125,
        [1.232183575630188, -1.0311291217803955, -1.3229938745498657],
        [1.2887181043624878, -1.39822518825531, -1.4877012968063354],
    ),
    (_LONG_EDIT, 2): (
        (2, 154, 64),
        -19.6217041015625,
        14672.2578125,
        [1.0224205255508423, -0.46348363161087036, -1.0623353719711304],
        [0.8982545733451843, -0.7437309622764587, -1.212974190711975],
    ),
}


@pytest.mark.parametrize(("prompt", "steps"), list(A1111_SCHEDULES))
def test_prompts_are_edited_alternated_and_split_as_automatic1111_does(prompt, steps):
    from fulora.generate.schedules import read_prompt

    parts = read_prompt(prompt, steps)
    assert [(part.weight, list(part.schedule)) for part in parts] == A1111_SCHEDULES[prompt, steps]


# A1111's get_learned_conditioning_prompt_schedules with use_old_scheduling (its setting "Use
# old prompt editing timelines"): an edit's number below 1 is a fraction of the steps, else a
# step. (prompt, steps): (schedule with the old rule, with the new), from the scratch copy of
# A1111's prompt_parser (which gave the same schedules as fulora's with the old rule for 20,000
# random prompts, each read as a prompt and as a negative prompt, session 30).
A1111_OLD_TIMELINES = {
    ("[a:b:2.5]", 10): ([(2, "a"), (10, "b")], [(10, "a")]),
    ("[a:b:1.0]", 10): ([(1, "a"), (10, "b")], [(10, "a")]),
    ("[a:b:0.5]", 10): ([(5, "a"), (10, "b")], [(5, "a"), (10, "b")]),
    ("[fetal:[c:d:1.5]:0.25] brain", 20): (
        [(1, "fetal brain"), (5, "fetal brain"), (20, "d brain")],
        [(5, "fetal brain"), (20, "c brain")],
    ),
    ("[a:b:1.]", 8): ([(1, "a"), (8, "b")], [(8, "a")]),
    ("x [a:b:12] y", 10): ([(10, "x a y")], [(10, "x a y")]),
}


@pytest.mark.parametrize(("prompt", "steps"), list(A1111_OLD_TIMELINES))
def test_old_prompt_editing_timelines_are_automatic1111s(prompt, steps):
    from fulora.generate.schedules import read_prompt

    old, new = A1111_OLD_TIMELINES[prompt, steps]
    [part] = read_prompt(prompt, steps, old_timelines=True)
    assert list(part.schedule) == old
    [part] = read_prompt(prompt, steps)
    assert list(part.schedule) == new


def test_a_negative_prompt_is_edited_but_not_split_nor_weighted():
    """A1111 reads a negative prompt's schedule (get_learned_conditioning) but not its AND."""
    from fulora.generate.schedules import read_prompt

    [part] = read_prompt("[blurry::0.5] AND text:2", 20, negative=True)
    assert part.weight == 1.0
    assert list(part.schedule) == [(10, "blurry AND text:2"), (20, " AND text:2")]


def test_a_prompt_without_square_brackets_is_its_own_text_unparsed(monkeypatch):
    """Edits and alternations open with '['; without one A1111's parse gives the text as
    written, so fulora skips the parse (seconds for a long prompt with brackets)."""
    from fulora.generate import schedules

    def no_parse(text):
        raise AssertionError(f"parsed {text!r}")

    monkeypatch.setattr(schedules, "_parse", no_parse)
    long = "masterpiece, (best quality:1.2), a | b: c " * 40
    assert schedules.scheduled(long, 30) == ((30, long),)
    with pytest.raises(AssertionError, match="parsed"):
        schedules.scheduled("[a|b] read by this test alone", 31)  # not cached before


@pytest.mark.parametrize("ends", list(A1111_PICKS))
def test_each_model_call_uses_the_entry_automatic1111_uses(ends):
    """Counted from 0, so '[a:b:2]' conditions three calls on 'a' as A1111 does."""
    from fulora.generate.guidance import Scheduled

    entries = torch.arange(len(ends), dtype=torch.float32)[:, None, None]
    scheduled = Scheduled(ends, entries)
    assert [int(scheduled.at(call)) for call in range(max(ends) + 2)] == A1111_PICKS[ends]


@pytest.mark.parametrize(("prompt", "clip_skip"), list(A1111_SCHEDULE_EMBEDDINGS))
def test_a_prompts_texts_are_embedded_together_as_automatic1111_embeds_them(
    phantom_text, prompt, clip_skip
):
    from fulora.generate.prompts import a1111_chunks
    from fulora.generate.schedules import read_prompt
    from fulora.lora.conditioning import chunked_embeddings

    tokenizer, text_encoder = phantom_text
    [part] = read_prompt(prompt, 4)
    texts = [a1111_chunks(tokenizer, text) for text in part.texts]
    count = max(len(chunks) for chunks in texts)
    texts = [chunks + a1111_chunks(tokenizer, "") * (count - len(chunks)) for chunks in texts]
    [z] = chunked_embeddings(text_encoder, [texts], clip_skip, "cpu")
    shape, total, magnitude, second, first = A1111_SCHEDULE_EMBEDDINGS[(prompt, clip_skip)]
    assert tuple(z.shape) == shape
    assert z.sum().item() == pytest.approx(total, abs=1e-3)
    # A1111 encodes each chunk position apart, fulora every chunk at once: rounding (1.2e-6)
    assert z.abs().sum().item() == pytest.approx(magnitude, rel=1e-5)
    assert z[1, 4, :3].tolist() == pytest.approx(second, rel=1e-5)
    assert z[0, 4, :3].tolist() == pytest.approx(first, rel=1e-5)
    # each text alone would be rescaled to its own mean: other numbers than A1111's
    [alone] = chunked_embeddings(text_encoder, [texts[:1]], clip_skip, "cpu")
    assert not torch.allclose(alone[0], z[0], rtol=1e-4)


# A1111's extra_networks.parse_prompt, ExtraNetworkParams and Lora's ExtraNetworkLora.activate,
# transcribed outside the repository and run on each prompt: the text A1111 encodes, and the
# (name, te_multiplier, unet_multiplier) it hands load_networks. Two fuzz runs of 20,000
# random prompts each gave fulora's text and tags, or a refusal where A1111 fails, loads no
# LoRA, ignores an argument, sets dyn or loads a network twice.
A1111_LORA_TAGS = [
    ("a photo of fetal brain <lora:fu_lora:1>", "a photo of fetal brain ", [("fu_lora", 1, 1)]),
    ("<lora:fu_lora:0.8>a photo of fetal brain", "a photo of fetal brain", [("fu_lora", 0.8, 0.8)]),
    (
        "a photo of (fetal <lora:fu_lora:0.5> brain:1.2)",
        "a photo of (fetal  brain:1.2)",
        [("fu_lora", 0.5, 0.5)],
    ),
    ("fetal brain, <lyco:fu_lora:0.5:0.2>", "fetal brain, ", [("fu_lora", 0.5, 0.2)]),
    ("fetal brain <lora:fu_lora>", "fetal brain ", [("fu_lora", 1, 1)]),
    ("fetal brain <lora:fu_lora:te=0.3>", "fetal brain ", [("fu_lora", 0.3, 0.3)]),
    ("fetal brain <lora:fu_lora:1:unet=0.4>", "fetal brain ", [("fu_lora", 1, 0.4)]),
    ("fetal brain <lora:fu_lora:-1:te=2:unet=0.5>", "fetal brain ", [("fu_lora", 2, 0.5)]),
    ("fetal brain <lora:fu_lora: 0.7>", "fetal brain ", [("fu_lora", 0.7, 0.7)]),
    ("fetal brain <lora:fu_lora:1e-1:2>", "fetal brain ", [("fu_lora", 0.1, 2)]),
    (
        "[fetal brain:<lora:fu_lora:0.6>skull:5] AND femur :0.5",
        "[fetal brain:skull:5] AND femur :0.5",
        [("fu_lora", 0.6, 0.6)],
    ),
    ("fetal <lora:fu_lora:0.5 brain", "fetal <lora:fu_lora:0.5 brain", []),  # text to A1111
]


@pytest.mark.parametrize(("prompt", "text", "loaded"), A1111_LORA_TAGS)
def test_lora_tags_are_read_as_automatic1111_reads_them(prompt, text, loaded):
    from fulora.generate.networks import lora_tags, without_networks

    assert without_networks(prompt) == text
    assert [(t.name, t.text_encoder, t.unet) for t in lora_tags(prompt, "p")] == loaded


# What A1111 does with tags fulora refuses (the same transcription)
A1111_LORA_TAGS_REFUSED = [
    ("fetal brain <lora:fu_lora:0.5:0.2:4>", "dynamic rank"),  # loads it with dyn_dim 4
    ("fetal brain <hypernet:h:1>", "'hypernet' network"),  # a hypernetwork
    ("fetal brain <lora:fu_lora:abc>", "not a number"),  # ValueError: loads no LoRA
    ("fetal brain <lora:fu_lora:a=b=c>", "not a number"),  # 'a=b=c' is positional: the same
    ("fetal brain <lora:fu_lora:0.5> <lora:fu_lora:0.5>", "another tag names too"),  # twice
    ("fetal brain <lora:fu_lora:foo=2>", r"ignores \(foo\)"),  # runs it at 1, foo unread
    ("fetal brain <lora:fu_lora:9>", "from -4 to 4"),  # runs it: fulora's own range
]


@pytest.mark.parametrize(("prompt", "message"), A1111_LORA_TAGS_REFUSED)
def test_lora_tags_fulora_would_not_run_as_automatic1111_are_refused(prompt, message):
    from fulora.errors import ConfigError
    from fulora.generate.networks import lora_tags

    with pytest.raises(ConfigError, match=message):
        lora_tags(prompt, "prompts.brain")


def test_a_prompts_lora_tag_is_out_of_its_schedule_and_parts():
    """A1111 takes the tags out before it splits at AND and schedules the text."""
    from fulora.generate.schedules import read_prompt

    parts = read_prompt("[fetal brain:<lora:fu_lora:0.6>skull:5] AND femur :0.5", 10)
    assert [(p.weight, list(p.schedule)) for p in parts] == [
        (1.0, [(5, "fetal brain"), (10, "skull")]),
        (0.5, [(10, " femur")]),
    ]


def test_emphasis_on_half_precision_embeddings_is_computed_in_fp32():
    """On a GPU the text encoder runs in fp16; A1111's fp32 weights promote its product to fp32,
    which the UNet then takes in fp16: the fp32 result rounded once."""
    from fulora.lora.conditioning import emphasise_together

    def emphasise(hidden, weights):  # each row a prompt of its own, as A1111 encodes it
        rows = zip(hidden, weights, strict=True)
        return torch.cat([emphasise_together(row[None], weight[None]) for row, weight in rows])

    hidden = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 77)
    weights[0, 3:6] = 1.3
    half = emphasise(hidden.half(), weights)
    assert half.dtype == torch.float16
    assert torch.equal(half, emphasise(hidden.half().float(), weights).half())
    assert torch.equal(half[1], hidden.half()[1])  # a row without emphasis is left as it is


# --------------------------------------------------------------------------------------------
# A single-file checkpoint in the original (LDM) layout, what AUTOMATIC1111 users hold
# (v1-5-pruned-emaonly.safetensors): diffusers' from_single_file must read it as the same model.
# The file is written here with the LDM names (CompVis' UNetModel, AutoencoderKL, and
# FrozenCLIPEmbedder over transformers' CLIP), so the check is diffusers' conversion of them.
# --------------------------------------------------------------------------------------------
_LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_LDM_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet key in the LDM layout: input/middle/output blocks in one numbering."""
    step, layers = config.layers_per_block + 1, config.layers_per_block
    attention_up = ["CrossAttn" in kind for kind in config.up_block_types]
    key = re.sub(
        r"(resnets\.\d+\.)(\w+)\.", lambda m: m[1] + _LDM_RESNET.get(m[2], m[2]) + ".", key
    )
    rules = [
        (r"^time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"^conv_in\.", lambda m: "input_blocks.0.0."),
        (r"^conv_norm_out\.", lambda m: "out.0."),
        (r"^conv_out\.", lambda m: "out.2."),
        (r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"input_blocks.{step * int(m[1]) + int(m[3]) + 1}.{int(m[2] == 'attentions')}."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         lambda m: f"input_blocks.{step * (int(m[1]) + 1)}.0.op."),
        (r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
         lambda m: f"output_blocks.{step * int(m[1]) + int(m[3])}.{int(m[2] == 'attentions')}."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"output_blocks.{step * int(m[1]) + layers}.{1 + attention_up[int(m[1])]}."),
    ]  # fmt: skip
    for pattern, name in rules:
        key, found = re.subn(pattern, name, key)
        if found:
            return "model.diffusion_model." + key
    raise KeyError(key)


def _ldm_vae_key(key: str, blocks: int) -> str:
    """A diffusers VAE key in the LDM layout (the decoder's up blocks numbered bottom-up)."""
    key = re.sub(r"(resnets\.\d+\.)conv_shortcut\.", r"\1nin_shortcut.", key)
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
         lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.",
         lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample."),
        (r"^(\w+)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(\w+)\.mid_block\.attentions\.0\.(to_out\.0|\w+)\.",
         lambda m: f"{m[1]}.mid.attn_1.{_LDM_VAE_ATTENTION[m[2]]}."),
        (r"^(\w+)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    ]  # fmt: skip
    for pattern, name in rules:
        key, found = re.subn(pattern, name, key, count=1)
        if found:
            break
    return "first_stage_model." + key


def _ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights as one original-layout checkpoint (VAE attention as 1x1 convs)."""
    blocks = len(pipe.vae.config.block_out_channels)
    ldm = {_ldm_unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.vae.state_dict().items():
        key = _ldm_vae_key(key, blocks)
        attention = ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2
        ldm[key] = value[:, :, None, None] if attention else value
    for key, value in pipe.text_encoder.state_dict().items():
        # the original layout's CLIP keys are under text_model., which transformers 5 drops
        ldm[f"cond_stage_model.transformer.{kohya_layout('text_encoder', key)}"] = value
    return {k: v.contiguous() for k, v in ldm.items()}


def test_a_single_file_checkpoint_is_the_same_model_and_makes_the_same_images(
    tiny_model, tmp_path, monkeypatch
):
    from safetensors.torch import save_file

    from fulora.errors import ConfigError
    from fulora.generate.run import GenerateConfig, generate
    from fulora.io import file_hash
    from fulora.lora.base import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, a single file needs --base-config
    pipe = _pipe(tiny_model)
    single = tmp_path / "tiny-pruned.safetensors"
    save_file(_ldm_checkpoint(pipe), str(single))
    loaded = load_pipeline(single, config=tiny_model)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert sorted(got) == sorted(want), part
        assert all(torch.equal(got[k], want[k]) for k in want), part
    other = _ldm_checkpoint(pipe)  # a checkpoint of another architecture than the configs'
    other["first_stage_model.decoder.conv_in.bias"] = torch.zeros(7)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="the architecture whose configs --base-config"):
        load_pipeline(tmp_path / "other.safetensors", config=tiny_model)
    settings = dict(planes=["brain"], per_class=2, steps=2, width=64, height=48, device="cpu")
    generate(tmp_path / "folder", GenerateConfig(base=str(tiny_model), **settings), progress=False)
    generate(
        tmp_path / "file",
        GenerateConfig(base=str(single), base_config=str(tiny_model), **settings),
        progress=False,
    )
    for folder_png in sorted((tmp_path / "folder" / "brain").glob("*.png")):
        file_png = tmp_path / "file" / "brain" / folder_png.name
        with Image.open(folder_png) as a, Image.open(file_png) as b:
            assert np.array_equal(np.array(a), np.array(b)), folder_png.name
            # AUTOMATIC1111's checkpoint hash (the file's sha256, 10 digits) and name (its stem)
            assert (
                f"Model hash: {file_hash(single)[:10]}, Model: tiny-pruned," in b.text["parameters"]
            )


# kohya's BaseDataset.set_tag_frequency (sd-scripts 48d368fa, library/train_util.py) on these
# captions, one call per folder: its ss_tag_frequency, the tags AUTOMATIC1111 shows for a LoRA.
KOHYA_CAPTIONS = {
    "brain": [
        "a photo of fetal brain",
        "A photo of fetal brain, transventricular",
        " , a photo of fetal brain ,Cerebellum, cerebellum",
    ],
    "femur": ["a photo of fetal femur"],
}
KOHYA_TAG_FREQUENCY = {
    "brain": {"a photo of fetal brain": 3, "transventricular": 1, "cerebellum": 2},
    "femur": {"a photo of fetal femur": 1},
}


def test_tag_frequency_is_kohyas():
    from fulora.lora.checkpoints import tag_frequency

    pairs = [(folder, caption) for folder, caps in KOHYA_CAPTIONS.items() for caption in caps]
    assert tag_frequency(pairs) == KOHYA_TAG_FREQUENCY


# kohya's Min-SNR weights: sd-scripts 48d368fa, library/custom_train_functions.py, its own
# prepare_scheduler_for_custom_training and apply_snr_weight run (from a scratch script outside
# the repository) on a loss of ones, with train_network.py's SD1.x DDPMScheduler (scaled-linear
# betas 0.00085-0.012, 1000 steps), --min_snr_gamma 5, without and with --v_parameterization.
KOHYA_SNR_TIMESTEPS = [0, 1, 10, 100, 250, 500, 999]
KOHYA_MIN_SNR_WEIGHTS = {
    "epsilon": [0.0042537241, 0.0085344305, 0.048305679, 0.59144539, 1.0, 1.0, 1.0],
    "v_prediction": [
        0.0042501087,
        0.0085198879,
        0.047843456,
        0.52888417,
        0.6737923,
        0.2763325,
        0.0046600942,
    ],
}


@pytest.mark.parametrize("prediction", sorted(KOHYA_MIN_SNR_WEIGHTS))
def test_min_snr_weights_are_kohyas(prediction):
    from diffusers import DDPMScheduler

    from fulora.lora.tiny import sd15_scheduler
    from fulora.lora.train import min_snr_weights

    scheduler = DDPMScheduler.from_config(sd15_scheduler().config, prediction_type=prediction)
    weights = min_snr_weights(scheduler, torch.tensor(KOHYA_SNR_TIMESTEPS), 5.0)
    expected = torch.tensor(KOHYA_MIN_SNR_WEIGHTS[prediction])
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111's samplers are k-diffusion's (crowsonkb/k-diffusion 4601bf0: sample_euler,
# sample_heun, sample_lms, sample_dpmpp_2m; get_sigmas of DiscreteEpsDDPMDenoiser, or
# get_sigmas_karras for the Karras variants), run from a scratch script outside the
# repository, 30 steps, on SD1.5's noise schedule, from KDIFFUSION_NOISE, with
# _toy_eps as the model (an analytic eps-prediction: no weights needed, and it depends on the
# timestep as a UNet does). Numbers in float64, rounded to 10 digits.
KDIFFUSION_NOISE = [
    -2.3104118,
    -0.3732508613,
    -1.060816679,
    0.9995093548,
    -0.8840250046,
    -1.27554693,
    -0.6232245799,
    -0.8664416019,
    -1.29562714,
    1.523631623,
    0.3236605665,
    2.017726031,
    1.13574234,
    -1.226881339,
    0.07138847121,
    0.3380174031,
]
KDIFFUSION_X0 = {
    "euler": [
        -17.69926152,
        -3.343191234,
        -9.499640104,
        8.502270824,
        -8.071252559,
        -10.74779863,
        -5.707120716,
        -7.892969518,
        -10.87354555,
        10.30130418,
        5.066551879,
        13.7220308,
        9.041499971,
        -10.45791595,
        4.280316186,
        5.105603894,
    ],
    "heun": [
        -16.56722094,
        -3.522080332,
        -9.171359777,
        7.918350859,
        -7.768069179,
        -10.30585529,
        -5.656223142,
        -7.601977105,
        -10.40646142,
        9.915868643,
        4.961289304,
        13.28335299,
        8.625377946,
        -10.06544242,
        4.220357428,
        4.993607037,
    ],
    "lms": [
        -16.95834751,
        -3.431274428,
        -9.192252456,
        8.073181148,
        -7.751961943,
        -10.36437423,
        -5.615880429,
        -7.582495616,
        -10.47063836,
        10.01466621,
        4.978785164,
        13.44477025,
        8.742839414,
        -10.11282454,
        4.234724961,
        5.012036689,
    ],
    "lms_karras": [
        -16.77318199,
        -3.481743363,
        -9.187804381,
        8.019736442,
        -7.77162728,
        -10.34354318,
        -5.641572998,
        -7.603934774,
        -10.44763067,
        9.975964136,
        4.972860982,
        13.3739379,
        8.700766547,
        -10.0961237,
        4.229104411,
        5.005838813,
    ],
    "dpmpp_2m": [
        -16.73361071,
        -3.495426689,
        -9.155042682,
        7.98834585,
        -7.829540047,
        -10.30971458,
        -5.620074871,
        -7.662555802,
        -10.41782876,
        9.95402091,
        4.990224258,
        13.32640722,
        8.673853614,
        -10.05374028,
        4.238615975,
        5.022541228,
    ],
    "dpmpp_2m_karras": [
        -16.55896596,
        -3.486519957,
        -9.158681897,
        7.917152789,
        -7.747662625,
        -10.29746299,
        -5.635757179,
        -7.581110019,
        -10.39850187,
        9.909025875,
        4.953433061,
        13.26994963,
        8.625516448,
        -10.05614021,
        4.217886539,
        4.985593127,
    ],
}
# AUTOMATIC1111's own UniPC (modules/models/diffusion/uni_pc, vendored from wl-zhao/UniPC's
# stable-diffusion example; that example at cf9de85 run from a scratch script) with A1111's
# defaults (bh1, order 3, time_uniform, lower_order_final, multistep, predict_x0), uncond, from
# KDIFFUSION_NOISE in float32, the model _toy_eps, 30 steps on SD1.5's schedule.
A1111_UNIPC_X0 = [
    -16.79463577, -3.541300535, -9.270907402, 8.029123306, -7.873344898, -10.43284702,
    -5.72084713, -7.707383633, -10.53872299, 10.00300789, 4.991751194, 13.40351105,
    8.70964241, -10.18138313, 4.233722687, 5.02536726,
]  # fmt: skip
# A1111 v1.6+'s UniPC (its sd_samplers_timesteps_impl.unipc over the same uni_pc.py: 31 UniPC
# steps for 30), recorded in tests/reference/a1111_unipc.json (its 'source' says how)
A1111_UNIPC_V16_X0 = json.loads(
    (Path(__file__).parent / "reference" / "a1111_unipc.json").read_text()
)["x0"]["30/bh1/time_uniform/3/True/False"]
A1111_SAMPLER_X0 = {**KDIFFUSION_X0, "unipc": A1111_UNIPC_V16_X0}
# diffusers' own UniPC, fulora's until session 32, against the A1111 before v1.6 that it follows
A1111_SAMPLER_X0["unipc_diffusers"] = A1111_UNIPC_X0
# diffusers' own DPM-Solver, kept under these names for runs made before session 24
A1111_SAMPLER_X0 |= {f"{k}_diffusers": KDIFFUSION_X0[k] for k in ("dpmpp_2m", "dpmpp_2m_karras")}
# Relative L2 gap allowed between fulora's scheduler and A1111's sampler (measured: Euler
# 2.8e-7, Heun 2.7e-7, LMS 4.5e-7, LMS Karras 3.8e-8: the same sampler, up to diffusers
# interpolating sigmas linearly between training timesteps where k-diffusion interpolates
# log sigmas; DPM++ 2M Karras 2.2e-7 and DPM++ 2M 2.9e-7 (fulora's A1111 DPM-Solver);
# diffusers' own DPM-Solver, fulora's until session 24, 2.0e-3 (Karras): it starts from the
# noise times 1 where k-diffusion starts from sigma_max / sqrt(sigma_max^2 + 1) = 0.9977 of it
# in the same space, and it rounds the model's timesteps to integers; 3.3e-3 (DPM++ 2M): also
# another timestep spacing, diffusers' "linspace" for DPM-Solver taking n + 1 rounded points;
# UniPC 2.8e-7 from A1111 v1.6+'s, in float32 (fulora's A1111 times: diffusers' own UniPC,
# fulora's until session 32, is 6.3e-5 from A1111's before v1.6, rounding the model's
# timesteps, and 8e-5 from v1.6's, which takes 31 steps for 30). Before session 22 fulora's
# UniPC ended at sigma zero, and its last bh1 step gave NaN.
SAMPLER_GAP = {
    "unipc": 1e-6,
    "unipc_diffusers": 2e-4,
    "euler": 1e-6,
    "heun": 1e-6,
    "lms": 1e-6,
    "lms_karras": 1e-6,
    "dpmpp_2m": 1e-6,
    "dpmpp_2m_karras": 1e-6,
    "dpmpp_2m_diffusers": 5e-3,
    "dpmpp_2m_karras_diffusers": 3e-3,
}


def _toy_eps(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.sin(1.3 * x_in + t.to(x_in.dtype) / 250.0) + 0.2 * x_in


def _sample_as_the_pipeline(
    sampler: str, noise: torch.Tensor, generator=None, steps: int = 30, schedule=None
) -> torch.Tensor:
    """``steps`` steps of fulora's scheduler for ``sampler`` (on ``schedule``'s sigmas, if any)
    on _toy_eps, as diffusers' pipeline takes them: the noise times init_noise_sigma, then
    scale_model_input and step (with the images' generator, for a sampler that draws noise at
    each step)."""
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    scheduler = make_scheduler(sampler, sd15_scheduler().config, schedule)
    scheduler.set_timesteps(steps)
    step_noise = {} if generator is None else {"generator": [generator]}
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = _toy_eps(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **step_noise).prev_sample
    return x


@pytest.mark.parametrize("sampler", sorted(SAMPLER_GAP))
def test_samplers_are_automatic1111s(sampler):
    """fulora's scheduler for each A1111 sampler name, stepped as diffusers' pipeline steps it,
    against A1111's answer."""
    dtype = torch.float32 if sampler.startswith("unipc") else torch.float64
    noise = torch.tensor(KDIFFUSION_NOISE, dtype=dtype).reshape(1, 4, 2, 2)
    x = _sample_as_the_pipeline(sampler, noise)
    expected = torch.tensor(A1111_SAMPLER_X0[sampler], dtype=dtype)
    gap = float((x.flatten() - expected).norm() / expected.norm())
    assert gap < SAMPLER_GAP[sampler], f"{sampler}: {gap:.2e} from A1111's"


# AUTOMATIC1111's guidance of edited, alternated and AND prompts, end to end: its CFGDenoiser
# (reconstruct_multicond_batch, reconstruct_cond_batch, combine_denoised and its step counter,
# modules/sd_samplers_cfg_denoiser.py) with its prompt_parser's schedules over its total_steps
# (2 x steps for Heun), around k-diffusion's sample_euler / sample_heun and
# DiscreteEpsDDPMDenoiser, transcribed into a scratch script, guidance 7, from KDIFFUSION_NOISE.
# The model is _toy_eps with the conditioning added to its sine's angle, one number per text
# (_text_value), so the result depends on which text conditions which call. (model calls, x0),
# float64, 10 digits.
A1111_GUIDED_X0 = {
    ("euler", 10, "[fetal:brain:3]", "[blurry|noisy]"): (
        10,
        [0.9434526636, -3.88964364, -18.76582845, 15.32329187, -18.90825552, -18.9207902,
         -17.21175525, -18.92796466, -18.9412618, 20.13076488, 0.9431161168, 29.39569029,
         5.938562321, -18.87414926, 0.9391402086, 0.943360812],
    ),
    ("heun", 10, "fetal AND brain:0.5 AND [femur:bone:0.5] :-0.3", "[text::4]"): (
        19,
        [-2.449288946, -1.129860607, -1.552451778, 10.02448437, -1.37754581, -1.841304651,
         -1.231550771, -1.364934278, -1.864653562, 9.602540513, -1.185350279, 11.60692112,
         9.818486211, -1.778767609, -1.22325718, -1.172851367],
    ),
    ("euler", 10, "[fetal|brain|femur] :1.5", ""): (
        10,
        [-29.4380365, 4.051678898, -9.662177636, 4.051714134, -5.308484848, -17.75443977,
         4.05272254, -4.792138879, -18.00522267, 4.051698578, 4.05169743, 4.051696986,
         4.05170905, -16.08889772, 4.051702163, 4.051697739],
    ),
}  # fmt: skip


def _text_value(text: str) -> float:
    return (sum(map(ord, text)) % 101) / 50 - 1


class _ToyConditionalUNet(torch.nn.Module):
    """_toy_eps, each row's conditioning added to the sine's angle, called as a pipeline's UNet."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        self.calls += 1
        shift = encoder_hidden_states[:, 0, 0].reshape(-1, 1, 1, 1)
        angle = 1.3 * sample + timestep.to(sample.dtype) / 250.0 + shift
        return (0.5 * torch.sin(angle) + 0.2 * sample,)


class _RowCountingUNet(_ToyConditionalUNet):
    """The toy, counting the rows it runs (``calls``): fewer where a call skips the negative."""

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        self.calls += sample.shape[0] - 1
        return super().forward(sample, timestep, encoder_hidden_states, return_dict, **kwargs)


def _toy_conditioning(prompt: str, negative: str, steps: int, late: int = 0):
    """The toy's conditioning of each part and the negative; ``late``: each text's last step
    that many calls later, as a counter from 1 would have it."""
    from fulora.generate.guidance import Conditioning, Scheduled, stacked_parts
    from fulora.generate.schedules import read_prompt

    def scheduled(part):
        values = [[[_text_value(text)]] for text in part.texts]
        ends = tuple(end + late for end, _ in part.schedule)
        return Scheduled(ends, torch.tensor(values, dtype=torch.float64))

    parts = [(part.weight, scheduled(part)) for part in read_prompt(prompt, steps)]
    [negative_part] = read_prompt(negative, steps, negative=True)
    return Conditioning(stacked_parts(parts), scheduled(negative_part))


def _toy_guided_x0(sampler: str, steps: int, conditioning, skip=None) -> tuple[int, torch.Tensor]:
    """(UNet calls, x0): ``steps`` of fulora's scheduler, the toy guided by fulora's hooks with
    guidance 7 (and ``skip``), stepped as diffusers' pipeline steps."""
    from fulora.generate.guidance import guided
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    unet = _ToyConditionalUNet() if skip is None else _RowCountingUNet()
    scheduler = make_scheduler(sampler, sd15_scheduler().config)
    scheduler.set_timesteps(steps)
    x = torch.tensor(KDIFFUSION_NOISE, dtype=torch.float64).reshape(1, 4, 2, 2)
    x = x * scheduler.init_noise_sigma
    first_prompt, first_negative = conditioning.first()
    hidden = torch.cat([first_negative, first_prompt])  # what generate hands the pipeline
    with guided(unet, conditioning, images=1, skip=skip):
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, prompted = unet(model_input, t, encoder_hidden_states=hidden)[0].chunk(2)
            x = scheduler.step(uncond + 7.0 * (prompted - uncond), t, x).prev_sample
    return unet.calls, x.flatten()


@pytest.mark.parametrize(("sampler", "steps", "prompt", "negative"), list(A1111_GUIDED_X0))
def test_edited_and_and_prompts_are_guided_as_automatic1111_guides_them(
    sampler, steps, prompt, negative
):
    """Which text each UNet call gets and each part's weight, against A1111's CFGDenoiser around
    k-diffusion. The gap allowed is the samplers' own: diffusers interpolates sigmas linearly
    where k-diffusion interpolates log sigmas, which guidance 7 amplifies (a plain prompt with
    Heun gave 5.1e-6 at 5 steps, 1.5e-6 at 10)."""
    from fulora.generate.schedules import schedule_steps

    total = schedule_steps(sampler, steps)
    calls, x0 = _toy_guided_x0(sampler, steps, _toy_conditioning(prompt, negative, total))
    expected_calls, expected = A1111_GUIDED_X0[(sampler, steps, prompt, negative)]
    expected = torch.tensor(expected, dtype=torch.float64)
    assert calls == expected_calls
    gap = float((x0 - expected).norm() / expected.norm())
    assert gap < 5e-6, f"{gap:.2e} from A1111's"
    # one call late, as a step counter from 1 would be, is far from A1111's
    _, late = _toy_guided_x0(sampler, steps, _toy_conditioning(prompt, negative, total, late=1))
    assert float((late - expected).norm() / expected.norm()) > 1e-3


# A1111's "NGMS" (s_min_uncond), "NGMS all steps" and "Skip Early CFG" (skip_early_cond): the
# same scratch CFGDenoiser with its v1.10 forward's skips (a skipped call runs the parts' rows
# only, the first part's prediction standing in for the negative's, combined at cond_scale 1),
# by (sampler, steps, prompt, negative, NGMS, NGMS all steps, Skip Early CFG): (UNet rows, x0).
A1111_SKIPPED_X0 = {
    ("euler", 10, "[fetal:brain:3]", "[blurry|noisy]", 3.0, False, 0.0): (
        16,
        [-2.49955481, -4.98441086, -17.40896911, 15.2761543, -17.51744079, -17.53757835,
         -17.19877933, -17.54985788, -17.57459963, 16.65628388, -3.890934712, 25.51266838,
         10.77090142, -17.47149749, -4.295833726, -3.832226022],
    ),
    ("heun", 10, "fetal AND brain:0.5 AND [femur:bone:0.5] :-0.3", "[text::4]", 1.5, True, 0.0): (
        66,
        [-4.69357933, -3.268919973, -4.409933203, 11.87011788, -4.211021072, -4.560027136,
         -3.838536852, -4.189556891, -4.567993666, 11.46137765, -3.628804887, 12.2738085,
         11.72994994, -4.536550259, -3.80557339, -3.559543605],
    ),
    ("euler", 10, "[fetal|brain|femur] :1.5", "", 0.0, False, 0.3): (
        16,
        [-19.63961969, -1.069114235, -10.38708398, 8.980145157, -7.482286915, -11.13655975,
         -5.886962033, -7.231282156, -11.26251642, 13.35037969, 4.053765015, 14.0346215,
         9.227750542, -10.91263729, 4.03716632, 4.054438238],
    ),
    ("euler", 10, "fetal brain", "blurry", 2.0, False, 0.2): (
        14,
        [-20.10023897, -1.525532754, -9.46972138, 8.598453803, -7.43998343, -11.35481502,
         -5.261715031, -7.265707197, -11.5303053, 10.76255105, 4.753871746, 13.86480842,
         9.03785561, -10.95814853, 4.101573128, 4.802392683],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(A1111_SKIPPED_X0))
def test_skipped_negative_passes_are_automatic1111s(case):
    """The calls that run without the negative prompt (fewer UNet rows: 16 of 20, 66 of 76) and
    what stands in for it, against A1111's CFGDenoiser around k-diffusion, within the gap of
    the guided test above; without the skips the result is far from it."""
    from fulora.generate.guidance import UncondSkip
    from fulora.generate.schedules import schedule_steps
    from fulora.generate.sigmas import DiscreteSigmas
    from fulora.lora.tiny import sd15_scheduler

    sampler, steps, prompt, negative, ngms, ngms_all, early = case
    total = schedule_steps(sampler, steps)
    sigmas = DiscreteSigmas(sd15_scheduler().alphas_cumprod)
    skip = UncondSkip(7.0, total, early, ngms, ngms_all, lambda t: sigmas.t_to_sigma(t).item())
    conditioning = _toy_conditioning(prompt, negative, total)
    rows, x0 = _toy_guided_x0(sampler, steps, conditioning, skip)
    expected_rows, expected = A1111_SKIPPED_X0[case]
    expected = torch.tensor(expected, dtype=torch.float64)
    assert rows == expected_rows
    assert float((x0 - expected).norm() / expected.norm()) < 5e-6
    _, unskipped = _toy_guided_x0(sampler, steps, conditioning)
    assert float((unskipped - expected).norm() / expected.norm()) > 1e-3


# The same end to end on fulora:phantom-sd, fp32 CPU: A1111's conditioning (prompt_parser's
# schedules and AND, FrozenCLIPEmbedderWithCustomWords.forward on each schedule's texts) and its
# CFGDenoiser (a pass of its own for a negative prompt of another chunk count) around
# k-diffusion's sample_euler and DiscreteEpsDDPMDenoiser, on the model's text encoder and UNet,
# transcribed into a scratch script; 10 steps, guidance 7, the noise of the seed drawn on the CPU
# (A1111's RNG "CPU"). The first prompt's negative is two chunks long. (seed, steps, prompt,
# negative): (sum of x0, sum of |x0|, its first 6 values), x0 of shape (1, 4, 12, 16).
A1111_PHANTOM_X0 = {
    (
        7,
        10,
        "a photo of [fetal:(fetal ultrasound:1.2):3] brain AND femur, bone :0.4",
        "[blurry|noisy], " + "text, " * 40,
    ): (
        -218.03231811523438,
        999.7175903320312,
        [0.077721633, 0.72866553, 0.61277801, -0.59339041, -0.002947897, 0.29218838],
    ),
    (11, 10, "[thorax|abdomen] :1.3", ""): (
        250.5037841796875,
        474.1033935546875,
        [0.16351494, 0.38092974, 0.15577109, 0.15057434, 0.082049243, 0.3263014],
    ),
}


@pytest.mark.parametrize(("seed", "steps", "prompt", "negative"), list(A1111_PHANTOM_X0))
def test_generate_conditions_and_guides_as_automatic1111_on_a_real_model(
    seed, steps, prompt, negative
):
    """fulora's whole path (encode_prompts, the hooks, diffusers' pipeline with Euler) against
    A1111's: measured 1e-6 apart in the sum, 2e-6 in any value shown. Each call conditioned one
    call late moves the sums by 3.8 and 10, the negative's padding left unmasked by 0.5."""
    from types import SimpleNamespace

    from fulora.generate.config import GenerateConfig
    from fulora.generate.encode import encode_prompts
    from fulora.generate.run import _denoise
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.base import load_pipeline
    from fulora.shipped import PHANTOM_SD, shipped_model

    pipe = load_pipeline(str(shipped_model(PHANTOM_SD)), dtype=torch.float32)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    conditioning = encode_prompts(pipe, prompt, negative, steps, 1, "cpu")
    cfg, size = GenerateConfig(steps=steps, guidance=7.0), SimpleNamespace(height=48, width=64)
    x0 = _denoise(pipe, conditioning, [seed], cfg, size)
    total, magnitude, first = A1111_PHANTOM_X0[(seed, steps, prompt, negative)]
    assert x0.shape == (1, 4, 12, 16)
    # bounds 10-50x the gap measured here, for other CPUs' fp32 rounding through 10 guided
    # steps; far below what a wrong call or mask moves (3.8 and 0.5 in the sum)
    assert x0.sum().item() == pytest.approx(total, abs=1e-2)
    assert x0.abs().sum().item() == pytest.approx(magnitude, rel=5e-5)
    assert x0.flatten()[:6].tolist() == pytest.approx(first, abs=1e-4)


# The same with A1111's "Pad prompt/negative prompt" (pad_cond_uncond: the shorter side gets
# the empty prompt's chunks, sd_model.cond_stage_model_empty_prompt = cond_stage_model([""]))
# and its v0 (pad_cond_uncond_v0: the negative's last vector repeated, or the negative cut), as
# its v1.10 CFGDenoiser.forward pads them, in the same scratch script. (pad, seed, steps, prompt,
# negative): as A1111_PHANTOM_X0. Unpadded (each side apart), the third case's sum is 29.59.
_LONG_NEGATIVE = "[blurry|noisy], " + "text, " * 40
_EDITED_AND = "a photo of [fetal:(fetal ultrasound:1.2):3] brain AND femur, bone :0.4"
A1111_PADDED_X0 = {
    ("on", 7, 10, _EDITED_AND, _LONG_NEGATIVE): (
        -215.743408203125,
        992.7166748046875,
        [0.075511292, 0.65938717, 0.58435541, -0.5795294, -0.029007012, 0.29147077],
    ),
    ("v0", 7, 10, _EDITED_AND, _LONG_NEGATIVE): (
        -350.5418701171875,
        1153.0389404296875,
        [0.048683114, 0.81242633, 0.62832946, -0.7058872, -0.019183284, 0.19743687],
    ),
    ("on", 5, 10, "fetal brain, " * 30, "blurry"): (
        93.22822570800781,
        588.8819580078125,
        [1.1487324, 0.37863132, -0.4497346, -0.51052403, 1.3388551, -0.24460852],
    ),
    ("v0", 5, 10, "fetal brain, " * 30, "blurry"): (
        131.71322631835938,
        557.0004272460938,
        [1.1381692, 0.34587601, -0.42383841, -0.47035104, 1.3433461, -0.25480789],
    ),
}


@pytest.mark.parametrize(("pad", "seed", "steps", "prompt", "negative"), list(A1111_PADDED_X0))
def test_padded_sides_are_automatic1111s_on_a_real_model(pad, seed, steps, prompt, negative):
    """pad_conds on and v0, through encode_prompts, the hooks (an edited AND prompt, its two-chunk
    negative) or the plain path (a two-chunk prompt) and diffusers' pipeline, against A1111's."""
    from types import SimpleNamespace

    from fulora.generate.config import GenerateConfig
    from fulora.generate.encode import empty_prompt, encode_prompts
    from fulora.generate.run import _denoise
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.base import load_pipeline
    from fulora.shipped import PHANTOM_SD, shipped_model

    pipe = load_pipeline(str(shipped_model(PHANTOM_SD)), dtype=torch.float32)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    empty = empty_prompt(pipe, 1, "cpu")
    conditioning = encode_prompts(pipe, prompt, negative, steps, 1, "cpu", pad=pad, empty=empty)
    assert conditioning.padded
    cfg = GenerateConfig(steps=steps, guidance=7.0, pad_conds=pad)
    x0 = _denoise(pipe, conditioning, [seed], cfg, SimpleNamespace(height=48, width=64))
    total, magnitude, first = A1111_PADDED_X0[(pad, seed, steps, prompt, negative)]
    assert x0.sum().item() == pytest.approx(total, abs=1e-2)  # the bounds of the test above
    assert x0.abs().sum().item() == pytest.approx(magnitude, rel=5e-5)
    assert x0.flatten()[:6].tolist() == pytest.approx(first, abs=1e-4)


# k-diffusion's sample_dpmpp_2m (4601bf0) at 10 steps, as KDIFFUSION_X0 (from the same scratch
# script): a short schedule, where diffusers' DPM-Solver has its own lower-order rules.
KDIFFUSION_X0_10_STEPS = {
    "dpmpp_2m_karras": [
        -16.42793299, -3.196528501, -8.976803235, 7.112856038, -7.322585988, -9.943205347,
        -5.424446035, -7.149948357, -10.01770868, 9.610031925, 4.729397116, 13.02257587,
        8.069370789, -9.766694098, 4.128548015, 4.755126559,
    ],
    "dpmpp_2m": [
        -18.31339048, -3.275000593, -9.39282147, 8.170989046, -7.690872933, -9.866715632,
        -5.029403243, -7.449531728, -9.961933849, 9.845130155, 4.913003879, 13.44533417,
        8.600451403, -9.678800052, 4.180944055, 4.944149447,
    ],
}  # fmt: skip


@pytest.mark.parametrize("sampler", sorted(KDIFFUSION_X0_10_STEPS))
def test_dpm_solver_is_automatic1111s_on_a_short_schedule_too(sampler):
    """10 steps (measured: 3.0e-7 Karras, 2.0e-7 without)."""
    noise = torch.tensor(KDIFFUSION_NOISE, dtype=torch.float64).reshape(1, 4, 2, 2)
    x = _sample_as_the_pipeline(sampler, noise, steps=10)
    expected = torch.tensor(KDIFFUSION_X0_10_STEPS[sampler], dtype=torch.float64)
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-6


# AUTOMATIC1111's own ddim and plms (modules/sd_samplers_timesteps_impl.py at 2035cbb, run
# from a scratch script with k-diffusion 4601bf0 and stubs for its unused imports) on the
# timesteps its get_timesteps (modules/sd_samplers_timesteps.py, 1c77b18) gives at its defaults,
# from KDIFFUSION_NOISE in float64, the model _toy_eps, on SD1.5's schedule. 20 steps: A1111
# evaluates the model 19 times; 27: its grid's top, 1000, is clipped to 999.
A1111_TIMESTEP_X0 = {
    ("ddim", 20): [
        -14.34940475, -2.887157669, -7.528795702, 6.723995281, -6.376244919, -8.987798467,
        -4.981423399, -6.276075477, -9.102742713, 9.186280949, 4.628622028, 10.8730147,
        7.497985111, -8.689964156, 3.156622918, 4.664013438,
    ],
    ("ddim", 27): [
        -17.91946587, -3.349888906, -9.605870447, 8.588273069, -8.152588146, -10.8991262,
        -5.783950129, -7.974734074, -11.0282157, 10.44143789, 5.123300081, 13.8613946,
        9.129283035, -10.60009381, 4.304459915, 5.164332864,
    ],
    ("ddim", 30): [
        -16.94447686, -3.30681556, -9.240271006, 8.226536045, -7.749678575, -10.48024053,
        -5.631695984, -7.582168829, -10.59079967, 10.11891384, 5.014185367, 13.3560802,
        8.854072406, -10.21650029, 4.173610841, 5.051612666,
    ],
    ("plms", 20): [
        -13.33945911, -3.030029743, -7.149894432, 6.073515481, -6.160467213, -8.505174426,
        -4.919100816, -6.074219778, -8.619196848, 8.709443041, 4.549253445, 10.31466843,
        6.679229026, -8.214164701, 2.890907618, 4.582293776,
    ],
    ("plms", 27): [
        -16.76920932, -3.553160521, -9.319370473, 8.020622476, -7.909474334, -10.50232985,
        -5.747528704, -7.742978577, -10.60986347, 10.01630616, 5.005592179, 13.39139129,
        8.709468266, -10.24682317, 4.2365302, 5.039451975,
    ],
    ("plms", 30): [
        -16.04699487, -3.475499107, -8.966476851, 7.660633765, -7.530209421, -10.15656093,
        -5.597460806, -7.375289269, -10.25471506, 9.800909358, 4.924902206, 12.84410673,
        8.432286611, -9.916133803, 4.109223143, 4.957377187,
    ],
}  # fmt: skip
# The timesteps A1111's functions ran the model at (recorded from the same runs); PLMS's
# first step runs it at both ends.
A1111_DDIM_CALLS = {
    20: list(range(951, 50, -50)),
    27: [999, *range(963, 37, -37)],
    30: list(range(991, 33, -33)),
}


def _plms_calls(steps: int) -> list[int]:
    ddim = A1111_DDIM_CALLS[steps]
    return ddim[:2] + ddim[1:]


@pytest.mark.parametrize(("sampler", "steps"), sorted(A1111_TIMESTEP_X0))
def test_ddim_and_plms_are_automatic1111s(sampler, steps):
    """fulora's DDIM and PLMS, stepped as diffusers' pipeline steps them, against A1111's own
    (measured: 0.8-2.7e-10 relative in float64, the recorded values' 10 significant digits;
    diffusers' own DDIM and PNDM, fulora's until session 24, were 15% away at 30 steps)."""
    noise = torch.tensor(KDIFFUSION_NOISE, dtype=torch.float64).reshape(1, 4, 2, 2)
    x = _sample_as_the_pipeline(sampler, noise, steps=steps)
    expected = torch.tensor(A1111_TIMESTEP_X0[(sampler, steps)], dtype=torch.float64)
    gap = float((x.flatten() - expected).norm() / expected.norm())
    assert gap < 1e-9, f"{sampler} at {steps} steps: {gap:.2e} from A1111's"


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_ddim_and_plms_take_a_v_prediction_as_a1111_does(sampler):
    """A v-prediction model (SD2's kind) is turned into a noise estimate the way A1111's
    CompVisTimestepsVDenoiser does, eps = sqrt(a) v + sqrt(1 - a) x: a model giving the v of
    _toy_eps makes the same samples as _toy_eps itself."""
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    config = sd15_scheduler().config
    ends = []
    for prediction in ("epsilon", "v_prediction"):
        scheduler = make_scheduler(sampler, {**config, "prediction_type": prediction})
        scheduler.set_timesteps(20)
        x = torch.tensor(KDIFFUSION_NOISE, dtype=torch.float64).reshape(1, 4, 2, 2)
        for t in scheduler.timesteps:
            out = _toy_eps(x, t)
            if prediction == "v_prediction":
                a = float(scheduler.alphas_cumprod[t])
                out = (out - (1 - a) ** 0.5 * x) / a**0.5
            x = scheduler.step(out, t, x).prev_sample
        ends.append(x)
    torch.testing.assert_close(ends[1], ends[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", sorted(A1111_DDIM_CALLS))
@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_the_pipeline_runs_the_unet_where_a1111_runs_its_model(tiny_model, sampler, steps):
    """Through diffusers' own pipeline loop, the UNet runs at A1111's timesteps, no others."""
    from fulora.generate.samplers import make_scheduler

    pipe = _pipe(tiny_model)
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ran_at = []
    pipe.unet.register_forward_pre_hook(
        lambda _, args: ran_at.append(int(args[1])), with_kwargs=False
    )
    pipe("a photo of fetal brain", num_inference_steps=steps, guidance_scale=1.0,
         height=32, width=32, output_type="latent")  # fmt: skip
    expected = A1111_DDIM_CALLS[steps] if sampler == "DDIM" else _plms_calls(steps)
    assert ran_at == expected


# k-diffusion's sample_euler_ancestral (4601bf0) with AUTOMATIC1111's noise for RNG "CPU"
# (modules/rng.py ImageRNG: the image's CPU generator, seeded with its seed, draws the initial
# noise, and each step's noise continues it), in fp32, seed 2671683630, latents (4, 2, 2), the
# model _toy_eps, 30 steps on SD1.5's schedule; run from the same scratch script.
KDIFFUSION_EULER_A_SEED = 2671683630
KDIFFUSION_EULER_A_X0 = [
    3.1314492,
    13.022862,
    4.3497901,
    4.0729575,
    4.9666462,
    4.0621839,
    3.8217833,
    4.2866759,
    3.1778505,
    -5.7885928,
    -11.843514,
    -5.7975416,
    -8.9886036,
    3.6069264,
    -4.9746079,
    0.54827994,
]


def test_euler_a_draws_automatic1111s_step_noise():
    """Euler a adds fresh noise at each step: fulora's (diffusers' scheduler, given the image's
    generator after its initial noise, as generate passes it) is A1111's with RNG "CPU", the
    setting each PNG names (measured 2.1e-6 relative, fp32 rounding)."""
    generator = torch.Generator().manual_seed(KDIFFUSION_EULER_A_SEED)
    noise = torch.randn((1, 4, 2, 2), generator=generator)
    x = _sample_as_the_pipeline("Euler a", noise, generator)
    expected = torch.tensor(KDIFFUSION_EULER_A_X0)
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-5


# The same sampler with AUTOMATIC1111's other noise settings (modules/rng.py ImageRNG, read at
# commit 0d5dc9a6): RNG "NV" (rng_philox.Generator: the initial noise is the image's generator's
# first draw, each step's noise its next) and "Eta noise seed delta" (ENSD: after the initial
# noise, each image's generator is a new one seeded with its seed + ENSD), by (rng, seed, ENSD),
# from a second scratch transcription of sample_euler_ancestral and ImageRNG (the same model,
# schedule and steps; it gives KDIFFUSION_EULER_A_X0 within 3e-7 for RNG "CPU" without ENSD).
A1111_EULER_A_X0 = {
    ("nv", 2671683630, 0): [
        0.71005499, -0.44516891, -5.1013274, -14.134158, -1.3796674, 8.2413015, -9.0282135,
        9.1486626, -1.9276326, 9.5178728, 4.4684424, -0.31765825, -0.91393077, -5.7998838,
        -6.2535706, -5.725348,
    ],
    ("nv", 2671683630, 31337): [
        -5.3890996, 4.6868682, 4.9355483, -5.4611454, 5.4223866, 4.8212581, -8.8641605,
        5.4524179, -4.9616213, -0.77048963, 3.1487665, 4.1196117, -3.6423869, -6.093174,
        -10.351938, 0.055819225,
    ],
    ("cpu", 2671683630, 31337): [
        0.36519408, 11.972355, -1.5597939, 6.4121118, 5.939024, 2.5467443, 5.0031633,
        4.9975286, 3.1786232, -9.2931957, -12.993433, 8.9644222, -10.417038, -0.54055148,
        -6.1664777, -0.98378903,
    ],
    ("nv", 2**40 + 12345, 0): [
        6.2901053, -4.9401174, -11.797655, -19.081553, -13.823107, -15.926934, -4.6243076,
        5.7472124, -5.2158709, -15.629546, 5.1142802, 3.5557268, -10.293674, 3.6548877,
        10.838981, 6.4843707,
    ],
}  # fmt: skip


@pytest.mark.parametrize(("rng", "seed", "delta"), sorted(A1111_EULER_A_X0))
def test_euler_a_draws_a1111s_step_noise_from_nv_and_with_ensd(rng, seed, delta):
    """fulora's Euler a, its noise from ImageNoise as generate draws it (NV: the scheduler's
    step_noise; CPU: diffusers' generators), against A1111's (measured 2.6e-6 to 4.2e-6
    relative, fp32 rounding; NV's step noise one draw early, 0.39, and ENSD's generators not
    seeded anew, 0.34)."""
    from fulora.generate.noise import ImageNoise
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    noise = ImageNoise(rng, [seed], torch.Size((1, 4, 2, 2)), torch.device("cpu"), delta)
    scheduler = make_scheduler("Euler a", sd15_scheduler().config)
    scheduler.set_timesteps(30)
    scheduler.step_noise = noise.step_noise if rng == "nv" else None
    x = noise.first() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = _toy_eps(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=noise.generators).prev_sample
    expected = torch.tensor(A1111_EULER_A_X0[(rng, seed, delta)])
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-5


# A1111's variation seed (modules/rng.py ImageRNG.first with subseeds, @0d5dc9a6): the image's
# first draw moved towards its variation seed's first draw by the strength with A1111's slerp
# (its columns along dim 1; a linear mix the other way round where they are near parallel, as
# for a variation seed equal to the seed), from a third scratch transcription, latents (4, 48,
# 64): (rng, seed, variation seed, strength): (values at (0,0,0), (1,20,30), (3,47,63), sum,
# sum of |x|); and Euler a (as A1111_EULER_A_X0) with NV noise, variation seed 99 at 0.4, whose
# step noise stays the seed's.
A1111_VARIATION_NOISE = {
    ("cpu", 2671683630, 1234, 0.3): (
        [0.5766032338142395, 0.5119286775588989, 0.11014324426651001],
        98.7329995026812,
        9864.800122483633,
    ),
    ("nv", 2671683630, 1234, 0.3): (
        [-1.0065158605575562, -0.3486816883087158, -1.3032243251800537],
        -65.91561012808233,
        9890.276065486483,
    ),
    ("cpu", 7, 7, 0.5): (
        [-0.8201345205307007, -1.5538134574890137, 1.1369215250015259],
        145.41300351802784,
        9783.318571700409,
    ),
    ("cpu", 2671683630, 1234, 1.0): (
        [-0.1117185652256012, 0.32595184445381165, -0.9013316035270691],
        3.81323727677227,
        9880.494473873725,
    ),
    ("nv", 2**40 + 12345, 2**33 + 5, 0.05): (
        [0.8243058919906616, -0.013355735689401627, 1.5171003341674805],
        -119.98905791540165,
        9878.834992103395,
    ),
}
A1111_EULER_A_VARIATION_X0 = [
    -1.0394346, -1.3275671, -8.3175144, -11.158835, 3.1227322, 6.6502542, -6.5299501, 9.250102,
    -6.1464286, 9.1603498, 8.9149542, -1.4640503, -1.2175864, -5.742672, -10.544387, -5.9234934,
]  # fmt: skip


@pytest.mark.parametrize(("rng", "seed", "variation", "strength"), list(A1111_VARIATION_NOISE))
def test_a_variation_seed_moves_the_noise_as_automatic1111s(rng, seed, variation, strength):
    """Bit for bit (the values) and to float64 summation (the sums), both branches of A1111's
    slerp; strength 1 is the variation seed's own noise."""
    from fulora.generate.noise import ImageNoise

    values, total, magnitude = A1111_VARIATION_NOISE[(rng, seed, variation, strength)]
    shape, cpu = torch.Size((1, 4, 48, 64)), torch.device("cpu")
    noise = ImageNoise(rng, [seed], shape, cpu, variation_seeds=[variation],
                       variation_strength=strength).first()[0]  # fmt: skip
    assert [noise[0, 0, 0].item(), noise[1, 20, 30].item(), noise[3, 47, 63].item()] == values
    assert noise.double().sum().item() == pytest.approx(total, rel=1e-12)
    assert noise.double().abs().sum().item() == pytest.approx(magnitude, rel=1e-12)
    if strength == 1:
        assert torch.equal(noise, ImageNoise(rng, [variation], shape, cpu).first()[0])


# A1111's "Seed resize from" (the same ImageRNG.first, transcribed with it): the seed's noise
# drawn at that size (latents: pixels // 8) in the middle of its full-size first draw, cropped
# where larger (600x450 into 64x48 latents: one column short, the full draw's kept there), with
# a variation too; (rng, seed, variation seed, strength, (width, height)): (values at
# (0,0,0), (1,20,30), (3,47,63), (2,10,63), sum, sum of |x|). And the CPU generator's next draw
# after a resized start at (4, 2, 2) (Euler a's first step noise), seed 5, from 8x24.
A1111_SEED_RESIZE_NOISE = {
    ("cpu", 2671683630, 0, 0.0, (320, 256)): (
        [0.7412681579589844, -1.1316673755645752, 0.5718385577201843, 1.4286195039749146],
        148.16416127275443,
        9771.869261618063,
    ),
    ("nv", 2671683630, 0, 0.0, (600, 450)): (
        [-2.546379804611206, 1.9173742532730103, -1.8111436367034912, -1.5820589065551758],
        -23.62847200419128,
        9846.30050551944,
    ),
    ("cpu", 2671683630, 1234, 0.3, (600, 450)): (
        [2.2589097023010254, 0.6245213150978088, 0.5718385577201843, 1.4286195039749146],
        163.05255720531568,
        9874.317554661538,
    ),
    ("nv", 2**40 + 12345, 77, 0.6, (320, 256)): (
        [0.8861610293388367, -0.5408254265785217, 1.516371726989746, 0.8451470136642456],
        -179.45674437899652,
        9792.61098473366,
    ),
}
A1111_STEP_AFTER_RESIZE = [
    2.779863119125366, 1.2220252752304077, -0.33644935488700867, -0.9650601744651794,
    -0.1296626776456833, -0.6017656326293945, 0.14499856531620026, -0.14982716739177704,
    -0.43739840388298035, 0.7792337536811829, -0.05833946168422699, -2.0304951667785645,
    1.4829323291778564, 0.49403807520866394, 0.24921877682209015, 1.7470314502716064,
]  # fmt: skip


@pytest.mark.parametrize("case", list(A1111_SEED_RESIZE_NOISE))
def test_seed_resize_from_draws_the_noise_as_automatic1111s(case):
    """Bit for bit; a resize to the image's own size is no resize, as in A1111."""
    from fulora.generate.noise import ImageNoise

    rng, seed, variation, strength, (width, height) = case
    values, total, magnitude = A1111_SEED_RESIZE_NOISE[case]
    shape, cpu = torch.Size((1, 4, 48, 64)), torch.device("cpu")
    varied = dict(variation_seeds=[variation], variation_strength=strength) if strength else {}
    noise = ImageNoise(rng, [seed], shape, cpu, resize_from=(height // 8, width // 8), **varied)
    x = noise.first()[0]
    found = [x[0, 0, 0].item(), x[1, 20, 30].item(), x[3, 47, 63].item(), x[2, 10, 63].item()]
    assert found == values
    assert x.double().sum().item() == pytest.approx(total, rel=1e-12)
    assert x.double().abs().sum().item() == pytest.approx(magnitude, rel=1e-12)
    same = ImageNoise(rng, [seed], shape, cpu, resize_from=(48, 64), **varied).first()
    assert torch.equal(same, ImageNoise(rng, [seed], shape, cpu, **varied).first())
    small = ImageNoise("cpu", [5], torch.Size((1, 4, 2, 2)), cpu, resize_from=(3, 1))
    small.first()
    step = torch.randn((1, 4, 2, 2), generator=small.generators[0])
    assert step.flatten().tolist() == A1111_STEP_AFTER_RESIZE


def test_euler_a_with_a_variation_seed_keeps_the_seeds_step_noise():
    """A1111's variation seed changes the starting noise only (measured 4.2e-6 relative)."""
    from fulora.generate.noise import ImageNoise
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    noise = ImageNoise("nv", [2671683630], torch.Size((1, 4, 2, 2)), torch.device("cpu"),
                       variation_seeds=[99], variation_strength=0.4)  # fmt: skip
    scheduler = make_scheduler("Euler a", sd15_scheduler().config)
    scheduler.set_timesteps(30)
    scheduler.step_noise = noise.step_noise
    x = noise.first() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(_toy_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    expected = torch.tensor(A1111_EULER_A_VARIATION_X0)
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-5


# Euler a at A1111's other "Eta" (its setting eta_ancestral; k-diffusion's get_ancestral_step:
# sigma_up = min(sigma_to, eta x its eta-1 value); eta 0 adds none, though A1111 still draws),
# from the same scratch transcription: (rng, seed, ENSD, eta): x0 as A1111_EULER_A_X0's.
A1111_EULER_A_ETA_X0 = {
    ("cpu", 2671683630, 0, 0.5): [
        4.5181527, 11.321563, 4.7024326, 4.242331, 8.7529478, 4.4997735, 4.3083458, 5.0090017,
        -1.2561127, -6.0956197, -18.031391, -5.2441363, -11.029571, 4.1702304, -6.2292132,
        -1.4613633,
    ],
    ("nv", 2671683630, 31337, 0.67): [
        -5.0916557, 6.1747518, -0.45792678, -9.7438707, 6.0557084, 7.1187587, -10.669137,
        9.4406719, -4.9949136, 2.927104, 0.84031481, 4.1922679, -3.1170366, -6.8912387,
        -11.310651, -1.2291998,
    ],
    ("cpu", 2671683630, 0, 0.0): [
        6.8958483, 7.2991643, 3.8716552, 4.1895704, 9.4289713, 4.8723001, 4.7941074, 5.2381454,
        -3.986726, -4.4971042, -19.693949, 4.1499743, -10.970866, -2.1651535, -6.6938601,
        -5.4665532,
    ],
}  # fmt: skip


@pytest.mark.parametrize(("rng", "seed", "delta", "eta"), list(A1111_EULER_A_ETA_X0))
def test_euler_a_at_another_eta_is_automatic1111s(rng, seed, delta, eta):
    """The step noise fed to the scheduler for every source, as generate feeds it at an eta
    other than 1 (measured 5.7e-7 to 5.0e-6 relative; at eta 1 the same images are 0.1 and
    more away)."""
    from fulora.generate.noise import ImageNoise
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    noise = ImageNoise(rng, [seed], torch.Size((1, 4, 2, 2)), torch.device("cpu"), delta)
    scheduler = make_scheduler("Euler a", sd15_scheduler().config)
    scheduler.set_timesteps(30)
    x = noise.first() * scheduler.init_noise_sigma
    scheduler.step_noise, scheduler.eta = noise.step_noise, eta
    for t in scheduler.timesteps:
        x = scheduler.step(_toy_eps(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    expected = torch.tensor(A1111_EULER_A_ETA_X0[(rng, seed, delta, eta)])
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-5


# A1111's DDIM at its other "Eta DDIM" (sd_samplers_timesteps_impl.ddim @2035cbbd: at each
# step, sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)), the direction shortened
# to sqrt(1 - a_prev - sigma^2) and sigma times the image's next draw added), transcribed with
# ImageRNG in a scratch script, 20 steps on SD1.5's alphas from the same noise, the model
# _toy_eps: (rng, seed, ENSD, eta): x.
A1111_DDIM_ETA_X = {
    ("cpu", 2671683630, 0, 0.5): [
        4.3552761, 9.5643978, 4.3503513, 2.3021464, 7.6062946, 4.2299695, 3.7068145, 4.6134524,
        -1.584673, -4.4498582, -14.956039, -4.3858166, -8.7367449, 3.9562616, -5.4646149,
        -3.2571266,
    ],
    ("nv", 2671683630, 31337, 1.0): [
        -3.7452629, 3.9843667, -0.14388713, -5.2968884, 4.5517731, 4.5824218, -8.0391645,
        7.1785617, -3.1388075, 0.76906192, -0.86101723, 4.4037914, -4.5755858, -5.2295141,
        -10.815071, -1.3790132,
    ],
    ("cpu", 2671683630, 0, 0.0): [
        5.6418848, 5.8344688, 1.5910174, 2.8107417, 8.1711874, 4.4254622, 4.3269444, 4.773984,
        -3.3788099, -3.8370006, -15.84059, 2.650681, -9.1861172, -2.098444, -5.6391654,
        -4.777492,
    ],
}  # fmt: skip


@pytest.mark.parametrize(("rng", "seed", "delta", "eta"), list(A1111_DDIM_ETA_X))
def test_ddim_at_another_eta_is_automatic1111s(rng, seed, delta, eta):
    """Measured 2.9e-7 to 5.1e-7 relative (fp32 noise); eta 0 is the deterministic DDIM."""
    from fulora.generate.noise import ImageNoise
    from fulora.generate.samplers import make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    noise = ImageNoise(rng, [seed], torch.Size((1, 4, 2, 2)), torch.device("cpu"), delta)
    scheduler = make_scheduler("DDIM", sd15_scheduler().config)
    scheduler.set_timesteps(20)
    x = noise.first().double()
    scheduler.step_noise, scheduler.eta = noise.step_noise, eta
    for t in scheduler.timesteps:
        x = scheduler.step(_toy_eps(x, t), t, x).prev_sample
    expected = torch.tensor(A1111_DDIM_ETA_X[(rng, seed, delta, eta)], dtype=torch.float64)
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-5


def test_each_step_noise_setting_is_its_schedulers():
    """The config's table of step-noise settings (torch-free) names each scheduler's own."""
    from fulora.generate.samplers import SAMPLERS, STEP_NOISE, make_scheduler
    from fulora.lora.tiny import sd15_scheduler

    for sampler in SAMPLERS:
        scheduler = make_scheduler(sampler, sd15_scheduler().config)
        key = getattr(scheduler, "eta_setting", None)
        expected = STEP_NOISE.get(sampler)
        assert (key, type(scheduler).eta if key else None) == (expected or (None, None))


def test_euler_a_step_noise_in_half_precision_is_a1111s_rounded():
    """In fp16 (CUDA's default), diffusers draws Euler a's step noise from the image's CPU
    generator in half precision (``randn_tensor`` with the model output's dtype). On the
    pinned torch those are the fp32 draws, which A1111 makes, rounded: the same noise up to
    fp16 rounding. (torch 2.11, the lent GPU machines', drew other numbers in half precision,
    pytorch/pytorch#179834; the initial noise is drawn in fp32 for that reason.)"""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, 4, 48, 64)
    half = randn_tensor(
        shape, generator=[torch.Generator().manual_seed(7)], dtype=torch.float16, device="cpu"
    )
    full = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(half, full.half())


# AUTOMATIC1111's schedule types (v1.9+ "Schedule type") and k-diffusion's samplers on them:
# recorded from A1111's own sd_schedulers.py and k-diffusion's own samplers (the file's "source"
# says how), at 30, 11 and 7 steps.
_SCHEDULE_TYPES_RECORDED = json.loads(
    (Path(__file__).parent / "reference" / "a1111_schedule_types.json").read_text()
)


def _steps_of(key: str) -> tuple[str, int]:
    *names, steps = key.split("/")
    return "/".join(names), int(steps)


@pytest.mark.parametrize("key", sorted(_SCHEDULE_TYPES_RECORDED["sigmas"]))
def test_schedule_types_are_automatic1111s(key):
    """Each type's sigmas, bit for bit (float32): among them "KL Optimal", which ends at the
    smallest sigma rather than 0, and "DDIM", which takes 31 steps for 30."""
    from fulora.generate.samplers import SigmaSchedule, resolve_schedule_type
    from fulora.generate.sigmas import a1111_sigmas
    from fulora.lora.tiny import sd15_scheduler

    label, steps = _steps_of(key)
    schedule = SigmaSchedule(resolve_schedule_type(label))
    sigmas = a1111_sigmas(schedule, steps, sd15_scheduler().alphas_cumprod)
    expected = torch.tensor(_SCHEDULE_TYPES_RECORDED["sigmas"][key], dtype=torch.float32)
    assert torch.equal(sigmas, expected), key


def _sample_on_schedule_type(sampler, steps, noise, generator=None, **settings) -> torch.Tensor:
    """``_sample_as_the_pipeline`` with the sigmas that ``generate`` takes for ``settings``."""
    from fulora.generate.config import GenerateConfig

    schedule = GenerateConfig(sampler=sampler, steps=steps, **settings).sigma_schedule()
    return _sample_as_the_pipeline(sampler, noise, generator, steps, schedule)


# Relative L2 allowed from k-diffusion's result. On a type's sigmas (measured at most 5.3e-7,
# DPM++ 2M, which diffusers steps in variance-preserving space); "Uniform" is each sampler's
# own schedule, diffusers' (sigma interpolated linearly between training timesteps where
# k-diffusion interpolates its log: 4.5e-7 at 30 steps, 2.1e-6 at 7).
_ON_TYPE_GAP, _UNIFORM_GAP = 1e-6, 3e-6


@pytest.mark.parametrize("key", sorted(_SCHEDULE_TYPES_RECORDED["x0"]))
def test_samplers_on_each_schedule_type_are_k_diffusions(key):
    """Euler, Heun, LMS and DPM++ 2M on each type's sigmas, against k-diffusion's samplers:
    Heun's last step to a sigma above 0 ("KL Optimal") is a Heun step, and DPM++ 2M's is
    second order and ends in k-diffusion's space, not diffusers' (alone: 4.3e-4 away)."""
    names, steps = _steps_of(key)
    sampler, label = names.split("/")
    noise = torch.tensor(KDIFFUSION_NOISE, dtype=torch.float64).reshape(1, 4, 2, 2)
    x = _sample_on_schedule_type(sampler, steps, noise, schedule_type=label)
    expected = torch.tensor(_SCHEDULE_TYPES_RECORDED["x0"][key], dtype=torch.float64)
    gap = float((x.flatten() - expected).norm() / expected.norm())
    assert gap < (_UNIFORM_GAP if label == "Uniform" else _ON_TYPE_GAP), f"{key}: {gap:.2e}"


@pytest.mark.parametrize("key", sorted(_SCHEDULE_TYPES_RECORDED["euler_a_x0"]))
def test_euler_a_on_each_schedule_type_is_k_diffusions(key):
    """Euler a on each type's sigmas, its noise from the image's CPU generator as A1111's RNG
    "CPU" (fp32; measured at most 2.1e-6)."""
    label, steps = _steps_of(key)
    generator = torch.Generator().manual_seed(KDIFFUSION_EULER_A_SEED)
    noise = torch.randn((1, 4, 2, 2), generator=generator)
    x = _sample_on_schedule_type("euler_a", steps, noise, generator, schedule_type=label)
    expected = torch.tensor(_SCHEDULE_TYPES_RECORDED["euler_a_x0"][key])
    assert float((x.flatten() - expected).norm() / expected.norm()) < 1e-5, key


def _options_of(key: str) -> tuple[int, dict]:
    """A recorded case's steps and the generate settings of its A1111 options."""
    label, steps, low, high, rho, discard = key.split("/")
    settings = {"schedule_type": label, "schedule_sigma_min": float(low)}
    settings |= {"schedule_sigma_max": float(high), "schedule_rho": float(rho)}
    return int(steps), settings | {"discard_penultimate_sigma": discard == "True"}


@pytest.mark.parametrize("key", sorted(_SCHEDULE_TYPES_RECORDED["options"]))
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_a"])
def test_a1111s_sigma_options_are_its_own(key, sampler):
    """A1111's "Schedule min sigma", "max sigma", "rho" and "Discard penultimate sigma" (its
    get_sigmas): the sigmas bit for bit, and each sampler on them within the gaps above."""
    from fulora.generate.config import GenerateConfig
    from fulora.generate.sigmas import a1111_sigmas
    from fulora.lora.tiny import sd15_scheduler

    steps, settings = _options_of(key)
    recorded = _SCHEDULE_TYPES_RECORDED["options"][key]
    schedule = GenerateConfig(sampler=sampler, **settings).sigma_schedule()
    sigmas = a1111_sigmas(schedule, steps, sd15_scheduler().alphas_cumprod)
    assert torch.equal(sigmas, torch.tensor(recorded["sigmas"], dtype=torch.float32))
    generator, dtype = None, torch.float64
    noise = torch.tensor(KDIFFUSION_NOISE, dtype=dtype).reshape(1, 4, 2, 2)
    if sampler == "euler_a":  # its noise from the image's CPU generator, in fp32
        generator, dtype = torch.Generator().manual_seed(KDIFFUSION_EULER_A_SEED), torch.float32
        noise = torch.randn((1, 4, 2, 2), generator=generator)
    x = _sample_on_schedule_type(sampler, steps, noise, generator, **settings)
    expected = torch.tensor(recorded[sampler], dtype=dtype)
    gap = float((x.flatten() - expected).norm() / expected.norm())
    assert gap < (1e-5 if sampler == "euler_a" else _ON_TYPE_GAP), f"{gap:.2e}"
