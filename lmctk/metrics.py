"""Small pure metrics on tensors and states: distances, CKA, seed-convergence KL, fingerprints, loss CV.

Every function takes tensors and returns tensors or floats; nothing here loads models or prints.
Formulas are those of `docs/ARCHITECTURE.md` (debiased linear CKA after Kornblith et al.; expected per-token
KL convergence after Fehlauer et al.).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lmctk.errors import ConfigError

__all__ = [
    "angular_cka",
    "distances",
    "clustered_mean",
    "ensemble_diversity",
    "expected_kl",
    "fingerprint_cosine",
    "frequency_buckets",
    "gram_cosine",
    "linear_cka",
    "loss_spread",
    "mean_over_pairs",
    "pair_matrix",
    "pairwise_kl",
    "kl_terms",
    "stratified_means",
    "surprisal_bins",
]


def distances(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None
) -> dict[str, float]:
    """‖θ_A − θ_B‖₂ and the cosine of θ_A and θ_B over `keys` (default: all), floating tensors only,
    in float64. Each tensor is read once, so lazy or permuted-on-access mappings stream through, and is
    promoted to float64 `DISTANCE_CHUNK` elements at a time, so the scratch memory is bounded whatever the
    tensor (a whole 7B embedding in float64 with its temporaries would be about 17 GB)."""
    diff = dot = na = nb = 0.0
    for k in keys if keys is not None else list(a.keys()):
        x = a[k]
        if not x.is_floating_point():
            continue
        x, y = x.reshape(-1), b[k].to(x.device).reshape(-1)
        for s in range(0, x.numel(), DISTANCE_CHUNK):
            xs, ys = x[s:s + DISTANCE_CHUNK].double(), y[s:s + DISTANCE_CHUNK].double()
            diff += float((xs - ys).square().sum())
            dot += float((xs * ys).sum())
            na += float(xs.square().sum())
            nb += float(ys.square().sum())
    return {"l2": diff ** 0.5, "cosine": dot / max((na * nb) ** 0.5, 1e-300)}


DISTANCE_CHUNK = 1 << 22  # elements promoted to float64 at once in `distances` (32 MB each)


def _as_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    """Flatten everything but the first (example) axis and promote to float64."""
    if x.dim() < 2:
        raise ConfigError(f"{name}: expected an (n, features...) tensor, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _cross_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖YᵀX‖²_F, through whichever of the feature or the example space is smaller."""
    n = x.shape[0]
    if x.shape[1] * y.shape[1] <= n * n:
        return (y.T @ x).square().sum()
    return ((x @ x.T) * (y @ y.T)).sum()


def _hsic_debiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h(X,Y) of docs/ARCHITECTURE.md on column-centred X, Y (proportional to the unbiased HSIC)."""
    n = x.shape[0]
    r_x, r_y = x.square().sum(1), y.square().sum(1)
    return (
        _cross_sq(x, y)
        - n / (n - 2) * (r_x @ r_y)
        + r_x.sum() * r_y.sum() / ((n - 1) * (n - 2))
    )


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA between representations X (n, ...) and Y (n, ...) of the same n examples.

    Debiased (default): h(X,Y)/√(h(X,X)h(Y,Y)) with the h of docs/ARCHITECTURE.md, valid for n >= 4. Biased:
    ‖YᵀX‖²_F/(‖XᵀX‖_F‖YᵀY‖_F). Returns NaN when a representation is constant or, for tiny n,
    the debiased self-similarity is not positive. Computed in float64.
    """
    xm, ym = _as_matrix(x, "X"), _as_matrix(y, "Y")
    n = xm.shape[0]
    if ym.shape[0] != n:
        raise ConfigError(f"CKA needs the same examples in X and Y: got {n} and {ym.shape[0]} rows")
    if debiased and n < 4:
        raise ConfigError(f"debiased CKA needs at least 4 examples, got {n}; use a larger probe batch")
    if not debiased and n < 2:
        raise ConfigError(f"CKA needs at least 2 examples, got {n}")
    xm = xm - xm.mean(0, keepdim=True)
    ym = ym - ym.mean(0, keepdim=True)
    if debiased:
        hxy, hxx, hyy = _hsic_debiased(xm, ym), _hsic_debiased(xm, xm), _hsic_debiased(ym, ym)
    else:
        hxy, hxx, hyy = _cross_sq(xm, ym), _cross_sq(xm, xm), _cross_sq(ym, ym)
    denom = hxx * hyy
    if not bool(denom > 0):
        return math.nan
    return float(hxy / denom.sqrt())


