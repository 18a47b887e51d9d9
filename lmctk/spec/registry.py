"""Which permutation spec fits a model: builders register per architecture; `spec_for` dispatches.

`spec_for(model)` dispatches on a Hugging Face `config.model_type` or a reference model's class. A
config (HF config object, `config.json` dict, or an lmctk model config `{"name", "options"}`) is built
on the meta device first, so no weights are made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmctk.errors import ConfigError
from lmctk.models import build_model
from lmctk.models.hf import model_from_config
from lmctk.spec.core import PermutationSpec

Builder = Callable[[nn.Module], PermutationSpec]
_BUILDERS: dict[str, Builder] = {}


def register(*names: str) -> Callable[[Builder], Builder]:
    """Register a spec builder under HF model_type names or reference model class names."""

    def deco(fn: Builder) -> Builder:
        for n in names:
            _BUILDERS[n] = fn
        return fn

    return deco


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type or type(model).__name__


def _module_from_config(config: Any) -> nn.Module:
    with torch.device("meta"):
        if isinstance(config, dict) and "name" in config and "options" in config:
            return build_model(config["name"], **config["options"])
        if isinstance(config, dict):
            import transformers  # slow to import: only when a config dict must become a config object

            if "model_type" not in config:
                raise ConfigError("config: no 'model_type' field; give a Hugging Face config.json or a model")
            config = transformers.AutoConfig.for_model(**config)
        return model_from_config(config)


def spec_for(model_or_config: nn.Module | Any) -> PermutationSpec:
    """The permutation spec of a model (or of the model a config describes)."""
    model = model_or_config if isinstance(model_or_config, nn.Module) else _module_from_config(model_or_config)
    arch = _architecture(model)
    if arch not in _BUILDERS:
        raise ConfigError(
            f"no permutation spec for architecture '{arch}'; supported: {', '.join(sorted(_BUILDERS))}; "
            "build a PermutationSpec yourself and pass it as spec="
        )
    spec = _BUILDERS[arch](model)
    spec.buffers = frozenset(name for name, _ in model.named_buffers() if name in spec.axes)
    return spec
