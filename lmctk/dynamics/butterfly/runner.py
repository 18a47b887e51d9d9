"""Run a butterfly recipe: run dir, journal, resume that skips finished trials, and trial sharding over
torch.distributed ranks (`torchrun --nproc-per-node N -m lmctk run RECIPE`; gloo on CPU).

Rank 0 creates the run dir, checks determinism (`verify_twins`) and trains the parent once, writing
checkpoints at every perturbation step and every step twin A is measured at (twin A is the parent run
itself, so trials train only twin B); then every rank runs trials i ≡ rank (mod world) that the journal
does not list as finished, appending one record per trial; rank 0 merges the journal into the report. A run
killed at any moment resumes with `resume=True`: unfinished trials are re-run from their parent
checkpoint, and since trials are pure functions of the recipe the merged metrics are the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lmctk.dynamics.butterfly.perturb import init_stds
from lmctk.dynamics.butterfly.recipe import (
    ButterflyRecipe,
    Trial,
    independent_seed,
    trials,
)
from lmctk.dynamics.butterfly.report import ButterflyReport, summarize, write_plots
from lmctk.dynamics.butterfly.twins import (
    Reference,
    measure_steps,
    run_independent,
    run_perturbed,
    verify_twins,
)
from lmctk.errors import ConfigError
from lmctk.io import atomic_write_json, load_state
from lmctk.io.lock import locked
from lmctk.rundir import RunDir, environment, read_journal, timestamp
from lmctk.tasks import get_task
from lmctk.train import (
    Trainer,
    config_skeleton,
    deterministic,
    init_model,
    resolve_device,
)

REPORT = "report.json"
# progress(event, info): "preflight", "parent", "trials" ({"todo": n}), "trial_start", "measure", "trial_done"
Progress = Callable[[str, dict[str, Any]], None]


@dataclasses.dataclass
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this module initialised the process group and tears it down

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@contextmanager
def distributed() -> Iterator[Dist]:
    """Join the torchrun job described by RANK/WORLD_SIZE (gloo backend), or act as the only rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), owned)
    finally:
        if owned:
            dist.destroy_process_group()


def _open_run(recipe: ButterflyRecipe, out: Path, name: str, *, resume: bool, overwrite: bool) -> RunDir:
    ids = [t.id for t in trials(recipe)]
    if resume and (out / "manifest.json").is_file():
        run = RunDir.open(out)
        saved = run.manifest()
        if saved.get("kind") != "butterfly":
            raise ConfigError(f"{out}: not a butterfly run (kind {saved.get('kind')!r}); choose another --out")
        if saved["recipe"] != json.loads(json.dumps(recipe.to_dict())):
            raise ConfigError(f"{out}: the recipe differs from the one this run started with; resume with the same "
                              "recipe and --set values, or start a new run without --resume")
        return run
    run = RunDir.create(out, overwrite=overwrite)  # a dir killed before its manifest starts over by itself
    run.write_manifest({"kind": "butterfly", "name": name, "created": timestamp(), "recipe": recipe.to_dict(),
                        "seed": recipe.train.seed, "trials": ids, "environment": environment()})
    return run


def parent_steps(recipe: ButterflyRecipe) -> list[int]:
    """Steps the parent run is checkpointed at: every t, and every step twin A is measured at.

    A twin forked at t and trained unperturbed is the parent run itself (fork-then-train equals training
    straight through), so every trial reads twin A from these checkpoints instead of retraining it.
    """
    m, total = recipe.measure, recipe.train.steps
    starts = set(recipe.sweep.steps) | ({0} if recipe.sweep.independent else set())
    return sorted({s for t in starts for s in measure_steps(t, total, m.every, m.at)})


def _prepare_parent(recipe: ButterflyRecipe, run: RunDir, task, progress: Progress | None) -> None:
    """Preflight on the fresh parent, then train it once to the end, checkpointing at `parent_steps`."""
    records = run.records()
    parent = Trainer(recipe.train, task=task)
    if recipe.run.verify_steps > 0 and not any(r.get("type") == "preflight" for r in records):
        check = verify_twins(parent, recipe.run.verify_steps)
        run.append({"type": "preflight", **check})
        if progress:
            progress("preflight", check)
    needed = parent_steps(recipe)
    have = set(run.checkpoint_steps())
    missing = [t for t in needed if t not in have]
    if not missing:
        return
    start = max((t for t in have if t <= missing[0]), default=None)
    if start is not None:
        parent.load_checkpoint(run.checkpoint_dir(start))
    for t in missing:
        while parent.step < t:
            parent.train_step()
        parent.save_checkpoint(run.checkpoint_dir(t))
        if progress:
            progress("parent", {"step": t})


