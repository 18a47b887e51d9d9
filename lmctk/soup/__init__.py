"""Model soups: uniform, weighted and greedy averages of checkpoints, streamed with bounded memory.

In memory: `uniform_soup`, `weighted_soup`, `greedy_soup`, `RunningSum`. From files: `plan_soup`
(headers only), `soup_files` (a `SoupRecipe` in, an HF dir out). The verdict: `soupable`.
"""

from lmctk.soup.core import (
    GreedyResult,
    GreedyStep,
    RunningSum,
    greedy_soup,
    uniform_soup,
    weighted_soup,
)
from lmctk.soup.plan import SoupPlan, plan_soup
from lmctk.soup.recipe import (
    IngredientConfig,
    SoupConfig,
    SoupRecipe,
    TaskConfig,
    load_soup_recipe,
)
from lmctk.soup.run import SoupResult, soup_files
from lmctk.soup.verdict import Verdict, soupable

__all__ = [
    "GreedyResult",
    "GreedyStep",
    "IngredientConfig",
    "RunningSum",
    "SoupConfig",
    "SoupPlan",
    "SoupRecipe",
    "SoupResult",
    "TaskConfig",
    "Verdict",
    "greedy_soup",
    "load_soup_recipe",
    "plan_soup",
    "soup_files",
    "soupable",
    "uniform_soup",
    "weighted_soup",
]
