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

The closed-loop and fixed-rate scenarios (``closed_loop_100``, ``closed_loop_1000``,
``closed_loop_send_100``, ``fixed_rate``, ``latency_at_half_knee``) use the C generator in
benchmarks/relayload.c, driven by benchmarks/closedloop.py. ``--workers N`` passes ``workers = N``
to turnd and ``--relay-threads N`` to coturn; ``--cores LIST`` says where the server runs;
``--turnd-variant pure`` measures a second turnd with ``TURND_PURE_PYTHON=1`` as "turnd-pure".
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    # Run as a script: make the repository importable (benchmarks.*, turnserver.*).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import allocations, attack, closedloop, loadgen, servers  # noqa: E402
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
# tls_channel: turnutils_uclient counts one message per TLS record it reads (one SSL_read), so
# messages a server packs into one record count once; CPU per message sent does not depend on it.
TLS_RELAY_METRICS = [
    *RELAY_METRICS,
    Metric("server_cpu_us_per_sent_msg", "server CPU us/msg sent (lower is better)"),
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
# Closed loop: throughput at saturation, CPU per datagram, latency (W in flight: mostly queueing).
LOOP_METRICS = [
    Metric("relayed_datagrams_per_s", "relayed datagrams/s"),
    Metric("round_trips_per_s", "round trips/s"),
    Metric("server_cpu_us_per_datagram", "server CPU us/datagram (lower is better)"),
    Metric("latency_p50_us", "latency p50 us (lower is better)"),
    Metric("latency_p99_us", "latency p99 us (lower is better)"),
    Metric("latency_p999_us", "latency p99.9 us (lower is better)"),
    Metric("loss_pct", "loss %", ratio=False),
    Metric("server_cpu_pct", "server CPU %", ratio=False),
    Metric("server_core_busy_pct", "server core busy % (softirq incl.)", ratio=False),
    Metric("generator_cpu_pct", "generator CPU %", ratio=False),
    Metric("generator_core_busy_pct", "generator core busy % (softirq incl.)", ratio=False),
]
# Fixed rate: both servers carry the same offered load; CPU per datagram and latency matter.
RATE_LOOP_METRICS = [
    Metric("server_cpu_us_per_datagram", "server CPU us/datagram (lower is better)"),
    Metric("offered_round_trips_per_s", "offered round trips/s", ratio=False),
    Metric("round_trips_per_s", "round trips/s delivered"),
    Metric("loss_pct", "loss %", ratio=False),
    Metric("latency_p50_us", "latency p50 us (lower is better)"),
    Metric("latency_p99_us", "latency p99 us (lower is better)"),
    Metric("latency_p999_us", "latency p99.9 us (lower is better)"),
    Metric("server_cpu_pct", "server CPU %", ratio=False),
    Metric("server_core_busy_pct", "server core busy % (softirq incl.)", ratio=False),
    Metric("generator_cpu_pct", "generator CPU %", ratio=False),
    Metric("generator_core_busy_pct", "generator core busy % (softirq incl.)", ratio=False),
]
# turnd refuses loopback peers unless allowed (coturn gets --allow-loopback-peers); the
# generator's peers are plain sockets on 127.0.0.1.
LOOP_TURND_OPTIONS: dict[str, object] = {"allowed_peers": ["127.0.0.1/32"]}
HALF_KNEE_SCENARIO = "latency_at_half_knee"
# The allocations of the fixed-rate scenarios and of the knee.
RATE_ALLOCATIONS = 100
# A generator whose own CPU is at least this share of a core may be what set the pace.
GENERATOR_BOUND_PCT = 90.0

ATTACK_SCENARIO = "under_attack"
# turnd's extra options for it: the permission flood's addresses must be permitted to count.
ATTACK_TURND_OPTIONS: dict[str, object] = {"allowed_peers": ["198.18.0.0/15"]}


@dataclass(frozen=True)
class RelayScenario:
    name: str
    title: str
    load: loadgen.Load


@dataclass(frozen=True)
class LoopScenario:
    """One scenario of benchmarks/closedloop.py: ``allocations`` of its load are scaled by the
    sizes (``--quick``); closed loop or fixed rate as the load says."""

    name: str
    title: str
    load: closedloop.LoopLoad


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
    # closedloop.py: allocations of closed_loop_100 / closed_loop_1000 (and of the rate runs),
    # round trips in flight, warm-up and measured seconds, payload, default fixed rate.
    loop_small: int = 100
    loop_large: int = 1000
    loop_window: int = 256
    loop_warmup_s: float = 1.0
    loop_duration_s: float = 5.0
    loop_payload: int = 200
    fixed_rate: float = 15_000.0


FULL = Sizes(repeats=3, plateau_intervals=3, moderate_clients=40, heavy_clients=120,
             messages=10_000, length=100, allocations=2000, concurrency=50)
QUICK = Sizes(repeats=1, plateau_intervals=1, moderate_clients=2, heavy_clients=4,
              messages=300, length=100, allocations=20, concurrency=10,
              attack_phase_s=1.0, attack_baseline_s=1.0, attack_rates="moderate",
              loop_small=10, loop_large=40, loop_window=32, loop_warmup_s=0.3, loop_duration_s=1.0,
              fixed_rate=2000.0)

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
        RelayScenario("tls_channel", f"TLS to the server, ChannelData, {moderate} sessions x 1000 msg/s",
                      load(moderate, transport="tls")),
        # uclient -T: RFC 6062 allocations whose sessions Connect to each other's relayed
        # addresses; every message crosses two spliced TCP connections through the server.
        RelayScenario("tcp_relay", f"TCP allocations (RFC 6062), {moderate} sessions x 1000 msg/s",
                      load(moderate, "-T", transport="tcp")),
    ]


