"""`lmctk converge`: identical seeds agree exactly, strata partition, phases on synthetic curves, CLI."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmctk.cli import main
from lmctk.dynamics.converge.analysis import converge
from lmctk.dynamics.converge.inputs import load_classes
from lmctk.dynamics.converge.phases import PHASES, detect_phases
from lmctk.dynamics.converge.recipe import ConvergeRecipe, load_converge_recipe
from lmctk.dynamics.converge.regimes import seed_regimes
from lmctk.dynamics.fingerprints import SIMILARITIES
from lmctk.errors import ConfigError
from lmctk.tasks import get_task
from lmctk.train import TrainConfig, fit

TASK_OPTIONS = {"seq_len": 16, "eval_windows": 8}
STEPS = [0, 1, 3, 6]


def _config(seed: int) -> TrainConfig:
    return TrainConfig(task="text", task_options=TASK_OPTIONS, model="gpt_neox",
                       model_options={"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
                       seed=seed, steps=6, batch_size=4, lr=1e-2, checkpoints=STEPS, eval_every=6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converge")
    out = {"a": root / "a", "a_again": root / "a_again", "b": root / "b"}
    for name, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        fit(_config(seed), out[name])
    return out


def _analyse(paths, **kw):
    return converge([str(p) for p in paths], probe=4, batch_size=4, **kw)


# -- identical seeds ----------------------------------------------------------------------------


@pytest.mark.parametrize("pair", [("a", "a"), ("a", "a_again")], ids=["same-dir-twice", "same-seed"])
def test_identical_runs_give_kl_zero_and_every_similarity_one(runs, pair):
    result = _analyse([runs[pair[0]], runs[pair[1]]])
    assert result.steps == STEPS
    for s in result.per_step:
        assert s.kl == 0.0
        assert set(s.similarity) == set(SIMILARITIES)
        for kind, values in s.similarity.items():
            assert values == pytest.approx([1.0] * len(values), abs=1e-6), kind
        assert s.loss["cv"] == pytest.approx(0.0, abs=1e-12)
    assert len(result.layers) == 2  # embeddings + one block


def test_different_seeds_disagree(runs):
    result = _analyse([runs["a"], runs["b"], runs["a_again"]])
    assert all(s.kl > 0 and s.kl_se > 0 for s in result.per_step)
    pairs = torch.tensor(result.per_step[-1].kl_pairs)
    assert pairs[0, 2] == 0 and pairs[2, 0] == 0 and pairs[0, 1] > 0  # a and a_again are the same model
    assert float(pairs.sum()) / 6 == pytest.approx(result.per_step[-1].kl, rel=1e-5)
    assert [r["seeds"] for r in result.diversity] == [1, 2, 3]


def test_stacked_vmap_evaluation_equals_one_model_at_a_time(runs):
    stacked = _analyse([runs["a"], runs["b"]])
    looped = _analyse([runs["a"], runs["b"]], batched=False)
    for s, t in zip(stacked.per_step, looped.per_step):
        assert s.kl == pytest.approx(t.kl, rel=1e-4, abs=1e-7)
        assert s.similarity["cka"] == pytest.approx(t.similarity["cka"], rel=1e-4)
        assert s.losses == pytest.approx(t.losses, rel=1e-5)


def test_strata_means_weighted_by_count_give_the_overall_kl(runs, tmp_path):
    classes = tmp_path / "classes.tsv"
    classes.write_text("e\tvowel\na\tvowel\n \tspace\nid:10\tnewline\n")
    result = _analyse([runs["a"], runs["b"]], classes=classes)
    for s in result.per_step:
        assert set(s.strata) == {"frequency", "surprisal", "classes"}
        for kind, rows in s.strata.items():
            total = sum(r["count"] for r in rows)
            weighted = sum(r["count"] * r["mean"] for r in rows if r["count"]) / total
            assert weighted == pytest.approx(s.kl, rel=1e-6), kind
    names = [r["stratum"] for r in result.per_step[0].strata["classes"]]
    assert names == ["other", "vowel", "space", "newline"]


def test_classes_file_can_name_the_mlm_mask_token(tmp_path):
    task = get_task("text-mlm", **TASK_OPTIONS)  # byte vocabulary: the mask is the extra id 256
    assert task.decode(torch.tensor([104, 256, 256, 105])) == "h<mask><mask>i"
    classes = tmp_path / "classes.tsv"
    classes.write_text("<mask>\tmask\ne\tvowel\n")
    labels, names = load_classes(classes, task)
    assert names == ["other", "mask", "vowel"]
    assert labels[task.mask_id] == 1 and labels[ord("e")] == 2 and len(labels) == 257


def test_missing_step_is_reported_not_guessed(runs, tmp_path):
    partial = tmp_path / "b_partial"
    shutil.copytree(runs["b"], partial)
    shutil.rmtree(partial / "checkpoints" / "step00000003")
    result = _analyse([runs["a"], partial])
    assert result.steps == [0, 1, 6]
    assert result.missing_steps == {str(partial): [3]}
    with pytest.raises(ConfigError, match="step 3 is not in every run"):
        _analyse([runs["a"], partial], steps=[3])


def test_hf_step_dirs_are_read_like_a_suite(runs, tmp_path):
    suites = []
    for name in ("a", "b"):
        suite = tmp_path / name
        for step in (0, 6):
            shutil.copytree(runs[name] / "checkpoints" / f"step{step:08d}", suite / f"step{step}")
        suites.append(suite)
    with pytest.raises(ConfigError, match="--task"):
        _analyse(suites)
    result = _analyse(suites, task="text", task_options=TASK_OPTIONS)
    reference = _analyse([runs["a"], runs["b"]], steps=[0, 6])
    assert result.steps == [0, 6]
    assert [s.kl for s in result.per_step] == pytest.approx([s.kl for s in reference.per_step], rel=1e-6)


def test_classifier_runs_use_block_hooks_for_layers(tmp_path):
    paths = []
    for seed in (0, 1):
        config = TrainConfig(task="digits", model="mlp", model_options={"widths": [32, 32]}, seed=seed, steps=6,
                             batch_size=32, checkpoints=[0, 6], eval_every=6)
        paths.append(fit(config, tmp_path / f"mlp{seed}").run_dir)
    same = _analyse([paths[0], paths[0]])
    assert same.layers == ["hidden.0", "hidden.1"]
    assert all(s.kl == 0.0 and s.similarity["gram"] == pytest.approx([1.0, 1.0]) for s in same.per_step)
    stacked, looped = _analyse(paths), _analyse(paths, batched=False)
    assert stacked.per_step[-1].kl > 0
    assert stacked.per_step[-1].kl == pytest.approx(looped.per_step[-1].kl, rel=1e-5)
    assert "frequency" not in stacked.per_step[0].strata  # digits has no token stream


# -- phases and regimes on synthetic curves ----------------------------------------------------


def _four_phase(x: float) -> float:
    if x < 1.0:
        return 1.0
    if x < 2.0:
        return 1.0 - 0.8 * (x - 1.0)
    if x < 3.0:
        return 0.2 + 1.5 * (x - 2.0)
    return 1.7 - 0.3 * (x - 3.0)


@pytest.mark.parametrize("noise_seed", [0, 1, 2])
def test_phase_detector_recovers_known_boundaries_with_noise(noise_seed):
    steps = sorted({0, *[round(10 ** (i / 8)) for i in range(33)]})  # 10^0 .. 10^4, 8 per decade
    x = [math.log10(s + 1) for s in steps]
    g = torch.Generator().manual_seed(noise_seed)
    y = [_four_phase(v) + 0.03 * float(torch.randn(1, generator=g)) for v in x]
    fit = detect_phases(steps, y)
    assert [p["name"] for p in fit.phases] == list(PHASES) and fit.missing == []
    for boundary, true_x in zip(fit.boundaries, (1.0, 2.0, 3.0)):
        nearest = min(range(len(x)), key=lambda i: abs(x[i] - true_x))
        assert abs(steps.index(boundary.step) - nearest) <= 1, (boundary, steps[nearest])
        assert boundary.confidence > 0.5
    assert fit.r2 > 0.95


def test_phase_detector_reports_phases_the_curve_does_not_reach():
    steps = sorted({0, *[round(10 ** (i / 8)) for i in range(21)]})  # up to 10^2.5: no reconvergence yet
    g = torch.Generator().manual_seed(3)
    y = [_four_phase(math.log10(s + 1)) + 0.02 * float(torch.randn(1, generator=g)) for s in steps]
    fit = detect_phases(steps, y)
    assert [p["name"] for p in fit.phases] == list(PHASES[:3])
    assert fit.missing == ["slow reconvergence"]


def test_phase_detector_skips_a_phase_the_curve_lacks():
    steps = sorted({0, *[round(10 ** (i / 8)) for i in range(25)]})
    g = torch.Generator().manual_seed(4)
    y = [(0.1 if s < 30 else 0.1 + 0.5 * (math.log10(s + 1) - math.log10(31)))
         + 0.01 * float(torch.randn(1, generator=g)) for s in steps]  # flat, then only rising
    fit = detect_phases(steps, y)
    assert [p["name"] for p in fit.phases] == ["initial uniform", "sharp divergence"]
    assert fit.missing == ["sharp convergence", "slow reconvergence"]
    assert abs(steps.index(fit.boundaries[0].step) - steps.index(min(steps, key=lambda s: abs(s - 30)))) <= 1


def test_seed_regimes_and_synchronisation_spread():
    steps = list(range(0, 101, 5))
    shifts = [30, 40, 50]
    curves = torch.tensor([[1 / (1 + math.exp(-(s - c) / 3)) for s in steps] for c in shifts])
    regimes = seed_regimes(steps, curves)
    transition = [c["transition"] for c in regimes.crossings]
    stable = [c["stable"] for c in regimes.crossings]
    assert transition == sorted(transition) and stable == sorted(stable)
    assert regimes.spread["stable"] == pytest.approx(20, abs=2)
    assert regimes.resolution == {"transition": 5, "stable": 5}  # checkpoint spacing around the crossings
    assert regimes.labels[0][0] == "chaotic" and regimes.labels[2][-1] == "stable"
    assert regimes.labels[2][steps.index(50)] == "transition"


# -- CLI and recipe ----------------------------------------------------------------------------


def test_cli_writes_json_with_plain_keys_and_plots(runs, tmp_path):
    out = tmp_path / "result.json"
    code = main(["converge", str(runs["a"]), str(runs["b"]), "--probe", "4", "--batch-size", "4",
                 "--json", str(out), "--plot", str(tmp_path / "plots")])
    assert code == 0
    data = json.loads(out.read_text())
    assert {"kl", "fingerprints", "loss_cv", "phases", "regimes"} <= set(data)
    assert set(data["fingerprints"]["mean"]) == set(SIMILARITIES) and data["regimes"]["source"] == "gram"
    assert data["loss"]["std_is"].startswith("sample std (ddof=1)")
    assert data["steps"] == STEPS and len(data["kl"]["mean"]) == len(STEPS)
    assert (tmp_path / "plots" / "convergence.png").stat().st_size > 0
    assert (tmp_path / "plots" / "fingerprint.png").stat().st_size > 0
    assert main(["converge", str(runs["a"]), str(runs["b"]), "--json", str(out)]) == 2  # exists


def test_cli_steps_and_classes_options(runs, tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"e": "vowel", "id:32": "space"}))
    out = tmp_path / "r.json"
    assert main(["converge", str(runs["a"]), str(runs["b"]), "--steps", "0,6", "--classes", str(classes),
                 "--probe", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["steps"] == [0, 6]
    assert [r["stratum"] for r in data["kl"]["strata"]["classes"]] == ["other", "vowel", "space"]
    assert main(["converge", str(runs["a"]), str(runs["b"]), "--steps", "5"]) == 2  # not a common step
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no such token": "x"}))
    assert main(["converge", str(runs["a"]), str(runs["b"]), "--classes", str(bad)]) == 2


def test_cli_needs_two_runs(runs):
    assert main(["converge", str(runs["a"])]) == 2


def test_recipe_in_repo_parses_and_unknown_keys_are_errors(tmp_path):
    recipe = load_converge_recipe(Path(__file__).parent.parent / "recipes" / "converge-tiny-gpt.toml")
    assert isinstance(recipe, ConvergeRecipe) and len(recipe.converge.seeds) == 3
    assert recipe.train.model == "gpt_neox"
    bad = tmp_path / "bad.toml"
    bad.write_text('[converge]\nseeds = [0, 1]\n[train]\ntask = "text"\nstpes = 5\n')
    with pytest.raises(ConfigError, match="train.stpes: unknown key"):
        load_converge_recipe(bad)


def test_cli_options_override_the_recipe(tmp_path, monkeypatch):
    import lmctk.dynamics.converge.analysis

    class Analysed(Exception):
        pass

    def analyse(runs, task, **kw):
        raise Analysed(kw)

    monkeypatch.setattr(lmctk.dynamics.converge.recipe, "train_seeds", lambda spec, out, **kw: [out / "seed0", out / "seed1"])
    monkeypatch.setattr(lmctk.dynamics.converge.analysis, "converge", analyse)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('[converge]\nseeds = [0, 1]\nprobe = 4\nbatch_size = 4\nregimes = "cka"\n'
                      '[train]\ntask = "text"\nmodel = "gpt_neox"\nsteps = 8\n')
    with pytest.raises(Analysed) as got:
        main(["converge", "--recipe", str(recipe), "--out", str(tmp_path / "runs"), "--probe", "2",
              "--regimes", "aligned"])
    kw = got.value.args[0]
    assert (kw["probe"], kw["batch_size"], kw["regimes_from"]) == (2, 4, "aligned")


@pytest.mark.slow
def test_cli_trains_the_repo_recipe_shrunk_by_set_overrides_then_analyses(tmp_path):
    recipe = Path(__file__).parent.parent / "recipes" / "converge-tiny-gpt.toml"
    shrink = ["converge.seeds=[0, 1]", "converge.log_checkpoints=3", "converge.probe=4", "converge.batch_size=4",
              "train.task_options={ seq_len = 16, eval_windows = 8 }", "train.steps=8", "train.batch_size=4",
              "train.warmup=2", "train.eval_every=8",
              "train.model_options={ layers = 1, hidden = 16, heads = 2, intermediate = 32, initializer_range = 0.1 }"]
    out = tmp_path / "runs"
    assert main(["converge", "--recipe", str(recipe), "--out", str(out), "--json", str(tmp_path / "r.json"),
                 *[a for item in shrink for a in ("--set", item)]]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["steps"] == [0, 1, 3, 8] and (out / "plots" / "convergence.png").is_file()
    assert (out / "seed0" / "manifest.json").is_file() and (out / "seed1" / "manifest.json").is_file()
    assert main(["converge", str(out / "seed0"), str(out / "seed1"), "--set", "train.steps=4"]) == 2  # no --recipe


# -- basis-free fingerprints, streaming, checkpoint suites ----------------------------------------


def _neox(seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=256, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=64)).eval()


def test_permuted_copy_has_gram_and_aligned_cosine_one_and_raw_cosine_near_zero(tmp_path):
    from lmctk.spec import permute_state, random_perms, spec_for

    seeds = [tmp_path / "seed_a", tmp_path / "seed_b"]
    for step in (0, 10):
        model = _neox(step).to(torch.bfloat16)  # saved in bf16, upcast to fp32 for the evaluation
        model.save_pretrained(seeds[0] / f"step{step}")
        spec = spec_for(model)
        perms = random_perms(spec, torch.Generator().manual_seed(step))
        model.load_state_dict(permute_state(model.state_dict(), spec, perms))
        model.save_pretrained(seeds[1] / f"checkpoint-{step}")
    result = _analyse(seeds, task="text", task_options=TASK_OPTIONS)
    assert result.steps == [0, 10] and result.layers == ["embed", "layer1", "layer2"]
    for s in result.per_step:
        assert s.kl == pytest.approx(0.0, abs=1e-5)  # the same function
        assert s.similarity["gram"] == pytest.approx([1.0] * 3, abs=1e-6)
        assert s.similarity["aligned"] == pytest.approx([1.0] * 3, abs=1e-6)
        assert all(abs(v) < 0.3 for v in s.similarity["raw"]), s.similarity["raw"]  # basis-dependent


def test_each_step_is_reduced_before_the_next_is_evaluated(runs, monkeypatch):
    import weakref

    from lmctk.dynamics.converge.analysis import Evaluator

    alive, run = [], Evaluator.run

    def tracked(self, dirs, diversity=False):
        assert all(ref() is None for ref in alive), "a previous step's per-token outputs are still held"
        out = run(self, dirs, diversity)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(Evaluator, "run", tracked)
    result = _analyse([runs["a"], runs["b"]])
    assert len(alive) == len(STEPS) and result.steps == STEPS


def test_counts_file_sets_the_frequency_strata(runs, tmp_path):
    counts = tmp_path / "counts.txt"
    counts.write_text(" ".join(["0"] * 97 + ["5000"]))  # only 'a' (id 97) was ever seen
    result = _analyse([runs["a"], runs["b"]], counts=counts)
    rows = {r["stratum"]: r["count"] for r in result.per_step[0].strata["frequency"]}
    assert set(rows) == {"unseen", "1-9", "10-99", "100-999", "1000-9999"}
    assert rows["1000-9999"] == int((result_targets := _targets(runs)).eq(97).sum()) and rows["1-9"] == 0
    assert sum(rows.values()) == len(result_targets)
    counts.write_text(" ".join(["1"] * 300))
    with pytest.raises(ConfigError, match="300 counts but task 'text' has a vocabulary of 256"):
        _analyse([runs["a"], runs["b"]], counts=counts)


def _targets(runs) -> torch.Tensor:
    task = get_task("text", **TASK_OPTIONS)
    from lmctk.dynamics.converge.analysis import _scored_positions

    return torch.cat(_scored_positions(task.eval_batches("test", "cpu", 4))[1])


def _bench():
    import importlib.util

    path = Path(__file__).parent.parent / "benchmarks" / "bench_converge_memory.py"
    spec = importlib.util.spec_from_file_location("bench_converge_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_reads_a_checkpoint_suite_with_a_local_tokenizer_in_flat_memory(tmp_path):
    bench = _bench()
    seeds = bench.build_suite(tmp_path, seeds=3, steps=bench.STEPS, text_bytes=20 * 64 * 64 + 1)
    shutil.copytree(seeds[0] / "step1000", seeds[0] / "step1500")  # a step the other seeds lack
    counts = tmp_path / "counts.txt"
    counts.write_text(" ".join(["7"] * 256))
    out = tmp_path / "r.json"
    assert main(["converge", *map(str, seeds), "--task", "text", "--task-opt", f"path={tmp_path / 'eval.txt'}",
                 "--task-opt", f"tokenizer={tmp_path / 'tokenizer'}", "--counts", str(counts), "--probe", "4",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["steps"] == bench.STEPS and data["missing_steps"] == {str(seeds[1]): [1500], str(seeds[2]): [1500]}
    assert all(math.isfinite(v) and v > 0 for v in data["kl"]["mean"])  # bf16 weights, fp32 KL
    assert [r["stratum"] for r in data["kl"]["strata"]["frequency"] if r["count"]] == ["1-9"]
    few, many = (bench.peak_rss(tmp_path, seeds, bench.STEPS[-n:], 64) for n in (4, 12))
    assert many < few + 20, (few, many)  # MB: nothing per step is kept


def test_masked_lm_suite_of_bf16_hf_dirs_is_read_through_text_mlm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=257, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,  # bytes + mask id
                        intermediate_size=32, max_position_embeddings=64)
    for seed in (0, 1):
        for step in (0, 5, 50):
            torch.manual_seed(100 * seed + step)
            BertForMaskedLM(config).to(torch.bfloat16).save_pretrained(tmp_path / f"seed{seed}" / f"checkpoint-{step}")
    result = _analyse([tmp_path / "seed0", tmp_path / "seed1"], task="text-mlm", task_options=TASK_OPTIONS)
    assert result.steps == [0, 5, 50] and result.layers == ["embed", "layer1"]
    assert all(math.isfinite(s.kl) and s.kl > 0 for s in result.per_step)
