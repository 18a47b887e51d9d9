"""Vision permutation specs: random perms keep every reference model's outputs, and a wrong spec is caught."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from lmctk.errors import ConfigError, ShapeMismatchError
from lmctk.models import build_model, model_config
from lmctk.spec import PermutationSpec, check, spec_for, vision

DIGITS = (1, 8, 8)
NORMS = ("batchnorm", "layernorm", "none")
TOL = 1e-5

seeds = st.integers(0, 2**16)
images = st.just(DIGITS) | st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
flat_or_images = images | st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


def make(name: str, seed: int, **options) -> nn.Module:
    """A randomly initialised model whose norms (affine params and BN running stats) are random too,
    so that a spec forgetting any of them changes the eval-mode outputs."""
    torch.manual_seed(seed)
    options = {"in_shape": DIGITS, "num_classes": 10, **options}
    model = build_model(name, **options)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.weight.copy_(1 + 0.5 * torch.randn_like(module.weight))
                module.bias.copy_(0.5 * torch.randn_like(module.bias))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.5 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
                module.num_batches_tracked.fill_(7)
    return model


def replace_axes(spec: PermutationSpec, **changes) -> PermutationSpec:
    """A copy of `spec` with some tensors' axes replaced (keys given with `__` for `.`)."""
    axes = dict(spec.axes)
    axes.update({key.replace("__", "."): value for key, value in changes.items()})
    return PermutationSpec(dict(spec.groups), axes, name=spec.name)


@pytest.fixture
def hf_placeholder(monkeypatch):
    """`spec_for` imports `lmctk.spec.hf` (HF builders); stand in an empty module while it is not written."""
    if importlib.util.find_spec("lmctk.spec.hf") is None:
        monkeypatch.setitem(sys.modules, "lmctk.spec.hf", types.ModuleType("lmctk.spec.hf"))


# --- function preservation ------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    in_shape=flat_or_images,
    activation=st.sampled_from(["relu", "gelu", "tanh"]),
    num_classes=st.integers(2, 10),
    seed=seeds,
)
def test_mlp_spec_preserves_outputs(widths, in_shape, activation, num_classes, seed):
    model = make("mlp", seed, widths=widths, in_shape=in_shape, activation=activation, num_classes=num_classes)
    spec = vision.mlp(model)
    assert spec.groups == {f"hidden.{i}": w for i, w in enumerate(widths)}
    result = check(model, spec, seed=seed)
    assert result.max_rel_error <= TOL and result.ok
    assert result.unpermuted == ["out.bias"]


@settings(max_examples=12, deadline=None)
@given(
    channels=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    norm=st.sampled_from(NORMS),
    in_shape=images,
    seed=seeds,
)
def test_cnn_spec_preserves_outputs(channels, norm, in_shape, seed):
    model = make("cnn", seed, channels=channels, norm=norm, in_shape=in_shape)
    spec = vision.cnn(model)
    assert spec.groups == {f"blocks.{i}": c for i, c in enumerate(channels)}
    result = check(model, spec, seed=seed)
    assert result.max_rel_error <= TOL and result.ok


