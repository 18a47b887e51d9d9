"""Weight and activation matching: a permuted copy is recovered exactly; trained models get closer."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from lmctk.basin.activation import activation_matching
from lmctk.basin.align import (
    apply,
    independent_rounds,
    weight_matching,
)
from lmctk.basin.budget import plan_memory
from lmctk.errors import ConfigError, KeyMismatchError
from lmctk.io import LazyState, load_state, save_state
from lmctk.models import build_model
from lmctk.spec import invert, permute_state, random_perms, spec_for
from lmctk.tasks import get_task
from lmctk.train import TrainConfig, fit, load_run_model

DIGITS = get_task("digits")
TEXT = get_task("text", seq_len=16)

MODELS = {
    "mlp": lambda: build_model("mlp", DIGITS, widths=[48, 32, 24]),
    "cnn": lambda: build_model("cnn", DIGITS, channels=[8, 16], norm="batchnorm"),
    "resnet20-bn": lambda: build_model("resnet20", DIGITS, norm="batchnorm"),
    "resnet20-ln": lambda: build_model("resnet20", DIGITS, norm="layernorm"),
    "gpt2": lambda: build_model("gpt2", TEXT, layers=2, hidden=32, heads=4),
    "gpt_neox": lambda: build_model("gpt_neox", TEXT, layers=2, hidden=32, heads=4),
    "llama-gqa": lambda: build_model("llama", TEXT, layers=2, hidden=32, heads=4, kv_heads=2),
    "qwen2": lambda: build_model("qwen2", TEXT, layers=1, hidden=32, heads=4, kv_heads=2),
}


def distance(a, b) -> float:
    return sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a) ** 0.5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weight_matching_recovers_a_randomly_permuted_copy(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    spec = spec_for(model)
    a = model.state_dict()
    perms = random_perms(spec, torch.Generator().manual_seed(1))
    b = permute_state(a, spec, perms)
    sweeps = []
    result = weight_matching(spec, a, b, progress=lambda done, total: sweeps.append((done, total)))
    assert sweeps == [(i, None) for i in range(1, result.sweeps + 1)]
    aligned = apply(spec, b, result)
    for key in a:
        assert torch.equal(aligned[key], a[key]), key
    assert all(torch.equal(result.perms[g], invert(perms, spec)[g]) for g in spec.groups)


@pytest.mark.parametrize("name", ["mlp", "resnet20-bn", "gpt2"])
def test_activation_matching_recovers_a_randomly_permuted_copy(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    spec = spec_for(model)
    a = model.state_dict()
    perms = random_perms(spec, torch.Generator().manual_seed(2))
    b = permute_state(a, spec, perms)
    result = activation_matching(model, spec, a, b, TEXT if name == "gpt2" else DIGITS, max_batches=2)
    assert result.method == "activation_matching"
    aligned = apply(spec, b, result)
    for key in a:
        assert torch.allclose(aligned[key], a[key]), key


def test_aligned_model_computes_the_same_function():
    torch.manual_seed(0)
    model = MODELS["llama-gqa"]()
    spec = spec_for(model)
    other = MODELS["llama-gqa"]()
    a, b = model.state_dict(), other.state_dict()
    aligned = apply(spec, b, weight_matching(spec, a, b))
    ids = torch.randint(256, (2, 10))
    with torch.no_grad():
        before = functional_call(other, b, kwargs={"input_ids": ids}).logits
        after = functional_call(other, aligned, kwargs={"input_ids": ids}).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


def test_objective_trace_is_monotone_and_stops_on_no_improvement():
    torch.manual_seed(0)
    a = MODELS["mlp"]().state_dict()
    b = MODELS["mlp"]().state_dict()
    result = weight_matching(spec_for(MODELS["mlp"]()), a, b, seed=3)
    trace = result.objective
    assert all(y >= x - 1e-9 for x, y in zip(trace, trace[1:]))
    assert trace[-1] > trace[0]
    assert trace[-1] == pytest.approx(trace[-2], rel=1e-9)  # stopped after a sweep without improvement


def test_sweep_order_is_seeded():
    torch.manual_seed(0)
    model = MODELS["resnet20-bn"]()
    spec = spec_for(model)
    a, b = model.state_dict(), MODELS["resnet20-bn"]().state_dict()
    r1, r2 = weight_matching(spec, a, b, seed=7), weight_matching(spec, a, b, seed=7)
    assert all(torch.equal(r1.perms[g], r2.perms[g]) for g in spec.groups)
    assert r1.objective == r2.objective


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "resnet20-ln"])
def test_skipping_unchanged_groups_finds_the_same_permutations_as_the_plain_sweep(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    spec = spec_for(model)
    a, b = model.state_dict(), MODELS[name]().state_dict()
    for seed in range(3):
        fast = weight_matching(spec, a, b, seed=seed)
        plain = weight_matching(spec, a, b, seed=seed, skip_unchanged=False)
        assert fast.objective == plain.objective  # the same trace, number for number
        assert all(torch.equal(fast.perms[g], plain.perms[g]) for g in spec.groups)


def test_similarity_on_an_explicit_cpu_device_matches_the_states_device_and_keeps_threads():
    torch.manual_seed(0)
    model = MODELS["gpt2"]()
    spec = spec_for(model)
    a, b = model.state_dict(), MODELS["gpt2"]().state_dict()
    threads = torch.get_num_threads()
    on_cpu = weight_matching(spec, a, b, device="cpu")
    assert torch.get_num_threads() == threads  # the one-thread context for tiny problems is undone
    default = weight_matching(spec, a, b)
    assert on_cpu.objective == default.objective
    assert all(torch.equal(on_cpu.perms[g], default.perms[g]) for g in spec.groups)


def test_rounds_never_batch_groups_that_share_a_tensor():
    spec = spec_for(MODELS["gpt2"]())
    nbrs = spec.neighbours()
    rounds = independent_rounds(spec, sorted(spec.groups))
    assert sum(len(r) for r in rounds) == len(spec.groups)
    assert any(len(r) > 1 for r in rounds)  # some groups are solved together
    for r in rounds:
        assert all(not (nbrs[g] & set(r)) for g in r)


def test_bf16_states_align_with_fp32_accumulation():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    spec = spec_for(model)
    a = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    perms = random_perms(spec, torch.Generator().manual_seed(4))
    b = permute_state(a, spec, perms)
    aligned = apply(spec, b, weight_matching(spec, a, b))
    assert all(torch.equal(aligned[k], a[k]) for k in a)


def test_streaming_from_safetensors_equals_in_memory(tmp_path):
    torch.manual_seed(0)
    model = MODELS["gpt2"]()
    spec = spec_for(model)
    a, b = model.state_dict(), MODELS["gpt2"]().state_dict()
    save_state(a, tmp_path / "a.safetensors")
    save_state(b, tmp_path / "b.safetensors")
    lazy = weight_matching(spec, LazyState(tmp_path / "a.safetensors"), LazyState(tmp_path / "b.safetensors"))
    eager = weight_matching(spec, a, b)
    assert all(torch.equal(lazy.perms[g], eager.perms[g]) for g in spec.groups)


def test_a_tight_memory_budget_splits_rounds_but_finds_the_same_permutations(tmp_path):
    """Two trained-like bf16 models streamed: a budget that fits one MLP similarity at a time splits
    every round into more LAP calls, and the permutations match the unlimited run's exactly."""
    torch.manual_seed(0)
    make = lambda: build_model("qwen2", TEXT, layers=3, hidden=32, heads=4, kv_heads=2).to(torch.bfloat16)
    model = make()
    spec = spec_for(model)
    save_state(model.state_dict(), tmp_path / "a.safetensors")
    save_state(make().state_dict(), tmp_path / "b.safetensors")
    a, b = LazyState(tmp_path / "a.safetensors"), LazyState(tmp_path / "b.safetensors")
    free = weight_matching(spec, a, b, max_iter=3)
    floor = plan_memory(spec, a.shapes, {k: d.itemsize for k, d in a.dtypes.items()}, "1TB")
    least = max(floor.fixed[floor.sizes[g]] + m for g, m in floor.matrices.items())
    tight = weight_matching(spec, a, b, max_iter=3, memory=least)
    assert tight.memory["peak"] <= least == tight.memory["budget"]
    assert len(tight.lap_backends) > len(free.lap_backends)
    assert all(torch.equal(tight.perms[g], free.perms[g]) for g in spec.groups)
    assert tight.objective == free.objective
    with pytest.raises(ConfigError, match="--memory: .* give --memory"):
        weight_matching(spec, a, b, memory=least - 1)


