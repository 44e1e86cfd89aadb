"""Every number and enum of every config class is checked before any work (issue 13, class 4).

The classes are found by walking the package, so a config class or a numeric field added later
without a range fails ``test_every_numeric_field_has_a_range``. The bad values are made from
each field's declared range and go through ``from_dict``, the path YAML files, ``--set``, the
experiment runner and ``--dry-run`` all take.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import subprocess
import sys
import types
import typing
from typing import Literal, get_args, get_origin

import pytest

import fulora
from fulora.config import Checked, from_dict
from fulora.errors import ConfigError

REQUIRED = {"DataSource": {"path": "images"}}  # fields without a default


def _config_classes() -> list[type]:
    """Classes named *Config or deriving from Checked, and the dataclasses nested in them."""
    found = {}
    for info in pkgutil.walk_packages(fulora.__path__, "fulora."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == info.name
                and (obj.__name__.endswith("Config") or issubclass(obj, Checked))
            ):
                found[obj.__qualname__] = obj
    todo = list(found.values())
    while todo:
        for tp in typing.get_type_hints(todo.pop()).values():
            for arg in [tp, *get_args(tp)]:
                if dataclasses.is_dataclass(arg) and arg.__qualname__ not in found:
                    found[arg.__qualname__] = arg
                    todo.append(arg)
    return [found[k] for k in sorted(found)]


CLASSES = _config_classes()


def _numeric(tp) -> bool:
    """int/float, optional or as the items of a list/tuple."""
    if tp in (int, float):
        return True
    if get_origin(tp) in (typing.Union, types.UnionType, list, tuple):
        return any(_numeric(a) for a in get_args(tp) if a is not type(None) and a is not ...)
    return False


def _fields(kind: str) -> list[tuple[type, str, object]]:
    rows = []
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            literal = next((a for a in [tp, *get_args(tp)] if get_origin(a) is Literal), None)
            if kind == "numeric" and _numeric(tp):
                rows.append((cls, f.name, tp))
            elif kind == "enum" and literal is not None:
                rows.append((cls, f.name, literal))
    return rows


def test_the_walk_finds_every_stage_config():
    names = {c.__name__ for c in CLASSES}
    assert {
        "LoraTrainConfig",
        "GenerateConfig",
        "ClassifyConfig",
        "AuditConfig",
        "PhantomConfig",
        "FoundationConfig",
        "ExperimentConfig",
        "EvaluateStage",
    } <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_config_class_is_checked_and_its_defaults_pass(cls):
    assert issubclass(cls, Checked), f"{cls.__name__} must derive from fulora.config.Checked"
    from_dict(cls, dict(REQUIRED.get(cls.__name__, {})))


@pytest.mark.parametrize(
    ("cls", "name", "tp"), _fields("numeric"), ids=lambda v: getattr(v, "__name__", str(v))
)
def test_every_numeric_field_has_a_range(cls, name, tp):
    assert name in cls.RANGES, f"{cls.__name__}.{name} has no entry in {cls.__name__}.RANGES"


def _outside(allowed) -> list[float]:
    values = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - 1)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + 1)
    return values


def _shaped(value, tp):
    """``value`` in the field's shape (an item of a list, both sides of a size)."""
    args = [a for a in get_args(tp) if a is not type(None)]
    inner = args[0] if len(args) == 1 and get_origin(tp) in (typing.Union, types.UnionType) else tp
    if get_origin(inner) is list:
        return [value]
    if get_origin(inner) is tuple:
        return [value] * len(get_args(inner))
    if int in (inner, *args) and float not in (inner, *args):
        return int(value)
    return value


@pytest.mark.parametrize(
    ("cls", "name", "tp"), _fields("numeric"), ids=lambda v: getattr(v, "__name__", str(v))
)
def test_out_of_range_numbers_are_refused_naming_key_value_and_range(cls, name, tp):
    allowed = cls.RANGES[name]
    for bad in _outside(allowed):
        value = _shaped(bad, tp)
        with pytest.raises(ConfigError) as err:
            from_dict(cls, {**REQUIRED.get(cls.__name__, {}), name: value}, source="run.yaml")
        message = str(err.value)
        assert message.startswith("run.yaml: ") and repr(name) in message, message
        assert allowed.describe() in message and f"{bad:g}" in message, message
    if float in (tp, *get_args(tp)):  # NaN and infinity pass every < and >
        with pytest.raises(ConfigError):
            from_dict(cls, {**REQUIRED.get(cls.__name__, {}), name: float("nan")})


