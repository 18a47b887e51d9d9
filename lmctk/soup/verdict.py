"""`soupable`: should these checkpoints be averaged, and which? A verdict with its evidence.

Evidence: pairwise loss barriers on the held-out split (midpoint: L(θ(½)) − ½(L_A+L_B); with
`points`, the max over an α grid), weight cosines (a shared-initialisation check), task-vector
cosines against `base`, and uniform soup vs greedy soup vs the best single model on val and test.
Soupable iff every barrier is at most `threshold`, the uniform soup's val loss is at most the best
ingredient's plus `threshold` (one basin, and averaging costs nothing on held-out data), and the
checkpoints share an initialisation (weight cosine ≥ 0.5, with the base when given).

Memory is flat in N: states are read from the files one at a time (own scores, soups as running sums)
or two at a time (pairs: barrier and dot product; cosines come from the dot products), with the
scorer's model and one working copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmctk.basin.barrier import barriers
from lmctk.basin.path import alpha_grid, evaluate_path
from lmctk.errors import ConfigError
from lmctk.io import StateView, check_compatible, inspect_checkpoint, stored_names
from lmctk.loading import read_state, resolve_task
from lmctk.render.progress import stages
from lmctk.soup.core import GreedyResult, RunningSum, greedy_soup
from lmctk.soup.evaluate import Scorer

SHARED_INIT_COSINE = 0.5  # weight cosine below which two checkpoints are taken to come from different inits
State = Mapping[str, torch.Tensor]


@dataclass
class Verdict:
    """The soupability verdict, its one-line explanation and the evidence behind it."""

    soupable: bool | None  # None: undefined (a loss is not finite)
    explanation: str
    names: list[str]
    metric: str
    threshold: float
    barriers: dict[str, dict[str, float]]  # "i-j" (1-based) -> midpoint (and max) loss barrier
    weight_cosine: list[list[float]]
    task_cosine: list[list[float]] | None
    shared_init: bool
    models: dict[str, dict[str, dict[str, float]]]  # label -> split -> metrics
    greedy: GreedyResult
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 soupable, 3 not soupable, 2 undefined (a non-finite loss: bad input, not a verdict)."""
        return 2 if self.soupable is None else 0 if self.soupable else 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "soupable": self.soupable, "explanation": self.explanation, "ingredients": self.names,
            "metric": self.metric, "threshold": self.threshold, "barriers": self.barriers,
            "weight_cosine": self.weight_cosine, "task_vector_cosine": self.task_cosine,
            "shared_init": self.shared_init, "models": self.models, "greedy": self.greedy.to_dict(),
            "notes": self.notes,
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from lmctk.render.text import short_path

        n = len(self.names)
        ing = Table(title="ingredients")
        ing.add_column("#", justify="right")
        ing.add_column("checkpoint")
        for i, name in enumerate(self.names, start=1):
            ing.add_row(str(i), short_path(name))
        pairs = Table(title=f"pairs: loss barrier on val (threshold {self.threshold}), cosines")
        for column in ("pair", "midpoint", "max", "weight cos", "task-vector cos"):
            pairs.add_column(column, justify="right")
        for i in range(n):
            for j in range(i + 1, n):
                b = self.barriers[f"{i + 1}-{j + 1}"]
                style = "red" if max(b.values()) > self.threshold else ""
                pairs.add_row(f"{i + 1}-{j + 1}", f"{b['midpoint']:.4f}", f"{b['max']:.4f}" if "max" in b else "-",
                              f"{self.weight_cosine[i][j]:.3f}",
                              "-" if self.task_cosine is None else f"{self.task_cosine[i][j]:.3f}", style=style)
        models = Table(title="models")
        models.add_column("model")
        for split in ("val", "test"):
            models.add_column(f"{split} loss", justify="right")
            models.add_column(f"{split} acc", justify="right")
        for label, row in self.models.items():
            models.add_row(label, *[f"{row[s][k]:.4f}" for s in ("val", "test") for k in ("loss", "accuracy")])
        colour = "green" if self.soupable else "red"
        lines = [Text(f"shared initialisation: {'yes' if self.shared_init else 'no'}")]
        lines += [Text(f"note: {note}") for note in self.notes]
        legend = Text("weight cos: cosine of the weight matrices; task-vector cos: of θ − θ_base (needs --base)",
                      style="dim")
        return Group(ing, pairs, legend, models, self.greedy, *lines, Text(self.explanation, style=f"bold {colour}"))


