"""`lmctk converge`: how runs that differ only in their seed converge and diverge over training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmctk.cli.app import (
    QUIET_HELP,
    SET_HELP,
    app,
    console,
    parse_list,
    parse_options,
    write_json,
)
from lmctk.errors import ConfigError, OutputExistsError
from lmctk.render.progress import Progress


@app.command()
def converge(
    runs: Optional[list[Path]] = typer.Argument(None, help="K >= 2 run dirs (lmctk runs or dirs of step<N>/ HF dirs)."),
    task: Optional[str] = typer.Option(None, help="Task the runs were trained on (default: the first run's manifest)."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    steps: Optional[str] = typer.Option(None, help="Analyse only these common steps, e.g. 0,10,100."),
    classes: Optional[Path] = typer.Option(None, help="Token classes: JSON {token: class} or token<TAB>class lines."),
    counts: Optional[Path] = typer.Option(None, help="Token counts for frequency strata (.npy or integers: count of "
                                                     "id i at position i); default: count the task's training text."),
    probe: Optional[int] = typer.Option(None, help="Probe examples for fingerprints/CKA (default: recipe's, else 16)."),
    batch_size: Optional[int] = typer.Option(None, help="Eval examples per forward (default: recipe's, else 16)."),
    regimes: Optional[str] = typer.Option(None, help="Similarity the seed regimes come from: gram (default), aligned, "
                                                     "cka, raw, centred (default: recipe's, else gram)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    no_vmap: bool = typer.Option(False, "--no-vmap", help="Evaluate the seeds one at a time instead of stacked."),
    recipe: Optional[Path] = typer.Option(None, help="Train the recipe's seeds into --out first, then analyse them."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --recipe: dir for the seed runs (and default plots)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Plot dir: convergence.png and fingerprint.png go here."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file and plots."),
    retrain: bool = typer.Option(False, help="With --recipe: train the seeds afresh instead of reusing finished runs."),
) -> None:
    """Seed convergence: expected per-token KL, fingerprints, CKA and loss spread per step; phases."""
    from lmctk.dynamics.converge.analysis import converge as analyse
    from lmctk.dynamics.converge.recipe import load_converge_recipe, train_seeds
    from lmctk.dynamics.converge.report import plot as write_plots
    from lmctk.dynamics.converge.report import render

    options = parse_options(task_opt, "--task-opt")
    class_file = classes
    settings = {"probe": probe, "batch_size": batch_size, "regimes_from": regimes}  # None: the recipe's, else default
    if set_ and recipe is None:
        raise ConfigError("--set overrides recipe keys; give --recipe FILE too")
    if recipe is not None:
        if runs:
            raise ConfigError("--recipe trains its own seeds; give either run dirs or --recipe")
        if out is None:
            raise ConfigError("--recipe needs --out DIR for the seed runs")
        plot = plot or out / "plots"
    for path in [json_out] + ([plot / "convergence.png", plot / "fingerprint.png"] if plot else []):
        if path is not None and path.exists() and not overwrite:  # refuse before the work, not after
            raise OutputExistsError(path)
    if recipe is not None:
        spec = load_converge_recipe(recipe, overrides=set_, allow_code=task or False)
        with Progress("converge: trained seeds", len(spec.converge.seeds), console=console, quiet=quiet) as bar:
            runs = train_seeds(spec, out, overwrite=retrain, progress=lambda n, total: bar.update(n, total))
        recipe_settings = {"probe": spec.converge.probe, "batch_size": spec.converge.batch_size,
                           "regimes_from": spec.converge.regimes}
        settings = {key: recipe_settings[key] if value is None else value for key, value in settings.items()}
        class_file = class_file or (Path(spec.converge.classes) if spec.converge.classes else None)
    if not runs or len(runs) < 2:
        raise ConfigError("converge needs at least 2 run dirs (or --recipe FILE --out DIR)")
    with Progress("converge: evaluated steps", console=console, quiet=quiet) as bar:
        result = analyse(
            runs, task, task_options=options, steps=parse_list(steps, "--steps") if steps else None, classes=class_file,
            counts=counts, device=device, batched=not no_vmap, progress=lambda n, total: bar.update(n, total),
            **{key: value for key, value in settings.items() if value is not None},
        )
    console.print(render(result))
    if plot is not None:
        for path in write_plots(result, plot, overwrite=overwrite):
            console.print(f"wrote {path}", highlight=False)
    if json_out is not None:
        write_json(json_out, result.to_dict(), overwrite)
