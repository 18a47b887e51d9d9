"""Permutation alignment: weight matching (Git Re-Basin) and activation matching.

Weight matching maximises Σ_tensors <A, π(B)> by coordinate descent over permutation groups: for a
group g, S_g[i, j] = Σ over the tensors g acts on of <A's slice i, B's slice j>, with B already
permuted by every other group; the best perm for g is a linear assignment on S_g. Groups that share
no tensor do not influence each other's S, so each sweep solves them together in one batched LAP
call. The sweep order is seeded; the loop stops after a sweep with no improvement.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmctk.basin import lap
from lmctk.errors import ConfigError
from lmctk.io import assert_same_shapes, state_device, state_shapes
from lmctk.spec.core import (
    Perms,
    PermutationSpec,
    group_slices,
    groups_in,
    identity_perms,
    is_identity,
    permute_state,
    permute_tensor,
)

State = Mapping[str, torch.Tensor]


@dataclass
class MatchResult:
    """Permutations that map B onto A, with the objective trace and where the time went."""

    perms: Perms
    method: str
    objective: list[float]  # Σ <A, π(B)> after each sweep (index 0: before any update)
    sweeps: int
    seconds: float
    lap_seconds: float = 0.0
    similarity_seconds: float = 0.0
    lap_backends: list[str] = field(default_factory=list)
    unpermuted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "objective": self.objective,
            "sweeps": self.sweeps,
            "seconds": self.seconds,
            "lap_seconds": self.lap_seconds,
            "similarity_seconds": self.similarity_seconds,
            "lap_backends": sorted(set(self.lap_backends)),
            "unpermuted": self.unpermuted,
            "groups": {g: len(p) for g, p in self.perms.items()},
            "moved": {g: int((p != torch.arange(len(p), device=p.device)).sum()) for g, p in self.perms.items()},
        }

    def __rich__(self):
        from rich.table import Table

        d = self.to_dict()
        t = Table(title=self.method.replace("_", " "),
                  caption=f"{self.sweeps} sweeps in {self.seconds:.2f} s (LAP {self.lap_seconds:.2f} s, "
                          f"similarity {self.similarity_seconds:.2f} s)")
        t.add_column("group")
        t.add_column("size", justify="right")
        t.add_column("moved", justify="right")
        for g, n in d["groups"].items():
            t.add_row(g, str(n), str(d["moved"][g]))
        return t


def _slices(spec: PermutationSpec, tensor: torch.Tensor, axes, axis: int, group: str, cache: dict) -> torch.Tensor:
    """The tensor with `group`'s elements as rows: [n_group, everything else]."""
    key = (axes[axis], group)
    if key not in cache:
        flat = group_slices(axes[axis], spec.groups, group).reshape(-1)
        cache[key] = None if is_identity(flat) else flat
    flat = cache[key]
    if flat is not None:  # gather along the original (contiguous) axis, then bring it to the front
        tensor = tensor.index_select(axis, flat.to(tensor.device))
    return tensor.movedim(axis, 0).reshape(spec.groups[group], -1)


def similarity(
    spec: PermutationSpec, a: State, b: State, perms: Perms, group: str,
    users: list[tuple[str, int]] | None = None,
) -> torch.Tensor:
    """S[i, j] = Σ <A slice i, π_{-g}(B) slice j> over the tensors `group` acts on (fp32).

    `users` is `spec.users()[group]`, passed by callers that compute the inverse map once.
    """
    users = spec.users()[group] if users is None else users
    others = {g: p for g, p in perms.items() if g != group}
    n = spec.groups[group]
    S = torch.zeros(n, n, dtype=torch.float32, device=state_device(a))
    slices: dict = {}
    indices: dict = {}
    for key, axis in users:
        axes = spec.axes[key]
        ta = a[key].to(torch.float32)
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, others, indices)
        S += _slices(spec, ta, axes, axis, group, slices) @ _slices(spec, tb, axes, axis, group, slices).T
    return S


def objective(spec: PermutationSpec, a: State, b: State, perms: Perms) -> float:
    """Σ over spec'd parameters (tied aliases once, buffers never) of <A, π(B)>."""
    total = 0.0
    indices: dict = {}
    for key, axes in spec.axes.items():
        if key in spec.buffers:
            continue
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, perms, indices)
        total += float((a[key].to(torch.float32) * tb).sum())
    return total


def independent_rounds(
    spec: PermutationSpec, order: list[str], neighbours: dict[str, set[str]] | None = None
) -> list[list[str]]:
    """Split a sweep order into rounds of groups that share no tensor (solved in one batch)."""
    nbrs = spec.neighbours() if neighbours is None else neighbours
    rounds: list[list[str]] = []
    for g in order:
        if rounds and not (nbrs[g] & set(rounds[-1])):
            rounds[-1].append(g)
        else:
            rounds.append([g])
    return rounds


