"""Terminal line charts drawn with characters (rich `Text`), one marker and colour per series."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich.text import Text

from lmctk.errors import ConfigError

MARKERS = ("●", "○", "▲", "△", "■", "□")
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1 = xs[i - 1], xs[i]
            t = 0.0 if x1 == x0 else min(max((x - x0) / (x1 - x0), 0.0), 1.0)
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[0]


def terminal_curve(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    width: int = 60,
    height: int = 12,
    title: str | None = None,
    xlabel: str = "",
) -> Text:
    """A line chart of one or more series over shared xs, drawn with characters (one marker per series)."""
    if not series or len(xs) < 2:
        raise ConfigError("terminal_curve needs at least one series and two x values")
    finite = [y for ys in series.values() for y in ys if math.isfinite(y)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    grid = [[(" ", None)] * width for _ in range(height)]
    x0, x1 = xs[0], xs[-1]
    for s, (label, ys) in enumerate(series.items()):
        mark, colour = MARKERS[s % len(MARKERS)], COLOURS[s % len(COLOURS)]
        for col in range(width):
            y = _interp(xs, ys, x0 + (x1 - x0) * col / (width - 1))
            if math.isfinite(y):
                row = round((hi - y) / (hi - lo) * (height - 1))
                grid[row][col] = (mark, colour)
    label_w = max(len(f"{hi:.4g}"), len(f"{lo:.4g}"))
    out = Text()
    if title:
        out.append(title + "\n", style="bold")
    for r, cells in enumerate(grid):
        tick = f"{hi:.4g}" if r == 0 else f"{lo:.4g}" if r == height - 1 else ""
        out.append(f"{tick:>{label_w}} ┤")
        for mark, colour in cells:
            out.append(mark, style=colour)
        out.append("\n")
    out.append(" " * label_w + " └" + "─" * width + "\n")
    left, right = f"{x0:g}", f"{x1:g}"
    out.append(" " * (label_w + 2) + left + xlabel.center(width - len(left) - len(right)) + right + "\n")
    for s, label in enumerate(series):
        out.append(f"  {MARKERS[s % len(MARKERS)]} {label}", style=COLOURS[s % len(COLOURS)])
    return out
