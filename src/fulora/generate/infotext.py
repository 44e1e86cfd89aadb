"""AUTOMATIC1111's settings text (a PNG's ``parameters``), read into ``generate``'s settings.

An A1111 image's text holds its prompt, its negative prompt after ``Negative prompt:``, and a
last line of ``Key: value`` settings (a value with a comma, colon or newline JSON-quoted).
:func:`read_a1111_parameters` reads it as A1111's ``parse_generation_parameters`` does, and
:func:`generate_settings` turns it into the settings that make the same image with fulora:
prompt, negative prompt, steps, sampler and its schedule type, CFG scale, seed (image ``i`` of
the run takes ``seed + i``, as in A1111's batches), size, clip skip (1 when the text names
none, as A1111 reads it), RNG (``GPU`` when it names none, A1111's default), ENSD (0 when it
names none: A1111 writes it where the sampler uses it), Eta and Eta DDIM (1 and 0 when it
names none), Emphasis ("Original" when it names none), the variation seed and its strength,
"Seed resize from", the Beta schedule's shape, "Downcast alphas_cumprod" (also for a text of a
version before v1.7.0-225, as A1111's backcompat reads it), the "Zero Terminal SNR" noise
schedule, the "SGM noise multiplier", "Sigma churn", "tmin", "tmax" and "noise", the
textual-inversion embeddings' hashes ("TI hashes": their files are given with
``embeddings``), the UniPC settings and the hires fix with a latent upscaler ("Hires
upscale" or "Hires resize", "Hires steps", "Hires upscaler", "Denoising strength"). The model
and the LoRA are the run's own (``base``, ``lora``); a setting that fulora does not run
("Hires sampler", ...) is refused, naming it, since A1111 would make another image with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fulora.errors import ConfigError, DataError
from fulora.generate.hires_size import covers_its_eighths, hires_target
from fulora.generate.prompts import EMPHASIS_MODES
from fulora.generate.samplers import (
    DEFAULT_SINCE_V19,
    DISCARD_PENULTIMATE,
    SCHEDULE_VARIANTS,
    SPAN_FIXED,
    chosen_schedule_type,
    own_schedule,
    resolve_sampler,
    resolve_schedule_type,
)

# One "Key: value" of the settings line: a key starts with a word character and holds words,
# spaces, '-' and '/'; a value is JSON-quoted (escapes allowed) or runs to the next comma.
_FIELD = re.compile(
    r"""\s*(\w[\w \-/]+):\s*     # the key
    ("(?:\\.|[^\\"])+"|[^,]*)    # the value: quoted, or up to a comma
    (?:,|$)""",
    re.X,
)
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
# fulora's rng -> A1111's "RNG" (its setting "Random number generator source"); A1111 leaves
# its default, GPU, out of the text and reads a text without one as GPU
A1111_RNG_NAMES = {"cpu": "CPU", "gpu": "GPU", "nv": "NV"}
A1111_DEFAULT_RNG = "gpu"
_RNGS = {name: rng for rng, name in A1111_RNG_NAMES.items()}
# Fields that name what made the image rather than how: the run's base and LoRA stand for
# them; their hashes become model_hash and lora_hash, which check the files given
_PROVENANCE = ("Model", "Model hash", "Lora hashes", "Version")
_SETTINGS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size-1", "Size-2")
_SETTINGS += ("Clip skip", "ENSD", "RNG", "Emphasis", "Variation seed", "Variation seed strength")
_SETTINGS += ("Seed resize from-1", "Seed resize from-2", "Eta", "Eta DDIM")
_SETTINGS += ("Beta schedule alpha", "Beta schedule beta", "Skip Early CFG", "NGMS")
_SETTINGS += ("NGMS all steps", "Pad conds", "Pad conds v0", "Schedule min sigma")
_SETTINGS += ("Schedule max sigma", "Schedule rho", "Discard penultimate sigma")
_SETTINGS += ("Old prompt editing timelines", "Downcast alphas_cumprod", "Noise Schedule")
_SETTINGS += ("SGM noise multiplier", "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise")
_SETTINGS += ("TI hashes", "UniPC variant", "UniPC skip type", "UniPC order")
_SETTINGS += ("UniPC lower order final", "Denoising strength", "Hires upscale", "Hires steps")
_SETTINGS += ("Hires upscaler", "Hires CFG Scale", "Hires resize-1", "Hires resize-2")
# A1111's churn fields (written where not its default) -> generate's settings
_CHURN = {"sigma_churn": "Sigma churn", "sigma_tmin": "Sigma tmin", "sigma_tmax": "Sigma tmax"}
_CHURN["sigma_noise"] = "Sigma noise"
_EMPHASES = {name: mode for mode, name in EMPHASIS_MODES.items()}


@dataclass
class A1111Parameters:
    """An A1111 settings text, read: prompt, negative prompt and the settings line's fields."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str] = field(default_factory=dict)  # "Size" as "Size-1" and "Size-2"


