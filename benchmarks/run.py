"""Benchmark turnd against coturn on this machine, in one invocation, and report ratios.

    python benchmarks/run.py [--quick] [--json out.json] [--repeats N] [--only a,b]
    python -m benchmarks.run --only under_attack      # the attack scenario (not in the default set)

Both servers run on 127.0.0.1, each started here and stopped by PID. With two or more cores the
server under test is pinned to one core and every load generator (turnutils_uclient, and this
process for the allocation client) to another, so they do not compete for CPU. Each scenario runs
``--repeats`` times per server, alternating which server goes first, and the median is reported.
``--quick`` uses tiny sizes and runs everything at once: it checks that the harness works, and
its numbers mean nothing. See benchmarks/README.md for what is measured and how to read it.

``under_attack`` (benchmarks/attack.py) runs only when named in ``--only``: a reference call
while the server is attacked. It needs turnd only; coturn, when installed, is attacked the same
way as a reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    # Run as a script: make the repository importable (benchmarks.*, turnserver.*).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import allocations, attack, loadgen, servers  # noqa: E402
from benchmarks.results import SCHEMA, Metric, ScenarioResult, Target, format_table  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
# Let the server settle (imports, first allocations of its heap) before reading memory.
SETTLE_S = 1.0

RELAY_METRICS = [
    Metric("delivered_msgs_per_s", "delivered msg/s"),
    Metric("delivered_mbit_per_s", "delivered Mbit/s"),
    Metric("plateau_loss_pct", "loss % (plateau)", ratio=False),
    Metric("loss_pct", "loss % (whole run)", ratio=False),
    Metric("server_cpu_us_per_msg", "server CPU us/msg (lower is better)"),
    Metric("server_cpu_pct", "server CPU %", ratio=False),
    Metric("generator_cpu_pct", "generator CPU %", ratio=False),
]
RATE_METRICS = [
    Metric("allocations_per_s", "allocations/s"),
    Metric("server_cpu_us_per_allocation", "server CPU us/allocation (lower is better)"),
    Metric("server_cpu_pct", "server CPU %", ratio=False),
    Metric("client_cpu_pct", "client CPU %", ratio=False),
    Metric("failed", "failed", ratio=False),
]
MEMORY_METRICS = [
    Metric("kib_per_allocation", "KiB per allocation (lower is better)"),
    Metric("rss_idle_kib", "RSS idle KiB"),
    Metric("rss_loaded_kib", "RSS loaded KiB"),
]
# Side by side only: a ratio of losses or gaps means little (and one of them is often 0).
ATTACK_METRICS = [
    *(m for phase in attack.PHASES for m in (
        Metric(f"{phase}_loss_pct", f"{phase}: call loss % (worst direction)", ratio=False),
        Metric(f"{phase}_max_gap_ms", f"{phase}: call max gap ms", ratio=False),
        Metric(f"{phase}_relay_gap_ms", f"{phase}: call max relay gap ms", ratio=False),
        Metric(f"{phase}_server_cpu_pct", f"{phase}: server CPU %", ratio=False),
    )),
    Metric("oversized_msgs_per_s", "oversized: msgs/s sent (UDP + TCP)", ratio=False),
    Metric("flood_401_msgs_per_s", "flood_401: requests/s sent", ratio=False),
    Metric("flood_401_one_source_answers_per_request", "flood_401: answers/request, one port", ratio=False),
    Metric("flood_401_one_source_bytes_out_per_byte_in", "flood_401: bytes out/byte in, one port", ratio=False),
    Metric("flood_401_many_ports_answers_per_request", "flood_401: answers/request, many ports", ratio=False),
    Metric("flood_401_many_ports_bytes_out_per_byte_in", "flood_401: bytes out/byte in, many ports",
           ratio=False),
    Metric("permission_flood_requests_per_s", "permission_flood: requests/s", ratio=False),
    Metric("permission_flood_permissions_granted", "permission_flood: permissions granted", ratio=False),
    Metric("connection_flood_peak_open", "connection_flood: connections open at once", ratio=False),
    Metric("connection_flood_closed_by_server", "connection_flood: closed by the server", ratio=False),
    Metric("never_reads_msgs_per_s", "never_reads: requests/s sent", ratio=False),
    Metric("rss_start_kib", "server RSS KiB before the attacks", ratio=False),
    Metric("rss_end_kib", "server RSS KiB after the attacks", ratio=False),
]
ATTACK_SCENARIO = "under_attack"
# turnd's extra options for it: the permission flood's addresses must be permitted to count.
ATTACK_TURND_OPTIONS: dict[str, object] = {"allowed_peers": ["198.18.0.0/15"]}


@dataclass(frozen=True)
class RelayScenario:
    name: str
    title: str
    load: loadgen.Load


@dataclass(frozen=True)
class Sizes:
    repeats: int
    plateau_intervals: int
    moderate_clients: int
    heavy_clients: int
    messages: int
    length: int
    allocations: int
    concurrency: int
    attack_phase_s: float = 8.0  # under_attack: each attack phase, and all at once
    attack_baseline_s: float = 5.0  # under_attack: the call alone, before and after
    attack_rates: str = "full"  # under_attack: attack.FULL or attack.MODERATE


FULL = Sizes(repeats=3, plateau_intervals=3, moderate_clients=40, heavy_clients=120,
             messages=10_000, length=100, allocations=2000, concurrency=50)
QUICK = Sizes(repeats=1, plateau_intervals=1, moderate_clients=2, heavy_clients=4,
              messages=300, length=100, allocations=20, concurrency=10,
              attack_phase_s=1.0, attack_baseline_s=1.0, attack_rates="moderate")

ALLOCATION_SCENARIOS = ("allocation_rate", "memory_per_allocation")


def relay_scenarios(sizes: Sizes) -> list[RelayScenario]:
    def load(clients: int, *flags: str, transport: str = "udp") -> loadgen.Load:
        return loadgen.Load(clients=clients, messages=sizes.messages, length=sizes.length,
                            flags=("-y", "-c", *flags), transport=transport)

    moderate, heavy = sizes.moderate_clients, sizes.heavy_clients
    return [
        RelayScenario("udp_channel", f"UDP, ChannelData, {moderate} sessions x 1000 msg/s",
                      load(moderate)),
        RelayScenario("udp_channel_heavy", f"UDP, ChannelData, {heavy} sessions x 1000 msg/s",
                      load(heavy)),
        RelayScenario("udp_send", f"UDP, Send/Data indications, {moderate} sessions x 1000 msg/s",
                      load(moderate, "-s")),
        RelayScenario("tcp_channel", f"TCP to the server, ChannelData, {moderate} sessions x 1000 msg/s",
                      load(moderate, transport="tcp")),
    ]


def new_results(sizes: Sizes, selected: set[str]) -> dict[str, ScenarioResult]:
    out: dict[str, ScenarioResult] = {}
    for sc in relay_scenarios(sizes):
        if sc.name in selected:
            out[sc.name] = ScenarioResult(
                sc.name, sc.title, "delivered_msgs_per_s", "msg/s", True, RELAY_METRICS,
                Target("delivered_msgs_per_s", ">=", 0.8))
    if "allocation_rate" in selected:
        out["allocation_rate"] = ScenarioResult(
            "allocation_rate",
            f"{sizes.allocations} UDP allocations through the 401 dance, {sizes.concurrency} in flight",
            "allocations_per_s", "allocations/s", True, RATE_METRICS,
            Target("allocations_per_s", ">=", 0.5))
    if "memory_per_allocation" in selected:
        out["memory_per_allocation"] = ScenarioResult(
            "memory_per_allocation", f"RSS growth holding {sizes.allocations} UDP allocations",
            "kib_per_allocation", "KiB", False, MEMORY_METRICS,
            Target("kib_per_allocation", "<=", 4.0))
    if ATTACK_SCENARIO in selected:
        out[ATTACK_SCENARIO] = ScenarioResult(
            ATTACK_SCENARIO,
            f"reference call (50 pkt/s each way, 200 B) through {sizes.attack_phase_s:g} s of each attack "
            f"({sizes.attack_rates} rates), then all at once",
            "all_at_once_max_gap_ms", "ms", False, ATTACK_METRICS, None)
    return out


# ---------------------------------------------------------------------------------- measuring


def measure_relay(server: servers.ServerUnderTest, scenario: RelayScenario, sizes: Sizes,
                  generator_cpu: int | None) -> dict[str, Any]:
    run = loadgen.run_uclient(server, scenario.load, cpu=generator_cpu)
    result = loadgen.summarize(run, scenario.load, plateau_intervals=sizes.plateau_intervals)
    if not server.alive():
        result["error"] = f"server exited with {server.proc.returncode}"
    return result


def measure_under_attack(server: servers.ServerUnderTest, plan: Plan) -> dict[str, Any]:
    """The attack sequence of benchmarks/attack.py against one fresh server: flat metrics plus
    every phase's details (under "phases")."""
    target = attack.Target(udp=(servers.HOST, server.ports["udp"]),
                           tcp=(servers.HOST, server.ports["tcp"]) if "tcp" in server.ports else None,
                           secret=server.secret, realm=server.realm, pid=server.pid)
    rates = attack.MODERATE if plan.sizes.attack_rates == "moderate" else attack.FULL
    time.sleep(SETTLE_S)
    scenario = attack.run_scenario(
        target, rates=rates, phase_s=plan.sizes.attack_phase_s, baseline_s=plan.sizes.attack_baseline_s,
        log=lambda msg: plan.log(f"{server.name} {msg}"))
    result: dict[str, Any] = {**attack.flatten(scenario), "phases": scenario["phases"],
                              "rates": scenario["rates"]}
    if not server.alive():
        result["error"] = f"server exited with {server.proc.returncode}"
    return result


