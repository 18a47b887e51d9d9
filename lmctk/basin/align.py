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

import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lmctk.basin import lap
from lmctk.basin.match import MatchResult
from lmctk.errors import ConfigError
from lmctk.io import assert_same_shapes, state_device, state_shapes
from lmctk.spec.core import (
    Perms,
    PermutationSpec,
    coordinates,
    group_slices,
    groups_in,
    identity_perms,
    is_identity,
    permute_state,
    permute_tensor,
)

State = Mapping[str, torch.Tensor]


def _rows(tensor: torch.Tensor, axis: int, index: torch.Tensor | None, rows: int) -> torch.Tensor:
    """`tensor` gathered along `axis` by `index` (None: as it is), that axis first, as `rows` rows."""
    if index is not None:  # gather along the original (contiguous) axis, then bring it to the front
        tensor = tensor.index_select(axis, index.to(tensor.device))
    return tensor.movedim(axis, 0).reshape(rows, -1)


def _slices(spec: PermutationSpec, tensor: torch.Tensor, axes, axis: int, group: str, cache: dict) -> torch.Tensor:
    """The tensor with `group`'s elements as rows: [n_group, everything else] ([n_block * n_group, …] per block)."""
    key = (axes[axis], group)
    if key not in cache:
        flat = group_slices(axes[axis], spec.groups, group, spec.blocks).reshape(-1)
        cache[key] = None if is_identity(flat) else flat
    rows = spec.groups[group] * (spec.groups[spec.blocks[group]] if group in spec.blocks else 1)
    return _rows(tensor, axis, cache[key], rows)


def similarity(
    spec: PermutationSpec, a: State, b: State, perms: Perms, group: str,
    users: list[tuple[str, int]] | None = None, static: dict | None = None,
) -> torch.Tensor:
    """S[i, j] = Σ <A slice i, π_{-g}(B) slice j> over the tensors `group` acts on (fp32).

    A per-block group gets one matrix per block: S[e, i, j]. `users` is `spec.users()[group]`,
    passed by callers that compute the inverse map once. `static` keeps, across calls, the terms of
    tensors no other group acts on (an embedding's vocab rows) when they cost more to compute than to store.
    """
    users = spec.users()[group] if users is None else users
    others = {g: p for g, p in perms.items() if g != group}
    n = spec.groups[group]
    blocks = spec.groups[spec.blocks[group]] if group in spec.blocks else 1
    S = torch.zeros(blocks, n, n, dtype=torch.float32, device=_device(a))
    slices: dict = {}
    indices: dict = {}
    for key, axis in users:
        if static is not None and (group, key) in static:
            S += static[group, key]
            continue
        axes = spec.axes[key]
        ta = _slices(spec, a[key].to(torch.float32), axes, axis, group, slices)
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, others, indices, spec.blocks)
        tb = _slices(spec, tb, axes, axis, group, slices)
        term = ta.reshape(blocks, n, -1) @ tb.reshape(blocks, n, -1).transpose(1, 2)
        S += term
        alone = {g for layout in axes if layout is not None for g in groups_in(layout)} == {group}
        if static is not None and alone and ta.shape[1] >= n:
            static[group, key] = term
    return S if group in spec.blocks else S[0]


def _terms(spec: PermutationSpec, a: State, b: State, perms: Perms, keys) -> dict[str, float]:
    """<A, π(B)> of each spec'd parameter in `keys` (buffers never), in the spec's order."""
    indices: dict = {}
    out = {}
    for key, axes in spec.axes.items():
        if key in keys and key not in spec.buffers:
            tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, perms, indices, spec.blocks)
            out[key] = float((a[key].to(torch.float32) * tb).sum())
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


