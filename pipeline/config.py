"""Typed-config helpers: a field with help text, and argparse flags derived from a dataclass.

Each component owns its config dataclass; the CLI derives its flags from the fields,
so a flag, its type, default and help are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

REQUIRED = dataclasses.MISSING


def opt(default: Any = REQUIRED, help: str = "") -> Any:
    """A dataclass field with help text; no default means the flag is required."""
    return dataclasses.field(default=default, metadata={"help": help})


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_args(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.name in positional:
            parser.add_argument(f.name, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=f.default,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            required = f.default is REQUIRED
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, required=required,
                                default=None if required else f.default,
                                help=help_text + ("" if required else f" (default: {f.default})"))


def config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def from_mapping(cls: type, data: Any, where: str = ""):
    """A (nested) config dataclass from parsed YAML/JSON, naming the key of any problem.

    Unknown keys, missing required keys and values of the wrong type are errors that
    name the dotted key, the bad value and what is allowed; the dataclass's own
    `__post_init__` then checks ranges.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown key {key!r}; allowed here: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is REQUIRED and f.default_factory is REQUIRED:
                raise ValueError(f"missing required key {key!r}" + (f" ({f.metadata['help']})" if f.metadata.get("help") else ""))
            continue
        values[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{where + ': ' if where else ''}{exc}") from None


def _coerce(hint, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(_base_type(hint), value, key)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ValueError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def read_yaml(path: str) -> Any:
    """A YAML config file's content ({} when empty); an unreadable file is a one-line error."""
    import yaml

    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
