"""Real shapes: every checkpoint command on models of published sizes, saved by `save_pretrained`.

Models are built from hand-typed configs (random init, nothing downloaded). Per model: A, B = π(A)
(a random permutation of A, so weight matching must recover A exactly) and C = A + small noise.
Each step runs `lmctk <command>` in a fresh subprocess that reports its wall time and peak RSS
(VmHWM). `--soupable 2,4,8` also times `soupable` over N fine-tune-like ingredients of the first model.

Run: `.venv/bin/python benchmarks/bench_scale.py [--models gpt2-124m,qwen2.5-0.5b] [--quick] [--soupable 2,4,8]`
`--steps inspect,stream,soup` runs a subset; `--rows FILE` appends every row (JSON lines) to FILE and
`--write-results` then reports all rows in FILE, so a session can measure model by model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_md import write_section

HERE = Path(__file__).resolve().parent
SECTION = "## Real shapes"
TEXT = ["--task-opt", "seq_len=64", "--task-opt", "eval_windows=4"]

# name: (config class, fields, dtype, steps)
MODELS = {
    "gpt2-124m": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), "float32", "all"),
    "pythia-160m": ("GPTNeoXConfig", dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          intermediate_size=3072, rotary_pct=0.25, max_position_embeddings=2048,
                                          use_parallel_residual=True, tie_word_embeddings=False), "float32", "all"),
    "bert-base": ("BertConfig", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072), "float32", "all"),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                         max_position_embeddings=32768, rope_theta=1e6), "float32", "all"),
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                                         max_position_embeddings=32768, rope_theta=1e6), "bfloat16", "stream"),
}


def _config(name: str):
    import transformers

    cls, fields, _, _ = MODELS[name]
    return getattr(transformers, cls)(**fields, attn_implementation="eager")


def _model_class(config):
    import transformers

    return transformers.AutoModelForMaskedLM if config.model_type == "bert" else transformers.AutoModelForCausalLM


def make(name: str, root: Path, noisy: int = 1) -> None:
    """A, B = π(A) and `noisy` copies A + 1e-3·noise, saved with save_pretrained (child process)."""
    from lmctk.spec import spec_for
    from lmctk.spec.core import random_perms
    from lmctk.spec.permute import permute_state

    dtype = getattr(torch, MODELS[name][2])
    torch.manual_seed(0)
    config = _config(name)
    model = _model_class(config).from_config(config, dtype=dtype)  # built in its dtype: no fp32 copy of a bf16 model
    model.save_pretrained(root / "A")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = spec_for(model)
    with torch.no_grad():
        model.load_state_dict(permute_state(state, spec, random_perms(spec, torch.Generator().manual_seed(1), moving=True)))
        model.save_pretrained(root / "B")
        g = torch.Generator().manual_seed(2)
        for i in range(noisy):  # in place, tensor by tensor: model + A's copy, never a third state
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(state[k] + 1e-3 * torch.randn(v.shape, generator=g).to(v.dtype))
            model.save_pretrained(root / f"C{i}")


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: list[str]) -> None:
    """Run `lmctk ARGS` (or `make NAME ROOT N`) here and print {"peak_kib", "seconds", "code"}."""
    start = time.perf_counter()
    if args[0] == "make":
        make(args[1], Path(args[2]), int(args[3]))
        code = 0
    else:
        from lmctk.cli import main

        code = main(args)
    print(json.dumps({"peak_kib": peak_kib(), "seconds": time.perf_counter() - start, "code": code,
                      "load": round(os.getloadavg()[0], 1)}))


def measure(*args: object) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"{args}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def recovered(a: Path, out: Path) -> bool:
    """Whether the aligned B is A exactly (tensor by tensor, stored names)."""
    from lmctk.io import LazyState

    sa, so = LazyState(a), LazyState(out)
    return sa.keys() == so.keys() and all(torch.equal(sa[k], so[k]) for k in sa)


STEP_KEYS = {"inspect": "inspect", "memory": "align (memory)", "stream": "align --stream",
             "barrier": "barrier (3 points)", "soup": "soup (3, uniform)"}


def bench_model(name: str, root: Path, quick: bool, only: list[str] | None = None,
                align_args: list[str] = (), json_dir: Path | None = None) -> list[dict]:
    task = "text-mlm" if MODELS[name][0] == "BertConfig" else "text"
    rows = [{"model": name, "step": "make (A, π(A), A+noise ×2)", **measure("make", name, root, 2)}]
    print(json.dumps(rows[-1]), flush=True)
    a, b, c0, c1 = root / "A", root / "B", root / "C0", root / "C1"
    streaming_only = MODELS[name][3] == "stream"
    extra = [*align_args]
    suffix = f" {' '.join(align_args)}" if align_args else ""
    js = [] if json_dir is None else ["--json", json_dir / f"{name}-align-memory.json"]
    jss = [] if json_dir is None else ["--json", json_dir / f"{name}-align-stream.json"]
    steps = [("inspect", ["inspect", a])]
    if not streaming_only:
        steps.append(("align (memory)" + suffix, ["align", a, b, "--out", root / "al", *extra, *js]))
    steps.append(("align --stream" + suffix, ["align", a, b, "--stream", "--out", root / "als", *extra, *jss]))
    if not streaming_only:
        steps.append(("barrier (3 points)", ["barrier", a, c0, "--task", task, *TEXT, "--points", 3]))
    steps.append(("soup (3, uniform)", ["soup", a, c0, c1, "--out", root / "soup"]))
    if quick:
        steps = [s for s in steps if s[0].startswith(("align --stream", "soup (3, uniform)"))]
    if only is not None:
        wanted = tuple(STEP_KEYS[k] for k in only)
        steps = [s for s in steps if s[0].startswith(wanted)]
    for label, args in steps:
        r = measure(*args)
        out = next((Path(x) for x in args if isinstance(x, Path) and x.parent == root and x.name in ("al", "als")), None)
        if out is not None:
            r["exact"] = recovered(a, out)
        rows.append({"model": name, "step": label, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_soupable(name: str, root: Path, counts: list[int]) -> list[dict]:
    measure("make", name, root, max(counts))
    task = "text-mlm" if MODELS[name][0] == "BertConfig" else "text"
    rows = []
    for n in counts:
        r = measure("soupable", *[root / f"C{i}" for i in range(n)], "--task", task, *TEXT)
        rows.append({"model": name, "step": f"soupable N={n}", **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict], base_mib: float) -> str:
    lines = [
        SECTION, "",
        ("`benchmarks/bench_scale.py`: models of published shapes built from hand-typed configs (random init), saved "
         "by `save_pretrained`; B = a random permutation of A, C = A + 1e-3 noise. Each step is `lmctk …` in a fresh "
         f"process: wall seconds and peak RSS (VmHWM; imports alone: {base_mib:.0f} MiB). `exact`: aligned B equals A "
         "bit for bit (weight matching recovered the permutation)."),
        (f"Machine: {platform.machine()}, {os.cpu_count()} cores, 24 GB RAM, torch {torch.__version__}; shared with "
         "other jobs (`load`: the 1-minute load average when the step ended), so seconds are pessimistic and vary; "
         "memory does not."), "",
        "| model | step | seconds | peak RSS (MiB) | exit | exact | load |", "|---|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        exact = "" if "exact" not in r else ("yes" if r["exact"] else "**no**")
        load = f"{r['load']:.1f}" if "load" in r else ""
        lines.append(f"| {r['model']} | {r['step']} | {r['seconds']:.1f} | {r['peak_kib'] / 1024:.0f} | {r['code']} "
                     f"| {exact} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-124m,qwen2.5-0.5b", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="only align --stream and the soup")
    parser.add_argument("--soupable", default="", help="also soupable over N ingredients of the first model, e.g. 2,4,8")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the checkpoints")
    parser.add_argument("--write-results", action="store_true", help=f"replace the '{SECTION}' section of RESULTS.md")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of {', '.join(STEP_KEYS)}")
    parser.add_argument("--align-args", default="", help="extra align arguments, e.g. '--max-iter 1'")
    parser.add_argument("--json-dir", type=Path, default=None, help="keep each align's --json (per-group timings) here")
    parser.add_argument("--rows", type=Path, default=None, help="append rows here (JSON lines); report all of them")
    parser.add_argument("--no-make", action="store_true", help="with --rows: only report the rows already there")
    parser.add_argument("--label", default="", help="appended to every step's label (e.g. a code change measured)")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    base = measure("--help")["peak_kib"] / 1024  # what every child pays for imports
    only = None if args.steps is None else [k for k in args.steps.split(",") if k]  # "" : soupable only
    if only is not None and (bad := [k for k in only if k not in STEP_KEYS]):
        parser.error(f"--steps: unknown {', '.join(bad)}; choose from {', '.join(STEP_KEYS)}")
    if args.json_dir is not None:
        args.json_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in [] if args.no_make else names:
        if only == []:
            break
        root = Path(tempfile.mkdtemp(prefix=f"bench-scale-{name}-", dir=args.dir))
        try:
            rows += bench_model(name, root, args.quick, only, args.align_args.split(), args.json_dir)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if args.soupable and not args.no_make:
        root = Path(tempfile.mkdtemp(prefix="bench-scale-soupable-", dir=args.dir))
        try:
            rows += bench_soupable(names[0], root, [int(n) for n in args.soupable.split(",")])
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for r in rows:
        r["step"] += f" {args.label}" if args.label else ""
    if args.rows is not None:
        with args.rows.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    table = report(rows, base)
    print(table)
    if args.write_results:
        write_section(HERE / "RESULTS.md", SECTION, table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
