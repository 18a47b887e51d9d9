"""`lmctk train`: train a model deterministically into a run directory. Its options are TrainConfig's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmctk.cli.app import app, console, refuse_existing, write_json
from lmctk.cli.options import with_config_options
from lmctk.errors import ConfigError
from lmctk.train import TrainConfig


def _reporter(bar: Any, job: Any, quiet: bool):
    """The `fit` progress callback: a bar update, or with --quiet a plain line per evaluation."""

    def progress(step: int, total: int, record: dict | None) -> None:
        if quiet:
            if record:
                test = record["test"]
                console.print(f"step {step}/{total}  test loss {test['loss']:.4f}  test acc {test['accuracy']:.4f}",
                              highlight=False)
            return
        status = f"test acc {record['test']['accuracy']:.3f}" if record else None
        bar.update(job, completed=step, **({"status": status} if status else {}))

    return progress


@app.command()
@with_config_options(TrainConfig)
def train(
    config_fields: dict[str, Any],
    out: Path = typer.Option(..., "--out", help="Run directory to create (manifest, metrics.jsonl, checkpoints/)."),
    log_checkpoints: Optional[int] = typer.Option(None, help="Checkpoint N log-spaced steps plus step 0."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its latest checkpoint."),
    quiet: bool = typer.Option(False, help="Plain log lines instead of a progress bar."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """Train a model deterministically into a run directory."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from lmctk.train import fit, log_spaced_steps

    if config_fields["checkpoints"] and log_checkpoints:
        raise ConfigError("--checkpoints and --log-checkpoints: give one of them, not both")
    if log_checkpoints:
        config_fields["checkpoints"] = log_spaced_steps(log_checkpoints, config_fields["steps"])
    config = TrainConfig(**config_fields)
    if not resume or json_out is not None:
        refuse_existing([json_out], overwrite)
    with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), console=console, transient=True, disable=quiet) as bar:
        job = bar.add_task("train", total=config.steps, status="")
        result = fit(config, out, overwrite=overwrite, resume=resume, progress=_reporter(bar, job, quiet))
    console.print(result)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)
