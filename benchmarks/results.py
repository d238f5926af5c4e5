"""The results format: per scenario, every run of each server, their medians and the ratios.

JSON layout (``schema`` 1)::

    {
      "schema": 1, "date": "...", "quick": false, "machine": {...}, "settings": {...},
      "scenarios": {
        "<name>": {
          "title": "...", "headline": "<metric>", "unit": "...", "higher_is_better": true,
          "target": {"metric": "<metric>", "op": ">=", "ratio": 0.8} | null,
          "target_met": true | false | null,
          "turnd":  {"median": {"<metric>": number | null, ...}, "runs": [{...}, ...]},
          "coturn": {"median": {...}, "runs": [...]},
          "ratio":  {"<metric>": turnd median / coturn median | null, ...},
          # only when another turnd was measured beside the default one (run.py --turnd-variant):
          "turnd-pure": {"median": {...}, "runs": [...]},
          "ratio_to_coturn": {"turnd-pure": {"<metric>": its median / coturn median | null, ...}}
        }
      }
    }

A ratio is always turnd (or the variant named) over coturn for the same metric, measured in the
same invocation, so "> 1" means turnd's number is the larger one; whether that is good depends
on the metric (``higher_is_better`` for the headline, the metric name otherwise).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

SCHEMA = 1
# Always present in a scenario's JSON, in this order; any other server (a turnd variant) follows.
BASE_SERVERS = ("turnd", "coturn")


@dataclass(frozen=True)
class Target:
    metric: str
    op: str  # ">=" or "<="
    ratio: float

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        return ratio >= self.ratio if self.op == ">=" else ratio <= self.ratio

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "ratio": self.ratio}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    ratio: bool = True  # some (loss %) are compared side by side, a ratio of them means little


@dataclass
class ScenarioResult:
    name: str
    title: str
    headline: str
    unit: str
    higher_is_better: bool
    metrics: list[Metric]
    target: Target | None = None
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"turnd": [], "coturn": []})

    def add(self, server: str, run: dict[str, Any]) -> None:
        self.runs.setdefault(server, []).append(run)

    def servers(self) -> list[str]:
        """turnd, coturn, then every other server that has runs, in the order they were added."""
        return [*BASE_SERVERS, *(name for name in self.runs if name not in BASE_SERVERS)]

    def extra_servers(self) -> list[str]:
        return [name for name in self.servers() if name not in BASE_SERVERS]

    def median(self, server: str) -> dict[str, float | None]:
        """Median of each metric over the runs that worked (no "error" key)."""
        good = [r for r in self.runs.get(server, []) if "error" not in r]
        out: dict[str, float | None] = {}
        for metric in self.metrics:
            values = [float(r[metric.key]) for r in good if _is_number(r.get(metric.key))]
            out[metric.key] = round(statistics.median(values), 3) if values else None
        return out

    def ratios(self, ours_name: str = "turnd") -> dict[str, float | None]:
        """Each metric's median of ``ours_name`` over coturn's."""
        ours, theirs = self.median(ours_name), self.median("coturn")
        out: dict[str, float | None] = {}
        for metric in self.metrics:
            if not metric.ratio:
                continue
            a, b = ours.get(metric.key), theirs.get(metric.key)
            out[metric.key] = round(a / b, 3) if a is not None and b else None
        return out

    def as_dict(self, *, judge: bool = True) -> dict[str, Any]:
        """``judge=False`` (quick runs) leaves ``target_met`` null: those numbers mean nothing."""
        ratios = self.ratios()
        out: dict[str, Any] = {
            "title": self.title,
            "headline": self.headline,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "target": self.target.as_dict() if self.target else None,
            "target_met": (self.target.met(ratios.get(self.target.metric))
                           if self.target and judge else None),
            "turnd": {"median": self.median("turnd"), "runs": self.runs.get("turnd", [])},
            "coturn": {"median": self.median("coturn"), "runs": self.runs.get("coturn", [])},
            "ratio": ratios,
        }
        extra = self.extra_servers()
        for name in extra:
            out[name] = {"median": self.median(name), "runs": self.runs.get(name, [])}
        if extra:
            out["ratio_to_coturn"] = {name: self.ratios(name) for name in extra}
        return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def format_table(scenarios: list[ScenarioResult], *, judge: bool = True) -> str:
    """A plain-text table: one block per scenario, headline metric first. A turnd variant
    measured too gets its own column and its own ratio to coturn."""
    extra: list[str] = []
    for sc in scenarios:
        extra.extend(name for name in sc.extra_servers() if name not in extra)
    names = [*BASE_SERVERS, *extra]
    header = ("scenario", "metric", *names, "turnd/coturn", *(f"{name}/coturn" for name in extra), "target")
    rows: list[tuple[str, ...]] = []
    for sc in scenarios:
        medians = {name: sc.median(name) for name in names}
        ratios = {name: sc.ratios(name) for name in ("turnd", *extra)}
        first = True
        for metric in sc.metrics:
            target = ""
            if sc.target and sc.target.metric == metric.key:
                met = sc.target.met(ratios["turnd"].get(metric.key)) if judge else None
                verdict = "" if met is None else (" met" if met else " NOT met")
                target = f"{sc.target.op} {sc.target.ratio:g}{verdict}"
            ratio_cells = [_fmt(ratios[name].get(metric.key)) if metric.ratio else ""
                           for name in ("turnd", *extra)]
            rows.append((sc.name if first else "", metric.label,
                         *(_fmt(medians[name].get(metric.key)) for name in names), *ratio_cells, target))
            first = False
        failures = [f"{server}: {r['error']}" for server in names
                    for r in sc.runs.get(server, []) if "error" in r]
        for failure in failures[:4]:
            rows.append(("", "run failed", failure, *([""] * (len(header) - 3))))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) if i < 2 or i == last else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)
