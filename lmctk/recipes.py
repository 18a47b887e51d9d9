"""Strict TOML recipes: a dataclass schema turns TOML into typed values, and every mistake is an error.

Unknown keys, wrong types and missing required fields raise ConfigError naming the key path
(`soup.ingredients[2].weight`, indices from 0) and what was expected. The loader knows nothing about
soups or any other recipe: it walks the schema's type hints (dataclasses, `list[X]`, `dict[str, X]`,
`X | None`, `Literal[...]`, `Any`, and the scalars str/int/float/bool), so new recipes add a schema only.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from typing import Any, Literal, TypeVar, Union

from lmctk.errors import ConfigError
from lmctk.io.paths import input_path

T = TypeVar("T")


def load_recipe(
    path: str | os.PathLike, schema: type[T], section: str | None = None, overrides: typing.Sequence[str] = ()
) -> T:
    """Read the TOML file `path` (or its table `section`) into the dataclass `schema`, strictly.

    `overrides` are `key.path=value` strings (values in TOML syntax, bare words as strings) set
    before parsing, so a mistyped key is the same error as in the file.
    """
    path = input_path(path, "recipe file")
    if path.is_dir():
        raise ConfigError(f"{path}: recipe file is a dir; give a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc or 'nested too deeply'})") from None
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: no [{section}] table; a {schema.__name__} recipe starts with [{section}]")
        data = data[section]
    for item in overrides:
        apply_override(data, item)
    try:
        return parse(data, schema, section or "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def override_keys(overrides: typing.Sequence[str]) -> set[str]:
    """The key paths that `overrides` set: the user's own words (e.g. `--set train.task=mod:fn`), not the file's."""
    return {item.partition("=")[0].strip() for item in overrides}


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in nested TOML data in place (`--set`). The value is TOML (`3`, `[1, 2]`, `"x"`),
    a comma list of such values (`0,10,100`, `gaussian,batch`; `5,` is a one-item list) or a bare string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key.path=value (e.g. sweep.replicates=2)")
    value = parse_value(raw.strip())
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[:i + 1])} is not a table")
        node = child
    node[last] = value


def parse_value(raw: str) -> Any:
    """A `key=value` flag's value: TOML (`3`, `[1, 2]`, `\"x\"`), a comma list of such values, or a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if "," in raw:
            return [parse_value(part.strip()) for part in raw.split(",") if part.strip()]
        return raw


def parse(value: Any, schema: Any, where: str = "") -> Any:
    """`value` (plain TOML/JSON data) checked against the type `schema`; `where` is its key path."""
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if schema is Any:
        return value
    if dataclasses.is_dataclass(schema):
        return _parse_dataclass(value, schema, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return parse(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        if len(options) == 1:
            raise errors[0]
        raise _wrong(where, value, " or ".join(describe(o) for o in options))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{_at(where)}{value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple) or schema in (list, tuple):
        if not isinstance(value, list):
            raise _wrong(where, value, describe(schema))
        item = args[0] if args else Any
        items = [parse(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list or schema is list else tuple(items)
    if origin is dict or schema is dict:
        if not isinstance(value, dict):
            raise _wrong(where, value, "a table")
        item = args[1] if len(args) == 2 else Any
        return {k: parse(v, item, _join(where, k)) for k, v in value.items()}
    if schema is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong(where, value, "a number")
    if schema in (int, str, bool):
        if type(value) is schema:
            return value
        raise _wrong(where, value, describe(schema))
    raise ConfigError(f"{_at(where)}the schema type {schema!r} is not supported by lmctk.recipes")


def describe(schema: Any) -> str:
    """A short human name of a schema type, for error messages."""
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if schema in names:
        return names[schema]
    if dataclasses.is_dataclass(schema):
        return "a table"
    origin = typing.get_origin(schema)
    if origin in (list, tuple) or schema in (list, tuple):
        return "an array"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(schema)))
    return getattr(schema, "__name__", str(schema))


def _parse_dataclass(value: Any, schema: type, where: str) -> Any:
    if not isinstance(value, dict):
        raise _wrong(where, value, "a table")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key; known keys{' in ' + where if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = parse(value[name], hints[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: missing required key ({describe(hints[name])})")
    try:
        return schema(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{_at(where)}{exc}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def _wrong(where: str, value: Any, expected: str) -> ConfigError:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "a table"}
    got = kind.get(type(value), type(value).__name__)
    return ConfigError(f"{_at(where)}expected {expected}, got {got} ({value!r:.40})")