@pytest.mark.parametrize(
    ("cls", "name", "tp"), _fields("enum"), ids=lambda v: getattr(v, "__name__", str(v))
)
def test_unknown_enum_values_are_refused_listing_the_allowed_ones(cls, name, tp):
    with pytest.raises(ConfigError, match=f"'{name}'.*must be one of .*got 'nonsense'"):
        from_dict(cls, {**REQUIRED.get(cls.__name__, {}), name: "nonsense"})


@pytest.mark.parametrize(
    ("cls", "changes", "message"),
    [
        ("LoraTrainConfig", {"resolution": 32, "bucket_step": 64}, "'bucket_step' \\(64\\)"),
        ("LoraTrainConfig", {"resolution": 60}, "multiples of 8"),
        ("GenerateConfig", {"width": 60}, "'width' must be a multiple of 8"),
        ("FoundationConfig", {"height": 40}, "multiples of 16"),
        ("ClassifyConfig", {"device": "gpu"}, "'device' must be auto, cpu, cuda"),
    ],
)
def test_cross_field_rules(cls, changes, message):
    config = next(c for c in CLASSES if c.__name__ == cls)
    with pytest.raises(ConfigError, match=message):
        from_dict(config, changes)


#: What a stage's code loads (seconds on 2 cores) and its config module must not.
_HEAVY = ("torch", "torchvision", "diffusers", "transformers", "sklearn", "scipy")
#: ``fulora ARGS`` that prints, on exit, which of those it loaded.
_CLI_REPORTING_HEAVY_MODULES = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('HEAVY', sorted(set({_HEAVY!r}) & set(sys.modules)), "
    "file=sys.stderr))\n"
    "from fulora.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))"
)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fulora", *args], capture_output=True, text=True, timeout=120
    )


def _cli_refusal(*args):
    """``fulora ARGS``, checked to fail with a message, no traceback and no heavy module loaded."""
    result = subprocess.run(
        [sys.executable, "-c", _CLI_REPORTING_HEAVY_MODULES, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "HEAVY []" in result.stderr, result.stderr  # refused in 0.2 s, not 6.5 s
    return result


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["lora", "train", "--data", "DATA", "--out", "OUT", "--set", "rank=0"],
            "'rank' must be at least 1",
        ),
        (["lora", "train", "--data", "DATA", "--out", "OUT", "--max-steps", "-5"], "'max_steps'"),
        (["lora", "train", "--data", "DATA", "--out", "OUT", "--device", "gpu"], "'device' must"),
        (["generate", "--out", "OUT", "--set", "steps=0"], "'steps' must be at least 1"),
        (["classify", "train", "--train", "DATA", "--out", "OUT", "--epochs", "0"], "'epochs'"),
        (["classify", "train", "--train", "DATA", "--out", "OUT", "--set", "lr=-0.1"], "'lr'"),
        (
            ["classify", "train", "--train", "DATA", "--out", "OUT", "--batch-size", "0"],
            "'batch_size'",
        ),
        (
            ["evaluate", "--model", "DATA", "--test", "DATA", "--out", "OUT", "--batch-size", "0"],
            "'batch_size'",
        ),
        (
            ["audit", "--synthetic", "DATA", "--reference", "DATA", "--out", "OUT"]
            + ["--set", "kid_subsets=0"],
            "'kid_subsets'",
        ),
        (["foundation", "build", "--out", "OUT", "--set", "vae_steps=0"], "'vae_steps'"),
        (["data", "phantom", "OUT", "--per-class", "0"], "'per_class' must be at least 1"),
        (["data", "phantom", "OUT", "--planes", "brian"], "'planes': unknown plane label 'brian'"),
        (["data", "phantom", "OUT", "--planes", "cervix"], "the phantom draws"),  # a plane, undrawn
        # a plane twice: once two "brain" outputs in one classifier
        (
            [
                "classify",
                "train",
                "--train",
                "DATA",
                "--out",
                "OUT",
                "--set",
                "classes=[Brain,brain]",
            ],
            "'classes' names brain twice",
        ),
        (["generate", "--out", "OUT", "--planes", "brain", "Brain"], "'planes' names brain twice"),
    ],
)
def test_cli_refuses_bad_numbers_before_any_work(tmp_path, args, message):
    """... and before loading the stage's code: each stage's config module is light."""
    args = [str(tmp_path / a) if a in ("DATA", "OUT") else a for a in args]
    result = _cli_refusal(*args)
    assert message in result.stderr
    assert not (tmp_path / "OUT").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
    reason="needs a machine without CUDA",
)
def test_cuda_on_a_machine_without_it_is_refused(tmp_path):
    from fulora.data.phantom import PhantomConfig, generate_phantom

    generate_phantom(tmp_path, PhantomConfig(per_class=2, grid=False))
    result = _cli(
        "classify",
        "train",
        "--train",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cuda",
    )
    assert result.returncode != 0
    assert "this machine has 0 CUDA device(s)" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("lora: {settings: {rank: 0}}", "exp.yaml: 'lora.settings.rank' must be at least 1, got 0"),
        # once refused only at generation, after the LoRA had trained
        ("generate: {settings: {sampler: DPM++ 2M Karass}}", "unknown sampler 'DPM++ 2M Karass'"),
        # A1111's DDIM at 1 step runs the model no time: every image would be its noise
        ("generate: {settings: {sampler: DDIM, steps: 1}}", "'DDIM' needs steps: 2 or more"),
        # A1111 reads a BREAK inside brackets as a word with a negative weight, not a chunk
        ('generate: {settings: {negative_prompt: "[blurry BREAK text]"}}', "holds 'BREAK'"),
        # a prompt for a misspelt plane was ignored: that plane got the LoRA's caption instead
        ("generate: {settings: {prompts: {brian: a brain}}}", "'generate.settings.prompts': unkn"),
        ("lora: {settings: {captions: {brian: a brain}}}", "'lora.settings.captions': unknown"),
    ],
)
def test_experiment_dry_run_refuses_a_bad_stage_setting(tmp_path, section, message):
    """The experiment runner and --dry-run build stage configs the same way: same errors.

    The CLI resolves them (experiment/resolve.py) before the stages' code loads.
    """
    config = tmp_path / "exp.yaml"
    config.write_text(
        "base: fulora:phantom-sd\n"
        "data: {lora: [images], train: [images], targets: {t: images}}\n"
        f"{section}\n"
    )
    out = str(tmp_path / "o")
    result = _cli_refusal("experiment", "run", str(config), "--out", out, "--dry-run")
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


