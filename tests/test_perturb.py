"""Perturbations: zero ⇒ twins stay bitwise identical; any non-zero kind ⇒ twins end apart; noise is seeded."""

from __future__ import annotations

import math

import pytest
import torch

from lmctk.dynamics.butterfly.perturb import (
    PerturbConfig,
    gaussian_noise,
    init_stds,
    inject,
)
from lmctk.dynamics.butterfly.twins import MeasureConfig, run_perturbed
from lmctk.errors import ConfigError
from lmctk.train import TrainConfig, Trainer

LIGHT = MeasureConfig(points=3, final_points=3, align=False, cka=False)


def mlp_config(**kw) -> TrainConfig:
    base = dict(task="digits", model="mlp", model_options={"widths": [16]}, steps=12, batch_size=16,
                optimizer="sgd", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def gpt_config(**kw) -> TrainConfig:
    base = dict(task="text", task_options={"seq_len": 8}, model="gpt2",
                model_options={"layers": 1, "hidden": 16, "heads": 2, "dropout": 0.1},
                steps=6, batch_size=2, optimizer="adamw", lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def parent_at(config: TrainConfig, t: int) -> Trainer:
    parent = Trainer(config)
    for _ in range(t):
        parent.train_step()
    return parent


@pytest.mark.parametrize("kind", ["gaussian", "batch", "data_order"])
def test_zero_perturbation_keeps_twins_bitwise_identical(kind):
    config = mlp_config()
    parent = parent_at(config, 3)
    result = run_perturbed(parent, PerturbConfig(kind=kind, scale=0.0, seed=1), config.steps, LIGHT,
                           init_stds(Trainer(config).model))
    assert result["final"]["bitwise_equal"]
    assert result["final"]["l2"] == 0.0
    assert result["final"]["barrier"]["loss"]["mean_endpoint"] == 0.0


@pytest.mark.parametrize("kind", ["gaussian", "batch", "data_order"])
def test_every_nonzero_kind_separates_twins(kind):
    config = mlp_config()
    parent = parent_at(config, 3)
    result = run_perturbed(parent, PerturbConfig(kind=kind, scale=1e-3, seed=1), config.steps, LIGHT,
                           init_stds(Trainer(config).model))
    assert result["final"]["l2"] > 0
    assert not result["final"]["bitwise_equal"]


def test_dropout_seed_separates_twins_of_a_model_with_dropout():
    config = gpt_config()
    parent = parent_at(config, 2)
    zero = run_perturbed(parent, PerturbConfig(kind="dropout", scale=0.0, seed=1), config.steps, LIGHT, None)
    other = run_perturbed(parent, PerturbConfig(kind="dropout", scale=1.0, seed=1), config.steps, LIGHT, None)
    assert zero["final"]["bitwise_equal"]
    assert other["final"]["l2"] > 0


def test_dropout_perturbation_without_dropout_is_an_error():
    with pytest.raises(ConfigError, match="no dropout"):
        inject(Trainer(mlp_config()), PerturbConfig(kind="dropout", scale=1.0))


def test_gaussian_noise_is_seeded_and_scaled_by_init_std():
    model = Trainer(mlp_config()).model
    std = init_stds(model)
    spec = PerturbConfig(scale=0.5, seed=7)
    a, b = gaussian_noise(model, spec, std), gaussian_noise(model, spec, std)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = gaussian_noise(model, PerturbConfig(scale=0.5, seed=8), std)
    assert not torch.equal(a["hidden.0.weight"], c["hidden.0.weight"])
    w = a["hidden.0.weight"]
    assert float(w.std()) == pytest.approx(0.5 * std["hidden.0.weight"], rel=0.05)


def test_realised_norm_is_logged_and_matches_the_weight_change():
    trainer = Trainer(mlp_config())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    info = inject(trainer, PerturbConfig(scale=0.1, seed=3), init_stds(trainer.model)).info
    after = trainer.model.state_dict()
    moved = math.sqrt(sum(float((after[k] - before[k]).double().square().sum()) for k in before))
    assert info["norm"] == pytest.approx(moved, rel=1e-5)
    assert info["norm"] > 0


def test_fraction_can_perturb_a_single_weight():
    trainer = Trainer(mlp_config())
    info = inject(trainer, PerturbConfig(scale=1.0, fraction=1e-9, ref="absolute", seed=3)).info
    assert info["perturbed"] == 1


def test_include_and_exclude_patterns_select_parameters():
    model = Trainer(mlp_config()).model
    noise = gaussian_noise(model, PerturbConfig(scale=1.0, ref="absolute", include=["hidden.*"], exclude=["*.bias"]), None)
    assert list(noise) == ["hidden.0.weight"]
    with pytest.raises(ConfigError, match="select no parameter"):
        gaussian_noise(model, PerturbConfig(scale=1.0, ref="absolute", include=["nothing*"]), None)


def test_param_norm_reference_scales_with_the_current_weights():
    model = Trainer(mlp_config()).model
    noise = gaussian_noise(model, PerturbConfig(scale=0.1, ref="param_norm", include=["hidden.0.weight"]), None)
    w = model.hidden[0].weight
    assert float(noise["hidden.0.weight"].norm()) == pytest.approx(0.1 * float(w.detach().norm()), rel=0.05)


def test_bad_spec_values_are_config_errors():
    with pytest.raises(ConfigError, match="scale"):
        PerturbConfig(scale=-1.0)
    with pytest.raises(ConfigError, match="fraction"):
        PerturbConfig(scale=1.0, fraction=0.0)


@pytest.mark.parametrize("family, dropout, expected", [("gpt2", 0.0, False), ("gpt_neox", 0.0, False),
                                                       ("gpt2", 0.1, True), ("llama", 0.1, True)])
def test_has_dropout_reads_the_family_dropout_fields_only(family, dropout, expected):
    # GPT-2's summary_first_dropout and NeoX's classifier_dropout are unused by LM heads; Llama drops out
    # functionally (no nn.Dropout module), so only its config field says so.
    from lmctk.models import build_model, has_dropout
    from lmctk.tasks import get_task

    model = build_model(family, get_task("text", seq_len=8), layers=1, hidden=16, heads=2, dropout=dropout)
    assert has_dropout(model) is expected


def test_partial_batch_replacement_keeps_the_masks_of_the_rows_kept():
    from lmctk.dynamics.butterfly.perturb import replacement_batch

    trainer = Trainer(TrainConfig(task="text-mlm", model="bert", model_options={"layers": 1, "hidden": 16, "heads": 2},
                                  steps=4, batch_size=8))
    own = trainer.batch(trainer.step)
    swapped, replaced = replacement_batch(trainer, PerturbConfig(kind="batch", scale=1.0, fraction=0.5, seed=3))
    assert replaced == 4
    kept = slice(replaced, None)
    assert torch.equal(swapped.inputs["input_ids"][kept], own.inputs["input_ids"][kept])
    assert torch.equal(swapped.targets[kept], own.targets[kept])
