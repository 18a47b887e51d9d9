"""`fit`: train a config into a run dir (manifest, metrics journal, checkpoints), resumably."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmctk.errors import ConfigError, MissingPathError
from lmctk.io import load_state
from lmctk.io.lock import locked
from lmctk.models import model_config
from lmctk.rundir import MANIFEST, RunDir, environment, timestamp
from lmctk.seeding import derive_seed
from lmctk.tasks import Task, get_task
from lmctk.train.config import TrainConfig
from lmctk.train.trainer import Trainer, config_skeleton


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
    with locked(out):
        trainer, run, resumed_from = _begin(config, out, overwrite=overwrite, resume=resume)
        final = _train(config, trainer, run, fresh=resumed_from is None, progress=progress)
    return TrainResult(run.path, trainer.step, final, time.perf_counter() - start, resumed_from)


def _begin(config: TrainConfig, out: Path, *, overwrite: bool, resume: bool) -> tuple[Trainer, RunDir, int | None]:
    """The trainer and run dir to continue (`resume`) or start; the old run is replaced only once the
    trainer (task, model, optimizer, init weights) is built, so a bad option destroys nothing.

    A resumed journal keeps only the records up to the checkpoint resumed from: the steps after it are
    redone and logged again, once.
    """
    if resume and (out / MANIFEST).is_file():
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
            trainer = Trainer(config, task=task, model=config_skeleton(config, task))
            trainer.load_checkpoint(run.checkpoint_dir(resumed_from))
        run.keep_records(lambda record: resumed_from is not None and record["step"] <= resumed_from)
        return trainer, run, resumed_from
    trainer = Trainer(config)
    run = RunDir.create(out, overwrite=overwrite)
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
    return trainer, run, None


def _train(config: TrainConfig, trainer: Trainer, run: RunDir, *, fresh: bool,
           progress: ProgressFn | None) -> dict[str, dict[str, float]]:
    """Train to `config.steps`, evaluating and checkpointing on schedule; the final evaluation."""
    def log_eval() -> dict[str, Any]:
        record: dict[str, Any] = {"step": trainer.step}
        for split in ("train", "test"):
            m = trainer.evaluate(split)
            run.append({"step": trainer.step, "split": split, "loss": m["loss"], "accuracy": m["accuracy"]})
            record[split] = m
        return record

    checkpoints = set(config.checkpoints)
    last = None
    if fresh:
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
    return {split: last[split] for split in ("train", "test")}


def load_run_model(path: str | Path, step: int | None = None, *,
                   allow_code: bool = False) -> tuple[nn.Module, Task, TrainConfig]:
    """Rebuild the model and task of a run dir and load the checkpoint at `step` (default: latest).

    A `module:function` task in the manifest is refused unless `allow_code` (see `RunDir.task`).
    """
    run = RunDir.open(path)
    config = TrainConfig.from_dict(run.manifest()["config"])
    name, options = run.task(allow_code)
    task = get_task(name, **options)
    model = config_skeleton(config, task)
    steps = run.checkpoint_steps()
    if not steps:
        raise MissingPathError(run.path / "checkpoints", "checkpoint")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise ConfigError(f"{run.path}: no checkpoint at step {chosen}; available: {', '.join(map(str, steps))}")
    model.load_state_dict(load_state(run.checkpoint_dir(chosen)))
    return model, task, config