@dataclass(frozen=True)
class LoopOptions:
    """What the command line says about the closed-loop and fixed-rate scenarios."""

    rates: tuple[float, ...] = ()  # --rates: a sweep of fixed_rate_<R>; empty: one fixed_rate
    generator_threads: int = 1


def fixed_rate_names(options: LoopOptions) -> list[str]:
    return [f"fixed_rate_{rate:g}" for rate in options.rates] if options.rates else ["fixed_rate"]


def loop_scenarios(sizes: Sizes, options: LoopOptions) -> list[LoopScenario]:
    """Every closed-loop and fixed-rate scenario but the half-knee one (its rate comes later)."""
    def load(allocations: int, **kw: Any) -> closedloop.LoopLoad:
        threads = max(1, min(options.generator_threads, allocations))
        return closedloop.LoopLoad(allocations=allocations, window=max(sizes.loop_window, threads),
                                   warmup_s=sizes.loop_warmup_s, duration_s=sizes.loop_duration_s,
                                   payload=sizes.loop_payload, threads=threads, **kw)

    small, large, window = sizes.loop_small, sizes.loop_large, sizes.loop_window
    out = [
        LoopScenario("closed_loop_100", f"closed loop, {small} UDP allocations, ChannelData, "
                     f"{window} round trips in flight, {sizes.loop_payload} B", load(small)),
        LoopScenario("closed_loop_1000", f"closed loop, {large} UDP allocations, ChannelData, "
                     f"{window} round trips in flight, {sizes.loop_payload} B", load(large)),
        LoopScenario("closed_loop_send_100", f"closed loop, {small} UDP allocations, Send/Data "
                     f"indications, {window} round trips in flight, {sizes.loop_payload} B",
                     load(small, method="send")),
    ]
    rates = options.rates or (sizes.fixed_rate,)
    for name, rate in zip(fixed_rate_names(options), rates):
        out.append(LoopScenario(name, f"fixed rate {rate:,.0f} round trips/s ({2 * rate:,.0f} datagrams/s), "
                                f"{small} UDP allocations, ChannelData, {sizes.loop_payload} B",
                                load(small, mode="rate", rate=rate)))
    return out


