"""`lmctk soup` and `lmctk soupable`: average checkpoints into a loadable model, and judge whether to."""

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
    refuse_existing,
    write_json,
)
from lmctk.errors import ConfigError
from lmctk.render.progress import Progress


def _recipe(
    checkpoints: list[Path] | None, recipe: Path | None, overrides: list[str], weights: list[float] | None,
    flags: dict, task: str | None, task_options: dict,
):
    """The recipe file (or the checkpoints) with the flags set on top, parsed by the same strict schema."""
    from dataclasses import asdict

    from lmctk.recipes import parse
    from lmctk.soup import SoupRecipe, load_soup_recipe

    if recipe is not None:
        if checkpoints:
            raise ConfigError("checkpoints: give them in the recipe or on the command line, not both")
        data = asdict(load_soup_recipe(recipe, overrides=overrides, allow_code=task is not None))
    elif overrides:
        raise ConfigError("--set overrides recipe keys; give --recipe FILE too")
    elif not checkpoints:
        raise ConfigError("checkpoints: give at least 2 checkpoints, or --recipe FILE.toml")
    else:
        data = {"soup": {"ingredients": [{"path": str(p)} for p in checkpoints]}, "task": None}
    spec = data["soup"]
    spec.update({key: str(v) if isinstance(v, Path) else v for key, v in flags.items() if v is not None})
    if weights is not None:
        if len(weights) != len(spec["ingredients"]):
            raise ConfigError(f"--weights: {len(weights)} weights for {len(spec['ingredients'])} checkpoints; give one per checkpoint")
        for ingredient, weight in zip(spec["ingredients"], weights):
            ingredient["weight"] = weight
        if flags["method"] is None:
            spec["method"] = "weighted"
    elif spec.get("method", "uniform") != "weighted":  # the CLI chose another method: the recipe's weights go
        for ingredient in spec["ingredients"]:
            ingredient.pop("weight", None)
    if task is not None:
        data["task"] = {"name": task, "options": task_options}
    elif task_options:
        if data["task"] is None:
            raise ConfigError("--task-opt: give --task too")
        data["task"]["options"].update(task_options)
    return parse(data, SoupRecipe)


@app.command()
def soup(
    checkpoints: list[Path] = typer.Argument(None, help="Run dirs (latest checkpoint), HF model dirs or weight files."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output HF model dir (refused if it exists, unless --overwrite)."),
    method: Optional[str] = typer.Option(None, help="uniform, weighted or greedy (default: uniform)."),
    weights: Optional[str] = typer.Option(None, help="Weighted soups: one weight per checkpoint, e.g. 0.5,0.3,0.2."),
    task: Optional[str] = typer.Option(None, help="Task whose val split scores a greedy soup (default: the runs' task)."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    metric: Optional[str] = typer.Option(None, help="Greedy selection metric: accuracy or loss (default: loss)."),
    tolerance: Optional[float] = typer.Option(None, help="Greedy: keep a candidate unless the val score drops by this much (default: 0, strict)."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype of float tensors: float32, bfloat16 or float16 (default: as input)."),
    shard_size: Optional[str] = typer.Option(None, help="Largest output shard, e.g. 2GB or 500MiB (default: 2GB)."),
    tokenizer_from: Optional[str] = typer.Option(None, help="Ingredient (number or path) whose tokenizer the soup keeps when they differ."),
    align_to: Optional[Path] = typer.Option(None, "--align-to", help="Permute every ingredient onto this checkpoint first (weight matching)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A soup recipe TOML (recipes/soup-*.toml); flags override its fields."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check headers and tokenizers, print the plan and estimates; write nothing."),
    resume: bool = typer.Option(False, help="Continue an interrupted write of the same soup from its journal."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """Average checkpoints (uniform, weighted or greedy) into an HF model dir, streamed tensor by tensor."""
    from lmctk.soup import soup_files

    flags = {"out": out, "method": method, "dtype": dtype, "shard_size": shard_size, "tokenizer_from": tokenizer_from,
             "align_to": align_to, "metric": metric, "tolerance": tolerance}
    shares = parse_list(weights, "--weights", float, "0.5,0.3,0.2") if weights else None
    final = _recipe(checkpoints, recipe, set_, shares, flags, task, parse_options(task_opt, "--task-opt"))
    refuse_existing([json_out], overwrite)
    with Progress("soup", unit="bytes", console=console, quiet=quiet or dry_run) as bar:

        def selection(done: int, total: int) -> None:
            bar.stage("soup: greedy selection (val evaluations)", unit="evaluations")
            bar.update(done, total)

        def written(name: str, done: int, total: int) -> None:
            bar.stage("soup", unit="bytes")
            bar.update(done, total, name)

        result = soup_files(final, dry_run=dry_run, resume=resume, overwrite=overwrite, progress=written,
                            selection=selection)
    console.print(result)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)


@app.command()
def soupable(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more run dirs, HF model dirs or weight files."),
    task: Optional[str] = typer.Option(None, help="Task to judge on (default: the runs' task)."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    base: Optional[Path] = typer.Option(None, help="The common base checkpoint: enables task-vector cosines."),
    threshold: float = typer.Option(0.05, help="Largest acceptable loss barrier between two ingredients."),
    points: Optional[int] = typer.Option(None, help="Also compute full barriers on a grid of this many α (incl. 0 and 1)."),
    metric: str = typer.Option("loss", help="Held-out metric for selection: accuracy or loss."),
    tolerance: float = typer.Option(0.0, help="Greedy soup tolerance on the val score."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the verdict as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Should these checkpoints be souped? Exit 0 soupable, 3 not soupable, 2 bad input."""
    from lmctk.soup import soupable as judge

    refuse_existing([json_out], overwrite)
    with Progress("soupable: evaluations", console=console, quiet=quiet) as bar:
        verdict = judge(checkpoints, task, task_options=parse_options(task_opt, "--task-opt"), base=base,
                        threshold=threshold, points=points, metric=metric, tolerance=tolerance, progress=bar.update)
    console.print(verdict)
    if json_out:
        write_json(json_out, verdict.to_dict(), overwrite)
    raise typer.Exit(verdict.exit_code)
