"""Butterfly experiments: fork twins from a parent at step t, perturb one, train both and measure how far
apart they end up. `recipe` (the TOML schema and its trials), `perturb` (kinds of perturbation),
`twins` (training and measuring a pair), `runner` (resumable, torchrun-sharded runs), `report` (σ*, phases)."""

from lmctk.dynamics.butterfly.perturb import KINDS, Injection, PerturbConfig, inject
from lmctk.dynamics.butterfly.recipe import (
    ButterflyRecipe,
    Trial,
    load_butterfly_recipe,
    trials,
)
from lmctk.dynamics.butterfly.report import ButterflyReport, summarize
from lmctk.dynamics.butterfly.runner import report, run_recipe
from lmctk.dynamics.butterfly.twins import (
    MeasureConfig,
    run_independent,
    run_perturbed,
    verify_twins,
)

__all__ = [
    "KINDS", "ButterflyRecipe", "ButterflyReport", "Injection", "MeasureConfig", "PerturbConfig", "Trial", "inject",
    "load_butterfly_recipe", "report", "run_independent", "run_perturbed", "run_recipe", "summarize", "trials",
    "verify_twins",
]
