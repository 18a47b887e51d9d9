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
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from lmctk.errors import ConfigError
from lmctk.io import assert_same_keys, assert_same_shapes
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


def module_keys(model: nn.Module, state: State, buffers: bool = True) -> list[str]:
    """State keys the module owns under that name, parameters and (with `buffers`) buffers: tied
    tensors once (drops aliases such as GPT-2's lm_head.weight)."""
    names = {n for n, _ in model.named_parameters()}
    if buffers:
        names |= {n for n, _ in model.named_buffers()}
    return [k for k in state if k in names]


def path_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def on_device(state: State, device: torch.device) -> dict[str, torch.Tensor]:
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
    device = path_device(model, device)
    a, b = on_device(a, device), on_device(b, device)
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
