"""LoRA weights in and out: the diffusers/PEFT layout and the kohya/AUTOMATIC1111 layout.

* diffusers/PEFT: ``pytorch_lora_weights.safetensors`` in a folder, written by
  ``StableDiffusionPipeline.save_lora_weights`` (with the LoRA configs as adapter metadata);
  ``pipe.load_lora_weights(folder)`` loads it.
* kohya (what the FU-LoRA paper published, and what AUTOMATIC1111 and ComfyUI load): one
  ``.safetensors`` with keys ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` and ``lora_te_<module>...`` for the text encoder, and training metadata in the
  safetensors header (kohya's ``ss_*`` keys where one exists, ``fulora_*`` for the rest).
  diffusers loads it with ``pipe.load_lora_weights(file)``; with ``HF_HUB_OFFLINE=1`` only as
  ``pipe.load_lora_weights(folder, weight_name=file_name)``, as :func:`load_lora_into` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fulora.errors import DataError
from fulora.io import atomic_path, file_hash
from fulora.lora.clip_layout import CLIP_LEVEL, is_flat, kohya_layout

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The "down" (A) matrix of a LoRA pair in kohya, PEFT and older diffusers key styles.
_DOWN = re.compile(r"\.(lora_linear_layer\.down|lora\.down|lora_down|lora_A)\.weight$")
_TARGET = re.compile(
    r"(to_q|to_k|to_v|to_out[._]0|q_proj|k_proj|v_proj|out_proj|proj_in|proj_out|fc1|fc2"
    r"|ff[._]net[._]\d[._]proj|ff[._]net[._]\d)$"
)


@dataclass
class LoraFile:
    """A LoRA read from disk."""

    path: Path
    format: str  # "kohya" or "diffusers"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def peft_state_dicts(unet, text_encoder=None) -> tuple[dict, dict]:
    """The LoRA tensors of a UNet (and text encoder) with PEFT adapters, in PEFT key format."""
    from peft.utils import get_peft_model_state_dict

    unet_sd = get_peft_model_state_dict(unet)
    te_sd = get_peft_model_state_dict(text_encoder) if text_encoder is not None else {}
    return unet_sd, {kohya_layout("text_encoder", k): v for k, v in te_sd.items()}


def to_kohya(unet_sd: dict, te_sd: dict, alpha: float) -> dict[str, torch.Tensor]:
    """Convert PEFT-format LoRA tensors of SD1.x to kohya keys, with the true ``alpha``."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    prefixed = {f"unet.{k}": v for k, v in unet_sd.items()}
    prefixed.update({f"text_encoder.{k}": v for k, v in te_sd.items()})
    kohya = convert_state_dict_to_kohya(prefixed)
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        # SD1.x has one text encoder: kohya and AUTOMATIC1111 name it lora_te_, not lora_te1_.
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha))  # diffusers writes rank here; we keep alpha
        out[key] = value.detach().to("cpu").contiguous()
    return out