def weight_matching(
    spec: PermutationSpec,
    a: State,
    b: State,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init: Perms | None = None,
    tol: float = 1e-12,
    lap_backend: str = "auto",
) -> MatchResult:
    """Permutations of B's groups that maximise Σ <A, π(B)> (Ainsworth et al. 2023, weight matching).

    Similarities accumulate in fp32 on the states' device (bf16/fp16 inputs are fine); LAPs run on
    the backend `lap.solve` picks. Each sweep never lowers the objective; the trace is returned.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter: must be at least 1, got {max_iter}")
    assert_same_shapes(a, b, "model A", "model B")
    spec.validate(state_shapes(a))
    start = time.perf_counter()
    device = state_device(a)
    perms = {g: p.to(device) for g, p in (init or identity_perms(spec)).items()}
    rng = random.Random(seed)
    users, neighbours = spec.users(), spec.neighbours()  # derived once, not per group and sweep
    trace = [objective(spec, a, b, perms)]
    lap_time = sim_time = 0.0
    backends: list[str] = []
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        order = sorted(spec.groups)
        rng.shuffle(order)
        for round_ in independent_rounds(spec, order, neighbours):
            t0 = time.perf_counter()
            S = {g: similarity(spec, a, b, perms, g, users[g]) for g in round_}
            sim_time += time.perf_counter() - t0
            by_size: dict[int, list[str]] = {}
            for g in round_:
                by_size.setdefault(spec.groups[g], []).append(g)
            for gs in by_size.values():
                t0 = time.perf_counter()
                stacked = torch.stack([S[g] for g in gs])
                new, info = lap.solve(stacked, maximize=True, backend=lap_backend, return_info=True)
                lap_time += time.perf_counter() - t0
                backends.append(info.backend)
                for g, p_new in zip(gs, new):
                    old_score = float(lap.objective(S[g], perms[g]))
                    if float(lap.objective(S[g], p_new)) > old_score + tol * max(1.0, abs(old_score)):
                        perms[g] = p_new.to(device)
        trace.append(objective(spec, a, b, perms))
        if trace[-1] <= trace[-2] + tol * max(1.0, abs(trace[-2])):
            break
    return MatchResult(
        perms={g: p.cpu() for g, p in perms.items()},
        method="weight_matching",
        objective=trace,
        sweeps=sweeps,
        seconds=time.perf_counter() - start,
        lap_seconds=lap_time,
        similarity_seconds=sim_time,
        lap_backends=backends,
        unpermuted=spec.unpermuted(a.keys()),
    )


def apply(spec: PermutationSpec, state: State, result: MatchResult | Perms) -> dict[str, torch.Tensor]:
    """B permuted into A's neuron order."""
    perms = result.perms if isinstance(result, MatchResult) else result
    return permute_state(state, spec, perms)


# -- activation matching -------------------------------------------------------------------------

_NORMS_ON_CHANNEL_DIM = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)


def activation_sites(model: torch.nn.Module, spec: PermutationSpec) -> dict[str, tuple[int, Any]]:
    """Modules whose output features carry permuted groups: name -> (output feature dim, layout).

    The layout is the one of the module's weight axis that indexes its outputs: axis 0 for
    Linear/Conv/norms, axis 1 for HF `Conv1D` (in, out) and for embeddings.
    """
    from transformers.pytorch_utils import Conv1D

    sites = {}
    for name, module in model.named_modules():
        axes = spec.layout_of(f"{name}.weight" if name else "weight")
        if axes is None:
            continue
        if isinstance(module, (Conv1D, torch.nn.Embedding)):
            weight_axis, out_dim = 1, -1
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, *_NORMS_ON_CHANNEL_DIM)):
            weight_axis, out_dim = 0, 1
        else:  # Linear, LayerNorm, RMSNorm and other per-feature modules
            weight_axis, out_dim = 0, -1
        if axes[weight_axis] is not None:
            sites[name] = (out_dim, axes[weight_axis])
    return sites


