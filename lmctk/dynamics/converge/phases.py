"""Phases of training from metric curves over checkpoint steps: pure functions on numbers.

`detect_phases` fits an expected-KL curve with continuous piecewise-linear functions of
log10(step + 1) with 0–3 knots on checkpoint steps (`best_knots`: the exact least-squares optimum
for every number of knots), picks the number of knots by BIC with knot positions counted as
parameters, and only then names the segments after the four phases of Fehlauer et al. (initial
uniform, sharp convergence, sharp divergence, slow reconvergence). Names never steer the fit, so a
curve without phases is reported as such instead of being bent into them.
Seed regimes (chaotic / transition / stable) are in `lmctk.dynamics.converge.regimes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmctk.errors import ConfigError

PHASES = ("initial uniform", "sharp convergence", "sharp divergence", "slow reconvergence")
SLOPE_SIGNS = (0, -1, 1, -1)  # sign of d(KL)/d(log step) in each phase; 0 = flat
TRENDS = {0: "flat", -1: "falling", 1: "rising"}  # names of segments that are not phases
VERDICTS = ("phases", "no phase structure", "other structure", "undefined")
MAX_KNOTS = 3
KNOT_PARAMS = 3  # BIC parameters per knot: slope change, position, and one for the search over positions
MIN_CHANGE_SIGMAS = 2.0  # a segment moving the fit by less than this many noise SDs is flat
FLAT_FRACTION = 0.1  # the first segment is also flat if it moves the fit by at most this share of its range
LEVEL = 0.95  # posterior mass of each boundary's interval
DECISIVE = 10.0  # BIC lead a fit with segments out of the phases' order needs to be reported
_NEGLIGIBLE = 50.0  # log-likelihood below the best beyond which a knot set adds nothing to a posterior

Quadratic = tuple[np.ndarray, np.ndarray, np.ndarray]  # (a, b, c): a v² − 2 b v + c, elementwise


@dataclass
class Boundary:
    """Where one phase ends and the next begins: the best-fit checkpoint `step`, and the checkpoint
    steps [low, high] holding `confidence` (≥ LEVEL) of the knot's posterior (Gaussian noise with σ²
    from the fit, flat prior over knot sets, the other knots summed out)."""

    before: str
    after: str
    step: int
    low: int
    high: int
    confidence: float


@dataclass
class PhaseFit:
    """The segmentation of one curve: a verdict (VERDICTS), its segments in order, their boundaries.

    With verdict "phases" the segments are named from PHASES; with "no phase structure" (one line
    wins) or "other structure" (segments out of the phases' order) they are named rising / falling /
    flat; "undefined" (NaN/Inf values, fewer than 3 steps) has none.
    """

    steps: list[int]
    verdict: str
    phases: list[dict[str, Any]]  # {"name", "start", "end", "slope"} (slope: value change per decade of steps)
    boundaries: list[Boundary]
    missing: list[str]  # phases not seen in this curve
    model_confidence: float  # BIC weight of the chosen number of segments among 1..MAX_KNOTS + 1
    r2: float
    noise: float  # residual SD of the fit
    fitted: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "phases": self.phases,
            "boundaries": [vars(b) for b in self.boundaries],
            "missing": self.missing,
            "model_confidence": self.model_confidence,
            "r2": self.r2,
            "noise": self.noise,
            "fitted": self.fitted,
        }


# -- exact knot search ---------------------------------------------------------------------------
# A continuous piecewise-linear fit is fixed by its values v at the end points and knots; the
# squared error of one segment is a quadratic in the values at its two ends, with coefficients from
# prefix sums. Eliminating values along the chain (min over v of a quadratic plus a quadratic) gives
# every knot set's SSE in O(1) from messages over knot pairs, so m ≤ 3 knots cost O(n³) flops and
# O(n²) memory (against C(n, m) least-squares solves).


def _segment(prefix: np.ndarray, x: np.ndarray, a: Any, start: Any, b: Any) -> tuple[np.ndarray, ...]:
    """Coefficients (A, B, C, D, E, F) of Σ (y − p(1−w) − q w)², w = (x − x_a)/(x_b − x_a), over the
    points start..b: A p² + 2B pq + C q² − 2D p − 2E q + F."""
    s0, s1, s2, sy, sxy, syy = (row[b + 1] - row[start] for row in prefix)
    xa = x[a]
    d = x[b] - xa
    sw = (s1 - s0 * xa) / d
    sww = (s2 - 2 * xa * s1 + s0 * xa * xa) / (d * d)
    syw = (sxy - xa * sy) / d
    return s0 - 2 * sw + sww, sw - sww, sww, sy - syw, syw, syy


def _push(msg: Quadratic, seg: tuple[np.ndarray, ...]) -> Quadratic:
    """Minimise a segment's error plus the message on its left value p over p: a message on q."""
    A, B, C, D, E, F = seg
    s, t = msg[0] + A, msg[1] + D
    return C - B * B / s, E - B * t / s, msg[2] + F - t * t / s


def _flip(seg: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The same segment with its ends swapped, to eliminate from the right."""
    A, B, C, D, E, F = seg
    return C, B, A, E, D, F


def _join(left: Quadratic, right: Quadratic) -> np.ndarray:
    """Minimum over the shared value of the sum of two messages: the SSE of the whole chain."""
    a, b = left[0] + right[0], left[1] + right[1]
    return np.maximum(left[2] + right[2] - b * b / a, 0.0)


class _Chain:
    """Messages of one curve (x scaled to [0, 1], y standardised) from which every knot set's SSE follows."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        n = self.n = len(x)
        prefix = np.zeros((6, n + 1))
        prefix[:, 1:] = np.cumsum(np.stack([np.ones(n), x, x * x, y, x * y, y * y]), 1)
        zero = (np.zeros(()), np.zeros(()), np.zeros(()))
        i = np.arange(n)
        a, b = i[:, None], i[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            self.sse0 = float(_join(_push(zero, _segment(prefix, x, 0, 0, n - 1)), zero))
            first = _push(zero, _segment(prefix, x, 0, 0, i))  # on v_k after the segment [0, k]
            last = _push(zero, _flip(_segment(prefix, x, i, i + 1, n - 1)))  # on v_k before the segment (k, n−1]
            inner = _segment(prefix, x, a, a + 1, b)  # segments (a, b]
            self.left = _push(tuple(m[:, None] for m in first), inner)  # [k1, k2]: on v_k2, knot k1
            self.right = _push(tuple(m[None, :] for m in last), _flip(inner))  # [k2, k3]: on v_k2, knot k3
            valid = (a >= 1) & (a < b) & (b <= n - 2)
            self.sse1 = np.where((i >= 1) & (i <= n - 2), _join(first, last), np.inf)
            self.sse2 = np.where(valid, _join(self.left, tuple(m[None, :] for m in last)), np.inf)

    def slices(self, middles: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """SSE of 3-knot sets, one middle knot k2 at a time: (k2, [k1 in 1..k2−1, k3 in k2+1..n−2])."""
        n = self.n
        for k2 in middles if middles is not None else range(2, n - 2):
            left = tuple(m[1:k2, k2, None] for m in self.left)
            right = tuple(m[None, k2, k2 + 1 : n - 1] for m in self.right)
            with np.errstate(divide="ignore", invalid="ignore"):
                yield k2, _join(left, right)

    def best(self, m: int) -> tuple[float, tuple[int, ...]]:
        """Least SSE with m knots and the knot indices that reach it (the first in index order on ties)."""
        if m == 0:
            return self.sse0, ()
        if m == 1:
            k = int(np.argmin(self.sse1))
            return float(self.sse1[k]), (k,)
        if m == 2:
            k1, k2 = np.unravel_index(int(np.argmin(self.sse2)), self.sse2.shape)
            return float(self.sse2[k1, k2]), (int(k1), int(k2))
        best, knots = math.inf, ()
        self.slice_min = np.full(self.n, np.inf)
        for k2, sse in self.slices():
            j = int(np.argmin(sse))
            self.slice_min[k2] = sse.flat[j]
            if sse.flat[j] < best:
                best, knots = float(sse.flat[j]), (1 + j // sse.shape[1], k2, k2 + 1 + j % sse.shape[1])
        return best, knots

    def posteriors(self, m: int, best: float, sigma2: float) -> list[np.ndarray]:
        """Each knot's posterior over point indices: Σ exp(−(SSE − best)/2σ²) over the other knots,
        normalised (m = 3 after `best(3)`, whose per-slice minima skip negligible slices)."""
        def like(sse: np.ndarray) -> np.ndarray:
            return np.exp(-(sse - best) / (2 * sigma2))

        if m == 1:
            out = [like(self.sse1)]
        elif m == 2:
            w = like(self.sse2)
            out = [w.sum(1), w.sum(0)]
        else:
            out = [np.zeros(self.n) for _ in range(3)]
            near = np.flatnonzero((self.slice_min - best) / (2 * sigma2) < _NEGLIGIBLE)
            for k2, sse in self.slices(near.tolist()):
                w = like(sse)
                out[0][1:k2] += w.sum(1)
                out[1][k2] = w.sum()
                out[2][k2 + 1 : self.n - 1] += w.sum(0)
        return [p / p.sum() for p in out]


def best_knots(x: Sequence[float], y: Sequence[float], max_knots: int = MAX_KNOTS) -> list[tuple[float, tuple[int, ...]]]:
    """Exact least-squares continuous piecewise-linear fits of y over increasing x with m = 0..max_knots
    knots on interior points (indices 1..n−2, increasing): per m, (SSE, knot indices)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not 0 <= max_knots <= MAX_KNOTS:
        raise ConfigError(f"phases: max_knots must be in 0..{MAX_KNOTS}, got {max_knots}")
    if len(xs) != len(ys) or len(xs) < max_knots + 2 or not bool(np.all(np.diff(xs) > 0)):
        raise ConfigError(f"phases: need ≥ {max_knots + 2} strictly increasing x with one y each")
    chain, scale = _scaled_chain(xs, ys)
    return [(sse * scale, knots) for sse, knots in (chain.best(m) for m in range(max_knots + 1))]


def _scaled_chain(x: np.ndarray, y: np.ndarray) -> tuple[_Chain, float]:
    """The chain of x mapped to [0, 1] and y standardised (for accuracy), and the factor back to SSE in y units."""
    sd = float(y.std()) or 1.0
    return _Chain((x - x[0]) / (x[-1] - x[0]), (y - y.mean()) / sd), sd * sd


# -- naming the segments -------------------------------------------------------------------------


def _signs(changes: np.ndarray, noise: float) -> list[int]:
    """Each segment's direction; flat if it moves the fit by under MIN_CHANGE_SIGMAS noise SDs (or,
    for the first, by at most FLAT_FRACTION of the fit's range: the initial plateau)."""
    span = float(np.ptp(np.cumsum(np.concatenate([[0.0], changes]))))
    out = []
    for s, c in enumerate(changes):
        flat = abs(c) < MIN_CHANGE_SIGMAS * noise or (s == 0 and len(changes) > 1 and abs(c) <= FLAT_FRACTION * span)
        out.append(0 if flat else int(np.sign(c)))
    return out


def _phase_order(signs: list[int]) -> list[int] | None:
    """Indices into PHASES for segments with these directions (earliest phase that fits each), or
    None when they are not in the phases' order."""
    out, j = [], 0
    for s in signs:
        while j < len(PHASES) and SLOPE_SIGNS[j] != s:
            j += 1
        if j == len(PHASES):
            return None
        out.append(j)
        j += 1
    return out


def _interval(post: np.ndarray, idx: int) -> tuple[int, int, float]:
    """Smallest run of indices around `idx`, grown toward the likelier side, holding ≥ LEVEL of `post`."""
    lo = hi = idx
    mass = float(post[idx])
    while mass < LEVEL - 1e-12 and (lo > 0 or hi < len(post) - 1):
        left = post[lo - 1] if lo > 0 else -1.0
        right = post[hi + 1] if hi < len(post) - 1 else -1.0
        if left >= right:
            lo -= 1
            mass += float(left)
        else:
            hi += 1
            mass += float(right)
    return lo, hi, min(mass, 1.0)


def _shape(x: np.ndarray, y: np.ndarray, knots: tuple[int, ...]) -> dict[str, Any]:
    """The least-squares fit with these knots: node values, fitted curve, residual SD, segment
    directions and, if they read in the phases' order, the phases they are."""
    n, m = len(x), len(knots)
    nodes = [0, *knots, n - 1]
    basis = np.stack([np.interp(x, x[nodes], row) for row in np.eye(len(nodes))], 1)
    v = np.linalg.lstsq(basis, y, rcond=None)[0]
    fitted = basis @ v
    resid = float(np.square(y - fitted).sum())
    noise = math.sqrt(resid / (n - (2 + 2 * m)))
    signs = _signs(np.diff(v), noise)
    return {"nodes": nodes, "v": v, "fitted": fitted, "resid": resid, "noise": noise, "signs": signs,
            "found": _phase_order(signs) if m else None}


def _sorted_curve(steps: Sequence[int], values: Sequence[float]) -> tuple[list[int], np.ndarray]:
    """The curve ordered by step, after checking it has one value per distinct, non-negative step."""
    if len(steps) != len(values):
        raise ConfigError(f"phases: {len(steps)} steps but {len(values)} values")
    order = sorted(range(len(steps)), key=lambda i: steps[i])
    ordered = [int(steps[i]) for i in order]
    if ordered and ordered[0] < 0:
        raise ConfigError(f"phases: step {ordered[0]} is negative; give checkpoint steps from 0")
    if len(set(ordered)) < len(ordered):
        raise ConfigError("phases: a step appears twice; give one value per checkpoint step")
    return ordered, np.array([float(values[i]) for i in order], dtype=np.float64)


def detect_phases(steps: Sequence[int], values: Sequence[float]) -> PhaseFit:
    """Segment a KL-over-steps curve into the convergence phases it shows, or say it shows none.

    The number of knots (0–3, on checkpoint steps) is chosen by BIC with 2 + KNOT_PARAMS·m
    parameters, ties going to fewer, among fits whose segments read in the phases' order; a fit out of that order
    wins only if BIC favours it by more than DECISIVE ("other structure").
    """
    steps, y = _sorted_curve(steps, values)
    n = len(steps)
    if n < 3 or not bool(np.isfinite(y).all()):
        return PhaseFit(steps, "undefined", [], [], list(PHASES), math.nan, math.nan, math.nan, [math.nan] * n)
    x = np.log10(np.array(steps, dtype=np.float64) + 1)
    chain, scale = _scaled_chain(x, y)
    sst = float(np.square(y - y.mean()).sum())
    floor = 1e-12 * max(sst, 1e-300)
    fits = [chain.best(m) for m in range(MAX_KNOTS + 1) if n - (2 + 2 * m) >= 1]
    bics = np.array([n * math.log(max(sse * scale, floor) / n) + (2 + KNOT_PARAMS * m) * math.log(n)
                     for m, (sse, _) in enumerate(fits)])
    shapes = [_shape(x, y, knots) for _, knots in fits]
    m = min((k for k in range(len(fits)) if k == 0 or shapes[k]["found"] is not None), key=lambda k: (bics[k], k))
    if bics[m] - bics.min() > DECISIVE:
        m = int(np.argmin(bics))
    weights = np.exp(-(bics - bics.min()) / 2)
    (sse, knots), shape = fits[m], shapes[m]
    found, nodes, v = shape["found"], shape["nodes"], shape["v"]
    verdict = "no phase structure" if m == 0 else "phases" if found is not None else "other structure"
    names = [PHASES[i] for i in found] if found is not None else [TRENDS[s] for s in shape["signs"]]
    slopes = np.diff(v) / np.diff(x[nodes])
    phases = [{"name": names[s], "start": steps[nodes[s]], "end": steps[nodes[s + 1]], "slope": float(slopes[s])}
              for s in range(m + 1)]
    boundaries = []
    if m:
        posts = chain.posteriors(m, sse, max(sse, floor / scale) / (n - (2 + 2 * m)))
        for b, (idx, post) in enumerate(zip(knots, posts)):
            lo, hi, mass = _interval(post, idx)
            boundaries.append(Boundary(names[b], names[b + 1], steps[idx], steps[lo], steps[hi], mass))
    missing = [p for i, p in enumerate(PHASES) if found is None or i not in found]
    r2 = 1 - shape["resid"] / sst if sst > 0 else 1.0
    return PhaseFit(steps, verdict, phases, boundaries, missing, float(weights[m] / weights.sum()), r2,
                    shape["noise"], shape["fitted"].tolist())
