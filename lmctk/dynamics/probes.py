"""Probes shared by butterfly and convergence analyses: the outputs of chosen layers on a probe batch."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from lmctk.tasks.base import Task, forward


def layer_outputs(model: nn.Module, batch, task: Task, patterns: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of the chosen modules on `batch` (eval mode): every leaf module with parameters by default."""
    chosen = []
    for name, m in model.named_modules():
        if patterns:
            if name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                chosen.append((name, m))
        elif name and not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            chosen.append((name, m))
    out: dict[str, torch.Tensor] = {}

    def hook(name):
        def save(_m, _i, o):
            o = o[0] if isinstance(o, tuple) else o
            if torch.is_tensor(o):
                out[name] = o.detach().reshape(o.shape[0], -1).float()
        return save

    handles = [m.register_forward_hook(hook(n)) for n, m in chosen]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, batch, task)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out
