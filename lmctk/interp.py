"""Interpolation between two states and evaluation along the line θ(α) = (1−α)θ_A + αθ_B.

`evaluate_path` is the hot path: the eval data goes to the device once; chunks of K interpolated
states are stacked and run per batch with `torch.func.vmap` over `functional_call` ("vmap"), or, when
K copies do not fit or θ(α) must be changed by a renormalisation, one working copy of the model is
lerped in place with `torch._foreach_*` ops ("inplace"). Modules are never rebuilt per α.
"naive" (load_state_dict per α, then `evaluate`) is the reference the other two are tested against.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from lmctk import renorm as rn
from lmctk.errors import ConfigError
from lmctk.io import assert_same_keys, assert_same_shapes
from lmctk.metrics import distances
from lmctk.tasks.base import Task, evaluate

State = Mapping[str, torch.Tensor]
METHODS = ("auto", "vmap", "inplace", "naive")
# Renormalisation hook: called with the working model holding θ(α) and α; may change the model in place.
Renorm = Callable[[nn.Module, float], None]


def lerp(a: State, b: State, alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = (1−α)·a + α·b for floating tensors (exact at α = 0 and 1); integer buffers come from `a`."""
    assert_same_keys(a, b, "state A", "state B")
    return {k: torch.lerp(v, b[k].to(v.dtype), float(alpha)) if v.is_floating_point() else v.clone()
            for k, v in a.items()}


def alpha_grid(points: int = 25) -> list[float]:
    """`points` evenly spaced α in [0, 1]; the grid always holds 0 and 1 exactly."""
    if points < 2:
        raise ConfigError(f"points={points}; give at least 2 interpolation points (the endpoints)")
    return [i / (points - 1) for i in range(points)]


def barriers(alphas: Sequence[float], values: Sequence[float]) -> dict[str, float]:
    """Both barrier definitions of a curve whose first and last points are the endpoints (α=0, α=1).

    mean_endpoint = max_α v(α) − ½(v_0 + v_1) (Frankle et al.);
    linear = max_α [v(α) − ((1−α)v_0 + αv_1)] (Entezari et al., Git Re-Basin).
    """
    if len(alphas) != len(values) or len(alphas) < 2 or alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ConfigError("barriers need a curve over an α grid from 0 to 1 with one value per α")
    v0, v1 = values[0], values[-1]
    return {
        "mean_endpoint": max(values) - 0.5 * (v0 + v1),
        "linear": max(v - ((1 - a) * v0 + a * v1) for a, v in zip(alphas, values)),
    }


def module_keys(model: nn.Module, state: State, buffers: bool = True) -> list[str]:
    """State keys the module owns under that name, parameters and (with `buffers`) buffers: tied
    tensors once (drops aliases such as GPT-2's lm_head.weight)."""
    names = {n for n, _ in model.named_parameters()}
    if buffers:
        names |= {n for n, _ in model.named_buffers()}
    return [k for k in state if k in names]


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _on(state: State, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in state.items()}


def state_bytes(state: State) -> int:
    """Bytes of the floating tensors of a state (what one interpolated copy costs)."""
    return sum(v.numel() * v.element_size() for v in state.values() if v.is_floating_point())


CPU_CACHE_BYTES = 8 << 20  # stacked activations per op beyond this fall out of cache: CPU chunks stay below


def activation_bytes(model: nn.Module, state: State, batch, probe: int = 8) -> tuple[int, int]:
    """(largest, total) bytes of module outputs for one θ on `batch`, measured on its first `probe`
    examples and scaled to the whole batch: what one more stacked copy costs per op and in all."""
    sizes: list[int] = []

    def hook(_module, _inputs, output):
        out = getattr(output, "logits", output[0] if isinstance(output, tuple) else output)
        if torch.is_tensor(out):
            sizes.append(out.numel() * out.element_size())

    small = batch.select(slice(0, probe))
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            functional_call(model, {k: state[k] for k in module_keys(model, state)}, args=(), kwargs=small.inputs)
    finally:
        for h in handles:
            h.remove()
    scale = len(batch) / max(len(small), 1)
    return int(max(sizes, default=0) * scale), int(sum(sizes) * scale)


