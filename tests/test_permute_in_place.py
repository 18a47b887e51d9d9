"""π(B) in place and π(B) a slab at a time: the same tensors as `permute_state`, tied weights permuted once, on every
architecture at odd sizes (GPT-2's fused q|k|v, GQA 6 q / 2 kv heads, NeoX, BERT, MLP, CNN, ResNet)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import lmctk.spec.permute as permute
from lmctk.models import build_model
from lmctk.spec import permute_in_place, permute_state, random_perms, spec_for

VOCAB = 29


def gpt2(tie: bool):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_layer=2, n_head=3, n_embd=48, n_inner=136, tie_word_embeddings=tie))


def llama(tie: bool):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, hidden_size=48, intermediate_size=136, tie_word_embeddings=tie))


def neox(tie: bool):
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=3, hidden_size=48,
        intermediate_size=136, rotary_pct=0.5, tie_word_embeddings=tie))


def bert(tie: bool):
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=3, hidden_size=48,
        intermediate_size=136, tie_word_embeddings=tie))


MODELS = {
    "gpt2": gpt2, "llama-gqa": llama, "gpt_neox": neox, "bert": bert,
    "mlp": lambda tie: build_model("mlp", in_shape=(64,), num_classes=10, widths=(48, 37)),
    "cnn": lambda tie: build_model("cnn", in_shape=(1, 8, 8), num_classes=10, channels=(6, 9), norm="batchnorm"),
    "resnet20": lambda tie: build_model("resnet20", in_shape=(3, 8, 8), num_classes=10, width=1),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([1, 7, 100, 1 << 22]), tie=st.booleans())
def test_in_place_equals_a_permuted_copy(name, seed, chunk, tie):
    torch.manual_seed(seed)
    model = MODELS[name](tie)
    spec = spec_for(model)
    perms = random_perms(spec, torch.Generator().manual_seed(seed), moving=True)
    expected = permute_state(model.state_dict(), spec, perms)
    twin = copy.deepcopy(model)  # deepcopy keeps tied parameters one tensor, as a loaded state has them
    state = twin.state_dict()
    saved = permute.CHUNK
    permute.CHUNK = chunk
    try:
        slabs = {key: list(permute.permuted_slabs(state[key], spec.axes[key], spec.groups, perms, blocks=spec.blocks))
                 for key in spec.axes}
        permute_in_place(state, spec, perms)
    finally:
        permute.CHUNK = saved
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    for key, parts in slabs.items():  # the permuted copy a slab at a time: the same tensor, in order
        axis = parts[0][0]
        assert [start for _, start, _, _ in parts] == list(itertools.accumulate([0] + [n for *_, n, _ in parts[:-1]]))
        assert torch.equal(torch.cat([slab for *_, slab in parts], axis).reshape(expected[key].shape), expected[key])
    moved = [k for k in spec.axes if k not in spec.buffers and not torch.equal(state[k], model.state_dict()[k])]
    assert moved, "random non-identity perms moved no tensor"


def test_tied_weights_are_permuted_once():
    model = gpt2(tie=True)
    spec = spec_for(model)
    perms = random_perms(spec, torch.Generator().manual_seed(3), moving=True)
    state = copy.deepcopy(model).state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    permute_in_place(state, spec, perms)
    expected = permute_state(model.state_dict(), spec, perms)["transformer.wte.weight"]
    assert torch.equal(state["transformer.wte.weight"], expected)
    assert torch.equal(state["lm_head.weight"], expected)  # twice would be π∘π


def test_a_one_dimensional_tensor_and_a_bf16_tensor():
    spec = permute.PermutationSpec({"h": 5}, {"w": ("h", None), "b": ("h",)})
    perm = {"h": torch.tensor([4, 2, 0, 1, 3])}
    w = torch.randn(5, 3).to(torch.bfloat16)
    state = {"w": w.clone(), "b": torch.arange(5.0)}
    permute_in_place(state, spec, perm)
    assert torch.equal(state["w"], w[perm["h"]]) and state["w"].dtype == torch.bfloat16
    assert state["b"].tolist() == [4.0, 2.0, 0.0, 1.0, 3.0]
