"""Butterfly report: from finished trials to findings: the final-barrier table over t × σ, σ*(t) and phase labels.

σ*(t) is the scale at which the (replicate-mean) final barrier first reaches `threshold` × the
independent-seed barrier, interpolated linearly in log10 σ between the two scales around the
crossing. Phase of t: chaotic if the smallest non-zero σ already reaches it, stable if the largest
does not, transition otherwise (σ* inside the swept range).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Perturbation kinds without a scale (on/off): their column is what changed, not "σ=1".
ON_OFF = {"batch": "one changed batch", "data_order": "another data order", "dropout": "another dropout stream"}


def _column(kind: str, scale: float) -> str:
    if kind in ON_OFF:
        return "control" if scale == 0 else ON_OFF[kind]
    return f"σ={scale:g}"


def final_value(final: dict[str, Any], metric: str, definition: str, path: str) -> float | None:
    """The barrier of one trial's final measurement that the analysis is about (None if not measured)."""
    source = final.get("aligned") if path == "aligned" else final
    if not source:
        return None
    value = source["barrier"][metric][definition]
    return math.nan if value is None else float(value)  # strict JSON stores a NaN barrier as null


def sigma_star(scales: list[float], values: list[float], target: float) -> tuple[float | None, str]:
    """(σ*, how): the first crossing of `target` by values(σ) over ascending non-zero scales, in log10 σ.

    how is "fit" (interpolated), "below" (the smallest σ already reaches it; σ* <= scales[0]) or
    "above" (no σ reaches it; σ* > scales[-1]), or "undefined" when a barrier is NaN or ±Inf.
    """
    if not all(math.isfinite(v) for v in values):
        return None, "undefined"
    for i, (s, v) in enumerate(zip(scales, values)):
        if v >= target:
            if i == 0:
                return None, "below"
            s0, v0 = scales[i - 1], values[i - 1]
            frac = (target - v0) / (v - v0)  # v0 < target <= v: the loop did not stop at i - 1
            return 10 ** (math.log10(s0) + frac * (math.log10(s) - math.log10(s0))), "fit"
    return None, "above"


def phase_label(how: str) -> str:
    return {"below": "chaotic", "fit": "transition", "above": "stable", "undefined": "undefined"}[how]


@dataclass
class ButterflyReport:
    """The merged result of a butterfly run; renders as tables, serialises with `to_dict`."""

    name: str
    trials_total: int
    trials_done: int
    analysis: dict[str, Any]
    reference: dict[str, Any] | None  # independent-seed barrier: mean and values
    table: dict[str, dict[int, dict[float, dict[str, float]]]]  # kind -> t -> σ -> {mean, std, n}
    phases: dict[str, dict[int, dict[str, Any]]]  # kind -> t -> {label, sigma_star, how}
    curves: dict[str, dict[int, dict[float, dict[str, list[float]]]]]  # kind -> t -> σ -> {step, l2, barrier}
    determinism: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def keyed(d):
            return {str(k): keyed(v) if isinstance(v, dict) and k not in ("analysis",) else v for k, v in d.items()}

        return {"name": self.name, "trials": {"total": self.trials_total, "done": self.trials_done},
                "analysis": self.analysis, "reference": self.reference, "final_barrier": keyed(self.table),
                "phases": keyed(self.phases), "curves": keyed(self.curves), "determinism": self.determinism,
                **self.extras}

    def _kind_table(self, kind: str, what: str, top: float):
        """The final-barrier table of one perturbation kind: t × σ cells shaded by value, phase and σ*."""
        from rich.table import Table
        from rich.text import Text

        by_t = self.table[kind]
        scales = sorted({s for row in by_t.values() for s in row})
        phase = (["phase"] if kind in ON_OFF else ["phase", "σ*"]) if self.phases.get(kind) else []
        t = Table(title=f"{kind}: final {what}")
        for col in ["t", *[_column(kind, s) for s in scales], *phase]:
            t.add_column(col, justify="left" if col == "phase" else "right")
        for step in sorted(by_t):
            cells: list[Any] = [str(step)]
            for s in scales:
                c = by_t[step].get(s)
                shade = 0 if c is None else int(255 * (1 - min(max(c["mean"] / top, 0.0), 1.0)))
                cells.append(Text("—") if c is None else
                             Text(f"{c['mean']:.4f}", style=f"black on rgb(255,{shade},{shade})"))
            if self.phases.get(kind):
                p = self.phases[kind].get(step)
                cells += [""] * len(phase) if p is None else [p["label"], _sigma_star_text(p)][:len(phase)]
            t.add_row(*cells)
        return t

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        a = self.analysis
        what = f"{a['path']} {a['metric']} barrier ({a['definition'].replace('_', '-')})"
        parts: list[Any] = [Text(f"{self.name}: {self.trials_done}/{self.trials_total} trials done", style="bold")]
        ref = self.reference["mean"] if self.reference else None
        top = max([c["mean"] for k in self.table.values() for t in k.values() for c in t.values()] + [ref or 0.0, 1e-12])
        parts += [self._kind_table(kind, what, top) for kind in self.table]
        parts.append(Text("rows: perturbation step t; columns: σ (or control vs perturbed); mean over replicates",
                          style="dim"))
        if ref is not None:
            parts.append(Text(f"independent-seed {what}: {ref:.4f} (n={len(self.reference['values'])}); "
                              f"σ* = σ where the barrier reaches {a['threshold']:g} × that"))
        else:
            parts.append(Text("no independent-seed pair finished: σ* and phases need sweep.independent >= 1",
                              style="yellow"))
        d = self.determinism
        status = d.get("status", "unknown")
        colour = "green" if status == "ok" else "red" if status == "failed" else "yellow"
        parts.append(Text(f"determinism: {status} — {d.get('message', '')}", style=colour))
        return Group(*parts)


