"""Deterministic trainer: one seed derives the init, data-order and dropout streams; resumable bitwise.

Every source of randomness is owned by the run, never by the process: the model is initialised
under its own seed, each step's batch is a pure function of (data seed, step), and dropout draws
from an RNG state that is swapped in for the step and saved in every checkpoint. So a run resumed
from a checkpoint produces the same weights bit for bit (on CPU), and two runs never share a stream.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmctk.errors import ConfigError, CorruptCheckpointError, MissingPathError
from lmctk.io import assert_same_shapes, load_state, save_hf_dir
from lmctk.models import build_model, model_config
from lmctk.rundir import RunDir, environment, timestamp
from lmctk.seeding import derive_seed
from lmctk.tasks import Task, get_task
from lmctk.tasks.base import Batch, DataOrder, evaluate, forward

TRAINER_FILE = "trainer.safetensors"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in the manifest and enough to rebuild it."""

    task: str = "digits"  # built-in task name or module:function
    task_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"  # reference model or tiny HF model name
    model_options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # start from this checkpoint's weights (fine-tuning) instead of a fresh init
    seed: int = 0  # derives the init, data-order and dropout seeds
    steps: int = 300  # optimiser steps
    batch_size: int = 64
    optimizer: str = "adamw"  # sgd (with momentum) | adamw
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0
    warmup: int = 0  # linear warmup steps
    schedule: str = "cosine"  # decay after warmup: constant | cosine | linear
    grad_clip: float | None = None  # max global grad norm
    checkpoints: list[int] = field(default_factory=list)  # steps to save (the final step always is)
    eval_every: int = 100  # evaluate train and test every N steps (and at 0 and the end)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: unknown '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: unknown '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.warmup < 0 or self.warmup > self.steps:
            raise ConfigError(f"warmup: must be between 0 and steps ({self.steps}), got {self.warmup}")
        bad = [s for s in self.checkpoints if s < 0 or s > self.steps]
        if bad:
            raise ConfigError(f"checkpoints: step {bad[0]} is outside 0..{self.steps}")
        self.checkpoints = sorted(set(int(s) for s in self.checkpoints) | {self.steps})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"train config: unknown field '{unknown[0]}'; known fields: {', '.join(sorted(known))}")
        return cls(**d)


def log_spaced_steps(count: int, steps: int) -> list[int]:
    """`count` checkpoint steps spaced evenly in log(step) from 1 to `steps`, plus step 0."""
    if count < 1:
        raise ConfigError(f"log-checkpoints: need at least 1, got {count}")
    if steps < 1:
        return [0]
    grid = np.unique(np.round(np.logspace(0, math.log10(steps), count)).astype(int))
    return sorted({0, *grid.tolist(), steps})


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for the update made at `step` (0-based): linear warmup, then the decay schedule."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / span, 1.0)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{device}' requested but CUDA is not available; use --device cpu")
    return dev


class IsolatedRNG:
    """A private copy of torch's global RNG (CPU, plus CUDA when used), swapped in only inside `with`.

    Dropout in `nn.Module`s draws from the global generator; wrapping each step in this scope gives
    every run (and every twin) its own dropout stream, whose state is checkpointed.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.Generator().manual_seed(seed).get_state()
        self.cuda_state = torch.Generator(device).manual_seed(seed).get_state() if device.type == "cuda" else None

    def _devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._devices()):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield
            self.cpu_state = torch.get_rng_state()
            if self.cuda_state is not None:
                self.cuda_state = torch.cuda.get_rng_state(self.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"rng.dropout.cpu": self.cpu_state.clone()}
        if self.cuda_state is not None:
            out["rng.dropout.cuda"] = self.cuda_state.clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.cpu_state = tensors["rng.dropout.cpu"].clone()
        if self.cuda_state is not None and "rng.dropout.cuda" in tensors:
            self.cuda_state = tensors["rng.dropout.cuda"].clone()


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Deterministic algorithms on, TF32 off, cudnn.benchmark off inside the block (restored after).

    Needed for bitwise-identical twins on GPU. `torch.use_deterministic_algorithms` is only switched
    when CUDA is available: CPU kernels are deterministic already, and the switch imports
    torch._inductor (seconds per process).
    """
    import os

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        if torch.cuda.is_available():
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if torch.are_deterministic_algorithms_enabled() != saved[0]:
            torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:]


def init_model(config: TrainConfig, task: Task | None = None) -> nn.Module:
    """Build the configured model with weights drawn from the run's init seed only, or loaded from
    `config.init_from` (a checkpoint file, HF dir or run dir of the same architecture)."""
    task = task or get_task(config.task, **config.task_options)
    with torch.random.fork_rng(devices=[]):  # models are built on the CPU: only its generator is drawn from
        torch.default_generator.manual_seed(derive_seed(config.seed, "init"))
        model = build_model(config.model, task, **config.model_options)
    if config.init_from is not None:
        own = model.state_dict()
        loaded = load_state(config.init_from)
        assert_same_shapes(own, loaded, "the configured model", str(config.init_from))
        model.load_state_dict(loaded)
    return model


