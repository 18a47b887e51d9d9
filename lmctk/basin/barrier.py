"""Barriers along interpolation paths: sweeps between two models (raw and aligned), both barrier
definitions for loss and error, distances, and pairwise barrier matrices.

Mean-endpoint (Frankle et al.): B = max_α L(θα) − ½(L_A + L_B). Linear baseline (Entezari et al.,
Git Re-Basin): B_lin = max_α [L(θα) − ((1−α)L_A + αL_B)].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmctk.basin import renorm as rn
from lmctk.basin.activation import activation_matching
from lmctk.basin.align import apply, weight_matching
from lmctk.basin.path import (
    Renorm,
    State,
    alpha_grid,
    evaluate_path,
    module_keys,
    on_device,
    path_device,
)
from lmctk.errors import ConfigError
from lmctk.io import assert_same_keys, assert_same_shapes, state_shapes
from lmctk.metrics import distances
from lmctk.render.progress import stages
from lmctk.spec import spec_for
from lmctk.tasks.base import Task

ALIGNS = ("weight", "activation")
DEFINITIONS = ("mean_endpoint", "linear")


def barriers(alphas: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Both barrier definitions of a curve whose first and last points are the endpoints (α=0, α=1).

    mean_endpoint = max_α v(α) − ½(v_0 + v_1) (Frankle et al.);
    linear = max_α [v(α) − ((1−α)v_0 + αv_1)] (Entezari et al., Git Re-Basin).
    Both are NaN (undefined) when any value on the curve is NaN or ±Inf.
    """
    if len(alphas) != len(values) or len(alphas) < 2 or alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ConfigError("barriers need a curve over an α grid from 0 to 1 with one value per α")
    if nonfinite_alpha(alphas, values) is not None:
        return {"mean_endpoint": math.nan, "linear": math.nan}
    v0, v1 = values[0], values[-1]
    return {
        "mean_endpoint": max(values) - 0.5 * (v0 + v1),
        "linear": max(v - ((1 - a) * v0 + a * v1) for a, v in zip(alphas, values)),
    }


def nonfinite_alpha(alphas: Sequence[float], values: Sequence[float]) -> float | None:
    """The first α whose value is NaN or ±Inf, else None."""
    return next((a for a, v in zip(alphas, values) if not math.isfinite(v)), None)


@dataclass
class Curve:
    """Loss and accuracy along the α grid of one path (raw or aligned)."""

    loss: list[float]
    accuracy: list[float]

    @property
    def error(self) -> list[float]:
        return [1.0 - acc for acc in self.accuracy]

    def barriers(self, alphas: Sequence[float]) -> dict[str, dict[str, float]]:
        """{"loss": {"mean_endpoint", "linear"}, "error": {...}}."""
        return {"loss": barriers(alphas, self.loss), "error": barriers(alphas, self.error)}

    def midpoint(self, alphas: Sequence[float]) -> dict[str, float]:
        """Loss and accuracy at the α closest to ½."""
        i = min(range(len(alphas)), key=lambda j: abs(alphas[j] - 0.5))
        return {"alpha": alphas[i], "loss": self.loss[i], "accuracy": self.accuracy[i]}

    def to_dict(self, alphas: Sequence[float]) -> dict[str, Any]:
        return {"loss": self.loss, "accuracy": self.accuracy, "error": self.error,
                "barriers": self.barriers(alphas), "midpoint": self.midpoint(alphas)}


