"""Closed-loop and fixed-rate relay load from a small C generator (benchmarks/relayload.c).

This module sets up the allocations in Python, on this project's STUN codec: one UDP socket per
allocation on 127.0.0.1, each through the 401 dance (RFC 8656 §7.1, RFC 8489 §9.2.4) with TURN
REST credentials, then one ChannelBind (which installs the permission too, RFC 8656 §12) toward
a plain UDP "peer" socket on 127.0.0.1, or with ``method="send"`` one CreatePermission. Requests
are pipelined (a bounded number in flight) and retransmitted a bounded number of times.

Then it connects every client socket to the server and hands all the sockets, client and peer,
to the generator as inherited file descriptors. The generator (compiled here with ``gcc -O2``
into a temporary directory, never committed) sends ChannelData from the clients (or Send
indications), echoes every datagram that reaches a peer back to the relayed address it came
from, and times each round trip: two relayed datagrams. It runs a closed loop (W round trips in
flight in total) or a paced fixed rate, for a warm-up and then a measured window, and reports
in JSON. While it runs, this process reads the server's CPU time at the window's edges (the
generator prints them), so CPU per relayed datagram covers exactly the measured window.

Every address is 127.0.0.1, every wait is bounded, and the generator has a hard time limit.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from turnserver.auth import long_term_key
from turnserver.credentials import mint_credentials
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message
from turnserver.stun.errors import StunDecodeError
from turnserver.turn.core import REQUESTED_TRANSPORT_UDP

from .servers import HOST, ServerUnderTest, pinned

SOURCE = Path(__file__).resolve().with_name("relayload.c")
# In both servers' channel ranges: RFC 8656's 0x4000-0x4FFF and coturn 4.6.1's 0x4000-0x7FFF.
# Each allocation has its own channel numbers, so every one can use the first.
CHANNEL = 0x4000
RETRANSMIT_S = 0.5
MAX_ATTEMPTS = 4
MAX_CHALLENGES = 3
LIFETIME_S = 600
SETUP_IN_FLIGHT = 64
SETUP_TIMEOUT_S = 120.0
RELEASE_TIMEOUT_S = 5.0
# What the generator may take beyond its own timeline before it is stopped.
RUN_MARGIN_S = 15.0

Address = tuple[str, int]


# ------------------------------------------------------------------------------ the generator


_built: dict[str, Path] = {}
_build_lock = threading.Lock()


def build() -> Path:
    """Compile relayload.c once per process into a temporary directory; RuntimeError without gcc."""
    with _build_lock:
        if "binary" in _built:
            return _built["binary"]
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("no C compiler (gcc) to build benchmarks/relayload.c")
        outdir = Path(tempfile.mkdtemp(prefix="relayload-"))
        atexit.register(shutil.rmtree, outdir, True)
        binary = outdir / "relayload"
        proc = subprocess.run([gcc, "-O2", "-Wall", "-pthread", "-o", str(binary), str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"building relayload.c failed:\n{proc.stderr[-2000:]}")
        _built["binary"] = binary
        return binary


@dataclass(frozen=True)
class LoopLoad:
    """One load: ``allocations`` client sockets, each with one channel (or permission) toward
    one of ``peers`` peer sockets. ``mode`` "closed": ``window`` round trips in flight in total;
    "rate": ``rate`` round trips per second in total, paced."""

    allocations: int
    mode: str = "closed"
    window: int = 256
    rate: float = 15_000.0
    duration_s: float = 5.0
    warmup_s: float = 1.0
    payload: int = 200
    method: str = "channel"  # or "send": Send indications in, Data indications out
    peers: int = 16
    threads: int = 1
    drain_s: float = 0.5
    loss_timeout_ms: float = 200.0

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "rate") or self.method not in ("channel", "send"):
            raise ValueError(f"unknown mode {self.mode!r} or method {self.method!r}")
        if self.allocations < 1 or self.threads < 1 or self.threads > min(64, self.allocations):
            raise ValueError("need at least one allocation per generator thread (at most 64 threads)")

    def arguments(self, spec: Path) -> list[str]:
        return ["--spec", str(spec), "--mode", self.mode, "--method", self.method,
                "--window", str(self.window), "--rate", f"{self.rate:g}",
                "--duration", f"{self.duration_s:g}", "--warmup", f"{self.warmup_s:g}",
                "--drain", f"{self.drain_s:g}", "--payload", str(self.payload),
                "--loss-timeout-ms", f"{self.loss_timeout_ms:g}"]


# ------------------------------------------------------------------------------ allocations


@dataclass
class _Flow:
    """One allocation being set up (or released): its socket and the request in flight."""

    index: int
    sock: socket.socket
    peer: Address
    thread: int = 0  # the generator thread that drives it
    step: str = "allocate"  # allocate -> bind -> done; release -> done
    request: Message | None = None
    nonce: str | None = None
    realm: str = ""
    relayed: Address | None = None
    wire: bytes = b""  # the request as sent, for retransmission
    sent_at: float = 0.0
    attempts: int = 0
    challenges: int = 0


@dataclass
class Prepared:
    """Allocations ready for the generator, and what setting them up took."""

    flows: list[_Flow] = field(default_factory=list)
    peers: list[socket.socket] = field(default_factory=list)
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    setup_s: float = 0.0

    def close(self) -> None:
        for flow in self.flows:
            flow.sock.close()
        for peer in self.peers:
            peer.close()
        self.flows.clear()
        self.peers.clear()


class _Pipeline:
    """Bounded in-flight STUN transactions over many client sockets, with retransmission."""

    def __init__(self, server: ServerUnderTest, username: str, password: str) -> None:
        self.address: Address = (HOST, server.ports["udp"])
        self.username, self.password = username, password
        self.default_realm = server.realm
        self.keys: dict[str, bytes] = {}

    def key(self, realm: str) -> bytes:
        if realm not in self.keys:
            self.keys[realm] = long_term_key(self.username, realm, self.password)
        return self.keys[realm]

    def encode(self, flow: _Flow, method: int, attrs: list[tuple[int, object]]) -> bytes:
        msg = Message(method, MessageClass.REQUEST, attributes=list(attrs))
        flow.request = msg
        if flow.nonce is None:
            return encode_message(msg)
        signed = Message(method, MessageClass.REQUEST, msg.transaction_id,
                         [*msg.attributes, (Attr.USERNAME, self.username), (Attr.REALM, flow.realm),
                          (Attr.NONCE, flow.nonce)])
        return encode_message(signed, key=self.key(flow.realm))


def _request(flow: _Flow, method: str) -> tuple[int, list[tuple[int, object]]]:
    if flow.step == "allocate":
        return Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, REQUESTED_TRANSPORT_UDP), (Attr.LIFETIME, LIFETIME_S)]
    if flow.step == "bind":
        if method == "send":
            return Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, flow.peer)]
        return Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, CHANNEL), (Attr.XOR_PEER_ADDRESS, flow.peer)]
    if flow.step == "release":
        return Method.REFRESH, [(Attr.LIFETIME, 0)]
    raise ValueError(flow.step)


def _drive(pipe: _Pipeline, flows: list[_Flow], method: str, *, in_flight: int, timeout_s: float,
           steps: dict[str, str]) -> tuple[list[_Flow], dict[str, int]]:
    """Run every flow through ``steps`` (step -> next step, "done" ends it). Returns the flows
    that reached "done" and the reasons of those that did not."""
    selector = selectors.DefaultSelector()
    waiting = list(reversed(flows))
    active: dict[int, _Flow] = {}
    done: list[_Flow] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s

    def transmit(flow: _Flow, fresh: bool) -> None:
        if fresh:
            flow.attempts = 0
            method_, attrs = _request(flow, method)
            flow.wire = pipe.encode(flow, method_, attrs)
        flow.attempts += 1
        flow.sent_at = time.monotonic()
        try:
            flow.sock.sendto(flow.wire, pipe.address)
        except OSError:
            pass  # a full buffer is a lost datagram: the retransmission covers it

    def finish(flow: _Flow, reason: str | None) -> None:
        selector.unregister(flow.sock)
        del active[flow.index]
        if reason is None:
            done.append(flow)
        else:
            errors[reason] = errors.get(reason, 0) + 1

    try:
        while (waiting or active) and time.monotonic() < deadline:
            while waiting and len(active) < in_flight:
                flow = waiting.pop()
                active[flow.index] = flow
                selector.register(flow.sock, selectors.EVENT_READ, flow)
                transmit(flow, fresh=True)
            for key, _ in selector.select(timeout=0.05):
                flow = key.data
                try:
                    data = flow.sock.recv(4096)
                except OSError:
                    continue
                if not data or data[0] >= 0x40:
                    continue  # ChannelData: not an answer
                try:
                    reply = decode_message(data)
                except StunDecodeError:
                    continue
                if flow.request is None or reply.transaction_id != flow.request.transaction_id:
                    continue  # a late answer to a retransmission
                if reply.msg_class == MessageClass.SUCCESS:
                    if flow.step == "allocate":
                        relayed = reply.get(Attr.XOR_RELAYED_ADDRESS)
                        if isinstance(relayed, tuple):
                            flow.relayed = (str(relayed[0]), int(relayed[1]))
                    flow.step = steps[flow.step]
                    if flow.step == "done":
                        finish(flow, None)
                    else:
                        transmit(flow, fresh=True)
                    continue
                code = reply.get(Attr.ERROR_CODE)
                status = code[0] if isinstance(code, tuple) else None
                nonce = reply.get(Attr.NONCE)
                # 401 teaches REALM and NONCE once; 438 (stale nonce) a fresh NONCE.
                if status in (401, 438) and nonce is not None and flow.challenges < MAX_CHALLENGES \
                        and (status == 438 or flow.nonce is None):
                    flow.challenges += 1
                    flow.nonce = str(nonce)
                    flow.realm = str(reply.get(Attr.REALM) or flow.realm or pipe.default_realm)
                    transmit(flow, fresh=True)
                    continue
                if flow.step == "release":
                    finish(flow, None)  # 437: already gone; either way it no longer holds a port
                    continue
                finish(flow, f"{flow.step}_{status}" if status is not None else f"{flow.step}_unexpected")
            now = time.monotonic()
            for flow in list(active.values()):
                if now - flow.sent_at >= RETRANSMIT_S:
                    if flow.attempts >= MAX_ATTEMPTS:
                        finish(flow, f"{flow.step}_timeout")
                    else:
                        transmit(flow, fresh=False)
    finally:
        for flow in list(active.values()):
            finish(flow, f"{flow.step}_deadline")
        selector.close()
    return done, errors


def _loopback_udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((HOST, 0))
    return sock


def _ensure_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def prepare(server: ServerUnderTest, load: LoopLoad, *, user: str = "loop") -> Prepared:
    """``load.allocations`` allocations on ``server``, each bound toward one peer socket."""
    _ensure_fd_limit(load.allocations + load.peers + 256)
    creds = mint_credentials(server.secret, user, 3600)
    pipe = _Pipeline(server, creds.username, creds.password)
    out = Prepared()
    started = time.monotonic()
    peers_per_thread = _split(max(min(load.peers, load.allocations), load.threads), load.threads)
    allocs_per_thread = _split(load.allocations, load.threads)
    flows: list[_Flow] = []
    try:
        for thread in range(load.threads):
            mine = [_loopback_udp() for _ in range(peers_per_thread[thread])]
            out.peers.extend(mine)
            for j in range(allocs_per_thread[thread]):
                peer = mine[j % len(mine)].getsockname()
                flows.append(_Flow(len(flows), _loopback_udp(), (str(peer[0]), int(peer[1])), thread))
        done, errors = _drive(pipe, flows, load.method, in_flight=SETUP_IN_FLIGHT, timeout_s=SETUP_TIMEOUT_S,
                              steps={"allocate": "bind", "bind": "done"})
    except BaseException:
        for flow in flows:
            flow.sock.close()
        out.close()
        raise
    ready = {id(f) for f in done}
    for flow in flows:
        if id(flow) not in ready:
            flow.sock.close()
    out.flows = sorted(done, key=lambda f: f.index)
    out.failed = len(flows) - len(done)
    out.errors = errors
    out.setup_s = time.monotonic() - started
    # The server answers from the address the client sent to: connect, so the generator can
    # send without an address and the kernel keeps anything else out.
    for flow in out.flows:
        flow.sock.connect(pipe.address)
    return out


def release(server: ServerUnderTest, prepared: Prepared, *, user: str = "loop") -> int:
    """Refresh(LIFETIME 0) every allocation (best effort, bounded), then close every socket.
    Returns how many the server confirmed (or no longer had)."""
    if not prepared.flows:
        prepared.close()
        return 0
    creds = mint_credentials(server.secret, user, 3600)
    pipe = _Pipeline(server, creds.username, creds.password)
    flows = prepared.flows
    for flow in flows:
        flow.step, flow.challenges = "release", 0
        flow.sock.setblocking(False)
    try:
        done, _ = _drive(pipe, flows, "channel", in_flight=SETUP_IN_FLIGHT, timeout_s=RELEASE_TIMEOUT_S,
                         steps={"release": "done"})
    finally:
        prepared.close()
    return len(done)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------------------ one run


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU, (busy, total) clock ticks from /proc/stat since boot.

    Busy is everything but idle and iowait, so it includes the softirq time of the loopback
    path, which the kernel may not charge to any process: a core near 100 % busy here is
    saturated even when the processes on it show less in their own CPU time.
    """
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                total = sum(ticks)
                out[int(name[3:])] = (total - ticks[3] - ticks[4], total)
    except (OSError, ValueError):
        pass
    return out


