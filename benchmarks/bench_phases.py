"""Phase-search benchmark: `detect_phases` (exact chain-elimination knot search) against the
exhaustive search it replaced (every knot set solved by least squares; `lmctk/phases.py` at commit
5da006a, loaded from git history).

The curve is four phases in log10(step + 1) plus noise (2% of its range) on n checkpoint steps: the
Pythia schedule for n = 154, log-spaced steps otherwise. Each run is a fresh subprocess reporting
wall time and peak RSS above its RSS after imports and curve set-up; ratio = old / new.

Run: `.venv/bin/python benchmarks/bench_phases.py [--sizes 40,80,154,1000] [--old-max 80]`
(the old search needs ~10 GB at n = 154; raise --old-max only with the memory for it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "5da006a"


def steps_for(n: int) -> list[int]:
    """The Pythia schedule (154 checkpoints) for n = 154, else n distinct log-spaced steps from 0."""
    if n == 154:
        return [0, *[2**i for i in range(10)], *range(1000, 143001, 1000)]
    return [0, *(np.geomspace(1, 10**5, n - 1).round().astype(int) + np.arange(n - 1)).tolist()]


def curve(steps: list[int]) -> list[float]:
    """Four phases with knots at steps 10, 100, 1000, plus noise of 2% of the range (seeded)."""
    x = np.log10(np.array(steps) + 1.0)
    base = np.interp(x, [0, 1, 2, 3, max(x[-1], 3.5)], [1.0, 1.0, 0.2, 1.7, 1.5])
    return (base + 0.03 * np.random.default_rng(0).normal(size=len(x))).tolist()


def one(method: str, n: int) -> dict:
    """Time one detection in this process; peak RSS (MiB) above the RSS before it."""
    if method == "old":
        path = Path(tempfile.mkdtemp()) / "phases_old.py"
        path.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:lmctk/phases.py"],
                                       check=True, capture_output=True, text=True).stdout)
        spec = importlib.util.spec_from_file_location("phases_old", path)
        module = sys.modules["phases_old"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        detect = module.detect_phases
    else:
        from lmctk.dynamics.converge.phases import detect_phases as detect
    steps = steps_for(n)
    values = curve(steps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    fit = detect(steps, values)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mib": (peak - before) / 1024, "phases": [p["name"] for p in fit.phases],
            "boundaries": [b.step for b in fit.boundaries]}


def run(method: str, n: int) -> dict:
    """`one` in a fresh interpreter, so peak RSS is this run's alone."""
    out = subprocess.run([sys.executable, __file__, "--one", method, str(n)], check=True, capture_output=True,
                         text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="40,80,154,1000")
    parser.add_argument("--old-max", type=int, default=80, help="largest n to run the old exhaustive search at")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    print(f"machine: {platform.machine()}, python {platform.python_version()}, numpy {np.__version__}")
    print("| n | new s | new peak MiB | old s | old peak MiB | time ratio | boundaries (new) | boundaries (old) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in map(int, args.sizes.split(",")):
        new = run("new", n)
        old = run("old", n) if n <= args.old_max else None
        cells = [f"{new['seconds']:.3f}", f"{new['peak_mib']:.0f}"]
        if old:
            cells += [f"{old['seconds']:.2f}", f"{old['peak_mib']:.0f}", f"{old['seconds'] / new['seconds']:.0f}×"]
        else:
            cells += ["—", "—", "—"]
        cells += [str(new["boundaries"]), str(old["boundaries"]) if old else "—"]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
