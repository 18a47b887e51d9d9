"""The Typer app, its error handling and helpers shared by the command modules.

Exit codes: 0 success, 2 bad input (one red line on stderr, traceback only with --debug),
3 a negative verdict (used by commands that judge, such as `soupable`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape

from lmctk import __version__
from lmctk.errors import ConfigError, LmctkError

app = typer.Typer(
    name="lmctk",
    help="Linear mode connectivity and model merging: align, interpolate, soup, and study training stability.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_debug = False


def _version(value: bool) -> None:
    if value:
        console.print(f"lmctk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    global _debug
    _debug = debug


def parse_options(pairs: list[str], what: str) -> dict[str, Any]:
    """Turn repeated `key=value` flags into a dict; values are JSON when they parse, lists on commas."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: '{pair}' is not key=value (e.g. {what} widths=64,64)")
        out[key.strip()] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if "," in raw:
            return [_parse_value(p) for p in raw.split(",") if p]
        return raw


def parse_list(text: str, what: str, kind: type = int) -> list[Any]:
    """A comma-separated flag value such as '0,10,100' as a list of `kind`."""
    try:
        return [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{what}: '{text}' is not a comma-separated list of {kind.__name__} (e.g. 0,10,100)") from None


def refuse_existing(paths: list[Path | None], overwrite: bool) -> None:
    """Stop before any work if an output already exists and --overwrite was not given (None: not asked for)."""
    from lmctk.errors import OutputExistsError

    for path in paths:
        if path is not None and path.exists() and not overwrite:
            raise OutputExistsError(path)


def write_json(path: Path, payload: dict[str, Any], overwrite: bool) -> None:
    from lmctk.io import atomic_write_json

    refuse_existing([path], overwrite)
    atomic_write_json(path, payload)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmctk` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="lmctk", standalone_mode=False)  # typer.Exit(n) inside a command returns n
    except LmctkError as e:
        if _debug or "--debug" in args:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/]")
        return 130
    return code if isinstance(code, int) else 0
