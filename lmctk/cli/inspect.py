"""`lmctk inspect`: tensors of a checkpoint grouped by layer, from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmctk.cli.app import app, console, write_json


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
