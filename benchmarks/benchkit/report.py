"""What a benchmark run reports: figures against targets, correctness checks, details."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

PASS, MISS, INFO = "PASS", "MISS", "info"


@dataclass
class Figure:
    """One measured figure and, when the issue sets one, its target."""

    scenario: str
    name: str
    value: float | None
    unit: str
    target: str = ""
    verdict: str = INFO  # PASS, MISS, or info (no target)

    def shown(self) -> str:
        """The value as printed."""
        if self.value is None:
            return "n/a"
        if self.unit in ("x", "calls/job"):
            return f"{self.value:.2f}{'x' if self.unit == 'x' else ''}"
        if self.unit == "s":
            return f"{self.value:.2f} s"
        if self.unit == "MB":
            return f"{self.value:,.0f} MB"
        return f"{self.value:,.0f} {self.unit}".rstrip()


@dataclass
class Check:
    """A correctness check: any failure makes the benchmark exit non-zero."""

    scenario: str
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    """Everything one invocation measured."""

    mode: str
    commit: str
    date: str
    machine: str
    figures: list[Figure] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def at_least(
        self, scenario: str, name: str, value: float | None, unit: str, target: float, label: str
    ) -> None:
        """Add a figure whose target is ``value >= target``."""
        verdict = INFO if value is None else (PASS if value >= target else MISS)
        self.figures.append(Figure(scenario, name, value, unit, label, verdict))

    def at_most(
        self, scenario: str, name: str, value: float | None, unit: str, target: float, label: str
    ) -> None:
        """Add a figure whose target is ``value <= target``."""
        verdict = INFO if value is None else (PASS if value <= target else MISS)
        self.figures.append(Figure(scenario, name, value, unit, label, verdict))

    def info(self, scenario: str, name: str, value: float | None, unit: str) -> None:
        """Add a figure without a target."""
        self.figures.append(Figure(scenario, name, value, unit))

    def check(self, scenario: str, name: str, problems: Sequence[str]) -> None:
        """Add a correctness check that passes when ``problems`` is empty."""
        self.checks.append(Check(scenario, name, not problems, "; ".join(problems)))

    @property
    def correct(self) -> bool:
        """Whether every correctness check passed."""
        return all(c.ok for c in self.checks)

    @property
    def missed(self) -> list[Figure]:
        """Figures that missed their target."""
        return [f for f in self.figures if f.verdict == MISS]

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(asdict(self), indent=2, default=str)

    def print_text(self, out: TextIO) -> None:
        """Print the figures table, the checks and the notes."""
        print(f"apione-dlt benchmark ({self.mode}), {self.commit}, {self.date}", file=out)
        print(f"machine: {self.machine}", file=out)
        rows = [("scenario", "figure", "value", "target", "")]
        rows += [(f.scenario, f.name, f.shown(), f.target or "-", f.verdict) for f in self.figures]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for i, r in enumerate(rows):
            cells = [r[j].ljust(widths[j]) if j < 2 else r[j].rjust(widths[j]) for j in range(4)]
            print("  ".join([*cells, r[4]]).rstrip(), file=out)
            if i == 0:
                print("  ".join("-" * w for w in widths), file=out)
        print(file=out)
        for c in self.checks:
            print(
                f"check {'ok  ' if c.ok else 'FAIL'} {c.scenario}: {c.name}"
                f"{' (' + c.detail + ')' if c.detail else ''}",
                file=out,
            )
        for n in self.notes:
            print(f"note: {n}", file=out)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))
