"""Fault behaviour: files never choose code to run, a bad job destroys nothing, leftovers of a killed job
never block the next one, a resume logs each evaluation once, and one process at a time writes an output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmctk.cli import main
from lmctk.dynamics.butterfly.recipe import load_butterfly_recipe
from lmctk.dynamics.butterfly.runner import run_recipe
from lmctk.dynamics.converge.recipe import load_converge_recipe
from lmctk.errors import BusyError, ConfigError, OutputExistsError
from lmctk.io.lock import lock_path, locked
from lmctk.rundir import read_journal
from lmctk.soup import load_soup_recipe
from lmctk.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--task", "digits", "--model", "mlp", "--model-opt", "widths=[8]", "--steps", "4", "--batch-size", "16",
         "--eval-every", "2", "--quiet"]


def tiny(**kw) -> TrainConfig:
    base = dict(task="digits", model="mlp", model_options={"widths": [8]}, steps=6, batch_size=16, eval_every=2,
                checkpoints=[2, 4], optimizer="sgd", lr=0.05)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def evil_runs(tmp_path_factory) -> tuple[list[Path], Path]:
    """Two finished runs whose manifests were edited to name `os:system` with a command that leaves a file."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "pwned"
    runs = []
    for seed in (0, 1):
        run = root / f"r{seed}"
        fit(tiny(seed=seed, steps=2, checkpoints=[]), run)
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config"].update(task="os:system", task_options={"command": f"touch {marker}"})
        (run / "manifest.json").write_text(json.dumps(manifest))
        runs.append(run)
    return runs, marker


@pytest.mark.parametrize("command", [["barrier", "--points", "3"], ["soupable"], ["soup", "--method", "greedy"]])
def test_manifest_naming_code_is_refused(evil_runs, command, tmp_path, capsys):
    runs, marker = evil_runs
    extra = ["--out", str(tmp_path / "soup")] if command[0] == "soup" else []
    assert main([*command, *map(str, runs), *extra]) == 2
    err = capsys.readouterr().err
    assert "os:system" in err and "--task os:system" in err and "manifest.json" in err
    assert not marker.exists()


def test_recipes_naming_code_are_refused_unless_the_user_names_it(tmp_path):
    butterfly = tmp_path / "b.toml"
    butterfly.write_text('[train]\ntask = "os:system"\n[sweep]\nsteps = [0]\nscales = [0.5]\n')
    with pytest.raises(ConfigError, match=r"train.task.*--set train.task=os:system"):
        load_butterfly_recipe(butterfly)
    assert load_butterfly_recipe(butterfly, ["train.task=os:system"]).train.task == "os:system"
    assert load_butterfly_recipe(butterfly, allow_code=True).train.task == "os:system"
    converge = tmp_path / "c.toml"
    converge.write_text('[converge]\nseeds = [0, 1]\n[train]\ntask = "os:system"\n')
    with pytest.raises(ConfigError, match="--task os:system"):
        load_converge_recipe(converge, allow_code="other:code")
    assert load_converge_recipe(converge, allow_code="os:system").train.task == "os:system"
    soup = tmp_path / "s.toml"
    soup.write_text('[soup]\ningredients = [{ path = "a" }, { path = "b" }]\n[task]\nname = "os:system"\n')
    with pytest.raises(ConfigError, match="task.name.*--task os:system"):
        load_soup_recipe(soup)
    assert main(["soup", "--recipe", str(soup), "--out", str(tmp_path / "o")]) == 2