def measure_allocations(server: servers.ServerUnderTest, sizes: Sizes) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fresh server: idle RSS, then N allocations held open: their rate and RSS growth."""
    time.sleep(SETTLE_S)
    idle = server.rss_kib()
    cpu_before, server_cpu_before = time.process_time(), server.cpu_seconds()
    held = allocations.allocate_many(server, sizes.allocations, concurrency=sizes.concurrency)
    client_cpu = time.process_time() - cpu_before
    server_cpu = server.cpu_seconds() - server_cpu_before
    ok = held.ok
    try:
        time.sleep(SETTLE_S)
        loaded = server.rss_kib()
    finally:
        held.close()
    rate: dict[str, Any] = {
        "allocations": ok, "failed": held.failed, "errors": held.errors,
        "elapsed_s": round(held.elapsed_s, 3),
        "allocations_per_s": round(ok / held.elapsed_s, 1) if held.elapsed_s > 0 else None,
        # Near 100 %: the client, not the server, set the pace.
        "client_cpu_pct": round(100.0 * client_cpu / held.elapsed_s, 1) if held.elapsed_s > 0 else None,
        "server_cpu_pct": round(100.0 * server_cpu / held.elapsed_s, 1) if held.elapsed_s > 0 else None,
        # Two requests each (the 401, then the authenticated Allocate) and a relay port bound.
        "server_cpu_us_per_allocation": round(1e6 * server_cpu / ok, 1) if ok and server_cpu > 0 else None,
    }
    memory: dict[str, Any] = {
        "allocations": ok, "rss_idle_kib": idle, "rss_loaded_kib": loaded,
        "kib_per_allocation": round((loaded - idle) / ok, 3) if ok else None,
    }
    if ok == 0 or held.failed:
        reason = f"{held.failed} of {sizes.allocations} allocations failed: {held.errors}"
        rate["error"] = memory["error"] = reason
    return rate, memory


@dataclass
class Plan:
    sizes: Sizes
    selected: set[str]
    workdir: Path
    server_cpu: int | None
    generator_cpu: int | None
    parallel: bool
    log: Callable[[str], None]
    server_names: tuple[str, ...] = servers.SERVER_NAMES


def run_server_pass(plan: Plan, name: str, rep: int, results: dict[str, ScenarioResult]) -> None:
    """Every selected scenario once against ``name``: relay scenarios on one server process,
    allocations on a fresh one (its memory must not carry the relay runs' history)."""
    todo = [sc for sc in relay_scenarios(plan.sizes) if sc.name in plan.selected]
    progress = f"[{rep + 1}/{plan.sizes.repeats}] {name}"
    server = _start(plan, name, f"{name}-relay-{rep}", [sc.name for sc in todo], results) if todo else None
    if server is not None:
        try:
            def one(sc: RelayScenario) -> None:
                plan.log(f"{progress} {sc.name} ...")
                result = measure_relay(server, sc, plan.sizes, plan.generator_cpu)
                results[sc.name].add(name, result)
                plan.log(f"{progress} {sc.name}: "
                         f"{result.get('delivered_msgs_per_s')} msg/s delivered, "
                         f"loss {result.get('plateau_loss_pct')} %, "
                         f"server CPU {result.get('server_cpu_us_per_msg')} us/msg"
                         + (f" ERROR {result['error']}" if "error" in result else ""))
            _each(todo, one, plan.parallel)
        finally:
            server.stop()
    wanted = [n for n in ALLOCATION_SCENARIOS if n in results]
    server = _start(plan, name, f"{name}-alloc-{rep}", wanted, results) if wanted else None
    if server is not None:
        try:
            rate, memory = measure_allocations(server, plan.sizes)
        finally:
            server.stop()
        if "allocation_rate" in results:
            results["allocation_rate"].add(name, rate)
        if "memory_per_allocation" in results:
            results["memory_per_allocation"].add(name, memory)
        plan.log(f"{progress} allocations: "
                 f"{rate['allocations_per_s']} /s, {memory['kib_per_allocation']} KiB each")
    if ATTACK_SCENARIO in results:
        server = _start(plan, name, f"{name}-attack-{rep}", [ATTACK_SCENARIO], results,
                        turnd_options=ATTACK_TURND_OPTIONS)
        if server is not None:
            try:
                result = measure_under_attack(server, plan)
            finally:
                server.stop()
            results[ATTACK_SCENARIO].add(name, result)
            plan.log(f"{progress} under_attack: all at once: loss {result.get('all_at_once_loss_pct')} %, "
                     f"max gap {result.get('all_at_once_max_gap_ms')} ms"
                     + (f" ERROR {result['error']}" if "error" in result else "")
                     + (f" (attackers: {result['problems']})" if "problems" in result else ""))


def _start(plan: Plan, name: str, subdir: str, scenarios: list[str],
           results: dict[str, ScenarioResult],
           turnd_options: dict[str, object] | None = None) -> servers.ServerUnderTest | None:
    """Start a server; if it will not start, every scenario it was for records a failed run."""
    try:
        if name == "turnd" and turnd_options:
            return servers.start_turnd(plan.workdir / subdir, cpu=plan.server_cpu, extra_options=turnd_options)
        return servers.start(name, plan.workdir / subdir, cpu=plan.server_cpu)
    except RuntimeError as exc:
        plan.log(f"{name} did not start: {exc}")
        for scenario in scenarios:
            results[scenario].add(name, {"error": f"{name} did not start: {str(exc).splitlines()[0]}"})
        return None


def _each(items: list[Any], fn: Callable[[Any], None], parallel: bool) -> None:
    if not parallel:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def run(plan: Plan) -> dict[str, ScenarioResult]:
    results = new_results(plan.sizes, plan.selected)
    for rep in range(plan.sizes.repeats):
        # Alternate who goes first so slow drift on a shared machine hits both alike.
        order = list(plan.server_names) if rep % 2 == 0 else list(reversed(plan.server_names))
        _each(order, lambda name: run_server_pass(plan, name, rep, results), plan.parallel)
    return results


# ---------------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit, modified = "", None
    try:
        git = ["git", "-C", str(servers.REPO_ROOT)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        # The server measured is the working tree, which may differ from that commit.
        modified = bool(subprocess.run([*git, "status", "--porcelain", "--", "turnserver"],
                                       capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    from turnserver import __version__

    return {
        "cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(), "turnd_version": __version__,
        "turnd_commit": commit, "turnd_tree_modified": modified, "coturn_version": servers.coturn_version(),
    }


def report(results: dict[str, ScenarioResult], plan: Plan, quick: bool, started: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "settings": {
            **plan.sizes.__dict__, "server_cpu": plan.server_cpu,
            "generator_cpu": plan.generator_cpu, "parallel": plan.parallel,
        },
        "scenarios": {name: sc.as_dict(judge=not quick) for name, sc in results.items()},
    }


def all_scenario_names() -> list[str]:
    """The default set: every scenario that compares turnd with coturn."""
    return [sc.name for sc in relay_scenarios(FULL)] + list(ALLOCATION_SCENARIOS)


# Run only when named in --only.
OPT_IN_SCENARIOS = (ATTACK_SCENARIO,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, everything at once: checks the harness, measures nothing")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"output (default {DEFAULT_JSON})")
    parser.add_argument("--repeats", type=int, help="runs per scenario and server (median reported)")
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(all_scenario_names())
                        + "; and, only when named here: " + ", ".join(OPT_IN_SCENARIOS))
    parser.add_argument("--allocations", type=int, help="allocations held for the memory scenario")
    parser.add_argument("--messages", type=int, help="messages per uclient session")
    parser.add_argument("--workdir", type=Path, help="where server configs and logs go (default: a temp dir)")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("repeats", args.repeats), ("allocations", args.allocations),
                                   ("messages", args.messages)) if v is not None}
    if any(v < 1 for v in overrides.values()):
        parser.error("--repeats, --allocations and --messages must be at least 1")
    sizes = Sizes(**{**sizes.__dict__, **overrides})
    names = all_scenario_names()
    selected = set(names)
    if args.only:
        selected = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = selected - set(names) - set(OPT_IN_SCENARIOS)
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    names += [n for n in OPT_IN_SCENARIOS if n in selected]
    server_names: tuple[str, ...] = servers.SERVER_NAMES
    if not servers.coturn_available():
        if selected - set(OPT_IN_SCENARIOS):
            print("coturn is not installed (turnserver, turnutils_uclient): nothing to compare against",
                  file=sys.stderr)
            return 2
        server_names = ("turnd",)  # under_attack alone needs no coturn

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = generator_cpu = None
    if len(cpus) >= 2 and not args.quick:
        server_cpu, generator_cpu = cpus[0], cpus[1]
        # This process is the allocation client: keep it off the server's core too.
        os.sched_setaffinity(0, {generator_cpu})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="turnd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = Plan(sizes, selected, workdir, server_cpu, generator_cpu, parallel=args.quick,
                log=lambda msg: print(msg, file=sys.stderr, flush=True), server_names=server_names)
    started = time.monotonic()
    results = run(plan)
    ordered = [results[n] for n in names if n in results]
    doc = report({sc.name: sc for sc in ordered}, plan, args.quick, started)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(format_table(ordered, judge=not args.quick))
    print(f"\n{'quick run: harness check only, the numbers mean nothing. ' if args.quick else ''}"
          f"ratios are turnd/coturn, medians of {sizes.repeats} run(s); JSON: {args.json}; "
          f"logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
