"""`lmctk butterfly` (alias `lmctk run`: butterfly / instability sweeps from a recipe) and `lmctk report`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from lmctk.cli.app import app, console, write_json


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def butterfly(
    recipe: Path = typer.Argument(..., help="A butterfly recipe (TOML), e.g. recipes/butterfly-digits-mlp.toml."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's run.out or runs/<recipe name>)."),
    resume: bool = typer.Option(False, help="Continue a killed run: finished trials are skipped."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set sweep.replicates=1 (repeatable)."),
    quiet: bool = typer.Option(False, help="No per-trial lines."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report JSON here."),
) -> None:
    """Run a sweep of twin trials (steps × scales × kinds × replicates); shards over `torchrun` ranks."""
    from lmctk.dynamics.butterfly.recipe import load_butterfly_recipe
    from lmctk.dynamics.butterfly.runner import run_recipe

    spec = load_butterfly_recipe(recipe, overrides=set_)
    target = out or Path(spec.run.out or Path("runs") / recipe.stem)
    loud = _rank0() and not quiet

    def progress(event: str, info: dict) -> None:
        if not loud:
            return
        if event == "preflight":
            console.print(f"preflight: zero-perturbation twins bitwise identical for {info['steps']} steps "
                          f"on {info['device']}", highlight=False)
        elif event == "parent":
            console.print(f"parent checkpoint at step {info['step']}", highlight=False)
        elif event == "trial_done":
            f, norm = info["final"], info["perturbation"].get("norm")
            eps = f"‖ε‖ {norm:<8.4g}" if norm is not None else " " * 13
            console.print(f"trial {info['id']:<26} {eps} L2 {f['l2']:<8.4g} loss barrier "
                          f"{f['barrier']['loss']['mean_endpoint']:.4f}  disagreement {f.get('disagreement', 0):.3f}",
                          highlight=False)

    result = run_recipe(spec, target, name=recipe.stem, resume=resume, overwrite=overwrite, progress=progress)
    if result is None:  # not rank 0: rank 0 prints and writes the merged report
        return
    console.print(result)
    console.print(f"run dir: {target} (report.json, divergence-*.png)", highlight=False)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)


app.command("butterfly")(butterfly)
app.command("run", help="Alias of `lmctk butterfly`: run a sweep of twin trials from a recipe.")(butterfly)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory made by `lmctk butterfly` (finished or not)."),
    plots: bool = typer.Option(True, help="Write divergence PNGs into the run dir."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Final-barrier heatmap over t × σ, phase labels and σ*, determinism status; PNGs of divergence per t."""
    from lmctk.dynamics.butterfly.runner import report as make_report

    result = make_report(run_dir, plots=plots)
    console.print(result)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)
