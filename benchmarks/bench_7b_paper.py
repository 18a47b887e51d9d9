"""The 7B case on paper (issue 12 item 5): measure the two costs that dominate streaming weight matching
here (an fp32 matmul's throughput, and `lmctk.basin.lap.solve` on n×n), then predict one sweep of weight
matching of two Qwen2.5-7B checkpoints from the model's shapes.

Run: `.venv/bin/python benchmarks/bench_7b_paper.py [--laps 4096,8192] [--json OUT]`
Prints JSON lines: the measurements, then the per-sweep prediction's terms.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Qwen2.5-7B (config.json): hidden 3584, 28 layers, 28 query / 4 key-value heads of 128, intermediate 18944,
# vocab 152064, untied lm_head, q/k/v biases.
D, L, F, V, HQ, HKV, HD = 3584, 28, 18944, 152064, 28, 4, 128


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"embed": (V, D), "lm_head": (V, D), "norm": (D,)}
    for i in range(L):
        out |= {f"{i}.q": (HQ * HD, D), f"{i}.q_b": (HQ * HD,), f"{i}.k": (HKV * HD, D), f"{i}.k_b": (HKV * HD,),
                f"{i}.v": (HKV * HD, D), f"{i}.v_b": (HKV * HD,), f"{i}.o": (D, HQ * HD),
                f"{i}.gate": (F, D), f"{i}.up": (F, D), f"{i}.down": (D, F), f"{i}.ln1": (D,), f"{i}.ln2": (D,)}
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def sweep_macs() -> dict[str, float]:
    """Multiply-adds of one sweep's similarities, every group solved (what sweep 1 does).

    A group of size n acting on a tensor with m other entries per slice costs n·n·m; summed over the
    tensors it acts on: n · (numel of those tensors). Residual (n = D): every matrix with a hidden axis;
    the embedding and lm_head terms are kept after the first sweep (their vocab rows no other group moves).
    MLP (n = F): gate, up, down. Attention: per kv block, heads and within-head v dims (small)."""
    s = shapes()
    matrices = {k: v for k, v in s.items() if len(v) == 2}
    residual = D * sum(numel(v) for v in matrices.values())
    residual_static = D * (numel(s["embed"]) + numel(s["lm_head"]))
    mlp = L * F * 3 * F * D
    attn_per_layer = (HKV * HKV * (HQ // HKV) * HD * D * 2 * 2  # kv heads: q,k,v,o rows, twice (C and S)
                      + HKV * (HQ // HKV) ** 2 * HD * D * 2 + HKV * HD * HD * D * 2)  # qh and v within blocks
    return {"residual_first_sweep": residual, "residual_later_sweeps": residual - residual_static,
            "mlp_all_layers": mlp, "mlp_one_layer": mlp / L, "attention_all_layers": L * attn_per_layer}


def time_matmul(n: int = 4096, k: int = D, repeat: int = 3) -> float:
    """fp32 GFLOP/s of [n, k] @ [k, n] (the shape of one MLP similarity term, smaller)."""
    a, b = torch.randn(n, k), torch.randn(n, k)
    a @ b.T  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2 * n * n * k / best / 1e9


def time_lap(n: int, kind: str) -> dict:
    from lmctk.basin import lap

    g = torch.Generator().manual_seed(0)
    if kind == "random":
        S = torch.randn(n, n, generator=g)
    else:  # what weight matching of a permuted copy sees: a permutation's diagonal on top of noise
        S = torch.randn(n, n, generator=g) + 10 * torch.eye(n)[torch.randperm(n, generator=g)]
    t0 = time.perf_counter()
    _, info = lap.solve(S, maximize=True, return_info=True)
    return {"n": n, "kind": kind, "seconds": time.perf_counter() - t0, "backend": info.backend}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--laps", default="4096,8192")
    parser.add_argument("--kinds", default="random,permuted")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [{"what": "macs", **sweep_macs()},
            {"what": "matmul", "threads": torch.get_num_threads(), "gflops": time_matmul()}]
    print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    for kind in args.kinds.split(","):
        for n in map(int, args.laps.split(",")):
            rows.append({"what": "lap", **time_lap(n, kind)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
