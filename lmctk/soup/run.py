"""`soup_files`: a recipe in, a soup HF dir out (plan from headers, greedy selection, streamed write).

Uniform and weighted soups never hold a model: they stream. A greedy soup scores each ingredient on
the task's "val" split and tries candidates against a running fp32 sum (one candidate model in
memory at a time), then streams the kept ones. `align_to` permutes each ingredient onto a reference
with weight matching first, which needs whole states: reference + sum + one ingredient in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmctk.basin.align import apply, weight_matching
from lmctk.errors import ConfigError, OutputExistsError
from lmctk.io import KeyMap, load_state, stored_names
from lmctk.io.lock import locked
from lmctk.loading import resolve_task, task_of, unloaded_skeleton
from lmctk.soup.core import GreedyResult, RunningSum, greedy_soup
from lmctk.soup.evaluate import Scorer
from lmctk.soup.plan import SoupPlan, plan_soup
from lmctk.soup.recipe import SoupRecipe
from lmctk.soup.write import model_card, stream_soup, write_soup
from lmctk.spec import spec_for


@dataclass
class SoupResult:
    """What a soup run did: the plan, where it wrote, which ingredients it kept, the greedy trace, scores."""

    plan: SoupPlan
    out: Path | None
    kept: list[int]
    greedy: GreedyResult | None = None
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # label -> split -> metrics
    dry_run: bool = False
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": None if self.out is None else str(self.out),
            "dry_run": self.dry_run,
            "resumed": self.resumed,
            "kept": [str(self.plan.ingredients[i].path) for i in self.kept],
            "plan": self.plan.to_dict(),
            "greedy": None if self.greedy is None else self.greedy.to_dict(),
            "scores": self.scores,
        }

    def results_table(self) -> str:
        """The scores as a Markdown table (for the model card)."""
        if not self.scores:
            return ""
        splits = [s for s in ("train", "val", "test") if any(s in row for row in self.scores.values())]
        lines = ["| model | " + " | ".join(f"{s} loss | {s} accuracy" for s in splits) + " |",
                 "|---|" + "---|---|" * len(splits)]
        for label, row in self.scores.items():
            cells = [f"{row[s]['loss']:.4f} | {row[s]['accuracy']:.4f}" if s in row else " | " for s in splits]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = [self.plan]
        if self.greedy is not None:
            parts.append(self.greedy)
        if self.scores:
            t = Table(title="scores")
            t.add_column("model")
            splits = [s for s in ("train", "val", "test") if any(s in row for row in self.scores.values())]
            for s in splits:
                t.add_column(f"{s} loss", justify="right")
                t.add_column(f"{s} acc", justify="right")
            for label, row in self.scores.items():
                t.add_row(label, *[x for s in splits for x in (
                    (f"{row[s]['loss']:.4f}", f"{row[s]['accuracy']:.4f}") if s in row else ("", ""))])
            parts.append(t)
        if self.dry_run:
            parts.append(Text("dry run: checked headers and tokenizers; nothing written", style="bold green"))
        elif self.out is not None:
            parts.append(Text(f"wrote {self.out}" + (" (resumed)" if self.resumed else ""), style="bold green"))
        return Group(*parts)


def soup_files(
    recipe: SoupRecipe,
    *,
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    selection: Callable[[int, int], None] | None = None,
) -> SoupResult:
    """Run a soup recipe: plan from headers; unless `dry_run`, select (greedy) and write the HF dir.

    `progress(tensor, bytes_done, bytes_total)` follows the write; `selection(done, total)` the greedy
    soup's val evaluations.
    """
    spec = recipe.soup
    paths = [Path(i.path) for i in spec.ingredients]
    plan = plan_soup(paths, method=spec.method, weights=recipe.weights, dtype=spec.dtype,
                     tokenizer_from=spec.tokenizer_from, shard_size=spec.shard_size)
    if spec.out is None and not dry_run:
        raise ConfigError("--out: where to write the soup (an HF model dir); or pass --dry-run")
    out = None if spec.out is None else Path(spec.out)
    if out is not None and out.exists() and not overwrite:
        raise OutputExistsError(out)
    needs_task = spec.method == "greedy"
    if needs_task and recipe.task is None and _task_from_runs(paths) is None:
        raise ConfigError("--task: the greedy soup scores ingredients on a task's val split; e.g. --task digits")
    if spec.align_to:
        _align_spec(Path(spec.align_to))  # fails early (and in dry runs) for an architecture without a spec
    if dry_run:
        if recipe.task is not None:  # an unknown task or option is a problem a dry run must catch
                    resolve_task(recipe.task.name, recipe.task.options, paths)
        return SoupResult(plan, out, list(range(len(paths))), dry_run=True)
    assert out is not None
    with locked(out):
        return _cook(recipe, plan, paths, out, resume=resume, overwrite=overwrite, progress=progress,
                     selection=selection)


def _cook(recipe: SoupRecipe, plan: SoupPlan, paths: list[Path], out: Path, *, resume: bool, overwrite: bool,
          progress: Callable[[str, int, int], None] | None,
          selection: Callable[[int, int], None] | None) -> SoupResult:
    """Select (greedy) and write the soup; scores go into the model card before the dir is committed."""
    spec = recipe.soup
    align = _aligner(spec.align_to) if spec.align_to else None
    greedy = None
    scorer = _scorer(recipe, paths) if (spec.method == "greedy" or recipe.task is not None) else None
    if spec.method == "greedy":
        assert scorer is not None
        loaders = [_loader(p, align) for p in paths]
        greedy = greedy_soup(loaders, scorer.score, names=[str(p) for p in paths], tolerance=spec.tolerance,
                             metric=f"val {scorer.metric}", keep_state=False, progress=selection)
        kept = greedy.kept
    else:
        kept = [i for i, _ in plan.mix()]
    result = SoupResult(plan, out, kept, greedy, resumed=resume)
    selected = kept if spec.method == "greedy" else None
    card = model_card(plan, recipe.to_toml(), table=_greedy_table(result), kept=selected)

    def finish(written: Path) -> dict[str, bytes]:
        if scorer is None:
            return {}
        result.scores = _scores(scorer, plan, kept, written)
        return {"README.md": model_card(plan, recipe.to_toml(), table=_all_tables(result), kept=selected).encode()}

    options = {"overwrite": overwrite, "resume": resume, "progress": progress, "finish": finish}
    if align is None:
        write_soup(plan, out, selected=selected, card=card, **options)
    else:
        _write_aligned(plan, out, [(_loader(paths[i], align), w) for i, w in plan.mix(selected)], card, **options)
    return result


def _task_from_runs(paths: list[Path]):
    return task_of(paths[0])


def _scorer(recipe: SoupRecipe, paths: list[Path]):
    task_spec = recipe.task
    task = resolve_task(task_spec.name if task_spec else None, task_spec.options if task_spec else None, paths)
    return Scorer.for_checkpoint(paths[0], task, recipe.soup.metric)


def _loader(path: Path, align):
    def load() -> dict[str, torch.Tensor]:
        state = load_state(path)
        return align(path, state) if align is not None else state

    return load


def _align_spec(reference: Path | torch.nn.Module):
    """The permutation spec of the reference checkpoint's architecture (from its config, no weights read)."""
    return spec_for(reference if isinstance(reference, torch.nn.Module) else unloaded_skeleton(reference))


