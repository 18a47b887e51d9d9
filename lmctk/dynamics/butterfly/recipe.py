"""The butterfly recipe (strict TOML) and the trials it expands to: steps × scales × kinds × replicates.

```toml
[train]                      # lmctk.train.TrainConfig fields
task = "digits"
model = "mlp"
steps = 600
[sweep]
steps = [0, 50, 300]         # perturbation steps t
scales = [0.0, 0.01, 0.1]    # σ (0 = the zero-perturbation control)
kinds = ["gaussian"]         # gaussian | batch | data_order | dropout
replicates = 2               # perturbation seeds per (t, σ, kind)
independent = 1              # independent-seed pairs: the reference barrier of σ* and phases
[perturb]                    # ref, fraction, include, exclude, seed
[measure]                    # lmctk.dynamics.butterfly.twins.MeasureConfig
[analysis]                   # which barrier σ* and phases use
[run]                        # out, deterministic, verify_steps, threads, plots
```
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from lmctk.dynamics.butterfly.perturb import PerturbConfig
from lmctk.dynamics.butterfly.twins import MeasureConfig
from lmctk.errors import ConfigError
from lmctk.recipes import load_recipe, override_keys
from lmctk.seeding import derive_seed
from lmctk.tasks import refuse_code
from lmctk.train import TrainConfig

Kind = Literal["gaussian", "batch", "data_order", "dropout"]


@dataclass
class SweepConfig:
    """Which perturbations run: every t × σ × kind × replicate is one trial."""

    steps: list[int]  # perturbation steps t (0 = at initialisation)
    scales: list[float] = field(default_factory=lambda: [1.0])  # σ of gaussian; 0 is the zero-perturbation
    # control. batch/data_order/dropout are on/off: they run at σ=1 (and at σ=0 when 0 is listed)
    kinds: list[Kind] = field(default_factory=lambda: ["gaussian"])
    replicates: int = 1  # perturbation seeds per (t, σ, kind)
    independent: int = 1  # pairs of independently seeded runs (reference barrier); 0: none

    def __post_init__(self) -> None:
        if not self.steps or not self.scales or not self.kinds:
            raise ConfigError("steps, scales and kinds: give at least one value each")
        if self.replicates < 1 or self.independent < 0:
            raise ConfigError("replicates must be >= 1 and independent >= 0")
        if len(set(self.scales)) != len(self.scales) or len(set(self.steps)) != len(self.steps):
            raise ConfigError("steps and scales must not repeat values")
        if any(not math.isfinite(x) or x < 0 for x in self.scales):
            raise ConfigError("sweep.scales: every σ must be a finite number >= 0")


@dataclass
class PerturbOptions:
    """Settings shared by every perturbation of the sweep (see lmctk.dynamics.butterfly.perturb.PerturbConfig)."""

    ref: Literal["init_std", "param_norm", "absolute"] = "init_std"
    fraction: float = 1.0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0  # base of every perturbation's own seed

    def spec(self, kind: str, scale: float, seed: int) -> PerturbConfig:
        """The PerturbConfig of one trial: these shared options with its kind, σ and seed."""
        return PerturbConfig(kind=kind, scale=scale, ref=self.ref, fraction=self.fraction,
                           include=list(self.include), exclude=list(self.exclude), seed=seed)


@dataclass
class AnalysisConfig:
    """The barrier that σ*(t) and the phase labels are computed from."""

    metric: Literal["loss", "error"] = "loss"
    definition: Literal["mean_endpoint", "linear"] = "mean_endpoint"
    path: Literal["raw", "aligned"] = "raw"
    threshold: float = 0.5  # σ* = scale where the barrier reaches threshold × the independent-seed barrier


@dataclass
class RunConfig:
    """How the sweep runs."""

    out: str | None = None  # run dir (default: runs/<recipe name>)
    deterministic: bool = True  # deterministic algorithms, TF32 off, cudnn.benchmark off
    verify_steps: int = 5  # preflight: zero-perturbation twins must stay bitwise identical this long (0: skip)
    threads: int | None = None  # torch CPU threads (small models are fastest with 1)
    plots: bool = True  # write divergence PNGs with the report


@dataclass
class ButterflyRecipe:
    """A whole `lmctk run` recipe."""

    train: TrainConfig
    sweep: SweepConfig
    perturb: PerturbOptions = field(default_factory=PerturbOptions)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        bad = [t for t in self.sweep.steps if not 0 <= t < self.train.steps]
        if bad:
            raise ConfigError(f"sweep.steps: {bad[0]} is outside 0..{self.train.steps - 1} (train.steps)")
        if self.analysis.path == "aligned" and not self.measure.align:
            raise ConfigError("analysis.path: 'aligned' needs measure.align = true (aligned barriers are not measured)")
        for kind in self.sweep.kinds:  # checks kinds and [perturb] now, not after the parent has trained
            self.perturb.spec(kind, 1.0, self.perturb.seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Trial:
    """One twin pair: B perturbed by (kind, σ) at step t, or an independent-seed pair (kind 'independent')."""

    kind: str
    t: int
    scale: float
    replicate: int

    @property
    def id(self) -> str:
        if self.kind == "independent":
            return f"independent-r{self.replicate}"
        return f"{self.kind}-t{self.t}-s{self.scale:g}-r{self.replicate}"

    def perturbation(self, recipe: ButterflyRecipe) -> PerturbConfig:
        """The trial's PerturbConfig; its seed depends on (kind, t, replicate) but not σ: one direction, scaled."""
        seed = derive_seed(recipe.perturb.seed, recipe.train.seed, self.kind, self.t, self.replicate)
        return recipe.perturb.spec(self.kind, self.scale, seed)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "t": self.t, "scale": self.scale, "replicate": self.replicate}


def trials(recipe: ButterflyRecipe) -> list[Trial]:
    """Every trial of the recipe in a fixed order (independent pairs first, then by kind, t, σ, replicate)."""
    s = recipe.sweep
    out = [Trial("independent", 0, 0.0, r) for r in range(s.independent)]
    for kind in s.kinds:
        scales = sorted(s.scales) if kind == "gaussian" else [x for x in (0.0, 1.0) if x > 0 or 0.0 in s.scales]
        for t in sorted(s.steps):
            for scale in scales:
                for r in range(s.replicates):
                    out.append(Trial(kind, t, float(scale), r))
    return out


def independent_seed(recipe: ButterflyRecipe, replicate: int) -> int:
    """The seed of run B of independent pair `replicate` (run A is the recipe's seed)."""
    return derive_seed(recipe.train.seed, "independent", replicate) % (2**31)


def load_butterfly_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                          allow_code: bool = False) -> ButterflyRecipe:
    """Read a butterfly recipe strictly; `overrides` are `key.path=value` (TOML values) applied first.

    A `module:function` train.task written in the file is refused unless `allow_code` or an override sets it.
    """
    recipe = load_recipe(path, ButterflyRecipe, overrides=overrides)
    name = recipe.train.task
    refuse_code(name, f"{path}: train.task", f"name it yourself: --set train.task={name} (API: allow_code=True)",
                allow_code or "train.task" in override_keys(overrides))
    return recipe