def test_the_plan_counts_what_each_mode_holds():
    """Held states count only the permuted copy (read from disk: A, B and π(B)); GPT-2's fused q|k|v is gathered
    into one more copy; a CPU solver's chunk caps a sub-batch however large the budget, and a GPU's does not."""
    model = build_model("gpt2", TEXT, layers=3, hidden=48, heads=3)
    spec = spec_for(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sizes = dict.fromkeys(shapes, 4)
    lazy, held = plan_memory(spec, shapes, sizes, "1TB"), plan_memory(spec, shapes, sizes, "1TB", lazy=False)
    largest = max(4 * torch.Size(s).numel() for k, s in shapes.items() if k in spec.axes)
    assert lazy.read - held.read == 2 * largest
    fused = next(k for k in spec.axes if k.endswith("c_attn.weight"))
    entries = torch.Size(shapes[fused]).numel()
    head_dim = 48 // 3  # the within-head groups read c_attn: A, B, π(B), the gathered slices and two fp32 chunks
    assert lazy.fixed[head_dim] == (3 + 1) * 4 * entries + 2 * 4 * entries
    mlp = [g for g in spec.groups if g.startswith("mlp")]
    assert len(mlp) == 3 and len(held.batches(mlp)) == 1  # no chunk given: the budget alone decides
    capped = plan_memory(spec, shapes, sizes, "1TB", lazy=False, solver_chunk=held.matrices[mlp[0]] // 4 * 2)
    assert [len(b) for b in capped.batches(mlp)] == [2, 1] and capped.peak < held.peak


def test_lazy_state_keeps_files_open_and_checks_each_tensor_once(tmp_path, monkeypatch):
    save_state({"w": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.ones(2)}, tmp_path / "s.safetensors")
    state = LazyState(tmp_path / "s.safetensors")
    checks = []
    monkeypatch.setattr("lmctk.io.lazy.require_finite", lambda file, key, tensor: checks.append(key))
    first, again = state["w"], state["w"]
    assert first.dtype == torch.bfloat16 and torch.equal(first, again) and first.data_ptr() != again.data_ptr()
    assert checks == ["w"] and len(state._reader._open) == 1
    assert torch.equal(state["b"], torch.ones(2))


def test_mismatched_states_are_refused():
    a = MODELS["mlp"]().state_dict()
    b = dict(a)
    b.pop("out.bias")
    with pytest.raises(KeyMismatchError, match="out.bias"):
        weight_matching(spec_for(MODELS["mlp"]()), a, b)


@pytest.mark.slow
def test_alignment_brings_independently_trained_mlps_closer(tmp_path):
    for seed in (0, 1):
        fit(TrainConfig(task="digits", model="mlp", seed=seed, steps=150), tmp_path / f"s{seed}")
    model, task, _ = load_run_model(tmp_path / "s0")
    other, _, _ = load_run_model(tmp_path / "s1")
    spec = spec_for(model)
    a, b = model.state_dict(), other.state_dict()
    wm = apply(spec, b, weight_matching(spec, a, b))
    am = apply(spec, b, activation_matching(model, spec, a, b, task))
    assert distance(a, wm) < 0.9 * distance(a, b)
    assert distance(a, am) < 0.95 * distance(a, b)


@pytest.mark.slow
def test_align_cli_writes_an_aligned_model_that_loads_and_matches_streaming(tmp_path):
    import json
    import subprocess
    import sys

    for seed in (0, 1):
        fit(TrainConfig(task="digits", model="mlp", seed=seed, steps=20), tmp_path / f"s{seed}")

    def lmctk(*args):
        return subprocess.run([sys.executable, "-m", "lmctk", *map(str, args)], capture_output=True, text=True)

    proc = lmctk("align", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "al", "--json", tmp_path / "al.json",
                 "--memory", "1GB")
    assert proc.returncode == 0, proc.stderr
    assert "same function" in proc.stdout
    assert proc.stdout.index("working set: at most") < proc.stdout.index("objective")  # the plan comes first
    report = json.loads((tmp_path / "al.json").read_text())
    assert report["distance"]["after"]["l2"] < report["distance"]["before"]["l2"]
    assert report["function_check"] < 1e-5
    model, _, _ = load_run_model(tmp_path / "s1")
    spec = spec_for(model)
    perms = {g: torch.tensor(p) for g, p in report["perms"].items()}
    expected = apply(spec, model.state_dict(), perms)
    written = LazyState(tmp_path / "al")
    assert all(torch.equal(written[k], expected[k]) for k in expected)

    # the output says its architecture (lmctk-model.json: a registered model, never code), so it can be used again
    used = lmctk("barrier", tmp_path / "s0", tmp_path / "al", "--task", "digits", "--points", "3")
    assert used.returncode in (0, 3), used.stderr
    (tmp_path / "al" / "lmctk-model.json").write_text('{"name": "os:system", "options": {}}')
    hostile = lmctk("barrier", tmp_path / "s0", tmp_path / "al", "--task", "digits", "--points", "3")
    assert hostile.returncode == 2 and "unknown model 'os:system'" in hostile.stderr
    assert "Traceback" not in hostile.stderr

    streamed = lmctk("align", tmp_path / "s0", tmp_path / "s1", "--stream", "--json", tmp_path / "st.json")
    assert streamed.returncode == 0, streamed.stderr
    assert json.loads((tmp_path / "st.json").read_text())["perms"] == report["perms"]

    again = lmctk("align", tmp_path / "s0", tmp_path / "s1", "--out", tmp_path / "al")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = lmctk("align", tmp_path / "s0", tmp_path / "s1", "--method", "magic")
    assert bad.returncode == 2 and "--method" in bad.stderr


def test_load_model_state_fills_the_tied_head_a_save_pretrained_dir_omits(tmp_path):
    import transformers

    from lmctk.loading import load_model_state

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                     bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    model, state, task = load_model_state(tmp_path / "hf")
    assert state["lm_head.weight"] is state["transformer.wte.weight"] and task is None
    assert torch.equal(model.lm_head.weight, state["transformer.wte.weight"])


def test_absurd_sizes_in_a_model_file_are_refused_in_one_line(tmp_path):
    """lmctk-model.json (or a run's manifest) whose sizes describe more parameters than the checkpoint holds:
    a one-line error naming the file, before anything is allocated."""
    import json

    from lmctk.loading import (
        MODEL_FILE,
        check_task_fits,
        load_model_state,
        model_config_of,
        unloaded_skeleton,
    )

    fit(TrainConfig(task="digits", model="mlp", seed=0, steps=2), tmp_path / "run")
    out = tmp_path / "copy"
    save_state(load_state(tmp_path / "run"), out / "model.safetensors")
    description = model_config_of(tmp_path / "run")
    (out / MODEL_FILE).write_text(json.dumps(description))
    assert unloaded_skeleton(out) is not None and load_model_state(out)[1]  # a true description loads
    with pytest.raises(ConfigError, match="number of classes is 10 but task 'synthetic' needs 20"):
        check_task_fits(get_task("synthetic", num_classes=20), out)  # its sizes are read like a run's
    (out / MODEL_FILE).write_text(json.dumps({**description, "options": {**description["options"],
                                                                         "widths": [10**9, 10**9]}}))
    with pytest.raises(ConfigError, match=r"lmctk-model.json: describes a model of .* parameters but the checkpoint"):
        load_model_state(out)
    manifest = tmp_path / "run" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model"]["options"]["widths"] = [10**9]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"manifest.json: describes a model"):
        model_config_of(tmp_path / "run")
