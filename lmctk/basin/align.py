"""Permutation alignment by weight matching (Git Re-Basin); activation matching reuses its descent.

Weight matching maximises Σ_tensors <A, π(B)> by coordinate descent over permutation groups: for a
group g, S_g[i, j] = Σ over the tensors g acts on of <A's slice i, B's slice j>, with B already
permuted by every other group; the best perm for g is a linear assignment on S_g. Groups that share
no tensor do not influence each other's S, so each sweep solves them together in one batched LAP
call. The sweep order is seeded; the loop stops after a sweep with no improvement.
A group with per-block groups (heads and their within-head orders) is updated by one joint step:
every (A head, B head) pair's within-head assignments are solved in one batched LAP, and their optima
are the costs of one outer LAP over heads, so head order and within-head order are found together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from lmctk.basin import lap
from lmctk.basin.budget import (
    MemoryPlan,
    accumulate,
    plan_memory,
    thread_count,
    threads,
)
from lmctk.basin.heads import gathered, head_step
from lmctk.basin.match import MatchResult
from lmctk.errors import ConfigError
from lmctk.io import assert_same_shapes, is_lazy, state_device, state_shapes
from lmctk.metrics import dot
from lmctk.spec.core import (
    Perms,
    PermutationSpec,
    gather_index,
    groups_in,
    identity_perms,
    shared_within,
)
from lmctk.spec.permute import permute_state, permute_tensor, permuted_slabs

State = Mapping[str, torch.Tensor]


def _slices(spec: PermutationSpec, tensor: torch.Tensor, axes, axis: int, group: str, cache: dict) -> torch.Tensor:
    """`group`'s elements of the tensor as a [before, n_group, after] view ([…, n_block * n_group, …] per block)."""
    key = (axes[axis], group)
    if key not in cache:
        cache[key] = gather_index(axes[axis], spec.groups, group, spec.blocks)
    return gathered(tensor, axis, cache[key])


