"""The trainer: same seed ⇒ same weights, resume ⇒ same weights, one run's RNG never leaks into another."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmctk.errors import ConfigError, OutputExistsError
from lmctk.io import load_state
from lmctk.rundir import RunDir
from lmctk.train import (
    TrainConfig,
    Trainer,
    fit,
    load_run_model,
    log_spaced_steps,
    lr_at,
)


def small_mlp(**kw) -> TrainConfig:
    base = dict(task="digits", model="mlp", model_options={"widths": [32]}, steps=30, batch_size=32,
                eval_every=10, optimizer="sgd", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def tiny_gpt2(**kw) -> TrainConfig:
    base = dict(task="text", task_options={"seq_len": 16}, model="gpt2",
                model_options={"layers": 1, "hidden": 32, "heads": 2, "dropout": 0.1},
                steps=12, batch_size=4, eval_every=6, optimizer="adamw", lr=3e-3, warmup=3)
    base.update(kw)
    return TrainConfig(**base)


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_gives_identical_weights(tmp_path):
    fit(small_mlp(), tmp_path / "a")
    fit(small_mlp(), tmp_path / "b")
    assert_states_equal(load_state(tmp_path / "a"), load_state(tmp_path / "b"))


def test_different_seeds_give_different_weights(tmp_path):
    fit(small_mlp(seed=0), tmp_path / "a")
    fit(small_mlp(seed=1), tmp_path / "b")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("make_config", [small_mlp, tiny_gpt2], ids=["mlp-sgd", "gpt2-adamw-dropout"])
def test_resume_gives_identical_weights(tmp_path, make_config):
    config = make_config()
    config = TrainConfig(**{**config.to_dict(), "checkpoints": [config.steps // 2]})
    fit(config, tmp_path / "straight")

    def die_after_checkpoint(step, total, record):
        if step == config.steps // 2 + 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(config, tmp_path / "killed", progress=die_after_checkpoint)
    result = fit(config, tmp_path / "killed", resume=True)
    assert result.resumed_from == config.steps // 2
    assert_states_equal(load_state(tmp_path / "straight"), load_state(tmp_path / "killed"))


def test_foreign_global_rng_use_does_not_change_training(tmp_path):
    """Dropout draws from the run's own RNG: other code using torch's global RNG cannot perturb it."""
    config = tiny_gpt2(steps=6)
    fit(config, tmp_path / "a")
    fit(config, tmp_path / "b", progress=lambda *_: torch.rand(1000))
    assert_states_equal(load_state(tmp_path / "a"), load_state(tmp_path / "b"))


def test_dropout_makes_steps_stochastic_but_seeded():
    """With dropout on, the same batch gives different losses on consecutive steps (the stream advances)."""
    trainer = Trainer(tiny_gpt2())
    batch = trainer.batch(0)
    trainer.model.train()
    with trainer.dropout_rng.active():
        l1 = trainer.task.loss(trainer.model(**batch.inputs).logits, batch)
        l2 = trainer.task.loss(trainer.model(**batch.inputs).logits, batch)
    assert l1.item() != l2.item()


def test_digits_mlp_reaches_90_percent(tmp_path):
    result = fit(TrainConfig(task="digits", model="mlp", steps=300, seed=0), tmp_path / "run")
    assert result.final["test"]["accuracy"] >= 0.90


def test_run_dir_layout_and_journal(tmp_path):
    config = small_mlp(checkpoints=[0, 10])
    fit(config, tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    manifest = run.manifest()
    assert manifest["config"] == config.to_dict()
    assert manifest["environment"]["torch"] == torch.__version__
    assert run.checkpoint_steps() == [0, 10, 30]
    records = run.records()
    assert {(r["step"], r["split"]) for r in records} == {(s, sp) for s in (0, 10, 20, 30) for sp in ("train", "test")}
    assert all({"step", "split", "loss", "accuracy"} <= r.keys() for r in records)
    assert (run.checkpoint_dir(10) / "trainer.safetensors").is_file()


def test_torn_journal_line_is_ignored(tmp_path):
    fit(small_mlp(steps=10), tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    n = len(run.records())
    with open(run.journal_path, "a") as f:
        f.write('{"step": 11, "spl')
    assert len(run.records()) == n


def test_append_after_a_torn_line_keeps_every_new_record(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.append({"step": 1})
    with open(run.journal_path, "a") as f:
        f.write('{"step": 2, "spl')  # a kill mid-write
    run.append({"step": 3})
    run.append({"step": 4})
    assert run.records() == [{"step": 1}, {"step": 3}, {"step": 4}]


def test_corrupt_middle_journal_line_is_an_error_naming_file_and_line(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.journal_path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl: line 2 is not JSON"):
        run.records()


def test_existing_run_dir_is_refused_without_overwrite(tmp_path):
    fit(small_mlp(steps=5), tmp_path / "run")
    before = (tmp_path / "run" / "manifest.json").read_text()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        fit(small_mlp(steps=5, seed=3), tmp_path / "run")
    assert (tmp_path / "run" / "manifest.json").read_text() == before
    fit(small_mlp(steps=5, seed=3), tmp_path / "run", overwrite=True)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["seed"] == 3


def test_resume_with_other_config_is_refused(tmp_path):
    fit(small_mlp(steps=5), tmp_path / "run")
    with pytest.raises(ConfigError, match="different config"):
        fit(small_mlp(steps=5, lr=0.5), tmp_path / "run", resume=True)


def test_hf_checkpoint_dir_loads_with_transformers(tmp_path):
    fit(tiny_gpt2(steps=2, warmup=1), tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    ckpt = run.checkpoint_dir(run.checkpoint_steps()[-1])
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    model, _, _ = load_run_model(tmp_path / "run")
    mine = model.state_dict()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, mine[k]), k


def test_lr_schedule_warmup_then_cosine_to_zero():
    c = TrainConfig(steps=100, warmup=10, lr=1.0, schedule="cosine")
    assert lr_at(c, 0) == pytest.approx(0.1)
    assert lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 10) == pytest.approx(1.0)
    assert lr_at(c, 55) == pytest.approx(0.5)
    assert lr_at(c, 100) == pytest.approx(0.0, abs=1e-12)
    lin = TrainConfig(steps=100, warmup=0, lr=1.0, schedule="linear")
    assert lr_at(lin, 50) == pytest.approx(0.5)


def test_log_spaced_checkpoints_cover_start_and_end():
    steps = log_spaced_steps(8, 1000)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000
    assert steps == sorted(set(steps))
    ratios = [b / a for a, b in zip(steps[1:], steps[2:])]
    assert max(ratios) / min(ratios) < 1.5  # evenly spaced in log(step)


@pytest.mark.parametrize("field,value", [("optimizer", "adam"), ("schedule", "step"), ("steps", -1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_init_from_starts_a_fine_tune_from_the_base_weights(tmp_path):
    fit(small_mlp(steps=10), tmp_path / "base")
    tuned = small_mlp(steps=5, seed=9, init_from=str(tmp_path / "base"), checkpoints=[0])
    fit(tuned, tmp_path / "ft")
    run = RunDir.open(tmp_path / "ft")
    assert_states_equal(load_state(run.checkpoint_dir(0)), load_state(tmp_path / "base"))
    import shutil

    shutil.rmtree(tmp_path / "base")  # a fine-tune loads without its base
    model, _, _ = load_run_model(tmp_path / "ft")
    assert_states_equal(model.state_dict(), load_state(tmp_path / "ft"))


def test_init_from_another_architecture_names_the_mismatch(tmp_path):
    from lmctk.errors import ShapeMismatchError

    fit(small_mlp(steps=2), tmp_path / "base")
    with pytest.raises(ShapeMismatchError, match="hidden.0"):
        fit(small_mlp(steps=2, model_options={"widths": [16]}, init_from=str(tmp_path / "base")), tmp_path / "ft")


def test_building_a_trainer_leaves_the_process_rng_alone():
    """Init and dropout streams are private: the global CPU (and every CUDA) generator is untouched."""
    torch.manual_seed(123)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    Trainer(tiny_gpt2())
    assert torch.equal(torch.get_rng_state(), cpu)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all() if cuda else [], cuda))
