"""Models by name: reference models (`mlp`, `cnn`, `resnet20`) and tiny HF LMs (`gpt2`, `gpt_neox`,
`llama`, `qwen2`, `bert`). A task's `model_options()` fill in shapes and vocabularies not given.

Construction draws from torch's global RNG (the trainer seeds it); nothing here seeds it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from torch import nn

from lmctk.errors import ConfigError
from lmctk.models.cnn import CNN
from lmctk.models.hf import FAMILIES, build_hf, config_fields
from lmctk.models.mlp import MLP
from lmctk.models.resnet import ResNet20

__all__ = ["MODELS", "build_model", "check_options", "has_dropout", "model_config", "resolve_options"]


class Task(Protocol):
    """What models need of a task (`lmctk.tasks.Task` satisfies it): its kind and the shapes it fixes."""

    name: str
    kind: str

    def model_options(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    kinds: tuple[str, ...]
    defaults: dict[str, Any]
    required: tuple[str, ...]
    raw_field: Callable[[str], bool]  # extra option names passed through (HF config fields)
    raw_hint: str = ""


def _reference(cls: type[nn.Module]) -> _Entry:
    parameters = inspect.signature(cls).parameters.values()
    return _Entry(
        cls,
        ("classification",),
        {p.name: p.default for p in parameters if p.default is not p.empty},
        tuple(p.name for p in parameters if p.default is p.empty),
        lambda key: False,
    )


def _hf(name: str) -> _Entry:
    return _Entry(
        partial(build_hf, name),
        (FAMILIES[name].kind,),
        dict(FAMILIES[name].defaults),
        ("vocab_size", "max_positions"),
        lambda key: key in config_fields(name),
        f" or any {FAMILIES[name].config_class} field",
    )


_REGISTRY = {"mlp": _reference(MLP), "cnn": _reference(CNN), "resnet20": _reference(ResNet20)}
_REGISTRY.update({name: _hf(name) for name in FAMILIES})
MODELS = tuple(_REGISTRY)


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ConfigError unless `name` is a model and every option is one it accepts, of its default's kind."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    entry = _REGISTRY[name]
    accepted = [*entry.required, *entry.defaults]
    for key, value in options.items():
        if key not in accepted and not entry.raw_field(key):
            choices = ", ".join(accepted) + entry.raw_hint
            raise ConfigError(f"model {name!r}: unknown option {key!r}; accepted options: {choices}")
        if key in entry.defaults:
            _check_like(name, key, value, entry.defaults[key])


def resolve_options(name: str, task: Task | None = None, **options: Any) -> dict[str, Any]:
    """Every option of model `name`: its defaults, then the task's `model_options()`, then `options`."""
    check_options(name, options)
    entry = _REGISTRY[name]
    given = dict(options)
    if task is not None:
        if task.kind not in entry.kinds:
            raise ConfigError(
                f"model {name!r} needs a {' or '.join(entry.kinds)} task; task {task.name!r} is {task.kind}"
            )
        given = {**task.model_options(), **options}
    check_options(name, given)
    missing = [key for key in entry.required if key not in given]
    if missing:
        raise ConfigError(f"model {name!r} needs {', '.join(missing)}; pass a task or give {missing[0]}=")
    return {**entry.defaults, **given}


def _check_like(name: str, key: str, value: Any, default: Any) -> None:
    """A user option must have its default's kind: a positive int, a non-empty list of them, or a string."""
    def size(x: Any) -> bool:
        return type(x) is int and x > 0

    if type(default) is int and not size(value):
        raise ConfigError(f"model {name!r}: option {key}={value!r} must be a positive integer (e.g. {key}={default})")
    if isinstance(default, (tuple, list)) and default and all(size(d) for d in default):
        if not (isinstance(value, (tuple, list)) and value and all(size(v) for v in value)):
            example = ",".join(map(str, default))
            raise ConfigError(f"model {name!r}: option {key}={value!r} must be positive integers (e.g. {key}={example})")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"model {name!r}: option {key}={value!r} must be a string (e.g. {key}={default})")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def model_config(name: str, task: Task | None = None, **options: Any) -> dict[str, Any]:
    """A JSON-serialisable `{"name", "options"}` with every option resolved, so a run manifest can
    rebuild the same architecture without the task: `build_model(cfg["name"], **cfg["options"])`.
    """
    return {"name": name, "options": _jsonable(resolve_options(name, task, **options))}


def build_model(name: str, task: Task | None = None, **options: Any) -> nn.Module:
    """A freshly initialised model `name` for `task` (which fills shape/vocab options) with `options`."""
    resolved = resolve_options(name, task, **options)
    return _REGISTRY[name].build(**resolved)


def has_dropout(model: nn.Module) -> bool:
    """Whether the model drops out anything in training: a dropout module with p > 0, or one of its HF
    family's dropout fields > 0 (Llama-style attention calls dropout functionally, without a module)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    return family is not None and any(getattr(model.config, f, 0.0) > 0 for f in family.dropout_fields)