def similarity(
    spec: PermutationSpec, a: State, b: State, perms: Perms, group: str,
    users: list[tuple[str, int]] | None = None, static: dict | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """S[i, j] = Σ <A slice i, π_{-g}(B) slice j> over the tensors `group` acts on (fp32).

    A per-block group gets one matrix per block: S[e, i, j]. `users` is `spec.users()[group]`,
    passed by callers that compute the inverse map once. `static` keeps, across calls, the terms of
    tensors no other group acts on (an embedding's vocab rows) when they cost more to compute than to store.
    Tensors stay in their dtype; products are summed in fp32 chunks. `out` ([blocks, n, n]) is filled in place.
    """
    users = spec.users()[group] if users is None else users
    others = {g: p for g, p in perms.items() if g != group}
    n = spec.groups[group]
    blocks = spec.groups[spec.blocks[group]] if group in spec.blocks else 1
    S = torch.zeros(blocks, n, n, dtype=torch.float32, device=_device(a)) if out is None else out.zero_()
    slices: dict = {}
    indices: dict = {}
    for key, axis in users:
        if static is not None and (group, key) in static:
            S += static[group, key]
            continue
        axes = spec.axes[key]
        alone = {g for layout in axes if layout is not None for g in groups_in(layout)} == {group}
        ta = _slices(spec, a[key], axes, axis, group, slices)
        keep = static is not None and alone and ta.shape[0] * ta.shape[2] >= n
        tb = permute_tensor(b[key], axes, spec.groups, others, indices, spec.blocks)
        term = torch.zeros_like(S) if keep else S
        accumulate(term, ta, _slices(spec, tb, axes, axis, group, slices))
        if keep:
            S += term
            static[group, key] = term
    return S if group in spec.blocks else S[0]


def _terms(spec: PermutationSpec, a: State, b: State, perms: Perms, keys) -> dict[str, float]:
    """<A, π(B)> of each spec'd parameter in `keys` (buffers never), in the spec's order."""
    indices: dict = {}
    out = {}
    for key, axes in spec.axes.items():
        if key in keys and key not in spec.buffers:
            x = a[key]  # read once: a lazy state reads on every access
            x = x if x.dim() else x.reshape(1)
            out[key] = sum((dot(x.narrow(axis, start, length), slab) for axis, start, length, slab
                            in permuted_slabs(b[key], axes, spec.groups, perms, indices, spec.blocks)), 0.0)
    return out


def objective(spec: PermutationSpec, a: State, b: State, perms: Perms, keys: set[str] | None = None) -> float:
    """Σ over spec'd parameters (tied aliases once, buffers never; only `keys` if given) of <A, π(B)>."""
    return sum(_terms(spec, a, b, perms, spec.axes.keys() if keys is None else keys).values(), 0.0)


class _Objective:
    """The objective kept per tensor: only tensors a changed group acts on are evaluated again. The
    total adds the same terms in the same order as `objective`, so it is the same number."""

    def __init__(self, spec: PermutationSpec, a: State, b: State) -> None:
        self.spec, self.a, self.b = spec, a, b
        self.terms: dict[str, float] = {}
        self.keys_of = {g: {key for key, _ in users} for g, users in spec.users().items()}

    def changed(self, groups: Iterable[str]) -> None:
        for g in groups:
            for key in self.keys_of[g]:
                self.terms.pop(key, None)

    def __call__(self, perms: Perms, keys: Iterable[str] | None = None) -> float:
        wanted = {k for k in (self.spec.axes if keys is None else keys) if k not in self.spec.buffers}
        self.terms.update(_terms(self.spec, self.a, self.b, perms, wanted - self.terms.keys()))
        return sum((self.terms[k] for k in self.spec.axes if k in wanted), 0.0)


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


def solve_round(spec: PermutationSpec, S: torch.Tensor, groups: list[str], perms: Perms, lap_backend: str,
                tol: float) -> tuple[str, list[str]]:
    """One batched LAP over `S` ([Σ blocks, n, n]: the similarities of independent groups of one size, in
    the order of `groups`); a group's permutation is replaced only when its assignment strictly improves.
    Returns the backend used and the groups whose permutation changed."""
    n = S.shape[-1]
    new, info = lap.solve(S, maximize=True, backend=lap_backend, return_info=True)
    changed, start = [], 0
    for g in groups:
        old = perms[g].reshape(-1, n)
        part, p_new = S[start:start + old.shape[0]], new[start:start + old.shape[0]]
        start += old.shape[0]
        old_score = float(lap.objective(part, old).sum())
        if float(lap.objective(part, p_new).sum()) > old_score + tol * max(1.0, abs(old_score)):
            changed += [g] if not torch.equal(p_new.cpu(), old.cpu()) else []
            perms[g] = p_new.reshape(perms[g].shape).to(perms[g].device)
    return info.backend, changed


@dataclass
class _Staleness:
    """Which groups need solving again. A group's similarity depends only on its neighbours' perms, so
    while none of them has changed since its last solve, solving it again returns the same answer."""

    neighbours: dict[str, set[str]]
    changed: dict[str, int] = field(default_factory=dict)  # group -> round its perm last changed
    solved: dict[str, int] = field(default_factory=dict)  # group -> round it was last solved

    def stale(self, g: str) -> bool:
        last = self.solved.get(g)
        return last is None or any(self.changed.get(n, -1) > last for n in self.neighbours[g])


class _On(Mapping):
    """A state's tensors on `device` in their own dtype, moved on access (no copy when already there)."""

    def __init__(self, state: State, device: torch.device) -> None:
        self.state, self.device = state, device

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key].to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _device(state: State) -> torch.device:
    """Where a state's tensors are (or, for an `_On` view, are moved to), without reading one."""
    return state.device if isinstance(state, _On) else state_device(state)


