"""The soup recipe: one schema for `lmctk soup --recipe FILE.toml`, the CLI flags and the model card.

```toml
[soup]
method = "greedy"            # uniform | weighted | greedy
out = "runs/soup"
dtype = "bfloat16"           # optional: float32 | bfloat16 | float16 (default: the inputs' dtype)
[[soup.ingredients]]
path = "runs/ft-a"
weight = 1.0                 # weighted soups only
[task]                       # greedy soups score on its "val" split
name = "text"
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from lmctk.errors import ConfigError
from lmctk.recipes import load_recipe, override_keys
from lmctk.tasks import refuse_code


@dataclass
class IngredientConfig:
    """One checkpoint: a run dir, HF model dir or weights file."""

    path: str
    weight: float = 1.0  # relative weight (weighted soups; normalised to sum to 1)


@dataclass
class TaskConfig:
    """The task whose "val" split scores greedy soups (and the verdict)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SoupConfig:
    """What to average and how to write it."""

    ingredients: list[IngredientConfig]
    out: str | None = None  # output HF model dir
    method: Literal["uniform", "weighted", "greedy"] = "uniform"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # output float dtype
    shard_size: str = "2GB"
    tokenizer_from: str | None = None  # ingredient number or path whose tokenizer the soup keeps
    align_to: str | None = None  # permute every ingredient onto this checkpoint first (no shared init)
    metric: Literal["accuracy", "loss"] = "loss"  # greedy selection metric on val
    tolerance: float = 0.0  # greedy: keep a candidate if the score drops by less than this

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ConfigError(f"tolerance: {self.tolerance} is negative; use 0 (strict improvement) or more")
        if self.method != "weighted":
            for i, ing in enumerate(self.ingredients):
                if ing.weight != 1.0:
                    raise ConfigError(f"ingredients[{i}].weight: only weighted soups take weights (method is {self.method})")


@dataclass
class SoupRecipe:
    """A whole soup recipe file."""

    soup: SoupConfig
    task: TaskConfig | None = None

    @property
    def weights(self) -> list[float] | None:
        return [i.weight for i in self.soup.ingredients] if self.soup.method == "weighted" else None

    def to_toml(self) -> str:
        """The recipe as TOML that `load_soup_recipe` reads back (None fields are left out)."""
        lines = ["[soup]"]
        for key in ("method", "out", "dtype", "shard_size", "tokenizer_from", "align_to", "metric", "tolerance"):
            value = getattr(self.soup, key)
            if value is not None:
                lines.append(f"{key} = {_value(value)}")
        for ing in self.soup.ingredients:
            lines += ["", "[[soup.ingredients]]", f"path = {_value(ing.path)}"]
            if self.soup.method == "weighted":
                lines.append(f"weight = {_value(ing.weight)}")
        if self.task is not None:
            lines += ["", "[task]", f"name = {_value(self.task.name)}"]
            if self.task.options:
                inline = ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in self.task.options.items())
                lines.append(f"options = {{ {inline} }}")
        return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise ConfigError(f"recipe: cannot write {value!r} as TOML")


def load_soup_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                     allow_code: bool = False) -> SoupRecipe:
    """Read a soup recipe strictly: unknown keys and wrong types are errors naming the key path;
    `overrides` are `key.path=value` strings (`--set`) applied first.

    A `module:function` task.name written in the file is refused unless `allow_code` or an override sets it.
    """
    recipe = load_recipe(path, SoupRecipe, overrides=overrides)
    if recipe.task is not None:
        name = recipe.task.name
        refuse_code(name, f"{path}: task.name", f"name it yourself: --task {name} (API: allow_code=True)",
                    allow_code or "task.name" in override_keys(overrides))
    return recipe
