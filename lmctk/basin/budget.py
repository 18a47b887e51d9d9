"""Weight matching's resources: a memory budget (what a sweep holds at its peak, rounds split to fit) and threads.

At any moment weight matching holds the similarity matrices of the groups solved together (fp32,
blocks·n² each, one buffer per sub-batch) plus either the tensors one similarity term reads (A and
π(B) in the checkpoint's dtype, a gathered copy, two fp32 chunks) or the LAP's float64 copy of one
problem. `plan_memory` sizes those from the shapes alone; `MemoryPlan.batches` splits a round of
independent groups into sub-batches whose matrices fit. Splitting never changes the answer: the groups
of a round share no tensor, and every sum is chunked independently of the budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmctk.basin.lap import LAP_CHUNK_ENTRIES
from lmctk.errors import ConfigError
from lmctk.io import format_bytes, parse_size
from lmctk.metrics import CHUNK, fp32_chunks
from lmctk.spec.core import PermutationSpec, gather_index


@contextmanager
def threads(count: int) -> Iterator[None]:
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


def thread_count(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], users, device: torch.device) -> int:
    """One thread when every group's similarity is tiny (CPU only), else torch's current count."""
    def macs(g: str) -> int:
        return sum(math.prod(shapes[key]) for key, _ in users[g]) * spec.groups[g]

    small = device.type == "cpu" and all(macs(g) < _ONE_THREAD_MACS for g in spec.groups)
    return 1 if small else torch.get_num_threads()


# Copies of a tensor alive while a term or distance reads it from disk: A, B and π(B); plus the fp32 chunks.
# States held in memory already count A and B, so only the permuted copy is new. A group taking part of a
# fused tensor (GPT-2's c_attn: q|k|v) gathers its slices into one more copy.
READ_COPIES = 3


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes weight matching will hold: `read` (the largest tensor's term or distance, no similarity held),
    per group size `fixed` (the LAP's float64 chunk or the group's largest term, whichever is more)
    and per group its similarity matrices; `peak` is the most held at once. `solver_chunk`: the most
    LAP entries one solver step takes (CPU solvers convert that many to float64 at a time), so a sub-batch
    holds no more than that (or one group): a larger one would wait in memory without being solved sooner."""

    budget: int
    read: int
    fixed: dict[int, int]
    matrices: dict[str, int]
    sizes: dict[str, int]
    peak: int
    solver_chunk: int | None = None

    def batches(self, groups: list[str]) -> list[list[str]]:
        """`groups` (independent, of one size) split in order into sub-batches whose matrices fit the budget."""
        room = self.budget - self.fixed[self.sizes[groups[0]]]
        if self.solver_chunk is not None:
            room = min(room, 4 * self.solver_chunk)
        out: list[list[str]] = []
        held = 0
        for g in groups:
            if out and held + self.matrices[g] <= room:
                out[-1].append(g)
                held += self.matrices[g]
            else:
                out.append([g])
                held = self.matrices[g]
        return out

    def to_dict(self) -> dict[str, int]:
        return {"budget": self.budget, "peak": self.peak, "read": self.read,
                "largest_matrices": max(self.matrices.values(), default=0)}


def default_budget() -> int:
    """Half the memory available now (Linux MemAvailable; else half the free pages), a share safe to use."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 2
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _gathers(spec: PermutationSpec, key: str, axis: int, group: str) -> bool:
    """Whether reading `group`'s slices of `key` along `axis` copies them (part of a fused axis)."""
    return gather_index(spec.axes[key][axis], spec.groups, group, spec.blocks) is not None


def plan_memory(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]], itemsizes: Mapping[str, int],
                budget: int | str | None = None, *, lazy: bool = True, solver_chunk: int | None = None) -> MemoryPlan:
    """The plan for aligning states of these shapes and element sizes within `budget` (bytes or "8GB";
    None: `default_budget()`); raises ConfigError naming the least budget when one group cannot fit.
    `lazy`: the states are read from disk as needed (else held: their tensors are not counted again).
    `solver_chunk`: LAP entries per solver step (CPU), which caps a sub-batch (see `MemoryPlan`)."""
    limit = default_budget() if budget is None else parse_size(budget, "--memory")
    users = spec.users()
    copies = READ_COPIES if lazy else 1

    def reading(terms) -> int:
        return max(((copies + gather) * math.prod(shapes[k]) * itemsizes[k] + 2 * 4 * min(math.prod(shapes[k]), CHUNK)
                    for k, gather in terms if k in shapes), default=0)

    heads = set(spec.blocks.values())
    sizes = {g: n for g, n in spec.groups.items() if users[g] and g not in heads}
    matrices = {g: 4 * n * n * (spec.groups[spec.blocks[g]] if g in spec.blocks else 1) for g, n in sizes.items()}
    fixed: dict[int, int] = {}
    for n in set(sizes.values()):
        same = [g for g in sizes if sizes[g] == n]
        entries = sum(matrices[g] for g in same) // 4
        terms = [(k, _gathers(spec, k, axis, g)) for g in same for k, axis in users[g]]
        fixed[n] = max(8 * max(n * n, min(LAP_CHUNK_ENTRIES, entries)), reading(terms))
    read = reading((k, False) for k in spec.axes)
    floor = max([read] + [fixed[sizes[g]] + matrices[g] for g in sizes])
    if floor > limit:
        raise ConfigError(f"--memory: {format_bytes(limit)} is below the {format_bytes(floor)} this model needs "
                          f"(its largest tensor and similarity matrix); give --memory {math.ceil(floor / 1e9)}GB or more")
    plan = MemoryPlan(limit, read, fixed, matrices, sizes, 0, solver_chunk)
    peak = read
    for n in set(sizes.values()):
        same = sorted((g for g in sizes if sizes[g] == n), key=matrices.get, reverse=True)
        peak = max(peak, fixed[n] + max(sum(matrices[g] for g in batch) for batch in plan.batches(same)))
    return MemoryPlan(limit, read, fixed, matrices, sizes, peak, solver_chunk)


def accumulate(S: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """S[e] += X_e Y_eᵀ for X, Y viewed as [pre, blocks·n, post] with rows block-major, chunk by chunk
    in fp32 along whichever of pre and post is longer (only the chunk is upcast)."""
    blocks, n = S.shape[0], S.shape[1]
    dim = 0 if x.shape[0] >= x.shape[2] else 2
    for cx, cy in fp32_chunks(x, y, dim):
        rows_x = cx.movedim(1, 0).reshape(blocks, n, -1)
        rows_y = cy.movedim(1, 0).reshape(blocks, n, -1)
        S.baddbmm_(rows_x, rows_y.transpose(1, 2))
