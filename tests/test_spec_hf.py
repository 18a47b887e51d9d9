"""HF LM permutation specs: random perms keep the logits of every family, and wrong specs are caught."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from lmctk.errors import ConfigError
from lmctk.spec import (
    Fixed,
    PermutationSpec,
    Prod,
    check,
    permute_state,
    random_perms,
    spec_for,
)
from lmctk.spec.core import Cat

TOL = 1e-5
VOCAB, POSITIONS = 13, 16
EXAMPLES = settings(max_examples=6, deadline=None)
MIN_WIDTH = 4  # a norm over 1-2 dims is ill-conditioned (near-sign function): keep widths >= 4

layers = st.integers(1, 2)
heads = st.integers(1, 4)
even_dims = st.sampled_from([2, 4, 6, 8])  # RoPE rotates (i, i + d/2) pairs: head_dim must be even
widths = st.integers(1, 16)
flags = st.booleans()


def make(config: transformers.PretrainedConfig, cls: str, seed: int = 0) -> nn.Module:
    """A model of `cls` with random weights at a scale where attention is far from uniform, norms
    away from 1/0 and biases non-zero, so a spec that forgets or mismaps any tensor changes the logits."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if "norm" in name.lower() or "ln_" in name:
                    p.copy_((1.0 if pname == "weight" else 0.0) + 0.5 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.3)
    # check() runs functional_call(strict=True) on state_dict(), which omits non-persistent buffers
    # (RoPE tables, BERT position ids): store them so the check can run (see the report on check.py).
    for module in model.modules():
        module._non_persistent_buffers_set.clear()
    return model.double()  # float64: round-off stays far below TOL while a wrong spec costs O(1)


def assert_preserves(model: nn.Module) -> PermutationSpec:
    spec = spec_for(model)
    result = check(model, spec, trials=2)
    assert result.max_rel_error <= TOL, result
    return spec


def gpt2_config(n_layer, n_head, d, inner, tie, **extra) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_layer=n_layer, n_head=n_head, n_embd=n_head * d,
        n_inner=inner, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, **extra,
    )


def llama_config(family, n_layer, n_kv, rep, d, hidden, inter, tie, bias, **extra) -> transformers.PretrainedConfig:
    options = {"attention_bias": bias, "mlp_bias": bias} if family == "llama" else {}
    return transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=n_layer,
        num_attention_heads=n_kv * rep, num_key_value_heads=n_kv, head_dim=d, hidden_size=hidden,
        intermediate_size=inter, tie_word_embeddings=tie, **options, **extra,
    )