@dataclass
class _Sweeper:
    """Coordinate ascent's state across sweeps: what is stale, the objective's terms, the static
    similarity terms and where the time went."""

    spec: PermutationSpec
    a: State
    b: State
    tol: float
    lap_backend: str
    skip: bool
    plan: MemoryPlan | None
    users: dict[str, list[tuple[str, int]]] = field(init=False)
    block_keys: dict[str, set[str]] = field(init=False)
    track: _Staleness = field(init=False)
    value: _Objective = field(init=False)
    static: dict = field(default_factory=dict)
    round: int = 0
    lap_seconds: float = 0.0
    similarity_seconds: float = 0.0
    backends: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.users = self.spec.users()  # derived once, not per group and sweep
        self.block_keys = {b: {key for key, _ in self.users[b]} for b in set(self.spec.blocks.values())}
        self.track = _Staleness(self.spec.neighbours())
        self.value = _Objective(self.spec, self.a, self.b)

    def heads(self, perms: Perms, block: str) -> list[str]:
        """The joint head step of `block`, kept only if it raises the objective; returns the groups it moved."""
        t0 = time.perf_counter()
        proposal, used = head_step(self.spec, self.a, self.b, perms, block, self.users[block], self.lap_backend,
                                   _device(self.a))
        self.lap_seconds += time.perf_counter() - t0
        self.backends += used
        keys = self.block_keys[block]
        before, after = self.value(perms, keys), objective(self.spec, self.a, self.b, {**perms, **proposal}, keys)
        if after <= before + self.tol * max(1.0, abs(before)):
            return []
        moved = [h for h, p in proposal.items() if not torch.equal(p, perms[h])]
        perms.update(proposal)
        return moved

    def sweep(self, perms: Perms, order: list[str]) -> None:
        """One sweep in `order`, round by round, solving only groups that are stale (all without `skip`)."""
        for round_ in independent_rounds(self.spec, order, self.track.neighbours):
            self.round += 1
            todo = [g for g in round_ if self.track.stale(g) or not self.skip]
            changed = [h for g in todo if g in self.block_keys for h in self.heads(perms, g)]
            by_size: dict[int, list[str]] = {}
            for g in todo:
                if g not in self.block_keys:
                    by_size.setdefault(self.spec.groups[g], []).append(g)
            for same in by_size.values():
                for batch in self.plan.batches(same) if self.plan is not None else [same]:
                    changed += self.solve(perms, batch)
            self.track.solved.update({g: self.round for g in todo})
            self.track.changed.update({g: self.round for g in changed})
            self.value.changed(changed)

    def solve(self, perms: Perms, batch: list[str]) -> list[str]:
        """Similarities of `batch` (independent groups of one size) into one buffer, then one LAP call
        on it; returns the groups whose permutation changed."""
        t0 = time.perf_counter()
        counts = [self.spec.groups[self.spec.blocks[g]] if g in self.spec.blocks else 1 for g in batch]
        n = self.spec.groups[batch[0]]
        S = torch.empty(sum(counts), n, n, dtype=torch.float32, device=_device(self.a))
        for g, part in zip(batch, S.split(counts)):
            similarity(self.spec, self.a, self.b, perms, g, self.users[g], self.static, out=part)
        t1 = time.perf_counter()
        used, moved = solve_round(self.spec, S, batch, perms, self.lap_backend, self.tol)
        self.similarity_seconds += t1 - t0
        self.lap_seconds += time.perf_counter() - t1
        self.backends.append(used)
        return moved


