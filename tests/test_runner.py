"""The runner: strict recipes, kill-and-resume gives the same metrics, 2 torchrun ranks = 1 rank, report CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmctk.cli import main
from lmctk.dynamics.butterfly.recipe import load_butterfly_recipe, trials
from lmctk.dynamics.butterfly.runner import report, run_recipe
from lmctk.errors import ConfigError
from lmctk.rundir import read_journal

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[train]
task = "digits"
model = "mlp"
model_options = { widths = [16] }
steps = 16
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
final_points = 5
probe = 32

[run]
threads = 1
plots = false
"""


def tiny_recipe(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def trial_results(run_dir: Path) -> dict[str, dict]:
    """Trial id -> its result without wall-clock times (what must match across runs)."""
    out = {}
    for r in read_journal(run_dir / "metrics.jsonl"):
        if r.get("type") == "trial":
            res = dict(r["result"])
            res.pop("seconds")
            out[r["trial"]["id"]] = res
    return out


class Kill(Exception):
    pass


def test_recipe_typo_is_an_error_naming_the_key_path(tmp_path):
    path = tiny_recipe(tmp_path, TINY.replace("replicates = 1", "replicate = 1"))
    with pytest.raises(ConfigError, match=r"sweep\.replicate: unknown key"):
        load_butterfly_recipe(path)


def test_set_overrides_keys_and_rejects_unknown_ones(tmp_path):
    path = tiny_recipe(tmp_path)
    recipe = load_butterfly_recipe(path, ["sweep.replicates=3", "sweep.scales=[0.0, 1.0, 2.0]", "train.lr=0.1"])
    assert recipe.sweep.replicates == 3 and recipe.sweep.scales == [0.0, 1.0, 2.0] and recipe.train.lr == 0.1
    assert len(trials(recipe)) == 1 + 2 * 3 * 3
    with pytest.raises(ConfigError, match=r"sweep\.nope: unknown key"):
        load_butterfly_recipe(path, ["sweep.nope=1"])
    with pytest.raises(ConfigError, match=r"sweep\.steps: 99 is outside"):
        load_butterfly_recipe(path, ["sweep.steps=[99]"])


def test_shipped_recipes_parse():
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        if path.name.startswith(("butterfly-", "instability-")):
            assert trials(load_butterfly_recipe(path))


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    recipe = load_butterfly_recipe(tiny_recipe(tmp_path))
    straight = run_recipe(recipe, tmp_path / "straight")
    done = []

    def die_in_third_trial(event, info):
        if event == "trial_done":
            done.append(info["id"])
        if event == "measure" and len(done) == 2:
            raise Kill()

    with pytest.raises(Kill):
        run_recipe(recipe, tmp_path / "killed", progress=die_in_third_trial)
    assert len(trial_results(tmp_path / "killed")) == 2
    assert report(tmp_path / "killed", plots=False).trials_done == 2  # a killed run still reports
    started = []
    resumed = run_recipe(recipe, tmp_path / "killed", resume=True,
                         progress=lambda e, i: started.append(i["id"]) if e == "trial_start" else None)
    assert len(started) == len(trials(recipe)) - 2  # finished trials were skipped
    assert trial_results(tmp_path / "killed") == trial_results(tmp_path / "straight")
    assert resumed.to_dict()["final_barrier"] == straight.to_dict()["final_barrier"]
    assert resumed.determinism["status"] == "ok"


def test_resume_with_another_recipe_is_refused(tmp_path):
    recipe = load_butterfly_recipe(tiny_recipe(tmp_path), ["sweep.steps=[0]", "sweep.scales=[0.0]",
                                                           "sweep.independent=0"])
    run_recipe(recipe, tmp_path / "run")
    other = load_butterfly_recipe(tiny_recipe(tmp_path), ["sweep.steps=[0]", "sweep.scales=[0.1]",
                                                          "sweep.independent=0"])
    with pytest.raises(ConfigError, match="recipe differs"):
        run_recipe(other, tmp_path / "run", resume=True)


def test_cli_run_and_report_render_table_phases_and_plots(tmp_path, capsys):
    path = tiny_recipe(tmp_path, TINY.replace("plots = false", "plots = true"))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "gaussian: final raw loss barrier" in text and "phase" in text and "determinism: ok" in text
    assert (out / "report.json").is_file() and (out / "divergence-gaussian-t0.png").is_file()
    assert main(["report", str(out), "--no-plots", "--json", str(tmp_path / "r.json")]) == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["trials"] == {"total": 5, "done": 5}
    assert set(payload["final_barrier"]["gaussian"]) == {"0", "8"}
    assert payload["phases"]["gaussian"]["0"]["label"] in ("chaotic", "transition", "stable")
    assert main(["run", str(path), "--out", str(out)]) == 2  # exists: needs --resume or --overwrite


def _lmctk(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmctk", *args], cwd=ROOT, env=env, **kw)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_metrics(tmp_path):
    path = tiny_recipe(tmp_path, TINY.replace("steps = 16", "steps = 60").replace("[0, 8]", "[0, 20]"))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_recipe(load_butterfly_recipe(path), straight)
    proc = _lmctk("run", str(path), "--out", str(killed), "--quiet")
    deadline = time.time() + 120
    while len(trial_results(killed)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(trial_results(killed)) < 5
    assert _lmctk("run", str(path), "--out", str(killed), "--resume", "--quiet").wait(timeout=120) == 0
    assert trial_results(killed) == trial_results(straight)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_trials_as_one(tmp_path):
    path = tiny_recipe(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_butterfly_recipe(path), one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "lmctk", "run", str(path), "--out", str(two), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {r["trial"]["id"]: r["rank"] for r in read_journal(two / "metrics.jsonl") if r.get("type") == "trial"}
    assert set(ranks.values()) == {0, 1}  # both ranks ran trials
    assert trial_results(two) == trial_results(one)
    assert json.loads((two / "report.json").read_text())["trials"]["done"] == 5
    assert report(two, plots=False).to_dict()["final_barrier"] == report(one, plots=False).to_dict()["final_barrier"]


def test_bad_perturb_options_and_scales_fail_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="fraction"):
        load_butterfly_recipe(tiny_recipe(tmp_path), ["perturb.fraction=0.0"])
    from lmctk.dynamics.butterfly.recipe import SweepConfig

    with pytest.raises(ConfigError, match="finite number"):
        SweepConfig(steps=[0], scales=[-1.0])  # built in Python, not by the loader
