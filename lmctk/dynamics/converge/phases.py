"""Phases of training from metric curves over checkpoint steps: pure functions on numbers.

`detect_phases` segments an expected-KL curve into the four phases of Fehlauer et al. (initial
uniform, sharp convergence, sharp divergence, slow reconvergence) by a continuous piecewise-linear
fit in log10(step + 1) with slope-sign constraints, choosing which phases are present by BIC.
`seed_regimes` labels each seed chaotic / transition / stable from its fingerprint curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Sequence

import torch

from lmctk.errors import ConfigError

PHASES = ("initial uniform", "sharp convergence", "sharp divergence", "slow reconvergence")
# sign of d(KL)/d(log step) each phase must have; 0 = flat (|slope| at most FLAT_RATIO of the next phase's)
SLOPE_SIGNS = (0, -1, 1, -1)
FLAT_RATIO = 0.5
MIN_CHANGE_SIGMAS = 2.0  # a signed phase must change the curve by at least this many residual SDs
REGIMES = ("chaotic", "transition", "stable")


@dataclass
class Boundary:
    """Where one phase ends and the next begins, at a checkpoint step, with a confidence in [0, 1].

    The confidence is the profile-likelihood mass (Gaussian noise, σ² from the fit) of the boundary
    lying within one checkpoint of `step`.
    """

    before: str
    after: str
    step: int
    confidence: float


@dataclass
class PhaseFit:
    """The segmentation of one curve: phases found (in order), their boundaries, and fit quality."""

    steps: list[int]
    phases: list[dict[str, Any]]  # {"name", "start", "end", "slope"} (slope: value change per decade of steps)
    boundaries: list[Boundary]
    missing: list[str]  # phases not seen in this curve
    model_confidence: float  # BIC weight of the chosen set of phases among all feasible sets
    r2: float
    fitted: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phases": self.phases,
            "boundaries": [vars(b) for b in self.boundaries],
            "missing": self.missing,
            "model_confidence": self.model_confidence,
            "r2": self.r2,
            "fitted": self.fitted,
        }


def _fits(x: torch.Tensor, y: torch.Tensor, knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares continuous piecewise-linear fits, one per row of knot indices [M, m].

    Returns (sse [M], segment slopes [M, m+1], fitted values [M, n]).
    """
    n = x.shape[0]
    base = torch.stack([torch.ones_like(x), x], 1).expand(knots.shape[0], n, 2)
    hinges = (x[None, :, None] - x[knots][:, None, :]).clamp(min=0)  # [M, n, m]
    design = torch.cat([base, hinges], 2)
    coef = torch.linalg.lstsq(design, y.expand(knots.shape[0], n).unsqueeze(-1)).solution.squeeze(-1)
    fitted = (design @ coef.unsqueeze(-1)).squeeze(-1)
    sse = (fitted - y).square().sum(1)
    slopes = coef[:, 1:].cumsum(1)
    return sse, slopes, fitted


def _feasible(slopes: torch.Tensor, changes: torch.Tensor, sigma: torch.Tensor, signs: Sequence[int]) -> torch.Tensor:
    """Fits whose segments have the phases' slope signs; a signed phase must change the curve by at
    least MIN_CHANGE_SIGMAS residual SDs (else it is noise), a flat one be flatter than the next."""
    ok = torch.ones(slopes.shape[0], dtype=torch.bool)
    for s, sign in enumerate(signs):
        if sign:
            ok &= (slopes[:, s] * sign > 0) & (changes[:, s].abs() >= MIN_CHANGE_SIGMAS * sigma)
        elif s + 1 < len(signs):
            ok &= slopes[:, s].abs() <= FLAT_RATIO * slopes[:, s + 1].abs()
    return ok


def _knot_sets(n: int, m: int) -> torch.Tensor:
    """Every choice of m interior knot indices (1..n-2, increasing) as rows; one empty row for m = 0."""
    if m == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    return torch.tensor(list(combinations(range(1, n - 1), m)), dtype=torch.long).reshape(-1, m)


