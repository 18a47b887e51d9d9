"""Per-head permutations: every head has its own within-head order, and weight matching finds head
order and within-head order together, so a permuted copy is recovered every time."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmctk.basin.align import apply, weight_matching
from lmctk.errors import ConfigError
from lmctk.spec import Prod, check, invert, permute_state, random_perms, spec_for
from lmctk.spec.core import PermutationSpec, shared_within

VOCAB, POSITIONS, SEEDS, NOISE = 97, 512, 30, 1e-4  # GPT-2/BERT: `res` is found from the embeddings
EXAMPLES = settings(max_examples=1, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread beats two on a busy machine


def config(family: str, heads: int, kv: int, d: int, inner: int) -> transformers.PretrainedConfig:
    """A 2-layer config of `family` with `heads` query heads (`kv` KV heads where GQA exists) of `d` dims."""
    width = heads * d
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_layer=2, n_head=heads, n_embd=width,
                                       n_inner=inner, bos_token_id=None, eos_token_id=None)
    if family == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=2,
                                       num_attention_heads=heads, hidden_size=width, intermediate_size=inner)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=2,
                                          num_attention_heads=heads, hidden_size=width, intermediate_size=inner,
                                          rotary_pct=0.5)
    return transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=d, hidden_size=width, intermediate_size=inner,
    )


CLASSES = {"gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "gpt_neox": "GPTNeoXForCausalLM",
           "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def model(family: str, heads: int, kv: int, d: int, inner: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = config(family, heads, kv, d, inner)
    cfg._attn_implementation = "eager"
    return getattr(transformers, CLASSES[family])(cfg)


def relative_l2(a, b) -> float:
    keys = [k for k in a if a[k].is_floating_point()]
    return (sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) / sum(float((a[k] ** 2).sum()) for k in keys)) ** 0.5


# --- the IR: per-block groups ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family,blocks", [
    ("gpt2", {"qk.0": "heads.0", "v.0": "heads.0"}),
    ("bert", {"qk.0": "heads.0", "v.0": "heads.0"}),
    ("gpt_neox", {"qk.0": "heads.0", "v.0": "heads.0"}),  # rotary_pct 0.5: pass-through q/k dims per head
    ("llama", {"qh.0": "kv.0", "v.0": "kv.0"}),  # RoPE: q/k dims fixed, v dims per KV head
])
def test_every_head_owns_its_within_head_order_and_the_check_proves_it(family, blocks):
    m = model(family, 6, 2, 4, 10)
    spec = spec_for(m)
    assert {g: b for g, b in spec.blocks.items() if g.endswith(".0")} == blocks
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    assert perms["v.0"].shape == (spec.groups[blocks["v.0"]], spec.groups["v.0"])
    assert len({tuple(row.tolist()) for row in perms["v.0"]}) > 1  # rows drawn independently
    assert check(m, spec, trials=3).max_rel_error <= 1e-5
    state = m.state_dict()
    back = permute_state(permute_state(state, spec, perms), spec, invert(perms, spec))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_per_block_groups_are_validated_and_a_wrong_one_is_caught():
    m = model("llama", 6, 2, 4, 10)
    spec = spec_for(m)
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    groups = {**spec.groups, "o.0": 4}
    axes = {**spec.axes, o_proj: ("res", Prod("kv.0", "qh.0", "o.0"))}  # o_proj's v order apart from v_proj's
    with pytest.raises(ConfigError, match="one level"):
        PermutationSpec(groups, axes, name="nested", blocks={**spec.blocks, "o.0": "qh.0"})
    with pytest.raises(ConfigError, match="outside a block"):
        PermutationSpec(spec.groups, spec.axes, name="loose", blocks={**spec.blocks, "mlp.0": "kv.0"})
    wrong = PermutationSpec(groups, axes, name="wrong", blocks={**spec.blocks, "o.0": "kv.0"})
    assert check(m, wrong, trials=3).max_rel_error > 1e-2


def test_block_perms_need_the_spec_to_invert():
    spec = spec_for(model("gpt2", 3, 3, 4, 8))
    with pytest.raises(ConfigError, match="spec"):
        invert(random_perms(spec, torch.Generator().manual_seed(0)))


# --- self-recovery: certain, not likely ------------------------------------------------------------------------


def assert_recovers(family: str, heads: int, kv: int, d: int, inner: int) -> None:
    """Over SEEDS permutations (per-head, shared, per-head + noise in turn), weight matching undoes them."""
    m = model(family, heads, kv, d, inner)
    spec = spec_for(m)
    shared = shared_within(spec)
    a = m.state_dict()
    scale = {k: float(v.std()) if v.numel() > 1 else 0.0 for k, v in a.items()}
    for seed in range(SEEDS):
        gen = torch.Generator().manual_seed(seed)
        perms = random_perms(spec if seed % 3 != 1 else shared, gen)
        b = permute_state(a, spec, perms)
        if seed % 3 == 2:
            b = {k: v + NOISE * scale[k] * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in b.items()}
        aligned = apply(spec, b, weight_matching(spec, a, b, seed=seed))
        if seed % 3 == 2:  # with noise: the true permutation is found, leaving only the noise
            expected = apply(spec, b, invert(perms, spec))
            assert all(torch.equal(aligned[k], expected[k]) for k in a), (family, seed)
        else:
            assert relative_l2(a, aligned) <= 1e-5, (family, seed)


@EXAMPLES
@given(st.sampled_from([(3, 16), (3, 5), (4, 6)]), st.sampled_from([136, 37]))
@example((3, 16), 136)  # the GPT-2: hidden 48, 3 heads, intermediate 136
@pytest.mark.parametrize("family", ["gpt2", "bert", "gpt_neox"])
def test_self_recovery_is_certain_for_multi_head_attention(family, heads_d, inner):
    heads, d = heads_d
    if family == "gpt_neox" and d % 2:
        d += 1  # RoPE rotates dim pairs
    assert_recovers(family, heads, heads, d, inner)


@EXAMPLES
@given(st.sampled_from([(6, 2, 8), (6, 3, 4), (4, 4, 6)]), st.sampled_from([136, 37]))
@example((6, 2, 8), 136)  # 6 query heads on 2 KV heads
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_self_recovery_is_certain_for_grouped_query_attention(family, sizes, inner):
    heads, kv, d = sizes
    assert_recovers(family, heads, kv, d, inner)


# --- a superset of symmetries never scores lower ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_per_head_matching_scores_at_least_the_shared_spec(family):
    spec = spec_for(model(family, 6, 2, 8, 37))
    a, b = model(family, 6, 2, 8, 37, seed=0).state_dict(), model(family, 6, 2, 8, 37, seed=1).state_dict()
    per_head = weight_matching(spec, a, b).objective[-1]
    shared = weight_matching(shared_within(spec), a, b).objective[-1]
    assert per_head >= shared
