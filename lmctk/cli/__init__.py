"""The `lmctk` command line: one Typer app; each module adds the commands of one job.

Commands parse, call the Python API and render; no computation lives here.
"""

from lmctk.cli import align, barrier, butterfly, converge, inspect, soup, train  # noqa: F401  (registers commands)
from lmctk.cli.app import app, main

__all__ = ["app", "main"]