def _sigma_star_text(p: dict[str, Any]) -> str:
    if p["range"][0] == p["range"][1]:
        return "—"
    if p["how"] == "fit":
        return f"{p['sigma_star']:.3g}"
    return f"≤ {p['range'][0]:g}" if p["how"] == "below" else f"> {p['range'][1]:g}"


def summarize(name: str, recipe: dict[str, Any], trial_ids: list[str], records: Iterable[dict[str, Any]]) -> ButterflyReport:
    """Merge the journal records of a run (any number of ranks, resumed or not) into a ButterflyReport."""
    analysis = recipe["analysis"]
    metric, definition, path = analysis["metric"], analysis["definition"], analysis["path"]
    done: dict[str, dict[str, Any]] = {}
    preflight = None
    for r in records:
        if r.get("type") == "trial":
            done[r["trial"]["id"]] = r  # a re-run trial (resume) replaces the earlier record
        elif r.get("type") == "preflight":
            preflight = r
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    ref_values = []
    zero_checks = []
    for r in done.values():
        tr, res = r["trial"], r["result"]
        value = final_value(res["final"], metric, definition, path)
        if tr["kind"] == "independent":
            if value is not None:
                ref_values.append(value)
            continue
        if tr["scale"] == 0.0:
            zero_checks.append(bool(res["final"]["bitwise_equal"]))
        groups.setdefault((tr["kind"], tr["t"], tr["scale"]), []).append({"value": value, "res": res})
    table: dict[str, dict[int, dict[float, dict[str, float]]]] = {}
    curves: dict[str, dict[int, dict[float, dict[str, list[float]]]]] = {}
    for (kind, t, scale), items in sorted(groups.items()):
        values = [i["value"] for i in items if i["value"] is not None]
        if not values:
            continue
        table.setdefault(kind, {}).setdefault(t, {})[scale] = {
            "mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}
        series = [i["res"]["measurements"] for i in items]
        steps = [m["step"] for m in series[0]]
        curves.setdefault(kind, {}).setdefault(t, {})[scale] = {
            "step": steps,
            "l2": [statistics.fmean(s[j]["l2"] for s in series) for j in range(len(steps))],
            "barrier": [statistics.fmean(s[j]["barrier"][metric][definition] for s in series) for j in range(len(steps))],
        }
    reference = {"mean": statistics.fmean(ref_values), "values": ref_values} if ref_values else None
    phases = _phases(table, reference, analysis["threshold"])
    determinism = _determinism(preflight, zero_checks)
    return ButterflyReport(name, len(trial_ids), sum(1 for i in trial_ids if i in done), dict(analysis),
                           reference, table, phases, curves, determinism)


def _phases(table: dict[str, dict[int, dict[float, dict[str, float]]]], reference: dict[str, Any] | None,
            threshold: float) -> dict[str, dict[int, dict[str, Any]]]:
    """Per kind and t: σ* where the final barrier reaches `threshold` × the independent-seed barrier, and
    the phase it implies (none without a positive reference)."""
    phases: dict[str, dict[int, dict[str, Any]]] = {}
    if not reference or reference["mean"] <= 0:
        return phases
    target = threshold * reference["mean"]
    for kind, by_t in table.items():
        for t, row in by_t.items():
            scales = sorted(s for s in row if s > 0)
            if not scales:
                continue
            star, how = sigma_star(scales, [row[s]["mean"] for s in scales], target)
            phases.setdefault(kind, {})[t] = {"label": phase_label(how), "sigma_star": star, "how": how,
                                              "range": [scales[0], scales[-1]], "target": target}
    return phases


def _determinism(preflight: dict[str, Any] | None, zero_checks: list[bool]) -> dict[str, Any]:
    out: dict[str, Any] = {"preflight": preflight, "zero_controls": len(zero_checks),
                           "zero_controls_identical": sum(zero_checks)}
    msgs = []
    if preflight is None:
        msgs.append("no preflight recorded")
    else:
        msgs.append(f"preflight: zero-perturbation twins bitwise identical for {preflight['steps']} steps")
    if zero_checks:
        msgs.append(f"{sum(zero_checks)}/{len(zero_checks)} σ=0 twin pairs bitwise identical at the end")
    failed = zero_checks and not all(zero_checks)
    out["status"] = "failed" if failed else "ok" if preflight is not None else "unchecked"
    out["message"] = "; ".join(msgs)
    return out


def write_plots(report: ButterflyReport, out_dir: Path) -> list[Path]:
    """`butterfly.png` (the summary heatmap) and one PNG per (kind, t): L2 and the analysed barrier between
    the twins over training, one line per σ."""
    from lmctk.render import line_plot

    paths = [p for p in [summary_plot(report, out_dir / "butterfly.png")] if p is not None]
    a = report.analysis
    what = f"{a['path']} {a['metric']} barrier ({a['definition'].replace('_', '-')})"
    for kind, by_t in report.curves.items():
        for t, by_scale in sorted(by_t.items()):
            first = next(iter(by_scale.values()))
            if len(first["step"]) < 2:
                continue
            lines = {_column(kind, s): c for s, c in sorted(by_scale.items())}
            finals = ", ".join(f"{label} {c['barrier'][-1]:.3g}" for label, c in lines.items())
            panels = {"L2 ‖θA−θB‖": {label: c["l2"] for label, c in lines.items()},
                      what: {label: c["barrier"] for label, c in lines.items()}}
            path = out_dir / f"divergence-{kind}-t{t}.png"
            paths.append(line_plot(path, first["step"], panels, xlabel="step", overwrite=True,
                                   title=f"{report.name}: {kind} at t={t}; final barrier {finals}"))
    return paths


def summary_plot(report: ButterflyReport, path: Path) -> Path | None:
    """The final barrier over t × σ, one panel per kind on one colour scale, σ*(t) drawn on it."""
    from lmctk.render import heatmap_plot

    scales = sorted({s for by_t in report.table.values() for row in by_t.values() for s in row})
    if not scales:
        return None
    panels, overlays = {}, {}
    for kind, by_t in report.table.items():
        steps = sorted(by_t)
        panels[kind] = ([str(t) for t in steps],
                        [[by_t[t][s]["mean"] if s in by_t[t] else math.nan for s in scales] for t in steps])
        stars = [(_column_at(scales, report.phases.get(kind, {}).get(t, {}).get("sigma_star")), i)
                 for i, t in enumerate(steps)]
        stars = [(c, i) for c, i in stars if c is not None]
        if stars:
            overlays[kind] = ("σ*(t)", [c for c, _ in stars], [i for _, i in stars])
    a, ref = report.analysis, report.reference
    title = (f"{report.name}: final {a['path']} {a['metric']} barrier"
             + (f"; independent seeds {ref['mean']:.3g}" if ref else ""))
    return heatmap_plot(path, scales, panels, xlabel="σ", ylabel="t", title=title, overwrite=True,
                        overlays=overlays)


def _column_at(scales: list[float], sigma: float | None) -> float | None:
    """σ as a fractional column index among `scales`, interpolated in log10 σ (None if not inside)."""
    if sigma is None:
        return None
    for i in range(1, len(scales)):
        lo, hi = scales[i - 1], scales[i]
        if lo > 0 and lo <= sigma <= hi:
            return i - 1 + (math.log10(sigma) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return None
