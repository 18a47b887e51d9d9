"""Weight matching of a GPT-2-shaped pair: where the time goes (similarity matmuls, LAP, the rest).

    .venv/bin/python benchmarks/bench_align.py                 # GPT-2 small shape (12 x 768)
    .venv/bin/python benchmarks/bench_align.py --layers 2 --hidden 256 --heads 4   # quick

Two independently initialised models; the baseline is the scipy LAP backend solving every group every
sweep (`skip_unchanged=False`, the plain algorithm), run in the same process on the same pair; `auto`
picks the fastest backend present (lapx on CPU, Triton on GPU); "skip" solves again only groups whose
neighbours changed since their last solve. Every row must end with the same objective.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import transformers
from rich.console import Console
from rich.table import Table

from lmctk.basin.align import weight_matching
from lmctk.spec import spec_for


def gpt2_pair(layers: int, hidden: int, heads: int, device: str):
    config = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=50257, n_positions=1024)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.GPT2LMHeadModel(config).to(device))
    spec = spec_for(models[0])
    return spec, models[0].state_dict(), models[1].state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--max-iter", type=int, default=3, help="sweeps (fixed, so backends do equal work)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    spec, a, b = gpt2_pair(args.layers, args.hidden, args.heads, args.device)
    n_params = sum(v.numel() for k, v in a.items() if k in spec.axes)
    table = Table(title=f"weight matching, GPT-2 {args.layers}x{args.hidden} ({n_params / 1e6:.0f}M matched params), "
                        f"{args.max_iter} sweeps, {args.device}")
    for col in ("LAP backend", "groups", "total s", "per sweep s", "similarity s", "LAP s", "rest s", "objective",
                "vs scipy"):
        table.add_column(col, justify="right")
    baseline = None
    for backend, skip in (("scipy", False), ("auto", False), ("auto", True)):
        start = time.perf_counter()
        r = weight_matching(spec, a, b, max_iter=args.max_iter, lap_backend=backend, tol=-1.0, skip_unchanged=skip,
                            device=args.device)
        total = time.perf_counter() - start
        baseline = baseline or total
        used = ",".join(sorted(set(r.lap_backends)))
        table.add_row(f"{backend} ({used})", "skip" if skip else "all", f"{total:.2f}",
                      " / ".join(f"{t:.2f}" for t in r.sweep_seconds), f"{r.similarity_seconds:.2f}",
                      f"{r.lap_seconds:.2f}", f"{r.other_seconds:.2f}", f"{r.objective[-1]:.4f}", f"{baseline / total:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
