"""Are A and B in one basin? Exact batched linear assignment (`lap`), permutation alignment by weight or
activation matching (`align`, `activation`), interpolation paths and their evaluation engines (`path`), barrier sweeps
and matrices (`barrier`), BatchNorm reset / REPAIR along a path (`renorm`), and permutations and
permuted models on disk (`saved`)."""

from lmctk.basin.activation import activation_matching
from lmctk.basin.align import apply, weight_matching
from lmctk.basin.barrier import (
    ALIGNS,
    DEFINITIONS,
    BarrierMatrix,
    BarrierResult,
    Curve,
    align_states,
    barrier_matrix,
    barrier_sweep,
    barriers,
)
from lmctk.basin.match import MatchResult
from lmctk.basin.path import METHODS, alpha_grid, evaluate_path, lerp
from lmctk.basin.renorm import RENORMS
from lmctk.basin.saved import (
    PERMS_NAME,
    PermutedView,
    load_perms,
    save_aligned,
    save_perms,
)

__all__ = [
    "ALIGNS", "DEFINITIONS", "METHODS", "PERMS_NAME", "RENORMS", "BarrierMatrix", "BarrierResult", "Curve", "MatchResult",
    "PermutedView", "activation_matching", "align_states", "alpha_grid", "apply", "barrier_matrix", "barrier_sweep",
    "barriers", "evaluate_path", "lerp", "load_perms", "save_aligned", "save_perms", "weight_matching",
]