def detect_phases(steps: Sequence[int], values: Sequence[float]) -> PhaseFit:
    """Segment a KL-over-steps curve into the four convergence phases, or the ones it shows (any of
    them may be absent, the rest keep their order). Knots sit on checkpoint steps; each phase spans
    at least one interval. Among the feasible sets of phases, the lowest BIC wins.
    """
    if len(steps) != len(values):
        raise ConfigError(f"phases: {len(steps)} steps but {len(values)} values")
    order = sorted(range(len(steps)), key=lambda i: steps[i])
    steps = [int(steps[i]) for i in order]
    y = torch.tensor([float(values[i]) for i in order], dtype=torch.float64)
    if not bool(torch.isfinite(y).all()):
        raise ConfigError("phases: the curve has NaN/Inf values; check the metrics of every step")
    n = len(steps)
    x = torch.log10(torch.tensor(steps, dtype=torch.float64) + 1)
    if n < 3:
        return PhaseFit(steps, [], [], list(PHASES), math.nan, math.nan, y.tolist())
    sst = float((y - y.mean()).square().sum())
    candidates = []  # (bic, phase indices, knots [M, m], sse [M], slopes, fitted, feasible)
    for m in range(min(4, n - 1)):
        knots = _knot_sets(n, m)
        sse, slopes, fitted = _fits(x, y, knots)
        ends = torch.cat([torch.zeros(len(knots), 1, dtype=torch.long), knots,
                          torch.full((len(knots), 1), n - 1, dtype=torch.long)], 1)
        changes = slopes * (x[ends[:, 1:]] - x[ends[:, :-1]])
        sigma = (sse / max(n - (2 + m), 1)).sqrt()
        for chosen_phases in combinations(range(4), m + 1):
            ok = _feasible(slopes, changes, sigma, [SLOPE_SIGNS[i] for i in chosen_phases])
            if not bool(ok.any()):
                continue
            best = float(sse[ok].min())
            bic = n * math.log(max(best, 1e-300) / n) + (2 + m) * math.log(n)
            candidates.append((bic, chosen_phases, knots, sse, slopes, fitted, ok))
    if not candidates:  # no set of phases has slopes of the right signs
        return PhaseFit(steps, [], [], list(PHASES), math.nan, math.nan, y.tolist())
    bics = torch.tensor([c[0] for c in candidates], dtype=torch.float64)
    weights = torch.softmax(-(bics - bics.min()) / 2, 0)
    pick = int(bics.argmin())
    _, found, knots, sse, slopes, fitted, ok = candidates[pick]
    sse = torch.where(ok, sse, torch.full_like(sse, math.inf))
    best = int(sse.argmin())
    m = len(found) - 1
    sigma2 = max(float(sse[best]) / max(n - (2 + m), 1), 1e-12 * max(sst, 1e-30))
    chosen = knots[best].tolist()
    bounds = [0, *chosen, n - 1]
    phases = [
        {"name": PHASES[found[s]], "start": steps[bounds[s]], "end": steps[bounds[s + 1]],
         "slope": float(slopes[best, s])}
        for s in range(m + 1)
    ]
    boundaries = []
    for b, idx in enumerate(chosen):
        profile = torch.full((n,), math.inf, dtype=torch.float64)
        profile.scatter_reduce_(0, knots[:, b], sse, reduce="amin")
        like = torch.exp(-(profile - profile.min()) / (2 * sigma2))
        near = like[max(idx - 1, 0) : idx + 2].sum() / like.sum()
        boundaries.append(Boundary(PHASES[found[b]], PHASES[found[b + 1]], steps[idx], float(near)))
    missing = [name for i, name in enumerate(PHASES) if i not in found]
    r2 = 1 - float(sse[best]) / sst if sst > 0 else 1.0
    return PhaseFit(steps, phases, boundaries, missing, float(weights[pick]), r2, fitted[best].tolist())


@dataclass
class Regimes:
    """Per-seed regimes from fingerprint curves: labels per step and the steps where each seed
    crosses into transition and into stable; `spread` is max − min of those steps across seeds."""

    steps: list[int]
    levels: tuple[float, float]  # curve values marking chaotic→transition and transition→stable
    labels: list[list[str]]  # [seed][step]
    crossings: list[dict[str, float | None]]  # per seed {"transition": step, "stable": step}
    spread: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "labels": self.labels, "crossings": self.crossings,
                "spread": self.spread}


def _crossing(steps: list[int], curve: list[float], level: float, direction: float) -> float | None:
    """First step from which `curve` stays at or beyond `level` (in `direction`), interpolated."""
    beyond = [(v - level) * direction >= 0 for v in curve]
    if not beyond[-1]:
        return None
    t = len(curve) - 1
    while t > 0 and beyond[t - 1]:
        t -= 1
    if t == 0:
        return float(steps[0])
    v0, v1 = curve[t - 1], curve[t]
    frac = (level - v0) / (v1 - v0) if v1 != v0 else 1.0
    return float(steps[t - 1] + frac * (steps[t] - steps[t - 1]))


def seed_regimes(
    steps: Sequence[int], curves: torch.Tensor, low: float = 0.2, high: float = 0.8, min_change: float = 0.05
) -> Regimes:
    """Label each seed's steps chaotic / transition / stable from its fingerprint curve [K, S].

    The levels are the fractions `low` and `high` of the way from the pooled curve's first value to
    its last; a seed enters a regime at the first step from which its curve stays past the level.
    A pooled change below `min_change` means no transition: every step is stable.
    """
    curves = curves.double()
    if curves.dim() != 2 or curves.shape[1] != len(steps):
        raise ConfigError(f"regimes: curves must be [seeds, {len(steps)} steps], got {tuple(curves.shape)}")
    steps = [int(s) for s in steps]
    pooled = curves.nanmean(0)
    start, end = float(pooled[0]), float(pooled[-1])
    change = end - start
    k = curves.shape[0]
    if abs(change) < min_change or not math.isfinite(change):
        cross = [{"transition": float(steps[0]), "stable": float(steps[0])} for _ in range(k)]
        return Regimes(steps, (start, end), [["stable"] * len(steps) for _ in range(k)], cross,
                       {"transition": 0.0, "stable": 0.0})
    direction = 1.0 if change > 0 else -1.0
    levels = (start + low * change, start + high * change)
    labels, crossings = [], []
    for curve in curves.tolist():
        t1 = _crossing(steps, curve, levels[0], direction)
        t2 = _crossing(steps, curve, levels[1], direction)
        if t1 is not None and t2 is not None:
            t1 = min(t1, t2)
        crossings.append({"transition": t1, "stable": t2})
        row = []
        for s in steps:
            if t2 is not None and s >= t2:
                row.append("stable")
            elif t1 is not None and s >= t1:
                row.append("transition")
            else:
                row.append("chaotic")
        labels.append(row)
    spread: dict[str, float | None] = {}
    for key in ("transition", "stable"):
        found = [c[key] for c in crossings]
        spread[key] = None if any(v is None for v in found) else max(found) - min(found)
    return Regimes(steps, levels, labels, crossings, spread)
