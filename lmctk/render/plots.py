"""PNG plots (matplotlib, the `plot` extra): labelled line panels and heatmaps, written atomically.

Rendering never computes: these take finished numbers.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from lmctk.errors import ConfigError, OutputExistsError
from lmctk.io import atomic_write_bytes


def line_plot(
    path: str | Path,
    xs: Sequence[float],
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    xlabel: str = "",
    title: str | None = None,
    overwrite: bool = False,
    xscale: str = "linear",
    spans: Sequence[tuple[float, float, str]] = (),
    bands: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    fits: Sequence[str] = (),
) -> Path:
    """A PNG with one subplot per panel (panel name = y label), each holding labelled lines over xs.

    `xscale` is a matplotlib scale ("linear", "log", "symlog"); `spans` shades labelled x ranges
    (e.g. phases) on every panel; `bands` fills (low, high) around the series of the same label; series
    named in `fits` are model fits, drawn as dashed lines without markers.
    Refuses to replace an existing file unless `overwrite`; needs matplotlib (the `plot` extra).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        for i, (x0, x1, label) in enumerate(spans):
            ax.axvspan(x0, x1, color=f"C{(i + 4) % 10}", alpha=0.12, label=label, lw=0)
        for label, ys in series.items():
            style = {"linestyle": "--", "linewidth": 1.5} if label in fits else {"marker": "o", "markersize": 3}
            line, = ax.plot(xs, ys, label=label, **style)
            if bands and label in bands:
                ax.fill_between(xs, bands[label][0], bands[label][1], color=line.get_color(), alpha=0.25, lw=0)
        ax.set_xscale(xscale)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def heatmap_plot(
    path: str | Path,
    xs: Sequence[float],
    panels: Mapping[str, tuple[Sequence[str], Sequence[Sequence[float]]]],
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
    overwrite: bool = False,
    overlays: Mapping[str, tuple[str, Sequence[float], Sequence[float]]] | None = None,
) -> Path:
    """A PNG with one heatmap per panel: `panels[name] = (row labels, rows of values over xs)`.

    Columns are the xs in order (labelled by value, so uneven steps stay readable); one colour scale
    shared by all panels, so equal colours mean equal values. `overlays[name] = (label, columns, rows)`
    draws a line over that panel in cell coordinates (fractional column and row indices).
    Refuses to replace an existing file unless `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 0.35 * len(xs) + 2) * len(panels) / 1.5, 3.8),
                             squeeze=False, layout="constrained")
    ticks = list(range(len(xs)))
    every = max(1, len(xs) // 10)
    finite = [v for _, values in panels.values() for row in values for v in row if v == v and abs(v) != float("inf")]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for ax, (name, (rows, values)) in zip(axes[0], panels.items()):
        image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          vmin=vmin, vmax=vmax)
        if overlays and name in overlays:
            label, cols, at = overlays[name]
            ax.plot(cols, at, color="white", linewidth=2, label=label)
            ax.legend(loc="upper right", fontsize="small")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(ticks[::every], [f"{x:g}" for x in xs][::every], rotation=45)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
    fig.colorbar(image, ax=list(axes[0]))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib; pip install 'lmctk[plot]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
