"""Streamed weight matching of a Qwen2.5-shaped bf16 pair under a memory budget, extrapolated to Qwen2.5-7B.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_stream_align.py --memory 4GB --memory none
    PYTHONPATH=. .venv/bin/python benchmarks/bench_stream_align.py --size 7B --layers 2 --memory 8GB

Builds A (random init of a hand-typed Qwen2.5 config, `--size` 0.5B / 1.5B / 7B, `--layers` of its blocks,
full vocab) and B = π(A) for random π, both bf16 safetensors dirs; then, per budget (`none`: no plan, every
round in one batch), streams `align` in a fresh subprocess: peak RSS (VmHWM) against the baseline after
imports and the planned peak, time per sweep split into read / similarity / LAP, and whether π was
recovered. From the measured costs (seconds per similarity multiply-add, per LAP n³ and per byte read) it
extrapolates a sweep of the full 1.5B and of Qwen2.5-7B, whose peaks come from the same planner run on the
full shapes (meta device).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

QWEN = {"0.5B": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                 "intermediate_size": 4864, "vocab_size": 151936},
        "1.5B": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                 "intermediate_size": 8960, "vocab_size": 151936},
        "7B": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
               "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False}}
CHILD = """
import json, sys, time
from lmctk.basin.align import weight_matching
from lmctk.io import return_freed_buffers
return_freed_buffers()  # as the CLI does
from lmctk.basin.saved import PermutedView
from lmctk.loading import unloaded_skeleton, read_state
from lmctk.metrics import distances
from lmctk.spec import spec_for
a_dir, b_dir, memory = sys.argv[1:4]
memory = None if memory == "none" else memory
skeleton = unloaded_skeleton(a_dir); spec = spec_for(skeleton)
a, b = read_state(a_dir, skeleton, lazy=True), read_state(b_dir, skeleton, lazy=True)
base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
t0 = time.perf_counter()
m = weight_matching(spec, a, b, max_iter=1, memory=memory)
sweep = time.perf_counter() - t0
after = distances(a, PermutedView(spec, b, m.perms), [k for k in spec.axes if k not in spec.buffers])
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
json.dump({"base": base, "peak": peak, "sweep": sweep, "similarity": m.similarity_seconds, "lap": m.lap_seconds,
           "read": a.state.read_seconds + b.state.read_seconds, "plan": m.memory, "lap_calls": len(m.lap_backends),
           "l2_after": after["l2"], "perms": {g: p.tolist() for g, p in m.perms.items()}}, sys.stdout)
