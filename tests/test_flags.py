"""Stage flags come from the config classes (issue 14): a new setting is one line, its field."""

import dataclasses

import pytest

from fulora.audit.run import AuditConfig
from fulora.classify.train import ClassifyConfig
from fulora.cli import build_parser
from fulora.config import load_config
from fulora.evaluate.run import EvaluateConfig
from fulora.flags import config_values, field_comments
from fulora.foundation.build import FoundationConfig
from fulora.generate.run import GenerateConfig
from fulora.lora.train import LoraTrainConfig

REQUIRED = {
    ("lora", "train"): ["--data", "d", "--out", "o"],
    ("generate",): ["--out", "o"],
    ("classify", "train"): ["--train", "t", "--out", "o"],
    ("evaluate",): ["--model", "m", "--test", "t", "--out", "o"],
    ("audit",): ["--synthetic", "s", "--reference", "r", "--out", "o"],
    ("foundation", "build"): ["--out", "o"],
}
COMMANDS = {
    ("lora", "train"): (LoraTrainConfig, ()),
    ("generate",): (GenerateConfig, ()),
    ("classify", "train"): (ClassifyConfig, ("seed", "balance")),  # --seeds, --balance
    ("evaluate",): (EvaluateConfig, ()),
    ("audit",): (AuditConfig, ()),
    ("foundation", "build"): (FoundationConfig, ()),
}


def _parse(command, *flags):
    return build_parser().parse_args([*command, *REQUIRED[command], *flags])


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_scalar_setting_has_a_flag(command):
    cls, own = COMMANDS[command]
    args = _parse(command)
    scalar = {
        f.name
        for f in dataclasses.fields(cls)
        if not isinstance(f.default_factory, type) or f.default_factory not in (dict,)
    }
    missing = {
        name
        for name in scalar - set(own)
        if name not in args.config_fields and "dict" not in str(cls.__annotations__[name])
    }
    assert not missing, f"settings of {cls.__name__} without a flag: {sorted(missing)}"


@pytest.mark.parametrize(
    "command, flags, expected",
    [
        (("classify", "train"), ["--select", "last", "--val-fraction", "0"], {"select": "last"}),
        (("classify", "train"), ["--amp", "false", "--classes", "brain", "femur"], {"amp": False}),
        (("generate",), ["--fuse-qkv", "true", "--planes", "brain"], {"fuse_qkv": True}),
        (("lora", "train"), ["--rank", "8", "--targets", "attention"], {"rank": 8}),
        (("evaluate",), ["--bootstrap", "0"], {"n_bootstrap": 0}),
    ],
)
def test_flags_reach_the_config(command, flags, expected):
    cls, _ = COMMANDS[command]
    args = _parse(command, *flags)
    cfg = load_config(cls, None, [], values=config_values(args, args.config_fields))
    for key, value in expected.items():
        assert getattr(cfg, key) == value


def test_unset_flags_leave_the_defaults():
    args = _parse(("classify", "train"))
    assert load_config(ClassifyConfig, None, [], config_values(args, args.config_fields)) == (
        ClassifyConfig()
    )


def test_help_comes_from_the_field_comment():
    comments = field_comments(ClassifyConfig)
    assert comments["val_fraction"].startswith("of real patients held out")
    assert comments["preload"].startswith("Keep the decoded training set")  # the line above
    with pytest.raises(SystemExit):
        _parse(("classify", "train"), "--amp", "maybe")  # argparse names the bad value
