"""`lmctk butterfly` (alias `lmctk run`: butterfly / instability sweeps from a recipe) and `lmctk report`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from lmctk.cli.app import SET_HELP, app, console, write_json
from lmctk.render.progress import Progress


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _trial_line(info: dict, analysis: Any) -> str:
    """One finished trial in under 80 columns, naming the barrier the report analyses."""
    from lmctk.dynamics.butterfly.report import final_value

    final, norm = info["final"], info["perturbation"].get("norm")
    value = final_value(final, analysis.metric, analysis.definition, analysis.path)
    eps = f"‖ε‖ {norm:<6.3g} " if norm is not None else ""
    path = "aligned " if analysis.path == "aligned" else ""
    barrier = "—" if value is None else f"{value:.4f}"
    return (f"{info['id']:<21} {eps}L2 {final['l2']:<7.4g} {path}{analysis.metric} barrier {barrier}"
            f"  disagr. {final.get('disagreement', 0):.3f}")


def butterfly(
    recipe: Path = typer.Argument(..., help="A butterfly recipe (TOML), e.g. recipes/butterfly-digits-mlp.toml."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's run.out or runs/<recipe name>)."),
    resume: bool = typer.Option(False, help="Continue a killed run: finished trials are skipped."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, help="No progress and no per-trial lines."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report JSON here."),
) -> None:
    """Run a sweep of twin trials (steps × scales × kinds × replicates); shards over `torchrun` ranks."""
    from lmctk.dynamics.butterfly.recipe import load_butterfly_recipe
    from lmctk.dynamics.butterfly.runner import run_recipe

    spec = load_butterfly_recipe(recipe, overrides=set_)
    target = out or Path(spec.run.out or Path("runs") / recipe.stem)
    with Progress("trials", console=console, quiet=quiet or not _rank0()) as bar:

        def progress(event: str, info: dict) -> None:
            if event == "preflight":
                bar.log(f"preflight: zero-perturbation twins bitwise identical for {info['steps']} steps "
                        f"on {info['device']}")
            elif event == "parent":
                bar.log(f"parent checkpoint at step {info['step']}")
            elif event == "trials":
                bar.update(0, info["todo"])
            elif event == "trial_done":
                bar.log(_trial_line(info, spec.analysis))
                bar.update(bar.done + 1, metric=f"last {info['id']}")

        result = run_recipe(spec, target, name=recipe.stem, resume=resume, overwrite=overwrite, progress=progress)
    if result is None:  # not rank 0: rank 0 prints and writes the merged report
        return
    console.print(result)
    console.print(f"run dir: {target} (report.json, butterfly.png, divergence-*.png)", highlight=False)
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
