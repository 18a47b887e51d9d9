"""Interpolation and barrier sweeps: formulas, batched == naive evaluation, BN reset, REPAIR, alignment."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmctk.basin.barrier import barrier_matrix, barrier_sweep, barriers
from lmctk.basin.path import alpha_grid, evaluate_path, lerp
from lmctk.basin.renorm import (
    Repair,
    calibration_batches,
    channel_stats,
    reset_batchnorm,
)
from lmctk.errors import ConfigError
from lmctk.models import build_model
from lmctk.tasks import get_task
from lmctk.tasks.base import evaluate
from lmctk.train import TrainConfig, fit, load_run_model


@pytest.fixture(scope="module")
def digits():
    return get_task("digits")


@pytest.fixture(scope="module")
def text():
    return get_task("text", seq_len=16, eval_windows=16)


def fresh(name, task, seed, **options):
    torch.manual_seed(seed)
    return build_model(name, task, **options)


def randomise_bn_stats(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(seed + 3)


def trained_pair(tmp_path_factory, model: str, steps: int, **options):
    root = tmp_path_factory.mktemp(model)
    loaded = []
    for seed in (0, 1):
        config = TrainConfig(task="digits", model=model, model_options=options, seed=seed, steps=steps,
                             batch_size=64, optimizer="sgd", lr=0.05, eval_every=10_000)
        fit(config, root / f"seed{seed}")
        loaded.append(load_run_model(root / f"seed{seed}"))
    (model_a, task, _), (model_b, _, _) = loaded
    return model_a, model_a.state_dict(), model_b.state_dict(), task


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    return trained_pair(tmp_path_factory, "mlp", 300, widths=[64])


# -- formulas -------------------------------------------------------------------------------------

def test_lerp_interpolates_floats_and_takes_integer_buffers_from_a():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(9)}
    mid = lerp(a, b, 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.0, 3.0]))
    assert int(mid["n"]) == 3
    assert torch.equal(lerp(a, b, 1.0)["w"], b["w"]) and torch.equal(lerp(a, b, 0.0)["w"], a["w"])


@pytest.mark.parametrize("points", [2, 7, 25])
def test_alpha_grid_includes_both_endpoints(points):
    grid = alpha_grid(points)
    assert len(grid) == points and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(x < y for x, y in zip(grid, grid[1:]))


def test_alpha_grid_refuses_fewer_than_two_points():
    with pytest.raises(ConfigError, match="at least 2"):
        alpha_grid(1)


def test_barrier_formulas_on_a_hand_made_curve():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    values = [1.0, 3.0, 2.5, 3.2, 3.0]
    b = barriers(alphas, values)
    assert b["mean_endpoint"] == pytest.approx(3.2 - 0.5 * (1.0 + 3.0))  # 1.2, at α = 0.75
    assert b["linear"] == pytest.approx(3.0 - (0.75 * 1.0 + 0.25 * 3.0))  # 1.5, at α = 0.25
    assert barriers(alphas, [2.0, 1.0, 0.5, 1.0, 2.0]) == {"mean_endpoint": 0.0, "linear": 0.0}


# -- batched evaluation ---------------------------------------------------------------------------

def _pair(name, task, **options):
    a, b = fresh(name, task, 0, **options), fresh(name, task, 1, **options)
    if name == "resnet20":
        randomise_bn_stats(a, 0)
        randomise_bn_stats(b, 1)
    return a, a.state_dict(), b.state_dict()


@pytest.mark.parametrize("case", ["mlp", "resnet20-batchnorm", "gpt2"])
def test_batched_evaluation_equals_the_naive_loop(case, digits, text):
    if case == "gpt2":
        task, (model, a, b) = text, _pair("gpt2", text, layers=1, hidden=32, heads=2)
    elif case == "mlp":
        task, (model, a, b) = digits, _pair("mlp", digits, widths=[32, 32])
    else:
        task, (model, a, b) = digits, _pair("resnet20", digits, width=1)
    alphas = alpha_grid(7)
    naive, info = evaluate_path(model, a, b, alphas, task, method="naive")
    assert info["method"] == "naive"
    for method, chunk in (("vmap", None), ("vmap", 3), ("inplace", None)):
        got, info = evaluate_path(model, a, b, alphas, task, method=method, chunk=chunk)
        assert info["method"] == method
        for g, n in zip(got, naive):
            assert g["loss"] == pytest.approx(n["loss"], abs=1e-5), (method, chunk)
            assert g["accuracy"] == pytest.approx(n["accuracy"], abs=1e-9), (method, chunk)
    assert naive[0]["loss"] == pytest.approx(evaluate(model, task)["loss"], abs=1e-6)


def test_auto_evaluation_stacks_when_copies_fit_and_goes_in_place_when_not(digits):
    model, a, b = _pair("mlp", digits, widths=[16])
    assert evaluate_path(model, a, b, alpha_grid(5), digits)[1]["method"] == "vmap"
    _, info = evaluate_path(model, a, b, alpha_grid(5), digits, memory=1)
    assert info["method"] == "inplace" and "in place" in info["note"]


def test_auto_times_both_paths_then_finishes_with_the_faster_one(digits):
    model, a, b = _pair("mlp", digits, widths=[16])
    alphas = alpha_grid(13)
    got, info = evaluate_path(model, a, b, alphas, digits, chunk=3)
    assert info["method"] in ("vmap", "inplace") and info["note"].startswith("auto: stacked")
    naive, _ = evaluate_path(model, a, b, alphas, digits, method="naive")
    assert [g["loss"] for g in got] == pytest.approx([n["loss"] for n in naive], abs=1e-5)


def test_evaluation_leaves_the_model_untouched(digits):
    model, a, b = _pair("mlp", digits, widths=[16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for method in ("vmap", "inplace", "naive"):
        evaluate_path(model, a, b, alpha_grid(3), digits, method=method)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())



def test_in_place_evaluation_takes_integer_buffers_from_a_not_the_model(digits):
    _, a, b = _pair("resnet20", digits, width=1)
    model = fresh("resnet20", digits, 2, width=1)
    randomise_bn_stats(model, 5)  # the skeleton's own counters differ from A's
    key = "stem.norm.num_batches_tracked"
    seen = []
    evaluate_path(model, a, b, [0.5], digits, method="inplace",
                  renorm=lambda work, _alpha: seen.append(int(work.state_dict()[key])))
    assert seen == [int(a[key])] != [int(model.state_dict()[key])]


def test_repair_leaves_the_model_it_measures_untouched(digits):
    model, a, b = _pair("mlp", digits, widths=[16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    Repair(model, b, a, calibration_batches(digits, 1, 32, 0, "cpu"), digits)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_aligned_sweep_reuses_the_raw_calibration_statistics_and_evaluation(mlps, monkeypatch):
    import lmctk.basin.path as interp
    import lmctk.basin.renorm as rn

    calls = {"batches": 0, "stats": 0, "chunk": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rn, "calibration_batches", counted("batches", rn.calibration_batches))
    monkeypatch.setattr(rn, "channel_stats", counted("stats", rn.channel_stats))
    model, a, b, task = mlps
    result = barrier_sweep(model, a, b, task, points=3, align="weight", renorm="repair", calib_batches=1)
    assert calls["batches"] == 1 and calls["stats"] == 3  # A once, B and π(B)
    monkeypatch.setattr(interp, "auto_chunk", counted("chunk", interp.auto_chunk))
    result = barrier_sweep(model, a, b, task, points=13, align="weight")
    assert calls["chunk"] == 1 and result.aligned is not None


# -- sweeps ---------------------------------------------------------------------------------------

def _all_barriers(result) -> list[float]:
    out = []
    for curve in (result.raw, result.aligned):
        if curve is not None:
            b = curve.barriers(result.alphas)
            out += [b[m][d] for m in ("loss", "error") for d in ("mean_endpoint", "linear")]
    return out


@pytest.mark.parametrize("renorm", ["none", "repair"])
def test_a_model_against_itself_has_zero_barriers(mlps, renorm):
    model, a, _, task = mlps
    result = barrier_sweep(model, a, a, task, points=5, align="weight", renorm=renorm, calib_batches=2)
    assert all(abs(v) < 1e-6 for v in _all_barriers(result))
    assert result.distance["raw"]["l2"] == 0.0
    assert result.distance["raw"]["cosine"] == pytest.approx(1.0)
    assert result.distance["aligned"]["l2"] == 0.0


def test_a_batchnorm_model_against_itself_has_zero_barriers_with_bn_reset(digits):
    model, a, _ = _pair("resnet20", digits, width=1)
    result = barrier_sweep(model, a, a, digits, points=3, renorm="bn_reset", calib_batches=2)
    assert all(abs(v) < 1e-6 for v in _all_barriers(result))
    assert result.settings["evaluation"]["method"] == "inplace"


def test_aligned_loss_barrier_is_below_raw_for_two_mlps(mlps):
    model, a, b, task = mlps
    result = barrier_sweep(model, a, b, task, points=11, align="weight")
    raw = result.raw.barriers(result.alphas)["loss"]
    aligned = result.aligned.barriers(result.alphas)["loss"]
    print(f"mlp raw loss barrier {raw}, aligned {aligned}")
    assert aligned["mean_endpoint"] < raw["mean_endpoint"]
    assert aligned["linear"] < raw["linear"]
    assert result.distance["aligned"]["l2"] < result.distance["raw"]["l2"]
    # alignment is function-preserving: the aligned path ends where the raw one does
    assert result.aligned.loss[-1] == pytest.approx(result.raw.loss[-1], abs=1e-5)


def test_activation_alignment_is_wired_and_function_preserving(mlps):
    model, a, b, task = mlps
    result = barrier_sweep(model, a, b, task, points=3, align="activation")
    assert result.settings["matching"]["method"] == "activation_matching"
    assert result.aligned.loss[-1] == pytest.approx(result.raw.loss[-1], abs=1e-5)


def test_result_serialises_with_self_explaining_keys(mlps):
    model, a, b, task = mlps
    d = json.loads(json.dumps(barrier_sweep(model, a, b, task, points=3, align="weight").to_dict()))
    assert d["alpha"] == [0.0, 0.5, 1.0]
    assert set(d["barriers"]["loss"]) == {"mean_endpoint", "linear"}
    assert d["aligned"]["barriers"]["error"]["linear"] >= 0.0
    assert len(d["loss"]) == len(d["aligned"]["accuracy"]) == 3
    assert {"raw", "aligned"} <= set(d["distance"]) and "total" in d["timings_s"]


def test_barrier_matrix_covers_every_pair_symmetrically(mlps):
    model, a, b, task = mlps
    c = lerp(a, b, 0.3)
    calls = []
    matrix = barrier_matrix(model, {"a": a, "b": b, "c": c}, task, points=3,
                            progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # one stage (the raw sweep) per pair
    assert set(matrix.pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    m = matrix.matrix("raw", "loss", "mean_endpoint")
    assert all(m[i][i] == 0.0 and m[i][j] == m[j][i] for i in range(3) for j in range(3))
    single = barrier_sweep(model, a, b, task, points=3)
    assert m[0][1] == pytest.approx(single.raw.barriers(single.alphas)["loss"]["mean_endpoint"])


def test_unknown_renorm_and_align_are_config_errors(mlps):
    model, a, b, task = mlps
    with pytest.raises(ConfigError, match="renorm"):
        barrier_sweep(model, a, b, task, renorm="bn")
    with pytest.raises(ConfigError, match="align"):
        barrier_sweep(model, a, b, task, align="perm")
    with pytest.raises(ConfigError, match="no BatchNorm"):
        barrier_sweep(model, a, b, task, renorm="bn_reset")


# -- BN reset and REPAIR --------------------------------------------------------------------------

def test_bn_reset_sweep_equals_a_naive_reset_per_alpha(digits):
    model, a, b = _pair("resnet20", digits, width=1)
    result = barrier_sweep(model, a, b, digits, points=3, renorm="bn_reset", calib_batches=2, calib_batch_size=64)
    batches = calibration_batches(digits, 2, 64, 0, "cpu")
    for alpha, loss in zip(result.alphas, result.raw.loss):
        model.load_state_dict(lerp(a, b, alpha))
        reset_batchnorm(model, batches, digits)
        assert evaluate(model, digits)["loss"] == pytest.approx(loss, abs=1e-5)


def test_calibration_batches_are_fixed_by_their_seed(digits):
    x = calibration_batches(digits, 3, 50, 7, "cpu")
    y = calibration_batches(digits, 3, 50, 7, "cpu")
    assert all(torch.equal(p.targets, q.targets) for p, q in zip(x, y))
    assert not torch.equal(x[0].targets, calibration_batches(digits, 3, 50, 8, "cpu")[0].targets)


@pytest.mark.parametrize("name,options", [
    ("mlp", {"widths": [32, 32]}),
    ("cnn", {"channels": [8, 16], "norm": "none"}),
    ("resnet20", {"width": 1, "norm": "none"}),
    ("resnet20", {"width": 1, "norm": "layernorm"}),
], ids=["mlp", "cnn", "resnet20-none", "resnet20-layernorm"])
def test_repair_gives_every_channel_the_interpolated_endpoint_statistics(digits, name, options):
    model, a, b = _pair(name, digits, **options)
    batches = calibration_batches(digits, 1, 128, 0, "cpu")  # one batch: the correction is exact
    repair = Repair(model, a, b, batches, digits)
    assert repair.layers
    model.load_state_dict(lerp(a, b, 0.5))
    with torch.no_grad():
        repair(model, 0.5)
    stats = channel_stats(model, batches, digits, repair.layers)
    for layer in repair.layers:
        (ma, sa), (mb, sb) = repair.stats_a[layer], repair.stats_b[layer]
        assert torch.allclose(stats[layer][0], 0.5 * (ma + mb), atol=1e-4), layer
        assert torch.allclose(stats[layer][1], 0.5 * (sa + sb), atol=1e-4, rtol=1e-4), layer


def test_repair_covers_hidden_layers_but_not_the_head(digits):
    model, a, b = _pair("resnet20", digits, width=1, norm="layernorm")
    layers = Repair(model, a, b, calibration_batches(digits, 1, 32, 0, "cpu"), digits).layers
    assert "head" not in layers and "stem.norm" in layers
    assert all(isinstance(dict(model.named_modules())[n], nn.GroupNorm) for n in layers)


def test_repair_refuses_batchnorm_models(digits):
    model, a, b = _pair("resnet20", digits, width=1)
    with pytest.raises(ConfigError, match="bn_reset"):
        Repair(model, a, b, calibration_batches(digits, 1, 32, 0, "cpu"), digits)


@pytest.mark.slow
def test_repair_lowers_the_midpoint_loss_of_two_mlps(mlps):
    model, a, b, task = mlps
    plain = barrier_sweep(model, a, b, task, points=3, align="weight")
    repaired = barrier_sweep(model, a, b, task, points=3, align="weight", renorm="repair")
    print(f"mlp aligned midpoint loss {plain.aligned.loss[1]:.4f}, with repair {repaired.aligned.loss[1]:.4f}")
    assert repaired.aligned.loss[1] < plain.aligned.loss[1]


@pytest.mark.slow
def test_bn_reset_raises_the_aligned_midpoint_accuracy_of_two_resnet20s(tmp_path_factory):
    model, a, b, task = trained_pair(tmp_path_factory, "resnet20", 100, width=1)
    plain = barrier_sweep(model, a, b, task, points=3, align="weight")
    reset = barrier_sweep(model, a, b, task, points=3, align="weight", renorm="bn_reset")
    before, after = plain.aligned.midpoint(plain.alphas), reset.aligned.midpoint(reset.alphas)
    print(f"resnet20 aligned midpoint accuracy {before['accuracy']:.4f}, with bn_reset {after['accuracy']:.4f}")
    assert after["accuracy"] > before["accuracy"]


def test_repair_refuses_hugging_face_transformers(text):
    model, a, b = _pair("gpt2", text, layers=1, hidden=32, heads=2)
    with pytest.raises(ConfigError, match="not Hugging Face"):
        Repair(model, a, b, calibration_batches(text, 1, 4, 0, "cpu"), text)


def test_barrier_align_checks_the_spec_before_the_raw_sweep(monkeypatch):
    """A spec that does not fit the states fails before any evaluation (not after the whole raw sweep)."""
    from lmctk.basin import barrier as module
    from lmctk.errors import LmctkError
    from lmctk.models import build_model
    from lmctk.spec import spec_for
    from lmctk.tasks import get_task

    task = get_task("digits")
    model = build_model("mlp", task, widths=[8])
    other = spec_for(build_model("mlp", task, widths=[6]))
    state = model.state_dict()
    monkeypatch.setattr(module, "evaluate_path", lambda *a, **k: (_ for _ in ()).throw(AssertionError("swept")))
    with pytest.raises(LmctkError):
        module.barrier_sweep(model, state, dict(state), task, align="weight", spec=other)