@dataclass
class BarrierResult:
    """One interpolation sweep between A and B: raw curve, aligned curve (if aligned), barriers,
    distances, timings and how it was evaluated. `to_dict()` is the JSON form; it renders as tables."""

    alphas: list[float]
    raw: Curve
    aligned: Curve | None
    distance: dict[str, dict[str, float]]  # "raw" / "aligned" -> {"l2", "cosine"}
    timings: dict[str, float]
    settings: dict[str, Any]
    names: tuple[str, str] = ("A", "B")

    @property
    def best(self) -> Curve:
        """The aligned curve when there is one, else the raw one (what a verdict judges)."""
        return self.aligned or self.raw

    def loss_barrier(self, definition: str = "mean_endpoint") -> float:
        """The loss barrier of the aligned path if aligned, else of the raw path."""
        if definition not in DEFINITIONS:
            raise ConfigError(f"definition: unknown {definition!r}; choose one of {', '.join(DEFINITIONS)}")
        return self.best.barriers(self.alphas)["loss"][definition]

    def verdict(self, threshold: float = 0.05, definition: str = "mean_endpoint") -> tuple[bool | None, str]:
        """(connected, one line): the loss barrier against `threshold`; None when the loss is not finite."""
        value = self.loss_barrier(definition)
        path = "aligned" if self.aligned else "raw"
        bad = nonfinite_alpha(self.alphas, self.best.loss)
        if bad is not None:
            return None, f"undefined: the {path} loss is not finite at α={bad:.3g}, so there is no barrier"
        what = f"{path} {definition.replace('_', '-')} loss barrier {value:.4g}"
        if value <= threshold:
            return True, f"linearly connected: {what} <= {threshold:g}"
        return False, f"not linearly connected: {what} > {threshold:g}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"models": {"a": self.names[0], "b": self.names[1]}, "alpha": self.alphas}
        out.update(self.raw.to_dict(self.alphas))
        out["aligned"] = self.aligned.to_dict(self.alphas) if self.aligned else None
        out["distance"] = self.distance
        out["timings_s"] = self.timings
        out["settings"] = self.settings
        return out

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        s = self.settings
        t = Table(title=f"{self.names[0]} → {self.names[1]}: {s['split']} split, align={s['align'] or 'none'}, "
                        f"renorm={s['renorm']}", caption=f"evaluated with {s['evaluation']['method']} "
                        f"(chunk {s['evaluation']['chunk']}) in {self.timings['total']:.2f} s")
        t.add_column("α", justify="right")
        t.add_column("loss", justify="right")
        t.add_column("accuracy", justify="right")
        if self.aligned:
            t.add_column("aligned loss", justify="right")
            t.add_column("aligned accuracy", justify="right")
        for i, alpha in enumerate(self.alphas):
            row = [f"{alpha:.3f}", f"{self.raw.loss[i]:.4f}", f"{self.raw.accuracy[i]:.4f}"]
            if self.aligned:
                row += [f"{self.aligned.loss[i]:.4f}", f"{self.aligned.accuracy[i]:.4f}"]
            t.add_row(*row)
        bt = Table(title="barriers", caption="B = max L(θα) − ½(L_A+L_B) (mean-endpoint); "
                                              "B_lin = max [L(θα) − ((1−α)L_A + αL_B)] (linear)")
        bt.add_column("path")
        for metric in ("loss", "error"):
            bt.add_column(f"{metric} B", justify="right")
            bt.add_column(f"{metric} B_lin", justify="right")
        bt.add_column("‖θA−θB‖₂", justify="right")
        bt.add_column("cosine", justify="right")
        for label, curve in (("raw", self.raw), ("aligned", self.aligned)):
            if curve is None:
                continue
            b = curve.barriers(self.alphas)
            d = self.distance[label]
            bt.add_row(label, *[f"{b[m][k]:.4f}" for m in ("loss", "error") for k in DEFINITIONS],
                       f"{d['l2']:.4g}", f"{d['cosine']:.4f}")
        return Group(t, bt)


def _renorm_for(kind: str, model: nn.Module, a: State, b: State, task: Task, batches: list | None,
                stats_a: dict | None = None) -> Renorm | None:
    """The renormalisation hook of one path; REPAIR measures its statistics here (A's unless given)."""
    if kind == "bn_reset":
        return lambda work, _alpha: rn.reset_batchnorm(work, batches, task)
    if kind == "repair":
        return rn.Repair(model, a, b, batches, task, stats_a)
    return None


