"""Skeletons built without random init (parameters on meta until loaded) and tasks checked against
the model's output sizes before any long work."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmctk.errors import ConfigError
from lmctk.loading import (
    check_task_fits,
    checkpoint_skeleton,
    load_model_state,
    resolve_task,
)
from lmctk.tasks import get_task


def _qwen(path, vocab=64, dtype=torch.bfloat16):
    import transformers

    config = transformers.Qwen2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                                      tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path)
    return model


def test_loaded_hf_model_is_the_checkpoint_in_its_dtype_with_real_buffers_and_ties(tmp_path):
    reference = _qwen(tmp_path / "hf")
    model, state, _ = load_model_state(tmp_path / "hf")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    ids = torch.arange(12).reshape(2, 6)
    assert torch.equal(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_checkpoint_skeleton_is_fp32_real_and_tied(tmp_path):
    _qwen(tmp_path / "hf")
    model = checkpoint_skeleton(tmp_path / "hf")
    assert all(not p.is_meta and p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rotary = model.model.rotary_emb.inv_freq
    assert not rotary.is_meta and torch.isfinite(rotary).all() and rotary[0] == 1


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_lmctk_reference_models_load_from_a_run(tmp_path, name):
    from lmctk.train import TrainConfig, fit

    options = {"norm": "batchnorm"} if name != "mlp" else {}
    fit(TrainConfig(task="digits", model=name, model_options=options, steps=1, batch_size=8, eval_every=1),
        tmp_path / name)
    model, state, task = load_model_state(tmp_path / name)
    assert task is not None and not any(t.is_meta for t in model.state_dict().values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_task_vocabulary_larger_than_the_model_is_a_config_error(tmp_path):
    _qwen(tmp_path / "hf", vocab=64)
    text = get_task("text")
    assert text.model_options()["vocab_size"] > 64
    with pytest.raises(ConfigError, match="vocabulary size is 64 but task 'text' needs"):
        check_task_fits(text, tmp_path / "hf")
    with pytest.raises(ConfigError, match="vocabulary size is 64"):
        resolve_task("text", None, [tmp_path / "hf"])
    digits = get_task("digits")
    check_task_fits(digits, tmp_path / "hf")  # no vocabulary asked for: nothing to compare


def test_barrier_cli_refuses_a_too_large_task_vocabulary_in_one_line(tmp_path):
    for name in "ab":
        _qwen(tmp_path / name, vocab=64, dtype=torch.float32)
    done = subprocess.run([sys.executable, "-m", "lmctk", "barrier", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--task", "text"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "vocabulary size is 64" in done.stderr and "Traceback" not in done.stderr