def _classify(arch: str, image_size: int):
    from fulora.classify.train import ClassifyConfig

    return ClassifyConfig(
        arch=arch,
        pretrained=False,
        image_size=image_size,
        epochs=1,
        batch_size=4,
        val_fraction=0.0,
        select="last",
        early_stopping=0,
        device="cpu",
    )


def _generate(base: str):
    from fulora.generate.run import GenerateConfig

    return GenerateConfig(
        base=base, planes=["brain"], per_class=1, steps=1, width=64, height=48, device="cpu"
    )


@pytest.mark.parametrize(
    ("stage", "bad", "message", "good"),
    [
        ("classify", ("nonsense_net", 32), "unknown architecture 'nonsense_net'", ("tiny_cnn", 32)),
        ("classify", ("vit_b_16", 32), "vit_b_16 needs image_size 224, got 32", ("tiny_cnn", 32)),
        ("generate", ("/no/such/model",), "base model path /no/such/model does not exist", None),
    ],
)
def test_a_refused_value_leaves_nothing_that_refuses_the_corrected_command(
    tmp_path, lora_images, tiny_model, stage, bad, message, good
):
    """A value that only a model can check (an architecture, the model's input size, the base
    model) is checked before the run folder gets its config.yaml: that file made the corrected
    command fail with "already holds a run with another configuration" in a folder with no work.
    """
    from fulora.classify.train import train_classifier
    from fulora.data.readers import read_any
    from fulora.generate.run import generate

    out = tmp_path / "run"
    if stage == "classify":
        train = [read_any(lora_images)]
        run = lambda cfg: train_classifier(train, out, cfg, progress=False)  # noqa: E731
        bad_cfg, good_cfg = _classify(*bad), _classify(*good)
    else:
        run = lambda cfg: generate(out, cfg, progress=False)  # noqa: E731
        bad_cfg, good_cfg = _generate(*bad), _generate(str(tiny_model))
    with pytest.raises(ConfigError, match=message):
        run(bad_cfg)
    assert not (out / "config.yaml").exists()
    run(good_cfg)
    assert (out / "done.json").is_file()