def _aligner(reference: str):
    """A function (path, state) -> state permuted onto `reference` by weight matching.

    The permutations are memoised per resolved path: re-loading an ingredient (greedy scoring, trials,
    the write) only re-applies them.
    """
    ref_path = Path(reference).resolve()
    skeleton = unloaded_skeleton(ref_path)
    spec, keys = _align_spec(skeleton), KeyMap.of(skeleton)
    ref_state = {k: v.float() for k, v in keys.view(load_state(ref_path)).items()}
    perms: dict[Path, Any] = {}

    def align(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = path.resolve()
        if key == ref_path:
            return state
        view = keys.view(state)
        if key not in perms:
            perms[key] = weight_matching(spec, ref_state, {k: v.float() for k, v in view.items()}).perms
        permuted = apply(spec, view, perms[key])
        return {stored: permuted[k] for k, stored in stored_names(view).items()}  # back to the stored names

    return align


def _write_aligned(plan: SoupPlan, out: Path, mix: list[tuple[Callable[[], dict], float]], card: str, **kwargs) -> Path:
    """Average the aligned states of `mix` (loader, weight) in memory, then stream it cast once from fp32."""
    soup = RunningSum()
    for load, weight in mix:
        soup.add(load(), weight)
    mean = soup.mean(torch.float32)  # one cast, fp32 -> slot dtype, per tensor (not via the inputs' dtype)
    dtypes = {s.name: s.dtype for s in plan.slots}
    return stream_soup(plan, out, lambda name: mean[name].to(dtypes[name]), card, **kwargs)


def _scores(scorer, plan: SoupPlan, kept: list[int], out: Path) -> dict[str, dict[str, dict[str, float]]]:
    scores = {}
    for i, ing in enumerate(plan.ingredients):
        state = load_state(ing.path)
        scores[f"{i + 1}: {ing.path}"] = {s: scorer.metrics(state, s) for s in ("val", "test")}
        del state
    state = load_state(out)
    scores["soup"] = {s: scorer.metrics(state, s) for s in ("val", "test")}
    return scores


def _greedy_table(result: SoupResult) -> str | None:
    if result.greedy is None:
        return None
    g = result.greedy
    lines = [f"Greedy selection on held-out {g.metric} (tolerance {g.tolerance}):", "",
             "| order | ingredient | alone | soup with it | kept |", "|---|---|---|---|---|"]
    for n, step in enumerate(g.trace, start=1):
        lines.append(f"| {n} | `{step.name}` | {g.shown(step.alone):.4f} | {g.shown(step.soup_score):.4f} | "
                     f"{'yes' if step.kept else 'no'} |")
    return "\n".join(lines)


def _all_tables(result: SoupResult) -> str:
    return "\n\n".join(t for t in (_greedy_table(result), result.results_table()) if t)
