"""Batched linear assignment: `solve(S[..., n, n]) -> perm[..., n]`, exact, on the fastest backend present.

Weight matching solves one assignment per permutation group per sweep, so this is its hot loop.
Backends: `scipy` (reference, always present), `lapx` (threaded Jonker-Volgenant, `lapjvr_batch`,
optional) and `torch` (torch-linear-assignment's Triton kernel on CUDA tensors, optional).
All are exact; ties may give different permutations with the same objective.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lmctk.errors import ConfigError

Scores = torch.Tensor | np.ndarray
BACKENDS = ("scipy", "lapx", "torch")
# Below this many cost entries per call every CPU solver takes a few microseconds: use the reference.
_TINY_ENTRIES = 1024
# lapx's worker pool costs ~0.1 ms to wake: solve smaller batches on the calling thread.
_THREAD_ENTRIES = 32768
# CPU solvers need float64: at most this many entries (or one problem) are converted at a time.
LAP_CHUNK_ENTRIES = 1 << 22
_NONFINITE = "S: contains NaN or Inf; check the weights or activations that produced it"
_INSTALL = {
    "lapx": "pip install 'lapx>=0.11'",
    "torch": "pip install 'torch-linear-assignment>=0.1.0' on a Linux NVIDIA GPU (compute capability >= 8.0)",
}


@dataclass(frozen=True)
class LapInfo:
    """Which backend actually solved a call, and on which device."""

    backend: str
    device: str


def _lapx_batch() -> Callable | None:
    """lapx's threaded batch solver, or None when lapx (>= 0.11, with its Rust core) is missing."""
    try:
        from lap import lapjvr_batch  # the import name of the `lapx` distribution
    except ImportError:  # absent, the older `lap` package, or a wheel built without the Rust core
        return None
    return lapjvr_batch


def _gpu_unavailable(device: torch.device | None = None) -> str | None:
    """Why the Triton GPU backend cannot run on `device` (None when it can).

    torch-linear-assignment silently solves on CPU with scipy where Triton is unsupported, so the
    conditions of its Triton path are checked here and its Triton entry point is called directly.
    """
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "no NVIDIA CUDA device is available"
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):
        return "torch-linear-assignment's Triton path needs torch >= 2.4"
    try:
        from torch_linear_assignment.assignment import batch_linear_assignment_cuda  # noqa: F401
    except ImportError:
        return f"torch-linear-assignment (with its Triton entry point) is missing; {_INSTALL['torch']}"
    if importlib.util.find_spec("triton") is None:
        return f"triton is missing; {_INSTALL['torch']}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the Triton kernel needs compute capability >= 8.0; use a CPU backend"
    return None


def available_backends() -> list[str]:
    """Backends usable in this environment (`torch` is checked against the current CUDA device)."""
    present = {"scipy": True, "lapx": _lapx_batch() is not None, "torch": _gpu_unavailable() is None}
    return [name for name in BACKENDS if present[name]]


def _as_tensor(S: Scores, name: str) -> torch.Tensor:
    """A tensor view of `S`, rejecting arrays that are not real numbers."""
    if isinstance(S, np.ndarray):
        if S.dtype.kind not in "iuf":
            raise ConfigError(f"{name}: dtype {S.dtype} is not a real number type; pass a float array")
        S = torch.from_numpy(S)
    if not isinstance(S, torch.Tensor):
        raise ConfigError(f"{name}: expected a torch.Tensor or numpy array, got {type(S).__name__}")
    if S.dtype.is_complex or S.dtype == torch.bool:
        raise ConfigError(f"{name}: dtype {S.dtype} is not a real number type; pass a float tensor")
    return S


def _pick(S: torch.Tensor) -> str:
    """The backend `auto` uses for a validated `[B, n, n]` tensor (see benchmarks/RESULTS.md)."""
    if S.numel() < _TINY_ENTRIES:
        return "scipy"
    if S.is_cuda and _gpu_unavailable(S.device) is None:
        return "torch"
    return "lapx" if _lapx_batch() is not None else "scipy"


