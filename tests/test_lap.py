"""Linear assignment: every backend reaches scipy's optimum, returns valid permutations, rejects bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from lmctk.basin import lap
from lmctk.basin.lap import available_backends, objective, solve
from lmctk.errors import ConfigError

HAS_LAPX = "lapx" in available_backends()
GPU_REASON = lap._gpu_unavailable()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"GPU backend cannot run: {GPU_REASON}")
CPU_BACKENDS = [
    pytest.param("scipy"),
    pytest.param("lapx", marks=pytest.mark.skipif(not HAS_LAPX, reason="lapx is not installed (optional)")),
    pytest.param("auto"),
]
SIZES = [1, 2, 17, 64, 200]
KINDS = ["uniform", "independent", "planted"]


def make_scores(kind: str, batch: tuple[int, ...], n: int, maximize: bool, seed: int = 0):
    """Score matrices `[*batch, n, n]` and, for `planted`, the permutation that must be recovered."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(*batch, n, n, generator=g, dtype=torch.float64), None
    if kind == "independent":  # weight matching's S = A Bᵀ for two independently trained layers
        a, b = (torch.randn(*batch, n, 32, generator=g, dtype=torch.float64) for _ in range(2))
        return -(a @ b.transpose(-1, -2)), None
    planted = torch.stack([torch.randperm(n, generator=g) for _ in range(int(np.prod(batch)))]).reshape(
        *batch, n
    )
    bonus = torch.zeros(*batch, n, n, dtype=torch.float64).scatter_(-1, planted.unsqueeze(-1), 4.0 * n)
    noise = torch.rand(*batch, n, n, generator=g, dtype=torch.float64)
    return noise + (bonus if maximize else -bonus), planted


def scipy_objective(S: torch.Tensor, maximize: bool) -> torch.Tensor:
    """The reference optimum of every problem in `S[..., n, n]`."""
    flat = S.double().cpu().reshape(-1, *S.shape[-2:]).numpy()
    best = [m[linear_sum_assignment(m, maximize=maximize)].sum() for m in flat]
    return torch.tensor(best, dtype=torch.float64).reshape(S.shape[:-2])


def assert_permutations(perm: torch.Tensor, n: int) -> None:
    assert perm.dtype == torch.long
    assert torch.equal(perm.sort(-1).values, torch.arange(n, device=perm.device).expand_as(perm))


def assert_optimal(S: torch.Tensor, perm: torch.Tensor, maximize: bool, rtol: float = 1e-6) -> None:
    assert_permutations(perm, S.shape[-1])
    got, ref = objective(S, perm).cpu(), scipy_objective(S, maximize)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [(), (4,)], ids=["single", "batched"])
@pytest.mark.parametrize("maximize", [True, False], ids=["max", "min"])
def test_backend_matches_scipy_objective(backend, kind, n, batch, maximize):
    S, planted = make_scores(kind, batch, n, maximize, seed=n)
    perm = solve(S, maximize=maximize, backend=backend)
    assert perm.shape == (*batch, n)
    assert_optimal(S, perm, maximize)
    if planted is not None:
        assert torch.equal(perm, planted)


small_scores = st.integers(1, 6).flatmap(
    lambda n: arrays(
        np.float64,
        (n, n),
        elements=st.one_of(st.integers(-3, 3).map(float), st.floats(-1e3, 1e3, allow_subnormal=False)),
    )
)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=150, deadline=None)
@given(S=small_scores, maximize=st.booleans())
def test_small_problems_match_brute_force(backend, S, maximize):
    n = S.shape[0]
    perms = np.array(list(itertools.permutations(range(n))))
    totals = S[np.arange(n), perms].sum(axis=1)
    best = totals.max() if maximize else totals.min()
    perm = solve(S, maximize=maximize, backend=backend)
    assert_permutations(perm, n)
    assert objective(S, perm).item() == pytest.approx(best, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["independent", "planted"])
