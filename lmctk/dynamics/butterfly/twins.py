"""Butterfly experiments: fork twins from a parent at step t, perturb one, train both in lockstep and
measure how far apart they end up (Altintas et al., ICML 2025; Frankle et al., 2020).

A trial is a pure function of (recipe, trial): the parent state at t, the perturbation's own seed
and the twins' own streams decide everything, so trials can run in any order, on any rank, again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lmctk.basin.barrier import barrier_sweep
from lmctk.dynamics.butterfly.perturb import Injection, PerturbConfig, inject
from lmctk.dynamics.probes import layer_outputs
from lmctk.errors import ConfigError, LmctkError
from lmctk.metrics import angular_cka, linear_cka
from lmctk.tasks.base import IGNORE_INDEX, Task, forward, scored_pairs
from lmctk.train import Trainer


class DeterminismError(LmctkError):
    """Twins with a zero perturbation diverged: the training step is not deterministic here."""


@dataclass
class MeasureConfig:
    """What is measured between the twins, when, and on which data."""

    every: int = 0  # also measure every N steps after the perturbation (0: only at t and at the end)
    at: list[int] = field(default_factory=list)  # and at these steps (those after the perturbation)
    points: int = 11  # α points of the barrier sweeps during training
    final_points: int = 25  # α points of the final barrier sweeps
    align: bool = True  # final barriers and distances also after weight matching B onto A
    cka: bool = True  # final debiased linear CKA per layer on the probe batch
    cka_layers: list[str] = field(default_factory=list)  # fnmatch patterns of module names (empty: every leaf layer with parameters)
    probe: int = 256  # probe examples (first of the split) for CKA
    renorm: Literal["none", "bn_reset", "repair"] = "none"  # renormalise every θ(α) (BatchNorm nets: bn_reset)
    split: Literal["train", "val", "test"] = "test"
    batch_size: int | None = None  # eval batch size (None: whole split at once)

    def __post_init__(self) -> None:  # checked when the recipe is read, before any training
        for name, least in (("points", 2), ("final_points", 2), ("every", 0), ("probe", 4 if self.cka else 1),
                            ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"{name}: must be at least {least}, got {value}")
        if any(s < 0 for s in self.at):
            raise ConfigError(f"at: steps must be >= 0, got {self.at}")


def measure_steps(t: int, total: int, every: int, at: list[int] | tuple[int, ...] = ()) -> list[int]:
    """Steps at which twins forked at `t` are measured: t (after the perturbation), every N, `at`, the end."""
    steps = {t, total, *at}
    if every > 0:
        steps.update(range((t // every + 1) * every, total, every))
    return sorted(s for s in steps if t <= s <= total)


def disagreement(a: nn.Module, b: nn.Module, task: Task, split: str, device, batch_size: int | None) -> float:
    """Share of scored examples (or tokens) where the two models' argmax predictions differ."""
    differ = count = 0
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        with torch.no_grad():
            for batch in task.eval_batches(split, device, batch_size):
                la, targets = scored_pairs(task.kind, forward(a, batch, task), batch)
                lb, _ = scored_pairs(task.kind, forward(b, batch, task), batch)
                scored = targets != IGNORE_INDEX
                differ += int(((la.argmax(-1) != lb.argmax(-1)) & scored).sum())
                count += int(scored.sum())
    finally:
        a.train(modes[0]), b.train(modes[1])
    return differ / max(count, 1)


def cka_per_layer(a: nn.Module, b: nn.Module, task: Task, spec: MeasureConfig, device) -> dict[str, dict[str, float]]:
    """Debiased linear CKA and its angular form arccos(CKA) per layer on the probe batch."""
    whole = task.eval_batches(spec.split, device, None)[0]
    probe = whole.select(slice(0, spec.probe))
    xa = layer_outputs(a, probe, task, spec.cka_layers)
    xb = layer_outputs(b, probe, task, spec.cka_layers)
    return {"cka": {n: linear_cka(xa[n], xb[n]) for n in xa},
            "angular_cka": {n: angular_cka(xa[n], xb[n]) for n in xa}}


def measure(a: nn.Module, b: nn.Module, task: Task, spec: MeasureConfig, *, final: bool) -> dict[str, Any]:
    """Distances, loss/error barriers (both definitions) and, at the end, aligned barriers, CKA and disagreement."""
    device = next(a.parameters()).device
    sa, sb = a.state_dict(), b.state_dict()  # read-only here: barrier_sweep works on copies
    align = "weight" if final and spec.align else None
    sweep = barrier_sweep(a, sa, sb, task, points=spec.final_points if final else spec.points, align=align,
                          renorm=spec.renorm, split=spec.split, device=device, batch_size=spec.batch_size)
    raw = sweep.raw
    out: dict[str, Any] = {
        **sweep.distance["raw"],
        "barrier": raw.barriers(sweep.alphas),
        "endpoints": {"a": {"loss": raw.loss[0], "accuracy": raw.accuracy[0]},
                      "b": {"loss": raw.loss[-1], "accuracy": raw.accuracy[-1]}},
        "bitwise_equal": all(torch.equal(sa[k], sb[k]) for k in sa),
    }
    if final:
        if sweep.aligned is not None:
            out["aligned"] = {**sweep.distance["aligned"], "barrier": sweep.aligned.barriers(sweep.alphas)}
        out["disagreement"] = disagreement(a, b, task, spec.split, device, spec.batch_size)
        if spec.cka:
            out.update(cka_per_layer(a, b, task, spec, device))
    return out


