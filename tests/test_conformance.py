"""Conformance matrix: checkpoints saved by `transformers`' own `save_pretrained` through every command.

One session fixture per variant (architecture, tied or not, dtype, single file or sharded) saves three
tiny models once; every command that takes a checkpoint runs on them in-process. Outputs must load
with `from_pretrained`, store the same tensor names (tied aliases omitted as in the input) and dtypes,
and come back with the same tied parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmctk.cli import main
from lmctk.io import inspect_checkpoint, tied_groups

SEQ = 16
TEXT = ["--task-opt", f"seq_len={SEQ}", "--task-opt", "eval_windows=4"]


@dataclass(frozen=True)
class Variant:
    arch: str  # transformers model_type
    family: str | None  # lmctk model family that `train --model` builds (None: none)
    tied: bool
    dtype: str
    sharded: bool
    options: tuple[tuple[str, object], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.arch}-{'tied' if self.tied else 'untied'}-{self.dtype}-{'sharded' if self.sharded else 'single'}"

    @property
    def task(self) -> str:
        return "text-mlm" if self.arch == "bert" else "text"

    def model_options(self) -> dict[str, object]:
        vocab = 257 if self.arch == "bert" else 256  # byte-level text; text-mlm adds the <mask> id
        base = {"vocab_size": vocab, "max_positions": SEQ, "layers": 1, "hidden": 16, "heads": 4, "intermediate": 32}
        if self.arch in ("llama", "mistral", "qwen2"):
            base["kv_heads"] = 2  # GQA: two query heads per KV head
        return {**base, "tie_word_embeddings": self.tied, **dict(self.options)}


VARIANTS = [
    Variant("gpt2", "gpt2", True, "float32", False),
    Variant("gpt2", "gpt2", True, "bfloat16", True),
    Variant("gpt_neox", "gpt_neox", False, "float32", True, (("heads", 2),)),  # default: parallel, 1/4 rotary
    Variant("llama", "llama", False, "float32", False),
    Variant("mistral", None, False, "bfloat16", False),
    Variant("qwen2", "qwen2", True, "float32", False),
    Variant("qwen2", "qwen2", False, "bfloat16", True),
    Variant("bert", "bert", True, "float32", False),
]


def _config(variant: Variant):
    import transformers

    from lmctk.models.hf import FAMILIES, hf_config

    if variant.family is not None:
        return hf_config(variant.family, variant.model_options())
    fields = dict(FAMILIES["llama"].fields)  # mistral: the llama family's option names
    options = {fields.get(k, k): v for k, v in variant.model_options().items()}
    return transformers.MistralConfig(**options, attn_implementation="eager")


def _model_class(config):
    import transformers

    return transformers.AutoModelForMaskedLM if config.model_type == "bert" else transformers.AutoModelForCausalLM


@pytest.fixture(scope="session", params=VARIANTS, ids=lambda v: v.id)
def saved(request, tmp_path_factory) -> tuple[Variant, list[Path]]:
    """Three models of one variant saved with `save_pretrained`, and two converge runs of step<N>/ dirs over them."""
    variant = request.param
    root = tmp_path_factory.mktemp(variant.id)
    config = _config(variant)
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = _model_class(config).from_config(config).to(getattr(torch, variant.dtype))
        model.save_pretrained(root / f"m{seed}", max_shard_size="4KB" if variant.sharded else "1GB")
        dirs.append(root / f"m{seed}")
    for run, steps in (("r0", (0, 1)), ("r1", (1, 2))):
        for step, source in enumerate(steps):
            (root / run).mkdir(exist_ok=True)
            (root / run / f"step{step}").symlink_to(dirs[source])
    return variant, dirs


def _stored(path: Path) -> dict[str, tuple]:
    return {t.name: (tuple(t.shape), t.dtype) for t in inspect_checkpoint(path).tensors}


def _loaded(path: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    return _model_class(config).from_pretrained(path, dtype="auto")


def _check_output(out: Path, source: Path, dtype: str | None = None) -> None:
    """`out` stores what `source` stores (names, shapes, dtypes) and loads with the same ties."""
    expected = _stored(source)
    if dtype is not None:
        expected = {k: (shape, dtype) for k, (shape, _) in expected.items()}
    assert _stored(out) == expected
    assert tied_groups(_loaded(out)) == tied_groups(_loaded(source))


def _run(*args) -> int:
    return main([str(a) for a in args])


def test_saved_checkpoints_are_what_transformers_writes(saved):
    """The fixture really omits tied aliases (and is sharded) as the variant says."""
    variant, dirs = saved
    names = _stored(dirs[0])
    assert (len(tied_groups(_loaded(dirs[0]))) > 0) == variant.tied
    assert not any(k.startswith("lm_head.") or k.startswith("cls.predictions.decoder.") for k in names) or not variant.tied
    assert (dirs[0] / "model.safetensors.index.json").is_file() == variant.sharded
    config = _loaded(dirs[0]).config
    assert str(config.dtype).endswith(variant.dtype)
    if variant.arch == "gpt_neox":  # parallel residual, partial rotary (what the spec must get right)
        assert config.use_parallel_residual and config.rope_parameters["partial_rotary_factor"] < 1


def test_inspect(saved, tmp_path):
    _, dirs = saved
    assert _run("inspect", dirs[0], "--json", tmp_path / "i.json") == 0
    assert json.loads((tmp_path / "i.json").read_text())


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_align_writes_a_loadable_function_preserving_model(saved, tmp_path, stream):
    variant, dirs = saved
    out = tmp_path / "aligned"
    assert _run("align", dirs[0], dirs[1], "--out", out, *(["--stream"] if stream else [])) == 0
    _check_output(out, dirs[1])
    b, aligned = _loaded(dirs[1]).eval(), _loaded(out).eval()
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tol = 1e-4 if variant.dtype == "float32" else 3e-2
        torch.testing.assert_close(aligned(input_ids=ids).logits.float(), b(input_ids=ids).logits.float(),
                                   atol=tol, rtol=tol)


def test_barrier(saved):
    variant, dirs = saved
    assert _run("barrier", dirs[0], dirs[1], "--task", variant.task, *TEXT, "--points", 3) in (0, 3)


@pytest.mark.parametrize("method", ["uniform", "weighted", "greedy"])
def test_soup(saved, tmp_path, method):
    variant, dirs = saved
    extra = {"uniform": [], "weighted": ["--weights", "0.5,0.3,0.2"],
             "greedy": ["--task", variant.task, *TEXT]}[method]
    out = tmp_path / "soup"
    assert _run("soup", *dirs, "--out", out, "--method", method, *extra) == 0
    _check_output(out, dirs[0])
    if method == "greedy":
        assert "soup with it" in (out / "README.md").read_text()  # scored: the model card has the scores


def test_soup_task_scores_the_written_soup(saved, tmp_path):
    variant, dirs = saved
    out = tmp_path / "soup"
    assert _run("soup", dirs[0], dirs[1], "--out", out, "--task", variant.task, *TEXT) == 0
    assert "| soup |" in (out / "README.md").read_text()


def test_soupable(saved, tmp_path):
    variant, dirs = saved
    code = _run("soupable", *dirs, "--task", variant.task, *TEXT, "--base", dirs[0], "--json", tmp_path / "v.json")
    assert code in (0, 3)
    assert set(json.loads((tmp_path / "v.json").read_text())["barriers"]) == {"1-2", "1-3", "2-3"}


def test_train_init_from(saved, tmp_path):
    variant, dirs = saved
    if variant.family is None:
        pytest.skip(f"{variant.arch}: no lmctk model family builds it, so `train --model` cannot (train builds by family)")
    options = {k: v for k, v in variant.model_options().items() if k not in ("vocab_size", "max_positions")}
    model_opts = [x for k, v in options.items() for x in ("--model-opt", f"{k}={json.dumps(v)}")]
    run = tmp_path / "run"
    assert _run("train", "--out", run, "--task", variant.task, *TEXT, "--model", variant.family, *model_opts,
                "--init-from", dirs[0], "--steps", 1, "--eval-every", 1, "--quiet") == 0


def test_converge(saved, tmp_path):
    variant, dirs = saved
    root = dirs[0].parent
    assert _run("converge", root / "r0", root / "r1", "--task", variant.task, *TEXT, "--probe", 4,
                "--json", tmp_path / "c.json") == 0


@pytest.mark.slow
def test_stream_align_recovers_a_permuted_full_vocab_gpt2_and_soups_it(tmp_path):
    """`benchmarks/bench_scale.py` reduced: GPT-2's 50257-token vocab on a narrow model (124M takes minutes
    on 2 cores). B = π(A) saved by save_pretrained; align --stream must give back A bit for bit."""
    import transformers

    from lmctk.io import LazyState
    from lmctk.spec import spec_for
    from lmctk.spec.core import random_perms
    from lmctk.spec.permute import permute_state

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64))
    model.save_pretrained(tmp_path / "A")
    spec = spec_for(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(permute_state(state, spec, random_perms(spec, torch.Generator().manual_seed(1), moving=True)))
    model.save_pretrained(tmp_path / "B")
    assert _run("align", tmp_path / "A", tmp_path / "B", "--stream", "--out", tmp_path / "al") == 0
    a, aligned = LazyState(tmp_path / "A"), LazyState(tmp_path / "al")
    assert a.keys() == aligned.keys() and all(torch.equal(a[k], aligned[k]) for k in a)
    assert _run("soup", tmp_path / "A", tmp_path / "B", tmp_path / "al", "--out", tmp_path / "soup") == 0
    _check_output(tmp_path / "soup", tmp_path / "A")
