"""Activation matching: permutations of B's groups that maximise the correlation of A's and B's
activations at each group's sites on training batches, found by the same coordinate descent as weight
matching (the correlations play the role of the weights)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.func import functional_call

from lmctk.basin import lap
from lmctk.basin.align import weight_matching
from lmctk.basin.match import MatchResult
from lmctk.errors import ConfigError
from lmctk.io import state_device
from lmctk.spec.core import PermutationSpec, group_slices, groups_in, identity_perms

State = Mapping[str, torch.Tensor]

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


def unit_correlation(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [d_a, d_b] of A's and B's units (columns of fa, fb) over the same rows (float64)."""
    acc = _CrossCorrelation()
    acc.update(fa, fb)
    return acc.correlation()


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
def site_correlations(model: torch.nn.Module, sites: dict[str, tuple[int, Any]], a: State, b: State,
                      batches: list) -> dict[str, torch.Tensor]:
    """Per activation site, the correlation matrix of A's units (rows) with B's units (columns)."""
    stats = {name: _CrossCorrelation() for name in sites}
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, _features(out, sites[name][0])))
        for name in sites]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            functional_call(model, dict(a), args=(), kwargs=batch.inputs, tie_weights=False)
            feats_a = dict(captured)
            functional_call(model, dict(b), args=(), kwargs=batch.inputs, tie_weights=False)
            for name in sites:
                stats[name].update(feats_a[name], captured[name])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: stats[name].correlation().float().cpu() for name in sites}


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
    progress: Callable[[int, int | None], None] | None = None,
) -> MatchResult:
    """Permutations of B's groups that maximise the correlation of A's and B's activations.

    Activations are recorded (hooks) at every module whose outputs carry a group, on the task's
    fixed `split` batches (at most `max_batches`); the summed per-site correlations are then
    maximised over all groups jointly by the same coordinate descent as weight matching (`progress`
    as there: after every sweep).
    """
    start = time.perf_counter()
    sites = activation_sites(model, spec)
    missing = sorted(set(spec.groups) - {g for _, layout in sites.values() for g in groups_in(layout)})
    if missing:
        raise ConfigError(f"activation matching: no activation site carries group(s) {', '.join(missing)}; "
                          "use weight matching for this architecture")
    batches = task.eval_batches(split, device=state_device(a), batch_size=batch_size)[:max_batches]
    correlations = site_correlations(model, sites, a, b, batches)
    sim_time = time.perf_counter() - start
    # Σ_sites Σ_p C[p, π(p)] is weight matching between identity matrices and the correlations:
    # one coordinate-descent mechanism, so groups sharing an axis (heads, within-head) are solved jointly.
    corr_spec = PermutationSpec(spec.groups, {name: (None, layout) for name, (_, layout) in sites.items()},
                                name=f"{spec.name} activations", blocks=spec.blocks)
    identities = {name: torch.eye(c.shape[0]) for name, c in correlations.items()}
    users = corr_spec.users()
    init = identity_perms(spec)  # per-block groups are found with their heads by the joint step
    init.update({g: lap.solve(_pooled_similarity(corr_spec, correlations, g, users[g]), backend=lap_backend)
                 for g in spec.groups if g not in spec.blocks})
    matched = weight_matching(corr_spec, identities, correlations, init=init, seed=seed, lap_backend=lap_backend,
                              progress=progress)
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


