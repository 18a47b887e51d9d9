"""LAP benchmark: every available backend against a scipy loop measured in the same run.

Run: `.venv/bin/python benchmarks/bench_lap.py [--quick] [--repeats 3]`; prints a markdown table
(median seconds, speed-up over scipy, objective parity) ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.optimize import linear_sum_assignment

from lmctk.basin.lap import available_backends, objective, solve

FULL = [(1, 16), (16, 16), (16, 64), (64, 128), (64, 512), (8, 1024), (1, 4096)]
QUICK = [(1, 16), (16, 64), (16, 128), (8, 256), (1, 1024)]
KINDS = ("uniform", "independent")


def scores(kind: str, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """fp32 scores `[batch, n, n]`: uniform noise, or weight matching's `A Bᵀ` for unrelated layers."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(batch, n, n, generator=g)
    a, b = (torch.randn(batch, n, n, generator=g) / n**0.5 for _ in range(2))
    return a @ b.transpose(-1, -2)


POOL = ThreadPoolExecutor(torch.get_num_threads())


def scipy_threads(S: torch.Tensor) -> torch.Tensor:
    """scipy over a thread pool: a comparison only (it measures whether scipy releases the GIL)."""
    cost = (-S.double()).numpy()
    return torch.from_numpy(np.stack(list(POOL.map(lambda c: linear_sum_assignment(c)[1], cost))))


def contenders(S: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The calls to time on `S`: scipy first (the baseline), then every backend present."""
    runs = {
        "scipy": lambda: solve(S, backend="scipy"),
        "scipy+threads (not a backend)": lambda: scipy_threads(S),
    }
    if "lapx" in available_backends():
        runs["lapx"] = lambda: solve(S, backend="lapx")
    S_in = S.cuda() if torch.cuda.is_available() else S
    runs[f"auto on {S_in.device.type} → {solve(S_in, return_info=True)[1].backend}"] = lambda: solve(S_in)
    return runs


def interleaved_medians(runs: dict[str, Callable[[], torch.Tensor]], repeats: int, cuda: bool) -> dict:
    """Median wall time and last output of each run, timed round-robin after one untimed warm-up each.

    Round-robin spreads background load (CI neighbours, other jobs) evenly over the backends.
    The warm-up call absorbs imports, worker-pool start-up and Triton compilation.
    """
    outs = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs[name] = fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outs[name]) for name in runs}


def machine() -> str:
    """One line naming the CPU, core count and library versions."""
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "",
    )
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu or platform.processor()}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}{gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, scipy {scipy.__version__}, "
        f"numpy {np.__version__}, backends {available_backends()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems (a few seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend (median reported)")
    args = parser.parse_args()

    print(machine(), f"load average {os.getloadavg()[0]:.2f}", "\n")
    print("| problem | costs | backend | median ms | vs scipy | parity |")
    print("|---|---|---|---:|---:|---|")
    cuda = torch.cuda.is_available()
    for batch, n in QUICK if args.quick else FULL:
        for kind in KINDS:
            S = scores(kind, batch, n)
            repeats = args.repeats if S.numel() >= 100_000 else 20 * args.repeats  # µs calls are noisy
            results = interleaved_medians(contenders(S), repeats, cuda)
            base, ref = results["scipy"][0], objective(S, results["scipy"][1])
            for name, (seconds, perm) in results.items():
                gap = ((objective(S, perm.cpu()) - ref).abs() / ref.abs()).max().item()
                parity = "ok" if gap <= 1e-6 else f"MISMATCH {gap:.1e}"
                print(
                    f"| {batch} × {n}² | {kind} | {name} | {seconds * 1e3:.3g} | {base / seconds:.1f}× | {parity} |",
                    flush=True,
                )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
