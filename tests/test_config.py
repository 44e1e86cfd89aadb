from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from fulora.config import from_dict, load_config, save_config
from fulora.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-4
    name: str = "x"


@dataclass
class Cfg:
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    planes: list[str] = field(default_factory=lambda: ["brain"])
    size: tuple[int, int] | None = None
    out: Path | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_values_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  lr: 0.001\n")
    cfg = load_config(
        Cfg,
        path,
        ["inner.name=y", "flag=true", "size=[4, 6]"],
        values={"mode": "b", "planes": None},
    )
    assert cfg.steps == 5 and cfg.inner.lr == 0.001 and cfg.inner.name == "y"
    assert cfg.flag is True and cfg.size == (4, 6) and cfg.mode == "b"
    assert cfg.planes == ["brain"]


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nstepz: 6\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz' in .*c\.yaml"):
        load_config(Cfg, path)


def test_unknown_nested_key():
    with pytest.raises(ConfigError, match=r"'inner\.rate'"):
        from_dict(Cfg, {"inner": {"rate": 1}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"steps": "ten"}, r"'steps'.*expected int"),
        ({"mode": "c"}, r"'mode'.*one of 'a' \| 'b'"),
        ({"flag": "maybe"}, r"'flag'.*expected bool"),
        ({"size": [1, 2, 3]}, r"'size'"),
    ],
)
def test_bad_values_name_the_key(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Cfg, data, source="f.yaml")


def test_save_round_trip(tmp_path):
    cfg = Cfg(steps=3, size=(2, 3), out=Path("/x"))
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["size"] == [2, 3] and data["out"] == "/x"
    assert load_config(Cfg, tmp_path / "config.yaml") == cfg


def test_missing_or_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Cfg, bad)


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["steps"])
