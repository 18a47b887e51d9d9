"""`lmctk train` and `lmctk inspect`: make checkpoints and look inside them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmctk.cli.app import app, console, parse_options, write_json
from lmctk.errors import ConfigError


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Run directory to create (manifest, metrics.jsonl, checkpoints/)."),
    task: str = typer.Option("digits", help="Task: digits, synthetic, text, text-mlm, or module:function."),
    model: str = typer.Option("mlp", help="Model: mlp, cnn, resnet20, gpt2, gpt_neox, llama, qwen2, bert."),
    seed: int = typer.Option(0, help="Seed; derives separate init, data-order and dropout streams."),
    init_from: Optional[str] = typer.Option(None, help="Fine-tune: start from this checkpoint's weights (run dir, HF dir or file)."),
    steps: int = typer.Option(300, help="Optimiser steps."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    optimizer: str = typer.Option("adamw", help="sgd (with momentum) or adamw."),
    lr: float = typer.Option(1e-3, help="Peak learning rate."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    weight_decay: float = typer.Option(0.0, help="Weight decay."),
    warmup: int = typer.Option(0, help="Linear warmup steps."),
    schedule: str = typer.Option("cosine", help="Decay after warmup: constant, cosine or linear."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the global gradient norm to this value."),
    checkpoints: Optional[str] = typer.Option(None, help="Steps to checkpoint, e.g. 0,10,100,300 (the last step always is)."),
    log_checkpoints: Optional[int] = typer.Option(None, help="Checkpoint N log-spaced steps plus step 0."),
    eval_every: int = typer.Option(100, help="Evaluate train and test every N steps."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    task_opt: list[str] = typer.Option([], "--task-opt", help="Task option key=value (repeatable)."),
    model_opt: list[str] = typer.Option([], "--model-opt", help="Model option key=value (repeatable), e.g. widths=64,64."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its latest checkpoint."),
    quiet: bool = typer.Option(False, help="Plain log lines instead of a progress bar."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """Train a model deterministically into a run directory."""
    from lmctk.train import TrainConfig, fit, log_spaced_steps, parse_steps

    if checkpoints and log_checkpoints:
        raise ConfigError("--checkpoints and --log-checkpoints: give one of them, not both")
    ckpt_steps = parse_steps(checkpoints) if checkpoints else (log_spaced_steps(log_checkpoints, steps) if log_checkpoints else [])
    config = TrainConfig(
        task=task, task_options=parse_options(task_opt, "--task-opt"), model=model,
        model_options=parse_options(model_opt, "--model-opt"), init_from=init_from, seed=seed, steps=steps,
        batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
        weight_decay=weight_decay, warmup=warmup, schedule=schedule, grad_clip=grad_clip,
        checkpoints=ckpt_steps, eval_every=eval_every, device=device,
    )
    if json_out and json_out.exists() and not overwrite:
        from lmctk.errors import OutputExistsError

        raise OutputExistsError(json_out)
    if quiet:
        def progress(step: int, total: int, record: dict | None) -> None:
            if record:
                test = record["test"]
                console.print(f"step {step}/{total}  test loss {test['loss']:.4f}  test acc {test['accuracy']:.4f}",
                              highlight=False)

        result = fit(config, out, overwrite=overwrite, resume=resume, progress=progress)
    else:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[status]}"), console=console, transient=True) as bar:
            job = bar.add_task("train", total=steps, status="")

            def progress(step: int, total: int, record: dict | None) -> None:
                status = f"test acc {record['test']['accuracy']:.3f}" if record else None
                bar.update(job, completed=step, **({"status": status} if status else {}))

            result = fit(config, out, overwrite=overwrite, resume=resume, progress=progress)
    console.print(result)
    if json_out:
        write_json(json_out, result.to_dict(), overwrite)


@app.command()
def inspect(
    checkpoint: Path = typer.Argument(..., help="A .safetensors/.pt file, a Hugging Face model dir or a run dir."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the inspection as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
) -> None:
    """Show tensors grouped by layer (shapes, dtypes, parameters, bytes) from headers only."""
    from lmctk.io import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    console.print(info)
    if json_out:
        write_json(json_out, info.to_dict(), overwrite)