def read_a1111_parameters(text: str) -> A1111Parameters:
    """Read A1111's settings text as its ``parse_generation_parameters`` reads it.

    The last line is the settings line if it holds three ``Key: value`` fields or more; the
    lines before it are the prompt, then the negative prompt from ``Negative prompt:`` on.
    A quoted value is JSON; one that is not valid JSON stays as written; ``WxH`` values are
    split into ``Key-1`` and ``Key-2``. Checked against A1111's own function in
    ``tests/test_parity.py``.
    """
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt = negative = ""
    in_negative = False
    for line in (line.strip() for line in lines):
        if line.startswith(_NEGATIVE):  # from here on (each such line loses the words)
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        if in_negative:
            negative = _then(negative, line)
        else:
            prompt = _then(prompt, line)
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(last):
        if not value:  # A1111 fails on an empty value and skips the field
            continue
        if value[0] == value[-1] == '"':
            value = _unquoted(value)
        size = _SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
        else:
            fields[key] = value
    return A1111Parameters(prompt, negative, fields)


def _then(text: str, line: str) -> str:
    """A1111's joining: a newline between lines, none before the first non-empty text."""
    return f"{text}\n{line}" if text else line


def _unquoted(value: str) -> str:
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_parameters_file(path: str | Path) -> str:
    """The settings text of an A1111 PNG (its ``parameters`` chunk) or of a text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (give an A1111 PNG or a text file of its settings)")
    try:
        if path.suffix.lower() != ".png":
            return path.read_text(encoding="utf-8")
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: cannot read it ({err}); give an A1111 PNG or a text file"
        ) from None
    if not text:
        raise DataError(
            f"{path} holds no AUTOMATIC1111 settings (no 'parameters' text in the PNG): give an "
            "image A1111 or fulora saved with its settings, or a text file of them"
        )
    return text


def generate_settings(params: A1111Parameters, plane: str) -> dict[str, Any]:
    """The ``generate`` settings that make the image of ``params`` (one per plane; seed + i).

    Args:
        params: The text, read (:func:`read_a1111_parameters`).
        plane: The plane the image shows (its prompt becomes that plane's).

    Raises:
        ConfigError: A setting fulora does not run, or a value it cannot read.
    """
    fields = params.fields
    others = sorted(k for k in fields if k not in _SETTINGS + _PROVENANCE)
    if others:
        shown = ", ".join(f"{k}: {fields[k]}" for k in others)
        raise ConfigError(
            f"the A1111 settings hold {shown}, which fulora does not run (A1111 would make "
            "another image with them): remove them from the text, or give the settings "
            "without --a1111"
        )
    for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1"):
        if key not in fields:
            raise ConfigError(f"the A1111 settings name no {key.split('-')[0]}: give the full text")
    rng = fields.get("RNG", A1111_RNG_NAMES[A1111_DEFAULT_RNG])
    if rng not in _RNGS:
        raise ConfigError(f"the A1111 settings' RNG {rng!r} is none of {', '.join(_RNGS)}")
    hashes = {"model_hash": fields["Model hash"]} if "Model hash" in fields else {}
    # A1111 names its emphasis where it is not "Original" and the prompt has brackets
    emphasis = fields.get("Emphasis", EMPHASIS_MODES["original"])
    if emphasis not in _EMPHASES:
        shown = ", ".join(_EMPHASES)
        raise ConfigError(f"the A1111 settings' Emphasis {emphasis!r} is none of {shown}")
    return {
        **_lora_hash(fields),
        **_embedding_hashes(fields),
        **hashes,
        **_seed_extras(fields),
        "planes": [plane],
        "prompts": {plane: params.prompt},
        "negative_prompt": params.negative_prompt,
        # A1111 writes its prompts without their comments: a '#' in the text is text
        **({"prompt_comments": False} if "#" in params.prompt + params.negative_prompt else {}),
        "steps": _number(fields, "Steps", int),
        **_sampler_settings(fields),
        "guidance": _number(fields, "CFG scale", float),
        "seed": _number(fields, "Seed", int),
        "seed_scheme": "consecutive",  # image i: seed + i, as A1111's batch
        "width": _number(fields, "Size-1", int),
        "height": _number(fields, "Size-2", int),
        "clip_skip": _number(fields, "Clip skip", int) if "Clip skip" in fields else 1,
        "rng": _RNGS[rng],
        # A1111 writes its ENSD only where the sampler uses it, and a text without one ran at 0
        "eta_noise_seed_delta": _number(fields, "ENSD", int) if "ENSD" in fields else 0,
        # A1111 writes its Eta where it is not 1 (for fulora's samplers, Euler a's)
        "eta_ancestral": _number(fields, "Eta", float) if "Eta" in fields else 1.0,
        "eta_ddim": _number(fields, "Eta DDIM", float) if "Eta DDIM" in fields else 0.0,
        "emphasis": _EMPHASES[emphasis],
        "old_prompt_editing": _old_timelines(fields, params.prompt),
        "downcast_alphas_cumprod": _downcast(fields),
        "zero_terminal_snr": _zero_terminal_snr(fields),
        "sgm_noise_multiplier": fields.get("SGM noise multiplier") == "True",
        **{key: _number(fields, name, float) for key, name in _CHURN.items() if name in fields},
        **_unipc_settings(fields),
        **_hires_settings(fields),
        **_negative_pass(fields),
        "per_class": 1,
    }


def _sampler_settings(fields: dict[str, str]) -> dict[str, Any]:
    """The sampler, its schedule type and A1111's sigma options, as its get_sigmas takes them.

    A1111 writes "Schedule min sigma" and "max sigma" also for a type that spans the model's
    own sigmas whatever they say (Uniform, ...): there they are left out.
    """
    sampler, kind = a1111_sampler(fields)
    version = fields.get("Version", "")
    if sampler in ("ddim", "plms") and _version(version) < (1, 6):
        raise ConfigError(
            f"the A1111 settings are of its {version}, whose {fields['Sampler']} was CompVis's "
            "sampler (every point of its grid run, the last step to timestep 0, some step "
            "counts moved), not the v1.6+ one fulora runs: give the settings without --a1111 "
            "to make v1.6's image"
        )
    settings: dict[str, Any] = {"sampler": sampler, "schedule_type": kind}
    numbers = {"beta_schedule_alpha": "Beta schedule alpha"}
    numbers |= {"beta_schedule_beta": "Beta schedule beta", "schedule_rho": "Schedule rho"}
    if (chosen_schedule_type(sampler, kind) or own_schedule(sampler)) not in SPAN_FIXED:
        numbers |= {"schedule_sigma_min": "Schedule min sigma"}
        numbers |= {"schedule_sigma_max": "Schedule max sigma"}
    for key, name in numbers.items():
        if name in fields:
            settings[key] = _number(fields, name, float)
    # A1111 writes it where it dropped a sigma that the sampler keeps (DPM2 drops its own)
    discard = fields.get("Discard penultimate sigma") == "True"
    settings["discard_penultimate_sigma"] = discard and sampler not in DISCARD_PENULTIMATE
    return settings


def _old_timelines(fields: dict[str, str], prompt: str) -> bool:
    """A1111's "Old prompt editing timelines", also as its reading adds it to older texts.

    A1111's ``infotext_versions.backcompat`` (on by default, its setting auto_backcompat) reads
    a text of a version before v1.6.0 whose prompt has a '[' as made with the old rule.
    """
    if fields.get("Old prompt editing timelines") == "True":
        return True
    return "[" in prompt and _version(fields.get("Version", "")) < (1, 6)


def _downcast(fields: dict[str, str]) -> bool:
    """A1111's "Downcast alphas_cumprod", also as its backcompat reads older texts.

    A1111's ``infotext_versions.backcompat`` reads a text of a version before v1.7.0-225 (its
    ``v170_tsnr``, when it stopped casting an fp16 model's alpha_bar to fp16) as downcast.
    """
    if fields.get("Downcast alphas_cumprod") == "True":
        return True
    return _version(fields.get("Version", "")) < (1, 7, 0, 225)


def _zero_terminal_snr(fields: dict[str, str]) -> bool:
    """A1111's "Noise Schedule" (its sd_noise_schedule: Default or Zero Terminal SNR)."""
    schedule = fields.get("Noise Schedule", "Default")
    if schedule not in ("Default", "Zero Terminal SNR"):
        raise ConfigError(
            f"the A1111 settings' Noise Schedule {schedule!r} is neither Default nor Zero "
            "Terminal SNR"
        )
    return schedule == "Zero Terminal SNR"


def _negative_pass(fields: dict[str, str]) -> dict[str, Any]:
    """Skip Early CFG, NGMS (where a step ran without the negative) and Pad conds (padded)."""
    skips: dict[str, Any] = {"skip_early_cfg": 0.0, "ngms": 0.0}
    for key, name in (("skip_early_cfg", "Skip Early CFG"), ("ngms", "NGMS")):
        if name in fields:
            skips[key] = _number(fields, name, float)
    skips["ngms_all_steps"] = fields.get("NGMS all steps") == "True"
    # A1111 pads as the v0 setting says if it is on, else as "Pad prompt/negative prompt"
    padded = {"v0": fields.get("Pad conds v0"), "on": fields.get("Pad conds")}
    if a1111_sampler(fields)[0] == "unipc" and _version(fields.get("Version", "")) < (1, 6):
        # as A1111 before v1.6 padded UniPC's sides (its backcompat says so for DDIM and PLMS
        # only, whose texts of those versions fulora refuses)
        padded["v0"] = "True"
    skips["pad_conds"] = next((mode for mode, on in padded.items() if on == "True"), "off")
    return skips


def _hires_settings(fields: dict[str, str]) -> dict[str, Any]:
    """A1111's hires fix ("Hires upscale" or "Hires resize", ...), where its text has one.

    A1111 writes "Hires steps" where not 0 and "Hires upscaler" where chosen (else its
    default, "Latent"); "Hires CFG Scale" (some versions) is read where it is the CFG scale.
    """
    if "Hires upscale" in fields:
        size: dict[str, Any] = {"hires_scale": _number(fields, "Hires upscale", float)}
    elif "Hires resize-1" in fields:
        size = {"hires_resize_width": _number(fields, "Hires resize-1", int)}
        size["hires_resize_height"] = _number(fields, "Hires resize-2", int)
    elif "Denoising strength" in fields:
        raise ConfigError(
            f"the A1111 settings hold Denoising strength: {fields['Denoising strength']} "
            "without Hires upscale or Hires resize: an img2img image's, and fulora makes "
            "txt2img ones: give a txt2img image's settings"
        )
    else:
        return {}
    if "Denoising strength" not in fields:
        raise ConfigError("the A1111 settings name no Denoising strength for their hires fix")
    hires_cfg = fields.get("Hires CFG Scale")
    if hires_cfg is not None and _number(fields, "Hires CFG Scale", float) != _number(
        fields, "CFG scale", float
    ):
        raise ConfigError(
            f"the A1111 settings' hires pass guides at Hires CFG Scale {hires_cfg}, the first "
            f"pass at {fields['CFG scale']}, and fulora guides both at one: give the settings "
            "without --a1111"
        )
    settings = size | {
        "hires_steps": _number(fields, "Hires steps", int) if "Hires steps" in fields else 0,
        "hires_upscaler": fields.get("Hires upscaler", "Latent"),
        "denoising_strength": _number(fields, "Denoising strength", float),
    }
    _check_upscaler_version(fields, settings)
    return settings


def _check_upscaler_version(fields: dict[str, str], settings: dict[str, Any]) -> None:
    """Refuse a Lanczos or Nearest upscale that A1111 before v1.8 ran otherwise than v1.8+."""
    upscaler, version = settings["hires_upscaler"], fields.get("Version", "")
    if upscaler not in ("Lanczos", "Nearest") or _version(version) >= (1, 8):
        return
    width, height = _number(fields, "Size-1", int), _number(fields, "Size-2", int)
    resize = (settings.get("hires_resize_width", 0), settings.get("hires_resize_height", 0))
    target = hires_target(width, height, settings.get("hires_scale"), resize)
    if covers_its_eighths(width, height, target.resized):
        raise ConfigError(
            f"the A1111 settings are of its {version}, whose {upscaler} upscaler resized a "
            f"{width}x{height} first pass to {target.resized[0]}x{target.resized[1]} by a way "
            "that v1.8 changed (the image already covers the scaled size cut to a multiple of "
            "8), and fulora runs v1.8's: give the settings without --a1111 to make v1.8's image"
        )


def _seed_extras(fields: dict[str, str]) -> dict[str, Any]:
    """The variation seed and strength (written together) and "Seed resize from", if named."""
    varied = {}
    if "Variation seed" in fields or "Variation seed strength" in fields:
        varied["variation_seed"] = _number(fields, "Variation seed", int)
        varied["variation_strength"] = _number(fields, "Variation seed strength", float)
    if "Seed resize from-1" in fields:  # "WxH", read as a size
        varied["seed_resize_from_width"] = _number(fields, "Seed resize from-1", int)
        varied["seed_resize_from_height"] = _number(fields, "Seed resize from-2", int)
    return varied


def _lora_hash(fields: dict[str, str]) -> dict[str, str]:
    """``lora_hash`` from A1111's ``Lora hashes`` ("name: hash"; fulora runs one LoRA)."""
    listed = [item for item in fields.get("Lora hashes", "").split(",") if item.strip()]
    if len(listed) > 1:
        raise ConfigError(
            f"the A1111 settings name {len(listed)} LoRAs ({fields['Lora hashes']}); fulora "
            "runs one: give the settings without --a1111"
        )
    return {"lora_hash": listed[0].rpartition(":")[2].strip()} if listed else {}


def _unipc_settings(fields: dict[str, str]) -> dict[str, Any]:
    """A1111's UniPC settings where written, and its steps as its version took them.

    Before v1.6 A1111 wrote its UniPC settings where not its defaults, and ran UniPC for
    ``steps`` steps; since v1.6 it writes none (its settings apply unsaid) and runs as many
    steps as its DDIM grid has points.
    """
    settings: dict[str, Any] = {}
    if a1111_sampler(fields)[0] == "unipc":
        settings["unipc_legacy_steps"] = _version(fields.get("Version", "")) < (1, 6)
    for key, name in (("unipc_variant", "UniPC variant"), ("unipc_skip_type", "UniPC skip type")):
        if name in fields:
            settings[key] = fields[name]
    if "UniPC order" in fields:
        settings["unipc_order"] = _number(fields, "UniPC order", int)
    if "UniPC lower order final" in fields:
        settings["unipc_lower_order_final"] = fields["UniPC lower order final"] == "True"
    return settings


def _embedding_hashes(fields: dict[str, str]) -> dict[str, dict[str, str]]:
    """``embedding_hashes`` from A1111's ``TI hashes`` ("name: hash, ..."; a name may repeat)."""
    hashes: dict[str, str] = {}
    for item in fields.get("TI hashes", "").split(","):
        name, _, short = (part.strip() for part in item.rpartition(":"))
        if not item.strip():
            continue
        if not name or hashes.get(name, short) != short:
            raise ConfigError(
                f"the A1111 settings' TI hashes {fields['TI hashes']!r} are not one hash per "
                "embedding name ('name: hash, ...')"
            )
        hashes[name] = short
    return {"embedding_hashes": hashes} if hashes else {}


def _number(fields: dict[str, str], key: str, kind: type):
    if key not in fields:
        raise ConfigError(f"the A1111 settings name no {key}: give the full text")
    try:
        return kind(fields[key])
    except ValueError:
        raise ConfigError(f"the A1111 settings' {key} {fields[key]!r} is not a number") from None


def a1111_sampler(fields: dict[str, str]) -> tuple[str, str]:
    """The sampler and schedule type for A1111's ``Sampler`` and ``Schedule type``.

    Read as A1111 v1.9+ reads them (its ``get_sampler_and_scheduler``): a sampler named after a
    schedule ("LMS Karras") runs on it whatever the type says; a missing type is "Automatic",
    the sampler's own schedule (since v1.9 Karras or exponential for some,
    ``DEFAULT_SINCE_V19``; uniform before it and for the others); DDIM, PLMS and UniPC ignore
    the type. A sampler on the sigmas of a variant named after them is that variant,
    ``SCHEDULE_VARIANTS`` (``dpmpp_2m_karras``).

    Raises:
        ConfigError: A schedule type fulora does not know (the message lists them).
    """
    sampler = resolve_sampler(fields["Sampler"])
    kind = resolve_schedule_type(fields.get("Schedule type", "Automatic"))
    if kind == "automatic" and sampler in DEFAULT_SINCE_V19:
        if _version(fields.get("Version", "")) >= (1, 9):
            kind = DEFAULT_SINCE_V19[sampler]
    if (sampler, kind) in SCHEDULE_VARIANTS:
        return SCHEDULE_VARIANTS[(sampler, kind)], "automatic"
    if sampler in SCHEDULE_VARIANTS.values() or own_schedule(sampler) is None:
        return sampler, "automatic"  # named after its schedule, or steps on timesteps
    return sampler, kind


def _version(text: str) -> tuple[int, ...]:
    """A1111's version from its ``Version`` field; another program's: the newest.

    "v1.10.1" is (1, 10, 1); a build's commit count after the release, "v1.7.0-225-g...", a
    fourth number (A1111 reads it as a post-release, after "v1.7.0"; "v1.7.0-RC" before it).
    """
    found = re.fullmatch(r"v(\d+)\.(\d+)(?:\.(\d+))?(?:-(\d+)(?=-|$))?.*", text.strip())
    if not found:
        return (999,)
    return tuple(int(part) for part in found.groups() if part is not None)