def save_kohya(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write a kohya-format ``.safetensors`` atomically; metadata values become strings."""
    from safetensors.torch import save_file

    path = Path(path)
    converted = {
        k: (
            v.to(dtype)
            if dtype is not None and v.is_floating_point() and not k.endswith(".alpha")
            else v
        )
        for k, v in tensors.items()
    }
    meta = _header_strings(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(converted, meta)
    with atomic_path(path) as tmp:
        save_file(converted, str(tmp), metadata=meta)
    return path


def _header_strings(metadata: dict[str, Any]) -> dict[str, str]:
    """A safetensors header's entries: strings as they are, other values as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _add_header(path: Path, entries: dict[str, str]) -> None:
    """Rewrite the safetensors file ``path`` with ``entries`` added to its header."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not entries:
        return
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**header, **entries})


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """The ``sshs_model_hash`` and ``sshs_legacy_hash`` kohya writes into a LoRA file's header.

    kohya writes both into the header so that AUTOMATIC1111 and the additional-networks
    extension need not hash the file; AUTOMATIC1111 lists a LoRA under the model hash. Both
    are taken, as kohya takes them, over the file serialised with its ``ss_*`` metadata only
    (other keys may be edited later): the model hash is the sha256 of the tensor bytes after
    the header, the legacy one the sha256 of 64 KiB at 1 MiB, cut to 8 digits.
    """
    from safetensors.torch import save

    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    serialised = save(tensors, metadata=training)  # {} too: kohya passes one, so the header has it
    legacy = hashlib.sha256(serialised[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return hashlib.sha256(serialised[_tensor_bytes_start(serialised) :]).hexdigest(), legacy


def _tensor_bytes_start(first_bytes: bytes) -> int:
    """Where a safetensors file's tensor bytes start (after its header and that header's size)."""
    return 8 + int.from_bytes(first_bytes[:8], "little")


def webui_lora_hash(path: str | Path, metadata: dict[str, str]) -> str:
    """The sha256 AUTOMATIC1111 lists a LoRA file under (its ``Lora hashes``: 12 digits).

    The header's ``sshs_model_hash`` (kohya's), else for a ``.safetensors`` the sha256 of the
    bytes after its header, else the sha256 of the whole file.
    """
    path = Path(path)
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"]
    if path.suffix.lower() != ".safetensors":
        return file_hash(path)
    with open(path, "rb") as handle:
        start = _tensor_bytes_start(handle.read(8))
    return file_hash(path, start=start)


def save_lora_files(
    out: str | Path,
    unet,
    text_encoder,
    unet_lora,
    te_lora,
    *,
    output_name: str = "fulora_lora",
    metadata: dict[str, Any] | None = None,
    save_dtype: str = "fp16",
) -> tuple[Path, Path]:
    """Save trained adapters in both layouts into ``out``.

    Args:
        out: Folder; gets ``pytorch_lora_weights.safetensors`` (diffusers/PEFT, with the LoRA
            configs as adapter metadata so alpha survives) and ``<output_name>.safetensors``
            (kohya, with ``metadata`` in its header).
        unet: UNet with a PEFT adapter.
        text_encoder: Text encoder with a PEFT adapter, or None.
        unet_lora: The UNet's ``peft.LoraConfig``.
        te_lora: The text encoder's ``peft.LoraConfig``, or None.
        output_name: Stem of the kohya file.
        metadata: Header entries of the kohya file.
        save_dtype: ``fp16``, ``bf16`` or ``fp32`` for the kohya tensors.

    Returns:
        (diffusers file, kohya file).
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd = peft_state_dicts(unet, text_encoder)

    def config_dict(config) -> dict[str, Any] | None:
        if config is None:
            return None
        data = config.to_dict()
        # peft matches a target by its path's end: without text_model., the text encoder's
        # name the same layers in transformers 4's CLIP and 5's flat one (diffusers 0.42 does
        # not strip it from a file's adapter config when it loads one into the flat model)
        data["target_modules"] = sorted(m.removeprefix(CLIP_LEVEL) for m in data["target_modules"])
        return {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        # PEFT keys as they are: diffusers loads them directly. Its convert_state_dict_to_diffusers
        # renames attention keys only, so beyond attention it would write two naming schemes
        # and diffusers would then load only part of the LoRA.
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=unet_sd,
            text_encoder_lora_layers=te_sd or None,
            unet_lora_adapter_metadata=config_dict(unet_lora),
            text_encoder_lora_adapter_metadata=config_dict(te_lora),
        )
        written = Path(tmp) / DIFFUSERS_WEIGHT_NAME
        # kohya's training entries too: `generate` takes the clip skip from ss_clip_skip, and
        # without it a run's diffusers file made other images than its kohya file
        training = {k: v for k, v in _header_strings(metadata or {}).items() if k.startswith("ss_")}
        _add_header(written, training)
        os.replace(written, out / DIFFUSERS_WEIGHT_NAME)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[save_dtype]
    kohya_path = out / f"{output_name}.safetensors"
    save_kohya(
        kohya_path, to_kohya(unet_sd, te_sd, unet_lora.lora_alpha), metadata or {}, dtype=dtype
    )
    return out / DIFFUSERS_WEIGHT_NAME, kohya_path


def detect_format(keys: list[str]) -> str:
    """``kohya`` or ``diffusers`` from the tensor names."""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    raise DataError("not a LoRA file: no lora_unet_/lora_te_ (kohya) or lora_A (PEFT) tensors")


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA ``.safetensors`` (kohya) or a diffusers LoRA folder/file.

    Raises:
        DataError: If the file is missing, unreadable or not a LoRA.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise DataError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as err:
        raise DataError(f"cannot read LoRA file {path}: {err}") from None
    try:
        fmt = detect_format(list(tensors))
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    return LoraFile(path=path, format=fmt, tensors=tensors, metadata=metadata)


