"""Phase detection on synthetic curves: exact knot search, no invented phases, calibrated boundaries."""

import itertools
import math

import numpy as np
import pytest

from lmctk.dynamics.converge.phases import LEVEL, PHASES, best_knots, detect_phases
from lmctk.errors import ConfigError

PER_DECADE = sorted({0, *[round(10 ** (i / 8)) for i in range(33)]})  # 10^0 .. 10^4, 8 per decade
PYTHIA = [0, *[2**i for i in range(10)], *range(1000, 143001, 1000)]  # 154 checkpoints


def _grid(n: int) -> list[int]:
    """n distinct log-spaced checkpoint steps from 0."""
    return [0, *np.unique(np.geomspace(1, 10**4, n - 1).round().astype(int) + np.arange(n - 1)).tolist()]


def _curve(steps: list[int], knots: list[int], values: list[float]) -> np.ndarray:
    """Continuous piecewise-linear in log10(step + 1) through `values` at the ends and knot indices."""
    x = np.log10(np.array(steps) + 1.0)
    nodes = [0, *knots, len(steps) - 1]
    return np.interp(x, x[nodes], values)


def _brute_force(x: np.ndarray, y: np.ndarray, m: int) -> tuple[float, tuple[int, ...]]:
    """Least SSE over every set of m interior knots, each by least squares on a hinge basis."""
    best = (math.inf, ())
    for knots in itertools.combinations(range(1, len(x) - 1), m):
        design = np.column_stack([np.ones_like(x), x, *[np.clip(x - x[k], 0, None) for k in knots]])
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        sse = float(np.square(design @ coef - y).sum())
        if sse < best[0] * (1 - 1e-9) - 1e-12:  # the first of equal optima, as the search reports
            best = (sse, knots)
    return best


def test_knot_search_finds_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for _ in range(25):
        n = int(rng.integers(5, 15))
        x = np.sort(rng.random(n)) * 4
        y = rng.normal(size=n) + rng.normal() * np.abs(x - 2) + rng.normal() * np.clip(x - 3, 0, None)
        for m, (sse, knots) in enumerate(best_knots(x, y)):
            ref_sse, ref_knots = _brute_force(x, y, m)
            assert sse == pytest.approx(ref_sse, rel=1e-8, abs=1e-10)
            assert knots == ref_knots


@pytest.mark.parametrize("noise,least_exact", [(0.01, 50), (0.02, 44)])
def test_four_phases_recovered_with_exact_breakpoints_at_low_noise(noise, least_exact):
    truth = [8, 16, 24]  # knots at steps 10, 100, 1000; noise SD as a share of the curve's range
    base = _curve(PER_DECADE, truth, [1.0, 1.0, 0.2, 1.7, 1.4])
    rng = np.random.default_rng(1)
    exact = 0
    for _ in range(50):
        fit = detect_phases(PER_DECADE, base + noise * np.ptp(base) * rng.normal(size=len(base)))
        assert fit.verdict == "phases" and [p["name"] for p in fit.phases] == list(PHASES) and fit.missing == []
        exact += [b.step for b in fit.boundaries] == [PER_DECADE[k] for k in truth]
        assert all(b.low <= PER_DECADE[k] <= b.high for b, k in zip(fit.boundaries, truth))
    assert exact >= least_exact


def test_pythia_schedule_four_phases():
    base = _curve(PYTHIA, [4, 8, 11], [1.0, 1.0, 0.2, 1.7, 1.5])  # knots at steps 8, 128, 1000
    fit = detect_phases(PYTHIA, base + 0.03 * np.random.default_rng(2).normal(size=len(PYTHIA)))
    assert [p["name"] for p in fit.phases] == list(PHASES)
    assert [b.step for b in fit.boundaries] == [8, 128, 1000]


@pytest.mark.parametrize("steps", [_grid(40), PYTHIA], ids=["40 steps", "154 steps"])
def test_pure_noise_has_no_phase_structure(steps):
    rng = np.random.default_rng(3)
    verdicts = [detect_phases(steps, rng.normal(size=len(steps))).verdict for _ in range(100)]
    assert verdicts.count("no phase structure") >= 95


