"""Seed convergence over training: K runs → common checkpoint steps → per-step metrics and phases.

For every step present in all runs, the K models are evaluated together (parameters stacked,
`torch.func.vmap` over `functional_call`) on the task's fixed test set and a probe batch:
expected per-token KL over ordered seed pairs (fp32, SE over contexts, strata), per-layer
activation fingerprints and debiased linear CKA, loss spread. Then `lmctk.phases` segments the KL
curve and labels seed regimes. Computation returns a `ConvergeResult`; rendering is its `__rich__`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from lmctk import metrics
from lmctk.errors import ConfigError, KeyMismatchError, MissingPathError
from lmctk.io import load_state
from lmctk.phases import PhaseFit, Regimes, detect_phases, seed_regimes
from lmctk.tasks import Task, get_task
from lmctk.tasks.base import IGNORE_INDEX, Batch
from lmctk.train import TrainConfig, model_skeleton

_STEP_NAME = re.compile(r"(?:step|checkpoint-)(\d+)")
OTHER_CLASS = "other"


# -- inputs: runs and their checkpoints ---------------------------------------------------------


@dataclass
class Run:
    """One seed's checkpoints over training: step -> checkpoint dir, and how to build its model."""

    path: Path
    checkpoints: dict[int, Path]
    build: Callable[[], nn.Module]
    task_spec: tuple[str, dict[str, Any]] | None = None  # (name, options) from an lmctk manifest

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """An lmctk run dir (manifest + checkpoints/stepNNNNNNNN) or a dir of HF dirs named `step<N>`
        or `checkpoint-<N>` (as multi-seed suites publish them)."""
        path = Path(path)
        if not path.is_dir():
            raise MissingPathError(path, "run directory")
        if (path / "manifest.json").is_file():
            from lmctk.rundir import RunDir

            run = RunDir.open(path)
            config = TrainConfig.from_dict(run.manifest()["config"])
            steps = {s: run.checkpoint_dir(s) for s in run.checkpoint_steps()}
            task = get_task(config.task, **config.task_options)
            return cls(path, steps, lambda: model_skeleton(config, task), (config.task, config.task_options))
        steps = {int(m[1]): d for d in path.iterdir() if d.is_dir() and (m := _STEP_NAME.fullmatch(d.name))}
        if not steps:
            raise ConfigError(
                f"{path}: no checkpoints found; give an lmctk run dir or a dir of step<N>/ HF model dirs"
            )
        first = steps[min(steps)]
        if not (first / "config.json").is_file():
            raise ConfigError(f"{first}: no config.json; HF step dirs need one to rebuild the model")
        return cls(path, steps, lambda: _hf_skeleton(first))


