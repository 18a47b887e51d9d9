"""Seed regimes over training: each seed chaotic / transition / stable from its similarity curve.

A seed's curve is its similarity to the other seeds (a basis-free fingerprint by default); it enters
a regime at the first checkpoint from which the curve stays past that regime's level. Crossings are
interpolated in log10(step + 1), as checkpoints are log-spaced, and each comes with its resolution:
the spacing of the two checkpoints it lies between.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmctk.errors import ConfigError

KEYS = ("transition", "stable")


@dataclass
class Regimes:
    """Labels per seed and step, each seed's crossing steps into transition and stable, their spread
    across seeds (max − min, the phase-boundary synchronisation) and its resolution (the widest
    checkpoint spacing around any seed's crossing: the spread is known only to about that)."""

    steps: list[int]
    levels: tuple[float, float]  # curve values marking chaotic→transition and transition→stable
    labels: list[list[str]]  # [seed][step]
    crossings: list[dict[str, float | None]]  # per seed {"transition": step, "stable": step}
    spread: dict[str, float | None]
    resolution: dict[str, int | None]

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "labels": self.labels, "crossings": self.crossings,
                "spread": self.spread, "resolution": self.resolution,
                "crossings_are": "interpolated in log10(step + 1) between the checkpoints around them"}


def _crossing(steps: list[int], curve: list[float], level: float, direction: float) -> tuple[float, int] | None:
    """First step from which `curve` stays at or beyond `level` (in `direction`), interpolated in
    log10(step + 1), and the spacing of the checkpoints around it (0 when already past at the first)."""
    beyond = [(v - level) * direction >= 0 for v in curve]
    if not beyond[-1]:
        return None
    t = len(curve) - 1
    while t > 0 and beyond[t - 1]:
        t -= 1
    if t == 0:
        return float(steps[0]), 0
    v0, v1 = curve[t - 1], curve[t]
    frac = (level - v0) / (v1 - v0) if v1 != v0 else 1.0
    x0, x1 = math.log10(steps[t - 1] + 1), math.log10(steps[t] + 1)
    return 10 ** (x0 + frac * (x1 - x0)) - 1, steps[t] - steps[t - 1]


def _label(step: int, cross: dict[str, float | None]) -> str:
    if cross["stable"] is not None and step >= cross["stable"]:
        return "stable"
    if cross["transition"] is not None and step >= cross["transition"]:
        return "transition"
    return "chaotic"


def seed_regimes(
    steps: Sequence[int], curves: torch.Tensor, low: float = 0.2, high: float = 0.8, min_change: float = 0.05
) -> Regimes:
    """Label each seed's steps chaotic / transition / stable from its similarity curve [K, S].

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
                       dict.fromkeys(KEYS, 0.0), dict.fromkeys(KEYS, 0))
    direction = 1.0 if change > 0 else -1.0
    levels = (start + low * change, start + high * change)
    crossings, spacing = [], []
    for curve in curves.tolist():
        found = [_crossing(steps, curve, level, direction) for level in levels]
        cross = dict(zip(KEYS, (None if f is None else f[0] for f in found)))
        if cross["transition"] is not None and cross["stable"] is not None:
            cross["transition"] = min(cross["transition"], cross["stable"])
        crossings.append(cross)
        spacing.append([None if f is None else f[1] for f in found])
    spread: dict[str, float | None] = {}
    resolution: dict[str, int | None] = {}
    for i, key in enumerate(KEYS):
        found = [c[key] for c in crossings]
        missing = any(v is None for v in found)
        spread[key] = None if missing else max(found) - min(found)
        resolution[key] = None if missing else max(s[i] for s in spacing)
    labels = [[_label(s, c) for s in steps] for c in crossings]
    return Regimes(steps, levels, labels, crossings, spread, resolution)
