"""Metrics against brute-force definitions: CKA, expected KL, clustered SE, strata, fingerprints."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lmctk import metrics
from lmctk.errors import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _related(n: int = 40, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, d + 2, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, d + 2, generator=g, dtype=torch.float64) + 0.5 * noise
    return x, y


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q


def _brute_design_h(x: torch.Tensor, y: torch.Tensor) -> float:
    """DESIGN.md's h(X, Y) with explicit loops over rows and features (after column-centring)."""
    n = len(x)
    xc = [[x[i][a] - sum(x[r][a] for r in range(n)) / n for a in range(len(x[0]))] for i in range(n)]
    yc = [[y[i][b] - sum(y[r][b] for r in range(n)) / n for b in range(len(y[0]))] for i in range(n)]
    cross = sum(sum(yc[i][b] * xc[i][a] for i in range(n)) ** 2 for a in range(len(x[0])) for b in range(len(y[0])))
    rx = [sum(v * v for v in row) for row in xc]
    ry = [sum(v * v for v in row) for row in yc]
    return cross - n / (n - 2) * sum(a * b for a, b in zip(rx, ry)) + sum(rx) * sum(ry) / ((n - 1) * (n - 2))


def _brute_unbiased_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al.'s unbiased HSIC on linear Gram matrices with zeroed diagonals, by loops."""
    n = len(x)
    k = [[0.0 if i == j else sum(a * b for a, b in zip(x[i], x[j])) for j in range(n)] for i in range(n)]
    l = [[0.0 if i == j else sum(a * b for a, b in zip(y[i], y[j])) for j in range(n)] for i in range(n)]
    trace = sum(k[i][j] * l[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, k))
    sum_l = sum(map(sum, l))
    kl_sum = sum(sum(k[i][q] for q in range(n)) * sum(l[i][q] for q in range(n)) for i in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * kl_sum) / (n * (n - 3))


def test_linear_cka_matches_brute_force_formula():
    x, y = _related(n=9, d=3, seed=1)
    xs, ys = x.tolist(), y.tolist()
    brute = _brute_design_h(xs, ys) / math.sqrt(_brute_design_h(xs, xs) * _brute_design_h(ys, ys))
    assert metrics.linear_cka(x, y) == pytest.approx(brute, rel=1e-10)
    # the DESIGN formula is the unbiased HSIC (Song et al.) up to a factor that cancels in CKA
    xc, yc = (x - x.mean(0)).tolist(), (y - y.mean(0)).tolist()
    song = _brute_unbiased_hsic(xc, yc) / math.sqrt(_brute_unbiased_hsic(xc, xc) * _brute_unbiased_hsic(yc, yc))
    assert metrics.linear_cka(x, y) == pytest.approx(song, rel=1e-10)


