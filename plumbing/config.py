"""Typed-config helpers: a field with help text, and argparse flags derived from a dataclass
(their defaults shown by `HelpFormatter`).

Each component owns its config dataclass; the CLI derives its flags from the fields,
so a flag, its type, default and help are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Callable

import yaml

REQUIRED = dataclasses.MISSING


def opt(default: Any = REQUIRED, help: str = "", output: bool = True) -> Any:
    """A dataclass field with help text; no default means the flag is required.

    `output=False` declares a setting that changes how a job runs (workers, progress bars,
    logging), not what it writes: fingerprints leave it out (see `output_settings`), so
    changing it never invalidates finished work.
    """
    return dataclasses.field(default=default, metadata={"help": help, "output": output})


def dotted_parent(data: dict, dotted: str, where: str) -> tuple[dict, str]:
    """The mapping in `data` that holds the dotted key's last part (made on the way as
    needed), and that part: where "train.optim.lr" is set."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where}.{p}: expected a mapping, got {node!r}")
    return node, leaf


def section(factory: Callable[[], Any], output: bool = True, help: str = "") -> Any:
    """A nested config section (`factory` builds its default) with the same declaration."""
    return dataclasses.field(default_factory=factory, metadata={"help": help, "output": output})


def output_settings(config: Any) -> Any:
    """The settings of a config (nested dataclasses included) that change what it writes:
    every field except those declared `output=False`, as plain JSON-able data. Stage
    fingerprints and job fingerprints both derive from this one declaration."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: output_settings(getattr(config, f.name)) for f in dataclasses.fields(config)
                if f.metadata.get("output", True)}
    if isinstance(config, (list, tuple)):
        return [output_settings(v) for v in config]
    if isinstance(config, dict):
        return {k: output_settings(v) for k, v in config.items()}
    return config


def _base_type(hint) -> type:
    if typing.get_origin(hint) is typing.Literal:
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def check_choices(config: Any) -> None:
    """Refuses a value of a Literal-typed field of the dataclass `config` that is not one of
    its choices: what `from_mapping` checks in YAML and flags, for a config built in Python
    (whose `__post_init__` calls this), where a wrong value would otherwise pass unseen."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint, value = hints[f.name], getattr(config, f.name)
        kind = _base_type(hint)
        if value is None and type(None) in typing.get_args(hint):
            continue
        if typing.get_origin(kind) is typing.Literal and value not in typing.get_args(kind):
            raise ValueError(f"{f.name}: {value!r} is not one of {', '.join(map(repr, typing.get_args(kind)))}")


class HelpFormatter(argparse.HelpFormatter):
    """argparse help that shows an option's default once, after its help text; not where the
    text already speaks of its default (one described in words, or BooleanOptionalAction's
    own suffix before Python 3.13), nor for a required option, a positional, or a default
    that says nothing (None, "", a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if ("default" in text or action.required or not action.option_strings
                or default is None or default == "" or default is argparse.SUPPRESS
                or (action.nargs == 0 and default is False)):
            return text
        return f"{text} (default: %(default)s)"


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
            # An enumeration fails at parse time, before any model loads.
            choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, required=required, choices=choices,
                                type=type(choices[0]) if choices else kind,
                                default=None if required else f.default, help=help_text)


def config_from_args(cls: type, args: argparse.Namespace):
    """`cls` from parsed flags, through the same checks as a YAML section (argparse's
    `float` takes "nan" and "inf")."""
    return from_mapping(cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


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
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        # NaN passes every `x < bound` check, and no setting of any stage means "infinite"
        # (a limit that is off is null).
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ValueError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a mapping that repeats a key: YAML keeps the last one silently,
    so an edit above an old setting would not take effect."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # keys merged in by `<<:` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> Any:
    """A YAML config file's content ({} when empty). An unreadable file, a syntax error or
    a repeated key is a one-line error naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read config {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        loader = UniqueKeyLoader(text)  # a SafeLoader: builds plain data only, never objects
        try:
            return loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        context = f" ({exc.context} at line {exc.context_mark.line + 1})" if exc.problem and exc.context_mark else ""
        raise ValueError(f"{where}: {exc.problem or exc.context}{context}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        raise ValueError(f"{path}:{line}:{column}: character U+{exc.character:04X} is not allowed in YAML") from None