def test_low_precision_inputs_reach_the_same_optimum(dtype, kind):
    S, planted = make_scores(kind, (3,), 40, maximize=True)
    S = S.to(dtype)
    perm = solve(S)
    assert_optimal(S, perm, maximize=True, rtol=1e-12)  # solved in fp64, where S's values are exact
    if planted is not None:
        assert torch.equal(perm, planted)


def test_leading_batch_dims_solve_each_matrix():
    S, _ = make_scores("independent", (2, 3), 17, maximize=True)
    perm = solve(S)
    assert perm.shape == (2, 3, 17)
    for i, j in itertools.product(range(2), range(3)):
        torch.testing.assert_close(objective(S[i, j], perm[i, j]), objective(S[i, j], solve(S[i, j])))
    assert_optimal(S, perm, maximize=True)


def test_numpy_input_gives_long_tensor():
    perm = solve(np.array([[0.0, 5.0], [5.0, 0.0]]))
    assert isinstance(perm, torch.Tensor) and perm.tolist() == [1, 0]


def test_empty_problems_give_empty_permutations():
    assert solve(torch.empty(2, 0, 0)).shape == (2, 0)
    assert solve(torch.empty(0, 3, 3)).shape == (0, 3)


@pytest.mark.parametrize(
    "S, match",
    [
        (torch.rand(3, 4), "not \\[..., n, n\\]"),
        (torch.rand(5), "not \\[..., n, n\\]"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "NaN or Inf"),
        (torch.ones(2, 2, dtype=torch.complex64), "not a real number"),
    ],
    ids=["non-square", "1-d", "nan", "inf", "complex"],
)
def test_bad_scores_raise_config_error(S, match):
    with pytest.raises(ConfigError, match=match):
        solve(S)


def test_bad_backend_requests_raise_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown 'hungarian'"):
        solve(torch.rand(3, 3), backend="hungarian")
    with pytest.raises(ConfigError, match="needs a CUDA tensor"):
        solve(torch.rand(3, 3), backend="torch")
    monkeypatch.setattr(lap, "_lapx_batch", lambda: None)
    with pytest.raises(ConfigError, match="pip install 'lapx"):
        solve(torch.rand(3, 3), backend="lapx")


def test_objective_rejects_mismatched_perm():
    with pytest.raises(ConfigError, match="perm: shape"):
        objective(torch.rand(2, 4, 4), torch.arange(4))


def test_auto_reports_the_backend_that_ran(monkeypatch):
    _, info = solve(torch.rand(4, 4), return_info=True)
    assert (info.backend, info.device) == ("scipy", "cpu")  # tiny: the reference
    _, info = solve(torch.rand(8, 64, 64), return_info=True)
    assert info.backend == ("lapx" if HAS_LAPX else "scipy")
    monkeypatch.setattr(lap, "_lapx_batch", lambda: None)  # optional dependency missing
    assert "lapx" not in available_backends()
    S, _ = make_scores("uniform", (8,), 64, maximize=True)
    perm, info = solve(S, return_info=True)
    assert info.backend == "scipy"
    assert_optimal(S, perm, maximize=True)


@needs_gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maximize", [True, False], ids=["max", "min"])
def test_gpu_backend_matches_scipy_objective(dtype, rtol, kind, maximize):
    S, planted = make_scores(kind, (8,), 200, maximize)
    S = S.to("cuda", dtype)
    perm, info = solve(S, maximize=maximize, return_info=True)
    assert info.backend == "torch" and perm.device == S.device
    assert_optimal(S, perm, maximize, rtol=rtol)
    if planted is not None:
        assert torch.equal(perm.cpu(), planted)


def test_gpu_wrapper_negates_and_casts_for_the_kernel(monkeypatch):
    """The Triton call path, run on CPU by swapping in the package's scipy solver (same contract)."""
    tla = pytest.importorskip(
        "torch_linear_assignment.assignment", reason="torch-linear-assignment not installed"
    )
    monkeypatch.setattr(tla, "batch_linear_assignment_cuda", tla.batch_linear_assignment_cpu)
    for maximize in (True, False):
        S, planted = make_scores("planted", (3,), 17, maximize)
        assert torch.equal(lap._solve_gpu(S.half(), maximize), planted)
