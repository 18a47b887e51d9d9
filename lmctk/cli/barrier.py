"""`lmctk barrier`: loss and error along the straight line between models, raw and aligned."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmctk.cli.app import (
    QUIET_HELP,
    app,
    console,
    parse_options,
    refuse_existing,
    write_json,
)
from lmctk.render.progress import Progress


@app.command()
def barrier(
    models: list[Path] = typer.Argument(..., help="Two or more run dirs or checkpoint dirs (same architecture)."),
    task: Optional[str] = typer.Option(None, help="Task to evaluate on (default: the first run's task)."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    align: Optional[str] = typer.Option(None, help="Align B onto A first: weight or activation."),
    renorm: str = typer.Option("none", help="Renormalise every θ(α): none, bn_reset (BatchNorm nets) or repair."),
    points: int = typer.Option(25, help="Interpolation points, endpoints included."),
    threshold: float = typer.Option(0.05, help="Loss barrier at or below which the pair counts as connected."),
    definition: str = typer.Option("mean_endpoint", help="Barrier judged by the verdict: mean_endpoint or linear."),
    split: str = typer.Option("test", help="Split evaluated along the path: train, val or test."),
    batch_size: Optional[int] = typer.Option(None, help="Eval batch size (default: the whole split at once)."),
    calib_batches: int = typer.Option(8, help="Training batches used by bn_reset/repair statistics."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write α grid, curves and barriers as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Plot dir: barrier.png (loss and accuracy along α) goes here."),
    overwrite: bool = typer.Option(False, help="Replace existing --json/--plot files."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Sweep θ(α) = (1−α)θ_A + αθ_B: α table, terminal curve, both barrier definitions and a verdict.

    Exits 3 when a pair is not linearly connected (a negative verdict), 0 when all are.
    """
    from lmctk.basin.jobs import barrier_checkpoints

    refuse_existing([json_out, plot and plot / "barrier.png"], overwrite)
    with Progress("barrier: stages (sweep, align, aligned sweep)", console=console, quiet=quiet) as bar:
        report = barrier_checkpoints(models, task=task, task_options=parse_options(task_opt, "--task-opt"),
                                     threshold=threshold, definition=definition, device=device, points=points,
                                     align=align, renorm=renorm, split=split, batch_size=batch_size,
                                     calib_batches=calib_batches, progress=bar.update)
    console.print(report)
    if json_out:
        write_json(json_out, report.to_dict(), overwrite)
    if plot:
        console.print(f"wrote {report.plot(plot / 'barrier.png', overwrite=overwrite)}", highlight=False)
    if report.undefined:  # the loss is not finite somewhere on a path: no verdict
        raise typer.Exit(2)
    if not report.connected:
        raise typer.Exit(3)
