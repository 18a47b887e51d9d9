"""Twins and replicas benchmark: what a second replica costs, and K replicas vmapped vs K sequential runs.

Run: `.venv/bin/python benchmarks/bench_twins.py [--steps 300] [--repeats 3] [--threads 1] [--ks 4,16]`;
prints markdown tables for benchmarks/RESULTS.md (fastest of `--repeats` round-robin runs, ratios measured in the
same process). Targets (DESIGN.md): twins ≤ 2.1× one run; K vmapped replicas faster than K sequential runs.
- one run: `Trainer.train_step` for `--steps` steps;
- twins: `lmctk.dynamics.butterfly.twins.train_twins` (two forked trainers in lockstep, one batch built per step and
  fed to both, no measurements): the cost of two replicas in lockstep (a butterfly trial now trains
  only B; twin A is read from the parent run's checkpoints);
- K sequential: K `Trainer` runs one after another; K vmapped: `lmctk.train.replicas.Replicas` (stacked
  parameters, one `vmap(grad)` per step).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from lmctk.dynamics.butterfly.twins import MeasureConfig, train_twins
from lmctk.tasks import get_task
from lmctk.train import TrainConfig, Trainer
from lmctk.train.replicas import Replicas

TASK = get_task("digits")  # shared: loading the data is not what is measured

CASES = {
    "mlp 64-64 (digits, batch 64)": dict(model_options={"widths": [64, 64]}, batch_size=64),
    "mlp 256-256 (digits, batch 128)": dict(model_options={"widths": [256, 256]}, batch_size=128),
}


def config(steps: int, **kw) -> TrainConfig:
    return TrainConfig(task="digits", model="mlp", steps=steps, optimizer="sgd", lr=0.05, **kw)


def best_times(fns, repeats: int) -> list[float]:
    """Fastest of `repeats` timings of each function, run round-robin so load spikes hit all alike.

    The minimum, not the median: on a shared machine every slower run is slower because of others.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def one_run(c: TrainConfig) -> None:
    t = Trainer(c, task=TASK)
    for _ in range(c.steps):
        t.train_step()


def twins(c: TrainConfig) -> None:
    parent = Trainer(c, task=TASK)
    train_twins(parent.fork(), parent.fork(), c.steps, [], MeasureConfig())


def sequential(c: TrainConfig, k: int) -> None:
    for seed in range(k):
        one_run(TrainConfig(**{**c.to_dict(), "seed": seed}))


def vmapped(c: TrainConfig, k: int) -> None:
    r = Replicas(c, seeds=range(k), task=TASK)
    for _ in range(c.steps):
        r.train_step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ks", default="4,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"Machine: {platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at start\n")
    print("| model | one run (s) | twins (s) | twins / one run |\n|---|---:|---:|---:|")
    for name, kw in CASES.items():
        c = config(args.steps, **kw)
        one_run(c), twins(c)  # warm-up: task data, allocator
        t1, t2 = best_times([lambda: one_run(c), lambda: twins(c)], args.repeats)
        print(f"| {name} | {t1:.3f} | {t2:.3f} | {t2 / t1:.2f}× |")
    print("\n| model | K | K sequential (s) | K vmapped (s) | speed-up |\n|---|---:|---:|---:|---:|")
    for name, kw in CASES.items():
        c = config(args.steps, **kw)
        for k in ks:
            vmapped(config(5, **kw), k)  # warm-up
            ts, tv = best_times([lambda: sequential(c, k), lambda: vmapped(c, k)], args.repeats)
            print(f"| {name} | {k} | {ts:.3f} | {tv:.3f} | {ts / tv:.2f}× |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