@pytest.mark.parametrize("slope,name", [(0.5, "rising"), (-0.5, "falling")])
def test_single_lines_are_named_by_direction_not_split(slope, name):
    rng = np.random.default_rng(4)
    x = np.log10(np.array(PER_DECADE) + 1.0)
    for _ in range(20):
        fit = detect_phases(PER_DECADE, 1 + slope * x + 0.05 * rng.normal(size=len(x)))
        assert fit.verdict == "no phase structure" and fit.boundaries == []
        assert [p["name"] for p in fit.phases] == [name] and fit.missing == list(PHASES)
        assert fit.phases[0]["slope"] == pytest.approx(slope, abs=0.1)


def test_exact_line_and_constant_are_one_segment():
    x = np.log10(np.array(PER_DECADE) + 1.0)
    assert [p["name"] for p in detect_phases(PER_DECADE, 2 - 0.3 * x).phases] == ["falling"]
    flat = detect_phases(PER_DECADE, [0.7] * len(PER_DECADE))
    assert flat.verdict == "no phase structure" and [p["name"] for p in flat.phases] == ["flat"]


def test_fall_then_rise_is_convergence_then_divergence():
    base = _curve(PER_DECADE, [16], [1.0, 0.1, 0.8])  # falls 90%, then rises
    fit = detect_phases(PER_DECADE, base + 0.01 * np.random.default_rng(5).normal(size=len(base)))
    assert [p["name"] for p in fit.phases] == ["sharp convergence", "sharp divergence"]
    assert fit.boundaries[0].step == PER_DECADE[16]


def test_boundary_intervals_are_calibrated():
    steps = _grid(40)
    cases = [([15], [1.0, 1.0, 2.0], 0.15), ([10, 20, 30], [1.0, 1.0, 0.2, 1.7, 1.5], 0.12)]
    rng = np.random.default_rng(6)
    covered = total = 0
    for knots, values, sd in cases:
        base = _curve(steps, knots, values)
        for _ in range(150):
            fit = detect_phases(steps, base + sd * rng.normal(size=len(base)))
            if len(fit.boundaries) != len(knots):
                continue
            for b, k in zip(fit.boundaries, knots):
                assert b.confidence >= LEVEL and b.low <= b.step <= b.high
                covered += b.low <= steps[k] <= b.high
                total += 1
    assert total > 400
    assert 0.93 <= covered / total <= 0.99, covered / total


@pytest.mark.parametrize("where", [0, 10, -1])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_anywhere_makes_the_fit_undefined(where, bad):
    y = _curve(PER_DECADE, [8, 16, 24], [1.0, 1.0, 0.2, 1.7, 1.4]).tolist()
    y[where] = bad
    fit = detect_phases(PER_DECADE, y)
    assert fit.verdict == "undefined" and fit.phases == [] and fit.boundaries == []
    assert math.isnan(fit.model_confidence) and math.isnan(fit.r2) and all(math.isnan(v) for v in fit.fitted)


def test_bad_input_raises_one_line_errors():
    with pytest.raises(ConfigError, match="twice"):
        detect_phases([0, 1, 1, 2], [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="values"):
        detect_phases([0, 1, 2], [0.0, 1.0])
    with pytest.raises(ConfigError, match="increasing"):
        best_knots([0.0, 2.0, 1.0, 3.0, 4.0], [0.0] * 5)


def test_segments_out_of_phase_order_are_other_structure():
    base = _curve(PER_DECADE, [10, 22], [0.2, 1.5, 0.4, 1.6])  # rises, falls, rises: no phase order
    fit = detect_phases(PER_DECADE, base + 0.02 * np.random.default_rng(7).normal(size=len(base)))
    assert fit.verdict == "other structure" and fit.missing == list(PHASES)
    assert [p["name"] for p in fit.phases] == ["rising", "falling", "rising"]
    assert [(b.before, b.after, b.step) for b in fit.boundaries] == [
        ("rising", "falling", PER_DECADE[10]), ("falling", "rising", PER_DECADE[22])]
    assert fit.to_dict()["verdict"] == "other structure" and {"low", "high"} <= set(fit.to_dict()["boundaries"][0])
