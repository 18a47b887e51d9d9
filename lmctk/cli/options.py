"""CLI options generated from a config dataclass, so an option is declared once (on the field).

Each field becomes `--field-name` (or the field's `flag` metadata) with the field's default and its
`help` metadata. Dict fields are repeated `key=value` flags, list fields take commas (`0,10,100`).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Optional

import typer

from lmctk.cli.app import parse_list, parse_options


def _origin(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parameter(f: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    kind, optional = _origin(annotation)
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    help = f.metadata["help"]
    if typing.get_origin(kind) is dict:
        option, cli_type = typer.Option([], flag, help=help), list[str]
    elif typing.get_origin(kind) is list:
        option, cli_type = typer.Option(None, flag, help=help), Optional[str]
    else:
        default = None if f.default is dataclasses.MISSING else f.default
        option, cli_type = typer.Option(default, flag, help=help), Optional[kind] if optional else kind
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=cli_type)


def _value(f: dataclasses.Field, annotation: Any, raw: Any) -> Any:
    kind, _ = _origin(annotation)
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    if typing.get_origin(kind) is dict:
        return parse_options(raw, flag)
    if typing.get_origin(kind) is list:
        return parse_list(raw, flag, typing.get_args(kind)[0]) if raw else []
    return raw


def with_config_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command `fn(config_fields: dict, **own_options)`: its signature gains one option per
    field of `cls`, and it receives their parsed values as a dict ready for `cls(**config_fields)`."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        resolved = typing.get_type_hints(fn)  # the command module may use postponed (string) annotations
        own = [p.replace(annotation=resolved[name]) for name, p in inspect.signature(fn).parameters.items()
               if name != "config_fields"]

        def command(**kwargs: Any) -> Any:
            values = {f.name: _value(f, hints[f.name], kwargs.pop(f.name)) for f in fields}
            return fn(values, **kwargs)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__signature__ = inspect.Signature([*own, *(_parameter(f, hints[f.name]) for f in fields)])
        return command

    return deco
