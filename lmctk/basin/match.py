"""What an alignment returns: `MatchResult`, the permutations of B onto A with the objective trace and
where the time went (similarity matmuls, LAPs, the rest), rendered as tables or JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmctk.spec.core import Perms


@dataclass
class MatchResult:
    """Permutations that map B onto A, with the objective trace and where the time went."""

    perms: Perms
    method: str
    objective: list[float]  # Σ <A, π(B)> after each sweep (index 0: before any update)
    sweeps: int
    seconds: float
    lap_seconds: float = 0.0
    similarity_seconds: float = 0.0
    lap_backends: list[str] = field(default_factory=list)
    unpermuted: list[str] = field(default_factory=list)
    sweep_seconds: list[float] = field(default_factory=list)  # wall time of each sweep
    memory: dict[str, int] | None = None  # weight matching's memory plan (budget, planned peak, its parts)

    @property
    def other_seconds(self) -> float:
        """Time outside the similarity matmuls and the LAPs (objective, gathers, bookkeeping)."""
        return max(0.0, self.seconds - self.similarity_seconds - self.lap_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "objective": self.objective,
            "sweeps": self.sweeps,
            "seconds": self.seconds,
            "lap_seconds": self.lap_seconds,
            "similarity_seconds": self.similarity_seconds,
            "other_seconds": self.other_seconds,
            "sweep_seconds": self.sweep_seconds,
            "memory": self.memory,
            "lap_backends": sorted(set(self.lap_backends)),
            "unpermuted": self.unpermuted,
            "groups": {g: p.shape[-1] for g, p in self.perms.items()},
            "moved": {g: int((p != torch.arange(p.shape[-1], device=p.device)).sum()) for g, p in self.perms.items()},
        }

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        d = self.to_dict()
        t = Table(title=self.method.replace("_", " "))
        t.add_column("group")
        t.add_column("size", justify="right")
        t.add_column("moved", justify="right")
        for g, n in d["groups"].items():
            t.add_row(g, str(n), str(d["moved"][g]))
        sweeps = Table(title="objective Σ<A, π(B)> per sweep")
        for col in ("sweep", "objective", "gain", "s"):
            sweeps.add_column(col, justify="right")
        for i, value in enumerate(self.objective):
            gain = f"{value - self.objective[i - 1]:+.6g}" if i else ""
            took = f"{self.sweep_seconds[i - 1]:.2f}" if 0 < i <= len(self.sweep_seconds) else ""
            sweeps.add_row("start" if i == 0 else str(i), f"{value:.6g}", gain, took)
        split = Text(f"{self.sweeps} sweeps in {self.seconds:.2f} s: similarity {self.similarity_seconds:.2f} s, "
                     f"LAP {self.lap_seconds:.2f} s, other {self.other_seconds:.2f} s")
        return Group(t, sweeps, split)