def align_states(model: nn.Module, a: State, b: State, task: Task, how: str, *, spec=None, seed: int = 0):
    """B permuted onto A by weight or activation matching, with the MatchResult."""
    if how not in ALIGNS:
        raise ConfigError(f"align: unknown {how!r}; choose one of {', '.join(ALIGNS)} (or None)")
    spec = spec or spec_for(model)
    if how == "weight":
        match = weight_matching(spec, a, b, seed=seed)
    else:
        match = activation_matching(model, spec, a, b, task, seed=seed)
    return apply(spec, b, match), match


def _checked_inputs(model: nn.Module, a: State, b: State, renorm: str, align: str | None, spec,
                    names: tuple[str, str]):
    """Every input of a sweep checked before the first evaluation (the alignment's spec included, not
    only after the raw sweep); returns the spec alignment will use (None without `align`)."""
    if renorm not in rn.RENORMS:
        raise ConfigError(f"renorm: unknown {renorm!r}; choose one of {', '.join(rn.RENORMS)}")
    if align is not None and align not in ALIGNS:
        raise ConfigError(f"align: unknown {align!r}; choose one of {', '.join(ALIGNS)} (or None)")
    assert_same_keys(a, b, names[0], names[1])
    assert_same_shapes(a, b, names[0], names[1])
    if align is None:
        return spec
    spec = spec or spec_for(model)
    spec.validate(state_shapes(a))
    return spec


def barrier_sweep(
    model: nn.Module,
    a: State,
    b: State,
    task: Task,
    *,
    points: int = 25,
    align: str | None = None,
    renorm: str = "none",
    split: str = "test",
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    method: str = "auto",
    chunk: int | None = None,
    memory: int | None = None,
    calib_batches: int = 8,
    calib_batch_size: int = 128,
    calib_seed: int = 0,
    spec=None,
    match_seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
    progress: Callable[[int, int], None] | None = None,
) -> BarrierResult:
    """Loss and error of θ(α) between `a` and `b` on `split`, before and (with `align`) after permuting
    B onto A; both barrier definitions, distances and timings. `renorm` ("bn_reset" or "repair")
    renormalises every θ(α) (endpoints included) on `calib_batches` fixed training batches.
    `model` supplies the architecture only; its weights are not used or changed. `progress(done, total)`
    is called after each stage (raw sweep; alignment and aligned sweep).
    """
    start = time.perf_counter()
    spec = _checked_inputs(model, a, b, renorm, align, spec, names)
    device = path_device(model, device)
    a, b = on_device(a, device), on_device(b, device)
    alphas = alpha_grid(points)
    calib = {"batches": calib_batches, "batch_size": calib_batch_size, "seed": calib_seed}
    keys = module_keys(model, a, buffers=False)
    timings: dict[str, float] = {}
    eval_kw = dict(split=split, device=device, batch_size=batch_size, method=method, chunk=chunk, memory=memory)
    stage = stages(progress, 1 if align is None else 3)

    def sweep(b_state: State, stats_a: dict | None = None, **evaluation: Any) -> tuple[Curve, dict, Renorm | None]:
        fix = _renorm_for(renorm, model, a, b_state, task, batches, stats_a)
        metrics, info = evaluate_path(model, a, b_state, alphas, task, renorm=fix, **{**eval_kw, **evaluation})
        if renorm == "repair":
            info["repair_layers"] = list(fix.layers)
        stage()
        return Curve([m["loss"] for m in metrics], [m["accuracy"] for m in metrics]), info, fix

    t0 = time.perf_counter()
    batches = None  # drawn once, on the device, for both paths
    if renorm != "none":
        batches = rn.calibration_batches(task, calib_batches, calib_batch_size, calib_seed, device)
    raw, info, raw_fix = sweep(b)
    timings["raw_sweep"] = time.perf_counter() - t0
    distance = {"raw": distances(a, b, keys)}
    aligned = None
    settings: dict[str, Any] = {"points": points, "align": align, "renorm": renorm, "split": split,
                                "device": str(device), "evaluation": info, "parameters_in_distance": len(keys)}
    if renorm != "none":
        settings["calibration"] = {**calib, "source": "train"}
    if align is not None:
        t0 = time.perf_counter()
        b_aligned, match = align_states(model, a, b, task, align, spec=spec, seed=match_seed)
        timings["align"] = time.perf_counter() - t0
        stage()
        settings["matching"] = {"method": match.method, "sweeps": match.sweeps, "unpermuted": match.unpermuted}
        t0 = time.perf_counter()
        # same A and batches: REPAIR reuses A's statistics; the evaluation reuses the raw sweep's choice
        aligned, _, _ = sweep(b_aligned, raw_fix.stats_a if renorm == "repair" else None,
                              method=info["method"], chunk=info["chunk"])
        timings["aligned_sweep"] = time.perf_counter() - t0
        distance["aligned"] = distances(a, b_aligned, keys)
    timings["total"] = time.perf_counter() - start
    return BarrierResult(alphas, raw, aligned, distance, timings, settings, tuple(names))


