"""Seed convergence over training: K runs → common checkpoint steps → per-step metrics and phases.

For every step present in all runs, the K models are evaluated together (parameters stacked,
`torch.func.vmap` over `functional_call`) on the task's fixed test set and a probe batch:
expected per-token KL over ordered seed pairs (fp32, SE over contexts, strata), per-layer
activation similarities (`lmctk.dynamics.fingerprints`), loss spread. Each step is reduced to its
summaries as soon as it is evaluated (the final step first: it defines the surprisal strata), so
memory does not grow with the number of steps. Then `phases` segments the KL curve and `regimes`
labels seed regimes. Computation returns a `ConvergeResult`; `report` renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from lmctk import metrics
from lmctk.dynamics import fingerprints
from lmctk.dynamics.converge.inputs import (
    Run,
    common_steps,
    load_classes,
    load_counts,
    train_counts,
)
from lmctk.dynamics.converge.phases import PhaseFit, detect_phases
from lmctk.dynamics.converge.regimes import Regimes, seed_regimes
from lmctk.dynamics.probes import layer_outputs
from lmctk.errors import ConfigError
from lmctk.io import load_state
from lmctk.loading import checkpoint_skeleton, load_into, resolve_task
from lmctk.tasks import Task
from lmctk.tasks.base import IGNORE_INDEX, Batch, scored_pairs

# -- evaluating K seeds at one step -------------------------------------------------------------


@dataclass
class StepOutputs:
    """Per-token and per-layer values of the K seeds at one step, before any summary."""

    kl: torch.Tensor  # [N] expected KL over ordered pairs per scored token
    nll: torch.Tensor  # [K, N]
    pair_kl: torch.Tensor  # [K, K] mean KL(p_i ‖ p_j) over the scored tokens
    activations: list[torch.Tensor]  # per layer [K, rows, features] on the probe batch
    diversity: list[dict[str, float]] | None = None


class Evaluator:
    """Runs K seeds of one architecture: one model, the seeds' states stacked once along a leading axis.

    Scored tokens are the same at every step: `targets` [N] and `clusters` [N] (context index).
    Per-layer activations come from HF `hidden_states` (rows = tokens) or, for other models, from
    forward hooks on the blocks of the first `nn.ModuleList` (e.g. MLP `hidden`, CNN `blocks`; rows = examples).
    Checkpoints are copied into the skeleton's parameters, so bf16/fp16 weights are upcast to its fp32.
    """

    def __init__(self, model: nn.Module, k: int, task: Task, *, device: str = "cpu",
                 batch_size: int = 16, probe: int = 16, batched: bool = True) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.live = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        self.stacked = {n: torch.empty((k, *t.shape), dtype=t.dtype, device=t.device) for n, t in self.live.items()}
        self.k = k
        self.task = task
        self.batches = task.eval_batches("test", self.device, batch_size)
        self.keep, self.scored_targets, self.clusters = _scored_positions(self.batches)
        self.targets = torch.cat(self.scored_targets).cpu()
        self.probe = task.eval_batches("val", "cpu", None)[0].select(slice(0, probe)).to(self.device)
        self.batched = batched
        self.hidden_states = hasattr(getattr(self.model, "config", None), "output_hidden_states")
        blocks = None if self.hidden_states else _first_module_list(self.model)
        self.blocks = [f"{blocks[0]}.{i}" for i in range(len(blocks[1]))] if blocks else []
        self.layer_names: list[str] = []

    def run(self, dirs: Sequence[Path], diversity: bool = False) -> StepOutputs:
        """Load the K checkpoints `dirs` and return per-token KL/NLL and probe activations."""
        hooked = []
        with torch.no_grad():
            for i, d in enumerate(dirs):
                load_into(self.model, load_state(d, device=self.device), d)
                for name, t in self.live.items():
                    self.stacked[name][i].copy_(t)
                if self.blocks:  # hooks cannot see through vmap; the probe is small
                    hooked.append(layer_outputs(self.model, self.probe, self.task, self.blocks))
            kls, nlls, divs = [], [], []
            pair_sums = torch.zeros(self.k, self.k, dtype=torch.float64)
            for batch, keep, tgt in zip(self.batches, self.keep, self.scored_targets):
                logp = self._logp(batch, keep)
                pair = metrics.pairwise_kl(logp)
                pair_sums += pair.double().sum(-1).cpu()
                kls.append(metrics.expected_kl(logp, pair))
                nlls.append(-logp.gather(-1, tgt.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1))
                if diversity:
                    divs.append((len(tgt), metrics.ensemble_diversity(logp, tgt)))
            activations = self._hidden_states(self.probe.inputs) if self.hidden_states else self._hooked(hooked)
        return StepOutputs(torch.cat(kls).cpu(), torch.cat(nlls, 1).cpu(), pair_sums / len(self.targets),
                           activations, _merge_diversity(divs) if diversity else None)

    def _stack(self, fn: Callable[[Callable[..., Any], dict[str, torch.Tensor]], torch.Tensor],
               inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """fn(model, inputs) [K, ...] for the K stacked states: one vmap, or one seed at a time."""

        def call(state, x):
            return fn(lambda **kw: functional_call(self.model, state, (), kw), x)

        if self.batched:
            return vmap(call, in_dims=(0, None))(self.stacked, inputs)
        return torch.stack([call({n: t[i] for n, t in self.stacked.items()}, inputs) for i in range(self.k)])

    def _logp(self, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
        """fp32 log-probs [K, N, V] of the scored positions (`keep`) of `batch`."""
        kind, logits = self.task.kind, self.task.logits
        flat = self._stack(lambda m, x: scored_pairs(kind, logits(m(**x)), batch)[0], batch.inputs)
        return flat.log_softmax(-1)[:, keep]

    def _hidden_states(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer [K, tokens, features] of the HF hidden states on the probe (float32, CPU)."""
        hidden = self._stack(lambda m, x: torch.stack(m(**x, output_hidden_states=True).hidden_states), inputs)
        self.layer_names = ["embed"] + [f"layer{i}" for i in range(1, hidden.shape[1])]
        return [h.reshape(h.shape[0], -1, h.shape[-1]).float().cpu() for h in hidden.unbind(1)]

    def _hooked(self, per_seed: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per block [K, examples, features] from each seed's hooked outputs; [] when there are no blocks."""
        self.layer_names = list(per_seed[0]) if per_seed else []
        return [torch.stack([outs[n] for outs in per_seed]).cpu() for n in self.layer_names]


def _scored_positions(batches: list[Batch]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per batch the mask of scored positions and their targets; each scored token's context (CPU)."""
    keep, targets, clusters, offset = [], [], [], 0
    for batch in batches:
        flat = batch.targets.reshape(-1)
        ctx = torch.arange(offset, offset + len(batch), device=flat.device)
        ctx = ctx.repeat_interleave(flat.numel() // len(batch))
        keep.append(flat != IGNORE_INDEX)
        targets.append(flat[keep[-1]])
        clusters.append(ctx[keep[-1]])
        offset += len(batch)
    return keep, targets, torch.cat(clusters).cpu()


def finite_mean(values: list[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none); `converge` notes the layers left out."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _others_mean(pairs: torch.Tensor) -> list[float]:
    """Per seed, the mean of its row of a [K, K] pair matrix without the diagonal."""
    k = pairs.shape[0]
    return ((pairs.sum(1) - pairs.diagonal()) / (k - 1)).tolist()


def _by_seed(per_layer: list[list[float]], k: int) -> list[list[float]]:
    """[layer][seed] -> [seed][layer]."""
    return [list(row) for row in zip(*per_layer)] if per_layer else [[] for _ in range(k)]


def _first_module_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The first `nn.ModuleList` in the model (its blocks), by registration order."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)), None)


def _merge_diversity(parts: list[tuple[int, list[dict[str, float]]]]) -> list[dict[str, float]]:
    total = sum(n for n, _ in parts)
    rows = []
    for k, first in enumerate(parts[0][1]):
        rows.append({key: (first[key] if key == "seeds" else sum(n * p[k][key] for n, p in parts) / total)
                     for key in first})
    return rows


# -- the result ---------------------------------------------------------------------------------


@dataclass
class StepMetrics:
    """Summaries of one step (every value a plain number or list)."""

    step: int
    kl: float
    kl_se: float
    kl_pairs: list[list[float]]  # [i][j] mean KL(p_i ‖ p_j)
    strata: dict[str, list[dict[str, Any]]]
    similarity: dict[str, list[float]]  # kind (fingerprints.SIMILARITIES) -> per layer, mean over seed pairs
    similarity_seed: dict[str, list[list[float]]]  # kind -> [seed][layer], mean over the other seeds
    losses: list[float]  # per seed
    loss: dict[str, float]  # mean, std, cv


@dataclass
class ConvergeResult:
    """Everything `converge` measured; `to_dict()` for JSON (`report.render` for the terminal)."""

    runs: list[str]
    steps: list[int]
    missing_steps: dict[str, list[int]]
    layers: list[str]
    per_step: list[StepMetrics]
    phases: PhaseFit
    regimes: Regimes | None
    diversity: list[dict[str, float]]
    notes: list[str] = field(default_factory=list)
    regimes_from: str = fingerprints.DEFAULT  # the similarity whose per-seed curves give the regimes

    def series(self, name: str) -> list[Any]:
        return [getattr(s, name) for s in self.per_step]

    def similarity(self, kind: str, per_seed: bool = False) -> list[Any]:
        """One similarity over steps: [step][layer] (mean over pairs) or [step][seed][layer]."""
        return [(s.similarity_seed if per_seed else s.similarity)[kind] for s in self.per_step]

    def to_dict(self) -> dict[str, Any]:
        p = self.per_step
        strata = {}
        for kind in p[0].strata:
            strata[kind] = [
                {"stratum": row["stratum"], "count": row["count"],
                 "mean": [s.strata[kind][r]["mean"] for s in p], "se": [s.strata[kind][r]["se"] for s in p]}
                for r, row in enumerate(p[0].strata[kind])
            ]
        return {
            "runs": self.runs,
            "steps": self.steps,
            "missing_steps": self.missing_steps,
            "kl": {"mean": self.series("kl"), "se": self.series("kl_se"), "pairs": self.series("kl_pairs"),
                   "strata": strata},
            "fingerprints": {"layers": self.layers, "labels": fingerprints.LABELS,
                             "basis_free": list(fingerprints.BASIS_FREE),
                             "basis_dependent": list(fingerprints.BASIS_DEPENDENT),
                             "mean": {k: self.similarity(k) for k in fingerprints.SIMILARITIES},
                             "per_seed": {k: self.similarity(k, True) for k in fingerprints.SIMILARITIES}},
            "loss": {"per_seed": self.series("losses"), "mean": [s.loss["mean"] for s in p],
                     "std": [s.loss["std"] for s in p],
                     "std_is": "sample std (ddof=1) over seeds; std and CV null (undefined) with one seed"},
            "loss_cv": [s.loss["cv"] for s in p],
            "phases": self.phases.to_dict(),
            "regimes": {**self.regimes.to_dict(), "source": self.regimes_from} if self.regimes else None,
            "diversity": self.diversity,
            "notes": self.notes,
        }


# -- the analysis -------------------------------------------------------------------------------


def _layer_summaries(activations: list[torch.Tensor], k: int) -> tuple[dict[str, list], dict[str, list]]:
    """Per similarity kind: per layer the mean over seed pairs, and [seed][layer] the mean over the other seeds."""
    means, seeds = {}, {}
    for kind, fn in fingerprints.SIMILARITIES.items():
        pairs = [metrics.pair_matrix(list(acts.unbind(0)), fn) for acts in activations]
        means[kind] = [metrics.mean_over_pairs(m) for m in pairs]
        seeds[kind] = _by_seed([_others_mean(m) for m in pairs], k)
    return means, seeds


def _strata_labels(task: Task, targets: torch.Tensor, final_nll: torch.Tensor, classes: str | Path | None,
                   counts_file: str | Path | None, notes: list[str]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Per kind of strata: the stratum of every scored token (the same at every step), and the names.

    Frequency: log-decade of the target's count in `counts_file` (else in the task's training
    stream); surprisal: bin of each token's seed-mean surprisal at the final step; classes: the
    user's token classes of the target.
    """
    strata = {}
    counts = load_counts(counts_file, task) if counts_file is not None else train_counts(task)
    if counts is not None:
        buckets, names = metrics.frequency_buckets(counts)
        strata["frequency"] = (buckets[targets], names)
    else:
        notes.append("frequency strata skipped: the task has no training token stream")
    strata["surprisal"] = (metrics.surprisal_bins(final_nll.mean(0)), list(metrics.SURPRISAL_BINS))
    if classes is not None:
        class_of, class_names = load_classes(classes, task)
        strata["classes"] = (class_of[targets], class_names)
    return strata


def _step_metrics(step: int, out: StepOutputs, strata: dict, clusters: torch.Tensor, k: int) -> StepMetrics:
    """The summaries of one step from its per-token outputs and probe activations."""
    kl_mean, kl_se = metrics.clustered_mean(out.kl, clusters)
    losses = out.nll.double().mean(1)
    similarity, similarity_seed = _layer_summaries(out.activations, k)
    return StepMetrics(
        step=step, kl=kl_mean, kl_se=kl_se, kl_pairs=out.pair_kl.tolist(),
        strata={kind: metrics.stratified_means(out.kl, labels, clusters, names)
                for kind, (labels, names) in strata.items()},
        similarity=similarity, similarity_seed=similarity_seed,
        losses=losses.tolist(), loss=metrics.loss_spread(losses),
    )


def _nan_layer_notes(layers: list[str], per_step: list[StepMetrics]) -> list[str]:
    """A note naming the layers whose similarities are NaN at some step (never dropped silently)."""
    undefined = [name for i, name in enumerate(layers)
                 if any(math.isnan(v[i]) for p in per_step for v in p.similarity.values())]
    if not undefined:
        return []
    return [f"a fingerprint or CKA is NaN (a constant representation) at layer(s) {', '.join(undefined)}; "
            "means over layers and the regimes leave those values out"]


def _regimes(steps: list[int], per_step: list[StepMetrics], source: str, k: int, notes: list[str]) -> Regimes:
    """Seed regimes from each seed's curve (mean over layers) of the chosen per-seed similarity."""
    curves = torch.tensor([[finite_mean(p.similarity_seed[source][i]) for p in per_step] for i in range(k)])
    notes.append(f"regimes: from each seed's {fingerprints.LABELS[source]} to the other seeds (mean over layers)")
    return seed_regimes(steps, curves)


def _evaluate_steps(evaluator: Evaluator, runs: list[Run], chosen: list[int],
                    strata_inputs: tuple[str | Path | None, str | Path | None, list[str]],
                    progress: Callable[[int, int], None] | None) -> tuple[list[StepMetrics], list[dict[str, float]]]:
    """Every chosen step reduced to its summaries as soon as it is evaluated, the final step first
    (its surprisal defines the strata of every step); and the ensemble diversity at the final step.
    `strata_inputs` is (classes file, counts file, notes) for `_strata_labels`."""
    order = [chosen[-1], *chosen[:-1]]
    per_step, strata, diversity = {}, None, []
    for n, s in enumerate(order):
        out = evaluator.run([r.checkpoints[s] for r in runs], diversity=(s == chosen[-1]))
        if strata is None:
            strata = _strata_labels(evaluator.task, evaluator.targets, out.nll, *strata_inputs)
            diversity = out.diversity or []
        per_step[s] = _step_metrics(s, out, strata, evaluator.clusters, evaluator.k)
        del out  # per-token values and activations are not kept across steps
        if progress:
            progress(n + 1, len(order))
    return [per_step[s] for s in chosen], diversity


def converge(
    runs: Sequence[str | Path],
    task: Task | str | None = None,
    *,
    task_options: dict[str, Any] | None = None,
    steps: Sequence[int] | None = None,
    classes: str | Path | None = None,
    counts: str | Path | None = None,
    probe: int = 16,
    batch_size: int = 16,
    device: str = "cpu",
    batched: bool = True,
    regimes_from: str = fingerprints.DEFAULT,
    progress: Callable[[int, int], None] | None = None,
) -> ConvergeResult:
    """Analyse how K >= 2 runs differing in seed converge: per common step KL, activation similarities,
    loss spread; then phases of the KL curve, seed regimes and ensemble diversity (final step).

    `task` defaults to the first lmctk run's manifest task. Frequency strata count tokens in `counts`
    (a per-id count file) or the task's training stream; surprisal strata use the seeds' mean
    surprisal at the last common step. Seed regimes come from the per-seed curves of the similarity
    `regimes_from` (default: the basis-free Gram cosine; see `lmctk.dynamics.fingerprints`).
    """
    fingerprints.check_kind(regimes_from)
    opened = [Run.open(r) for r in runs]
    if len(opened) < 2:
        raise ConfigError(f"converge needs at least 2 runs (seeds), got {len(opened)}")
    chosen, missing = common_steps(opened, steps)
    task = resolve_task(task, task_options, runs, checkpoints=[r.checkpoints[chosen[0]] for r in opened])
    k = len(opened)
    evaluator = Evaluator(checkpoint_skeleton(opened[0].checkpoints[chosen[0]], task), k, task, device=device,
                          batch_size=batch_size, probe=probe, batched=batched)
    notes: list[str] = []
    per_step, diversity = _evaluate_steps(evaluator, opened, chosen, (classes, counts, notes), progress)
    notes.append(f"surprisal bins: each token's surprisal averaged over the {k} seeds at the final common step "
                 f"{chosen[-1]}")
    layers = evaluator.layer_names
    if not layers:
        notes.append("fingerprints and CKA skipped: the model exposes no hidden states or nn.ModuleList blocks")
    notes += _nan_layer_notes(layers, per_step)
    phases = detect_phases(chosen, [p.kl for p in per_step])
    regimes = _regimes(chosen, per_step, regimes_from, k, notes) if layers and len(chosen) >= 2 else None
    if not evaluator.batched:
        notes.append("seeds evaluated one at a time (batched=False)")
    return ConvergeResult([str(r.path) for r in opened], chosen, missing, layers, per_step, phases, regimes,
                          diversity, notes, regimes_from)