def test_biased_cka_matches_definition():
    x, y = _related(seed=2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert metrics.linear_cka(x, y, debiased=False) == pytest.approx(float(expected), rel=1e-12)


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = _related(seed=3)
    assert metrics.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.linear_cka(x, x, debiased=False) == pytest.approx(1.0, abs=1e-12)
    assert metrics.angular_cka(x, x) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(debiased):
    x, y = _related(seed=4)
    base = metrics.linear_cka(x, y, debiased=debiased)
    moved = metrics.linear_cka(3.5 * x @ _orthogonal(x.shape[1], 5), 0.2 * y @ _orthogonal(y.shape[1], 6),
                               debiased=debiased)
    assert 0.1 < base < 0.99
    assert moved == pytest.approx(base, rel=1e-9)


def test_cka_uses_gram_path_for_wide_features_with_same_value():
    g = _gen(7)
    x = torch.randn(12, 50, generator=g, dtype=torch.float64)
    y = x[:, :40] + torch.randn(12, 40, generator=g, dtype=torch.float64)
    xs, ys = x.tolist(), y.tolist()
    brute = _brute_design_h(xs, ys) / math.sqrt(_brute_design_h(xs, xs) * _brute_design_h(ys, ys))
    assert metrics.linear_cka(x, y) == pytest.approx(brute, rel=1e-9)


def test_angular_cka_is_arccos_of_cka():
    x, y = _related(seed=8)
    assert metrics.angular_cka(x, y) == pytest.approx(math.acos(metrics.linear_cka(x, y)))


def test_debiased_cka_needs_four_examples():
    x = torch.randn(3, 5)
    with pytest.raises(ConfigError, match="at least 4"):
        metrics.linear_cka(x, x)
    with pytest.raises(ConfigError, match="same examples"):
        metrics.linear_cka(torch.randn(5, 2), torch.randn(6, 2))


def test_expected_kl_equals_brute_force_double_loop():
    logp = torch.randn(3, 5, 4, generator=_gen(9)).log_softmax(-1)
    k, n, v = logp.shape
    lp = logp.double().tolist()
    brute = []
    for t in range(n):
        total = 0.0
        for i in range(k):
            for j in range(k):
                if i != j:
                    total += sum(math.exp(lp[i][t][a]) * (lp[i][t][a] - lp[j][t][a]) for a in range(v))
        brute.append(total / (k * (k - 1)))
    assert metrics.expected_kl(logp).tolist() == pytest.approx(brute, abs=1e-6)
    assert metrics.expected_kl(logp).dtype == torch.float32
    pair = metrics.pairwise_kl(logp)
    assert (pair.diagonal(dim1=0, dim2=1) == 0).all() and (pair >= -1e-7).all()


def test_expected_kl_of_identical_seeds_is_exactly_zero():
    logp = torch.randn(1, 6, 10, generator=_gen(10)).log_softmax(-1).expand(4, -1, -1)
    assert (metrics.expected_kl(logp) == 0).all()
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        metrics.expected_kl(logp[:1])


def test_clustered_se_equals_between_cluster_se_for_equal_clusters():
    values = torch.randn(5, 4, generator=_gen(11), dtype=torch.float64)
    clusters = torch.arange(5).repeat_interleave(4)
    mean, se = metrics.clustered_mean(values.reshape(-1), clusters)
    cluster_means = values.mean(1)
    assert mean == pytest.approx(float(values.mean()))
    assert se == pytest.approx(float(cluster_means.std(correction=1) / math.sqrt(5)), rel=1e-10)


def test_strata_partition_the_tokens():
    g = _gen(12)
    values = torch.rand(300, generator=g)
    clusters = torch.arange(300) // 10
    counts = torch.randint(0, 5000, (300,), generator=g)
    surprisal = torch.rand(300, generator=g) * 12
    overall, _ = metrics.clustered_mean(values, clusters)
    buckets, names = metrics.frequency_buckets(counts)
    for labels, names in ((buckets, names), (metrics.surprisal_bins(surprisal), list(metrics.SURPRISAL_BINS))):
        rows = metrics.stratified_means(values, labels, clusters, names)
        assert sum(r["count"] for r in rows) == 300
        weighted = sum(r["count"] * r["mean"] for r in rows if r["count"]) / 300
        assert weighted == pytest.approx(overall, rel=1e-9)


def test_frequency_buckets_are_log_decades():
    counts = torch.tensor([0, 1, 9, 10, 99, 100, 999, 1000, 10**6])
    buckets, names = metrics.frequency_buckets(counts)
    assert buckets.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 7]
    assert names[:4] == ["unseen", "1-9", "10-99", "100-999"] and len(names) == 8


def test_surprisal_bins_edges():
    s = torch.tensor([0.0, 0.999, 1.0, 1.5, 2.0, 3.9, 4.0, 7.9, 8.0, 30.0])
    assert metrics.surprisal_bins(s).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_fingerprint_cosine_raw_and_centred():
    a = torch.randn(8, 3, 5, generator=_gen(13))
    assert metrics.fingerprint_cosine(a, a) == pytest.approx(1.0)
    assert metrics.fingerprint_cosine(a, 2 * a, centred=True) == pytest.approx(1.0)
    shifted = a + 100.0  # a large shared offset looks like agreement raw, not centred
    other = torch.randn(8, 3, 5, generator=_gen(14)) + 100.0
    assert metrics.fingerprint_cosine(shifted, other) > 0.99
    assert abs(metrics.fingerprint_cosine(shifted, other, centred=True)) < 0.5
    with pytest.raises(ConfigError, match="shapes differ"):
        metrics.fingerprint_cosine(a, a[:, :2])


