"""K replicas of one small model trained together: stacked parameters, one `torch.func.vmap` step.

Replica k is the run of `TrainConfig(seed=seeds[k])`: its own init, data order and batches, as in
`Trainer`, with SGD (momentum, weight decay) or AdamW applied to the stacked tensors in closed form.
The result matches K sequential `Trainer` runs to float rounding (batched kernels sum differently), at
a fraction of the Python and kernel-launch overhead. Models with dropout or BatchNorm are refused:
vmap would need per-replica randomness and in-place running statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from lmctk.errors import ConfigError
from lmctk.models import has_dropout
from lmctk.seeding import derive_seed
from lmctk.tasks import Task, get_task
from lmctk.tasks.base import Batch, DataOrder
from lmctk.train.config import TrainConfig, lr_at, resolve_device
from lmctk.train.trainer import init_model, step_batch

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW defaults


class Replicas:
    """K replicas (one per seed) of `config`, trained in lockstep by `train_step`."""

    def __init__(self, config: TrainConfig, seeds: Sequence[int], task: Task | None = None) -> None:
        if config.grad_clip:
            raise ConfigError("replicas: grad_clip is not supported in batched training; use Trainer per replica")
        self.config, self.seeds = config, list(seeds)
        self.device = resolve_device(config.device)
        self.task = task or get_task(config.task, **config.task_options)
        models = [init_model(dataclasses.replace(config, seed=s), self.task).to(self.device) for s in self.seeds]
        self.model = models[0]
        if has_dropout(self.model) or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            raise ConfigError("replicas: models with dropout or BatchNorm cannot be vmapped here; use Trainer per replica")
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.orders = [DataOrder(self.task.num_train, derive_seed(s, "data"), config.batch_size) for s in self.seeds]
        self.state = {n: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for n, p in self.params.items()}
        self.step = 0

        def loss(params, inputs, targets):
            out = functional_call(self.model, {**params, **self.buffers}, args=(), kwargs=inputs)
            return self.task.loss(self.task.logits(out), Batch(inputs, targets))

        self._grad = vmap(grad_and_value(loss))

    def batches(self, step: int) -> Batch:
        """The K batches of `step` (replica k's own data order), stacked on a leading axis."""
        parts = [step_batch(self.task, order, step) for order in self.orders]
        return Batch({k: torch.stack([b.inputs[k] for b in parts]) for k in parts[0].inputs},
                     torch.stack([b.targets for b in parts])).to(self.device)

    def train_step(self) -> torch.Tensor:
        """One update of every replica; returns the K batch losses (no host sync)."""
        c = self.config
        batch = self.batches(self.step)
        grads, losses = self._grad(self.params, batch.inputs, batch.targets)
        lr, t = lr_at(c, self.step), self.step + 1
        with torch.no_grad():
            for n, p in self.params.items():
                g, s = grads[n], self.state[n]
                if c.optimizer == "sgd":
                    if c.weight_decay:
                        g = g + c.weight_decay * p
                    s["m"] = g if t == 1 else s["m"] * c.momentum + g
                    p.sub_(lr * s["m"])
                else:
                    p.mul_(1 - lr * c.weight_decay)
                    s["m"].lerp_(g, 1 - BETAS[0])
                    s["v"].mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                    denom = (s["v"].sqrt() / math.sqrt(1 - BETAS[1] ** t)).add_(EPS)
                    p.addcdiv_(s["m"], denom, value=-lr / (1 - BETAS[0] ** t))
        self.step = t
        return losses.detach()

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Replica k's full state (parameters and buffers), as `model.state_dict()` would give it."""
        return {**{n: p[k].clone() for n, p in self.params.items()}, **{n: b.clone() for n, b in self.buffers.items()}}
