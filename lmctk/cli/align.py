"""`lmctk align`: bring model B into model A's neuron order (weight or activation matching)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmctk.cli.app import app, console, parse_options, refuse_existing, write_json
from lmctk.errors import ConfigError

METHODS = ("weight", "activation")


@app.command()
def align(
    a: Path = typer.Argument(..., help="Reference model A: a run dir, a checkpoint dir or an HF model dir."),
    b: Path = typer.Argument(..., help="Model B, brought into A's neuron order."),
    method: str = typer.Option("weight", help="weight (Git Re-Basin weight matching) or activation."),
    task: Optional[str] = typer.Option(None, help="Task whose data drives activation matching (default: the run's)."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="Write aligned B here as an HF model dir (safetensors)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write permutations, objective trace and distances."),
    max_iter: int = typer.Option(100, help="Weight matching: at most this many sweeps."),
    seed: int = typer.Option(0, help="Seed of the sweep order."),
    lap_backend: str = typer.Option("auto", help="Linear assignment backend: auto, scipy, lapx or torch."),
    max_batches: int = typer.Option(8, help="Activation matching: batches of the train split to correlate."),
    stream: bool = typer.Option(False, help="Weight matching from safetensors read tensor by tensor (low memory)."),
    overwrite: bool = typer.Option(False, help="Replace existing --out/--json outputs."),
) -> None:
    """Align B to A and report how far apart they were before and after."""
    from lmctk.basin.align import (
        PermutedView,
        activation_matching,
        apply,
        save_aligned,
        weight_matching,
    )
    from lmctk.io import resolve_checkpoint
    from lmctk.loading import load_model_state, meta_skeleton, read_state, resolve_task
    from lmctk.metrics import distances
    from lmctk.spec import spec_for
    from lmctk.spec.preservation import output_difference

    if method not in METHODS:
        raise ConfigError(f"--method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    if stream and method != "weight":
        raise ConfigError("--stream: only weight matching streams; drop --stream for activation matching")
    refuse_existing([out, json_out], overwrite)

    model = None
    if stream:
        skeleton = meta_skeleton(a)
        spec = spec_for(skeleton)
        state_a, state_b = read_state(a, skeleton, lazy=True), read_state(b, skeleton, lazy=True)
    else:
        the_task = resolve_task(task, parse_options(task_opt, "--task-opt"), [a]) if method == "activation" else None
        model, state_a, _ = load_model_state(a, the_task)
        state_b = read_state(b, model)
        spec = spec_for(model)
    if method == "weight":
        result = weight_matching(spec, state_a, state_b, max_iter=max_iter, seed=seed, lap_backend=lap_backend)
    else:
        result = activation_matching(model, spec, state_a, state_b, the_task, max_batches=max_batches,
                                     seed=seed, lap_backend=lap_backend)

    aligned = apply(spec, state_b, result) if not stream else None
    keys = [k for k in spec.axes if k not in spec.buffers] + spec.unpermuted(state_a.keys())
    before = distances(state_a, state_b, keys)
    after = distances(state_a, aligned if aligned is not None else PermutedView(spec, state_b, result.perms), keys)
    console.print(result)
    table = Table(title="distance to A (parameters)")
    for col in ("", "L2", "cosine"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("B", f"{before['l2']:.4f}", f"{before['cosine']:.4f}")
    table.add_row("π(B)", f"{after['l2']:.4f}", f"{after['cosine']:.4f}")
    console.print(table)
    check_error = output_difference(model, dict(state_b), aligned) if model is not None else None
    if check_error is not None:
        console.print(f"π(B) computes the same function as B: max relative output difference {check_error:.2e}")
    if result.unpermuted:
        console.print(f"left unpermuted: {', '.join(result.unpermuted)}", highlight=False)
    if out is not None:
        save_aligned(spec, state_b, result, out, source_dir=resolve_checkpoint(b), overwrite=overwrite)
        console.print(f"aligned B written to {out}")
    if json_out is not None:
        payload = {**result.to_dict(), "perms": {g: p.tolist() for g, p in result.perms.items()},
                   "distance": {"before": before, "after": after}, "function_check": check_error}
        write_json(json_out, payload, overwrite)

