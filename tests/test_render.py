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


def test_progress_stage_switches_label_and_unit_and_restarts_the_clock():
    console, buffer = _log_console()
    clock = Clock()
    with Progress("soup", unit="bytes", console=console, clock=clock) as bar:
        clock.now = 20.0
        bar.stage("soup: greedy selection", unit="evaluations")
        clock.now = 31.0
        bar.update(2, 5)
        bar.stage("soup: greedy selection", unit="evaluations")  # the current stage: nothing restarts
        assert (bar.done, bar.total) == (2, 5)
    assert buffer.getvalue().strip() == "soup: greedy selection  2/5  (40%)  elapsed 11s  ETA 16s"


def test_stages_count_up_to_the_total_for_a_job_callback():
    from lmctk.render.progress import stages

    calls = []
    stage = stages(lambda done, total: calls.append((done, total)), 2)
    stage()
    stage()
    stages(None, 3)()  # no callback: nothing to call
    assert calls == [(1, 2), (2, 2)]


def _render(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def test_short_path_keeps_the_first_and_last_parts():
    from lmctk.render.text import short_path

    assert short_path("runs/ft3") == "runs/ft3"
    assert short_path("runs/sweeps/2024/a-long-experiment-name/ft3", 24) == "runs/…/ft3"
    assert len(short_path("x" * 60, 28)) == 28


def _butterfly_report():
    from lmctk.dynamics.butterfly.report import ButterflyReport

    scales = [0.0, 0.01, 0.1, 1.0, 3.0]
    cell = {"mean": 0.1234, "std": 0.0, "n": 2}
    table = {"gaussian": {t: {s: cell for s in scales} for t in (0, 10, 200)},
             "data_order": {t: {0.0: cell, 1.0: cell} for t in (0, 10, 200)}}
    phase = {"label": "transition", "sigma_star": 1.5, "how": "fit", "range": [0.01, 3.0], "target": 0.2}
    return ButterflyReport(
        name="butterfly-digits-mlp", trials_total=40, trials_done=40,
        analysis={"metric": "error", "definition": "mean_endpoint", "path": "raw", "threshold": 0.5},
        reference={"mean": 0.4, "values": [0.4, 0.4]}, table=table,
        phases={kind: {t: phase for t in (0, 10, 200)} for kind in table}, curves={},
        determinism={"status": "ok", "message": "preflight: zero-perturbation twins bitwise identical for 5 steps"})


def test_butterfly_report_fits_80_columns_and_names_on_off_columns():
    for width in (80, 160):
        lines = _render(_butterfly_report(), width)
        assert max(len(line) for line in lines) <= width
    text = "\n".join(_render(_butterfly_report(), 80))
    assert "another data order" in text and "control" in text and "σ=1 " not in text.split("data_order")[1]
    assert "raw error barrier" in text


def test_soup_plan_fits_80_columns_with_paths_shortened_from_the_middle(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lmctk.recipes import parse
    from lmctk.soup import SoupRecipe, soup_files

    deep = tmp_path / "runs" / "sweeps" / "2024" / "a-long-experiment-name"
    deep.mkdir(parents=True)
    paths = []
    for i in range(3):
        (deep / f"ft{i}").mkdir()
        save_file({"w": torch.zeros(4, 4)}, str(deep / f"ft{i}" / "model.safetensors"))
        paths.append(str(deep / f"ft{i}"))
    recipe = parse({"soup": {"ingredients": [{"path": p} for p in paths]}, "task": None}, SoupRecipe)
    result = soup_files(recipe, dry_run=True)
    for width in (80, 160):
        lines = _render(result, width)
        assert max(len(line) for line in lines) <= width
        assert any("/…/ft0 " in line for line in lines)  # one piece, not folded over lines