def _solve_cpu(S: torch.Tensor, maximize: bool, lapx: Callable | None) -> torch.Tensor:
    """Solve `[B, n, n]` on CPU with lapx's threaded batch solver, or scipy one at a time, converting
    to float64 a chunk of problems at a time (never the whole batch)."""
    n = S.shape[-1]
    step = max(1, LAP_CHUNK_ENTRIES // max(1, n * n))
    cols: list[np.ndarray] = []
    for start in range(0, S.shape[0], step):
        part = S[start:start + step].detach()
        cost = part.to("cpu", torch.float64, copy=True, memory_format=torch.contiguous_format).numpy()
        if maximize:
            np.negative(cost, out=cost)
        if not np.isfinite(cost).all():  # numpy's check is several times faster than torch's on CPU
            raise ConfigError(_NONFINITE)
        if lapx is not None:
            threads = 1 if cost.size < _THREAD_ENTRIES else torch.get_num_threads()
            cols += list(lapx(cost, return_cost=False, n_threads=threads)[1])
        else:
            cols += [linear_sum_assignment(c)[1] for c in cost]
        del cost
    return torch.from_numpy(np.stack(cols).astype(np.int64, copy=False))


def _solve_gpu(S: torch.Tensor, maximize: bool) -> torch.Tensor:
    """Solve `[B, n, n]` on its CUDA device with the Triton kernel (float64 kept, else float32)."""
    from torch_linear_assignment.assignment import batch_linear_assignment_cuda

    if not bool(torch.isfinite(S).all()):
        raise ConfigError(_NONFINITE)
    cost = S.detach() if S.dtype == torch.float64 else S.detach().float()
    perm = batch_linear_assignment_cuda(-cost if maximize else cost)
    if perm.device != S.device:  # guard against any future silent CPU fallback inside the package
        raise RuntimeError(f"torch-linear-assignment returned a result on {perm.device}, not {S.device}")
    return perm


@overload
def solve(
    S: Scores, *, maximize: bool = ..., backend: str = ..., return_info: Literal[False] = ...
) -> torch.Tensor: ...
@overload
def solve(
    S: Scores, *, maximize: bool = ..., backend: str = ..., return_info: Literal[True]
) -> tuple[torch.Tensor, LapInfo]: ...
def solve(
    S: Scores, *, maximize: bool = True, backend: str = "auto", return_info: bool = False
) -> torch.Tensor | tuple[torch.Tensor, LapInfo]:
    """Optimal assignment for each `[n, n]` score matrix in `S[..., n, n]`: `perm[..., i]` is row i's column.

    Exact on every backend (CPU solves in float64; the GPU kernel in float32 unless S is float64).
    `backend="auto"` picks the GPU kernel for CUDA tensors when it can run there, else lapx, else
    scipy (always for tiny calls); the result is on S's device.
    `return_info=True` also returns a `LapInfo` naming the backend that actually ran.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ConfigError(f"backend: unknown {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    S = _as_tensor(S, "S")
    if S.ndim < 2 or S.shape[-1] != S.shape[-2]:
        raise ConfigError(f"S: shape {tuple(S.shape)} is not [..., n, n]; pass square score matrices")
    n = S.shape[-1]
    flat = S.reshape(S.shape[:-2].numel(), n, n)
    chosen = _pick(flat) if backend == "auto" else backend
    if chosen == "lapx" and _lapx_batch() is None:
        raise ConfigError(f"backend: 'lapx' is not installed; {_INSTALL['lapx']} or use backend='auto'")
    if chosen == "torch":
        if not S.is_cuda:
            raise ConfigError("backend: 'torch' needs a CUDA tensor; move S to a GPU or use backend='auto'")
        reason = _gpu_unavailable(S.device)
        if reason is not None:
            raise ConfigError(f"backend: 'torch' cannot run here: {reason}")
    if flat.numel() == 0:
        perm = torch.empty(flat.shape[:-1], dtype=torch.long, device=S.device)
    elif chosen == "torch":
        perm = _solve_gpu(flat, maximize)
    else:
        perm = _solve_cpu(flat, maximize, _lapx_batch() if chosen == "lapx" else None).to(S.device)
    perm = perm.reshape(S.shape[:-1])
    info = LapInfo(backend=chosen, device=str(S.device) if chosen == "torch" else "cpu")
    return (perm, info) if return_info else perm


def objective(S: Scores, perm: Scores) -> torch.Tensor:
    """`sum_i S[..., i, perm[..., i]]` in float64: an assignment's score, to compare solutions exactly."""
    S, perm = _as_tensor(S, "S"), _as_tensor(perm, "perm")
    if S.ndim < 2 or perm.shape != S.shape[:-1]:
        raise ConfigError(
            f"perm: shape {tuple(perm.shape)} does not match S {tuple(S.shape)}; want S.shape[:-1]"
        )
    picked = torch.gather(S, -1, perm.to(device=S.device, dtype=torch.long).unsqueeze(-1)).squeeze(-1)
    return picked.sum(-1, dtype=torch.float64)