def busy_pct(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
             cpus: Sequence[int]) -> float | None:
    """The busiest of ``cpus`` between two :func:`cpu_times` readings, in percent."""
    values = []
    for cpu in cpus:
        if cpu in before and cpu in after and after[cpu][1] > before[cpu][1]:
            values.append(100.0 * (after[cpu][0] - before[cpu][0]) / (after[cpu][1] - before[cpu][1]))
    return round(max(values), 1) if values else None


@dataclass
class _Events:
    """What the generator printed, each line stamped with this clock and the server's CPU."""

    marks: dict[str, tuple[float, float, dict[int, tuple[int, int]]]] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    other: list[str] = field(default_factory=list)


def run_generator(server: ServerUnderTest, prepared: Prepared, load: LoopLoad, *,
                  cpus: int | Sequence[int] | None, workdir: Path) -> dict[str, Any]:
    """Run relayload.c once over ``prepared``; its JSON result plus the server's CPU in the window."""
    binary = build()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / f"relayload-{os.getpid()}-{time.monotonic_ns()}.spec"
    lines = []
    peer_threads = _split(len(prepared.peers), load.threads)
    index = 0
    for thread, count in enumerate(peer_threads):
        for peer in prepared.peers[index:index + count]:
            lines.append(f"p {thread} {peer.fileno()}")
        index += count
    for flow in prepared.flows:
        lines.append(f"c {flow.thread} {flow.sock.fileno()} {CHANNEL} {flow.peer[1]}")
    spec.write_text("\n".join(lines) + "\n")
    fds = [p.fileno() for p in prepared.peers] + [f.sock.fileno() for f in prepared.flows]
    command = pinned([str(binary), *load.arguments(spec)], cpus)
    timeout_s = load.warmup_s + load.duration_s + load.drain_s + RUN_MARGIN_S
    events = _Events()
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, pass_fds=fds)

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            stamp = time.monotonic()
            line = raw.decode(errors="replace").strip()
            try:
                doc = json.loads(line)
            except ValueError:
                events.other.append(line)
                continue
            if isinstance(doc, dict) and "event" in doc:
                # Read on arrival: the generator printed it at the window's edge.
                events.marks[str(doc["event"])] = (stamp, server.cpu_seconds(), cpu_times())
            elif isinstance(doc, dict):
                events.result = doc

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait(timeout=5)
    thread.join(timeout=5)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    spec.unlink(missing_ok=True)
    out: dict[str, Any] = {"generator_exit_code": proc.returncode, "wall_s": round(time.monotonic() - started, 2)}
    if timed_out or proc.returncode != 0 or events.result is None:
        out["error"] = (f"generator {'timed out' if timed_out else f'exited with {proc.returncode}'}: "
                        f"{(stderr or ' '.join(events.other))[-500:].strip()}")
        return out
    out["generator"] = events.result
    start, end = events.marks.get("window_start"), events.marks.get("window_end")
    if start and end and end[0] > start[0]:
        out["server_window_s"] = round(end[0] - start[0], 4)
        out["server_cpu_s"] = round(end[1] - start[1], 4)
        out["cores_busy_pct"] = {str(cpu): busy_pct(start[2], end[2], [cpu]) for cpu in sorted(end[2])}
    return out


