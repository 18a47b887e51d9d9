"""Rendering: progress lines in logs (fake clock), and output that fits 80 columns."""

from __future__ import annotations

import io

from rich.console import Console

from lmctk.render.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _log_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=80, force_terminal=False), buffer


def test_progress_in_a_log_prints_a_line_at_most_every_ten_seconds():
    console, buffer = _log_console()
    clock = Clock()
    with Progress("train step", 300, console=console, clock=clock) as bar:
        for step in range(1, 301):
            clock.now = step * 0.1  # 30 s in all: lines at 10, 20 and 30 s
            bar.update(step, metric="test acc 0.91" if step >= 100 else None)
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "train step  100/300  (33%)  elapsed 10s  ETA 20s  test acc 0.91",
        "train step  200/300  (67%)  elapsed 20s  ETA 10s  test acc 0.91",
        "train step  300/300  (100%)  elapsed 30s  ETA 0s  test acc 0.91",
    ]


def test_progress_of_a_short_job_prints_nothing_and_quiet_prints_nothing():
    console, buffer = _log_console()
    clock = Clock()
    with Progress("soup", 10, console=console, clock=clock) as bar:
        bar.update(10)
    with Progress("soup", 10, console=console, clock=clock, quiet=True) as bar:
        clock.now = 100.0
        bar.update(5)
        bar.log("a per-trial line")
    assert buffer.getvalue() == ""


def test_progress_counts_bytes_and_minutes():
    console, buffer = _log_console()
    clock = Clock()
    with Progress("soup", unit="bytes", console=console, clock=clock) as bar:
        clock.now = 75.0
        bar.update(3 * 2**20, 6 * 2**20, "model.layers.0.weight")
    assert buffer.getvalue().strip() == "soup  3.0 MiB/6.0 MiB  (50%)  elapsed 1m15s  ETA 1m15s  model.layers.0.weight"
