"""`soupable`: should these checkpoints be averaged, and which? A verdict with its evidence.

Evidence: pairwise loss barriers on the held-out split (midpoint: L(θ(½)) − ½(L_A+L_B); with
`points`, the max over an α grid), weight cosines (a shared-initialisation check), task-vector
cosines against `base`, and uniform soup vs greedy soup vs the best single model on val and test.
Soupable iff every barrier is at most `threshold`, the uniform soup's val loss is at most the best
ingredient's plus `threshold` (one basin, and averaging costs nothing on held-out data), and the
checkpoints share an initialisation (weight cosine ≥ 0.5, with the base when given). The states are held in memory (N models): this is an analysis tool.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmctk.basin.barrier import barriers
from lmctk.basin.path import alpha_grid, evaluate_path
from lmctk.errors import ConfigError
from lmctk.io import assert_same_shapes, load_state
from lmctk.loading import resolve_task
from lmctk.metrics import distances
from lmctk.soup.core import GreedyResult, greedy_soup, uniform_soup
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
) -> Verdict:
    """Judge whether the checkpoints at `paths` should be souped on `task` (default: the runs' task)."""
    if len(paths) < 2:
        raise ConfigError(f"checkpoints: soupable needs at least 2, got {len(paths)}")
    if threshold < 0:
        raise ConfigError(f"--threshold: {threshold} is negative; give a loss barrier such as 0.05")
    if points is not None and points < 3:
        raise ConfigError(f"--points: {points} is too few; give at least 3 (the grid includes 0 and 1)")
    task = resolve_task(task, task_options, paths)
    scorer = Scorer.for_checkpoint(paths[0], task, metric)
    names = [str(p) for p in paths]
    states = [load_state(p, dtype=torch.float32) for p in paths]
    for i, state in enumerate(states[1:], start=2):
        assert_same_shapes(states[0], state, names[0], names[i - 1])
    own = [{s: scorer.metrics(state, s) for s in ("val", "test")} for state in states]
    barriers = {}
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            barriers[f"{i + 1}-{j + 1}"] = _barrier(scorer, states[i], states[j], own[i]["val"]["loss"], own[j]["val"]["loss"], points)
    weight_cos = _cosines(states, matrices_only=True)
    task_cos, notes = None, []
    if base is not None:
        base_state = load_state(base, dtype=torch.float32)
        assert_same_shapes(states[0], base_state, names[0], str(base))
        task_cos = _cosines([{k: s[k] - base_state[k] for k in _floats(s)} for s in states])
        base_cos = _cosines([base_state, *states], matrices_only=True)[0][1:]
        shared = all(c >= SHARED_INIT_COSINE for c in base_cos)
        notes.append("weight cosine with the base: " + ", ".join(f"{i + 1}: {c:.3f}" for i, c in enumerate(base_cos)))
    else:
        shared = all(weight_cos[i][j] >= SHARED_INIT_COSINE for i in range(len(states)) for j in range(i + 1, len(states)))
        notes.append("no --base: task-vector cosines need the common base checkpoint")
    uniform = uniform_soup(states)
    greedy = greedy_soup(states, scorer.score, names=names, scores=[scorer.value(m["val"]) for m in own],
                         tolerance=tolerance, metric=f"val {scorer.metric}")
    models = {f"{i + 1}": own[i] for i in range(len(states))}
    models["uniform soup"] = {s: scorer.metrics(uniform, s) for s in ("val", "test")}
    assert greedy.state is not None
    models["greedy soup"] = {s: scorer.metrics(greedy.state, s) for s in ("val", "test")}
    best = max(range(len(states)), key=lambda i: (scorer.value(own[i]["val"]), -i))
    soup_ok, explanation = _explain(scorer, barriers, threshold, greedy, models, best, len(states))
    if soup_ok and not shared:
        n = len(states)
        i, j = min(((i, j) for i in range(n) for j in range(i + 1, n)), key=lambda p: weight_cos[p[0]][p[1]])
        soup_ok, explanation = False, (
            f"not soupable: ingredients {i + 1} and {j + 1} do not share an initialisation (weight cosine "
            f"{weight_cos[i][j]:.2f} < {SHARED_INIT_COSINE}); align them first (lmctk soup --align-to REF) "
            "or soup fine-tunes of one base")
    return Verdict(soup_ok, explanation, names, scorer.metric, threshold, barriers, weight_cos, task_cos, shared,
                   models, greedy, notes)


def _floats(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


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


def _cosines(states: Sequence[State], matrices_only: bool = False) -> list[list[float]]:
    """Pairwise cosine similarity of the flattened float tensors (or only those with 2+ dims), per pair.

    The shared-init check uses matrices only: norm gains (all ones at init) and biases would make
    two independent inits look alike.
    """
    keys = _floats(states[0])
    if matrices_only and any(states[0][k].ndim >= 2 for k in keys):
        keys = [k for k in keys if states[0][k].ndim >= 2]
    n = len(states)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            out[i][j] = out[j][i] = distances(states[i], states[j], keys)["cosine"]
    return out


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

