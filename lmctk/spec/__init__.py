"""Permutation specs: the IR (`core`), builders per architecture (`hf`, `vision`) registered in
`registry`, and the function-preservation check (`preservation.check`).

`spec_for(model_or_config)` gives the spec of a model, an HF config or an lmctk model config.
"""

from lmctk.spec import hf, vision  # noqa: F401  (builders register on import)
from lmctk.spec.core import (
    Cat,
    Fixed,
    PermutationSpec,
    Prod,
    identity_perms,
    invert,
    random_perms,
    spec_hash,
)
from lmctk.spec.permute import permute_in_place, permute_state
from lmctk.spec.preservation import check
from lmctk.spec.registry import register, spec_for

__all__ = [
    "Cat", "Fixed", "PermutationSpec", "Prod", "check", "identity_perms", "invert", "permute_in_place", "permute_state",
    "random_perms", "register", "spec_for", "spec_hash",
]
