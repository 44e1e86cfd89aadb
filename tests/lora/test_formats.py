"""LoRA formats: kohya export/import round trip, diffusers layout, inspection."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from fulora.errors import DataError
from fulora.lora.clip_layout import model_path
from fulora.lora.conditioning import encode_prompt
from fulora.lora.formats import (
    inspect_lora,
    load_lora_into,
    peft_state_dicts,
    read_lora,
    save_lora_files,
)
from fulora.lora.targets import kohya_module_name, lora_target_modules
from fulora.lora.train import LoraTrainConfig, add_lora_adapters


def _outputs(pipe):
    """UNet and text-encoder outputs on fixed inputs."""
    torch.manual_seed(0)
    ids = pipe.tokenizer(
        ["a photo of fetal brain"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = encode_prompt(pipe.text_encoder, ids, clip_skip=2)
        latents = torch.randn(1, 4, 16, 24)
        unet_out = pipe.unet(latents, torch.tensor([500]), hidden).sample
    return hidden, unet_out


@pytest.fixture
def trained_like(tiny_model, tmp_path):
    """A pipeline with LoRA adapters holding random non-zero weights, rank 8 and alpha 4."""
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    cfg = LoraTrainConfig(rank=8, alpha=4.0)
    unet_lora, te_lora = add_lora_adapters(pipe.unet, pipe.text_encoder, cfg)
    generator = torch.Generator().manual_seed(1)
    for module in (pipe.unet, pipe.text_encoder):
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.2
    out = tmp_path / "lora"
    save_lora_files(
        out,
        pipe.unet,
        pipe.text_encoder,
        unet_lora,
        te_lora,
        output_name="kohya",
        metadata={"fulora_test": "yes", "ss_network_dim": "8"},
        save_dtype="fp32",
    )
    return pipe, out


def _fresh(tiny_model):
    return StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )


@pytest.mark.parametrize("offline", [False, True], ids=["online", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("which", ["kohya.safetensors", "pytorch_lora_weights.safetensors", ""])
def test_round_trip_matches_the_original(trained_like, tiny_model, which, offline, hub_offline):
    hub_offline(offline)  # offline: where load_lora_into first failed (the lent GPU machine)
    pipe, out = trained_like
    hidden, unet_out = _outputs(pipe)
    fresh = _fresh(tiny_model)
    base_hidden, base_unet = _outputs(fresh)
    load_lora_into(fresh, out / which)
    new_hidden, new_unet = _outputs(fresh)
    assert not torch.allclose(base_unet, unet_out, atol=1e-3)  # the LoRA matters...
    assert not torch.allclose(base_hidden, hidden, atol=1e-3)
    torch.testing.assert_close(new_hidden, hidden, atol=1e-5, rtol=1e-5)  # ...and survives
    torch.testing.assert_close(new_unet, unet_out, atol=1e-5, rtol=1e-5)


def test_kohya_names_and_metadata(trained_like):
    _, out = trained_like
    lora = read_lora(out / "kohya.safetensors")
    assert lora.format == "kohya"
    keys = list(lora.tensors)
    assert any(
        k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.")
        for k in keys
    )
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert all(float(v) == 4.0 for k, v in lora.tensors.items() if k.endswith(".alpha"))
    info = inspect_lora(out / "kohya.safetensors")
    assert info["rank"] == 8 and info["alpha"] == 4.0
    # kohya's standard set: 4 transformer blocks x 12 layers, 3 CLIP layers x 6
    assert info["modules"] == {"unet": 48, "text_encoder": 18}
    assert set(info["targets"]) == {
        "to_q",
        "to_k",
        "to_v",
        "to_out_0",
        "ff_net_0_proj",
        "ff_net_2",
        "proj_in",
        "proj_out",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }
    assert info["metadata"]["fulora_test"] == "yes"
    assert info["a1111_hash"] == info["metadata"]["sshs_model_hash"][:12]  # kohya's, in the header
    diffusers_info = inspect_lora(out)
    assert diffusers_info["format"] == "diffusers" and diffusers_info["alpha"] == 4.0
    assert len(diffusers_info["a1111_hash"]) == 12  # none in its header: hashed as A1111 does


def test_a_flat_clip_gets_kohyas_names_and_the_same_files(trained_like, tiny_model):
    """transformers 5 flattened ``CLIPTextModel``: the modules of its ``text_model`` are its own.

    transformers 4's ``CLIPTextTransformer`` (``text_encoder.text_model``) has that layout and
    stands in for it here (the real one was run in a scratch venv with transformers 5.25 and
    diffusers 0.42, session 35). kohya's names, the saved tensors' keys, the clip skip and the
    resume's keys are those of transformers 4's model.
    """
    pipe, _ = trained_like
    full = pipe.text_encoder
    flat = getattr(full, "text_model", full)  # the same modules, one level up (flat already: 5)
    flat.peft_config = full.peft_config  # where peft looks for the adapter's config
    assert not hasattr(flat, "text_model")
    bare = _fresh(tiny_model).text_encoder  # without adapters, as training finds it
    names = [
        [kohya_module_name("text_encoder", n) for n in lora_target_modules(model, "text_encoder")]
        for model in (bare, getattr(bare, "text_model", bare))
    ]
    assert names[1] == names[0]
    assert names[0][0] == "lora_te_text_model_encoder_layers_0_self_attn_k_proj"  # model order
    tensors = {model: peft_state_dicts(pipe.unet, model)[1] for model in (full, flat)}
    assert list(tensors[flat]) == list(tensors[full])
    assert next(iter(tensors[flat])).startswith("text_model.encoder.layers.0.")
    key = next(iter(tensors[flat]))
    assert model_path(flat, key) == key.removeprefix("text_model.")
    assert model_path(full, key) == (key if hasattr(full, "text_model") else model_path(flat, key))
    ids = pipe.tokenizer(["a photo of fetal brain"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        for clip_skip in (1, 2):
            torch.testing.assert_close(
                encode_prompt(flat, ids.input_ids, clip_skip),
                encode_prompt(full, ids.input_ids, clip_skip),
                rtol=0,
                atol=0,
            )


def test_a_diffusers_file_of_transformers_4s_layout_in_a_flat_clip_names_the_kohya_file(
    trained_like, tiny_model, tmp_path
):
    """fulora's diffusers file names the text encoder's targets as their paths end (they fit both
    layouts). One written before session 35 named them under ``text_model.``: diffusers 0.42
    cannot load it into transformers 5's flat CLIP, and the error says which file can."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, out = trained_like
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    config = json.loads(header["lora_adapter_metadata"])
    targets = config["text_encoder.target_modules"]
    assert targets and not any(t.startswith("text_model.") for t in targets)
    config["text_encoder.target_modules"] = [f"text_model.{t}" for t in targets]
    header["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "before-35.safetensors"), metadata=header)
    pipe = _fresh(tiny_model)
    # transformers 4's CLIPTextTransformer stands in for transformers 5's flat CLIPTextModel
    pipe.text_encoder = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    with pytest.raises(DataError, match="Pass the kohya .safetensors of the same LoRA run folder"):
        load_lora_into(pipe, tmp_path / "before-35.safetensors")


def test_kohya_lora_changes_generation(trained_like, tiny_model):
    _, out = trained_like
    base = _fresh(tiny_model)
    image = base(
        "a photo of fetal brain",
        height=48,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    with_lora = _fresh(tiny_model)
    load_lora_into(with_lora, out / "kohya.safetensors", scale=1.0)
    changed = with_lora(
        "a photo of fetal brain",
        height=48,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert abs(image - changed).max() > 1e-3


def test_bad_lora_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DataError, match="does not exist"):
        read_lora(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot read LoRA file"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DataError, match="not a LoRA file"):
        read_lora(tmp_path / "plain.safetensors")