class _CrossCorrelation:
    """Running sums for the correlation between two models' features at one site (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, fa: torch.Tensor, fb: torch.Tensor) -> None:
        fa, fb = fa.double(), fb.double()
        parts = {"a": fa.sum(0), "b": fb.sum(0), "aa": (fa * fa).sum(0), "bb": (fb * fb).sum(0), "ab": fa.T @ fb}
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += fa.shape[0]

    def correlation(self) -> torch.Tensor:
        s, n = self.sums, self.n
        mean_a, mean_b = s["a"] / n, s["b"] / n
        std_a = (s["aa"] / n - mean_a**2).clamp_min(0).sqrt() + 1e-8
        std_b = (s["bb"] / n - mean_b**2).clamp_min(0).sqrt() + 1e-8
        cov = s["ab"] / n - mean_a[:, None] * mean_b[None, :]
        return cov / (std_a[:, None] * std_b[None, :])


def _features(output: Any, out_dim: int) -> torch.Tensor:
    out = output[0] if isinstance(output, tuple) else output
    return out.detach().movedim(out_dim, -1).reshape(-1, out.shape[out_dim])


def _pooled_similarity(
    spec: PermutationSpec, correlations: State, group: str, users: list[tuple[str, int]]
) -> torch.Tensor:
    """S[i, j] = Σ over all slot pairs (s, t) of C[(i, s), (j, t)], blind to how other groups order
    an element's slots (for one-slot groups it is the exact objective).

    Used to start the coordinate descent: a head's match is found before its within-head order is.
    """
    n = spec.groups[group]
    S = torch.zeros(n, n)
    for key, axis in users:
        idx = group_slices(spec.axes[key][axis], spec.groups, group)
        flat = idx.reshape(-1)
        block = correlations[key][flat][:, flat].reshape(n, idx.shape[1], n, idx.shape[1])
        S += block.sum((1, 3))
    return S


@torch.no_grad()
def activation_matching(
    model: torch.nn.Module,
    spec: PermutationSpec,
    a: State,
    b: State,
    task: Any,
    *,
    split: str = "train",
    max_batches: int = 8,
    batch_size: int | None = 256,
    seed: int = 0,
    lap_backend: str = "auto",
) -> MatchResult:
    """Permutations of B's groups that maximise the correlation of A's and B's activations.

    Activations are recorded (hooks) at every module whose outputs carry a group, on the task's
    fixed `split` batches (at most `max_batches`); the summed per-site correlations are then
    maximised over all groups jointly by the same coordinate descent as weight matching.
    """
    from torch.func import functional_call

    start = time.perf_counter()
    sites = activation_sites(model, spec)
    missing = sorted(set(spec.groups) - {g for _, layout in sites.values() for g in groups_in(layout)})
    if missing:
        raise ConfigError(f"activation matching: no activation site carries group(s) {', '.join(missing)}; "
                          "use weight matching for this architecture")
    device = state_device(a)
    stats = {name: _CrossCorrelation() for name in sites}
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, _features(out, sites[name][0])))
        for name in sites]
    was_training = model.training
    model.eval()
    try:
        for batch in task.eval_batches(split, device=device, batch_size=batch_size)[:max_batches]:
            functional_call(model, dict(a), args=(), kwargs=batch.inputs, tie_weights=False)
            feats_a = dict(captured)
            functional_call(model, dict(b), args=(), kwargs=batch.inputs, tie_weights=False)
            for name in sites:
                stats[name].update(feats_a[name], captured[name])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    correlations = {name: stats[name].correlation().float().cpu() for name in sites}
    sim_time = time.perf_counter() - start
    # Σ_sites Σ_p C[p, π(p)] is weight matching between identity matrices and the correlations:
    # one coordinate-descent mechanism, so groups sharing an axis (heads, within-head) are solved jointly.
    corr_spec = PermutationSpec(spec.groups, {name: (None, layout) for name, (_, layout) in sites.items()},
                                name=f"{spec.name} activations")
    identities = {name: torch.eye(c.shape[0]) for name, c in correlations.items()}
    users = corr_spec.users()
    init = {g: lap.solve(_pooled_similarity(corr_spec, correlations, g, users[g]), backend=lap_backend)
            for g in spec.groups}
    matched = weight_matching(corr_spec, identities, correlations, init=init, seed=seed, lap_backend=lap_backend)
    return MatchResult(
        perms=matched.perms,
        method="activation_matching",
        objective=matched.objective,
        sweeps=matched.sweeps,
        seconds=time.perf_counter() - start,
        lap_seconds=matched.lap_seconds,
        similarity_seconds=sim_time + matched.similarity_seconds,
        lap_backends=matched.lap_backends,
        unpermuted=spec.unpermuted(a.keys()),
    )


def save_aligned(
    spec: PermutationSpec,
    b: State,
    perms: MatchResult | Perms,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write π(B) as an HF model dir, one tensor at a time (B may be a LazyState or a view of one), with B's
    `config.json` and tokenizer files copied from `source_dir`. Tensors keep B's stored names; tied
    aliases B's checkpoint omits are omitted again (`io.keys.stored_names`)."""
    from lmctk.io import TensorSlot, stored_names, stream_hf_dir
    from lmctk.io.write import side_files

    perms = perms.perms if isinstance(perms, MatchResult) else perms
    shapes, names = state_shapes(b), stored_names(b)
    dtypes = b.dtypes if hasattr(b, "dtypes") else {k: b[k].dtype for k in names}
    slots = [TensorSlot(stored, tuple(shapes[key]), dtypes[key]) for key, stored in names.items()]
    key_of = {stored: key for key, stored in names.items()}
    files = {f.name: f.read_bytes() for f in side_files(Path(source_dir))} if source_dir else {}
    view = PermutedView(spec, b, perms)
    return stream_hf_dir(out_dir, slots, lambda name: view[key_of[name]].contiguous(), shard_size=shard_size,
                         files=files, overwrite=overwrite)


class PermutedView(Mapping):
    """π(B) computed tensor by tensor on access, so streaming code never materialises it whole."""

    def __init__(self, spec: PermutationSpec, state: State, perms: Perms) -> None:
        self.spec, self.state, self.perms = spec, state, perms

    def __getitem__(self, key: str) -> torch.Tensor:
        axes = self.spec.layout_of(key)
        value = self.state[key]
        return value if axes is None else permute_tensor(value, axes, self.spec.groups, self.perms)

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)
