"""Typed configuration: dataclasses per stage, loaded from YAML, overridden from the command line.

Unknown keys are rejected with the key and the file named; values are converted to the declared
type (``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal``, ``X | None``, ``list[X]``,
``tuple[X, ...]`` and nested dataclasses) and a wrong value names the key and the expected type.
The resolved configuration is saved as YAML in every run folder.

Every config class derives from :class:`Checked`: constructing one (from YAML, the CLI, the
experiment runner, ``--dry-run`` or Python) checks every enum value and every number against the
class's ``RANGES`` table and its cross-field ``check``, so a bad value fails before any work with
a message naming the key, the value and what is allowed. ``tests/test_config_ranges.py`` fails
when a numeric field has no range.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml

from fulora.errors import ConfigError, LabelError
from fulora.io import write_text
from fulora.planes import check_planes

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric config field (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself not allowed
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def describe(self) -> str:
        """``at least 1``, ``greater than 0``, ``in [0, 1)`` and so on."""
        if self.high is None:
            return f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        if self.low is None:
            return f"{'less than' if self.high_open else 'at most'} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # [0, 1]
FRACTION_BELOW_1 = Range(0, 1, high_open=True)  # [0, 1)
SEED = Range(0, 2**63 - 1)  # what torch.manual_seed accepts
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# torch.compile's modes (reduce-overhead: CUDA graphs; max-autotune: kernel search), for every
# stage config that can compile
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


class Checked:
    """Base of every config dataclass: each field is checked when an instance is made.

    Subclasses list the range of every numeric field in ``RANGES`` (a ``list[int]`` field's
    range applies to each item) and put rules that tie fields together in :meth:`check`.
    """

    RANGES: ClassVar[dict[str, Range]] = {}

    def __post_init__(self) -> None:
        validate(self)

    def check(self) -> None:
        """Rules across fields; raise :class:`ConfigError` naming the keys."""

    def check_planes_of(self, key: str) -> list[str]:
        """The canonical planes of ``key`` (a plane list, or a mapping keyed by plane).

        Raises:
            ConfigError: For an unknown plane, or one named twice (``Brain`` and ``brain``
                too), naming ``key``.
        """
        try:
            planes = check_planes(getattr(self, key))
        except LabelError as err:
            raise ConfigError(f"{key!r}: {err}") from None
        self.check_once(key, planes)
        return planes

    def check_once(self, key: str, values: list | None = None) -> None:
        """Refuse a value named twice in ``key`` (``values``: its canonical form, if any).

        Raises:
            ConfigError: Naming the repeated values.
        """
        values = getattr(self, key) if values is None else values
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(f"{key!r} names {', '.join(map(str, twice))} twice")

    def check_classes_of(self, key: str) -> list[str]:
        """The canonical planes of ``key``, a classifier's classes when set: two or more.

        Raises:
            ConfigError: For one plane, or as :meth:`check_planes_of`.
        """
        planes = self.check_planes_of(key) if getattr(self, key) else []
        if len(planes) == 1:
            raise ConfigError(
                f"{key!r} names one plane ({planes[0]}): a classifier needs two or more"
            )
        return planes

    def needs_switch(self, switch: str, keys: tuple[str, ...], what: str) -> None:
        """Refuse a setting of ``keys`` away from its default while ``switch`` is off."""
        if getattr(self, switch):
            return
        for key in keys:
            if getattr(self, key) != getattr(type(self), key):  # the class holds the default
                raise ConfigError(f"{key!r} is a setting of {what}: it needs {switch}: true")


def validate(cfg: Any) -> None:
    """Check enum values, number ranges and the class's cross-field rules of a config.

    Raises:
        ConfigError: Naming the key, the value and what is allowed.
    """
    hints = typing.get_type_hints(type(cfg))
    ranges = getattr(cfg, "RANGES", {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _convert(value, hints[f.name], f.name, "")  # enum values and types
        allowed = ranges.get(f.name)
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if allowed is not None and isinstance(item, int | float) and item not in allowed:
                raise ConfigError(f"{f.name!r} must be {allowed.describe()}, got {item!r}")
        if f.name == "device" and isinstance(value, str):
            check_device(value)
    if isinstance(cfg, Checked):
        cfg.check()


def check_device(name: str) -> None:
    """Refuse a ``device`` setting that names no device fulora knows.

    Raises:
        ConfigError: Unless ``name`` is auto, cpu, cuda, cuda:N or mps.
    """
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"'device' must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def require_device(name: str) -> None:
    """Fail fast when ``name`` asks for hardware this machine lacks (``auto`` always works).

    Raises:
        ConfigError: For ``cuda``/``cuda:N``/``mps`` without that device.
    """
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(
                f"device {name!r}: this machine has {count} CUDA device(s); use --device auto "
                "(the GPU when there is one) or --device cpu"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps': not available here; use --device auto or --device cpu")


def check_process_device(name: str, processes: int) -> None:
    """Refuse one named GPU (``cuda:N``) for a run of several processes (``accelerate launch``).

    accelerate gives each process its own GPU; ``cuda:N`` would put every process on one.

    Raises:
        ConfigError: For ``cuda:N`` with more than one process.
    """
    if processes > 1 and name.startswith("cuda:"):
        raise ConfigError(
            f"device {name!r} with {processes} processes: accelerate gives each process its own "
            "GPU; use --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )


def resolve_device(name: str):
    """The torch device for a ``device`` setting: ``auto`` is CUDA when there is one, else CPU.

    The one place every stage turns its setting into a device (generation and LoRA training
    let accelerate place each process instead, after the same :func:`require_device` check
    and :func:`check_process_device`).

    Raises:
        ConfigError: For a device this machine lacks.
    """
    import torch

    require_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key`` and ``source``."""
    origin = get_origin(tp)
    where = f"{key!r} in {source}" if source else repr(key)

    def fail() -> ConfigError:
        return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, key, source, fail)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: must be one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        return _convert_sequence(value, tp, key, source, fail, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        kt, vt = get_args(tp) or (Any, Any)
        return {
            _convert(k, kt, key, source): _convert(v, vt, key, source) for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, source=source, prefix=f"{key}.")
    return _convert_scalar(value, tp, fail)


def _convert_union(value: Any, tp: Any, key: str, source: str, fail) -> Any:
    """``X | None`` and other unions: None (or the words none/null), else the first that fits."""
    args = get_args(tp)
    if type(None) in args and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key, source)
        except ConfigError:
            continue
    raise fail()