def soupable(
    paths: Sequence[str | Path],
    task: Any = None,
    *,
    task_options: Mapping[str, Any] | None = None,
    base: str | Path | None = None,
    threshold: float = 0.05,
    points: int | None = None,
    metric: str = "loss",
    tolerance: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> Verdict:
    """Judge whether the checkpoints at `paths` should be souped on `task` (default: the runs' task).

    `progress(done, total)` counts evaluations: each ingredient, each pair, the greedy trials, the two soups.
    """
    if len(paths) < 2:
        raise ConfigError(f"checkpoints: soupable needs at least 2, got {len(paths)}")
    if threshold < 0:
        raise ConfigError(f"--threshold: {threshold} is negative; give a loss barrier such as 0.05")
    if points is not None and points < 3:
        raise ConfigError(f"--points: {points} is too few; give at least 3 (the grid includes 0 and 1)")
    task = resolve_task(task, task_options, paths)
    scorer = Scorer.for_checkpoint(paths[0], task, metric)
    names = [str(p) for p in paths]
    check_compatible([inspect_checkpoint(p) for p in [*paths, *([base] if base is not None else [])]])
    n = len(paths)
    stage = stages(progress, n + n * (n - 1) // 2 + (n - 1) + 2)

    def load(path: str | Path) -> StateView:
        return read_state(path, scorer.model, keys=scorer.keys, dtype=torch.float32)

    base_state = load(base) if base is not None else None
    gram, own, base_dots, barriers = _scan(paths, load, scorer, points, base_state, stage)
    weight_cos = gram.cosines(matrices_only=True)
    shared, task_cos, notes = _shared_init(gram, base_state, base_dots, weight_cos)
    del base_state
    greedy = greedy_soup([lambda p=p: load(p) for p in paths], scorer.score, names=names,
                         scores=[scorer.value(m["val"]) for m in own], tolerance=tolerance,
                         metric=f"val {scorer.metric}", keep_state=False, progress=lambda done, total: stage())
    models = {f"{i + 1}": own[i] for i in range(n)}
    for label, kept in (("uniform soup", range(n)), ("greedy soup", greedy.kept)):
        soup = _mean(load(paths[i]) for i in kept)  # one ingredient at a time into the running sum
        models[label] = {s: scorer.metrics(soup, s) for s in ("val", "test")}
        del soup
        stage()
    best = max(range(n), key=lambda i: (scorer.value(own[i]["val"]), -i))
    soup_ok, explanation = _explain(scorer, barriers, threshold, greedy, models, best, n)
    if soup_ok and not shared:
        i, j = min(((i, j) for i in range(n) for j in range(i + 1, n)), key=lambda p: weight_cos[p[0]][p[1]])
        soup_ok, explanation = False, (
            f"not soupable: ingredients {i + 1} and {j + 1} do not share an initialisation (weight cosine "
            f"{weight_cos[i][j]:.2f} < {SHARED_INIT_COSINE}); align them first (lmctk soup --align-to REF) "
            "or soup fine-tunes of one base")
    return Verdict(soup_ok, explanation, names, scorer.metric, threshold, barriers, weight_cos, task_cos, shared,
                   models, greedy, notes)


def _scan(paths: Sequence[str | Path], load, scorer: Scorer, points: int | None, base_state: State | None,
          stage: Callable[[], None]):
    """One state at a time: own scores and the dot products with the base; then two at a time: the
    pairs' barriers and dot products. Never more than two ingredients in memory."""
    n = len(paths)
    gram, own, base_dots, barriers = _Gram(n), [], [], {}
    for i, path in enumerate(paths):
        state = load(path)
        own.append({s: scorer.metrics(state, s) for s in ("val", "test")})
        gram.add(i, i, state, state)
        if base_state is not None:
            base_dots.append(_dots(state, base_state, gram.keys(state)))
        del state
        stage()
    for i in range(n - 1):
        a = load(paths[i])
        for j in range(i + 1, n):
            b = load(paths[j])
            barriers[f"{i + 1}-{j + 1}"] = _barrier(scorer, a, b, own[i]["val"]["loss"], own[j]["val"]["loss"], points)
            gram.add(i, j, a, b)
            del b
            stage()
        del a
    return gram, own, base_dots, barriers


def _shared_init(gram: _Gram, base_state: State | None, base_dots: list[dict[str, float]],
                 weight_cos: list[list[float]]) -> tuple[bool, list[list[float]] | None, list[str]]:
    """Whether the ingredients share an initialisation (cosine with the base, else with each other),
    the task-vector cosines when the base is known, and notes saying which evidence was used."""
    n = len(weight_cos)
    if base_state is None:
        shared = all(weight_cos[i][j] >= SHARED_INIT_COSINE for i in range(n) for j in range(i + 1, n))
        return shared, None, ["no --base: task-vector cosines need the common base checkpoint"]
    self_dots = _dots(base_state, base_state, gram.keys(base_state))
    base_cos = [d["matrices"] / max((gram.dot[i][i]["matrices"] * self_dots["matrices"]) ** 0.5, 1e-300)
                for i, d in enumerate(base_dots)]
    notes = ["weight cosine with the base: " + ", ".join(f"{i + 1}: {c:.3f}" for i, c in enumerate(base_cos))]
    return all(c >= SHARED_INIT_COSINE for c in base_cos), gram.task_cosines(base_dots, self_dots), notes


def _barrier(scorer: Scorer, a: State, b: State, loss_a: float, loss_b: float, points: int | None) -> dict[str, float]:
    """Mean-endpoint loss barrier on val: at α=½, and with `points` over the whole α grid."""
    alphas = alpha_grid(points) if points else [0.0, 1.0]
    inner = sorted({*alphas[1:-1], 0.5})  # the endpoints' losses are known; ½ once, on the grid or not
    metrics, _ = evaluate_path(scorer.model, a, b, inner, scorer.task, split=scorer.split)
    loss = {x: m["loss"] for x, m in zip(inner, metrics)}
    out = {"midpoint": loss[0.5] - 0.5 * (loss_a + loss_b)}
    if points:
        curve = [loss_a, *(loss[x] for x in alphas[1:-1]), loss_b]
        full = barriers(alphas, curve)["mean_endpoint"]  # NaN when any loss on the grid is not finite
        out["max"] = math.nan if math.isnan(full) else max(out["midpoint"], full)
    return out


def _mean(states: Iterable[State]) -> dict[str, torch.Tensor]:
    soup = RunningSum()
    for state in states:
        soup.add(state)
        del state
    return soup.mean()


DOT_CHUNK = 1 << 20  # elements per float64 product: bounded scratch memory whatever the tensor


def _dots(a: State, b: State, keys: Sequence[str]) -> dict[str, float]:
    """<a, b> in float64 over the float `keys` ("all") and over those with 2+ dims ("matrices").

    Matrices only for the shared-init check: norm gains (all ones at init) and biases would make two
    independent inits look alike. Products in float64, not `metrics.dot`'s fp32: task-vector cosines
    subtract these sums from each other, and fine-tunes differ from their base in the last fp32 digits.
    """
    out = {"all": 0.0, "matrices": 0.0}
    for k in keys:
        x, y = a[k].reshape(-1), b[k].reshape(-1)
        d = sum(float(torch.dot(x[s:s + DOT_CHUNK].double(), y[s:s + DOT_CHUNK].double()))
                for s in range(0, x.numel(), DOT_CHUNK))
        out["all"] += d
        if a[k].ndim >= 2:
            out["matrices"] += d
    return out


class _Gram:
    """Pairwise dot products of N states, filled two states at a time; cosines follow from them."""

    def __init__(self, n: int) -> None:
        self.dot: list[list[dict[str, float]]] = [[{} for _ in range(n)] for _ in range(n)]

    @staticmethod
    def keys(state: State) -> list[str]:
        """Float tensors the checkpoint stores (tied aliases once)."""
        return [k for k in stored_names(state) if state[k].is_floating_point()]

    def add(self, i: int, j: int, a: State, b: State) -> None:
        self.dot[i][j] = self.dot[j][i] = _dots(a, b, self.keys(a))

    def cosines(self, matrices_only: bool = False) -> list[list[float]]:
        part = "matrices" if matrices_only and any(self.dot[i][i]["matrices"] for i in range(len(self.dot))) else "all"
        g = [[d[part] for d in row] for row in self.dot]
        return [[g[i][j] / max((g[i][i] * g[j][j]) ** 0.5, 1e-300) for j in range(len(g))] for i in range(len(g))]

    def task_cosines(self, base: list[dict[str, float]], base_self: dict[str, float]) -> list[list[float]]:
        """Cosines of θᵢ − β from <θᵢ,θⱼ>, <θᵢ,β> and <β,β> (float64 sums)."""
        n = len(self.dot)
        t = [[self.dot[i][j]["all"] - base[i]["all"] - base[j]["all"] + base_self["all"] for j in range(n)] for i in range(n)]
        return [[t[i][j] / max((t[i][i] * t[j][j]) ** 0.5, 1e-300) for j in range(n)] for i in range(n)]


def _explain(scorer: Scorer, barriers, threshold, greedy: GreedyResult, models, best: int,
             n: int) -> tuple[bool | None, str]:
    kept = ", ".join(str(i + 1) for i in sorted(greedy.kept))
    keeps = f"the greedy soup keeps {'only ' if len(greedy.kept) < n else ''}{kept}"
    undefined = [pair for pair, b in barriers.items() if not all(math.isfinite(v) for v in b.values())]
    undefined += [label for label, row in models.items() if not math.isfinite(row["val"]["loss"])]
    if undefined:
        return None, (f"undefined: the val loss is not finite for {', '.join(undefined)} "
                      "(pairs i-j: on the path between them), so there is no verdict")
    high = {pair: max(b.values()) for pair, b in barriers.items() if max(b.values()) > threshold}
    if high:
        conflicts: dict[str, set[str]] = {}
        for pair in high:
            i, j = pair.split("-")
            conflicts.setdefault(i, set()).add(j)
            conflicts.setdefault(j, set()).add(i)
        loners = [i for i, others in conflicts.items() if len(others) == n - 1]
        if len(loners) == 1 and all(others == {loners[0]} for i, others in conflicts.items() if i != loners[0]):
            worst = max(v for pair, v in high.items() if loners[0] in pair.split("-"))
            return False, (f"not soupable: ingredient {loners[0]} sits in a different basin from the others "
                           f"(barriers up to {worst:.2f}); {keeps}")
        pair, worst = max(high.items(), key=lambda kv: kv[1])
        i, j = pair.split("-")
        return False, f"not soupable: ingredients {i} and {j} sit in different basins (barrier {worst:.2f}); {keeps}"
    uni, top = models["uniform soup"], models[f"{best + 1}"]
    lowest = min(range(n), key=lambda i: models[f"{i + 1}"]["val"]["loss"])
    gap = uni["val"]["loss"] - models[f"{lowest + 1}"]["val"]["loss"]
    if gap > threshold:
        return False, (f"not soupable: the uniform soup's val loss is {gap:.2f} above the best ingredient's "
                       f"({lowest + 1}), more than the threshold {threshold}; {keeps}")
    best_val = models[f"{lowest + 1}"]["val"]["loss"]
    verb = (f"has val loss {uni['val']['loss']:.4f} against {best_val:.4f} for the best ingredient ({lowest + 1})"
            f" and test loss {uni['test']['loss']:.4f} against {top['test']['loss']:.4f}")
    if scorer.task.kind == "classification":
        verb += f", test accuracy {uni['test']['accuracy']:.4f} against {top['test']['accuracy']:.4f}"
    return True, f"soupable: the uniform soup {verb}; {keeps}"

