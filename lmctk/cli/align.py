"""`lmctk align`: bring model B into model A's neuron order (weight or activation matching);
`lmctk permute`: apply the permutations it saved to another checkpoint of the same architecture."""

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
def align(
    a: Path = typer.Argument(..., help="Reference model A: a run dir, a checkpoint dir or an HF model dir."),
    b: Path = typer.Argument(..., help="Model B, brought into A's neuron order."),
    method: str = typer.Option("weight", help="weight (Git Re-Basin weight matching) or activation."),
    task: Optional[str] = typer.Option(None, help="Task whose data drives activation matching (default: the run's)."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="Write aligned B here as an HF model dir, with permutations.safetensors."),
    perms: Optional[Path] = typer.Option(None, help="Also write the permutations to this .safetensors file."),
    perms_only: bool = typer.Option(False, help="Write only the permutations (to --out DIR or --perms FILE), no model."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write permutations, objective trace and distances."),
    max_iter: int = typer.Option(100, help="Weight matching: at most this many sweeps."),
    seed: int = typer.Option(0, help="Seed of the sweep order."),
    lap_backend: str = typer.Option("auto", help="Linear assignment backend: auto, scipy, lapx or torch."),
    device: str = typer.Option("cpu", help="Weight matching: device of the similarity matmuls (cpu, cuda, cuda:N, auto)."),
    max_batches: int = typer.Option(8, help="Activation matching: batches of the train split to correlate."),
    stream: bool = typer.Option(False, help="Weight matching from safetensors read tensor by tensor (low memory)."),
    memory: Optional[str] = typer.Option(None, help="Weight matching: memory budget of its working set, e.g. 8GB "
                                         "(default: half the memory available); prints the planned peak."),
    overwrite: bool = typer.Option(False, help="Replace existing --out/--json outputs."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Align B to A and report how far apart they were before and after."""
    from lmctk.basin.jobs import align_checkpoints
    from lmctk.basin.saved import PERMS_NAME

    refuse_existing([out / PERMS_NAME if perms_only and out else out, perms, json_out], overwrite)
    with Progress(f"align: {method} matching sweeps", console=console, quiet=quiet) as bar:
        report = align_checkpoints(a, b, method=method, task=task, task_options=parse_options(task_opt, "--task-opt"),
                                   stream=stream, max_iter=max_iter, seed=seed, lap_backend=lap_backend,
                                   device=device, max_batches=max_batches, out=out, perms=perms,
                                   perms_only=perms_only, overwrite=overwrite, memory=memory,
                                   progress=bar.update, log=bar.log)
    console.print(report)
    if json_out is not None:
        write_json(json_out, report.to_dict(), overwrite)


@app.command()
def permute(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to permute: a run dir, a checkpoint dir or an HF model dir."),
    perms: Path = typer.Option(..., help="permutations.safetensors written by `lmctk align`."),
    out: Path = typer.Option(..., help="Write the permuted checkpoint here as an HF model dir."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write what was permuted and where."),
    overwrite: bool = typer.Option(False, help="Replace existing --out/--json outputs."),
) -> None:
    """Apply saved permutations to a checkpoint of the same architecture (a later step, a fine-tune)."""
    from lmctk.basin.jobs import permute_checkpoint

    refuse_existing([out, json_out], overwrite)
    report = permute_checkpoint(checkpoint, perms, out, overwrite=overwrite)
    console.print(report)
    if json_out is not None:
        write_json(json_out, report.to_dict(), overwrite)
