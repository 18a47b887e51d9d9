"""Rendering a ConvergeResult: rich tables and curves for the terminal, PNG plots for people.

Nothing here computes new numbers; everything comes from the result `lmctk.dynamics.converge.analysis` returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmctk.dynamics.converge.analysis import ConvergeResult, finite_mean


def _pick(n: int, most: int = 5) -> list[int]:
    """Up to `most` indices spread over range(n), always including the last."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _f(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def phase_of(result: ConvergeResult, step: int) -> str:
    """The phase a step falls in (the later phase at a boundary)."""
    name = "—"
    for p in result.phases.phases:
        if p["start"] <= step:
            name = p["name"]
    return name


def render(result: ConvergeResult):
    """Rich renderables for a ConvergeResult: per-step table, curve, strata, layers, phases, regimes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from lmctk.render import terminal_curve

    parts: list[Any] = []
    k = len(result.runs)
    head = Text(f"seed convergence of {k} runs over {len(result.steps)} common steps", style="bold")
    parts.append(head)
    for run, steps in result.missing_steps.items():
        parts.append(Text(f"  {run} lacks steps {', '.join(map(str, steps))} (not analysed)", style="yellow"))
    t = Table(title="per step on the test split (KL: expected per-token KL over ordered seed pairs, nats; "
                    "± SE over contexts)")
    for col in ("step", "KL", "± SE", "loss mean", "loss CV (ddof=1)", "fingerprint", "centred", "CKA", "phase"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for s in result.per_step:
        t.add_row(str(s.step), _f(s.kl, ".4g"), _f(s.kl_se, ".2g"), _f(s.loss["mean"], ".3f"), _f(s.loss["cv"], ".3f"),
                  _f(finite_mean(s.fingerprint_raw), ".3f"), _f(finite_mean(s.fingerprint_centred), ".3f"),
                  _f(finite_mean(s.cka), ".3f"), phase_of(result, s.step))
    parts.append(t)
    if len(result.steps) >= 2:
        xs = [math.log10(s + 1) for s in result.steps]
        parts.append(terminal_curve(xs, {"KL": result.series("kl")}, title="expected KL over training",
                                    xlabel="log10(step + 1)", height=8))
    cols = _pick(len(result.steps))
    for kind in result.per_step[0].strata:
        st = Table(title=f"KL by {kind} stratum (count = scored tokens)")
        st.add_column(kind)
        st.add_column("count", justify="right")
        for c in cols:
            st.add_column(f"step {result.steps[c]}", justify="right")
        for r, row in enumerate(result.per_step[0].strata[kind]):
            st.add_row(row["stratum"], str(row["count"]),
                       *[_f(result.per_step[c].strata[kind][r]["mean"]) for c in cols])
        parts.append(st)
    if result.layers:
        last = result.per_step[-1]
        lt = Table(title=f"layers at step {last.step} (mean over seed pairs)")
        for col in ("layer", "fingerprint", "centred", "CKA (debiased)"):
            lt.add_column(col, justify="right")
        for i, name in enumerate(result.layers):
            lt.add_row(name, _f(last.fingerprint_raw[i]), _f(last.fingerprint_centred[i]), _f(last.cka[i]))
        parts.append(lt)
    ph = result.phases
    pt = Table(title=f"phases of the KL curve (fit R² {_f(ph.r2, '.3f')}, "
                     f"confidence in this set of phases {_f(ph.model_confidence, '.2f')})")
    for col in ("phase", "from step", "to step", "KL slope / decade"):
        pt.add_column(col, justify="left" if col == "phase" else "right")
    for p in ph.phases:
        pt.add_row(p["name"], str(p["start"]), str(p["end"]), _f(p["slope"]))
    for name in ph.missing:
        pt.add_row(name, "—", "—", "not seen")
    parts.append(pt)
    if ph.boundaries:
        bt = Table(title="phase boundaries")
        for col in ("boundary", "step", "confidence (±1 checkpoint)"):
            bt.add_column(col, justify="left" if col == "boundary" else "right")
        for b in ph.boundaries:
            bt.add_row(f"{b.before} → {b.after}", str(b.step), _f(b.confidence, ".2f"))
        parts.append(bt)
    if result.regimes is not None:
        rg = result.regimes
        source = "centred fingerprints" if result.regimes_from == "fingerprint" else "CKA"
        rt = Table(title=f"seed regimes from per-seed {source} (levels {rg.levels[0]:.3f} / {rg.levels[1]:.3f})")
        for col in ("seed", "transition from step", "stable from step", f"regime at step {result.steps[-1]}"):
            rt.add_column(col, justify="right")
        for i, c in enumerate(rg.crossings):
            rt.add_row(str(i), _f(c["transition"], ".0f"), _f(c["stable"], ".0f"), rg.labels[i][-1])
        rt.add_row("spread", _f(rg.spread["transition"], ".0f"), _f(rg.spread["stable"], ".0f"), "", style="bold")
        parts.append(rt)
    if result.diversity:
        dt = Table(title=f"ensemble diversity at step {result.steps[-1]} (mean over seed subsets)")
        for col in ("seeds", "JSD to mixture", "added by last seed", "ensemble loss"):
            dt.add_column(col, justify="right")
        for row in result.diversity:
            dt.add_row(str(row["seeds"]), _f(row["jsd"]), _f(row["added"]), _f(row.get("ensemble_loss"), ".4f"))
        parts.append(dt)
    for note in result.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    return Group(*parts)


def plot(result: ConvergeResult, directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Write `convergence.png` (KL over steps, phases shaded) and, with layers,
    `fingerprint.png` (per-layer fingerprint over steps as heatmaps) into `directory`."""
    from lmctk.render import heatmap_plot, line_plot

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spans = [(p["start"], p["end"], p["name"]) for p in result.phases.phases]
    kl, se = result.series("kl"), result.series("kl_se")
    panels = {"expected KL (nats/token)": {"KL ± SE": kl, "phase fit": result.phases.fitted}}
    band = {"KL ± SE": ([a - b for a, b in zip(kl, se)], [a + b for a, b in zip(kl, se)])}
    written = [line_plot(directory / "convergence.png", result.steps, panels, xlabel="step", xscale="symlog",
                         spans=spans, bands=band, title="seed convergence", overwrite=overwrite)]
    if result.layers:
        def rows(name: str) -> tuple[list[str], list[list[float]]]:
            return result.layers, [list(c) for c in zip(*result.series(name))]  # [layer][step]

        maps = {"fingerprint cosine": rows("fingerprint_raw"),
                "fingerprint cosine, centred": rows("fingerprint_centred"),
                "debiased linear CKA": rows("cka")}
        written.append(heatmap_plot(directory / "fingerprint.png", result.steps, maps, xlabel="step",
                                    title="seed agreement per layer", overwrite=overwrite))
    return written
