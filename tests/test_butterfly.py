"""Twins: forks are independent exact copies, the preflight catches nondeterminism, measurements and σ*."""

from __future__ import annotations

import math

import pytest
import torch

from lmctk.dynamics.butterfly.perturb import PerturbConfig, init_stds
from lmctk.dynamics.butterfly.report import phase_label, sigma_star
from lmctk.dynamics.butterfly.twins import (
    DeterminismError,
    MeasureConfig,
    measure,
    measure_steps,
    run_perturbed,
    verify_twins,
)
from lmctk.train import TrainConfig, Trainer, deterministic


def mlp_config(**kw) -> TrainConfig:
    base = dict(task="digits", model="mlp", model_options={"widths": [16]}, steps=12, batch_size=16,
                optimizer="sgd", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fork_then_train_equals_training_straight_through(optimizer):
    config = mlp_config(optimizer=optimizer)
    straight = Trainer(config)
    for _ in range(8):
        straight.train_step()
    parent = Trainer(config)
    for _ in range(4):
        parent.train_step()
    child = parent.fork()
    for _ in range(4):
        child.train_step()
    assert child.step == 8 and states_equal(child.model, straight.model)
    assert parent.step == 4 and not states_equal(parent.model, child.model)  # the parent did not move


def test_fork_shares_no_tensor_with_its_parent():
    parent = Trainer(mlp_config())
    parent.train_step()
    child = parent.fork()
    ptrs = {p.data_ptr() for p in parent.model.parameters()}
    ptrs |= {v.data_ptr() for s in parent.optimizer.state.values() for v in s.values() if torch.is_tensor(v)}
    assert not ptrs & {p.data_ptr() for p in child.model.parameters()}
    assert not ptrs & {v.data_ptr() for s in child.optimizer.state.values() for v in s.values() if torch.is_tensor(v)}


def test_fork_with_other_seeds_changes_only_those_streams():
    parent = Trainer(mlp_config())
    child = parent.fork()
    child.set_data_seed(123)
    assert child.data_seed == 123 and parent.data_seed != 123
    assert not torch.equal(child.data_order.indices(0), parent.data_order.indices(0))


def test_verify_twins_passes_on_cpu():
    with deterministic():
        check = verify_twins(Trainer(mlp_config()), steps=3)
    assert check["ok"] and check["steps"] == 3


def test_verify_twins_stops_nondeterministic_training_with_an_explanation():
    trainer = Trainer(mlp_config())
    calls = [0]

    def leak(_module, _inputs, output):  # shared across deep copies: twins see different values
        calls[0] += 1
        return output + 1e-3 * calls[0]

    trainer.model.register_forward_hook(leak)
    with pytest.raises(DeterminismError, match="not deterministic"):
        verify_twins(trainer, steps=2)


def test_deterministic_mode_restores_settings():
    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    with deterministic():
        assert torch.backends.cudnn.benchmark is False and torch.backends.cuda.matmul.allow_tf32 is False
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before


def test_final_measurement_has_both_barriers_aligned_cka_and_disagreement():
    config = mlp_config(model_options={"widths": [16, 16]})
    a, b = Trainer(config), Trainer(TrainConfig(**{**config.to_dict(), "seed": 1}))
    for _ in range(10):
        a.train_step(), b.train_step()
    m = measure(a.model, b.model, a.task, MeasureConfig(points=5, final_points=5, probe=64), final=True)
    for path in (m, m["aligned"]):
        assert set(path["barrier"]) == {"loss", "error"}
        assert set(path["barrier"]["loss"]) == {"mean_endpoint", "linear"}
    assert m["aligned"]["l2"] < m["l2"]  # weight matching brings B closer
    assert set(m["cka"]) == {"hidden.0", "hidden.1", "out"}
    for layer, value in m["cka"].items():
        assert -1.0 <= value <= 1.0 + 1e-9
        assert m["angular_cka"][layer] == pytest.approx(math.acos(min(value, 1.0)))
    assert 0.0 < m["disagreement"] < 1.0
    same = measure(a.model, a.model, a.task, MeasureConfig(points=3, final_points=3, probe=64), final=True)
    assert same["disagreement"] == 0.0 and same["l2"] == 0.0 and same["bitwise_equal"]
    assert all(v == pytest.approx(1.0) for v in same["cka"].values())


def test_measure_steps_cover_fork_every_n_and_end():
    assert measure_steps(0, 100, 40) == [0, 40, 80, 100]
    assert measure_steps(30, 100, 40) == [30, 40, 80, 100]
    assert measure_steps(30, 100, 0) == [30, 100]
    assert measure_steps(30, 100, 0, [10, 35]) == [30, 35, 100]


def test_sigma_star_is_fitted_on_log10_sigma():
    star, how = sigma_star([0.01, 0.1, 1.0], [0.0, 0.1, 0.3], 0.2)
    assert how == "fit" and star == pytest.approx(10 ** -0.5)
    assert sigma_star([0.01, 0.1], [0.5, 0.6], 0.2) == (None, "below")
    assert sigma_star([0.01, 0.1], [0.0, 0.1], 0.2) == (None, "above")
    assert [phase_label(h) for h in ("below", "fit", "above")] == ["chaotic", "transition", "stable"]


@pytest.mark.slow
def test_early_perturbation_leaves_a_larger_barrier_than_a_late_one():
    config = mlp_config(model_options={"widths": [32]}, steps=150, batch_size=32)
    std = init_stds(Trainer(config).model)
    light = MeasureConfig(points=11, final_points=11, align=False, cka=False)
    finals = {}
    for t in (0, 100):
        parent = Trainer(config)
        for _ in range(t):
            parent.train_step()
        r = run_perturbed(parent, PerturbConfig(scale=3.0, seed=5), config.steps, light, std)
        finals[t] = r["final"]["barrier"]["loss"]["mean_endpoint"]
    assert finals[0] > 2 * finals[100]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_vmapped_replicas_match_sequential_runs(optimizer):
    from lmctk.train.replicas import Replicas

    config = mlp_config(optimizer=optimizer, steps=10, weight_decay=1e-3, lr=0.05 if optimizer == "sgd" else 1e-2)
    reps = Replicas(config, seeds=[0, 1, 2])
    for _ in range(10):
        reps.train_step()
    for k, seed in enumerate([0, 1, 2]):
        single = Trainer(TrainConfig(**{**config.to_dict(), "seed": seed}))
        for _ in range(10):
            single.train_step()
        ref = single.model.state_dict()
        got = reps.state_dict(k)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5)


def test_twin_a_read_from_the_parent_run_gives_the_same_trial_as_retraining_it():
    from lmctk.dynamics.butterfly.twins import measure_steps

    config = mlp_config()
    light = MeasureConfig(every=4, points=3, final_points=3, align=False, cka=False)
    straight, states = Trainer(config), {}
    for step in range(config.steps + 1):
        states[step] = {k: v.clone() for k, v in straight.model.state_dict().items()}
        if step < config.steps:
            straight.train_step()
    skeleton = Trainer(config).model

    def reference(step):
        assert step in measure_steps(4, config.steps, 4)
        skeleton.load_state_dict(states[step])
        return skeleton

    parent = Trainer(config)
    for _ in range(4):
        parent.train_step()
    std = init_stds(Trainer(config).model)
    spec = PerturbConfig(scale=0.5, seed=2)
    lockstep = run_perturbed(parent, spec, config.steps, light, std)
    saved = run_perturbed(parent, spec, config.steps, light, std, reference=reference)
    lockstep.pop("seconds"), saved.pop("seconds")
    assert saved == lockstep and len(saved["measurements"]) == 3