def auto_chunk(model: nn.Module, state: State, batch, points: int, device: torch.device,
               memory: int | None = None) -> int:
    """How many interpolated copies to stack per vmap call, at most `points`.

    Memory: K·(one copy of the floating state + its activations) <= `memory` (default 1 GiB on CPU,
    a quarter of the free GPU memory). On CPU also K·(largest activation) <= 8 MiB: the sweep is
    compute-bound there, and larger stacks fall out of cache and run slower than smaller ones.
    """
    if memory is None:
        memory = 1 << 30
        if device.type == "cuda":
            memory = torch.cuda.mem_get_info(device)[0] // 4
    largest, total = activation_bytes(model, state, batch)
    copy_bytes = state_bytes({k: state[k] for k in module_keys(model, state)})  # what `_eval_vmap` stacks
    chunk = memory // max(copy_bytes + total, 1)
    if device.type == "cpu":
        chunk = min(chunk, CPU_CACHE_BYTES // max(largest, 1))
    return int(max(1, min(points, chunk)))


def _sum_scores(totals: dict[str, torch.Tensor] | None, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    scores = {k: v.double() for k, v in scores.items()}
    return scores if totals is None else {k: totals[k] + scores[k] for k in totals}


def _per_alpha(totals: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    loss, correct, count = (totals[k].tolist() for k in ("loss_sum", "correct", "count"))
    return [{"loss": l / n, "accuracy": c / n} for l, c, n in zip(loss, correct, count)]


def _eval_vmap(model, a, b, alphas, task, split, device, batch_size, chunk) -> list[dict[str, float]]:
    keys = module_keys(model, a)
    batched = [k for k in keys if a[k].is_floating_point()]
    shared = {k: a[k] for k in keys if not a[k].is_floating_point()}
    stack_a = {k: a[k].unsqueeze(0) for k in batched}
    stack_b = {k: b[k].unsqueeze(0) for k in batched}
    batches = task.eval_batches(split, device, batch_size)

    def run(params: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        output = functional_call(model, {**params, **shared}, args=(), kwargs=batch.inputs)
        return task.score(task.logits(output), batch)

    out: list[dict[str, float]] = []
    for start in range(0, len(alphas), chunk):
        w = torch.tensor(alphas[start:start + chunk], device=device)
        params = {k: torch.lerp(stack_a[k], stack_b[k], w.to(stack_a[k].dtype).view(-1, *[1] * a[k].dim()))
                  for k in batched}
        totals = None
        for batch in batches:
            totals = _sum_scores(totals, vmap(run, in_dims=(0, None))(params, batch))
        out.extend(_per_alpha(totals))
    return out


def _working_copy(model: nn.Module, a: State, device: torch.device) -> nn.Module:
    """One copy of `model` on `device` for a whole path, holding A's integer buffers (as θ(α) does)."""
    work = copy.deepcopy(model).to(device)
    live = work.state_dict()  # detached aliases of the copy's parameters and buffers
    with torch.no_grad():
        for k in module_keys(work, a):
            if not a[k].is_floating_point():
                live[k].copy_(a[k])
    return work


def _eval_inplace(work, a, b, alphas, task, split, device, batch_size, renorm) -> list[dict[str, float]]:
    """θ(α) lerped into the working copy `work` (see `_working_copy`) with `_foreach` ops, one α at a time."""
    live = work.state_dict()
    keys = [k for k in module_keys(work, a) if a[k].is_floating_point()]
    dst, src_a, src_b = [live[k] for k in keys], [a[k] for k in keys], [b[k] for k in keys]
    out = []
    with torch.no_grad():
        for alpha in alphas:
            torch._foreach_copy_(dst, src_a)
            torch._foreach_lerp_(dst, src_b, float(alpha))
            if renorm is not None:
                renorm(work, alpha)
            out.append(_metrics_from(evaluate(work, task, split, device, batch_size)))
    return out


def _eval_naive(model, a, b, alphas, task, split, device, batch_size) -> list[dict[str, float]]:
    work = _working_copy(model, a, device)
    out = []
    for alpha in alphas:
        work.load_state_dict(lerp(a, b, alpha))
        out.append(_metrics_from(evaluate(work, task, split, device, batch_size)))
    return out


def _metrics_from(m: dict[str, float]) -> dict[str, float]:
    return {"loss": m["loss"], "accuracy": m["accuracy"]}


AUTOTUNE_MIN_REST = 4  # "auto" times both paths only when this many α remain to profit from the choice


def _timed(fn, device: torch.device):
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def _autotuned(model, a, b, alphas, task, split, device, batch_size, chunk) -> tuple[list, str, str]:
    """Evaluate the first chunk stacked and the next two α in place, timing both, then the rest with the
    faster path: stacking wins where per-α work is small (launch/Python overhead, GPUs) and loses on a
    CPU that a single θ already keeps busy. Every measured α is part of the result."""
    with torch.no_grad():
        first, t_vmap = _timed(lambda: _eval_vmap(model, a, b, alphas[:chunk], task, split, device, batch_size, chunk), device)
    work = _working_copy(model, a, device)  # built once, outside the timing, and reused if in place wins
    second, t_inplace = _timed(lambda: _eval_inplace(work, a, b, alphas[chunk:chunk + 2], task, split, device,
                                                     batch_size, None), device)
    per_vmap, per_inplace = t_vmap / chunk, t_inplace / 2
    rest = alphas[chunk + 2:]
    if per_vmap <= per_inplace:
        with torch.no_grad():
            tail, method = _eval_vmap(model, a, b, rest, task, split, device, batch_size, chunk), "vmap"
    else:
        tail, method = _eval_inplace(work, a, b, rest, task, split, device, batch_size, None), "inplace"
    note = (f"auto: stacked {per_vmap * 1e3:.1f} ms/α vs in place {per_inplace * 1e3:.1f} ms/α "
            f"on the first {chunk + 2} α; the other {len(rest)} with {method}")
    return first + second + tail, method, note


def evaluate_path(
    model: nn.Module,
    a: State,
    b: State,
    alphas: Sequence[float],
    task: Task,
    *,
    split: str = "test",
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    method: str = "auto",
    chunk: int | None = None,
    memory: int | None = None,
    renorm: Renorm | None = None,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Loss and accuracy of θ(α) for every α, plus how it was evaluated (method, chunk, note).

    "auto" uses the in-place path when a `renorm` must change each θ(α) (BN reset, REPAIR) or K = 1;
    otherwise it times a stacked chunk of K = `chunk` (default: `auto_chunk`) against two α in place
    and evaluates the remaining α with the faster path (see `_autotuned`).
    """
    if method not in METHODS:
        raise ConfigError(f"method: unknown {method!r}; choose one of {', '.join(METHODS)}")
    assert_same_keys(a, b, "model A", "model B")
    assert_same_shapes(a, b, "model A", "model B")
    device = _device(model, device)
    a, b = _on(a, device), _on(b, device)
    alphas = [float(x) for x in alphas]
    if renorm is not None and method not in ("auto", "inplace"):
        raise ConfigError(f"method={method!r} cannot renormalise each θ(α); use method='inplace' or 'auto'")
    note = ""
    was_training = model.training
    model.eval()  # before probing activations: train-mode BatchNorm would update running stats
    try:
        if method in ("auto", "vmap") and renorm is None and not chunk:
            probe = task.eval_batches(split, device, batch_size)[0]
            chunk = auto_chunk(model, a, probe, len(alphas), device, memory)
            if method == "auto" and len(alphas) >= 2 * (2 + AUTOTUNE_MIN_REST):
                chunk = min(chunk, (len(alphas) - 2) // 2)  # leave α for the path the timing picks
        if method == "auto":
            method = "vmap" if renorm is None and chunk > 1 else "inplace"
            if renorm is not None:
                note = "renormalisation changes each θ(α): evaluated with the in-place path"
            elif chunk == 1:
                note = "one interpolated copy per call fits the memory/cache budget: evaluated in place"
            elif len(alphas) >= chunk + 2 + AUTOTUNE_MIN_REST:
                metrics, method, note = _autotuned(model, a, b, alphas, task, split, device, batch_size, chunk)
                return metrics, {"method": method, "chunk": chunk if method == "vmap" else 1, "note": note}
        if method == "vmap":
            with torch.no_grad():
                metrics = _eval_vmap(model, a, b, alphas, task, split, device, batch_size, chunk)
        elif method == "inplace":
            chunk = 1
            metrics = _eval_inplace(_working_copy(model, a, device), a, b, alphas, task, split, device, batch_size,
                                    renorm)
        else:
            chunk = 1
            metrics = _eval_naive(model, a, b, alphas, task, split, device, batch_size)
    finally:
        model.train(was_training)
    return metrics, {"method": method, "chunk": chunk, "note": note}


# -- barrier sweeps --------------------------------------------------------------------------------

ALIGNS = ("weight", "activation")
DEFINITIONS = ("mean_endpoint", "linear")


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

    def verdict(self, threshold: float = 0.05, definition: str = "mean_endpoint") -> tuple[bool, str]:
        """(connected, one line): the loss barrier against `threshold`."""
        value = self.loss_barrier(definition)
        path = "aligned" if self.aligned else "raw"
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
    from lmctk.align import activation_matching, apply, weight_matching
    from lmctk.spec import spec_for

    if how not in ALIGNS:
        raise ConfigError(f"align: unknown {how!r}; choose one of {', '.join(ALIGNS)} (or None)")
    spec = spec or spec_for(model)
    if how == "weight":
        match = weight_matching(spec, a, b, seed=seed)
    else:
        match = activation_matching(model, spec, a, b, task, seed=seed)
    return apply(spec, b, match), match


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
) -> BarrierResult:
    """Loss and error of θ(α) between `a` and `b` on `split`, before and (with `align`) after permuting
    B onto A; both barrier definitions, distances and timings. `renorm` ("bn_reset" or "repair")
    renormalises every θ(α) (endpoints included) on `calib_batches` fixed training batches.
    `model` supplies the architecture only; its weights are not used or changed.
    """
    start = time.perf_counter()
    if renorm not in rn.RENORMS:
        raise ConfigError(f"renorm: unknown {renorm!r}; choose one of {', '.join(rn.RENORMS)}")
    if align is not None and align not in ALIGNS:
        raise ConfigError(f"align: unknown {align!r}; choose one of {', '.join(ALIGNS)} (or None)")
    device = _device(model, device)
    assert_same_keys(a, b, names[0], names[1])
    assert_same_shapes(a, b, names[0], names[1])
    a, b = _on(a, device), _on(b, device)
    alphas = alpha_grid(points)
    calib = {"batches": calib_batches, "batch_size": calib_batch_size, "seed": calib_seed}
    keys = module_keys(model, a, buffers=False)
    timings: dict[str, float] = {}
    eval_kw = dict(split=split, device=device, batch_size=batch_size, method=method, chunk=chunk, memory=memory)

    def sweep(b_state: State, stats_a: dict | None = None, **evaluation: Any) -> tuple[Curve, dict, Renorm | None]:
        fix = _renorm_for(renorm, model, a, b_state, task, batches, stats_a)
        metrics, info = evaluate_path(model, a, b_state, alphas, task, renorm=fix, **{**eval_kw, **evaluation})
        if renorm == "repair":
            info["repair_layers"] = list(fix.layers)
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


def barrier_matrix(model: nn.Module, states: Mapping[str, State], task: Task, **kwargs: Any) -> BarrierMatrix:
    """`barrier_sweep` for every unordered pair of `states` (name -> state); kwargs go to each sweep."""
    if len(states) < 2:
        raise ConfigError(f"barrier_matrix needs at least 2 models, got {len(states)}")
    device = _device(model, kwargs.get("device"))
    states = {n: _on(s, device) for n, s in states.items()}  # once, not again for every pair
    names = list(states)
    pairs = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            pairs[(x, y)] = barrier_sweep(model, states[x], states[y], task, names=(x, y), **kwargs)
    return BarrierMatrix(names, pairs)