def _hf_skeleton(directory: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def common_steps(runs: Sequence[Run], wanted: Sequence[int] | None = None) -> tuple[list[int], dict[str, list[int]]]:
    """Steps present in every run (restricted to `wanted`), and per run the steps it lacks that
    another run has (reported, never guessed)."""
    every = set.union(*(set(r.checkpoints) for r in runs))
    shared = set.intersection(*(set(r.checkpoints) for r in runs))
    missing = {str(r.path): sorted(every - set(r.checkpoints)) for r in runs}
    if wanted is not None:
        absent = sorted(set(wanted) - shared)
        if absent:
            raise ConfigError(
                f"--steps: step {absent[0]} is not in every run; common steps: {', '.join(map(str, sorted(shared)))}"
            )
        shared = set(wanted)
    if not shared:
        raise ConfigError("the runs share no checkpoint step; give runs saved at the same steps")
    return sorted(shared), {k: v for k, v in missing.items() if v}


def load_classes(path: str | Path, task: Task) -> tuple[torch.Tensor, list[str]]:
    """Token classes from a file: JSON {"token": "class"} or lines `token<TAB>class`.

    A token is its text (as the task decodes a single id) or `id:<N>`. Tokens not listed are class
    "other". Returns the class index of every vocabulary id and the class names.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(path, "token-class file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path}: expected a JSON object mapping token to class ({e})") from None
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            token, sep, cls = line.rpartition("\t")
            if not sep:
                raise ConfigError(f"{path}:{n}: expected 'token<TAB>class'")
            pairs.append((token, cls.strip()))
    vocab = _vocab_size(task)
    decode = getattr(task, "decode", None)
    by_text: dict[str, int] = {}
    if decode is not None:
        for i in range(vocab):
            by_text.setdefault(decode(torch.tensor([i])), i)
    names = [OTHER_CLASS]
    labels = torch.zeros(vocab, dtype=torch.long)
    for token, cls in pairs:
        if token.startswith("id:") and token[3:].isdigit():
            idx = int(token[3:])
        elif token in by_text:
            idx = by_text[token]
        else:
            raise ConfigError(f"{path}: token {token!r} is not a single token of task {task.name!r}; "
                              "write it as the task decodes it or as id:<N>")
        if idx >= vocab:
            raise ConfigError(f"{path}: token id {idx} is outside the vocabulary ({vocab})")
        if cls not in names:
            names.append(cls)
        labels[idx] = names.index(cls)
    return labels, names


def _vocab_size(task: Task) -> int:
    options = task.model_options()
    for key in ("vocab_size", "num_classes", "classes"):
        if key in options:
            return int(options[key])
    raise ConfigError(f"task {task.name!r}: no vocab_size in model_options(); token strata need one")


def train_counts(task: Task) -> torch.Tensor | None:
    """Count of every token id in the task's training stream (None when the task has no stream)."""
    windows = getattr(task, "windows", None)
    ids = windows["train"].reshape(-1) if isinstance(windows, dict) and "train" in windows else None
    if ids is None and getattr(task, "tokens", None) is not None:
        ids = task.tokens.ids
    if ids is None:
        return None
    return torch.bincount(ids.long(), minlength=_vocab_size(task))


# -- evaluating K seeds at one step -------------------------------------------------------------


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load strictly, except that keys tied to a loaded one (e.g. lm_head ↔ embeddings) may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyMismatchError(f"{where}: {len(unexpected)} tensors the model does not have (e.g. {unexpected[0]}); "
                               "the runs must share one architecture")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise KeyMismatchError(f"{where}: checkpoint lacks {len(untied)} tensors (e.g. {untied[0]}); "
                               "the runs must share one architecture")


@dataclass
class StepOutputs:
    """Per-token and per-layer values of the K seeds at one step, before any summary."""

    kl: torch.Tensor  # [N] expected KL over ordered pairs per scored token
    nll: torch.Tensor  # [K, N]
    targets: torch.Tensor  # [N]
    clusters: torch.Tensor  # [N] context (example) index
    pair_kl: torch.Tensor  # [K, K] mean KL(p_i ‖ p_j) over the scored tokens
    activations: list[torch.Tensor]  # per layer [K, rows, features] on the probe batch
    diversity: list[dict[str, float]] | None = None


class Evaluator:
    """Holds K model copies of one architecture; `run(dirs)` evaluates them together.

    Per-layer activations come from HF `hidden_states` (rows = tokens) or, for other models, from
    forward hooks on the first `nn.ModuleList` (e.g. MLP `hidden`, CNN `blocks`; rows = examples).
    """

    def __init__(self, build: Callable[[], nn.Module], k: int, task: Task, *, device: str = "cpu",
                 batch_size: int = 16, probe: int = 16, batched: bool = True) -> None:
        self.device = torch.device(device)
        base = build().to(self.device).eval()
        self.models = [base] + [copy.deepcopy(base) for _ in range(k - 1)]
        self.task = task
        self.batches = task.eval_batches("test", self.device, batch_size)
        probe_split = "val" if _has_split(task, "val") else "test"
        self.probe = task.eval_batches(probe_split, self.device, None)[0].select(slice(0, probe))
        self.batched = batched
        self.hidden_states = hasattr(getattr(base, "config", None), "output_hidden_states")
        self.block_list = None if self.hidden_states else _first_module_list(base)
        self.layer_names: list[str] = []

    def run(self, dirs: Sequence[Path], diversity: bool = False) -> StepOutputs:
        """Load the K checkpoints `dirs` and return per-token KL/NLL and probe activations."""
        for model, d in zip(self.models, dirs):
            _load_into(model, load_state(d, device=self.device), d)
        if self.batched:
            self._stacked = stack_module_state(self.models)
        kls, nlls, targets, clusters, divs, offset = [], [], [], [], [], 0
        k = len(self.models)
        pair_sums = torch.zeros(k, k, dtype=torch.float64)
        with torch.no_grad():
            for batch in self.batches:
                logp, tgt, ctx = self._scored(self._logits(batch.inputs), batch, offset)
                offset += len(batch)
                pair = metrics.pairwise_kl(logp)
                pair_sums += pair.double().sum(-1).cpu()
                kls.append(pair.sum((0, 1)) / (k * (k - 1)))
                nlls.append(-logp.gather(-1, tgt.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1))
                targets.append(tgt)
                clusters.append(ctx)
                if diversity:
                    divs.append((len(tgt), metrics.ensemble_diversity(logp, tgt)))
            activations = self._activations(self.probe.inputs)
        count = sum(len(t) for t in targets)
        return StepOutputs(torch.cat(kls).cpu(), torch.cat(nlls, 1).cpu(), torch.cat(targets).cpu(),
                           torch.cat(clusters).cpu(), pair_sums / count, activations,
                           _merge_diversity(divs) if diversity else None)

    def _stack(self, fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any], inputs: dict[str, torch.Tensor]):
        """fn(model, inputs) for the K models: one vmap over stacked parameters, or a loop."""
        if not self.batched:
            outs = [fn(m, inputs) for m in self.models]
            return tuple(map(torch.stack, zip(*outs))) if isinstance(outs[0], tuple) else torch.stack(outs)
        base = self.models[0]
        params, buffers = self._stacked

        def call(p, b, x):
            return fn(lambda **kw: functional_call(base, (p, b), (), kw), x)

        return vmap(call, in_dims=(0, 0, None))(params, buffers, inputs)

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._stack(lambda m, x: self.task.logits(m(**x)), inputs)

    def _activations(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per layer [K, rows, features] on the probe inputs (float32, CPU); [] when none are exposed."""
        if self.hidden_states:
            hidden = self._stack(lambda m, x: torch.stack(m(**x, output_hidden_states=True).hidden_states), inputs)
            self.layer_names = ["embed"] + [f"layer{i}" for i in range(1, hidden.shape[1])]
            return [h.reshape(h.shape[0], -1, h.shape[-1]).float().cpu() for h in hidden.unbind(1)]
        if self.block_list is None:
            return []
        name, _ = self.block_list
        per_model = []
        for model in self.models:  # hooks cannot see through vmap; the probe is small
            captured: list[torch.Tensor] = []
            blocks = model.get_submodule(name)
            handles = [b.register_forward_hook(lambda mod, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
                       for b in blocks]
            try:
                model(**inputs)
            finally:
                for h in handles:
                    h.remove()
            per_model.append(captured)
        self.layer_names = [f"{name}.{i}" for i in range(len(per_model[0]))]
        return [torch.stack([acts[i] for acts in per_model]).flatten(2).float().cpu() for i in range(len(per_model[0]))]

    def _scored(self, logits: torch.Tensor, batch: Batch, offset: int):
        """fp32 log-probs [K, N, V] of the scored positions, their targets [N] and contexts [N]."""
        if self.task.kind == "causal_lm":
            logits = logits[:, :, :-1]
        targets = batch.targets
        ctx = torch.arange(offset, offset + len(batch), device=targets.device)
        ctx = ctx.reshape(-1, *([1] * (targets.dim() - 1))).expand_as(targets).reshape(-1)
        targets = targets.reshape(-1)
        keep = targets != IGNORE_INDEX
        logp = logits.reshape(logits.shape[0], -1, logits.shape[-1]).float().log_softmax(-1)
        return logp[:, keep], targets[keep], ctx[keep]


def finite_mean(values: list[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
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


def _has_split(task: Task, split: str) -> bool:
    try:
        return len(task.eval_batches(split, "cpu", None)) > 0
    except ConfigError:
        return False


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
    fingerprint_raw: list[float]  # per layer, mean over seed pairs
    fingerprint_centred: list[float]
    fingerprint_seed: list[list[float]]  # [seed][layer] centred, mean over the other seeds
    cka: list[float]  # per layer, debiased linear CKA, mean over seed pairs
    cka_seed: list[list[float]]  # [seed][layer] CKA to the other seeds, mean over them
    losses: list[float]  # per seed
    loss: dict[str, float]  # mean, std, cv


@dataclass
class ConvergeResult:
    """Everything `converge` measured; `to_dict()` for JSON, `__rich__` for the terminal."""

    runs: list[str]
    steps: list[int]
    missing_steps: dict[str, list[int]]
    layers: list[str]
    per_step: list[StepMetrics]
    phases: PhaseFit
    regimes: Regimes | None
    diversity: list[dict[str, float]]
    notes: list[str] = field(default_factory=list)
    regimes_from: str = "fingerprint"  # the per-seed curves the regimes come from: fingerprint | cka

    def series(self, name: str) -> list[float]:
        return [getattr(s, name) for s in self.per_step]

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
            "fingerprint_cosine": {"layers": self.layers, "raw": self.series("fingerprint_raw"),
                                   "centred": self.series("fingerprint_centred"),
                                   "per_seed_centred": self.series("fingerprint_seed")},
            "cka": {"layers": self.layers, "debiased_linear": self.series("cka"),
                    "per_seed": self.series("cka_seed")},
            "loss": {"per_seed": self.series("losses"), "mean": [s.loss["mean"] for s in p],
                     "std": [s.loss["std"] for s in p]},
            "loss_cv": [s.loss["cv"] for s in p],
            "phases": self.phases.to_dict(),
            "regimes": {**self.regimes.to_dict(), "source": self.regimes_from} if self.regimes else None,
            "diversity": self.diversity,
            "notes": self.notes,
        }

    def __rich__(self):
        from lmctk.converge_report import render

        return render(self)


# -- the analysis -------------------------------------------------------------------------------


def _layer_summaries(activations: list[torch.Tensor]) -> dict[str, list]:
    """Per layer: fingerprint cosine (raw, centred) and debiased CKA, mean over seed pairs and per seed."""
    stats: dict[str, list] = {"raw": [], "centred": [], "cka": [], "seed_fp": [], "seed_cka": []}
    for acts in activations:
        items = list(acts.unbind(0))
        stats["raw"].append(metrics.mean_over_pairs(metrics.pair_matrix(items, metrics.fingerprint_cosine)))
        cen = metrics.pair_matrix(items, lambda a, b: metrics.fingerprint_cosine(a, b, centred=True))
        stats["centred"].append(metrics.mean_over_pairs(cen))
        stats["seed_fp"].append(_others_mean(cen))
        ckas = metrics.pair_matrix(items, metrics.linear_cka)
        stats["cka"].append(metrics.mean_over_pairs(ckas))
        stats["seed_cka"].append(_others_mean(ckas))
    return stats


StrataLabels = dict[str, tuple[Callable[[StepOutputs], torch.Tensor], list[str]]]


def _strata_labels(task: Task, final: StepOutputs, classes: str | Path | None, notes: list[str]) -> StrataLabels:
    """Per kind of strata: how to label a step's scored tokens, and the stratum names.

    Frequency: log-decade of the target's count in the training stream; surprisal: bin of each
    token's seed-mean surprisal at the final step (tokens are in the same order at every step);
    classes: the user's token classes of the target.
    """
    labels: StrataLabels = {}
    counts = train_counts(task)
    if counts is not None:
        buckets, names = metrics.frequency_buckets(counts)
        labels["frequency"] = (lambda o: buckets[o.targets], names)
    else:
        notes.append("frequency strata skipped: the task has no training token stream")
    bins = metrics.surprisal_bins(final.nll.mean(0))
    labels["surprisal"] = (lambda o: bins, list(metrics.SURPRISAL_BINS))
    if classes is not None:
        class_of, class_names = load_classes(classes, task)
        labels["classes"] = (lambda o: class_of[o.targets], class_names)
    return labels


def _strata(out: StepOutputs, strata_labels: StrataLabels) -> dict[str, list[dict[str, Any]]]:
    """KL per stratum (count, mean, SE) for every kind of strata."""
    result = {}
    for kind, (labels_of, names) in strata_labels.items():
        labels = labels_of(out)
        result[kind] = metrics.stratified_means(out.kl, labels, out.clusters, names)
    return result


def converge(
    runs: Sequence[str | Path],
    task: Task | str | None = None,
    *,
    task_options: dict[str, Any] | None = None,
    steps: Sequence[int] | None = None,
    classes: str | Path | None = None,
    probe: int = 16,
    batch_size: int = 16,
    device: str = "cpu",
    batched: bool = True,
    regimes_from: str = "fingerprint",
    progress: Callable[[int, int], None] | None = None,
) -> ConvergeResult:
    """Analyse how K >= 2 runs differing in seed converge: per common step KL, fingerprints, CKA,
    loss spread; then phases of the KL curve, seed regimes and ensemble diversity (final step).

    `task` defaults to the first lmctk run's manifest task. Surprisal strata use the seeds' mean
    surprisal of each token at the last common step. Seed regimes come from the per-seed centred
    fingerprint curves (`regimes_from="fingerprint"`) or, for seeds with different inits whose raw
    activations are unaligned, from per-seed CKA curves (`"cka"`).
    """
    if regimes_from not in ("fingerprint", "cka"):
        raise ConfigError(f"regimes_from: unknown {regimes_from!r}; choose fingerprint or cka")
    opened = [Run.open(r) for r in runs]
    if len(opened) < 2:
        raise ConfigError(f"converge needs at least 2 runs (seeds), got {len(opened)}")
    if task is None or isinstance(task, str):
        name, options = (task, task_options or {}) if task else (None, {})
        if name is None:
            spec = next((r.task_spec for r in opened if r.task_spec), None)
            if spec is None:
                raise ConfigError("--task: the runs have no lmctk manifest; name the task they were trained on")
            name, options = spec[0], {**spec[1], **(task_options or {})}
        task = get_task(name, **options)
    chosen, missing = common_steps(opened, steps)
    k = len(opened)
    evaluator = Evaluator(opened[0].build, k, task, device=device, batch_size=batch_size, probe=probe,
                          batched=batched)
    notes = []
    # the final step first: its surprisal defines the surprisal strata of every step
    order = [chosen[-1], *chosen[:-1]]
    outputs: dict[int, StepOutputs] = {}
    layer_stats: dict[int, dict[str, list]] = {}
    for n, s in enumerate(order):
        out = evaluator.run([r.checkpoints[s] for r in opened], diversity=(s == chosen[-1]))
        layer_stats[s] = _layer_summaries(out.activations)
        out.activations = []  # summarised: keep only per-token vectors across steps
        outputs[s] = out
        if progress:
            progress(n + 1, len(order))
    final = outputs[chosen[-1]]
    strata_labels = _strata_labels(task, final, classes, notes)
    notes.append(f"surprisal bins: each token's surprisal averaged over the {k} seeds at the final common step "
                 f"{chosen[-1]}")
    layers = evaluator.layer_names
    if not layers:
        notes.append("fingerprints and CKA skipped: the model exposes no hidden states or nn.ModuleList blocks")
    per_step = []
    for s in chosen:
        out = outputs[s]
        kl_mean, kl_se = metrics.clustered_mean(out.kl, out.clusters)
        losses = out.nll.double().mean(1)
        lay = layer_stats[s]
        per_step.append(StepMetrics(
            step=s, kl=kl_mean, kl_se=kl_se, kl_pairs=out.pair_kl.tolist(), strata=_strata(out, strata_labels),
            fingerprint_raw=lay["raw"], fingerprint_centred=lay["centred"],
            fingerprint_seed=_by_seed(lay["seed_fp"], k), cka=lay["cka"], cka_seed=_by_seed(lay["seed_cka"], k),
            losses=losses.tolist(), loss=metrics.loss_spread(losses),
        ))
    phases = detect_phases(chosen, [p.kl for p in per_step])
    regimes = None
    if layers and len(chosen) >= 2:
        field_name = {"fingerprint": "fingerprint_seed", "cka": "cka_seed"}[regimes_from]
        curves = torch.tensor([[finite_mean(getattr(p, field_name)[i]) for p in per_step] for i in range(k)])
        regimes = seed_regimes(chosen, curves)
        what = "centred fingerprint cosine" if regimes_from == "fingerprint" else "debiased linear CKA"
        notes.append(f"regimes: from each seed's {what} to the other seeds (mean over layers)")
    if not evaluator.batched:
        notes.append("seeds evaluated one at a time (batched=False)")
    return ConvergeResult([str(r.path) for r in opened], chosen, missing, layers, per_step, phases, regimes,
                          final.diversity or [], notes, regimes_from)




# -- recipe: train K seeds, then analyse ---------------------------------------------------------


@dataclass
class ConvergeSpec:
    """The [converge] table: which seeds to train and how to analyse them."""

    seeds: list[int]
    log_checkpoints: int = 16  # log-spaced checkpoint steps (plus 0 and the last)
    probe: int = 16  # probe windows for fingerprints and CKA
    batch_size: int = 16  # eval batch (examples) per forward
    classes: str | None = None  # token-class file (relative to the recipe)
    regimes: Literal["fingerprint", "cka"] = "fingerprint"  # per-seed curves the regimes come from

    def __post_init__(self) -> None:
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: need at least 2 distinct seeds, got {self.seeds}")


@dataclass
class ConvergeRecipe:
    """`lmctk converge --recipe FILE --out DIR`: [converge] and [train] (TrainConfig fields but seed)."""

    converge: ConvergeSpec
    train: TrainConfig


def load_converge_recipe(path: str | Path) -> ConvergeRecipe:
    """Read a converge recipe strictly (unknown keys are errors naming the key path)."""
    from lmctk.recipes import load_recipe

    recipe = load_recipe(path, ConvergeRecipe)
    if recipe.train.checkpoints != [recipe.train.steps]:
        raise ConfigError(f"{path}: train.checkpoints: leave it out; converge.log_checkpoints sets them")
    if recipe.converge.classes is not None:
        recipe.converge.classes = str(Path(path).parent / recipe.converge.classes)
    return recipe


def train_seeds(recipe: ConvergeRecipe, out: str | Path, *, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Train one run per seed under `out/seed<N>`; a finished run with the same config is reused (an
    interrupted one resumed) unless `overwrite`, which trains afresh."""
    from lmctk.train import fit, log_spaced_steps

    out = Path(out)
    base = recipe.train.to_dict()
    base["checkpoints"] = log_spaced_steps(recipe.converge.log_checkpoints, recipe.train.steps)
    paths = []
    for n, seed in enumerate(recipe.converge.seeds):
        config = TrainConfig.from_dict({**base, "seed": seed})
        path = out / f"seed{seed}"
        fit(config, path, overwrite=overwrite, resume=not overwrite)
        paths.append(path)
        if progress:
            progress(n + 1, len(recipe.converge.seeds))
    return paths
