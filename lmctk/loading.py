"""From a checkpoint path to what runs it: its run dir, the task it was trained on, a model skeleton
and the description a permutation spec is built from.

A path may be an lmctk run dir (its latest checkpoint), a checkpoint dir inside a run, or a Hugging
Face model dir with a `config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmctk.errors import ConfigError, KeyMismatchError
from lmctk.io import (
    KeyMap,
    LazyState,
    StateView,
    inspect_checkpoint,
    load_state,
    resolve_checkpoint,
)
from lmctk.io.write import side_files
from lmctk.models import build_model, check_options
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


MODEL_FILE = "lmctk-model.json"  # an lmctk model's registered name and resolved options, beside weights outside a run


def model_files(path: str | Path) -> dict[str, bytes]:
    """The files that say a checkpoint's architecture, to write beside weights derived from it (π(B), a
    permuted copy): an HF dir's config, generation and tokenizer files, and for an lmctk model (a run
    dir, or a dir written from one) `lmctk-model.json`, which names a registered model, never code."""
    source = resolve_checkpoint(path)
    files = {f.name: f.read_bytes() for f in side_files(source)} if source.is_dir() else {}
    return {**files, **lmctk_model_file(path)}


def lmctk_model_file(path: str | Path) -> dict[str, bytes]:
    """{"lmctk-model.json": its bytes} for a checkpoint of an lmctk model (see `model_files`), else {}."""
    model = _lmctk_model(path)
    return {} if model is None else {MODEL_FILE: (json.dumps(model, indent=2, sort_keys=True) + "\n").encode("utf-8")}


def _lmctk_model(path: str | Path) -> dict[str, Any] | None:
    """{"name", "options"} of an lmctk run dir's model or of a dir's `lmctk-model.json` (checked), else None."""
    run = run_dir_of(path)
    if run is not None:
        model = _manifest(run)["model"]
        if any((run / "checkpoints").iterdir()):  # a run not yet checkpointed has nothing to hold it against
            _check_size(model, path, run / "manifest.json")
        return model
    file = resolve_checkpoint(path) / MODEL_FILE
    if not file.is_file():
        return None
    try:
        model = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{file}: not valid UTF-8 JSON ({str(exc)[:80]}); write it again with `lmctk align --out`") from None
    if not (isinstance(model, dict) and set(model) == {"name", "options"} and isinstance(model["options"], dict)):
        raise ConfigError(f"{file}: expected {{\"name\": <lmctk model>, \"options\": {{...}}}}; write it again with "
                          "`lmctk align --out`")
    check_options(str(model["name"]), model["options"])  # an unknown name or option is refused here
    _check_size(model, path, file)
    return model


def _check_size(model: dict[str, Any], path: str | Path, where: Path) -> None:
    """Refuse a description with more parameters than the checkpoint holds (built on meta: nothing allocated),
    so absurd sizes in a file end in a one-line error, not an allocation of terabytes."""
    with torch.device("meta"):
        described = sum(p.numel() for p in build_model(model["name"], **model["options"]).parameters())
    held = inspect_checkpoint(resolve_checkpoint(path)).num_params
    if described > held:
        raise ConfigError(f"{where}: describes a model of {described:,} parameters but the checkpoint holds "
                          f"{held:,}; fix the sizes in it")


def task_of(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The (task name, options) a run dir was trained on, or None for other checkpoints."""
    run = run_dir_of(path)
    if run is None:
        return None
    return RunDir.open(run).task()


def model_config_of(path: str | Path) -> Any:
    """What `lmctk.spec.spec_for` accepts for this checkpoint: a run's model config or an HF config dict."""
    model = _lmctk_model(path)
    if model is not None:
        return model
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
    """A model with the architecture of the checkpoint at `path`, fp32 weights allocated but not
    initialised (the caller loads them; see `unloaded_skeleton`).

    For an HF dir whose config names no architecture, the task's kind picks the LM head (see
    `models.hf.model_from_config`). HF models use eager attention, as lmctk's own do: deterministic
    and vmap-friendly.
    """
    return _materialise(unloaded_skeleton(path, task))


def unloaded_skeleton(path: str | Path, task: Task | None = None) -> nn.Module:
    """The architecture of the checkpoint at `path` with its parameters on the meta device (never
    allocated nor initialised) and its buffers real (non-persistent ones, e.g. rotary frequencies, are
    not in checkpoints): load a state with `load_into(..., assign=True)`, or see `checkpoint_skeleton`."""
    with _parameters_on_meta():
        model = _build_skeleton(path, task)
    if hasattr(model, "tie_weights"):  # transformers ties in `init_weights`, which was skipped
        model.tie_weights()
    return model