def angular_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Angular CKA distance arccos(CKA) in radians (0 = identical up to rotation and scale).

    CKA is clamped to [-1, 1] first: the debiased estimate can leave it by rounding.
    """
    c = linear_cka(x, y, debiased=debiased)
    if math.isnan(c):
        return math.nan
    return math.acos(max(-1.0, min(1.0, c)))


# -- seed convergence: expected per-token KL ----------------------------------------------------


def pairwise_kl(logp: torch.Tensor) -> torch.Tensor:
    """KL(p_i ‖ p_j) per token for every ordered seed pair: logp [K, N, V] -> [K, K, N] (fp32).

    Each pair is Σ_v p_i (log p_i − log p_j) computed directly, so identical seeds give exactly 0.
    Masked vocab ids (log-prob −inf) follow 0·log 0 = 0: a term with p_i = 0 is 0, and one with
    p_i > 0 and p_j = 0 is +inf (never NaN).
    """
    if logp.dim() != 3:
        raise ConfigError(f"pairwise_kl expects log-probs [seeds, tokens, vocab], got shape {tuple(logp.shape)}")
    logp = logp.float()
    k = logp.shape[0]
    p = logp.exp()
    out = logp.new_zeros(k, k, logp.shape[1])
    for i in range(k):
        for j in range(k):
            if i != j:
                out[i, j] = kl_terms(p[i], logp[i], logp[j]).sum(-1)
    return out


def kl_terms(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p (log p − log q) per entry with 0·log 0 = 0: 0 where p = 0, +inf where p > 0 and q = 0."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))


def expected_kl(logp: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL averaged over all ordered seed pairs i≠j: logp [K, N, V] -> [N] (fp32).

    Its mean over tokens is the expected per-token KL; convergence (Fehlauer et al.) is its negative.
    `pairs` is `pairwise_kl(logp)` when the caller already has it.
    """
    k = logp.shape[0]
    if k < 2:
        raise ConfigError(f"seed convergence needs at least 2 seeds, got {k}")
    return (pairwise_kl(logp) if pairs is None else pairs).sum((0, 1)) / (k * (k - 1))