def test_bad_train_options_leave_the_old_run_untouched(tmp_path, capsys):
    out = tmp_path / "r"
    fit(tiny(steps=2, checkpoints=[]), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(out), "--overwrite", *TRAIN, "--task", "nope"]) == 2
    assert main(["train", "--out", str(out), "--overwrite", *TRAIN, "--model", "nosuchmodel"]) == 2
    assert "nope" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_recipe_override_leaves_the_old_run_untouched(tmp_path):
    recipe = tmp_path / "b.toml"
    recipe.write_text('[train]\nmodel_options = { widths = [8] }\nsteps = 2\nbatch_size = 16\n'
                      '[sweep]\nsteps = [0]\nscales = [0.5]\n[run]\nverify_steps = 0\nplots = false\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # stands for a finished run: must survive
    assert main(["run", str(recipe), "--out", str(out), "--overwrite", "--set", "train.model=nosuchmodel"]) == 2
    assert (out / "manifest.json").read_text() == "{}"


def test_run_dir_killed_before_its_manifest_starts_fresh(tmp_path):
    out = tmp_path / "r"
    (out / "checkpoints" / "step00000002.partial").mkdir(parents=True)  # what a kill right after create leaves
    fit(tiny(steps=2, checkpoints=[]), out)
    (tmp_path / "s" / "checkpoints").mkdir(parents=True)
    fit(tiny(steps=2, checkpoints=[]), tmp_path / "s", resume=True)
    assert (out / "manifest.json").is_file() and (tmp_path / "s" / "manifest.json").is_file()
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):  # not a run's leftovers: never cleared silently
        fit(tiny(steps=2, checkpoints=[]), user_dir)


def test_resume_logs_every_evaluation_once(tmp_path):
    config = tiny()
    fit(config, tmp_path / "straight")

    def kill_after_step_3(step, total, record):
        if step == 3:  # step 2's eval and checkpoint are written; step 3 is not a checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "killed", progress=kill_after_step_3)
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as journal:
        journal.write('{"step": 4, "split": "train", "loss": 1.0, "accuracy": 0.0}\n')  # a record past the checkpoint
    fit(config, tmp_path / "killed", resume=True)
    records = list(read_journal(tmp_path / "killed" / "metrics.jsonl"))
    assert records == list(read_journal(tmp_path / "straight" / "metrics.jsonl"))


def test_resume_from_step_0_does_not_log_step_0_twice(tmp_path):
    config = tiny(checkpoints=[0])

    def stop(step, total, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "r", progress=stop)
    fit(config, tmp_path / "r", resume=True)
    steps = [(r["step"], r["split"]) for r in read_journal(tmp_path / "r" / "metrics.jsonl")]
    assert len(steps) == len(set(steps)) and steps[:2] == [(0, "train"), (0, "test")]


def test_lock_is_exclusive_names_the_holder_and_is_removed(tmp_path):
    target = tmp_path / "out"
    with locked(target):
        assert lock_path(target).read_text().strip() == str(os.getpid())
    assert not lock_path(target).exists()
    with locked(target):  # released: can be taken again
        pass


@pytest.fixture
def held(tmp_path):
    """A second process holding the lock of tmp_path/out until the test ends."""
    code = ("import sys, time; from lmctk.io.lock import locked\n"
            "with locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_second_writer_of_an_output_exits_2_naming_the_holder(tmp_path, held, capsys):
    out = tmp_path / "out"
    with pytest.raises(BusyError, match=f"pid {held.pid}"):
        fit(tiny(steps=2, checkpoints=[]), out)
    recipe = tmp_path / "b.toml"
    recipe.write_text('[train]\nmodel_options = { widths = [8] }\nsteps = 2\nbatch_size = 16\n'
                      '[sweep]\nsteps = [0]\nscales = [0.5]\n[run]\nverify_steps = 0\nplots = false\n')
    with pytest.raises(BusyError, match=f"pid {held.pid}"):
        run_recipe(load_butterfly_recipe(recipe), out, resume=True)
    assert main(["train", "--out", str(out), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert f"pid {held.pid}" in err and len(err.strip().splitlines()) == 1
    assert not (out / "manifest.json").exists()


def test_lock_of_a_killed_holder_does_not_block(tmp_path, held):
    held.kill()
    held.wait()
    time.sleep(0.05)
    assert lock_path(tmp_path / "out").exists()  # SIGKILL leaves the file, but not the lock
    with locked(tmp_path / "out"):
        pass
