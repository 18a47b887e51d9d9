"""Models: every reference and HF model builds, trains, rebuilds from its config, and names its parameters."""

from __future__ import annotations

import json

import pytest
import torch

from lmctk.errors import ConfigError
from lmctk.models import MODELS, build_model, model_config
from lmctk.tasks import forward, get_task

KIND = {
    "mlp": "digits",
    "cnn": "digits",
    "resnet20": "digits",
    "gpt2": "text",
    "gpt_neox": "text",
    "llama": "text",
    "qwen2": "text",
    "bert": "text-mlm",
}


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name) for name in ("digits", "text", "text-mlm")}


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_registry_lists_every_model():
    assert MODELS == ("mlp", "cnn", "resnet20", "gpt2", "gpt_neox", "llama", "qwen2", "bert")


@pytest.mark.parametrize("name", MODELS)
def test_model_trains_on_a_fixed_batch(name, tasks):
    task = tasks[KIND[name]]
    torch.manual_seed(0)
    model = build_model(name, task)
    batch = task.train_batch(torch.arange(16), torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = task.loss(forward(model, batch, task), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


@pytest.mark.parametrize("name", MODELS)
def test_build_is_deterministic_under_manual_seed(name, tasks):
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(build_model(name, tasks[KIND[name]]).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize("name", MODELS)
def test_model_config_round_trip_rebuilds_the_architecture(name, tasks):
    config = json.loads(json.dumps(model_config(name, tasks[KIND[name]])))
    assert config["name"] == name
    rebuilt = build_model(config["name"], **config["options"])
    assert shapes(rebuilt) == shapes(build_model(name, tasks[KIND[name]]))
    assert model_config(config["name"], **config["options"]) == config


def test_llama_uses_grouped_query_attention(tasks):
    model = build_model("llama", tasks["text"])
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads == 4
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (2 * 16, 64) and attention.q_proj.weight.shape == (64, 64)
    assert model.config._attn_implementation == "eager"


def test_hf_options_map_to_config_fields(tasks):
    qwen = build_model("qwen2", tasks["text"], layers=3, hidden=32, heads=2, kv_heads=1, intermediate=48)
    config = qwen.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (3, 32, 2)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (1, 48, 256)
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    gpt2 = build_model("gpt2", tasks["text"])
    assert gpt2.config.resid_pdrop == 0.1 and gpt2.config.n_positions == 64
    assert build_model("gpt2", tasks["text"], dropout=0.0).config.attn_pdrop == 0.0
    assert build_model("llama", tasks["text"], rms_norm_eps=1e-3).config.rms_norm_eps == 1e-3
    assert build_model("bert", tasks["text-mlm"]).config.vocab_size == 257


def test_mlp_parameter_names():
    model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, widths=(32, 16))
    assert shapes(model) == {
        "hidden.0.weight": (32, 64),
        "hidden.0.bias": (32,),
        "hidden.1.weight": (16, 32),
        "hidden.1.bias": (16,),
        "out.weight": (10, 16),
        "out.bias": (10,),
    }


def test_cnn_parameter_names_and_norm_variants():
    x = torch.randn(4, 1, 8, 8)
    plain = build_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    assert list(shapes(plain)) == [
        "blocks.0.conv.weight",
        "blocks.0.conv.bias",
        "blocks.1.conv.weight",
        "blocks.1.conv.bias",
        "head.weight",
        "head.bias",
    ]
    batchnorm = build_model("cnn", in_shape=(1, 8, 8), num_classes=10, norm="batchnorm")
    assert shapes(batchnorm)["blocks.1.norm.running_mean"] == (64,) and "blocks.1.conv.bias" not in shapes(
        batchnorm
    )
    layernorm = build_model(
        "cnn", in_shape=(1, 8, 8), num_classes=10, norm="layernorm", channels=(8, 16, 24, 32)
    )
    assert shapes(layernorm)["blocks.3.norm.weight"] == (32,)
    for model in (plain, batchnorm, layernorm):
        assert model(x).shape == (4, 10)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
def test_resnet20_norm_variants_build_and_run(norm):
    model = build_model("resnet20", in_shape=(3, 32, 32), num_classes=7, norm=norm)
    keys = shapes(model)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    convs = [k for k in keys if k.endswith("weight") and len(keys[k]) == 4]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks x 2, two projection shortcuts
    assert "stages.1.0.shortcut.conv.weight" in keys and "stages.0.0.shortcut.conv.weight" not in keys
    assert ("stages.2.2.conv2.bias" in keys) == (norm == "none")
    assert ("stages.2.2.norm2.weight" in keys) == (norm != "none")


def test_resnet20_width_multiplier_scales_channels():
    narrow, wide = (build_model("resnet20", in_shape=(1, 8, 8), num_classes=10, width=w) for w in (1, 2))
    assert shapes(narrow)["stem.conv.weight"] == (16, 1, 3, 3) and shapes(wide)["stem.conv.weight"] == (
        32,
        1,
        3,
        3,
    )
    assert shapes(wide)["stages.2.0.shortcut.conv.weight"] == (128, 64, 1, 1)
    assert shapes(wide)["head.weight"] == (10, 128)


def test_bad_names_and_options_raise_config_errors(tasks):
    with pytest.raises(ConfigError, match="unknown model 'resnet'; choose one of mlp, cnn, resnet20"):
        build_model("resnet")
    with pytest.raises(
        ConfigError, match="unknown option 'width'; accepted options: in_shape, num_classes, widths"
    ):
        build_model("mlp", tasks["digits"], width=3)
    with pytest.raises(
        ConfigError, match="model 'gpt2': unknown option 'kv_heads'; .* or any GPT2Config field"
    ):
        build_model("gpt2", tasks["text"], kv_heads=2)
    with pytest.raises(ConfigError, match="needs a causal_lm task; task 'digits' is classification"):
        build_model("llama", tasks["digits"])
    with pytest.raises(ConfigError, match="needs in_shape, num_classes; pass a task"):
        model_config("mlp")
    with pytest.raises(ConfigError, match="unknown norm 'group'"):
        build_model("resnet20", tasks["digits"], norm="group")
    with pytest.raises(ConfigError, match=r"in_shape \(32,\) is not \(C, H, W\)"):
        build_model("cnn", in_shape=(32,), num_classes=10)
