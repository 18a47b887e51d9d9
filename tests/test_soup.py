"""Soups: exact fp32 means, loadable HF output, header-only dry runs, resumable streaming, greedy and the verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmctk.cli import main
from lmctk.errors import (
    ConfigError,
    KeyMismatchError,
    OutputExistsError,
    ShapeMismatchError,
)
from lmctk.io import load_state, partial_dir, save_hf_dir
from lmctk.models import build_model
from lmctk.soup import (
    IngredientConfig,
    RunningSum,
    SoupConfig,
    SoupRecipe,
    TaskConfig,
    greedy_soup,
    plan_soup,
    soup_files,
    uniform_soup,
    weighted_soup,
)
from lmctk.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def _gpt2(seed: int):
    torch.manual_seed(seed)
    return build_model("gpt2", get_task("text"), layers=1, hidden=32, heads=2)


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory) -> list[Path]:
    """Three tiny GPT-2s from different seeds as HF dirs with the same tokenizer file; the last is sharded."""
    root = tmp_path_factory.mktemp("gpt2")
    dirs = []
    for seed in range(3):
        model = _gpt2(seed)
        d = root / f"m{seed}"
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_hf_dir(state, d, config=model.config, shard_size="40KB" if seed == 2 else "2GB")
        (d / "tokenizer.json").write_text('{"model": "bytes"}')
        dirs.append(d)
    assert (dirs[2] / "model.safetensors.index.json").is_file()
    return dirs


def _recipe(paths, out=None, **soup) -> SoupRecipe:
    task = soup.pop("task", None)
    return SoupRecipe(SoupConfig([IngredientConfig(str(p)) for p in paths], out=None if out is None else str(out), **soup),
                      None if task is None else TaskConfig(task))


# -- in memory ------------------------------------------------------------------------------------


def test_uniform_soup_equals_exact_fp32_mean_in_memory():
    states = [{"w": torch.randn(4, 5), "h": torch.randn(3).bfloat16(), "n": torch.tensor([1, 2])} for _ in range(3)]
    soup = uniform_soup(states)
    assert torch.equal(soup["w"], (states[0]["w"] + states[1]["w"] + states[2]["w"]) / 3)
    assert soup["h"].dtype == torch.bfloat16
    assert torch.equal(soup["h"], ((states[0]["h"].float() + states[1]["h"].float() + states[2]["h"].float()) / 3).bfloat16())
    assert torch.equal(soup["n"], torch.tensor([1, 2]))


def test_weighted_soup_normalises_weights_and_rejects_negative():
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    assert torch.allclose(weighted_soup([a, b], [1.0, 3.0])["w"], torch.full((3,), 0.75))
    with pytest.raises(ConfigError, match="negative"):
        weighted_soup([a, b], [1.0, -1.0])


def test_running_sum_trial_does_not_change_the_soup():
    soup = RunningSum()
    soup.add({"w": torch.zeros(2)})
    trial = soup.trial({"w": torch.full((2,), 2.0)})
    assert torch.equal(trial["w"], torch.ones(2)) and soup.count == 1
    assert torch.equal(soup.mean()["w"], torch.zeros(2))


def test_greedy_soup_starts_from_best_and_keeps_only_strict_improvements():
    # score = -|w - 1|: ingredients 1.0 (best), 0.8, 3.0 (outsider), 1.2
    states = [{"w": torch.tensor([v])} for v in (0.8, 1.0, 3.0, 1.2)]
    score = lambda s: -abs(float(s["w"][0]) - 1.0)
    result = greedy_soup(states, score, names=["a", "b", "c", "d"])
    assert [step.name for step in result.trace] == ["b", "a", "d", "c"]
    assert [step.kept for step in result.trace] == [True, False, False, False]
    assert result.kept == [1]
    # with a tolerance the near-neutral candidates are kept, the outsider still is not
    tolerant = greedy_soup(states, score, tolerance=0.15)
    assert sorted(tolerant.kept) == [0, 1, 3]
    assert json.loads(json.dumps(tolerant.to_dict()))["kept"] == tolerant.kept
    calls = []
    greedy_soup(states, score, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 7) for i in range(1, 8)]  # 4 ingredients alone, then 3 trials


# -- from files -----------------------------------------------------------------------------------


def test_uniform_soup_of_three_hf_dirs_is_exact_mean_and_loads_with_transformers(gpt2_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup"
    result = soup_files(_recipe(gpt2_dirs, out, shard_size="30KB"))
    states = [load_state(d) for d in gpt2_dirs]
    soup = load_state(out)
    assert soup.keys() == states[0].keys()
    for name in soup:
        assert torch.equal(soup[name], (states[0][name] + states[1][name] + states[2][name]) / 3), name
    assert (out / "model.safetensors.index.json").is_file() and result.plan.num_shards > 1
    assert (out / "tokenizer.json").read_text() == '{"model": "bytes"}'
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert "[soup]" in card and str(gpt2_dirs[2]) in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["transformer.h.0.mlp.c_fc.weight"], soup["transformer.h.0.mlp.c_fc.weight"])
    assert not list(tmp_path.glob(".*"))  # no temp or partial dirs left behind


def test_weighted_soup_to_bfloat16_updates_config_dtype(gpt2_dirs, tmp_path):
    out = tmp_path / "soup"
    recipe = SoupRecipe(SoupConfig([IngredientConfig(str(d), w) for d, w in zip(gpt2_dirs, (1.0, 0.0, 3.0))],
                                 out=str(out), method="weighted", dtype="bfloat16"))
    soup_files(recipe)
    a, c = load_state(gpt2_dirs[0]), load_state(gpt2_dirs[2])
    soup = load_state(out)
    name = "transformer.wte.weight"
    assert soup[name].dtype == torch.bfloat16
    assert torch.equal(soup[name], ((a[name] + 3 * c[name]) / 4).bfloat16())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_existing_out_is_refused_and_untouched(gpt2_dirs, tmp_path):
    out = tmp_path / "soup"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        soup_files(_recipe(gpt2_dirs, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    soup_files(_recipe(gpt2_dirs, out), overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_plan_catches_key_shape_and_tokenizer_mismatch_from_headers(gpt2_dirs, tmp_path):
    base = load_state(gpt2_dirs[0])
    missing = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in list(base.items())[1:]}, missing)
    with pytest.raises(KeyMismatchError):
        plan_soup([gpt2_dirs[0], missing])
    wide = tmp_path / "wide"
    model = build_model("gpt2", get_task("text"), layers=1, hidden=64, heads=2)
    save_hf_dir(model.state_dict(), wide, config=model.config)
    with pytest.raises(ShapeMismatchError):
        plan_soup([gpt2_dirs[0], wide])
    other_tok = tmp_path / "tok"
    save_hf_dir(base, other_tok, config=json.loads((gpt2_dirs[0] / "config.json").read_text()))
    (other_tok / "tokenizer.json").write_text('{"model": "other"}')
    with pytest.raises(ConfigError, match="tokenizer differs.*tokenizer.json.*--tokenizer-from"):
        plan_soup([gpt2_dirs[0], other_tok])
    plan = plan_soup([gpt2_dirs[0], other_tok], tokenizer_from="2")
    assert plan.tokenizer_source == 1


def test_dry_run_writes_nothing_and_reports_estimates(gpt2_dirs, tmp_path, capsys):
    out = tmp_path / "soup"
    code = main(["soup", *map(str, gpt2_dirs), "--out", str(out), "--dry-run", "--dtype", "bfloat16"])
    text = capsys.readouterr().out
    assert code == 0
    assert "estimated peak memory" in text and "dry run" in text
    assert list(tmp_path.iterdir()) == []


def test_dry_run_mismatch_exits_2_with_one_line(gpt2_dirs, tmp_path, capsys):
    other_tok = tmp_path / "tok"
    save_hf_dir(load_state(gpt2_dirs[0]), other_tok, config=json.loads((gpt2_dirs[0] / "config.json").read_text()))
    (other_tok / "tokenizer.json").write_text('{"model": "other"}')
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["soup", str(gpt2_dirs[0]), str(other_tok), "--out", str(tmp_path / "soup"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tokenizer differs" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_interrupted_write_leaves_no_output_and_resume_gives_identical_bytes(gpt2_dirs, tmp_path):
    whole = tmp_path / "whole"
    soup_files(_recipe(gpt2_dirs, whole, shard_size="30KB"))
    out = tmp_path / "soup"
    seen = []

    def kill_after_shards(name, done, total):
        seen.append(name)
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        soup_files(_recipe(gpt2_dirs, out, shard_size="30KB"), progress=kill_after_shards)
    assert not out.exists()
    journal = (partial_dir(out) / ".journal.jsonl").read_text().splitlines()
    finished = [json.loads(line)["shard"] for line in journal[1:]]
    assert finished, "some shards were finished before the interruption"
    recomputed = []
    soup_files(_recipe(gpt2_dirs, out, shard_size="30KB"), resume=True, progress=lambda n, d, t: recomputed.append(n))
    assert not partial_dir(out).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for file in whole.iterdir():
        expected = file.read_bytes()
        if file.name == "README.md":  # the card's recipe names the output dir
            expected = expected.replace(str(whole).encode(), str(out).encode())
        assert (out / file.name).read_bytes() == expected, file.name


def test_resume_skips_finished_shards(gpt2_dirs, tmp_path):
    out = tmp_path / "soup"
    calls = []

    def stop(name, done, total):
        calls.append(name)
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        soup_files(_recipe(gpt2_dirs, out, shard_size="30KB"), progress=stop)
    n_total = len(load_state(gpt2_dirs[0]))
    again = []
    soup_files(_recipe(gpt2_dirs, out, shard_size="30KB"), resume=True, progress=lambda n, d, t: again.append(n))
    assert len(again) < n_total


def test_resume_with_other_inputs_is_refused(gpt2_dirs, tmp_path):
    out = tmp_path / "soup"

    def stop(name, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        soup_files(_recipe(gpt2_dirs, out, shard_size="30KB"), progress=stop)
    with pytest.raises(ConfigError, match="different inputs"):
        soup_files(_recipe(gpt2_dirs[:2], out, shard_size="30KB"), resume=True)


def test_cli_soup_from_recipe_and_existing_out_exits_2(gpt2_dirs, tmp_path, capsys):
    recipe = tmp_path / "soup.toml"
    out = tmp_path / "soup"
    recipe.write_text(textwrap.dedent(f"""
        [soup]
        method = "uniform"
        out = "{out}"
        shard_size = "30KB"
        [[soup.ingredients]]
        path = "{gpt2_dirs[0]}"
        [[soup.ingredients]]
        path = "{gpt2_dirs[1]}"
    """))
    assert main(["soup", "--recipe", str(recipe), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["out"] == str(out)
    capsys.readouterr()
    assert main(["soup", "--recipe", str(recipe)]) == 2
    assert "already exists" in capsys.readouterr().err
    recipe.write_text(recipe.read_text().replace('shard_size = "30KB"', 'shard_size = "30KB"\nshard_sise = 1'))
    assert main(["soup", "--recipe", str(recipe), "--dry-run"]) == 2
    assert "soup.shard_sise: unknown key" in capsys.readouterr().err


def test_example_recipe_parses():
    from lmctk.soup import load_soup_recipe

    recipe = load_soup_recipe(ROOT / "recipes" / "soup-tiny-gpt2.toml")
    assert recipe.soup.method == "greedy" and len(recipe.soup.ingredients) == 3 and recipe.task.name == "text"


# -- memory ---------------------------------------------------------------------------------------

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (pytest's), hiding the child's own.
_MEMORY_SCRIPT = """
import sys
from pathlib import Path
from lmctk.soup import IngredientConfig, SoupRecipe, SoupConfig, soup_files
paths, out = sys.argv[2:], sys.argv[1]
soup_files(SoupRecipe(SoupConfig([IngredientConfig(p) for p in paths], out=out, shard_size="16MB")))
print(next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")))
"""


def _peak_rss_kib(paths: list[Path], out: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(out), *map(str, paths)],
                          capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_peak_memory_is_flat_from_2_to_8_ingredients(tmp_path):
    """8 x 48 MB ingredients: a load-everything soup would need ~290 MB more than with 2."""
    tensor_mb, tensors = 4, 12
    paths = []
    for i in range(8):
        g = torch.Generator().manual_seed(i)
        state = {f"layer.{k}.weight": torch.randn(tensor_mb * 2**18, generator=g) for k in range(tensors)}
        save_file(state, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
        del state
    two = _peak_rss_kib(paths[:2], tmp_path / "out2")
    eight = _peak_rss_kib(paths, tmp_path / "out8")
    ingredient_kib = tensor_mb * tensors * 1024
    print(f"peak RSS (VmHWM): 2 ingredients {two} KiB, 8 ingredients {eight} KiB; one ingredient {ingredient_kib} KiB")
    assert eight - two < ingredient_kib / 2, (two, eight)
    soup = load_state(tmp_path / "out8", keys=["layer.3.weight"])["layer.3.weight"]
    parts = [load_state(p, keys=["layer.3.weight"])["layer.3.weight"] for p in paths]
    assert torch.equal(soup, sum(parts[1:], parts[0].clone()) / 8)


# -- greedy soup and the verdict on a constructed case ---------------------------------------------


def _run_dir(path: Path, config, model=None) -> Path:
    from lmctk.train import Trainer

    trainer = Trainer(config, model=model)
    for _ in range(config.steps):
        trainer.train_step()
    return _save_run(path, trainer)


def _save_run(path: Path, trainer) -> Path:
    from lmctk.models import model_config
    from lmctk.rundir import RunDir

    config = trainer.config
    run = RunDir.create(path)
    run.write_manifest({"config": config.to_dict(), "model": model_config(config.model, trainer.task, **config.model_options)})
    trainer.save_checkpoint(run.checkpoint_dir(trainer.step))
    return path


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """Three fine-tunes of one digits MLP (other data seeds and learning rates) and a stranger from another init."""
    import copy

    from lmctk.train import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("digits")
    widths = {"widths": [64, 64]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLP: threads only contend
    try:
        base = Trainer(TrainConfig(task="digits", model="mlp", seed=0, steps=150, lr=1e-3, model_options=widths))
        for _ in range(150):
            base.train_step()
        runs = {"base": _save_run(root / "base", base)}
        for i, lr in enumerate((3e-3, 2e-3, 4e-3), start=1):
            config = TrainConfig(task="digits", model="mlp", seed=100 + i, steps=100, lr=lr, schedule="constant",
                                 model_options=widths)
            runs[f"ft{i}"] = _run_dir(root / f"ft{i}", config, copy.deepcopy(base.model))
        stranger = TrainConfig(task="digits", model="mlp", seed=7, steps=150, lr=1e-3, model_options=widths)
        runs["stranger"] = _run_dir(root / "stranger", stranger)
    finally:
        torch.set_num_threads(threads)
    return runs


def test_greedy_soup_from_run_dirs_leaves_the_stranger_out(digits_runs, tmp_path):
    paths = [digits_runs[k] for k in ("ft1", "stranger", "ft2", "ft3")]
    out = tmp_path / "greedy"
    result = soup_files(_recipe(paths, out, method="greedy"))  # task: the runs' own (digits)
    stranger = next(step for step in result.greedy.trace if step.index == 1)
    assert not stranger.kept and 1 not in result.kept
    assert result.greedy.trace[0].index != 1  # the best on val is a fine-tune
    kept_states = [load_state(paths[i]) for i in result.kept]
    soup = load_state(out)
    expected = sum(s["out.weight"] for s in kept_states[1:]) if len(kept_states) > 1 else 0
    assert torch.allclose(soup["out.weight"], (kept_states[0]["out.weight"] + expected) / len(kept_states))
    card = (out / "README.md").read_text()
    assert "Greedy selection" in card and "| no |" in card and "test accuracy" in card
    assert f"| 2 | `{paths[1]}` | 0.0000 |" in card  # the stranger has no weight in the soup
    from lmctk.loading import model_config_of

    assert model_config_of(out) == model_config_of(paths[0])  # lmctk-model.json: the soup can be used again


def test_soupable_rejects_the_mixed_set_and_names_the_stranger(digits_runs, tmp_path, capsys):
    paths = [str(digits_runs[k]) for k in ("ft1", "ft2", "stranger", "ft3")]
    code = main(["soupable", *paths, "--json", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert code == 3 and not verdict["soupable"]
    assert "not soupable: ingredient 3 sits in a different basin from the others" in verdict["explanation"]
    assert "not soupable" in out
    worst = max(verdict["barriers"], key=lambda k: verdict["barriers"][k]["midpoint"])
    assert "3" in worst.split("-") and verdict["barriers"][worst]["midpoint"] > 0.05
    assert verdict["barriers"]["1-2"]["midpoint"] < 0.05
    assert "3" not in verdict["explanation"].split("keeps")[1]
    assert not verdict["shared_init"]


def test_soupable_accepts_the_fine_tunes(digits_runs, tmp_path, capsys):
    paths = [str(digits_runs[k]) for k in ("ft1", "ft2", "ft3")]
    code = main(["soupable", *paths, "--points", "5", "--base", str(digits_runs["base"]), "--json", str(tmp_path / "v.json")])
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert code == 0, verdict["explanation"]
    assert verdict["soupable"] and verdict["explanation"].startswith("soupable: the uniform soup")
    assert verdict["shared_init"] and all(b["max"] <= 0.05 for b in verdict["barriers"].values())
    assert set(verdict["models"]) == {"1", "2", "3", "uniform soup", "greedy soup"}
    cosines = verdict["task_vector_cosine"]
    assert len(cosines) == 3 and all(-1 <= c <= 1.0 + 1e-9 for row in cosines for c in row)


def test_soupable_bad_input_exits_2(digits_runs, gpt2_dirs, capsys):
    assert main(["soupable", str(digits_runs["ft1"]), str(gpt2_dirs[0]), "--task", "digits"]) == 2
    assert main(["soupable", str(digits_runs["ft1"])]) == 2


def test_align_to_permutes_a_stranger_before_souping(digits_runs, tmp_path, capsys):
    paths = [digits_runs["ft1"], digits_runs["stranger"]]
    plain = soup_files(_recipe(paths, tmp_path / "plain", task="digits"))
    aligned = soup_files(_recipe(paths, tmp_path / "aligned", task="digits", align_to=str(paths[0])))
    assert aligned.scores["soup"]["val"]["loss"] < plain.scores["soup"]["val"]["loss"] - 0.2
    assert main(["soup", *map(str, paths), "--out", str(tmp_path / "x"), "--align-to", str(paths[0]), "--dry-run"]) == 0
    text_task = tmp_path / "no-spec"
    save_file({"w": torch.zeros(2)}, tmp_path / "w1.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "w2.safetensors")
    code = main(["soup", str(tmp_path / "w1.safetensors"), str(tmp_path / "w2.safetensors"), "--out", str(text_task),
                 "--align-to", str(tmp_path / "w1.safetensors"), "--dry-run"])
    assert code == 2 and "cannot tell its architecture" in capsys.readouterr().err


def test_nan_in_an_ingredient_is_named_and_nothing_is_written(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, tmp_path / "b.safetensors")
    from lmctk.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"b\.safetensors: tensor w has 1 NaN/Inf"):
        soup_files(_recipe([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


_KILL_SCRIPT = """
import os, signal, sys
from lmctk.soup import IngredientConfig, SoupRecipe, SoupConfig, soup_files
out, paths = sys.argv[1], sys.argv[2:]

def progress(name, done, total):
    if done > total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind

soup_files(SoupRecipe(SoupConfig([IngredientConfig(p) for p in paths], out=out, shard_size="30KB")), progress=progress)
"""


def test_sigkill_midway_leaves_no_output_and_cli_resume_finishes_it(gpt2_dirs, tmp_path, capsys):
    out = tmp_path / "soup"
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(out), *map(str, gpt2_dirs)], check=False, cwd=ROOT)
    assert killed.returncode == -9
    assert not out.exists() and (partial_dir(out) / ".journal.jsonl").is_file()
    assert not (partial_dir(out) / "model.safetensors.index.json").exists()
    args = ["soup", *map(str, gpt2_dirs), "--out", str(out), "--shard-size", "30KB"]
    assert main([*args, "--resume"]) == 0
    assert "(resumed)" in capsys.readouterr().out
    fresh = tmp_path / "fresh" / "soup"
    assert main([*args[:-4], "--out", str(fresh), "--shard-size", "30KB"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for file in fresh.iterdir():
        expected = file.read_bytes().replace(str(fresh).encode(), str(out).encode())
        assert (out / file.name).read_bytes() == expected, file.name


def test_soupable_refuses_independent_inits_even_with_a_low_barrier(gpt2_dirs, capsys):
    code = main(["soupable", *map(str, gpt2_dirs[:2]), "--task", "text"])
    out = capsys.readouterr().out
    assert code == 3
    assert "not soupable: ingredients 1 and 2 do not share an initialisation" in out.replace("\n", " ")


def test_cli_flags_are_checked_like_recipe_keys(gpt2_dirs, tmp_path, capsys):
    out = tmp_path / "soup"
    assert main(["soup", *map(str, gpt2_dirs[:2]), "--out", str(out), "--metric", "foo"]) == 2
    err = capsys.readouterr().err
    assert "soup.metric" in err and "'foo'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_resume_without_an_interrupted_write_starts_afresh(gpt2_dirs, tmp_path):
    """A soup killed before its write began has nothing to resume: --resume writes it from scratch."""
    soup_files(_recipe(gpt2_dirs, tmp_path / "straight", shard_size="30KB"))
    soup_files(_recipe(gpt2_dirs, tmp_path / "never", shard_size="30KB"), resume=True)
    for file in (tmp_path / "straight").iterdir():
        expected = file.read_bytes().replace(str(tmp_path / "straight").encode(), str(tmp_path / "never").encode())
        assert (tmp_path / "never" / file.name).read_bytes() == expected, file.name


def test_aligned_and_streamed_soups_cast_the_fp32_mean_once(tmp_path):
    from lmctk.soup.run import _write_aligned
    from lmctk.soup.write import write_soup

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"w": torch.randn(64, 8, generator=g).to(torch.bfloat16)}, paths[-1])
    plan = plan_soup(paths, dtype="float32")
    exact = (load_state(paths[0])["w"].float() + load_state(paths[1])["w"].float()) / 2
    _write_aligned(plan, tmp_path / "aligned", [(lambda p=p: load_state(p), 1.0) for p in paths], "card")
    write_soup(plan, tmp_path / "streamed")
    for out in ("aligned", "streamed"):
        got = load_state(tmp_path / out)["w"]
        assert got.dtype == torch.float32 and torch.equal(got, exact), out
    assert not torch.equal(exact, exact.to(torch.bfloat16).float())  # bf16 rounding would show


def test_model_card_claims_transformers_only_with_a_config(tmp_path):
    from safetensors.torch import save_file

    from lmctk.recipes import parse
    from lmctk.soup import SoupRecipe, soup_files

    paths = []
    for i in range(2):
        save_file({"w": torch.full((2, 2), float(i))}, str(tmp_path / f"m{i}.safetensors"))
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    recipe = parse({"soup": {"ingredients": [{"path": p} for p in paths], "out": str(tmp_path / "soup")},
                    "task": None}, SoupRecipe)
    soup_files(recipe)
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "library_name: transformers" not in card and "lmctk.io.load_state" in card