def _build_skeleton(path: str | Path, task: Task | None) -> nn.Module:
    built = _lmctk_model(path)
    if built is not None:  # every option resolved when the run was made: no task needed
        return build_model(built["name"], **built["options"])
    config_file = resolve_checkpoint(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{path}: no config.json, no {MODEL_FILE} and not an lmctk run dir; cannot tell its architecture; "
            "give run dirs, dirs lmctk wrote from them, or Hugging Face model dirs"
        )
    import transformers

    raw = read_hf_config(config_file)
    try:
        config = transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{config_file}: transformers rejects it ({str(exc).splitlines()[0][:160]}); fix config.json") from None
    config._attn_implementation = "eager"
    return model_from_config(config, task.kind if task is not None and task.kind != "classification" else None)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get each parameter on the meta device and skip weight initialisation
    (torch's `nn.init` and transformers' `init_weights`); buffers are made as usual."""
    from transformers.initialization import no_init_weights

    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register


def _materialise(model: nn.Module) -> nn.Module:
    """Allocate (uninitialised, on CPU) every parameter still on meta; tied parameters stay one tensor."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), param.requires_grad)
                module._parameters[name] = made[id(param)]
    return model


def resolve_task(task: str | Task | None, options: Mapping[str, Any] | None, paths: Sequence[str | Path],
                 checkpoints: Sequence[str | Path] | None = None) -> Task:
    """The task to score on: given by name (or object), else the task the first run dir was trained on;
    checked to fit the models at `checkpoints` (default: `paths`) before any work is done."""
    if task is None or isinstance(task, str):
        if task is None:
            found = task_of(paths[0]) if paths else None
            if found is None:
                raise ConfigError("--task: needed to score these checkpoints (they are not lmctk run dirs); "
                                  "e.g. --task text")
            task, options = found[0], {**found[1], **(options or {})}
        task = get_task(task, **dict(options or {}))
    for path in paths if checkpoints is None else checkpoints:
        check_task_fits(task, path)
    return task


_OUTPUT_SIZES = {"vocab_size": "vocabulary size", "num_classes": "number of classes"}


def check_task_fits(task: Task, path: str | Path) -> None:
    """ConfigError unless the model at `path` has room for every token id or class `task` produces
    (read from its config; nothing is built): a task vocabulary larger than the model's would fail
    deep in evaluation."""
    config = model_config_of(path)
    sizes = config["options"] if isinstance(config.get("options"), dict) else config  # lmctk model or HF config
    needs = task.model_options()
    for option, what in _OUTPUT_SIZES.items():
        has = sizes.get(option)
        if option in needs and isinstance(has, int) and has < needs[option]:
            raise ConfigError(f"{path}: the model's {what} is {has} but task {task.name!r} needs {needs[option]}; "
                              "use a model and task that fit each other")


def load_model_state(path: str | Path, task: Task | None = None) -> tuple[nn.Module, dict[str, torch.Tensor], Task | None]:
    """(model, its state at `path` under the model's keys, the run's task or None) for any checkpoint path.

    The model's parameters are the state's tensors (the checkpoint's dtype; nothing is allocated twice
    and nothing randomly initialised): copy the model before changing its weights in place.
    """
    if task is None:
        found = task_of(path)
        task = get_task(found[0], **found[1]) if found else None
    model = unloaded_skeleton(path, task)
    state = dict(read_state(path, model))
    load_into(model, state, path, assign=True)
    return model, state, task


def read_state(path: str | Path, model: nn.Module, *, lazy: bool = False, keys: KeyMap | None = None, **options: Any
               ) -> StateView:
    """The checkpoint at `path` under `model`'s state keys: the one reader for states that meet a model or a spec.

    Renamed tensors get the model's names and tied aliases the file omits read from their stored member
    (see `io.keys`); `lazy` reads tensors on access (LazyState). `options` go to `load_state`.
    """
    stored = LazyState(path, **options) if lazy else load_state(path, **options)
    return (keys or KeyMap.of(model)).view(stored)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: object, keys: KeyMap | None = None,
              *, assign: bool = False) -> None:
    """Load `state` (stored names or model keys) strictly: every model key present once the key map has
    renamed it and filled its tied aliases, and no tensor the model does not have.

    `assign` makes the state's tensors the model's (as `load_state_dict(assign=True)`; the way to fill
    an `unloaded_skeleton`), then re-ties the weights of an HF model."""
    view = state if isinstance(state, StateView) else (keys or KeyMap.of(model)).view(state)
    missing, unexpected = model.load_state_dict(dict(view), strict=False, assign=assign)
    if unexpected:
        raise KeyMismatchError(f"{where}: {len(unexpected)} tensors the model does not have "
                               f"(e.g. {unexpected[0]}); use checkpoints of one architecture")
    if missing:
        raise KeyMismatchError(f"{where}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); "
                               "use checkpoints of one architecture")
    if assign and hasattr(model, "tie_weights"):
        model.tie_weights()