def gqa_sizes():
    """(kv heads, query heads per kv head) with kv dividing heads <= 4: kv == heads and kv == 1 included."""
    return heads.flatmap(lambda h: st.sampled_from([(kv, h // kv) for kv in range(1, h + 1) if h % kv == 0]))


# --- function preservation, per family -------------------------------------------------------------------------


@EXAMPLES
@given(layers, heads, st.integers(2, 8), widths, flags, st.integers(0, 2**16))
def test_gpt2_spec_preserves_logits(n_layer, n_head, d, inner, tie, seed):
    assume(n_head * d >= MIN_WIDTH)
    model = make(gpt2_config(n_layer, n_head, d, inner, tie), "GPT2LMHeadModel", seed)
    spec = assert_preserves(model)
    assert spec.groups["heads.0"] == n_head and spec.groups["qk.0"] == spec.groups["v.0"] == d
    assert spec.tied == ({"lm_head.weight": "transformer.wte.weight"} if tie else {})


@EXAMPLES
@given(layers, heads, even_dims, widths, st.sampled_from([0.0, 0.25, 0.5, 1.0]), flags, flags, flags,
       st.integers(0, 2**16))
@example(2, 2, 8, 4, 0.25, False, False, True, 0)  # partial rotary: rotated and pass-through dims both present
@example(1, 3, 6, 4, 0.5, True, True, False, 1)
def test_gpt_neox_spec_preserves_logits(n_layer, n_head, d, inter, pct, parallel, tie, bias, seed):
    assume(n_head * d >= MIN_WIDTH)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=n_layer, num_attention_heads=n_head,
        hidden_size=n_head * d, intermediate_size=inter, rotary_pct=pct, use_parallel_residual=parallel,
        tie_word_embeddings=tie, attention_bias=bias,
    )
    model = make(config, "GPTNeoXForCausalLM", seed)
    spec = assert_preserves(model)
    rotated = min(d, 2 * ((int(d * pct) + 1) // 2))
    assert spec.groups.get("qk.0", 0) == d - rotated  # only RoPE's pass-through dims are permuted


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@EXAMPLES
@given(layers, gqa_sizes(), even_dims, st.integers(1, 4), widths, flags, flags, st.integers(0, 2**16))
@example(2, (2, 2), 4, 1, 8, False, True, 0)  # kv groups and query heads within them both permuted
@example(1, (1, 3), 2, 2, 4, True, False, 1)  # multi-query attention
def test_llama_family_spec_preserves_logits(family, n_layer, kv_rep, d, per_head, inter, tie, bias, seed):
    n_kv, rep = kv_rep
    hidden = n_kv * rep * per_head  # configs want heads | hidden; head_dim is set on its own
    assume(hidden >= MIN_WIDTH)
    config = llama_config(family, n_layer, n_kv, rep, d, hidden, inter, tie, bias)
    model = make(config, f"{family.title()}ForCausalLM", seed)
    spec = assert_preserves(model)
    assert (spec.groups["kv.0"], spec.groups["qh.0"], spec.groups["v.0"]) == (n_kv, rep, d)
    assert spec.tied == ({"lm_head.weight": "model.embed_tokens.weight"} if tie else {})
    if family == "qwen2":  # q/k/v biases follow their weights' output layouts
        axes = spec.axes["model.layers.0.self_attn.q_proj.bias"]
        assert axes == (spec.axes["model.layers.0.self_attn.q_proj.weight"][0],)


@EXAMPLES
@given(layers, heads, st.integers(2, 8), widths, flags, st.integers(0, 2**16))
def test_bert_spec_preserves_logits(n_layer, n_head, d, inter, tie, seed):
    assume(n_head * d >= MIN_WIDTH)
    config = transformers.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=n_layer, num_attention_heads=n_head,
        hidden_size=n_head * d, intermediate_size=inter, tie_word_embeddings=tie,
    )
    model = make(config, "BertForMaskedLM", seed)
    spec = assert_preserves(model)
    assert spec.tied == ({"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"} if tie else {})
    assert {"cls.predictions.bias", "cls.predictions.decoder.bias"} <= set(spec.unpermuted(model.state_dict()))


def test_sequence_classification_head_reads_the_stream():
    config = gpt2_config(2, 2, 4, 8, False, num_labels=3, pad_token_id=0)
    assert_preserves(make(config, "GPT2ForSequenceClassification"))


def test_headless_bert_keeps_pooled_output_and_permutes_hidden_states():
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=2,
                                     num_attention_heads=2, hidden_size=8, intermediate_size=12)
    model = make(config, "BertModel").eval()
    spec = spec_for(model)
    state = model.state_dict()
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    ids = torch.randint(VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = functional_call(model, state, (ids,))
        out = functional_call(model, permute_state(state, spec, perms), (ids,))
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state[..., perms["res"]], rtol=TOL, atol=TOL)
    assert "pooler.dense.bias" in spec.unpermuted(state)


# --- negative controls: the check catches wrong specs ----------------------------------------------------------


def rebuilt(spec: PermutationSpec, groups: dict[str, int], **axes) -> PermutationSpec:
    """`spec` with groups added and some tensors' axes replaced (keys given with `__` for `.`)."""
    new_axes = dict(spec.axes)
    new_axes.update({key.replace("__", "."): value for key, value in axes.items()})
    return PermutationSpec({**spec.groups, **groups}, new_axes, dict(spec.tied), name=spec.name)


@pytest.fixture(scope="module")
def llama_model() -> nn.Module:
    return make(llama_config("llama", 1, 2, 4, 8, 16, 16, False, True), "LlamaForCausalLM")


def test_permuting_rope_qk_dims_is_caught(llama_model):
    spec = spec_for(llama_model)
    assert check(llama_model, spec).ok
    wrong = rebuilt(
        spec, {"rope.0": 8},
        model__layers__0__self_attn__q_proj__weight=(Prod("kv.0", "qh.0", "rope.0"), "res"),
        model__layers__0__self_attn__q_proj__bias=(Prod("kv.0", "qh.0", "rope.0"),),
        model__layers__0__self_attn__k_proj__weight=(Prod("kv.0", "rope.0"), "res"),
        model__layers__0__self_attn__k_proj__bias=(Prod("kv.0", "rope.0"),),
    )
    result = check(llama_model, wrong, trials=3)
    assert not result.ok and result.max_rel_error > 100 * TOL


def test_query_heads_across_kv_groups_is_caught(llama_model):
    spec = spec_for(llama_model)  # 8 query heads on 2 kv heads
    groups = {g: n for g, n in spec.groups.items() if g not in ("kv.0", "qh.0")}
    groups["qheads.0"] = 8
    axes = dict(spec.axes)
    axes.update({
        "model.layers.0.self_attn.q_proj.weight": (Prod("qheads.0", Fixed(8)), "res"),
        "model.layers.0.self_attn.q_proj.bias": (Prod("qheads.0", Fixed(8)),),
        "model.layers.0.self_attn.k_proj.weight": (Fixed(16), "res"),
        "model.layers.0.self_attn.k_proj.bias": (Fixed(16),),
        "model.layers.0.self_attn.v_proj.weight": (Prod(Fixed(2), "v.0"), "res"),
        "model.layers.0.self_attn.v_proj.bias": (Prod(Fixed(2), "v.0"),),
        "model.layers.0.self_attn.o_proj.weight": ("res", Prod("qheads.0", "v.0")),
    })
    result = check(llama_model, PermutationSpec(groups, axes, name="wrong"), trials=3)
    assert not result.ok and result.max_rel_error > 100 * TOL


def test_gpt_neox_layout_errors_are_caught():
    """The fused q|k|v is interleaved per head, and only RoPE's pass-through dims (the last ones) move."""
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=1,
                                        num_attention_heads=2, hidden_size=16, intermediate_size=8, rotary_pct=0.5)
    model = make(config, "GPTNeoXForCausalLM")
    spec = spec_for(model)
    assert check(model, spec).ok
    within = Cat(Fixed(4), "qk.0")
    assert spec.axes["gpt_neox.layers.0.attention.query_key_value.weight"] == (
        Prod("heads.0", Cat(within, within, "v.0")), "res")
    gpt2_style = Cat(Prod("heads.0", within), Prod("heads.0", within), Prod("heads.0", "v.0"))
    rotary_moved = Prod("heads.0", Cat(Cat("qk.0", Fixed(4)), Cat("qk.0", Fixed(4)), "v.0"))
    for wrong_layout in (gpt2_style, rotary_moved):
        wrong = rebuilt(spec, {}, gpt_neox__layers__0__attention__query_key_value__weight=(wrong_layout, "res"),
                        gpt_neox__layers__0__attention__query_key_value__bias=(wrong_layout,))
        result = check(model, wrong, trials=3)
        assert not result.ok and result.max_rel_error > 100 * TOL


# --- tied storage, configs, headless models, errors ------------------------------------------------------------


def test_gpt2_tied_lm_head_stays_tied_after_permute():
    model = make(gpt2_config(2, 2, 4, 8, True), "GPT2LMHeadModel")
    spec = spec_for(model)
    assert "lm_head.weight" not in spec.axes and spec.tied == {"lm_head.weight": "transformer.wte.weight"}
    state = model.state_dict()
    out = permute_state(state, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    assert not torch.equal(out["lm_head.weight"], state["lm_head.weight"])


CONFIGS = {
    "gpt2": (lambda: gpt2_config(2, 2, 4, 8, True), "GPT2LMHeadModel"),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2,
                                                    hidden_size=8, intermediate_size=8), "GPTNeoXForCausalLM"),
    "llama": (lambda: llama_config("llama", 2, 1, 2, 4, 8, 8, True, False), "LlamaForCausalLM"),
    "mistral": (lambda: llama_config("mistral", 2, 2, 1, 4, 8, 8, False, False), "MistralForCausalLM"),
    "qwen2": (lambda: llama_config("qwen2", 2, 1, 2, 4, 8, 8, True, False), "Qwen2ForCausalLM"),
    "bert": (lambda: transformers.BertConfig(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2,
                                             hidden_size=8, intermediate_size=8), "BertForMaskedLM"),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_spec_for_config_equals_spec_for_model(family):
    make_config, cls = CONFIGS[family]
    config = make_config()
    config.architectures = [cls]
    model = getattr(transformers, cls)(config)
    expected = spec_for(model)
    assert spec_for(config) == expected
    assert spec_for(config.to_dict()) == expected


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_headless_base_model_spec_is_the_lm_spec_without_prefix_and_head(family):
    make_config, cls = CONFIGS[family]
    model = getattr(transformers, cls)(make_config())
    prefix = model.base_model_prefix + "."
    lm, base = spec_for(model), spec_for(model.base_model)
    assert base.groups == lm.groups and base.tied == {}
    assert base.axes == {k[len(prefix):]: v for k, v in lm.axes.items() if k.startswith(prefix)}


def test_unknown_tensors_are_an_error_not_a_silent_identity():
    cross = transformers.GPT2LMHeadModel(gpt2_config(1, 2, 4, 8, True, add_cross_attention=True))
    with pytest.raises(ConfigError, match=r"crossattention.*spec="):
        spec_for(cross)
    classifier = transformers.BertForSequenceClassification(CONFIGS["bert"][0]())
    with pytest.raises(ConfigError, match=r"classifier.*spec="):
        spec_for(classifier)


def test_unsupported_model_type_names_it_and_how_to_pass_a_spec():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, ffn_dim=8,
                                    num_attention_heads=2, max_position_embeddings=POSITIONS, word_embed_proj_dim=8)
    with pytest.raises(ConfigError, match=r"'opt'.*spec="):
        spec_for(transformers.OPTForCausalLM(config))
    with pytest.raises(ConfigError, match=r"'opt'.*spec="):
        spec_for(config.to_dict())


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_check_on_headless_models_unpermutes_the_residual_output(family):
    configs = {
        "gpt2": (transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                         bos_token_id=None, eos_token_id=None), transformers.GPT2Model),
        "llama": (transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=64, vocab_size=64),
                  transformers.LlamaModel),
        "bert": (transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=64, max_position_embeddings=32),
                 transformers.BertModel),
    }
    config, cls = configs[family]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config)
    spec = spec_for(model)
    assert check(model, spec, output_group="res").max_rel_error <= 1e-5
    assert check(model, spec).max_rel_error > 1e-2  # hidden states come out permuted by `res`
    with pytest.raises(ConfigError, match="output_group"):
        check(model, spec, output_group="nope")