@dataclass
class BarrierMatrix:
    """Sweeps between every pair of several models; renders as pairwise barrier matrices."""

    names: list[str]
    pairs: dict[tuple[str, str], BarrierResult]

    def matrix(self, path: str = "raw", metric: str = "loss", definition: str = "mean_endpoint") -> list[list[float | None]]:
        """[i][j] = barrier between names[i] and names[j] (symmetric, 0 on the diagonal; None if absent)."""
        out: list[list[float | None]] = [[0.0 if i == j else None for j in self.names] for i in self.names]
        for (x, y), r in self.pairs.items():
            curve = r.raw if path == "raw" else r.aligned
            if curve is None:
                continue
            value = curve.barriers(r.alphas)[metric][definition]
            i, j = self.names.index(x), self.names.index(y)
            out[i][j] = out[j][i] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        paths = ["raw"] + (["aligned"] if any(r.aligned for r in self.pairs.values()) else [])
        return {
            "models": self.names,
            "matrices": {p: {m: {d: self.matrix(p, m, d) for d in DEFINITIONS} for m in ("loss", "error")}
                         for p in paths},
            "pairs": [r.to_dict() for r in self.pairs.values()],
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        tables = []
        for path in ["raw"] + (["aligned"] if any(r.aligned for r in self.pairs.values()) else []):
            t = Table(title=f"{path} loss barrier (mean-endpoint)")
            t.add_column("")
            for n in self.names:
                t.add_column(n, justify="right")
            for n, row in zip(self.names, self.matrix(path)):
                t.add_row(n, *["—" if v is None else f"{v:.4f}" for v in row])
            tables.append(t)
        return Group(*tables)


def barrier_matrix(model: nn.Module, states: Mapping[str, State], task: Task, *,
                   progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> BarrierMatrix:
    """`barrier_sweep` for every unordered pair of `states` (name -> state); kwargs go to each sweep;
    `progress(done, total)` counts the sweeps' stages over all pairs."""
    if len(states) < 2:
        raise ConfigError(f"barrier_matrix needs at least 2 models, got {len(states)}")
    device = path_device(model, kwargs.get("device"))
    states = {n: on_device(s, device) for n, s in states.items()}  # once, not again for every pair
    names = list(states)
    todo = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    pairs = {}
    for k, (x, y) in enumerate(todo):
        report = (lambda done, total, k=k: progress(k * total + done, len(todo) * total)) if progress else None
        pairs[(x, y)] = barrier_sweep(model, states[x], states[y], task, names=(x, y), progress=report, **kwargs)
    return BarrierMatrix(names, pairs)
