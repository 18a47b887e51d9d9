"""`lmctk train`: train a model deterministically into a run directory. Its options are TrainConfig's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmctk.cli.app import QUIET_HELP, app, console, refuse_existing, write_json
from lmctk.cli.options import with_config_options
from lmctk.errors import ConfigError
from lmctk.render.progress import Progress
from lmctk.train import TrainConfig


@app.command()
@with_config_options(TrainConfig)
def train(
    config_fields: dict[str, Any],
    out: Path = typer.Option(..., "--out", help="Run directory to create (manifest, metrics.jsonl, checkpoints/)."),
    log_checkpoints: Optional[int] = typer.Option(None, help="Checkpoint N log-spaced steps plus step 0."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its latest checkpoint."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """Train a model deterministically into a run directory."""
    from lmctk.train import fit, log_spaced_steps

    if config_fields["checkpoints"] and log_checkpoints:
        raise ConfigError("--checkpoints and --log-checkpoints: give one of them, not both")
    if log_checkpoints:
        config_fields["checkpoints"] = log_spaced_steps(log_checkpoints, config_fields["steps"])
    config = TrainConfig(**config_fields)
    if resume and not out.exists():  # a dir without a manifest was killed before it began: fit starts it afresh
        raise ConfigError(f"nothing to resume at {out} (it does not exist); drop --resume")
    if not resume or json_out is not None:
        refuse_existing([json_out], overwrite)
    with Progress("train step", config.steps, console=console, quiet=quiet) as bar:

        def progress(step: int, total: int, record: dict | None) -> None:
            metric = f"test loss {record['test']['loss']:.4f} acc {record['test']['accuracy']:.4f}" if record else None
            bar.update(step, total, metric)

        result = fit(config, out, overwrite=overwrite, resume=resume, progress=progress)
    console.print(result)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)