"""


def config(size: str, layers: int | None = None, dtype: torch.dtype = torch.bfloat16) -> transformers.Qwen2Config:
    options = {**QWEN[size], **({"num_hidden_layers": layers} if layers else {})}
    options.setdefault("tie_word_embeddings", True)  # 0.5B and 1.5B tie the embedding and lm_head; 7B does not
    return transformers.Qwen2Config(**options, torch_dtype=str(dtype).removeprefix("torch."),
                                    architectures=["Qwen2ForCausalLM"])


def build_pair(root: Path, layers: int | None, size: str = "1.5B", dtype: torch.dtype = torch.bfloat16
               ) -> tuple[Path, Path, dict]:
    """A (random init, saved by `save_pretrained` in `dtype`) and B = π(A) written tensor by tensor, unless
    `root` holds them from an earlier run; returns the dirs and π⁻¹ (B → A)."""
    from lmctk.basin.saved import PermutedView, save_aligned
    from lmctk.loading import read_state, unloaded_skeleton
    from lmctk.spec import invert, random_perms, spec_for

    a, b = root / "A", root / "B"
    if not (a / "config.json").exists():
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        transformers.Qwen2ForCausalLM(config(size, layers, dtype)).save_pretrained(a)
        torch.set_default_dtype(torch.float32)
    skeleton = unloaded_skeleton(a)
    spec = spec_for(skeleton)
    perms = random_perms(spec, torch.Generator().manual_seed(1))
    if not (b / "config.json").exists():
        save_aligned(spec, PermutedView(spec, read_state(a, skeleton, lazy=True), perms), perms, b, source=a)
    return a, b, {g: p.tolist() for g, p in invert(perms, spec).items()}


def measure(a: Path, b: Path, memory: str) -> dict:
    """One streamed sweep in a fresh interpreter; its peak RSS (VmHWM) from the kernel."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(a), str(b), memory], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def costs(size: str, layers: int | None = None) -> dict:
    """Per sweep: similarity multiply-adds, Σ n³ over LAP problems, checkpoint bytes (bf16), and the spec."""
    from lmctk.spec import spec_for

    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config(size, layers))
    spec = spec_for(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    users = spec.users()
    heads = set(spec.blocks.values())
    macs = sum(math.prod(shapes[k]) * n for g, n in spec.groups.items() if g not in heads for k, _ in users[g])
    cubes = sum(n ** 3 * (spec.groups[spec.blocks[g]] if g in spec.blocks else 1) for g, n in spec.groups.items()
                if users[g] and g not in heads)
    return {"macs": macs, "cubes": cubes, "bytes": 2 * sum(math.prod(s) for s in shapes.values()),
            "spec": spec, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(QWEN), default="1.5B", help="the Qwen2.5 shape built and measured")
    parser.add_argument("--layers", type=int, default=None, help="blocks built and measured (default: all)")
    parser.add_argument("--memory", action="append", default=[],
                        help="budgets to measure (repeatable); `none`: no budget, every round solved in one batch")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the pair (default: a temp dir)")
    args = parser.parse_args()
    from lmctk.basin.budget import plan_memory
    from lmctk.basin.lap import LAP_CHUNK_ENTRIES
    from lmctk.errors import ConfigError
    from lmctk.io import format_bytes

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_stream_align_"))
    a, b, truth = build_pair(root, args.layers, args.size)
    measured = costs(args.size, args.layers)
    layers = f"{args.layers or QWEN[args.size]['num_hidden_layers']} of {QWEN[args.size]['num_hidden_layers']} layers"
    print(f"| Qwen2.5-{args.size}, {layers} | budget | planned peak | measured peak − imports | ratio | "
          "sweep s | read s | similarity s | LAP s | LAP calls | π recovered |")
    rows = []
    for memory in args.memory or ["4GB"]:
        row = measure(a, b, memory)
        rows.append(row)
        grown = row["peak"] - row["base"]
        plan = row["plan"]["peak"] if row["plan"] else float("nan")
        print(f"| measured | {memory} | {format_bytes(plan) if row['plan'] else '–'} | {format_bytes(int(grown))} | "
              f"{grown / plan:.2f} | {row['sweep']:.0f} | {row['read']:.0f} | {row['similarity']:.0f} | "
              f"{row['lap']:.0f} | {row['lap_calls']} | {row['perms'] == truth} |")
    same = all(r["perms"] == rows[0]["perms"] for r in rows)
    print(f"\nsame permutations at every budget: {same}")
    fast = min(rows, key=lambda r: r["sweep"])
    rate = {"sim": fast["similarity"] / measured["macs"], "lap": fast["lap"] / measured["cubes"],
            "read": fast["read"] / measured["bytes"]}
    other = fast["sweep"] - fast["similarity"] - fast["lap"] - fast["read"]
    print("\n| extrapolated | budget | planned peak | sweep s | read s | similarity s | LAP s |")
    for size in ("1.5B", "7B"):
        full = costs(size)
        parts = [rate["read"] * full["bytes"], rate["sim"] * full["macs"], rate["lap"] * full["cubes"]]
        total = sum(parts) + other * full["bytes"] / measured["bytes"]
        for memory in ("4GB", "8GB", "16GB"):
            try:
                peak = format_bytes(plan_memory(full["spec"], full["shapes"], dict.fromkeys(full["shapes"], 2), memory,
                                                solver_chunk=LAP_CHUNK_ENTRIES).peak)
            except ConfigError as exc:  # a budget below what one group needs
                peak = str(exc).split(";")[0]
            print(f"| Qwen2.5-{size} | {memory} | {peak} | {total:.0f} | {parts[0]:.0f} | {parts[1]:.0f} | {parts[2]:.0f} |")


if __name__ == "__main__":
    main()