def head_step(
    spec: PermutationSpec, a: State, b: State, perms: Perms, block: str,
    users: list[tuple[str, int]], lap_backend: str = "auto",
) -> tuple[Perms, list[str]]:
    """Joint best order of `block` (heads) and of its per-block groups (within-head dims), others fixed.

    Cost of pairing A's head e with B's head j = Σ of that pair's optimal within-head assignments
    (all pairs and groups of one size in one batched LAP) + the head's other slots; one outer LAP
    over heads then picks the pairs. Exact when no slot holds two within-head groups; tensors where
    they meet (GQA's o_proj: query head x v dim) are left out of the costs, and callers keep the step
    only if it raises the objective. Returns the proposed perms and the LAP backends used.
    """
    deps = [g for g, o in spec.blocks.items() if o == block and spec.groups[g] > 1]
    others = {g: p for g, p in perms.items() if g != block and g not in deps}
    n = spec.groups[block]
    device = _device(a)
    C = torch.zeros(n, n, dtype=torch.float32, device=device)
    S = {g: torch.zeros(n, n, spec.groups[g], spec.groups[g], device=device) for g in deps}
    indices: dict = {}
    for key, axis in users:
        axes, layout = spec.axes[key], spec.axes[key][axis]
        _, coords = coordinates(layout, spec.groups)
        present = [g for g in deps if g in coords]
        held = sum(((coords[g][0] >= 0).long() for g in present), torch.zeros_like(coords[block][0]))
        if bool((held > 1).any()):
            continue
        ta = a[key].to(torch.float32)
        tb = permute_tensor(b[key].to(torch.float32), axes, spec.groups, others, indices, spec.blocks)
        slots = group_slices(layout, spec.groups, block)
        slots = slots[:, held[slots[0]] == 0].reshape(-1)  # a head's slots that no within-head group moves
        C += _rows(ta, axis, slots, n) @ _rows(tb, axis, slots, n).T
        for g in present:
            index = group_slices(layout, spec.groups, g, spec.blocks).reshape(-1)
            d = spec.groups[g]
            rows_a = _rows(ta, axis, index, n * d).reshape(n, d, -1)
            rows_b = _rows(tb, axis, index, n * d).reshape(n, d, -1)
            S[g] += torch.einsum("eir,jkr->ejik", rows_a, rows_b)
    inner: dict[str, torch.Tensor] = {}
    backends = []
    for d in sorted({spec.groups[g] for g in deps}):
        gs = [g for g in deps if spec.groups[g] == d]
        stacked = torch.stack([S[g] for g in gs])
        solved, info = lap.solve(stacked, maximize=True, backend=lap_backend, return_info=True)
        backends.append(info.backend)
        C += lap.objective(stacked, solved).sum(0).to(C.dtype)
        inner.update(zip(gs, solved))
    heads, info = lap.solve(C, maximize=True, backend=lap_backend, return_info=True)
    proposal = {block: heads.to(device)}
    proposal.update({g: p[torch.arange(n, device=p.device), heads.to(p.device)].to(device) for g, p in inner.items()})
    return proposal, [*backends, info.backend]


def solve_round(spec: PermutationSpec, S: dict[str, torch.Tensor], perms: Perms, lap_backend: str,
                tol: float) -> tuple[list[str], list[str]]:
    """One batched LAP per group size over the similarities `S` of independent groups; a group's
    permutation is replaced only when its assignment strictly improves. Returns the backends used
    and the groups whose permutation changed."""
    by_size: dict[int, list[str]] = {}
    for g in S:
        by_size.setdefault(spec.groups[g], []).append(g)
    backends, changed = [], []
    for gs in by_size.values():
        n = spec.groups[gs[0]]
        stacked = torch.cat([S[g].reshape(-1, n, n) for g in gs])
        new, info = lap.solve(stacked, maximize=True, backend=lap_backend, return_info=True)
        backends.append(info.backend)
        for g, p_new in zip(gs, new.split([S[g].reshape(-1, n, n).shape[0] for g in gs])):
            p_new = p_new.reshape(perms[g].shape)
            old_score = float(lap.objective(S[g], perms[g]).sum())
            if float(lap.objective(S[g], p_new).sum()) > old_score + tol * max(1.0, abs(old_score)):
                changed += [g] if not torch.equal(p_new.cpu(), perms[g].cpu()) else []
                perms[g] = p_new.to(perms[g].device)
    return backends, changed


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


