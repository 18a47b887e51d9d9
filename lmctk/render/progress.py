"""Progress of long jobs, one mechanism for every command: a rich bar on a terminal, a plain log line at
most every `every` seconds elsewhere (step, elapsed, ETA, last metric, so a batch log shows life), and
nothing when quiet. Jobs report through callbacks; the CLI turns them into `Progress.update` calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Bar


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `12s`: elapsed and remaining times in log lines."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def stages(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None]:
    """A function that reports one more of `total` stages done to a job's `progress(done, total)`, if any."""
    done = 0

    def stage() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return stage


class Progress:
    """`with Progress("train", total, console=c) as p: p.update(done, metric="test acc 0.91")`.

    On a terminal a transient rich bar; otherwise one line `label done/total (pct) elapsed … ETA … metric`
    at most every `every` seconds (the first after `every` seconds, so short jobs print nothing);
    `quiet` silences both and `log` lines. `unit="bytes"` counts bytes. `clock` is for tests.
    """

    def __init__(self, label: str, total: int | None = None, *, console: Console, quiet: bool = False,
                 unit: str = "steps", every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.console, self.quiet, self.unit = label, total, console, quiet, unit
        self.every, self.clock = every, clock
        self.done, self.metric = 0, ""
        self._bar: Bar | None = None
        self._start = self._last = clock()

    def __enter__(self) -> Progress:
        if not self.quiet and self.console.is_terminal:
            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metric]}"),
                            console=self.console, transient=True)
            self._bar.__enter__()
            self._job = self._bar.add_task(escape(self.label), total=self.total, metric="", count="")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, exc, tb)
            self._bar = None

    def update(self, done: int, total: int | None = None, metric: str | None = None) -> None:
        """Record `done` of `total` units (and the latest metric); draw or log if due."""
        self.done, self.total = done, total if total is not None else self.total
        self.metric = metric if metric is not None else self.metric
        if self._bar is not None:
            self._bar.update(self._job, completed=done, total=self.total, metric=self.metric, count=self.count())
        elif not self.quiet and self.clock() - self._last >= self.every:
            self._last = self.clock()
            self.console.print(self.line(), highlight=False, soft_wrap=True)

    def stage(self, label: str, unit: str = "steps") -> None:
        """Switch to the job part `label` counted in `unit` (no-op if it is the current one): count and clock restart."""
        if label == self.label:
            return
        self.label, self.unit, self.done, self.total, self.metric = label, unit, 0, None, ""
        self._start = self._last = self.clock()
        if self._bar is not None:
            self._bar.reset(self._job, total=None, description=escape(label), metric="", count="")

    def count(self) -> str:
        """`120/300` (or `1.5 MiB/3.0 MiB`, or `120` with no total)."""
        show = _bytes if self.unit == "bytes" else str
        return f"{show(self.done)}/{show(self.total)}" if self.total else show(self.done)

    def log(self, text: str) -> None:
        """A line printed above the bar (or plainly), unless quiet: per-trial results, stages."""
        if not self.quiet:
            self.console.print(text, highlight=False)

    def line(self) -> str:
        """The plain progress line: `train 120/300 (40%) elapsed 12s ETA 18s test acc 0.91`."""
        elapsed = self.clock() - self._start
        parts = [self.label, self.count()]
        if self.total:
            parts.append(f"({100 * self.done / self.total:.0f}%)")
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and self.done:
            parts.append(f"ETA {duration(elapsed * (self.total - self.done) / self.done)}")
        if self.metric:
            parts.append(self.metric)
        return "  ".join(parts)
