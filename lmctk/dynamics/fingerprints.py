"""Activation fingerprints: how alike two seeds' activations (n probe rows, d units) of one layer are.

Hidden units are permuted between seeds, so a coordinate-wise cosine is ~0 whatever the models
learned. The basis-free similarities are the default: `gram` (cosine of the centred probe-by-probe
Gram matrices, i.e. biased linear CKA; see `metrics.gram_cosine`), `aligned` (cosine after matching
seed j's units to seed i's) and `cka` (debiased linear CKA). `raw` and `centred` are the
coordinate-wise cosines, kept and labelled basis-dependent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmctk import metrics
from lmctk.basin import lap
from lmctk.basin.activation import unit_correlation
from lmctk.errors import ConfigError


def aligned_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Centred cosine of A and B after permuting B's units onto A's: the permutation maximising the
    summed correlation of matched units (linear assignment, as in activation matching)."""
    x, y = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if x.shape != y.shape:
        raise ConfigError(f"fingerprint: activation shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    perm = lap.solve(unit_correlation(x, y), maximize=True)
    return metrics.fingerprint_cosine(x, y[:, perm], centred=True)


SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "gram": metrics.gram_cosine,
    "aligned": aligned_cosine,
    "cka": metrics.linear_cka,
    "raw": metrics.fingerprint_cosine,
    "centred": lambda a, b: metrics.fingerprint_cosine(a, b, centred=True),
}
BASIS_FREE = ("gram", "aligned", "cka")
BASIS_DEPENDENT = ("raw", "centred")
DEFAULT = "gram"
LABELS = {
    "gram": "Gram cosine (centred; = biased linear CKA)",
    "aligned": "cosine after unit matching (centred)",
    "cka": "debiased linear CKA",
    "raw": "raw cosine (basis-dependent)",
    "centred": "centred cosine (basis-dependent)",
}


def check_kind(kind: str, what: str = "regimes") -> str:
    """`kind` if it names a similarity, else a ConfigError listing them."""
    if kind not in SIMILARITIES:
        raise ConfigError(f"{what}: unknown similarity {kind!r}; choose one of {', '.join(SIMILARITIES)}")
    return kind