def _convert_sequence(value: Any, tp: Any, key: str, source: str, fail, where: str) -> Any:
    """Lists and tuples; a string becomes a comma-separated list (``--set planes=a,b``)."""
    origin = get_origin(tp)
    if isinstance(value, str):
        value = [v for v in (s.strip() for s in value.split(",")) if v]
    if not isinstance(value, list | tuple):
        raise fail()
    args = get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, key, source) for v, a in zip(value, args, strict=True))
    inner = args[0] if args else Any
    items = [_convert(v, inner, key, source) for v in value]
    return tuple(items) if origin is tuple else items


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _convert_scalar(value: Any, tp: Any, fail) -> Any:
    """bool, int, float, str and Path, from YAML values or command-line strings."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise fail()
    if tp in (int, float) and isinstance(value, bool):
        raise fail()  # True is an int to Python, never a number to a user
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int | str):
            try:
                return int(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail() from None
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys.

    Args:
        cls: A dataclass type.
        data: Keys and values (nested mappings for nested dataclasses).
        source: Where the mapping comes from (a file name), for error messages.
        prefix: Dotted prefix of nested keys, for error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: On an unknown key, a missing required key or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + str(unknown[0])!r}"
            + (f" in {source}" if source else "")
            + f". Valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}"
        )
    kwargs = {
        name: _convert(value, hints[name], prefix + name, source) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a range or cross-field check: say where the value came from
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{_prefixed(str(err), prefix)}") from None
    except TypeError as err:
        missing = [
            n
            for n, f in fields.items()
            if n not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        keys = ", ".join(prefix + m for m in missing)
        raise ConfigError(f"{source or 'config'}: missing required key(s) {keys}") from err


def _prefixed(message: str, prefix: str) -> str:
    """Put a nested key's dotted prefix on the key a message starts with."""
    if prefix and message.startswith("'"):
        return "'" + prefix + message[1:]
    return message


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready structure of a config dataclass (paths and tuples become str and lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value`` into (``["key", "sub"]``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (nested: section.key=value)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    layer: dict[str, Any] | None = None,
) -> T:
    """Load a stage config: defaults, a YAML file, a layer, explicit values, then overrides.

    Args:
        cls: The config dataclass.
        path: Optional YAML file.
        overrides: ``key=value`` strings (``--set`` on the CLI); nested keys use dots.
        values: Mapping of already-typed values (from dedicated CLI flags); None values ignored.
        layer: Settings over the file's and under the flags' (an A1111 image's settings).

    Returns:
        The resolved config.

    Raises:
        ConfigError: Naming the key and the file for any unknown key or bad value.
    """
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        path = Path(path)
        source = str(path)
        data = read_yaml_mapping(path)
        from_dict(cls, data, source=source)  # report file errors against the file
    data.update(layer or {})
    for key, value in (values or {}).items():
        if value is not None:
            data[key] = to_dict(value)
    apply_overrides(data, overrides)
    return from_dict(cls, data, source=source or "command line")


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file that must hold a mapping of keys (an empty file is an empty mapping).

    Raises:
        ConfigError: If the file is missing, is not valid YAML or does not hold a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict | None):
        raise ConfigError(f"{what} {path} must hold a mapping of keys at the top level")
    return loaded or {}


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> None:
    """Apply ``key.sub=value`` overrides (``--set``) to a config mapping, in place.

    Raises:
        ConfigError: If an override is malformed or walks into a value that is not a section.
    """
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[keys[-1]] = value


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