def step_batch(task: Task, order: DataOrder, step: int, indices: torch.Tensor | None = None) -> Batch:
    """The training batch of `step` under `order` (on the CPU), drawn with the step's own generator.

    `indices` replace the order's examples; rows kept keep their randomness (e.g. MLM masks).
    """
    gen = torch.Generator().manual_seed(derive_seed(order.seed, "batch", step))
    return task.train_batch(order.indices(step) if indices is None else indices, gen)


def model_skeleton(config: TrainConfig, task: Task | None = None) -> nn.Module:
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


@dataclass
class TrainResult:
    """What `fit` returns: where the run lives and its final evaluation."""

    run_dir: Path
    steps: int
    final: dict[str, dict[str, float]]  # split -> {"loss", "accuracy"}
    seconds: float
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "steps": self.steps, "final": self.final,
                "seconds": self.seconds, "resumed_from": self.resumed_from}

    def __rich__(self):
        from rich.table import Table

        t = Table(title=f"trained {self.steps} steps in {self.seconds:.1f} s", caption=str(self.run_dir))
        t.add_column("split")
        t.add_column("loss", justify="right")
        t.add_column("accuracy", justify="right")
        for split, m in self.final.items():
            t.add_row(split, f"{m['loss']:.4f}", f"{m['accuracy']:.4f}")
        return t


ProgressFn = Callable[[int, int, dict[str, Any] | None], None]


def fit(
    config: TrainConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train `config` into the run dir `out`: manifest, metrics journal and checkpoints.

    `resume=True` continues from the latest checkpoint of an existing run (same config required);
    `progress(step, total, record)` is called after every step (record is an eval record or None).
    """
    out = Path(out)
    start = time.perf_counter()
    if resume and (out / "manifest.json").is_file():
        run = RunDir.open(out)
        saved = TrainConfig.from_dict(run.manifest()["config"])
        if saved != config:
            raise ConfigError(f"{out}: resume with a different config than the run's manifest; "
                              "drop --resume or use the same options")
        steps = run.checkpoint_steps()
        resumed_from = steps[-1] if steps else None
        if resumed_from is None:
            trainer = Trainer(config)
        else:
            task = get_task(config.task, **config.task_options)
            trainer = Trainer(config, task=task, model=model_skeleton(config, task))
            trainer.load_checkpoint(run.checkpoint_dir(resumed_from))
    else:
        run = RunDir.create(out, overwrite=overwrite)
        trainer = Trainer(config)
        resumed_from = None
        run.write_manifest({
            "kind": "train",
            "created": timestamp(),
            "config": config.to_dict(),
            "seed": config.seed,
            "seeds": {"init": derive_seed(config.seed, "init"), "data": trainer.data_seed,
                      "dropout": derive_seed(config.seed, "dropout")},
            "model": model_config(config.model, trainer.task, **config.model_options),
            "task": {"name": config.task, "options": config.task_options, "kind": trainer.task.kind},
            "environment": environment(),
        })

    def log_eval() -> dict[str, Any]:
        record: dict[str, Any] = {"step": trainer.step}
        for split in ("train", "test"):
            m = trainer.evaluate(split)
            run.append({"step": trainer.step, "split": split, "loss": m["loss"], "accuracy": m["accuracy"]})
            record[split] = m
        return record

    checkpoints = set(config.checkpoints)
    last = None
    if trainer.step == 0:
        last = log_eval()
        if 0 in checkpoints:
            trainer.save_checkpoint(run.checkpoint_dir(0))
    while trainer.step < config.steps:
        trainer.train_step()
        record = None
        if trainer.step % config.eval_every == 0 or trainer.step == config.steps:
            record = last = log_eval()
        if trainer.step in checkpoints:
            trainer.save_checkpoint(run.checkpoint_dir(trainer.step))
        if progress:
            progress(trainer.step, config.steps, record)

    if last is None:  # resumed at the end: nothing was evaluated (the loop always evaluates its last step)
        last = {split: trainer.evaluate(split) for split in ("train", "test")}
    final = {split: last[split] for split in ("train", "test")}
    return TrainResult(run.path, trainer.step, final, time.perf_counter() - start, resumed_from)


def load_run_model(path: str | Path, step: int | None = None) -> tuple[nn.Module, Task, TrainConfig]:
    """Rebuild the model and task of a run dir and load the checkpoint at `step` (default: latest)."""
    run = RunDir.open(path)
    config = TrainConfig.from_dict(run.manifest()["config"])
    task = get_task(config.task, **config.task_options)
    model = model_skeleton(config, task)
    steps = run.checkpoint_steps()
    if not steps:
        raise MissingPathError(run.path / "checkpoints", "checkpoint")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ConfigError(f"{run.path}: no checkpoint at step {chosen}; available: {', '.join(map(str, steps))}")
    model.load_state_dict(load_state(run.checkpoint_dir(chosen)))
    return model, task, config


def parse_steps(text: str) -> list[int]:
    """Parse a comma-separated step list such as '0,10,100,300'."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"checkpoints: '{text}' is not a comma-separated list of steps (e.g. 0,10,100)") from None

