"""PNG plots from benchmark results (the JSON that ``benchmarks/run.py --json`` writes).

    python -m benchmarks.plots results.json --out docs/img/
    python -m benchmarks.plots w1.json w2.json w4.json --out docs/img/    # plus a scaling curve

From the first file:

- ``throughput.png``: with a fixed-rate sweep (``run.py --rates``), round trips delivered against
  round trips offered, per server, with the closed-loop rate of 100 allocations as a dashed
  line; without one, a bar chart of the delivered rate of every closed-loop scenario (and of
  the turnutils_uclient relay scenarios, in messages/s).
- ``cpu_per_datagram.png``: server CPU per relayed datagram (µs), per scenario and server
  (``server_cpu_us_per_msg`` for the uclient scenarios).
- ``latency.png``: latency p50 / p99 / p99.9 of each fixed-rate scenario, per server, log scale.

From every file given: ``scaling.png``: the closed-loop rate against ``settings.workers`` (one
point per file; a file run without ``--workers`` counts as 1), one line per server and scenario.

matplotlib is imported only inside the plotting functions, so the benchmarks themselves run
without it (``pip install .[bench]`` installs it). Only medians are plotted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SERVER_ORDER = ("turnd", "coturn", "turnd-pure")
UCLIENT_SCENARIOS = ("udp_channel", "udp_channel_heavy", "udp_send", "tcp_channel")


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "scenarios" not in doc:
        raise ValueError(f"{path}: not a benchmarks/run.py result (no 'scenarios')")
    return doc


def servers_of(doc: dict[str, Any]) -> list[str]:
    """The servers with results in ``doc``, turnd first."""
    seen: list[str] = []
    for scenario in doc["scenarios"].values():
        for key, value in scenario.items():
            if isinstance(value, dict) and "median" in value and "runs" in value and key not in seen:
                seen.append(key)
    return sorted(seen, key=lambda s: (SERVER_ORDER.index(s) if s in SERVER_ORDER else len(SERVER_ORDER), s))


def _median(doc: dict[str, Any], scenario: str, server: str, metric: str) -> float | None:
    value = doc["scenarios"].get(scenario, {}).get(server, {}).get("median", {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def rate_scenarios(doc: dict[str, Any]) -> list[str]:
    """Fixed-rate scenarios (fixed_rate, fixed_rate_<R>, latency_at_half_knee), by offered rate."""
    out = []
    for name, scenario in doc["scenarios"].items():
        if any(_median(doc, name, s, "offered_round_trips_per_s") for s in servers_of(doc)) or \
                any("offered_round_trips_per_s" in r for v in scenario.values() if isinstance(v, dict)
                    for r in v.get("runs", []) if isinstance(r, dict)):
            out.append(name)
    return sorted(out, key=lambda n: _offered(doc, n) or 0.0)


def _offered(doc: dict[str, Any], scenario: str) -> float | None:
    for server in servers_of(doc):
        runs = doc["scenarios"][scenario].get(server, {}).get("runs", [])
        for run in runs:
            if isinstance(run.get("offered_round_trips_per_s"), (int, float)):
                return float(run["offered_round_trips_per_s"])
    return None


def closed_loop_scenarios(doc: dict[str, Any]) -> list[str]:
    return [n for n in doc["scenarios"] if n.startswith("closed_loop")]


def rate_curve(doc: dict[str, Any], server: str) -> list[tuple[float, float]]:
    """(offered, delivered) round trips/s of ``server`` over the fixed-rate scenarios."""
    points = []
    for name in rate_scenarios(doc):
        offered, delivered = _offered(doc, name), _median(doc, name, server, "round_trips_per_s")
        if offered is not None and delivered is not None:
            points.append((offered, delivered))
    return sorted(points)


def scaling_points(docs: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(server, closed-loop scenario) -> [(workers, relayed datagrams/s)], by workers."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for doc in docs:
        workers = doc.get("settings", {}).get("workers") or 1
        for name in closed_loop_scenarios(doc):
            for server in servers_of(doc):
                value = _median(doc, name, server, "relayed_datagrams_per_s")
                if value is not None:
                    out.setdefault((server, name), []).append((int(workers), value))
    return {key: sorted(points) for key, points in out.items()}


# ---------------------------------------------------------------------------------- drawing


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(doc: dict[str, Any]) -> str:
    machine, settings = doc.get("machine", {}), doc.get("settings", {})
    parts = [str(doc.get("date", ""))[:10], f"{machine.get('cpus', '?')} CPUs",
             f"server on {settings.get('server_cpus') or 'any core'}",
             f"workers {settings.get('workers') or 'unset'}"]
    if doc.get("quick"):
        parts.append("QUICK RUN: numbers mean nothing")
    return ", ".join(parts)


def _bars(ax: Any, groups: list[str], servers: list[str], values: dict[tuple[str, str], float | None]) -> None:
    width = 0.8 / max(1, len(servers))
    for i, server in enumerate(servers):
        xs = [g + (i - (len(servers) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((group, server)) or 0.0 for group in groups]
        bars = ax.bar(xs, ys, width, label=server)
        for bar, group in zip(bars, groups):
            if values.get((group, server)) is None:
                bar.set_hatch("//")  # no number: failed or not run
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.legend()


def plot_throughput(doc: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    servers = servers_of(doc)
    fig, ax = plt.subplots(figsize=(8, 5))
    offered = {o for s in servers for o, _ in rate_curve(doc, s)}
    if len(offered) >= 2:
        for server in servers:
            curve = rate_curve(doc, server)
            if curve:
                line = ax.plot([o for o, _ in curve], [d for _, d in curve], marker="o", label=server)[0]
                closed = _median(doc, "closed_loop_100", server, "round_trips_per_s")
                if closed:
                    ax.axhline(closed, linestyle="--", color=line.get_color(), alpha=0.6,
                               label=f"{server} closed loop (100 allocations)")
        top = max(offered)
        ax.plot([0, top], [0, top], color="grey", linewidth=0.8, label="delivered = offered")
        ax.set_xlabel("offered round trips/s")
        ax.set_ylabel("delivered round trips/s")
        ax.set_title("Throughput against offered load (fixed rate, 100 allocations)")
        ax.legend(fontsize=8)
    else:
        groups = closed_loop_scenarios(doc) + [n for n in UCLIENT_SCENARIOS if n in doc["scenarios"]]
        values: dict[tuple[str, str], float | None] = {}
        for group in groups:
            metric = "relayed_datagrams_per_s" if group.startswith("closed_loop") else "delivered_msgs_per_s"
            for server in servers:
                values[(group, server)] = _median(doc, group, server, metric)
        _bars(ax, groups, servers, values)
        ax.set_ylabel("relayed datagrams/s (uclient: messages/s)")
        ax.set_title("Delivered rate")
    fig.suptitle(_subtitle(doc), fontsize=8, y=0.99)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cpu(doc: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    servers = servers_of(doc)
    groups, values = [], {}
    for name in doc["scenarios"]:
        for metric in ("server_cpu_us_per_datagram", "server_cpu_us_per_msg"):
            found = {s: _median(doc, name, s, metric) for s in servers}
            if any(v is not None for v in found.values()):
                groups.append(name)
                values.update({(name, s): v for s, v in found.items()})
                break
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 5))
    _bars(ax, groups, servers, values)
    ax.set_ylabel("server CPU µs per relayed datagram (lower is better)")
    ax.set_title("Server CPU per relayed datagram")
    fig.suptitle(_subtitle(doc), fontsize=8, y=0.99)
    fig.tight_layout()
    path = out / "cpu_per_datagram.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(doc: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    servers = servers_of(doc)
    names = rate_scenarios(doc) or closed_loop_scenarios(doc)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(max(6, 4 * len(names)), 5), squeeze=False)
    labels = (("latency_p50_us", "p50"), ("latency_p99_us", "p99"), ("latency_p999_us", "p99.9"))
    for ax, name in zip(axes[0], names):
        values = {(label, s): _median(doc, name, s, key) for key, label in labels for s in servers}
        _bars(ax, [label for _, label in labels], servers, values)
        ax.set_yscale("log")
        offered = _offered(doc, name)
        ax.set_title(f"{name}" + (f"\n{offered:,.0f} round trips/s" if offered else ""), fontsize=9)
        ax.set_ylabel("round-trip latency µs (log)")
    fig.suptitle("Round-trip latency (two relayed datagrams)   " + _subtitle(doc), fontsize=8)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(docs: list[dict[str, Any]], out: Path) -> Path | None:
    points = scaling_points(docs)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    def order(key: tuple[str, str]) -> tuple[int, str, str]:
        server, name = key
        return (SERVER_ORDER.index(server) if server in SERVER_ORDER else len(SERVER_ORDER), server, name)

    for server, name in sorted(points, key=order):
        curve = points[(server, name)]
        ax.plot([w for w, _ in curve], [v for _, v in curve], marker="o", label=f"{server} {name}")
    ax.set_xticks(sorted({w for curve in points.values() for w, _ in curve}))
    ax.set_xlabel("workers (turnd workers, coturn --relay-threads; unset = 1)")
    ax.set_ylabel("relayed datagrams/s (closed loop)")
    ax.set_title(f"Scaling over {len(docs)} result file(s)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(paths: list[Path], out: Path) -> list[Path]:
    docs = [load(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_throughput(docs[0], out), plot_cpu(docs[0], out), plot_latency(docs[0], out)]
    scaling = plot_scaling(docs, out)
    if scaling is not None:
        written.append(scaling)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="run.py JSON files (the first for most plots)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs (default: .)")
    args = parser.parse_args(argv)
    try:
        written = plot_all(args.results, args.out)
    except ImportError:
        print("matplotlib is needed for plots: pip install matplotlib (or .[bench])", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
