"""Rendering a ConvergeResult: rich tables and curves for the terminal, PNG plots for people.

Nothing here computes new numbers; everything comes from the result `lmctk.dynamics.converge.analysis` returns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from lmctk.dynamics import fingerprints
from lmctk.dynamics.converge.analysis import ConvergeResult, finite_mean
from lmctk.render import heatmap_plot, line_plot, terminal_curve


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


def _table(title: str, columns: list[str], left: tuple[str, ...] = ()) -> Table:
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    return t


def _step_table(result: ConvergeResult) -> Table:
    t = _table("per step on the test split (KL: expected per-token KL over ordered seed pairs, nats; "
               "± SE over contexts; loss std: sample std (ddof=1) over seeds; similarities: mean over layers)",
               ["step", "KL", "± SE", "loss mean", "loss std", "loss CV", "Gram cos", "aligned cos", "CKA",
                "raw cos (basis-dep.)", "phase"], ("phase",))
    for s in result.per_step:
        sim = [_f(finite_mean(s.similarity[k]), ".3f") for k in ("gram", "aligned", "cka", "raw")]
        t.add_row(str(s.step), _f(s.kl, ".4g"), _f(s.kl_se, ".2g"), _f(s.loss["mean"], ".3f"),
                  _f(s.loss["std"], ".3g"), _f(s.loss["cv"], ".3f"), *sim, phase_of(result, s.step))
    return t


def _strata_tables(result: ConvergeResult) -> list[Table]:
    cols = _pick(len(result.steps))
    tables = []
    for kind in result.per_step[0].strata:
        st = _table(f"KL by {kind} stratum (count = scored tokens)",
                    [kind, "count", *[f"step {result.steps[c]}" for c in cols]], (kind,))
        for r, row in enumerate(result.per_step[0].strata[kind]):
            st.add_row(row["stratum"], str(row["count"]),
                       *[_f(result.per_step[c].strata[kind][r]["mean"]) for c in cols])
        tables.append(st)
    return tables


def _layer_table(result: ConvergeResult) -> Table:
    last = result.per_step[-1]
    kinds = list(fingerprints.SIMILARITIES)
    lt = _table(f"layers at step {last.step} (mean over seed pairs)",
                ["layer", *[fingerprints.LABELS[k] for k in kinds]], ("layer",))
    for i, name in enumerate(result.layers):
        lt.add_row(name, *[_f(last.similarity[k][i]) for k in kinds])
    return lt


def _phase_tables(result: ConvergeResult) -> list[Table]:
    ph = result.phases
    pt = _table(f"phases of the KL curve: {ph.verdict} (fit R² {_f(ph.r2, '.3f')}, "
                f"confidence in this number of segments {_f(ph.model_confidence, '.2f')})",
                ["phase", "from step", "to step", "KL slope / decade"], ("phase",))
    for p in ph.phases:
        pt.add_row(p["name"], str(p["start"]), str(p["end"]), _f(p["slope"]))
    for name in ph.missing:
        pt.add_row(name, "—", "—", "not seen")
    if not ph.boundaries:
        return [pt]
    bt = _table("phase boundaries", ["boundary", "step", "interval (steps)", "confidence"], ("boundary",))
    for b in ph.boundaries:
        bt.add_row(f"{b.before} → {b.after}", str(b.step), f"{b.low}–{b.high}", _f(b.confidence, ".2f"))
    return [pt, bt]


def _regime_table(result: ConvergeResult) -> Table:
    rg = result.regimes
    rt = _table(f"seed regimes from per-seed {fingerprints.LABELS[result.regimes_from]} (levels "
                f"{rg.levels[0]:.3f} / {rg.levels[1]:.3f}; crossings interpolated in log step)",
                ["seed", "transition from step", "stable from step", f"regime at step {result.steps[-1]}"])
    for i, c in enumerate(rg.crossings):
        rt.add_row(str(i), _f(c["transition"], ".0f"), _f(c["stable"], ".0f"), rg.labels[i][-1])
    rt.add_row("spread", _f(rg.spread["transition"], ".0f"), _f(rg.spread["stable"], ".0f"), "", style="bold")
    rt.add_row("± resolution (checkpoint spacing)", _f(rg.resolution["transition"], ".0f"),
               _f(rg.resolution["stable"], ".0f"), "")
    return rt


def _diversity_table(result: ConvergeResult) -> Table:
    dt = _table(f"ensemble diversity at step {result.steps[-1]} (mean over seed subsets)",
                ["seeds", "JSD to mixture", "added by last seed", "ensemble loss"])
    for row in result.diversity:
        dt.add_row(str(row["seeds"]), _f(row["jsd"]), _f(row["added"]), _f(row.get("ensemble_loss"), ".4f"))
    return dt


def render(result: ConvergeResult) -> Group:
    """Rich renderables for a ConvergeResult: per-step table, curve, strata, layers, phases, regimes."""
    parts: list[Any] = [Text(f"seed convergence of {len(result.runs)} runs over {len(result.steps)} common steps",
                             style="bold")]
    for run, steps in result.missing_steps.items():
        parts.append(Text(f"  {run} lacks steps {', '.join(map(str, steps))} (not analysed)", style="yellow"))
    parts.append(_step_table(result))
    if len(result.steps) >= 2:
        xs = [math.log10(s + 1) for s in result.steps]
        parts.append(terminal_curve(xs, {"KL": result.series("kl")}, title="expected KL over training",
                                    xlabel="log10(step + 1)", height=8))
    parts += _strata_tables(result)
    if result.layers:
        parts.append(_layer_table(result))
    parts += _phase_tables(result)
    if result.regimes is not None:
        parts.append(_regime_table(result))
    if result.diversity:
        parts.append(_diversity_table(result))
    parts += [Text(f"note: {note}", style="dim") for note in result.notes]
    return Group(*parts)


def plot(result: ConvergeResult, directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Write `convergence.png` (KL over steps, phases shaded) and, with layers,
    `fingerprint.png` (per-layer similarities over steps as heatmaps) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spans = [(p["start"], p["end"], p["name"]) for p in result.phases.phases]
    kl, se = result.series("kl"), result.series("kl_se")
    panels = {"expected KL (nats/token)": {"KL ± SE": kl, "phase fit": result.phases.fitted}}
    band = {"KL ± SE": ([a - b for a, b in zip(kl, se)], [a + b for a, b in zip(kl, se)])}
    title = (f"{len(result.runs)} seeds: expected KL {kl[0]:.3g} at step {result.steps[0]}, "
             f"{kl[-1]:.3g} at step {result.steps[-1]}")
    written = [line_plot(directory / "convergence.png", result.steps, panels, xlabel="step", xscale="symlog",
                         spans=spans, bands=band, fits=["phase fit"], title=title, overwrite=overwrite)]
    if result.layers:
        maps = {fingerprints.LABELS[k]: (result.layers, [list(c) for c in zip(*result.similarity(k))])  # [layer][step]
                for k in ("gram", "aligned", "cka", "raw")}
        written.append(heatmap_plot(directory / "fingerprint.png", result.steps, maps, xlabel="step",
                                    title=f"agreement of {len(result.runs)} seeds per layer (one colour scale)",
                                    overwrite=overwrite))
    return written
