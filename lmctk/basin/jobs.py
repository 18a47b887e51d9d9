"""The basin jobs as a user runs them: from checkpoint paths to a result object that renders itself.

`align_checkpoints` aligns B to A (weight or activation matching, in memory or streamed) and measures the
distances before and after; `barrier_checkpoints` sweeps the line between two or more models and
judges each pair. The CLI parses, calls one of these and prints what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmctk.basin.activation import activation_matching
from lmctk.basin.align import State, plan_for, weight_matching
from lmctk.basin.barrier import (
    DEFINITIONS,
    BarrierResult,
    barrier_matrix,
    barrier_sweep,
)
from lmctk.basin.match import MatchResult
from lmctk.basin.saved import (
    PERMS_NAME,
    PermutedView,
    load_perms,
    save_aligned,
    save_perms,
)
from lmctk.errors import ConfigError
from lmctk.io import format_bytes, state_shapes
from lmctk.loading import load_model_state, read_state, resolve_task, unloaded_skeleton
from lmctk.metrics import distances
from lmctk.render import line_plot, terminal_curve
from lmctk.spec import spec_for
from lmctk.spec.core import Perms, PermutationSpec
from lmctk.spec.permute import permute_in_place
from lmctk.spec.preservation import example_inputs, model_outputs, relative_difference
from lmctk.train import resolve_device

MATCHING = ("weight", "activation")


@dataclass
class AlignReport:
    """Permutations of B onto A, the parameter distances before and after, and the function check."""

    match: MatchResult
    before: dict[str, float]
    after: dict[str, float]
    function_check: float | None  # max relative output difference of π(B) vs B (None when streamed)
    written: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.match.to_dict(), "perms": {g: p.tolist() for g, p in self.match.perms.items()},
                "distance": {"before": self.before, "after": self.after}, "function_check": self.function_check,
                "written": [str(p) for p in self.written]}

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title="distance to A (parameters)")
        for col in ("", "L2", "cosine"):
            table.add_column(col, justify="right" if col else "left")
        table.add_row("B", f"{self.before['l2']:.4f}", f"{self.before['cosine']:.4f}")
        table.add_row("π(B)", f"{self.after['l2']:.4f}", f"{self.after['cosine']:.4f}")
        lines = []
        if self.function_check is not None:
            lines.append(f"π(B) computes the same function as B: max relative output difference "
                         f"{self.function_check:.2e}")
        if self.match.memory is not None:
            lines.append(f"memory plan: peak {format_bytes(self.match.memory['peak'])} of a "
                         f"{format_bytes(self.match.memory['budget'])} budget")
        if self.match.unpermuted:
            lines.append(f"left unpermuted: {', '.join(self.match.unpermuted)}")
        lines += [f"written: {path}" for path in self.written]
        return Group(self.match, table, *[Text(line) for line in lines])


def permute_checked(model: nn.Module, spec: PermutationSpec, state: State, perms: Perms) -> float:
    """Permute `state` (B, in memory) into π(B) in place, no second copy; returns the max relative output
    difference of π(B) vs B on a small random batch (≈ 0: the permutation kept the function)."""
    inputs = example_inputs(model, torch.Generator().manual_seed(0))
    reference = model_outputs(model, dict(state), inputs)
    permute_in_place(state, spec, perms)
    return relative_difference(reference, model_outputs(model, dict(state), inputs))


def align_checkpoints(
    a: str | Path,
    b: str | Path,
    *,
    method: str = "weight",
    task: str | None = None,
    task_options: Mapping[str, Any] | None = None,
    stream: bool = False,
    max_iter: int = 100,
    seed: int = 0,
    lap_backend: str = "auto",
    device: str = "cpu",
    max_batches: int = 8,
    out: str | Path | None = None,
    perms: str | Path | None = None,
    perms_only: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
    memory: int | str | None = None,
    log: Callable[[str], None] | None = None,
) -> AlignReport:
    """Align checkpoint B to checkpoint A; with `out`, write π(B) there as an HF model dir (with its
    permutations file); `perms` also writes the permutations to that file; `perms_only` writes no model.

    `stream` reads both checkpoints tensor by tensor (weight matching only), so neither is held whole.
    `device` runs weight matching's similarity matmuls there (the states stay where they are).
    `progress(sweeps, None)` is called after every matching sweep.
    `memory` (bytes or "8GB"; default: half the memory available) bounds weight matching's working set;
    `log(line)` gets its plan (the peak it will hold) before the first sweep.
    """
    if method not in MATCHING:
        raise ConfigError(f"--method: unknown {method!r}; choose one of {', '.join(MATCHING)}")
    if stream and method != "weight":
        raise ConfigError("--stream: only weight matching streams; drop --stream for activation matching")
    if perms_only and out is None and perms is None:
        raise ConfigError("--perms-only: give --out DIR or --perms FILE to write the permutations to")
    model, the_task = None, None
    if stream:
        skeleton = unloaded_skeleton(a)
        spec = spec_for(skeleton)
        state_a, state_b = read_state(a, skeleton, lazy=True), read_state(b, skeleton, lazy=True)
    else:
        the_task = resolve_task(task, task_options, [a]) if method == "activation" else None
        model, state_a, _ = load_model_state(a, the_task)
        state_b = read_state(b, model)
        spec = spec_for(model)
    if method == "weight":
        plan = plan_for(spec, state_a, state_b, memory, resolve_device(device))
        if log is not None:
            log(f"weight matching's working set: at most {format_bytes(plan.peak)} "
                f"(budget {format_bytes(plan.budget)}; largest similarity matrix "
                f"{format_bytes(max(plan.matrices.values(), default=0))})")
        match = weight_matching(spec, state_a, state_b, max_iter=max_iter, seed=seed, lap_backend=lap_backend,
                                device=resolve_device(device), progress=progress, memory=plan)
    else:
        match = activation_matching(model, spec, state_a, state_b, the_task, max_batches=max_batches,
                                    seed=seed, lap_backend=lap_backend, progress=progress)
    keys = [k for k in spec.axes if k not in spec.buffers] + spec.unpermuted(state_a.keys())
    before = distances(state_a, state_b, keys)
    check = None if stream else permute_checked(model, spec, state_b, match.perms)
    aligned = state_b if not stream else PermutedView(spec, state_b, match.perms)
    report = AlignReport(match, before, distances(state_a, aligned, keys), check)
    if out is not None and not perms_only:
        report.written.append(save_aligned(spec, aligned, match, out, source=b,
                                           overwrite=overwrite))
    targets = [Path(out) / PERMS_NAME] if out is not None and perms_only else []
    for file in targets + ([Path(perms)] if perms is not None else []):
        report.written.append(save_perms(spec, match.perms, file, overwrite=overwrite))
    return report


@dataclass
class PermuteReport:
    """Saved permutations applied to a checkpoint: where π(checkpoint) went and how much moved."""

    checkpoint: Path
    perms_file: Path
    written: Path
    moved: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "perms": str(self.perms_file), "written": str(self.written),
                "moved": self.moved}

    def __rich__(self):
        from rich.text import Text

        moved = sum(1 for n in self.moved.values() if n)
        return Text(f"{self.checkpoint} permuted by {self.perms_file} ({moved} of {len(self.moved)} groups "
                    f"move) and written to {self.written}")


def permute_checkpoint(checkpoint: str | Path, perms: str | Path, out: str | Path, *,
                       overwrite: bool = False) -> PermuteReport:
    """Apply permutations saved by `align` to another checkpoint of the same architecture (a later step
    of the run, a fine-tune of it) and write the result as an HF model dir, one tensor at a time."""
    skeleton = unloaded_skeleton(checkpoint)
    spec = spec_for(skeleton)
    saved = load_perms(perms, spec)
    state = read_state(checkpoint, skeleton, lazy=True)  # tied aliases the file omits are read, and omitted again
    spec.validate(state_shapes(state))
    written = save_aligned(spec, PermutedView(spec, state, saved), saved, out, source=checkpoint,
                           overwrite=overwrite)
    moved = {g: int((p != torch.arange(p.shape[-1])).sum()) for g, p in saved.items()}
    return PermuteReport(Path(checkpoint), Path(perms), written, moved)


def _names(paths: Sequence[Path]) -> list[str]:
    short = [p.name or str(p) for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


@dataclass
class BarrierReport:
    """Barrier sweeps between two models (or every pair of several) and a verdict per pair."""

    results: list[BarrierResult]
    threshold: float
    definition: str
    matrix: Any = None  # the BarrierMatrix when more than two models were swept
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for r in self.results:
            connected, line = r.verdict(self.threshold, self.definition)
            self.verdicts.append({"a": r.names[0], "b": r.names[1], "connected": connected, "message": line})

    @property
    def undefined(self) -> bool:
        """Whether some pair has no verdict: its loss is not finite somewhere on the path (CLI exit 2)."""
        return any(v["connected"] is None for v in self.verdicts)

    @property
    def connected(self) -> bool:
        """Whether every pair is linearly connected (the CLI exits 3 otherwise)."""
        return all(v["connected"] for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        payload = self.matrix.to_dict() if self.matrix is not None else self.results[0].to_dict()
        payload["verdict"] = {"threshold": self.threshold, "definition": self.definition, "pairs": self.verdicts}
        return payload

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [self.matrix] if self.matrix is not None else [self.results[0]]
        if self.matrix is None:
            r = self.results[0]
            series = {"raw loss": r.raw.loss, **({"aligned loss": r.aligned.loss} if r.aligned else {})}
            parts.append(terminal_curve(r.alphas, series, title="loss along α", xlabel="α"))
        for v in self.verdicts:
            prefix = "" if self.matrix is None else f"{v['a']} ↔ {v['b']}: "
            style = "yellow" if v["connected"] is None else "green" if v["connected"] else "red"
            parts.append(Text(prefix + v["message"], style=style))
        return Group(*parts)

    def plot(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """A PNG of loss and accuracy along α, raw and aligned, for every pair."""
        panels: dict[str, dict[str, list[float]]] = {"loss": {}, "accuracy": {}}
        for r in self.results:
            tag = "" if len(self.results) == 1 else f"{r.names[0]}–{r.names[1]} "
            for label, curve in (("raw", r.raw), ("aligned", r.aligned)):
                if curve is not None:
                    panels["loss"][tag + label] = curve.loss
                    panels["accuracy"][tag + label] = curve.accuracy
        first = self.results[0]
        s = first.settings
        where = f"{s['split']} split, renorm={s['renorm']}"
        if len(self.results) == 1:
            found = [f"{label} {curve.barriers(first.alphas)['loss']['mean_endpoint']:.3g}"
                     for label, curve in (("raw", first.raw), ("aligned", first.aligned)) if curve is not None]
            title = f"{first.names[0]} → {first.names[1]}: loss barrier {', '.join(found)} ({where})"
        else:
            title = f"interpolation between {len(self.results)} pairs ({where})"
        return line_plot(path, first.alphas, panels, xlabel="α", overwrite=overwrite, title=title)


def barrier_checkpoints(
    models: Sequence[str | Path],
    *,
    task: str | None = None,
    task_options: Mapping[str, Any] | None = None,
    threshold: float = 0.05,
    definition: str = "mean_endpoint",
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    **sweep: Any,
) -> BarrierReport:
    """Barrier sweeps between checkpoints (every pair when more than two), judged against `threshold`.

    `sweep` goes to `barrier_sweep` (points, align, renorm, split, batch_size, calib_batches, ...);
    `progress(done, total)` counts the sweeps' stages (raw sweep, alignment, aligned sweep) over all pairs.
    """
    models = [Path(m) for m in models]
    if len(models) < 2:
        raise ConfigError("barrier: give at least two models (run dirs or checkpoint dirs)")
    if definition not in DEFINITIONS:
        raise ConfigError(f"--definition: unknown {definition!r}; choose one of {', '.join(DEFINITIONS)}")
    the_task = resolve_task(task, task_options, models)
    model, first, _ = load_model_state(models[0], the_task)  # one skeleton; the sweep checks the others' keys
    states = [first] + [dict(read_state(p, model)) for p in models[1:]]
    target = resolve_device(device)
    model: nn.Module = model.to(target, torch.float32)  # paths are evaluated in fp32 whatever the files hold
    names = _names(models)
    if len(models) == 2:
        result = barrier_sweep(model, states[0], states[1], the_task, names=tuple(names), device=target,
                               progress=progress, **sweep)
        return BarrierReport([result], threshold, definition)
    matrix = barrier_matrix(model, dict(zip(names, states)), the_task, device=target, progress=progress, **sweep)
    return BarrierReport(list(matrix.pairs.values()), threshold, definition, matrix)
