"""Typed-config helpers: a field with help text, and argparse flags derived from a dataclass.

Each component owns its config dataclass; the CLI derives its flags from the fields,
so a flag, its type, default and help are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
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