def half_knee_load(sizes: Sizes, options: LoopOptions, rate: float) -> closedloop.LoopLoad:
    threads = max(1, min(options.generator_threads, sizes.loop_small))
    return closedloop.LoopLoad(allocations=sizes.loop_small, mode="rate", rate=rate,
                               warmup_s=sizes.loop_warmup_s, duration_s=sizes.loop_duration_s,
                               payload=sizes.loop_payload, threads=threads)


def new_results(sizes: Sizes, selected: set[str],
                loop_options: LoopOptions = LoopOptions()) -> dict[str, ScenarioResult]:
    out: dict[str, ScenarioResult] = {}
    for sc in relay_scenarios(sizes):
        if sc.name in selected:
            out[sc.name] = ScenarioResult(
                sc.name, sc.title, "delivered_msgs_per_s", "msg/s", True,
                TLS_RELAY_METRICS if sc.load.transport == "tls" else RELAY_METRICS,
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
    for sc in loop_scenarios(sizes, loop_options):
        if sc.name in selected:
            if sc.load.mode == "closed":
                out[sc.name] = ScenarioResult(sc.name, sc.title, "relayed_datagrams_per_s", "datagrams/s",
                                              True, LOOP_METRICS, None)
            else:
                out[sc.name] = ScenarioResult(sc.name, sc.title, "server_cpu_us_per_datagram", "us",
                                              False, RATE_LOOP_METRICS, None)
    if HALF_KNEE_SCENARIO in selected:
        out[HALF_KNEE_SCENARIO] = ScenarioResult(
            HALF_KNEE_SCENARIO, "fixed rate at half of coturn's closed_loop_100 rate (set when measured)",
            "latency_p99_us", "us", False, RATE_LOOP_METRICS, None)
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


def measure_loop(server: servers.ServerUnderTest, load: closedloop.LoopLoad, plan: "Plan") -> dict[str, Any]:
    """One closed-loop or fixed-rate run of the C generator against ``server``."""
    try:
        result = closedloop.measure(server, load, cpus=plan.generator_cpus, server_cpus=plan.server_cpus or (),
                                    workdir=server.workdir)
    except (OSError, RuntimeError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    pct = result.get("generator_cpu_pct")
    # Near a full core per core it could use, the generator may have set the pace, not the server.
    cores = min(load.threads, len(plan.generator_cpus)) if plan.generator_cpus else load.threads
    result["generator_bound"] = bool(isinstance(pct, (int, float)) and pct >= GENERATOR_BOUND_PCT * cores)
    if not server.alive():
        result["error"] = f"server exited with {server.proc.returncode}"
    return result


def _log_loop(plan: "Plan", progress: str, name: str, result: dict[str, Any]) -> None:
    plan.log(f"{progress} {name}: {result.get('round_trips_per_s')} round trips/s, "
             f"server CPU {result.get('server_cpu_us_per_datagram')} us/datagram "
             f"({result.get('server_cpu_pct')} %), latency p50/p99/p99.9 "
             f"{result.get('latency_p50_us')}/{result.get('latency_p99_us')}/{result.get('latency_p999_us')} us, "
             f"loss {result.get('loss_pct')} %, generator CPU {result.get('generator_cpu_pct')} %"
             + (" (GENERATOR-BOUND)" if result.get("generator_bound") else "")
             + (f" ERROR {result['error']}" if "error" in result else ""))


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
    server_cpus: list[int] | None  # where the server runs (taskset); None: anywhere
    generator_cpus: list[int] | None  # where the load generators and this process run
    parallel: bool
    log: Callable[[str], None]
    server_names: tuple[str, ...] = servers.SERVER_NAMES
    workers: int | None = None  # turnd's workers option, coturn's --relay-threads
    turnd_env: dict[str, str] = field(default_factory=dict)
    loop_options: LoopOptions = LoopOptions()
    half_knee: dict[str, Any] = field(default_factory=dict)  # how its rate was found
    _tls: servers.TlsFiles | None = field(default=None, repr=False)
    _tls_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def generator_cpu(self) -> int | None:
        """One core for the single-threaded generators (turnutils_uclient)."""
        return self.generator_cpus[0] if self.generator_cpus else None

    def tls_files(self) -> servers.TlsFiles:
        """The run's self-signed certificate and key, made in the workdir on first use; every
        server with a TLS listener in this run serves the same pair."""
        with self._tls_lock:
            if self._tls is None:
                try:
                    self._tls = servers.make_tls_files(self.workdir / "tls")
                except (ImportError, OSError, ValueError) as exc:
                    raise RuntimeError(f"cannot make the TLS certificate: {exc}") from exc
            return self._tls


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
    loops = [sc for sc in loop_scenarios(plan.sizes, plan.loop_options) if sc.name in results]
    server = _start(plan, name, f"{name}-loop-{rep}", [sc.name for sc in loops], results,
                    turnd_options=LOOP_TURND_OPTIONS) if loops else None
    if server is not None:
        try:
            for sc in loops:
                plan.log(f"{progress} {sc.name} ...")
                result = measure_loop(server, sc.load, plan)
                results[sc.name].add(name, result)
                _log_loop(plan, progress, sc.name, result)
        finally:
            server.stop()
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
    ports = None
    if len([n for n in plan.server_names if n == "turnd" or n in servers.TURND_VARIANTS]) > 1:
        ports = servers.TURND_SPLIT_RELAY_PORTS.get(name)
    tls_names = {sc.name for sc in relay_scenarios(plan.sizes) if sc.load.transport == "tls"}
    try:
        # A TLS listener only on a server that a TLS scenario will use.
        tls = plan.tls_files() if tls_names & set(scenarios) else None
        return servers.start(name, plan.workdir / subdir, cpu=plan.server_cpus, workers=plan.workers,
                             turnd_env=plan.turnd_env, extra_options=turnd_options, relay_ports=ports,
                             tls=tls)
    except RuntimeError as exc:
        plan.log(f"{name} did not start: {exc}")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # The first line says how it ended; the log's last line usually says why.
        reason = " / ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else "unknown"
        for scenario in scenarios:
            results[scenario].add(name, {"error": f"{name} did not start: {reason}"})
        return None


def _each(items: list[Any], fn: Callable[[Any], None], parallel: bool) -> None:
    if not parallel:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def _order(plan: Plan, rep: int) -> list[str]:
    # Alternate who goes first so slow drift on a shared machine hits both alike.
    return list(plan.server_names) if rep % 2 == 0 else list(reversed(plan.server_names))


def run(plan: Plan) -> dict[str, ScenarioResult]:
    results = new_results(plan.sizes, plan.selected, plan.loop_options)
    for rep in range(plan.sizes.repeats):
        _each(_order(plan, rep), lambda name: run_server_pass(plan, name, rep, results), plan.parallel)
    if HALF_KNEE_SCENARIO in results:
        run_half_knee(plan, results)
    return results


def run_half_knee(plan: Plan, results: dict[str, ScenarioResult]) -> None:
    """Fixed rate at half of coturn's closed-loop rate with 100 allocations, measured in this
    run: from closed_loop_100 when it ran, else from one coturn closed loop measured here."""
    scenario = results[HALF_KNEE_SCENARIO]
    knee = results["closed_loop_100"].median("coturn").get("round_trips_per_s") \
        if "closed_loop_100" in results else None
    source = "closed_loop_100 (coturn median)"
    if not knee and "coturn" in plan.server_names:
        source = "one coturn closed loop measured for it"
        closed = [sc for sc in loop_scenarios(plan.sizes, plan.loop_options) if sc.name == "closed_loop_100"][0]
        server = _start(plan, "coturn", "coturn-knee", [], results, turnd_options=LOOP_TURND_OPTIONS)
        if server is not None:
            try:
                measured = measure_loop(server, closed.load, plan)
            finally:
                server.stop()
            _log_loop(plan, "[knee] coturn", "closed_loop_100", measured)
            knee = measured.get("round_trips_per_s") if "error" not in measured else None
    plan.half_knee = {"knee_round_trips_per_s": knee, "source": source,
                      "rate": round(knee / 2, 1) if knee else None}
    if not knee:
        for name in plan.server_names:
            scenario.add(name, {"error": "no coturn closed-loop rate to take half of"})
        return
    load = half_knee_load(plan.sizes, plan.loop_options, round(knee / 2, 1))
    scenario.title = (f"fixed rate {load.rate:,.0f} round trips/s: half of coturn's closed-loop rate "
                      f"({knee:,.0f}/s, {source}), {load.allocations} UDP allocations, ChannelData")
    for rep in range(plan.sizes.repeats):
        def one(name: str) -> None:
            progress = f"[{rep + 1}/{plan.sizes.repeats}] {name}"
            server = _start(plan, name, f"{name}-half-knee-{rep}", [HALF_KNEE_SCENARIO], results,
                            turnd_options=LOOP_TURND_OPTIONS)
            if server is None:
                return
            try:
                result = measure_loop(server, load, plan)
            finally:
                server.stop()
            scenario.add(name, result)
            _log_loop(plan, progress, HALF_KNEE_SCENARIO, result)
        _each(_order(plan, rep), one, plan.parallel)


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
            **plan.sizes.__dict__,
            # The first core of each list (kept from before lists), then the lists.
            "server_cpu": plan.server_cpus[0] if plan.server_cpus else None,
            "generator_cpu": plan.generator_cpu, "parallel": plan.parallel,
            "server_cpus": plan.server_cpus, "generator_cpus": plan.generator_cpus,
            "workers": plan.workers, "servers": list(plan.server_names), "turnd_env": plan.turnd_env,
            "turnd_variants": {name: servers.TURND_VARIANTS[name] for name in plan.server_names
                               if name in servers.TURND_VARIANTS},
            "fixed_rates": list(plan.loop_options.rates) or [plan.sizes.fixed_rate],
            "generator_threads": plan.loop_options.generator_threads,
            **({"half_knee": plan.half_knee} if plan.half_knee else {}),
        },
        "scenarios": {name: sc.as_dict(judge=not quick) for name, sc in results.items()},
    }


