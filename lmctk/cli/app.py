"""The Typer app, its error handling and helpers shared by the command modules.

Exit codes: 0 success, 2 bad input (one red line on stderr, traceback only with --debug) or a usage
error (click's message and the usage line), 3 a negative verdict (used by commands that judge, such as
`soupable`), 130 interrupted (Ctrl-C; the message names the resume command where there is one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

# Typer 0.2x vendors click as `typer._click`: its usage errors are not `click.*` exceptions.
from typer._click.exceptions import ClickException  # noqa: E402

from lmctk import __version__
from lmctk.errors import ConfigError, LmctkError
from lmctk.io import return_freed_buffers
from lmctk.recipes import parse_value

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
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (anywhere on the line)."),
) -> None:
    """main() takes --debug out of argv before dispatch, so it works after the command too."""


QUIET_HELP = "No progress (a bar on a terminal, a line every 10 s in a log)."
SET_HELP = ("Override a recipe key, e.g. --set sweep.replicates=1 or --set sweep.steps=0,10 (TOML values; "
            "commas make a list; repeatable).")


def parse_options(pairs: list[str], what: str) -> dict[str, Any]:
    """Turn repeated `key=value` flags into a dict; values read as `--set` reads them (`recipes.parse_value`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: '{pair}' is not key=value (e.g. {what} widths=64,64)")
        out[key.strip()] = parse_value(raw.strip())
    return out


def parse_list(text: str, what: str, kind: type = int, example: str = "0,10,100") -> list[Any]:
    """A comma-separated flag value such as '0,10,100' as a list of `kind`."""
    try:
        return [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        name = {int: "integers", float: "numbers"}.get(kind, kind.__name__)
        raise ConfigError(f"{what}: '{text}' is not a comma-separated list of {name} (e.g. {example})") from None


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


# Commands that continue an interrupted run, and the flag that asks them to ("" : rerun as it was).
RESUME_FLAGS = {"train": "--resume", "butterfly": "--resume", "run": "--resume", "soup": "--resume", "converge": ""}


def _resume_hint(args: list[str]) -> str:
    """`interrupted; resume with …` naming the command that continues, for commands that can."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command not in RESUME_FLAGS:
        return "interrupted"
    again = [a for a in args if a not in ("--overwrite", "--retrain")]
    flag = RESUME_FLAGS[command]
    if flag and flag not in again:
        again.append(flag)
    return "interrupted; resume with: lmctk " + " ".join(again)


def _quiet_transformers() -> None:
    """transformers' own progress bars and advisory warnings stay out of lmctk's output (unless asked for)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _command() -> Any:
    """The click command of `app`, with flags shown bare in --help (no `<bool>`) and arguments in capitals."""
    root = typer.main.get_command(app)
    for command in [root, *root.commands.values()]:
        for param in [*command.params, command.get_help_option(typer.Context(command))]:
            if getattr(param, "is_flag", False):
                param.metavar = ""
            elif param.param_type_name == "argument":
                param.metavar = param.name.upper()
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmctk` console script; returns the exit code. `--debug` may come anywhere."""
    global _debug
    args = list(sys.argv[1:] if argv is None else argv)
    _debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _quiet_transformers()
    return_freed_buffers()  # memory budgets (align --memory, streamed soups) must not drift with heap fragments
    try:
        code = _command().main(args=args, prog_name="lmctk", standalone_mode=False)  # typer.Exit(n) inside a command returns n
    except LmctkError as e:
        if _debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except ClickException as e:  # usage errors: click's one-line message after the usage line
        if _debug:
            raise
        e.show()
        return e.exit_code
    except typer.Abort:
        code = 130
    if code == 130:  # typer turns Ctrl-C into exit code 130
        err_console.print(f"[red]{escape(_resume_hint(args))}[/]", highlight=False, soft_wrap=True)
    return code if isinstance(code, int) else 0