def _shared_start(spec: PermutationSpec, a: State, b: State, **options) -> tuple[Perms, MatchResult]:
    """The optimum of the coarser spec whose within-head groups are shared by all heads, as per-head
    permutations: descent over the finer spec starts there, so its objective is never below the
    coarser one's (it searches a superset from the same point). Returns the start and the coarse run."""
    coarse = weight_matching(shared_within(spec), a, b, **options)
    per_block = identity_perms(spec)
    return {g: coarse.perms[g].expand_as(per_block[g]).clone() for g in per_block}, coarse


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
    device: str | torch.device | None = None,
    skip_unchanged: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
    memory: int | str | MemoryPlan | None = None,
) -> MatchResult:
    """Permutations of B's groups that maximise Σ <A, π(B)> (Ainsworth et al. 2023, weight matching).

    Similarities accumulate in fp32 on `device` (default: the states'; bf16/fp16 inputs are fine); LAPs
    run on the backend `lap.solve` picks. Each sweep never lowers the objective; the trace is returned.
    `skip_unchanged=False` solves every group every sweep (same answer, slower: for checking the skip).
    A spec with per-head groups starts (without `init`) from the shared-within-head optimum, so its
    objective is never below the coarser spec's; head order and within-head orders move jointly.
    `progress(sweeps, None)` is called after every sweep (the number of sweeps is not known ahead).
    `memory` (bytes or "8GB", or a `plan_for` these states) splits rounds so that the working set fits (see
    `budget`); the plan is in the result. None: no limit.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter: must be at least 1, got {max_iter}")
    assert_same_shapes(a, b, "model A", "model B")
    shapes = state_shapes(a)
    spec.validate(shapes)
    start = time.perf_counter()
    device = torch.device(device) if device is not None else state_device(a)
    coarse = None
    if init is None and spec.blocks:  # per-head groups start from the shared-within-head optimum
        init, coarse = _shared_start(spec, a, b, max_iter=max_iter, seed=seed, tol=tol, lap_backend=lap_backend,
                                     device=device, skip_unchanged=skip_unchanged,
                                     memory=memory.budget if isinstance(memory, MemoryPlan) else memory)
    plan = memory if memory is None or isinstance(memory, MemoryPlan) else plan_for(spec, a, b, memory, device)
    a, b = _On(a, device), _On(b, device)
    perms = {g: p.to(device) for g, p in (init or identity_perms(spec)).items()}
    rng = random.Random(seed)
    run = _Sweeper(spec, a, b, tol, lap_backend, skip_unchanged, plan)
    sweeps, seconds = 0, []
    with threads(thread_count(spec, shapes, run.users, device)):
        trace = [run.value(perms)]
        for sweeps in range(1, max_iter + 1):
            t0 = time.perf_counter()
            order = sorted(spec.groups)
            rng.shuffle(order)
            run.sweep(perms, order)
            trace.append(run.value(perms))
            seconds.append(time.perf_counter() - t0)
            if progress:
                progress(sweeps, None)
            if trace[-1] <= trace[-2] + tol * max(1.0, abs(trace[-2])):
                break
    return MatchResult(
        perms={g: p.cpu() for g, p in perms.items()},
        method="weight_matching",
        objective=trace,
        sweeps=sweeps,
        seconds=time.perf_counter() - start,
        lap_seconds=run.lap_seconds + (coarse.lap_seconds if coarse else 0.0),  # the coarse start's time included
        similarity_seconds=run.similarity_seconds + (coarse.similarity_seconds if coarse else 0.0),
        lap_backends=run.backends + (coarse.lap_backends if coarse else []),
        unpermuted=spec.unpermuted(shapes),
        sweep_seconds=seconds,
        memory=plan.to_dict() if plan is not None else None,
    )


def plan_for(spec: PermutationSpec, a: State, b: State, memory: int | str | None,
             device: str | torch.device | None = None) -> MemoryPlan:
    """The memory plan `weight_matching` follows for these states (held, or read from disk) with its
    similarities on `device` (default: the states'), within `memory` (None: `default_budget()`)."""
    device = torch.device(device) if device is not None else state_device(a)
    return plan_memory(spec, state_shapes(a), _itemsizes(a), memory, lazy=is_lazy(a) or is_lazy(b),
                       solver_chunk=lap.LAP_CHUNK_ENTRIES if device.type == "cpu" else None)


def _itemsizes(state: State) -> dict[str, int]:
    """Bytes per element of each tensor, from headers when the state has them (no tensor is read)."""
    dtypes = getattr(state, "dtypes", None)
    if isinstance(dtypes, Mapping):
        return {k: d.itemsize for k, d in dtypes.items()}
    return {k: v.element_size() for k, v in state.items()}


def apply(spec: PermutationSpec, state: State, result: MatchResult | Perms) -> dict[str, torch.Tensor]:
    """B permuted into A's neuron order."""
    perms = result.perms if isinstance(result, MatchResult) else result
    return permute_state(state, spec, perms)
