"""`lmctk converge --recipe`: the recipe schema, and training K seeds before the analysis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmctk.dynamics.fingerprints import DEFAULT, check_kind
from lmctk.errors import ConfigError
from lmctk.io.lock import locked
from lmctk.recipes import load_recipe, override_keys
from lmctk.tasks import refuse_code
from lmctk.train import TrainConfig, fit, log_spaced_steps


@dataclass
class ConvergeConfig:
    """The [converge] table: which seeds to train and how to analyse them."""

    seeds: list[int]
    log_checkpoints: int = 16  # log-spaced checkpoint steps (plus 0 and the last)
    probe: int = 16  # probe windows for fingerprints and CKA
    batch_size: int = 16  # eval batch (examples) per forward
    classes: str | None = None  # token-class file (relative to the recipe)
    regimes: str = DEFAULT  # the similarity whose per-seed curves give the regimes (fingerprints.SIMILARITIES)

    def __post_init__(self) -> None:
        check_kind(self.regimes, "converge.regimes")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: need at least 2 distinct seeds, got {self.seeds}")


@dataclass
class ConvergeRecipe:
    """`lmctk converge --recipe FILE --out DIR`: [converge] and [train] (TrainConfig fields but seed)."""

    converge: ConvergeConfig
    train: TrainConfig


def load_converge_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                         allow_code: bool | str = False) -> ConvergeRecipe:
    """Read a converge recipe strictly (unknown keys are errors naming the key path); `overrides` are
    `key.path=value` strings (`--set`) applied first.

    A `module:function` train.task written in the file is refused unless `allow_code` is True or that
    name (the user's --task), or an override sets it.
    """
    recipe = load_recipe(path, ConvergeRecipe, overrides=overrides)
    name = recipe.train.task
    refuse_code(name, f"{path}: train.task", f"name it yourself: --task {name} (API: allow_code=True)",
                allow_code or "train.task" in override_keys(overrides))
    if recipe.train.checkpoints != [recipe.train.steps]:
        raise ConfigError(f"{path}: train.checkpoints: leave it out; converge.log_checkpoints sets them")
    if recipe.converge.classes is not None:
        recipe.converge.classes = str(Path(path).parent / recipe.converge.classes)
    return recipe


def train_seeds(recipe: ConvergeRecipe, out: str | Path, *, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Train one run per seed under `out/seed<N>`; a finished run with the same config is reused (an
    interrupted one resumed) unless `overwrite`, which trains afresh."""
    out = Path(out)
    base = recipe.train.to_dict()
    base["checkpoints"] = log_spaced_steps(recipe.converge.log_checkpoints, recipe.train.steps)
    paths = []
    with locked(out):
        for n, seed in enumerate(recipe.converge.seeds):
            config = TrainConfig.from_dict({**base, "seed": seed})
            path = out / f"seed{seed}"
            fit(config, path, overwrite=overwrite, resume=not overwrite)
            paths.append(path)
            if progress:
                progress(n + 1, len(recipe.converge.seeds))
    return paths