def _saved_parent(recipe: ButterflyRecipe, run: RunDir, task) -> Reference:
    """Twin A read from the parent run's checkpoints, into one model kept for the whole rank."""
    device = resolve_device(recipe.train.device)
    model = config_skeleton(recipe.train, task).to(device)

    def at(step: int) -> nn.Module:
        model.load_state_dict(load_state(run.checkpoint_dir(step), device=device))
        return model
    return at


def _run_trial(trial: Trial, recipe: ButterflyRecipe, run: RunDir, task, cache: dict, progress: Progress | None,
               init_std: dict[str, float]) -> dict[str, Any]:
    def on_measure(step: int, m: dict[str, Any]) -> None:  # the trial record holds every measurement
        if progress:
            progress("measure", {"trial": trial.id, "step": step, "l2": m["l2"]})

    total = recipe.train.steps
    if "a" not in cache:
        cache["a"] = _saved_parent(recipe, run, task)
    reference = cache["a"]
    if trial.kind == "independent":
        b = Trainer(dataclasses.replace(recipe.train, seed=independent_seed(recipe, trial.replicate)), task=task)
        return run_independent(reference, b, total, recipe.measure, on_measure)
    if cache.get("t") != trial.t:
        parent = Trainer(recipe.train, task=task, model=config_skeleton(recipe.train, task))
        parent.load_checkpoint(run.checkpoint_dir(trial.t))
        cache.update(t=trial.t, parent=parent)
    return run_perturbed(cache["parent"], trial.perturbation(recipe), total, recipe.measure, init_std, on_measure,
                         reference)


def finished_trials(run: RunDir) -> set[str]:
    """Ids of trials with a complete record in the journal."""
    return {r["trial"]["id"] for r in read_journal(run.journal_path) if r.get("type") == "trial"}


def report(run_dir: str | os.PathLike, *, plots: bool = True) -> ButterflyReport:
    """Merge a butterfly run dir's journal into its report; write report.json (and PNGs) into the run dir."""
    run = RunDir.open(run_dir)
    manifest = run.manifest()
    if manifest.get("kind") != "butterfly":
        raise ConfigError(f"{run.path}: not a butterfly run dir (made by `lmctk run`)")
    result = summarize(manifest.get("name", run.path.name), manifest["recipe"], manifest["trials"], run.records())
    payload = result.to_dict()
    if plots:
        payload["plots"] = [p.name for p in write_plots(result, run.path)]
    atomic_write_json(run.path / REPORT, payload)
    return result


def _run_trials(recipe: ButterflyRecipe, run: RunDir, task, dist: Dist, init_std: dict[str, float],
                progress: Progress | None) -> None:
    """This rank's unfinished trials, by t (each parent is loaded once), each journalled when done."""
    done = finished_trials(run)
    mine = [t for i, t in enumerate(trials(recipe)) if i % dist.world == dist.rank and t.id not in done]
    mine.sort(key=lambda trial: trial.t)  # trials are pure: any order gives the same records
    cache: dict[str, Any] = {}
    if progress:
        progress("trials", {"todo": len(mine)})
    for trial in mine:
        if progress:
            progress("trial_start", trial.to_dict())
        result = _run_trial(trial, recipe, run, task, cache, progress, init_std)
        run.append({"type": "trial", "trial": trial.to_dict(), "result": result, "rank": dist.rank})
        if progress:
            progress("trial_done", {**trial.to_dict(), "final": result["final"], "perturbation": result["perturbation"]})


def run_recipe(recipe: ButterflyRecipe, out: str | os.PathLike, *, name: str = "butterfly", resume: bool = False,
               overwrite: bool = False, progress: Progress | None = None) -> ButterflyReport | None:
    """Run every unfinished trial of `recipe` in the run dir `out` (sharded over torchrun ranks).

    Returns the merged report on rank 0 and None on other ranks.
    """
    out = Path(out)
    threads = torch.get_num_threads()
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    try:
        with distributed() as dist, deterministic(recipe.run.deterministic):
            task = get_task(recipe.train.task, **recipe.train.task_options)
            init_std = init_stds(init_model(recipe.train, task))  # a bad model option fails before the run dir is touched
            with locked(out) if dist.rank == 0 else nullcontext():  # rank 0 holds the run for the whole job
                if dist.rank == 0:
                    run = _open_run(recipe, out, name, resume=resume, overwrite=overwrite)
                    _prepare_parent(recipe, run, task, progress)
                dist.barrier()
                _run_trials(recipe, RunDir.open(out), task, dist, init_std, progress)
                dist.barrier()
                if dist.rank == 0:
                    return report(out, plots=recipe.run.plots)
                return None
    finally:
        torch.set_num_threads(threads)
