"""Soups of in-memory states: a running fp32 sum, uniform and weighted means, and the greedy soup.

The greedy soup (Wortsman et al. 2022) sorts ingredients by their held-out score, starts from the
best and adds the next only if the held-out score of the running average strictly improves (by
more than `-tolerance`). The running sum and count make each trial one division, never a reload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmctk.errors import ConfigError
from lmctk.io import assert_same_shapes
from lmctk.render.progress import stages

State = Mapping[str, torch.Tensor]
StateSource = State | Callable[[], State]  # a state, or a loader called when the state is needed


class RunningSum:
    """Σ w·θ in fp32 plus the total weight; `mean()` is the soup, `trial(θ)` the soup with θ added."""

    def __init__(self) -> None:
        self.sum: dict[str, torch.Tensor] = {}
        self.weight = 0.0
        self.count = 0
        self._dtypes: dict[str, torch.dtype] = {}
        self._exact: dict[str, torch.Tensor] = {}  # non-float tensors: copied, must agree

    def add(self, state: State, weight: float = 1.0) -> None:
        """Add `weight`·`state` to the sum (float tensors in fp32; integer buffers must be equal)."""
        if weight < 0:
            raise ConfigError(f"weight: {weight} is negative; soups are convex combinations")
        if self.count:
            _same_shapes(self.sum | self._exact, state, self.count + 1)
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                if name in self._exact and not torch.equal(self._exact[name], tensor):
                    raise ConfigError(f"{name}: non-float tensor differs between ingredients; they cannot be averaged")
                self._exact.setdefault(name, tensor.detach().clone())
                continue
            self._dtypes.setdefault(name, tensor.dtype)
            if name in self.sum:
                self.sum[name].add_(tensor.detach(), alpha=weight)
            else:
                self.sum[name] = tensor.detach().float() * weight
        self.weight += weight
        self.count += 1

    def mean(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The weighted mean, in `dtype` (default: each tensor's dtype in the first ingredient)."""
        if not self.count or self.weight <= 0:
            raise ConfigError("soup: no ingredient with positive weight was added")
        out = {name: (s / self.weight).to(dtype or self._dtypes[name]) for name, s in self.sum.items()}
        return {**out, **self._exact}

    def trial(self, state: State, weight: float = 1.0) -> dict[str, torch.Tensor]:
        """The fp32 mean the soup would have with `state` added, without adding it."""
        total = self.weight + weight
        out = {name: (s + state[name].float() * weight) / total for name, s in self.sum.items()}
        return {**out, **self._exact}


def _same_shapes(soup: State, state: State, index: int) -> None:
    assert_same_shapes(soup, state, "ingredient 1", f"ingredient {index}")


def weighted_soup(states: Sequence[StateSource], weights: Sequence[float], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Σ wᵢθᵢ / Σ wᵢ accumulated in fp32, one state at a time (loaders are called in turn)."""
    if len(states) != len(weights):
        raise ConfigError(f"weights: {len(weights)} given for {len(states)} ingredients; give one per ingredient")
    soup = RunningSum()
    for source, weight in zip(states, weights):
        soup.add(_load(source), float(weight))
    return soup.mean(dtype)


def uniform_soup(states: Sequence[StateSource], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The fp32 mean of the states (exactly (θ₁+…+θₙ)/n in fp32), cast to `dtype` or the inputs' dtype."""
    if not states:
        raise ConfigError("soup: needs at least one ingredient")
    return weighted_soup(states, [1.0] * len(states), dtype)


@dataclass
class GreedyStep:
    """One greedy trial: the candidate, its own held-out score, the soup's score with it, kept or not."""

    index: int  # position in the input list (0-based)
    name: str
    alone: float
    soup_score: float
    kept: bool


@dataclass
class GreedyResult:
    """The greedy soup: which ingredients it kept (input positions), its trace and its state."""

    kept: list[int]
    trace: list[GreedyStep]
    score: float
    metric: str
    tolerance: float
    state: dict[str, torch.Tensor] | None = None

    @property
    def lower_is_better(self) -> bool:
        """Scores are "higher is better" inside; a loss metric is shown (and serialised) as the loss."""
        return self.metric.endswith("loss")

    def shown(self, value: float) -> float:
        return -value if self.lower_is_better else value

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "score": self.shown(self.score),
            "metric": self.metric,
            "tolerance": self.tolerance,
            "trace": [{**vars(step), "alone": self.shown(step.alone), "soup_score": self.shown(step.soup_score)}
                      for step in self.trace],
        }

    def __rich__(self):
        from rich.table import Table

        from lmctk.render.text import short_path

        t = Table(title=f"greedy soup: kept {len(self.kept)} of {len(self.trace)} (held-out {self.metric})")
        for column in ("order", "ingredient", "alone", "soup with it", "kept"):
            t.add_column(column, justify="left" if column == "ingredient" else "right")
        for order, step in enumerate(self.trace, start=1):
            t.add_row(str(order), short_path(step.name), f"{self.shown(step.alone):.4f}", f"{self.shown(step.soup_score):.4f}",
                      "[green]yes[/]" if step.kept else "[red]no[/]")
        return t


def greedy_soup(
    states: Sequence[StateSource],
    score: Callable[[State], float],
    *,
    names: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
    tolerance: float = 0.0,
    metric: str = "score",
    keep_state: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> GreedyResult:
    """Wortsman et al.'s greedy soup: `score(state)` is a held-out score (higher is better, never test).

    A candidate is kept if the running average's score with it exceeds the current score minus
    `tolerance` (0: must strictly improve). `scores` are the ingredients' own scores if known.
    `progress(done, total)` is called after every evaluation of `score`.
    """
    if not states:
        raise ConfigError("greedy soup: needs at least one ingredient")
    if tolerance < 0:
        raise ConfigError(f"tolerance: {tolerance} is negative; use 0 (strict improvement) or more")
    names = list(names) if names is not None else [f"ingredient {i + 1}" for i in range(len(states))]
    stage = stages(progress, len(states) - 1 + (len(states) if scores is None else 0))
    alone = list(scores) if scores is not None else [_scored(score, _load(s), stage) for s in states]
    order = sorted(range(len(states)), key=lambda i: -alone[i])  # stable: ties keep input order
    soup = RunningSum()
    soup.add(_load(states[order[0]]))
    current = alone[order[0]]
    trace = [GreedyStep(order[0], names[order[0]], alone[order[0]], current, True)]
    for i in order[1:]:
        candidate = _load(states[i])
        trial = _scored(score, soup.trial(candidate), stage)
        kept = trial > current - tolerance
        if kept:
            soup.add(candidate)
            current = trial
        trace.append(GreedyStep(i, names[i], alone[i], trial, kept))
        del candidate
    kept_indices = [step.index for step in trace if step.kept]
    return GreedyResult(kept_indices, trace, current, metric, tolerance, soup.mean() if keep_state else None)


def _scored(score: Callable[[State], float], state: State, stage: Callable[[], None]) -> float:
    value = score(state)
    stage()
    return value


def _load(source: StateSource) -> State:
    return source() if callable(source) else source
