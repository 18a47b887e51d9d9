"""Alignment quality on trained transformer pairs: loss barriers raw, weight-aligned (shared-within-head
spec and per-head spec), activation-aligned, with both barrier definitions, and the matching objectives.

    .venv/bin/python benchmarks/bench_align_quality.py                # GPT-2 (text) and BERT (text-mlm)
    .venv/bin/python benchmarks/bench_align_quality.py --steps 100    # quicker, less trained

Each family trains two tiny models from seeds 0 and 1 with `lmctk.train.fit` (kept in --work, reused
when present). Weight matching runs with the older spec (`shared_within`: one within-head order for
all heads) and the per-head spec from identity, and the per-head spec started from the shared answer
(coordinate ascent from there can only go up). REPAIR is attempted and its refusal reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmctk.basin.activation import activation_matching
from lmctk.basin.align import apply, weight_matching
from lmctk.basin.barrier import DEFINITIONS, barrier_sweep
from lmctk.errors import ConfigError
from lmctk.spec import spec_for
from lmctk.spec.core import identity_perms, shared_within
from lmctk.train import TrainConfig, fit, load_run_model

FAMILIES = {"gpt2": "text", "bert": "text-mlm"}


def trained_pair(family: str, args: argparse.Namespace, work: Path):
    """(model, task, state A, state B): two runs of `family` from seeds 0 and 1 (reused from `work`)."""
    options = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "intermediate": 4 * args.hidden}
    states = []
    for seed in (0, 1):
        out = work / f"{family}-s{seed}-{args.steps}"
        if not out.exists():
            fit(TrainConfig(task=FAMILIES[family], task_options={"seq_len": args.seq_len}, model=family,
                            model_options=options, seed=seed, steps=args.steps, batch_size=32, lr=3e-3,
                            warmup=args.steps // 10, eval_every=args.steps), out)
        model, task, _ = load_run_model(out)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, task, states[0], states[1]


def barrier_cells(model, task, a, b, points: int, renorm: str, refusals: set[str]) -> list[str]:
    """Both loss-barrier definitions of the path from A to `b` (no further alignment); a refused
    renormalisation gives "n/a" cells and its reason in `refusals`."""
    try:
        r = barrier_sweep(model, a, b, task, points=points, renorm=renorm)
    except ConfigError as exc:
        refusals.add(str(exc))
        return ["n/a"] * len(DEFINITIONS)
    return [f"{r.raw.barriers(r.alphas)['loss'][d]:.4f}" for d in DEFINITIONS]


def run_family(family: str, args: argparse.Namespace, work: Path, console: Console) -> None:
    t0 = time.perf_counter()
    model, task, a, b = trained_pair(family, args, work)
    console.print(f"{family}: trained pair ready in {time.perf_counter() - t0:.0f} s")
    spec = spec_for(model)
    matches = {
        "weight, shared within head": weight_matching(shared_within(spec), a, b),
        "weight, per head from identity": weight_matching(spec, a, b, init=identity_perms(spec)),
        "weight, per head (default: from shared)": weight_matching(spec, a, b),
        "activation, per head": activation_matching(model, spec, a, b, task),
    }
    objectives = Table(title=f"{family}: weight-matching objective Σ<A, π(B)> (same pair, same tensors)")
    for col in ("matching", "objective", "sweeps", "s"):
        objectives.add_column(col, justify="right")
    table = Table(title=f"{family}: loss barriers on the test split ({args.points} points)")
    for col in ("path", *(f"{d}" for d in DEFINITIONS), *(f"REPAIR {d}" for d in DEFINITIONS)):
        table.add_column(col, justify="right")
    refusals: set[str] = set()
    for name, match in {"raw": None, **matches}.items():
        if name.startswith("weight"):
            objectives.add_row(name, f"{match.objective[-1]:.4f}", str(match.sweeps), f"{match.seconds:.2f}")
        other = b if match is None else apply(spec, b, match)
        table.add_row(name, *barrier_cells(model, task, a, other, args.points, "none", refusals),
                      *barrier_cells(model, task, a, other, args.points, "repair", refusals))
    console.print(objectives, table, *(f"REPAIR refused: {reason}" for reason in refusals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models on a shared machine)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--work", type=Path, default=None, help="keep the trained runs here (default: a temp dir)")
    parser.add_argument("--families", default="gpt2,bert")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for family in args.families.split(","):
            run_family(family, args, work, console)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