# No shrinking: a failing ResNet example is already small, and shrinking 20-layer models takes minutes.
@settings(max_examples=10, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(width=st.integers(1, 2), norm=st.sampled_from(NORMS), in_shape=images, seed=seeds)
def test_resnet20_spec_preserves_outputs(width, norm, in_shape, seed):
    model = make("resnet20", seed, width=width, norm=norm, in_shape=in_shape)
    result = check(model, vision.resnet20(model), seed=seed)
    assert result.max_rel_error <= TOL and result.ok


# --- the check can fail: wrong specs are caught ---------------------------------------------------


def test_check_fails_when_a_layer_input_axis_is_dropped():
    model = make("mlp", 0, widths=[16, 16])
    spec = vision.mlp(model)
    wrong = replace_axes(spec, hidden__1__weight=("hidden.1", None))
    assert check(model, spec).ok
    result = check(model, wrong)
    assert not result.ok and result.max_rel_error > 1e-2


def test_check_fails_when_batchnorm_running_stats_are_not_permuted():
    model = make("cnn", 0, channels=[12, 12], norm="batchnorm")
    spec = vision.cnn(model)
    wrong = replace_axes(spec, blocks__0__norm__running_mean=(None,), blocks__0__norm__running_var=(None,))
    result = check(model, wrong)
    assert not result.ok and result.max_rel_error > 1e-2


def test_check_fails_when_identity_shortcut_leaves_the_residual_group():
    model = make("resnet20", 0, norm="layernorm")
    spec = vision.resnet20(model)
    stem = {k: tuple("stem" if a == "stages.0.res" else a for a in v) for k, v in spec.axes.items() if k.startswith("stem.")}
    axes = {**spec.axes, **stem, "stages.0.0.conv1.weight": ("stages.0.0.inner", "stem", None, None)}
    wrong = PermutationSpec({**spec.groups, "stem": 16}, axes, name="split stem")
    result = check(model, wrong)
    assert not result.ok and result.max_rel_error > 1e-2


# --- structure: names, shared residual groups, shortcuts, what stays unpermuted -------------------


def test_resnet20_groups_read_like_keys_and_identity_shortcuts_share_the_stage_stream():
    spec = vision.resnet20(make("resnet20", 0, width=2, norm="batchnorm"))
    inner = {f"stages.{s}.{b}.inner": 16 * 2 * 2**s for s in range(3) for b in range(3)}
    assert spec.groups == {"stages.0.res": 32, "stages.1.res": 64, "stages.2.res": 128, **inner}
    axes = spec.axes
    assert axes["stem.conv.weight"] == ("stages.0.res", None, None, None)
    assert axes["stem.norm.running_var"] == ("stages.0.res",)
    assert axes["stages.0.0.conv1.weight"] == ("stages.0.0.inner", "stages.0.res", None, None)
    assert axes["stages.0.2.norm2.bias"] == ("stages.0.res",)
    assert axes["stages.1.0.conv1.weight"] == ("stages.1.0.inner", "stages.0.res", None, None)
    assert axes["stages.1.0.shortcut.conv.weight"] == ("stages.1.res", "stages.0.res", None, None)
    assert axes["stages.1.0.shortcut.norm.running_mean"] == ("stages.1.res",)
    assert axes["stages.1.1.conv1.weight"] == ("stages.1.1.inner", "stages.1.res", None, None)
    assert axes["stages.2.2.conv2.weight"] == ("stages.2.res", "stages.2.2.inner", None, None)
    assert axes["head.weight"] == (None, "stages.2.res")
    assert "stages.0.0.shortcut.conv.weight" not in axes


def test_unpermuted_lists_exactly_the_classifier_bias_and_batchnorm_counters():
    cnn = make("cnn", 0, channels=[4, 6], norm="batchnorm")
    assert check(cnn, vision.cnn(cnn)).unpermuted == [
        "blocks.0.norm.num_batches_tracked", "blocks.1.norm.num_batches_tracked", "head.bias"
    ]
    resnet = make("resnet20", 0, norm="batchnorm")
    unpermuted = vision.resnet20(resnet).unpermuted(resnet.state_dict())
    counters = [k for k in unpermuted if k.endswith(".num_batches_tracked")]
    assert len(counters) == 1 + 9 * 2 + 2  # stem, two norms per block, two projection shortcuts
    assert unpermuted == [*counters, "head.bias"]
    for norm in ("layernorm", "none"):
        model = make("resnet20", 0, norm=norm)
        assert vision.resnet20(model).unpermuted(model.state_dict()) == ["head.bias"]


def test_norm_none_convs_carry_their_bias_on_the_output_group():
    spec = vision.cnn(make("cnn", 0, channels=[3, 5], norm="none"))
    assert spec.axes["blocks.1.conv.bias"] == ("blocks.1",)
    assert not any(".norm." in key for key in spec.axes)


def test_validate_names_the_tensor_with_a_wrong_size():
    spec = vision.mlp(make("mlp", 0, widths=[8, 4]))
    other = make("mlp", 0, widths=[8, 5]).state_dict()
    with pytest.raises(ShapeMismatchError, match=r"hidden\.1\.weight"):
        spec.validate({k: v.shape for k, v in other.items()})
    resnet = vision.resnet20(make("resnet20", 0, norm="batchnorm"))
    wider = make("resnet20", 0, width=2, norm="batchnorm").state_dict()
    with pytest.raises(ShapeMismatchError, match=r"stem\.conv\.weight"):
        resnet.validate({k: v.shape for k, v in wider.items()})


def test_builder_refuses_a_tensor_it_does_not_know():
    model = make("mlp", 0, widths=[4])
    model.register_buffer("temperature", torch.ones(4))
    with pytest.raises(ConfigError, match="temperature"):
        vision.mlp(model)


# --- dispatch -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, builder",
    [
        ("mlp", {"widths": [7, 5], "activation": "gelu"}, vision.mlp),
        ("cnn", {"channels": [3, 4], "norm": "batchnorm"}, vision.cnn),
        ("resnet20", {"width": 1, "norm": "layernorm"}, vision.resnet20),
    ],
)
def test_spec_for_dispatches_on_models_and_lmctk_model_configs(hf_placeholder, name, options, builder):
    from lmctk.tasks import get_task

    model = make(name, 0, **options)
    expected = builder(model)
    assert spec_for(model) == expected
    config = model_config(name, get_task("digits"), **options)
    assert spec_for(config) == expected