def clustered_mean(values: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    """Mean of `values` and its standard error with `clusters` (e.g. contexts) as the sampling unit.

    Ratio estimator: mean = Σ s_c / Σ n_c, SE² = C/(C−1) Σ_c (s_c − mean·n_c)² / (Σ n_c)², so tokens
    of one context are not counted as independent. NaN SE with fewer than 2 clusters.
    """
    values = values.double().reshape(-1)
    n = values.numel()
    if n == 0:
        return math.nan, math.nan
    _, idx = torch.unique(clusters.reshape(-1), return_inverse=True)
    c = int(idx.max()) + 1
    sums = torch.zeros(c, dtype=torch.float64).index_add_(0, idx, values)
    counts = torch.zeros(c, dtype=torch.float64).index_add_(0, idx, torch.ones_like(values))
    mean = float(sums.sum() / n)
    if c < 2:
        return mean, math.nan
    se = math.sqrt(c / (c - 1) * float((sums - mean * counts).square().sum())) / n
    return mean, se


def stratified_means(
    values: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor, names: list[str]
) -> list[dict[str, float | int | str]]:
    """Per-stratum count, mean and clustered SE; stratum s holds the tokens with `labels == s`.

    Strata partition the tokens, so Σ count·mean / Σ count is the overall mean. Empty strata are
    listed with count 0 and NaN mean, so tables keep their shape across steps.
    """
    out = []
    for s, name in enumerate(names):
        mask = labels == s
        mean, se = clustered_mean(values[mask], clusters[mask]) if bool(mask.any()) else (math.nan, math.nan)
        out.append({"stratum": name, "count": int(mask.sum()), "mean": mean, "se": se})
    return out


SURPRISAL_EDGES = (1.0, 2.0, 4.0, 8.0)
SURPRISAL_BINS = ("0-1", "1-2", "2-4", "4-8", "8+")


def surprisal_bins(surprisal: torch.Tensor) -> torch.Tensor:
    """Bin index of each surprisal in nats: [0,1) 0, [1,2) 1, [2,4) 2, [4,8) 3, [8,∞) 4."""
    edges = torch.tensor(SURPRISAL_EDGES, dtype=surprisal.dtype)
    return torch.bucketize(surprisal, edges, right=True)


def frequency_buckets(counts: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Log-decade bucket of each count (0: unseen, 1: 1-9, 2: 10-99, …) and the bucket names.

    Names cover every decade up to the largest count, so strata of different steps line up.
    """
    counts = counts.long()
    powers = torch.tensor([10**d for d in range(19)], dtype=torch.long)  # exact, unlike log10
    decade = (counts.unsqueeze(-1) >= powers).sum(-1)  # number of decimal digits, 0 for 0
    top = int(decade.max()) if counts.numel() else 0
    names = ["unseen"] + [f"{10 ** (d - 1)}-{10 ** d - 1}" for d in range(1, top + 1)]
    return decade, names


# -- activation fingerprints, loss spread --------------------------------------------------------


def fingerprint_cosine(a: torch.Tensor, b: torch.Tensor, centred: bool = False) -> float:
    """Cosine similarity of two seeds' activations (n, ...) on the same probe inputs, flattened.

    Basis-dependent: hidden units are permuted between seeds, so it is ~0 for seeds that learned the
    same function in a different basis (see `gram_cosine`).

    `centred` first subtracts each feature's mean over the n probe rows (both seeds separately), so
    a shared offset (e.g. a large common bias direction) does not count as agreement.
    """
    x, y = _as_matrix(a, "activations"), _as_matrix(b, "activations")
    if x.shape != y.shape:
        raise ConfigError(f"fingerprint: activation shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if centred:
        x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    denom = x.norm() * y.norm()
    if not bool(denom > 0):
        return math.nan
    return float((x * y).sum() / denom)


def gram_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two seeds' centred probe-by-probe Gram matrices: a basis-free activation fingerprint.

    With X (n probe rows, d units) and G = H X Xᵀ H (H = I − 11ᵀ/n, i.e. X column-centred: X̃ X̃ᵀ),
    ⟨G_X, G_Y⟩_F = ‖X̃ᵀỸ‖²_F and ‖G_X‖_F = ‖X̃ᵀX̃‖_F, so this is exactly the biased linear CKA of
    X and Y (the RV coefficient of X̃, Ỹ), not the debiased estimator `linear_cka` returns by default.
    Invariant to any orthogonal map of the units (a permutation included) and to scale; float64.
    """
    return linear_cka(a, b, debiased=False)


def mean_over_pairs(values: torch.Tensor) -> float:
    """Mean of a symmetric [K, K] pair matrix over its off-diagonal entries i < j."""
    k = values.shape[0]
    i, j = torch.triu_indices(k, k, 1)
    return float(values[i, j].double().mean())


def pair_matrix(items: list[torch.Tensor], fn) -> torch.Tensor:
    """Symmetric [K, K] matrix of fn(items[i], items[j]) (float64) with fn(x, x) on the diagonal."""
    k = len(items)
    out = torch.full((k, k), math.nan, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = fn(items[i], items[j])
    return out


def loss_spread(losses: torch.Tensor) -> dict[str, float]:
    """Mean, sample std (ddof=1) and coefficient of variation (std/mean) of per-seed losses.

    With one seed the sample std (and so the CV) is undefined: NaN, not 0.
    """
    x = losses.double().reshape(-1)
    mean = float(x.mean())
    std = float(x.std(correction=1)) if x.numel() > 1 else math.nan
    return {"mean": mean, "std": std, "cv": std / mean if mean != 0 else math.nan}


def ensemble_diversity(logp: torch.Tensor, targets: torch.Tensor | None = None) -> list[dict[str, float]]:
    """How much each additional seed adds: for k = 1..K, averaged over all k-subsets of seeds,
    the mean KL of members to their mixture (generalised Jensen–Shannon, nats/token) and, with
    `targets`, the mixture's NLL. `added` is the JSD gained over k−1 seeds.
    """
    from itertools import combinations

    logp = logp.float()
    k_all = logp.shape[0]
    rows: list[dict[str, float]] = []
    for k in range(1, k_all + 1):
        jsd, nll, subsets = 0.0, 0.0, list(combinations(range(k_all), k))
        for subset in subsets:
            members = logp[list(subset)]
            mix = torch.logsumexp(members, 0) - math.log(k)
            jsd += float(kl_terms(members.exp(), members, mix).sum(-1).mean())
            if targets is not None:
                nll += float(-mix.gather(-1, targets.reshape(-1, 1)).mean())
        row = {"seeds": k, "jsd": jsd / len(subsets)}
        if targets is not None:
            row["ensemble_loss"] = nll / len(subsets)
        row["added"] = row["jsd"] - (rows[-1]["jsd"] if rows else 0.0)
        rows.append(row)
    return rows
