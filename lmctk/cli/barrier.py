"""`lmctk barrier`: loss and error along the straight line between models, raw and aligned."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from lmctk.cli.app import app, console, parse_options, refuse_existing, write_json
from lmctk.errors import ConfigError


def _names(paths: list[Path]) -> list[str]:
    short = [p.name or str(p) for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


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
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of loss and accuracy along α here."),
    overwrite: bool = typer.Option(False, help="Replace existing --json/--plot files."),
) -> None:
    """Sweep θ(α) = (1−α)θ_A + αθ_B: α table, terminal curve, both barrier definitions and a verdict.

    Exits 3 when a pair is not linearly connected (a negative verdict), 0 when all are.
    """
    from lmctk.basin.barrier import DEFINITIONS, barrier_matrix, barrier_sweep
    from lmctk.loading import load_model_state, read_state, resolve_task
    from lmctk.render import line_plot, terminal_curve
    from lmctk.train import resolve_device

    if len(models) < 2:
        raise ConfigError("barrier: give at least two models (run dirs or checkpoint dirs)")
    if definition not in DEFINITIONS:
        raise ConfigError(f"--definition: unknown {definition!r}; choose one of {', '.join(DEFINITIONS)}")
    refuse_existing([json_out, plot], overwrite)
    the_task = resolve_task(task, parse_options(task_opt, "--task-opt"), models)
    model, first, _ = load_model_state(models[0], the_task)  # one skeleton; the sweep checks the others' keys
    states = [first] + [dict(read_state(p, model)) for p in models[1:]]
    target = resolve_device(device)
    model = model.to(target)
    kwargs: dict[str, Any] = dict(points=points, align=align, renorm=renorm, split=split, device=target,
                                  batch_size=batch_size, calib_batches=calib_batches)
    names = _names(models)
    if len(models) == 2:
        result = barrier_sweep(model, states[0], states[1], the_task, names=tuple(names), **kwargs)
        results = [result]
        console.print(result)
        series = {"raw loss": result.raw.loss}
        if result.aligned:
            series["aligned loss"] = result.aligned.loss
        console.print(terminal_curve(result.alphas, series, title="loss along α", xlabel="α"))
        payload = result.to_dict()
    else:
        matrix = barrier_matrix(model, dict(zip(names, states)), the_task, **kwargs)
        results = list(matrix.pairs.values())
        console.print(matrix)
        payload = matrix.to_dict()
    verdicts = []
    for r in results:
        connected, line = r.verdict(threshold, definition)
        prefix = "" if len(results) == 1 else f"{r.names[0]} ↔ {r.names[1]}: "
        console.print(f"[{'green' if connected else 'red'}]{prefix}{line}[/]", highlight=False)
        verdicts.append({"a": r.names[0], "b": r.names[1], "connected": connected, "message": line})
    payload["verdict"] = {"threshold": threshold, "definition": definition, "pairs": verdicts}
    if json_out:
        write_json(json_out, payload, overwrite)
    if plot:
        panels: dict[str, dict[str, list[float]]] = {"loss": {}, "accuracy": {}}
        for r in results:
            tag = "" if len(results) == 1 else f"{r.names[0]}–{r.names[1]} "
            for label, curve in (("raw", r.raw), ("aligned", r.aligned)):
                if curve is not None:
                    panels["loss"][tag + label] = curve.loss
                    panels["accuracy"][tag + label] = curve.accuracy
        line_plot(plot, results[0].alphas, panels, xlabel="α", overwrite=overwrite,
                  title=f"interpolation ({split} split, renorm={renorm})")
    if not all(v["connected"] for v in verdicts):
        raise typer.Exit(3)
