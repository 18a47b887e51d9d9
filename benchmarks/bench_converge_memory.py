"""Converge memory benchmark: peak RSS of `lmctk converge` on a PolyPythias-style tree at few vs many steps.

The tree: per seed a dir of HF checkpoint dirs `step<N>/` (a tiny GPT-NeoX saved in bf16 by
`save_pretrained`), a local byte-level tokenizer dir (`tokenizers` BPE without merges, saved as a
`PreTrainedTokenizerFast`), a UTF-8 evaluation text and its ids (`eval.npy`). Each measurement is a
fresh subprocess running the CLI on the ids (tokenizing megabytes of text in one call peaks far
above the evaluation itself and would hide it) and reporting its own peak RSS; flat in the number
of steps means each step is reduced to its summaries before the next. `--ref COMMIT` also measures
lmctk as of that commit, with the current `loading.py` (older loaders cannot read the legacy
`embed_out` key that transformers 5 `save_pretrained` writes).

Run: `.venv/bin/python benchmarks/bench_converge_memory.py [--steps 4,12] [--eval-windows 1280]`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
_MEASURE = """
import json, resource, sys
from lmctk.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (256 ids, no merges) saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)


def build_suite(root: Path, seeds: int = 3, steps: list[int] = STEPS, text_bytes: int = 200_000) -> list[Path]:
    """`root/seed<s>/step<N>/` HF dirs (bf16), `root/tokenizer/` and `root/eval.txt`; returns the seed dirs."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lmctk.tasks.tokens import default_text

    build_tokenizer(root / "tokenizer")
    text = default_text()
    text = (text * (text_bytes // len(text) + 1))[:text_bytes]
    (root / "eval.txt").write_text(text, encoding="utf-8")
    np.save(root / "eval.npy", np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
    config = GPTNeoXConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)
    dirs = []
    for s in range(seeds):
        for step in steps:
            torch.manual_seed(1000 * s + step)
            GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(root / f"seed{s}" / f"step{step}")
        dirs.append(root / f"seed{s}")
    return dirs


def peak_rss(root: Path, seeds: list[Path], steps: list[int], eval_windows: int, src: Path = ROOT) -> float:
    """Peak RSS (MB) of one `lmctk converge` subprocess over `steps` with lmctk from `src`."""
    args = [*map(str, seeds), "--task", "text", "--task-opt", f"tokens={root / 'eval.npy'}",
            "--task-opt", "vocab_size=256", "--task-opt", f"eval_windows={eval_windows}",
            "--steps", ",".join(map(str, steps)), "--probe", "4"]
    done = subprocess.run([sys.executable, "-c", _MEASURE, "converge", *args], capture_output=True, text=True, cwd=src,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not last.startswith("{") or json.loads(last)["code"] != 0:
        raise RuntimeError(f"converge failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(last)["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="4,12", help="numbers of steps to compare")
    parser.add_argument("--eval-windows", type=int, default=1280, help="64-token test windows per step")
    parser.add_argument("--ref", help="also measure lmctk at this git commit")
    opts = parser.parse_args()
    counts = [int(n) for n in opts.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seeds = build_suite(root, text_bytes=20 * 64 * opts.eval_windows + 1)
        sources = {"current": ROOT}
        if opts.ref:
            subprocess.run(f"git -C {ROOT} archive {opts.ref} lmctk | tar -x -C {root}", shell=True, check=True)
            (root / "lmctk" / "loading.py").write_text((ROOT / "lmctk" / "loading.py").read_text())
            sources[opts.ref] = root
        for name, src in sources.items():
            rss = {n: peak_rss(root, seeds, STEPS[-n:], opts.eval_windows, src) for n in counts}
            print(json.dumps({"lmctk": name, "eval_tokens": 64 * opts.eval_windows, "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
