"""A tiny Stable Diffusion-architecture model, built in code, for tests, CPU demos and benchmarks.

Same classes and wiring as SD1.5 (UNet2DConditionModel with cross-attention, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, a DDPM-family scheduler), scaled down to a few hundred thousand
parameters so that it trains in seconds on a CPU. Weights are random (seeded): it is **not** a
pretrained model and produces no meaningful images. The tokenizer is a byte-level CLIP BPE
tokenizer written from a small vocabulary, so no download is needed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fulora.lora.clip_layout import write_kohya_layout

TINY_PROMPT_WORDS = (
    "a",
    "photo",
    "of",
    "fetal",
    "ultrasound",
    "abdomen",
    "brain",
    "femur",
    "thorax",
    "maternal",
    "cervix",
    "other",
    "image",
    "plane",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_tokenizer(folder: str | Path, words: tuple[str, ...] = TINY_PROMPT_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a small CLIP BPE tokenizer into ``folder``.

    The vocabulary holds every byte (alone and word-final) plus merges that make each of
    ``words`` (default :data:`TINY_PROMPT_WORDS`) one token, so the prompts tokenise to whole
    words.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            # Do what BPE will do with this word: the best-ranked known merge first; only
            # when none applies, a new merge (ranked last, so earlier words are unaffected).
            pairs = list(zip(symbols, symbols[1:], strict=False))
            known = [p for p in pairs if p in ranks]
            pair = min(known, key=ranks.__getitem__) if known else pairs[0]
            if pair not in ranks:
                ranks[pair] = len(ranks)
                vocab_list.append(pair[0] + pair[1])
            k = pairs.index(pair)
            symbols = symbols[:k] + [pair[0] + pair[1]] + symbols[k + 2 :]
    merges = [f"{a} {b}" for a, b in sorted(ranks, key=ranks.__getitem__)]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    return folder


def tiny_components(seed: int = 0, tokenizer_dir: str | Path | None = None) -> dict:
    """The components of a tiny SD pipeline (``StableDiffusionPipeline(**components)``).

    Args:
        seed: Seed of the random weights.
        tokenizer_dir: Where to write the tokenizer files (default: a temporary folder).
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    tokenizer = _tokenizer(tokenizer_dir)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
    )
    return pipeline_parts(unet, vae, text_encoder, tokenizer, scheduler)


def _tokenizer(folder: str | Path | None = None):
    """The tiny CLIP tokenizer, written to ``folder`` (default: a temporary folder)."""
    from transformers import CLIPTokenizer

    folder = Path(folder or tempfile.mkdtemp(prefix="fulora-tok-"))
    write_tiny_tokenizer(folder)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def pipeline_parts(unet, vae, text_encoder, tokenizer, scheduler) -> dict:
    """The keyword arguments of ``StableDiffusionPipeline`` for these parts (no safety checker)."""
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _save(components: dict, out: str | Path, note: str, text: str) -> Path:
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    StableDiffusionPipeline(**components).save_pretrained(out)
    write_kohya_layout(out / "text_encoder")  # readable by transformers 4 and 5
    (out / note).write_text(text, encoding="utf-8")
    return out


def save_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``out`` (a diffusers folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _save(
            tiny_components(seed, tokenizer_dir=tmp),
            out,
            "FULORA_TINY_MODEL.txt",
            "A tiny Stable Diffusion-architecture model with RANDOM weights, built by "
            "fulora for tests and demos. It is not pretrained; pass a real SD1.5 model "
            "for real images.\n",
        )


def sd15_components(seed: int = 0) -> dict:
    """Stable Diffusion 1.5's architecture (public configs) with RANDOM weights.

    For speed and memory benchmarks: the cost of a step does not depend on the weights' values.
    The tokenizer is the tiny one (any token ids below CLIP's 49,408 do).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return pipeline_parts(unet, vae, text_encoder, tokenizer, sd15_scheduler())


def sd15_scheduler():
    """A DDPM scheduler with SD1.5's noise schedule (scaled-linear betas 0.00085-0.012)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
    )


def save_sd15_random(out: str | Path, seed: int = 0) -> Path:
    """Write the SD1.5 architecture with random weights as a diffusers folder (benchmarks)."""
    return _save(
        sd15_components(seed),
        out,
        "FULORA_RANDOM_MODEL.txt",
        "Stable Diffusion 1.5 architecture with RANDOM weights, for speed and memory "
        "benchmarks only.\n",
    )