class _Fp32(Mapping):
    """A state's tensors as fp32 on `device`, converted on access (no copy when already there)."""

    def __init__(self, state: State, device: torch.device) -> None:
        self.state, self.device = state, device

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key].to(self.device, torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def _device(state: State) -> torch.device:
    """Where a state's tensors are (or, for an `_Fp32` view, are moved to), without reading one."""
    return state.device if isinstance(state, _Fp32) else state_device(state)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


# Below this many multiply-adds in a group's similarity, waking a second thread costs more than it saves
# (on a busy 2-core machine a small matching ran 15x slower on 2 threads than on 1).
_ONE_THREAD_MACS = 1 << 24
# Similarity entries held at once in a round: a round of independent groups is computed and solved in
# chunks under this budget (one group at least), so memory is bounded by the largest group, not by how
# many same-size groups a round happens to hold (28 MLP groups of 18944² in Qwen2.5-7B: 40 GB of S).
# The chunks of a round share no neighbour, so the answer is the same as one batch.
_ROUND_ENTRIES = 1 << 26


def budget_chunks(sizes: Mapping[str, int], groups: list[str], budget: int) -> list[list[str]]:
    """`groups` in order, cut into consecutive chunks whose summed `sizes` stay within `budget` (one group
    at least per chunk)."""
    chunks: list[list[str]] = []
    total = budget + 1
    for g in groups:
        if total + sizes[g] > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(g)
        total += sizes[g]
    return chunks


def _thread_count(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], users, device: torch.device) -> int:
    """One thread when every group's similarity is tiny (CPU only), else torch's current count."""
    def macs(g: str) -> int:
        return sum(math.prod(shapes[key]) for key, _ in users[g]) * spec.groups[g]

    small = device.type == "cpu" and all(macs(g) < _ONE_THREAD_MACS for g in spec.groups)
    return 1 if small else torch.get_num_threads()


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
    users: dict[str, list[tuple[str, int]]] = field(init=False)
    block_keys: dict[str, set[str]] = field(init=False)
    entries: dict[str, int] = field(init=False)
    track: _Staleness = field(init=False)
    value: _Objective = field(init=False)
    static: dict = field(default_factory=dict)
    round: int = 0
    lap_seconds: float = 0.0
    similarity_seconds: float = 0.0
    backends: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.users = self.spec.users()  # derived once, not per group and sweep
        self.entries = {g: n * n * (self.spec.groups[self.spec.blocks[g]] if g in self.spec.blocks else 1)
                        for g, n in self.spec.groups.items()}  # a group's S entries
        self.block_keys = {b: {key for key, _ in self.users[b]} for b in set(self.spec.blocks.values())}
        self.track = _Staleness(self.spec.neighbours())
        self.value = _Objective(self.spec, self.a, self.b)

    def heads(self, perms: Perms, block: str) -> list[str]:
        """The joint head step of `block`, kept only if it raises the objective; returns the groups it moved."""
        t0 = time.perf_counter()
        proposal, used = head_step(self.spec, self.a, self.b, perms, block, self.users[block], self.lap_backend)
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
            plain = [g for g in todo if g not in self.block_keys]
            moved = []
            for chunk in budget_chunks(self.entries, plain, _ROUND_ENTRIES):
                t0 = time.perf_counter()
                S = {g: similarity(self.spec, self.a, self.b, perms, g, self.users[g], self.static) for g in chunk}
                self.similarity_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                used, moved_now = solve_round(self.spec, S, perms, self.lap_backend, self.tol)
                self.lap_seconds += time.perf_counter() - t0
                self.backends += used
                moved += moved_now
                del S
            self.track.solved.update({g: self.round for g in todo})
            self.track.changed.update({g: self.round for g in changed + moved})
            self.value.changed(changed + moved)


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
) -> MatchResult:
    """Permutations of B's groups that maximise Σ <A, π(B)> (Ainsworth et al. 2023, weight matching).

    Similarities accumulate in fp32 on `device` (default: the states'; bf16/fp16 inputs are fine); LAPs
    run on the backend `lap.solve` picks. Each sweep never lowers the objective; the trace is returned.
    `skip_unchanged=False` solves every group every sweep (same answer, slower: for checking the skip).
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter: must be at least 1, got {max_iter}")
    assert_same_shapes(a, b, "model A", "model B")
    shapes = state_shapes(a)
    spec.validate(shapes)
    start = time.perf_counter()
    device = torch.device(device) if device is not None else state_device(a)
    a, b = _Fp32(a, device), _Fp32(b, device)
    perms = {g: p.to(device) for g, p in (init or identity_perms(spec)).items()}
    rng = random.Random(seed)
    run = _Sweeper(spec, a, b, tol, lap_backend, skip_unchanged)
    sweeps, seconds = 0, []
    with _threads(_thread_count(spec, shapes, run.users, device)):
        trace = [run.value(perms)]
        for sweeps in range(1, max_iter + 1):
            t0 = time.perf_counter()
            order = sorted(spec.groups)
            rng.shuffle(order)
            run.sweep(perms, order)
            trace.append(run.value(perms))
            seconds.append(time.perf_counter() - t0)
            if trace[-1] <= trace[-2] + tol * max(1.0, abs(trace[-2])):
                break
    return MatchResult(
        perms={g: p.cpu() for g, p in perms.items()},
        method="weight_matching",
        objective=trace,
        sweeps=sweeps,
        seconds=time.perf_counter() - start,
        lap_seconds=run.lap_seconds,
        similarity_seconds=run.similarity_seconds,
        lap_backends=run.backends,
        unpermuted=spec.unpermuted(shapes),
        sweep_seconds=seconds,
    )


def apply(spec: PermutationSpec, state: State, result: MatchResult | Perms) -> dict[str, torch.Tensor]:
    """B permuted into A's neuron order."""
    perms = result.perms if isinstance(result, MatchResult) else result
    return permute_state(state, spec, perms)
