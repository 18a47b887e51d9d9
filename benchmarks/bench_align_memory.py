"""Peak memory of in-memory `lmctk align` on a Qwen2.5-0.5B-shaped pair, against the two checkpoints it must hold.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_align_memory.py --dtype bfloat16 --dtype float32

Builds A (random init of a hand-typed Qwen2.5-0.5B config, `--layers` of its 24 blocks, saved by
`save_pretrained` in each `--dtype`) and B = π(A). Each row runs in a fresh interpreter and reports
its peak RSS (VmHWM): `imports` (lmctk's CLI and the model's code imported, its weightless skeleton built), `A and B loaded` (the baseline: the model with A
assigned and B read, what any in-memory alignment must hold) and `lmctk align A B --out DIR` (weight
matching, the function check, the distances and π(B) written). Ratios are to one checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_stream_align import build_pair

CHILD = """
import sys
from lmctk.cli import main
from lmctk.io import return_freed_buffers
return_freed_buffers()  # as the CLI does
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
mode, a, b, out, iters = sys.argv[1:6]
if mode == "imports":  # and the model's code: transformers' modelling modules cost ~150 MiB resident
    from lmctk.loading import unloaded_skeleton
    unloaded_skeleton(a)
elif mode == "loaded":
    from lmctk.loading import load_model_state, read_state
    model, state_a, _ = load_model_state(a, None)
    state_b = dict(read_state(b, model))
elif mode == "align":
    code = main(["align", a, b, "--max-iter", iters, "--out", out, "--quiet", "--overwrite"])
    assert code == 0, code
print(hwm())
"""


def peak(mode: str, a: Path, b: Path, out: Path, iters: int) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(a), str(b), str(out), str(iters)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24, help="blocks of the 0.5B built (of 24)")
    parser.add_argument("--dtype", action="append", default=[], choices=["bfloat16", "float32"])
    parser.add_argument("--max-iter", type=int, default=3, help="weight-matching sweeps")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the pairs (default: a temp dir)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_align_memory_"))
    mib = 2 ** 20
    print(f"| Qwen2.5-0.5B shape, {args.layers} of 24 layers | checkpoint MiB | peak RSS MiB | × checkpoint | "
          "over imports MiB | × checkpoint | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.dtype or ["bfloat16"]:
        where = root / name
        where.mkdir(parents=True, exist_ok=True)
        a, b = where / "A", where / "B"
        if not (b / "config.json").exists():  # a pair left by an earlier run with --dir is reused
            build_pair(where, args.layers, "0.5B", getattr(torch, name))
        size = sum(f.stat().st_size for f in a.glob("*.safetensors"))
        imports = peak("imports", a, b, where / "out", args.max_iter)
        rows = {"A and B loaded (baseline)": peak("loaded", a, b, where / "out", args.max_iter),
                f"lmctk align --max-iter {args.max_iter} --out": peak("align", a, b, where / "out", args.max_iter)}
        print(f"| {name}: imports | {size / mib:.0f} | {imports / mib:.0f} | {imports / size:.2f} | – | – | – |")
        base = rows["A and B loaded (baseline)"]
        for label, value in rows.items():
            print(f"| {name}: {label} | {size / mib:.0f} | {value / mib:.0f} | {value / size:.2f} | "
                  f"{(value - imports) / mib:.0f} | {(value - imports) / size:.2f} | {value / base:.2f}× |")


if __name__ == "__main__":
    main()
