"""Saved permutations: `align` writes them beside π(B) (or alone), `permute` applies them to another
checkpoint of the same architecture with the same result as aligning in one go, and refuses others."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmctk.basin.align import apply
from lmctk.basin.jobs import align_checkpoints, permute_checkpoint
from lmctk.basin.saved import PERMS_NAME, load_perms
from lmctk.cli import main
from lmctk.errors import ConfigError
from lmctk.io import LazyState, inspect_checkpoint, load_state, save_hf_dir
from lmctk.spec import spec_for, spec_hash

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread beats two on a busy machine


def gpt2_dir(path, seed: int, heads: int = 4, noise: float = 0.0):
    """A tiny GPT-2 saved as an HF model dir; `noise` nudges every weight (a later step of the same run)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=heads, n_inner=48, vocab_size=64, n_positions=16,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    save_hf_dir(model.state_dict(), path, config=model.config)  # keeps the tied lm_head.weight
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"a": gpt2_dir(root / "a", 0), "b": gpt2_dir(root / "b", 1), "later": gpt2_dir(root / "later", 1, noise=0.01),
            "other": gpt2_dir(root / "other", 2, heads=2), "root": root}


def test_saved_permutations_applied_to_a_second_checkpoint_equal_aligning_in_one_go(dirs, tmp_path):
    report = align_checkpoints(dirs["a"], dirs["b"], out=tmp_path / "aligned")
    saved = tmp_path / "aligned" / PERMS_NAME
    spec = spec_for(transformers.GPT2LMHeadModel(transformers.AutoConfig.from_pretrained(dirs["a"])))
    meta = inspect_checkpoint(saved).metadata
    assert meta["spec_hash"] == spec_hash(spec) and meta["lmctk_version"]
    perms = load_perms(saved, spec)
    assert perms["qk.0"].shape == (4, 8) and perms["qk.0"].dtype == torch.int64  # per head: [n_heads, d]
    assert all(torch.equal(perms[g], report.match.perms[g]) for g in spec.groups)

    again = permute_checkpoint(dirs["b"], saved, tmp_path / "b-again")
    written, direct = LazyState(again.written), LazyState(tmp_path / "aligned")
    assert all(torch.equal(written[k], direct[k]) for k in direct)

    later = permute_checkpoint(dirs["later"], saved, tmp_path / "later-aligned")
    expected = apply(spec, load_state(dirs["later"]), report.match)
    got = LazyState(later.written)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_permutations_of_another_architecture_are_refused_in_one_line(dirs, tmp_path, capsys):
    align_checkpoints(dirs["a"], dirs["b"], perms=tmp_path / "p.safetensors", perms_only=True)
    code = main(["permute", str(dirs["other"]), "--perms", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "spec" in err and "hash" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="not a permutations file"):
        load_perms(dirs["a"] / "model.safetensors", spec_for(transformers.AutoConfig.from_pretrained(dirs["a"])))


def test_align_cli_perms_only_device_and_the_sweep_trace(dirs, tmp_path, capsys):
    out = tmp_path / "only"
    code = main(["align", str(dirs["a"]), str(dirs["b"]), "--out", str(out), "--perms-only", "--device", "cpu",
                 "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0 and sorted(p.name for p in out.iterdir()) == [PERMS_NAME]
    assert "objective" in printed and "similarity" in printed and "LAP" in printed and "other" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["sweep_seconds"]) == report["sweeps"] == len(report["objective"]) - 1
    assert report["other_seconds"] >= 0 and report["written"] == [str(out / PERMS_NAME)]
    assert main(["align", str(dirs["a"]), str(dirs["b"]), "--perms-only"]) == 2
