"""Seed convergence across runs: `inputs` (seed dirs and their steps), `analysis` (expected per-token KL,
fingerprints, CKA, loss spread per step), `phases` (phase fit), `regimes` (seed regimes), `recipe` (train K seeds),
`report` (tables and plots)."""

from lmctk.dynamics.converge.analysis import ConvergeResult, StepMetrics, converge
from lmctk.dynamics.converge.inputs import Run, common_steps
from lmctk.dynamics.converge.phases import PhaseFit, detect_phases
from lmctk.dynamics.converge.recipe import (
    ConvergeRecipe,
    load_converge_recipe,
    train_seeds,
)
from lmctk.dynamics.converge.regimes import Regimes, seed_regimes
from lmctk.dynamics.converge.report import plot, render

__all__ = [
    "ConvergeRecipe", "ConvergeResult", "PhaseFit", "Regimes", "Run", "StepMetrics", "common_steps", "converge",
    "detect_phases", "load_converge_recipe", "plot", "render", "seed_regimes", "train_seeds",
]