def test_loss_spread_cv_is_sample_std_over_mean():
    spread = metrics.loss_spread(torch.tensor([1.0, 2.0, 3.0]))
    assert spread["mean"] == pytest.approx(2.0) and spread["std"] == pytest.approx(1.0)
    assert spread["cv"] == pytest.approx(0.5)


def test_ensemble_diversity_of_identical_seeds_adds_nothing():
    logp = torch.randn(1, 20, 6, generator=_gen(15)).log_softmax(-1).expand(3, -1, -1)
    targets = torch.randint(0, 6, (20,), generator=_gen(16))
    rows = metrics.ensemble_diversity(logp, targets)
    assert [r["seeds"] for r in rows] == [1, 2, 3]
    assert all(abs(r["jsd"]) < 1e-6 for r in rows)
    assert rows[2]["ensemble_loss"] == pytest.approx(rows[0]["ensemble_loss"], rel=1e-5)
    distinct = metrics.ensemble_diversity(torch.randn(3, 20, 6, generator=_gen(17)).log_softmax(-1))
    assert distinct[1]["jsd"] > 0 and distinct[2]["jsd"] >= distinct[1]["jsd"]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 24), d=st.integers(1, 6), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 100.0))
def test_cka_invariances_hold_for_random_shapes(n, d, seed, scale):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.cat([x, torch.randn(n, 2, generator=g, dtype=torch.float64)], 1)
    base = metrics.linear_cka(x, y)
    assume(math.isfinite(base))
    moved = metrics.linear_cka(scale * x @ _orthogonal(d, seed + 1), y @ _orthogonal(d + 2, seed + 2))
    assert moved == pytest.approx(base, rel=1e-7, abs=1e-9)
    assert metrics.linear_cka(x, scale * x) == pytest.approx(1.0, abs=1e-9)


def test_nan_anywhere_on_a_path_makes_the_barrier_undefined():
    import math

    from lmctk.basin.barrier import barriers

    assert all(math.isnan(v) for v in barriers([0, 0.5, 1], [1, float("nan"), 1]).values())
    assert all(math.isnan(v) for v in barriers([0, 0.5, 1], [1, 0.5, float("inf")]).values())


def test_kl_with_masked_vocab_is_finite_or_inf_never_nan():
    from lmctk.metrics import pairwise_kl

    logp = torch.tensor([[[0.0, float("-inf")]], [[0.0, float("-inf")]], [[float("-inf"), 0.0]]])
    kl = pairwise_kl(logp)
    assert not kl.isnan().any()
    assert kl[0, 1].item() == 0.0 and kl[0, 2].item() == float("inf")


def test_one_seed_loss_std_and_cv_are_nan():
    import math

    from lmctk.metrics import loss_spread

    spread = loss_spread(torch.tensor([1.0]))
    assert spread["mean"] == 1.0 and math.isnan(spread["std"]) and math.isnan(spread["cv"])  # undefined, not 0


def test_distances_in_bounded_chunks_give_the_whole_tensor_result(monkeypatch):
    """Streamed align measures distances tensor by tensor, a fp32 chunk at a time with float64 sums (a 7B
    embedding whole in float64 with its temporaries was ~17 GB): the same numbers to fp32 rounding."""
    import lmctk.metrics as metrics_module

    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(37, 11, generator=g), "b": torch.randn(5, generator=g), "i": torch.arange(3)}
    b = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in a.items()}
    x = torch.cat([a["w"].reshape(-1), a["b"]]).double()
    y = torch.cat([b["w"].reshape(-1), b["b"]]).double()
    want = {"l2": float((x - y).norm()), "cosine": float(x @ y / (x.norm() * y.norm()))}
    whole = metrics_module.distances(a, b)
    monkeypatch.setattr(metrics_module, "CHUNK", 7)
    chunked = metrics_module.distances(a, b)
    for key in want:
        assert whole[key] == pytest.approx(want[key], rel=1e-6)
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)
