"""Deterministic trainer: one seed derives the init, data-order and dropout streams; resumable bitwise.

Every source of randomness is owned by the run, never by the process: the model is initialised
under its own seed, each step's batch is a pure function of (data seed, step), and dropout draws
from an RNG state that is swapped in for the step and saved in every checkpoint. So a run resumed
from a checkpoint produces the same weights bit for bit (on CPU), and two runs never share a stream.
"""

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmctk.errors import CorruptCheckpointError, MissingPathError
from lmctk.io import assert_same_shapes, load_state, save_hf_dir
from lmctk.loading import load_into, read_state
from lmctk.models import build_model
from lmctk.seeding import derive_seed
from lmctk.tasks import Task, get_task
from lmctk.tasks.base import Batch, DataOrder, evaluate, forward
from lmctk.train.config import TrainConfig, lr_at, resolve_device
from lmctk.train.rng import IsolatedRNG

TRAINER_FILE = "trainer.safetensors"


def init_model(config: TrainConfig, task: Task | None = None) -> nn.Module:
    """Build the configured model with weights drawn from the run's init seed only, or loaded from
    `config.init_from` (a checkpoint file, HF dir or run dir of the same architecture)."""
    task = task or get_task(config.task, **config.task_options)
    with torch.random.fork_rng(devices=[]):  # models are built on the CPU: only its generator is drawn from
        torch.default_generator.manual_seed(derive_seed(config.seed, "init"))
        model = build_model(config.model, task, **config.model_options)
    if config.init_from is not None:
        loaded = read_state(config.init_from, model)
        assert_same_shapes(model.state_dict(), loaded, "the configured model", str(config.init_from))
        load_into(model, loaded, config.init_from)
    return model


def step_batch(task: Task, order: DataOrder, step: int, indices: torch.Tensor | None = None) -> Batch:
    """The training batch of `step` under `order` (on the CPU), drawn with the step's own generator.

    `indices` replace the order's examples; rows kept keep their randomness (e.g. MLM masks).
    """
    gen = torch.Generator().manual_seed(derive_seed(order.seed, "batch", step))
    return task.train_batch(order.indices(step) if indices is None else indices, gen)


def config_skeleton(config: TrainConfig, task: Task | None = None) -> nn.Module:
    """The configured architecture, for loading a checkpoint into (never reads `init_from`)."""
    return init_model(dataclasses.replace(config, init_from=None), task)


class Trainer:
    """Step-wise training of one replica; every piece of its state can be saved and restored exactly."""

    def __init__(self, config: TrainConfig, *, task: Task | None = None, model: nn.Module | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.task = task or get_task(config.task, **config.task_options)
        self.model = (model or init_model(config, self.task)).to(self.device)
        self.step = 0
        self.set_data_seed(derive_seed(config.seed, "data"))
        self.set_dropout_seed(derive_seed(config.seed, "dropout"))
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def batch(self, step: int) -> Batch:
        """The training batch of `step`: a pure function of the data seed and the step."""
        return step_batch(self.task, self.data_order, step).to(self.device)

    def train_step(self, batch: Batch | None = None) -> torch.Tensor:
        """One optimiser update on this step's batch (or the given one); returns the batch loss (no host sync)."""
        batch = batch if batch is not None else self.batch(self.step)
        lr = lr_at(self.config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self.dropout_rng.active():
            loss = self.task.loss(forward(self.model, batch, self.task), batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.detach()

    def evaluate(self, split: str = "test") -> dict[str, float]:
        return evaluate(self.model, self.task, split, device=self.device)

    def fork(self) -> "Trainer":
        """An independent copy at the same step: model, optimizer state and RNG states are deep-copied.

        The child shares nothing mutable with the parent (twins and replicas); `set_data_seed` /
        `set_dropout_seed` give it its own streams from then on.
        """
        child = Trainer(self.config, task=self.task, model=copy.deepcopy(self.model))
        child.optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        child.step = self.step
        child.dropout_rng.load_state_tensors(self.dropout_rng.state_tensors())
        child.set_data_seed(self.data_seed)
        return child

    @property
    def data_seed(self) -> int:
        return self.data_order.seed

    def set_data_seed(self, seed: int) -> None:
        """Draw batches from step `self.step` on with another data-order seed (Frankle et al.'s instability)."""
        self.data_order = DataOrder(self.task.num_train, seed, self.config.batch_size)

    def set_dropout_seed(self, seed: int) -> None:
        """Draw dropout masks from step `self.step` on from a fresh stream seeded with `seed`."""
        self.dropout_rng = IsolatedRNG(seed, self.device)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, out_dir: Path) -> None:
        """Write `model.safetensors` (+ `config.json` for HF models) and `trainer.safetensors`.

        The trainer file holds the optimizer state and the dropout RNG as tensors and the rest as
        JSON metadata, so no pickle is involved. The dir is assembled beside its final name and
        renamed into place, so a checkpoint dir that exists is complete.
        """
        tensors, meta = self._trainer_state()
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        hf_config = getattr(self.model, "config", None)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_hf_dir(state, tmp, config=hf_config if hasattr(hf_config, "to_dict") else None)
        save_file(tensors, str(tmp / TRAINER_FILE), metadata={"lmctk": json.dumps(meta)})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)

    def _trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for idx, pstate in opt["state"].items():
            for name, value in pstate.items():
                key = f"optim.{idx}.{name}"
                if torch.is_tensor(value):
                    tensors[key] = value.detach().cpu().contiguous()
                else:
                    scalars[key] = value
        tensors.update(self.dropout_rng.state_tensors())
        meta = {
            "step": self.step,
            "param_groups": opt["param_groups"],
            "optim_scalars": scalars,
            "config": self.config.to_dict(),
        }
        return tensors, meta

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        """Restore model, optimizer, RNG and step from a checkpoint written by `save_checkpoint`."""
        ckpt_dir = Path(ckpt_dir)
        trainer_file = ckpt_dir / TRAINER_FILE
        if not trainer_file.is_file():
            raise MissingPathError(trainer_file, "trainer state (needed to resume)")
        state = load_state(ckpt_dir, device=self.device)
        self.model.load_state_dict(state)
        try:
            tensors = load_file(str(trainer_file))
            with safe_open(str(trainer_file), "pt") as f:
                meta = json.loads(f.metadata()["lmctk"])
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CorruptCheckpointError(f"{trainer_file}: unreadable trainer state ({e}); resume from an earlier checkpoint") from e
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value.to(self.device) if name != "step" else value
        for key, value in meta["optim_scalars"].items():
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
        groups = meta["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.dropout_rng.load_state_tensors(tensors)
        self.step = int(meta["step"])