def inspect_lora(path: str | Path) -> dict[str, Any]:
    """Format, rank, alpha, targeted modules and metadata of a LoRA file."""
    lora = read_lora(path)
    down = [k for k in lora.tensors if _DOWN.search(k)]
    ranks = Counter(int(lora.tensors[k].shape[0]) for k in down)
    alphas = Counter(round(float(v), 4) for k, v in lora.tensors.items() if k.endswith(".alpha"))
    if not alphas:
        config = _adapter_config(lora.metadata)
        if config.get("lora_alpha") is not None:
            alphas = Counter({float(config["lora_alpha"]): len(down)})
    parts: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    for key in down:
        module = _DOWN.sub("", key)
        part = "text_encoder" if re.match(r"^(lora_te|text_encoder)", module) else "unet"
        parts[part] += 1
        match = _TARGET.search(module)
        targets[match.group(1).replace(".", "_") if match else module.rsplit("_", 1)[-1]] += 1
    return {
        "path": str(lora.path),
        "format": lora.format,
        "tensors": len(lora.tensors),
        "modules": dict(parts),
        "rank": sorted(ranks) if len(ranks) > 1 else next(iter(ranks), None),
        "alpha": sorted(alphas) if len(alphas) > 1 else next(iter(alphas), None),
        "targets": dict(sorted(targets.items())),
        "dtype": str(lora.tensors[down[0]].dtype).removeprefix("torch.") if down else None,
        # what AUTOMATIC1111 (its Lora hashes) and model sites list the file under
        "a1111_hash": webui_lora_hash(lora.path, lora.metadata)[:12],
        "metadata": {k: _maybe_json(v) for k, v in sorted(lora.metadata.items())},
    }


def _adapter_config(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    for key in ("unet.lora_alpha", "lora_alpha"):
        if key in data:
            return {"lora_alpha": data[key]}
    nested = data.get("unet") or {}
    return {"lora_alpha": nested.get("lora_alpha")} if isinstance(nested, dict) else {}


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def load_lora_into(
    pipe,
    path: str | Path,
    *,
    adapter_name: str = "fulora",
    scale: float = 1.0,
    text_encoder_scale: float | None = None,
    fuse: bool = False,
) -> LoraFile:
    """Load a kohya or diffusers LoRA into a pipeline at ``scale``, applied exactly once.

    Every wrapped layer then computes ``W x + scale * (alpha / rank) * up(down(x))``, as
    AUTOMATIC1111's ``<lora:name:scale>`` does.

    Args:
        pipe: A StableDiffusionPipeline.
        path: kohya ``.safetensors``, diffusers LoRA file or folder.
        adapter_name: peft adapter name.
        scale: The LoRA multiplier (of the UNet's layers, and the text encoder's if
            ``text_encoder_scale`` is None).
        text_encoder_scale: The text encoder's multiplier, as A1111's
            ``<lora:name:te:unet>`` sets it apart; None: ``scale``.
        fuse: Merge ``W + scale * (alpha / rank) * up @ down`` into the weights and drop the
            adapter layers (faster; the same function).

    Raises:
        DataError: If the file is not a LoRA or does not fit the pipeline's model.
    """
    lora = read_lora(path)
    try:
        # Folder + file name, not the file's path: with HF_HUB_OFFLINE=1 (a machine without
        # network) diffusers refuses a path without weight_name before it looks at the disk.
        pipe.load_lora_weights(
            str(lora.path.parent), weight_name=lora.path.name, adapter_name=adapter_name
        )
    except Exception as err:
        raise DataError(
            f"cannot load LoRA {lora.path} ({lora.format} format) into the base model: {err}. "
            + (_flat_clip_hint(lora, pipe) or "Is it a LoRA for Stable Diffusion 1.x?")
        ) from None
    set_lora_scales(pipe, scale, text_encoder_scale, adapter_name)
    if fuse:
        # set_adapters already holds the scale: fusing at lora_scale=scale would apply it twice.
        pipe.fuse_lora(lora_scale=1.0, adapter_names=[adapter_name])
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return lora


def _flat_clip_hint(lora: LoraFile, pipe) -> str | None:
    """Why a diffusers-format file of transformers 4's layout fails in transformers 5's CLIP."""
    config = lora.metadata.get("lora_adapter_metadata", "")
    if lora.format != "diffusers" or f'"{CLIP_LEVEL}' not in config:
        return None
    if not is_flat(pipe.text_encoder):
        return None
    return (
        "Its adapter config names the text encoder's layers under text_model., which "
        "transformers 5 no longer has and diffusers does not strip from a file's config. Pass "
        "the kohya .safetensors of the same LoRA run folder, which loads into either"
    )


def set_lora_scales(
    pipe, scale: float, text_encoder_scale: float | None = None, adapter_name: str = "fulora"
) -> None:
    """Set a loaded, unfused LoRA's multipliers: the UNet's and the text encoder's.

    Args:
        pipe: A StableDiffusionPipeline holding the adapter ``adapter_name``.
        scale: The UNet's multiplier (and the text encoder's if ``text_encoder_scale`` is None).
        text_encoder_scale: The text encoder's multiplier; None: ``scale``.
        adapter_name: The peft adapter.
    """
    scales = {
        "unet": scale,
        "text_encoder": scale if text_encoder_scale is None else text_encoder_scale,
    }
    holding = pipe.get_list_adapters()  # only the parts the file has layers for
    weights = {part: w for part, w in scales.items() if adapter_name in holding.get(part, ())}
    pipe.set_adapters([adapter_name], adapter_weights=[weights])