def all_scenario_names(loop_options: LoopOptions = LoopOptions()) -> list[str]:
    """The default set: every scenario that compares turnd with coturn."""
    return ([sc.name for sc in relay_scenarios(FULL)] + list(ALLOCATION_SCENARIOS)
            + [sc.name for sc in loop_scenarios(FULL, loop_options)] + [HALF_KNEE_SCENARIO])


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
    parser.add_argument("--workers", type=int,
                        help="turnd: 'workers = N' in its configuration (absent unless given); "
                             "coturn: --relay-threads N")
    parser.add_argument("--cores", help="CPUs the server may use, e.g. 0 or 0-3 (taskset list); the load "
                                        "generators get the remaining ones (default: first core, and the second)")
    parser.add_argument("--turnd-variant", action="append", choices=["pure"], default=[],
                        help="also measure turnd with TURND_PURE_PYTHON=1, as its own column 'turnd-pure'")
    parser.add_argument("--turnd-env", action="append", default=[], metavar="KEY=VALUE",
                        help="add to every turnd's environment (repeatable)")
    parser.add_argument("--rate", type=float, help="fixed_rate: round trips/s (default 15000; --quick 2000)")
    parser.add_argument("--rates", help="comma-separated round trips/s: fixed_rate becomes one scenario per rate, "
                                        "fixed_rate_<R> (a sweep for benchmarks/plots.py)")
    parser.add_argument("--window", type=int, help="closed loop: round trips in flight in total (default 256)")
    parser.add_argument("--loop-seconds", type=float,
                        help="closed loop and fixed rate: measured seconds after a 1 s warm-up (default 5)")
    parser.add_argument("--generator-threads", type=int,
                        help="threads of the C generator (default: one per generator core, at most 8)")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {k: v for k, v in (("repeats", args.repeats), ("allocations", args.allocations),
                                                   ("messages", args.messages)) if v is not None}
    if any(v < 1 for v in overrides.values()):
        parser.error("--repeats, --allocations and --messages must be at least 1")
    for key, value, low, high in (("fixed_rate", args.rate, 1.0, 1e7), ("loop_window", args.window, 1, 1 << 20),
                                  ("loop_duration_s", args.loop_seconds, 0.1, 600.0)):
        if value is not None:
            if not low <= value <= high:
                parser.error(f"--{key} must lie in {low:g}-{high:g}")
            overrides[key] = value
    sizes = Sizes(**{**sizes.__dict__, **overrides})
    rates: tuple[float, ...] = ()
    if args.rates:
        try:
            rates = tuple(sorted({float(r) for r in args.rates.split(",") if r.strip()}))
        except ValueError:
            parser.error("--rates takes comma-separated numbers")
        if not rates or any(not 1 <= r <= 1e7 for r in rates):
            parser.error("--rates must lie in 1-10000000")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    turnd_env: dict[str, str] = {}
    for item in args.turnd_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--turnd-env takes KEY=VALUE, not {item!r}")
        turnd_env[key] = value

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = generator_cpus = None
    if args.cores:
        try:
            server_cpus = servers.parse_cpu_list(args.cores)
        except ValueError as exc:
            parser.error(f"--cores: {exc}")
        if not set(server_cpus) <= set(cpus):
            parser.error(f"--cores: this process may use only CPUs {cpus}")
        generator_cpus = [c for c in cpus if c not in server_cpus] or None
        if generator_cpus is None:
            print("--cores leaves no CPU for the load generators: they share the server's", file=sys.stderr)
    elif len(cpus) >= 2 and not args.quick:
        server_cpus, generator_cpus = [cpus[0]], [cpus[1]]
    if args.generator_threads is not None and not 1 <= args.generator_threads <= 64:
        parser.error("--generator-threads must lie in 1-64")
    generator_threads = args.generator_threads or min(8, len(generator_cpus or [0]))
    loop_options = LoopOptions(rates=rates, generator_threads=generator_threads)

    names = all_scenario_names(loop_options)
    selected = set(names)
    if args.only:
        selected = {s.strip() for s in args.only.split(",") if s.strip()}
        if rates and "fixed_rate" in selected:
            selected = (selected - {"fixed_rate"}) | set(fixed_rate_names(loop_options))
        unknown = selected - set(names) - set(OPT_IN_SCENARIOS)
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    names += [n for n in OPT_IN_SCENARIOS if n in selected]
    server_names: tuple[str, ...] = servers.SERVER_NAMES
    if args.turnd_variant:
        server_names = (*server_names, *(f"turnd-{v}" for v in dict.fromkeys(args.turnd_variant)))
    if not servers.coturn_available():
        if selected - set(OPT_IN_SCENARIOS):
            print("coturn is not installed (turnserver, turnutils_uclient): nothing to compare against",
                  file=sys.stderr)
            return 2
        # under_attack alone needs no coturn
        server_names = tuple(n for n in server_names if n != "coturn")

    if generator_cpus:
        # This process is the allocation client: keep it off the server's cores too.
        os.sched_setaffinity(0, set(generator_cpus))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="turnd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = Plan(sizes, selected, workdir, server_cpus, generator_cpus, parallel=args.quick,
                log=lambda msg: print(msg, file=sys.stderr, flush=True), server_names=server_names,
                workers=args.workers, turnd_env=turnd_env, loop_options=loop_options)
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