MeasureFn = Callable[[int, dict[str, Any]], None]
Reference = Callable[[int], nn.Module]  # twin A's model at a step, when A is a run already trained (not retrained)


def train_twins(a: Trainer | Reference, b: Trainer, total: int, at: list[int], spec: MeasureConfig, *,
                first_batch: Injection | None = None, on_measure: MeasureFn | None = None) -> list[dict[str, Any]]:
    """Train twin B to step `total`, measuring at the steps `at` (the last is final).

    A Trainer `a` trains in lockstep; when both read the same data stream, each batch is built once
    and fed to both. `first_batch` (a `batch` perturbation) replaces B's batch at its current step.
    """
    records = []
    lockstep = isinstance(a, Trainer)

    def record() -> None:
        model_a = a.model if lockstep else a(b.step)
        m = {"step": b.step, **measure(model_a, b.model, b.task, spec, final=b.step == total)}
        records.append(m)
        if on_measure:
            on_measure(b.step, m)

    if b.step in at:
        record()
    while b.step < total:
        shared = None
        if lockstep:
            shared = a.batch(a.step)
            a.train_step(shared)
        if first_batch is not None and first_batch.batch is not None:
            b.train_step(first_batch.batch)
            first_batch = None
        elif shared is not None and b.data_seed == a.data_seed:
            b.train_step(shared)
        else:
            b.train_step()
        if b.step in at:
            record()
    return records


def verify_twins(parent: Trainer, steps: int = 5) -> dict[str, Any]:
    """Preflight: twins forked from `parent` with a zero perturbation stay bitwise identical for `steps`.

    Raises DeterminismError naming the first tensor that differs; returns what was checked.
    """
    a, b = parent.fork(), parent.fork()
    inject(b, PerturbConfig(scale=0.0))
    start = time.perf_counter()
    for i in range(steps):
        batch = a.batch(a.step)
        a.train_step(batch)
        b.train_step(b.batch(b.step))  # built separately on purpose: the batch must be reproducible too
        sa, sb = a.model.state_dict(), b.model.state_dict()
        for k in sa:
            if not torch.equal(sa[k], sb[k]):
                delta = float((sa[k].double() - sb[k].double()).abs().max())
                raise DeterminismError(
                    f"twins with a zero perturbation differ after {i + 1} step(s) at '{k}' (max |Δ| = {delta:.3g}) "
                    f"on {parent.device}: the training step is not deterministic here. Run with deterministic = true, "
                    "on the CPU, and check that the task and model draw no randomness from outside the trainer")
    return {"ok": True, "steps": steps, "tensors": len(a.model.state_dict()), "device": str(parent.device),
            "seconds": time.perf_counter() - start}


def run_perturbed(parent: Trainer, spec: PerturbConfig, total: int, measure_spec: MeasureConfig,
                  init_std: dict[str, float] | None, on_measure: MeasureFn | None = None,
                  reference: Reference | None = None) -> dict[str, Any]:
    """Fork twins from `parent` (at step t), perturb B with `spec`, train both to `total`; the trial's result.

    Twin A is the parent run continued; `reference` gives its saved states instead of training it again.
    """
    start = time.perf_counter()
    a, b = reference or parent.fork(), parent.fork()
    injection = inject(b, spec, init_std)
    at = measure_steps(parent.step, total, measure_spec.every, measure_spec.at)
    records = train_twins(a, b, total, at, measure_spec, first_batch=injection, on_measure=on_measure)
    return {"perturbation": injection.info, "measurements": records, "final": records[-1],
            "seconds": time.perf_counter() - start}


def run_independent(a: Trainer | Reference, b: Trainer, total: int, measure_spec: MeasureConfig,
                    on_measure: MeasureFn | None = None) -> dict[str, Any]:
    """Two runs from different seeds (init, data, dropout) trained side by side: the reference barrier."""
    start = time.perf_counter()
    at = measure_steps(0, total, measure_spec.every, measure_spec.at)
    records = train_twins(a, b, total, at, measure_spec, on_measure=on_measure)
    return {"perturbation": {"kind": "independent", "seed_b": b.config.seed}, "measurements": records,
            "final": records[-1], "seconds": time.perf_counter() - start}
