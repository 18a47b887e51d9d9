"""Barrier-sweep benchmark: naive loop (load_state_dict per α) vs batched interpolated evaluation.

Run: `.venv/bin/python benchmarks/bench_barrier.py [--points 25] [--repeats 5] [--threads N] [--device cpu]`;
prints a markdown table (median seconds per 25-point sweep, speed-up over the naive loop measured in
the same process, max |Δ loss| against it) ready for benchmarks/RESULTS.md. Target: batched ≥ 2× naive.
The "micro" GPT-2 row is overhead-bound (small per-α work); the others are compute-bound on a CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lmctk.basin.path import alpha_grid, evaluate_path
from lmctk.models import build_model
from lmctk.tasks import get_task

CASES = {
    "mlp (digits, 128-128)": ("mlp", "digits", {}, {}),
    "resnet20 (digits, BN eval, width 1)": ("resnet20", "digits", {}, {"width": 1}),
    "gpt2 (text, 2 layers, 64 hidden, seq 64, 64 windows)": ("gpt2", "text", {"seq_len": 64, "eval_windows": 64}, {}),
    "gpt2 micro (text, 1 layer, 32 hidden, seq 16, 16 windows)": (
        "gpt2", "text", {"seq_len": 16, "eval_windows": 16}, {"layers": 1, "hidden": 32, "heads": 2}),
}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pair(model: str, task, options: dict, device: torch.device):
    """Two differently initialised models (BN running stats randomised so eval-mode BN is exercised)."""
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model(model, task, **options)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
        states.append({k: v.to(device) for k, v in m.state_dict().items()})
    return m.to(device), states[0], states[1]


def round_robin(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """Median seconds and last value of each fn, timed round-robin (one run of each per round) after one
    warm-up each, so load from other processes falls on every contender alike."""
    values = {name: fn() for name, fn in fns.items()}  # warm-up: eval batches to the device, first calls
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            values[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), values[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    alphas = alpha_grid(args.points)
    print(f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"- command: `.venv/bin/python benchmarks/bench_barrier.py --points {args.points} --repeats {args.repeats}"
          + (f" --threads {args.threads}" if args.threads else "") + (f" --device {args.device}" if args.device != "cpu" else "") + "`")
    print(f"- {args.points} α points, median of {args.repeats} rounds after one warm-up; methods timed round-robin; "
          f"batched = `evaluate_path(method='auto')`\n")
    print("| model | naive (s) | in-place (s) | batched (s) | auto chose | batched/naive speed-up | in-place/naive | max abs Δ loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, (name, task_name, task_options, options) in CASES.items():
        task = get_task(task_name, **task_options)
        model, a, b = pair(name, task, options, device)
        info: dict = {}

        def batched():
            metrics, used = evaluate_path(model, a, b, alphas, task, method="auto")
            info.update(used)
            return metrics

        timed = round_robin({
            "naive": lambda: evaluate_path(model, a, b, alphas, task, method="naive")[0],
            "inplace": lambda: evaluate_path(model, a, b, alphas, task, method="inplace")[0],
            "batched": batched,
        }, args.repeats)
        (naive_s, naive), (inplace_s, inplace), (vmap_s, fast) = timed["naive"], timed["inplace"], timed["batched"]
        chose = f"vmap, K={info['chunk']}" if info["method"] == "vmap" else info["method"]
        delta = max(abs(x["loss"] - y["loss"]) for got in (inplace, fast) for x, y in zip(got, naive))
        print(f"| {label} | {naive_s:.3f} | {inplace_s:.3f} | {vmap_s:.3f} | {chose} | "
              f"{naive_s / vmap_s:.1f}× | {naive_s / inplace_s:.1f}× | {delta:.1e} |", flush=True)


if __name__ == "__main__":
    main()
