"""Figures: rows of a report, printed as they come and as a Markdown table."""

from __future__ import annotations

from dataclasses import dataclass, field

# -- results -----------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    case: str
    figures: dict[str, float | int | str]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    label: str = ""

    def add(self, scenario: str, case: str, **figures: float | int | str) -> None:
        case += self.label
        row = Row(scenario, case, figures)
        self.rows.append(row)
        print(f"  {scenario:<11} {case:<28} {_figures(figures)}", flush=True)

    def table(self) -> str:
        lines = ["| scenario | case | figures |", "|---|---|---|"]
        lines += [f"| {r.scenario} | {r.case} | {_figures(r.figures)} |" for r in self.rows]
        return "\n".join(lines)


def _figures(figures: dict[str, float | int | str]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items())


def _fmt(value: float | int | str) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else value
