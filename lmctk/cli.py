"""The `lmctk` command line: parse, call the Python API, render. No computation lives here.

Exit codes: 0 success, 2 bad input (one red line on stderr, traceback only with --debug),
3 a negative verdict (used by commands that judge, such as `soupable`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console

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


def write_json(path: Path, payload: dict[str, Any], overwrite: bool) -> None:
    from lmctk.errors import OutputExistsError
    from lmctk.io import atomic_write_text

    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory to create (manifest, metrics.jsonl, checkpoints/)."),
    task: str = typer.Option("digits", help="Task: digits, synthetic, text, text-mlm, or module:function."),
    model: str = typer.Option("mlp", help="Model: mlp, cnn, resnet20, gpt2, gpt_neox, llama, qwen2, bert."),
    seed: int = typer.Option(0, help="Seed; derives separate init, data-order and dropout streams."),
    steps: int = typer.Option(300, help="Optimiser steps."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    optimizer: str = typer.Option("adamw", help="sgd (with momentum) or adamw."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    weight_decay: float = typer.Option(0.0, help="Weight decay."),
    warmup: int = typer.Option(0, help="Linear warmup steps."),
    schedule: str = typer.Option("cosine", help="Decay after warmup: constant, cosine or linear."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the global gradient norm to this value."),
    checkpoints: Optional[str] = typer.Option(None, help="Steps to checkpoint, e.g. 0,10,100,300 (the last step always is)."),
    log_checkpoints: Optional[int] = typer.Option(None, help="Checkpoint N log-spaced steps plus step 0."),
    eval_every: int = typer.Option(100, help="Evaluate train and test every N steps."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    model_opt: list[str] = typer.Option([], "--model-opt", help="Model option key=value (repeatable), e.g. widths=64,64."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its latest checkpoint."),
    quiet: bool = typer.Option(False, help="Plain log lines instead of a progress bar."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """Train a model deterministically into a run directory."""
    from lmctk.train import TrainConfig, fit, log_spaced_steps, parse_steps

    if checkpoints and log_checkpoints:
        raise ConfigError("--checkpoints and --log-checkpoints: give one of them, not both")
    ckpt_steps = parse_steps(checkpoints) if checkpoints else (log_spaced_steps(log_checkpoints, steps) if log_checkpoints else [])
    config = TrainConfig(
        task=task, task_options=parse_options(task_opt, "--task-opt"), model=model,
        model_options=parse_options(model_opt, "--model-opt"), seed=seed, steps=steps,
        batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, warmup=warmup, schedule=schedule, grad_clip=grad_clip,
        checkpoints=ckpt_steps, eval_every=eval_every, device=device,
    )
    if json_out and json_out.exists() and not overwrite:
        from lmctk.errors import OutputExistsError

        raise OutputExistsError(json_out)
    if quiet:
        def progress(step: int, total: int, record: dict | None) -> None:
            if record:
                test = record["test"]
                console.print(f"step {step}/{total}  test loss {test['loss']:.4f}  test acc {test['accuracy']:.4f}",
                              highlight=False)

        result = fit(config, out, overwrite=overwrite, resume=resume, progress=progress)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console, transient=True) as bar:
            job = bar.add_task("train", total=steps, status="")

            def progress(step: int, total: int, record: dict | None) -> None:
                status = f"test acc {record['test']['accuracy']:.3f}" if record else None
                bar.update(job, completed=step, **({"status": status} if status else {}))

            result = fit(config, out, overwrite=overwrite, resume=resume, progress=progress)
    console.print(result)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="A .safetensors/.pt file, a Hugging Face model dir or a run dir."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the inspection as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Show tensors grouped by layer (shapes, dtypes, parameters, bytes) from headers only."""
    from lmctk.io import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    console.print(info)
    if json_out:
        write_json(json_out, info.to_dict(), overwrite)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmctk` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=args, prog_name="lmctk", standalone_mode=False)
    except LmctkError as e:
        if _debug or "--debug" in args:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/]")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