def summarize(raw: dict[str, Any], load: LoopLoad, prepared: Prepared, *,
              server_cpus: Sequence[int] = (), generator_cpus: Sequence[int] = ()) -> dict[str, Any]:
    """The flat numbers one run contributes to its scenario."""
    out: dict[str, Any] = {
        "allocations": len(prepared.flows), "setup_failed": prepared.failed,
        "setup_s": round(prepared.setup_s, 3), "mode": load.mode, "method": load.method,
        "payload_bytes": load.payload, "generator_threads": load.threads,
    }
    if load.mode == "closed":
        out["window"] = load.window
    else:
        out["offered_round_trips_per_s"] = load.rate
    if prepared.errors:
        out["setup_errors"] = prepared.errors
    if "error" in raw:
        out["error"] = raw["error"]
        return out
    gen = raw["generator"]
    rtps = float(gen["round_trips_per_s"])
    sent, received = int(gen["sent"]), int(gen["received"])
    latency = gen.get("latency_us", {})
    out.update({
        "round_trips_per_s": round(rtps, 1),
        # What the generator sent in the window, per second: the offered rate it achieved.
        "sent_round_trips_per_s": round(sent / load.duration_s, 1),
        # Each round trip is two relayed datagrams: client -> peer and peer -> client.
        "relayed_datagrams_per_s": round(2 * rtps, 1),
        "sent": sent, "received": received, "lost": int(gen["lost"]),
        "loss_pct": round(100.0 * int(gen["lost"]) / sent, 3) if sent else None,
        "late": int(gen["late"]), "duplicates": int(gen["duplicates"]),
        "send_errors": int(gen["send_errors"]), "bad": int(gen["bad"]),
        "latency_p50_us": _latency(latency.get("p50")),
        "latency_p99_us": _latency(latency.get("p99")),
        "latency_p999_us": _latency(latency.get("p999")),
        "latency_max_us": _latency(latency.get("max")),
        "latency_mean_us": _latency(latency.get("mean")),
        "generator_cpu_pct": gen.get("generator_cpu_pct"),
        "generator_cpu_s": gen.get("generator_cpu_s"),
        "window_s": gen.get("window_s"),
    })
    cpu_s, window_s = raw.get("server_cpu_s"), raw.get("server_window_s")
    relayed = 2 * received
    if cpu_s is not None and window_s:
        out["server_cpu_pct"] = round(100.0 * cpu_s / window_s, 1)
        out["server_cpu_us_per_datagram"] = round(1e6 * cpu_s / relayed, 3) if relayed and cpu_s > 0 else None
    else:
        out["server_cpu_pct"] = out["server_cpu_us_per_datagram"] = None
    cores = raw.get("cores_busy_pct") or {}
    # The busiest core of each side, softirq included (see cpu_times).
    for key, cpus in (("server_core_busy_pct", server_cpus), ("generator_core_busy_pct", generator_cpus)):
        values = [cores[str(c)] for c in cpus if cores.get(str(c)) is not None]
        out[key] = max(values) if values else None
    if not out["allocations"] or received == 0:
        out["error"] = (f"nothing came back ({sent} sent)" if out["allocations"]
                        else f"no allocation was set up: {prepared.errors}")
    elif gen.get("error"):
        out["error"] = str(gen["error"])
    return out


def _latency(value: object) -> float | None:
    return round(float(value), 1) if isinstance(value, (int, float)) and value >= 0 else None


def measure(server: ServerUnderTest, load: LoopLoad, *, cpus: Sequence[int] | None,
            server_cpus: Sequence[int] | None, workdir: Path) -> dict[str, Any]:
    """Set up, run, release: one measurement of ``load`` against ``server``; the generator runs
    on ``cpus`` (None: anywhere), the server on ``server_cpus``."""
    prepared = prepare(server, load)
    try:
        if not prepared.flows:
            raw: dict[str, Any] = {"error": f"no allocation was set up: {prepared.errors}"}
        else:
            try:
                raw = run_generator(server, prepared, load, cpus=cpus, workdir=workdir)
            except RuntimeError as exc:  # no compiler, or the build failed
                raw = {"error": str(exc).splitlines()[0]}
        result = summarize(raw, load, prepared, server_cpus=server_cpus or (),
                           generator_cpus=cpus or ())
    finally:
        released = release(server, prepared)
    result["released"] = released
    return result
