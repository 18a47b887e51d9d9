"""From a checkpoint path to what runs it: its run dir, the task it was trained on, a model skeleton
and the description a permutation spec is built from.

A path may be an lmctk run dir (its latest checkpoint), a checkpoint dir inside a run, or a Hugging
Face model dir with a `config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmctk.errors import ConfigError, KeyMismatchError
from lmctk.io import inspect_checkpoint, load_state, resolve_checkpoint
from lmctk.models import build_model
from lmctk.models.hf import model_from_config
from lmctk.rundir import RunDir
from lmctk.tasks import Task, get_task


def run_dir_of(path: str | Path) -> Path | None:
    """The lmctk run dir that `path` is (or whose checkpoint dir it is), else None."""
    path = Path(path)
    for candidate in (path, path.parent.parent):
        if (candidate / "manifest.json").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def _manifest(run: Path) -> dict[str, Any]:
    return RunDir.open(run).manifest()


def task_of(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The (task name, options) a run dir was trained on, or None for other checkpoints."""
    run = run_dir_of(path)
    if run is None:
        return None
    task = _manifest(run)["config"]
    return task["task"], task.get("task_options") or {}


def model_config_of(path: str | Path) -> Any:
    """What `lmctk.spec.spec_for` accepts for this checkpoint: a run's model config or an HF config dict."""
    run = run_dir_of(path)
    if run is not None:
        return _manifest(run)["model"]
    config = resolve_checkpoint(path) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{path}: no config.json and not an lmctk run dir; cannot tell its architecture")
    return read_hf_config(config)


_SIZE_FIELDS = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
                "num_attention_heads", "n_head", "intermediate_size", "max_position_embeddings", "n_positions")


def read_hf_config(file: Path) -> dict[str, Any]:
    """An HF `config.json` as a dict, checked: JSON object, a `model_type` transformers knows, positive
    integer sizes, and no more parameters than its checkpoint holds (an absurd size would hang the build)."""
    import transformers

    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise ConfigError(f"{file}: not valid UTF-8 JSON; fix or re-download the model's config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: not a JSON object; fix or re-download the model's config.json")
    kind = config.get("model_type")
    if kind not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"{file}: model_type {kind!r} is not one transformers {transformers.__version__} knows "
                          "(e.g. gpt2, llama, bert); fix config.json or upgrade transformers")
    for key in _SIZE_FIELDS:
        value = config.get(key)
        if key in config and value is not None and not (type(value) is int and value > 0):
            raise ConfigError(f"{file}: {key}={value!r} must be a positive integer; fix config.json")
    width = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if config.get(k)), 1)
    depth = next((config[k] for k in ("num_hidden_layers", "n_layer") if config.get(k)), 1)
    least = (config.get("vocab_size") or 0) * width + depth * width * width  # embeddings + one matrix per layer
    held = inspect_checkpoint(file.parent).num_params
    if least > 2 * held:
        raise ConfigError(f"{file}: its sizes describe a model of at least {least:,} parameters but the checkpoint "
                          f"holds {held:,}; fix config.json")
    return config


def checkpoint_skeleton(path: str | Path, task: Task | None = None) -> nn.Module:
    """A model with the architecture of the checkpoint at `path` (weights to be loaded by the caller).

    For an HF dir whose config names no architecture, the task's kind picks the LM head (see
    `models.hf.model_from_config`). HF models use eager attention, as lmctk's own do: deterministic
    and vmap-friendly.
    """
    run = run_dir_of(path)
    if run is not None:
        built = _manifest(run)["model"]  # every option resolved when the run was made: no task needed
        return build_model(built["name"], **built["options"])
    config_file = resolve_checkpoint(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{path}: cannot rebuild a model to evaluate (no config.json, not an lmctk run dir); "
            "give run dirs or Hugging Face model dirs"
        )
    import transformers

    raw = read_hf_config(config_file)
    try:
        config = transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{config_file}: transformers rejects it ({str(exc).splitlines()[0][:160]}); fix config.json") from None
    config._attn_implementation = "eager"
    return model_from_config(config, task.kind if task is not None and task.kind != "classification" else None)


def resolve_task(task: str | Task | None, options: Mapping[str, Any] | None, paths: Sequence[str | Path]) -> Task:
    """The task to score on: given by name (or object), else the task the first run dir was trained on."""
    if task is not None and not isinstance(task, str):
        return task
    if task is None:
        found = task_of(paths[0]) if paths else None
        if found is None:
            raise ConfigError("--task: needed to score these checkpoints (they are not lmctk run dirs); e.g. --task text")
        task, options = found[0], {**found[1], **(options or {})}
    return get_task(task, **dict(options or {}))


def load_model_state(path: str | Path, task: Task | None = None) -> tuple[nn.Module, dict[str, torch.Tensor], Task | None]:
    """(model skeleton, its state at `path`, the run's task or None) for any checkpoint path."""
    found = task_of(path)
    task = task or (get_task(found[0], **found[1]) if found else None)
    model = checkpoint_skeleton(path, task)
    state = load_state(path)
    load_into(model, state, path)
    return model, state, task


def _hf_renamed(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with keys the model lacks renamed as transformers renames checkpoint keys on load (e.g.
    GPT-NeoX's `embed_out` -> `lm_head`, which `save_pretrained` writes back and Pythia checkpoints use)."""
    names = set(model.state_dict())
    out = dict(state)
    odd = [k for k in state if k not in names]
    if not odd or not hasattr(model, "config"):
        return out
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers < 5 renames nothing
        return out
    renames = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]  # one-to-one only
    for key in odd:
        new = key
        for rename in renames:
            new = rename.rename_source_key(new)[0]
        if new in names and new not in out:
            out[new] = out.pop(key)
    return out


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: object) -> None:
    """Load `state` strictly, except that keys tied to a loaded one may be absent (an HF checkpoint
    saved by `save_pretrained` omits `lm_head.weight` when it is the embedding) and legacy HF key
    names are renamed as transformers does. Floating tensors are cast to the model's dtype (bf16 upcast)."""
    state = _hf_renamed(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyMismatchError(f"{where}: {len(unexpected)} tensors the model does not have "
                               f"(e.g. {unexpected[0]}); use checkpoints of one architecture")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied:
        raise KeyMismatchError(f"{where}: checkpoint lacks {len(untied)} tensors (e.g. {untied[0]}); "
                               "use checkpoints of one architecture")
