"""Typed configs: nested dataclasses loaded from YAML, with dotted `--set section.field=value` overrides.

Every error names the dotted field and what was wrong, e.g.
`ValueError: config field 'train.learning_rate': expected float, got 'fast' (str)`.

A dataclass may define `validate(self)` raising `ValueError(...)` for value checks (ranges, choices);
`load_config` calls it on every nested section after the types are checked and prefixes the message with
the section's dotted path. Float fields take finite numbers only (NaN and ±inf are refused by name).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Type, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = ["load_config", "config_to_dict", "save_config", "apply_overrides", "parse_override"]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.lr=1e-4"` -> (["train", "lr"], 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ValueError(f"--set expects section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set expects section.field=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Write each `a.b.c=value` override into the nested dict `data` (in place; returns it)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp`; raise ValueError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"config field {where!r}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config field {where!r}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config field {where!r}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and origin is not None:
            value = [value]  # `--set x=3` for a list field means [3]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {where!r}: expected a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"config field {where!r}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config field {where!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config field {where!r}: expected true/false, got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config field {where!r}: expected int, got {value!r} ({type(value).__name__})")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"config field {where!r}: expected float, got {value!r} ({type(value).__name__})")
        if not math.isfinite(number):  # .nan / .inf would turn every weight NaN without a single error
            raise ValueError(f"config field {where!r}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config field {where!r}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"config field {where!r}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: Type[T], data: dict, prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(
            f"unknown config field {where + unknown[0]!r}"
            f"{' in section ' + repr(prefix) if prefix else ''}; known fields: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            msg = str(err)
            if prefix and not msg.startswith("config field"):
                msg = f"config section {prefix!r}: {msg}"
            raise ValueError(msg) from None
    return obj


def load_config(schema_cls: Type[T], path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> T:
    """Build `schema_cls` from a YAML file (optional) plus dotted overrides; fields left out keep defaults."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config: no such file {str(path)!r}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"--config {str(path)!r}: not valid YAML{where}: {' '.join(str(problem).split())}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {str(path)!r}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, overrides)
    return _build(schema_cls, data, "")


def validated(cfg: T) -> T:
    """A config built in Python (`Config(train=TrainConfig(...))`) checked exactly as a YAML one is: every field's
    type coerced and every section's validate() run; returns the checked copy (ValueError naming the field)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ValueError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return _build(type(cfg), config_to_dict(cfg), "")


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
