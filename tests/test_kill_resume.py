"""SIGKILL at random moments, then the documented resume, gives what an uninterrupted run gives: the same
weights bitwise, the same metrics records, none twice. For train, run (butterfly), soup (uniform, greedy)
and converge --recipe.

CI kills each command twice; `python tests/test_kill_resume.py --kills 10` kills each 10 times and prints
a table (each kill lands at a uniform random moment of the command's uninterrupted wall time; a run that
finished first is counted, and kills are drawn again, earlier, until `--kills` hit a live process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--task", "digits", "--model", "mlp", "--model-opt", "widths=[16]", "--batch-size", "16",
         "--optimizer", "sgd", "--lr", "0.05", "--quiet"]
BUTTERFLY = """
[train]
model_options = { widths = [16] }
steps = 24
batch_size = 16
optimizer = "sgd"
lr = 0.05
[sweep]
steps = [0, 8]
scales = [0.0, 0.5]
replicates = 1
independent = 1
[measure]
every = 8
points = 3
final_points = 3
probe = 32
[run]
threads = 1
verify_steps = 2
plots = false
"""
CONVERGE = """
[converge]
seeds = [0, 1]
log_checkpoints = 4
probe = 8
batch_size = 8
[train]
model_options = { widths = [16] }
steps = 20
batch_size = 16
optimizer = "sgd"
lr = 0.05
eval_every = 5
"""


def lmctk(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lmctk", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def timeless(value: Any) -> Any:
    """`value` without wall-clock times and ranks (the only things allowed to differ between runs)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in ("seconds", "rank")}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def records(path: Path) -> list[dict[str, Any]]:
    """A journal's records, timeless."""
    if not path.is_file():
        return []
    return [timeless(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def weights(root: Path) -> dict[str, str]:
    """sha256 of every safetensors file (weights and trainer state) under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


def files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` with `root`'s own path replaced (model cards quote it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes().replace(str(root).encode(), b"OUT")).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Job:
    """One command: its argv for an output dir, the argv that resumes it, what must match, duplicates."""

    name: str
    argv: Callable[[Path], list[str]]
    resume: Callable[[Path], list[str]]
    outcome: Callable[[Path], Any]
    duplicates: Callable[[Path], int]
    done: Callable[[Path], bool] = lambda out: False  # finished before the kill: nothing to resume


def _train_dups(run: Path) -> int:
    keys = [(r["step"], r["split"]) for r in records(run / "metrics.jsonl")]
    return len(keys) - len(set(keys))


def jobs(work: Path) -> list[Job]:
    """The five commands on tiny inputs made under `work`."""
    train = ["--steps", "40", "--eval-every", "5", "--checkpoints", "10,20,30", *TRAIN]
    (work / "butterfly.toml").write_text(BUTTERFLY)
    (work / "converge.toml").write_text(CONVERGE)
    ingredients = []
    for seed in range(3):
        ingredients.append(str(work / f"ing{seed}"))
        if not (work / f"ing{seed}").exists():
            assert lmctk("train", "--out", ingredients[-1], "--seed", "0", "--steps", str(20 + 10 * seed),
                         *TRAIN).wait() == 0
    soup_done = lambda out: out.exists()  # noqa: E731 - committed atomically: complete if it exists

    def trials(out: Path) -> int:
        ids = [r["trial"]["id"] for r in records(out / "metrics.jsonl") if r.get("type") == "trial"]
        return len(ids) - len(set(ids))

    return [
        Job("train", lambda o: ["train", "--out", str(o), *train], lambda o: ["train", "--out", str(o), *train, "--resume"],
            lambda o: (weights(o), records(o / "metrics.jsonl")), _train_dups),
        Job("run (butterfly)", lambda o: ["run", str(work / "butterfly.toml"), "--out", str(o), "--quiet"],
            lambda o: ["run", str(work / "butterfly.toml"), "--out", str(o), "--quiet", "--resume"],
            lambda o: (weights(o), sorted(records(o / "metrics.jsonl"), key=json.dumps)), trials),
        Job("soup (uniform)", lambda o: ["soup", *ingredients, "--out", str(o)],
            lambda o: ["soup", *ingredients, "--out", str(o), "--resume"], files, lambda o: 0, soup_done),
        Job("soup (greedy)", lambda o: ["soup", *ingredients, "--out", str(o), "--method", "greedy"],
            lambda o: ["soup", *ingredients, "--out", str(o), "--method", "greedy", "--resume"], files,
            lambda o: 0, soup_done),
        Job("converge --recipe",
            lambda o: ["converge", "--recipe", str(work / "converge.toml"), "--out", str(o), "--json",
                       str(o / "result.json"), "--overwrite"],
            lambda o: ["converge", "--recipe", str(work / "converge.toml"), "--out", str(o), "--json",
                       str(o / "result.json"), "--overwrite"],
            lambda o: (weights(o), [records(s / "metrics.jsonl") for s in sorted(o.glob("seed*"))],
                       timeless(json.loads((o / "result.json").read_text().replace(str(o), "OUT")))),
            lambda o: sum(_train_dups(s) for s in o.glob("seed*"))),
    ]


@dataclass
class Row:
    name: str
    kills: int = 0
    finished_before_kill: int = 0
    resumed_ok: int = 0
    identical: int = 0
    duplicates: int = 0
    failures: list[str] | None = None


def check(job: Job, work: Path, kills: int, rng: random.Random) -> Row:
    """Run `job` straight once, then `kills` times: start, SIGKILL at a random moment, resume, compare."""
    ref = work / ("".join(c if c.isalnum() else "-" for c in job.name) + "-ref")
    start = time.perf_counter()
    proc = lmctk(*job.argv(ref))
    assert proc.wait() == 0, proc.stderr.read()
    wall = time.perf_counter() - start
    expected = job.outcome(ref)
    row = Row(job.name, failures=[])
    for k in range(3 * kills):  # a run that finished before its kill is counted, and another kill is drawn
        if row.kills - row.finished_before_kill >= kills:
            break
        out = work / f"{ref.name[:-4]}-kill{k}"
        delay = rng.uniform(0.0, wall)
        proc = lmctk(*job.argv(out))
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        row.kills += 1
        if proc.returncode == 0 or job.done(out):
            row.finished_before_kill += 1
            wall = max(delay, 0.1)  # the machine is faster than the reference run was: draw earlier kills
        else:
            # killed before OUT existed: nothing to resume (--resume says so), the original command starts it
            resumed = lmctk(*(job.resume(out) if out.exists() else job.argv(out)))
            if resumed.wait() != 0:
                row.failures.append(f"kill {k} at {delay:.2f}s: resume exit {resumed.returncode}: "
                                    f"{resumed.stderr.read().strip()[-300:]}")
                continue
        row.resumed_ok += 1
        row.duplicates += job.duplicates(out)
        if job.outcome(out) == expected:
            row.identical += 1
        else:
            row.failures.append(f"kill {k} at {delay:.2f}s: result differs from the uninterrupted run")
    return row


@pytest.mark.slow
@pytest.mark.parametrize("index", range(5), ids=["train", "run", "soup", "greedy-soup", "converge"])
def test_sigkill_then_resume_equals_uninterrupted(index, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "kill-resume"
    work.mkdir(exist_ok=True)
    job = jobs(work)[index]
    row = check(job, work, kills=2, rng=random.Random(index))
    assert not row.failures and row.identical == row.kills and row.duplicates == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check(job, Path(tmp), args.kills, rng) for job in jobs(Path(tmp))]
    print("| command | kills | finished before kill | resumed ok | identical to uninterrupted | duplicate records |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.kills} | {r.finished_before_kill} | {r.resumed_ok} | {r.identical} | {r.duplicates} |")
    for r in rows:
        for failure in r.failures or []:
            print(f"{r.name}: {failure}")


if __name__ == "__main__":
    main()
