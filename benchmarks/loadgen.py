"""Relay throughput with coturn's own C client, ``turnutils_uclient``, as the load generator.

How the client paces itself (it shapes how it is measured): with ``-y`` it pairs its sessions
(allocation to allocation); every session starts sending at a random moment 1 to 6 s after the
last allocation is set up and then sends one message every ``-z`` ms (catching up in bursts of
up to 50 when late), ``-n`` messages in all. It prints its running totals about once a second
and, at the end, totals it rounds to whole seconds, so its own "total transmit time" is useless
as a clock. And it exits 0 even at 100 % loss.

So the runner reads the once-a-second totals as they arrive, stamps each with its own monotonic
clock and the CPU time the server and the generator have used so far, and takes the
measurement from the *plateau*: the run of consecutive samples in which the most messages were
sent, i.e. when every session was sending at once. In that window it reports the delivered
rate, the loss and the server's CPU time per delivered message.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import procfs
from .servers import HOST, ServerUnderTest, pinned

_PROGRESS = re.compile(r"msz=(\d+), tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
_FINAL = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
_LOST = re.compile(r"Total lost packets (\d+)")
# After the last message is sent the client waits up to 10 s for stragglers when some were
# lost; once nothing more has arrived for this long, the run is over and it is stopped.
STALL_S = 2.0
# The sessions' random start spread (1 to 6 s) plus margin, on top of connect and send time.
START_SPREAD_S = 6.0
# turnutils_uclient's flags for the client-to-server leg; the relay leg is UDP in every case.
TRANSPORT_FLAGS: dict[str, list[str]] = {"udp": [], "tcp": ["-t"], "tls": ["-t", "-S"]}


@dataclass(frozen=True)
class Load:
    """One load shape: ``clients`` sessions (even: they pair up), each sending ``messages``
    messages of ``length`` bytes every ``interval_ms`` ms."""

    clients: int
    messages: int
    length: int
    interval_ms: int = 1
    flags: tuple[str, ...] = ("-y", "-c")  # allocation to allocation, no RTCP sessions
    transport: str = "udp"  # client to server: "udp", "tcp" or "tls" (TLS over TCP)

    @property
    def offered_msgs_per_s(self) -> float:
        return self.clients * 1000.0 / max(self.interval_ms, 1)

    @property
    def send_seconds(self) -> float:
        return self.messages * max(self.interval_ms, 1) / 1000.0

    def command(self, server: ServerUnderTest) -> list[str]:
        # -S alone would be DTLS: TLS is -t -S. uclient verifies no certificate without -E.
        transport_flags = TRANSPORT_FLAGS[self.transport]
        return [
            "turnutils_uclient", *self.flags, *transport_flags,
            "-m", str(self.clients), "-n", str(self.messages), "-l", str(self.length),
            "-z", str(self.interval_ms), "-W", server.secret, "-u", "bench",
            "-p", str(server.ports[self.transport]), HOST,
        ]


@dataclass
class Sample:
    t: float  # monotonic seconds
    sent: int
    received: int
    server_cpu_s: float
    generator_cpu_s: float


@dataclass
class Plateau:
    seconds: float
    sent: int
    received: int
    server_cpu_s: float
    generator_cpu_s: float


@dataclass
class UclientRun:
    command: list[str]
    samples: list[Sample] = field(default_factory=list)
    final_sent: int | None = None
    final_received: int | None = None
    reported_lost: int | None = None
    exit_code: int | None = None
    stopped_early: bool = False
    timed_out: bool = False
    wall_s: float = 0.0
    output_tail: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        if self.final_sent is not None:
            return self.final_sent
        return self.samples[-1].sent if self.samples else 0

    @property
    def received(self) -> int:
        if self.final_received is not None:
            return self.final_received
        return self.samples[-1].received if self.samples else 0


def parse_progress(line: str) -> tuple[int, int] | None:
    """``(sent, received)`` from one of the client's once-a-second progress lines."""
    match = _PROGRESS.search(line)
    return (int(match.group(2)), int(match.group(3))) if match else None


def parse_final(line: str) -> tuple[int, int] | None:
    """``(sent, received)`` from the client's closing totals line."""
    if "msz=" in line:
        return None
    match = _FINAL.search(line)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_lost(line: str) -> int | None:
    match = _LOST.search(line)
    return int(match.group(1)) if match else None


def find_plateau(samples: list[Sample], intervals: int) -> Plateau | None:
    """The ``intervals`` consecutive sample intervals in which the most messages were sent.

    Fewer samples than that: the whole span. None when nothing was sent at all.
    """
    if len(samples) < 2:
        return None
    intervals = max(1, min(intervals, len(samples) - 1))
    best: tuple[int, int] | None = None
    for i in range(len(samples) - intervals):
        sent = samples[i + intervals].sent - samples[i].sent
        if best is None or sent > best[0]:
            best = (sent, i)
    assert best is not None
    if best[0] <= 0:
        return None
    a, b = samples[best[1]], samples[best[1] + intervals]
    return Plateau(
        seconds=b.t - a.t, sent=b.sent - a.sent, received=b.received - a.received,
        server_cpu_s=b.server_cpu_s - a.server_cpu_s,
        generator_cpu_s=b.generator_cpu_s - a.generator_cpu_s,
    )


def run_uclient(server: ServerUnderTest, load: Load, *, cpu: int | None,
                timeout_s: float | None = None) -> UclientRun:
    """Run the client once against ``server``; every wait is bounded by ``timeout_s``."""
    command = pinned(load.command(server), cpu)
    if timeout_s is None:
        # Sessions are set up about 10 per second (the client sleeps between them).
        timeout_s = load.clients * 0.15 + START_SPREAD_S + load.send_seconds + 30.0
    run = UclientRun(command)
    lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put((time.monotonic(), raw.decode(errors="replace").rstrip()))
        lines.put(None)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    expected = load.clients * load.messages
    last_change = time.monotonic()
    tail: list[str] = []
    deadline = started + timeout_s
    eof = False
    while not eof:
        now = time.monotonic()
        if now >= deadline:
            run.timed_out = True
            break
        if run.samples and run.samples[-1].sent >= expected and now - last_change >= STALL_S:
            run.stopped_early = True
            break
        try:
            item = lines.get(timeout=min(0.25, max(0.01, deadline - now)))
        except queue.Empty:
            continue
        if item is None:
            eof = True
            break
        stamp, line = item
        tail = (tail + [line])[-40:]
        progress = parse_progress(line)
        if progress is not None:
            # CPU read on arrival, so CPU and message counts describe the same instant.
            sample = Sample(stamp, progress[0], progress[1], server.cpu_seconds(),
                            procfs.cpu_seconds(proc.pid))
            if not run.samples or (sample.sent, sample.received) != (run.samples[-1].sent,
                                                                     run.samples[-1].received):
                last_change = stamp
            run.samples.append(sample)
            continue
        final = parse_final(line)
        if final is not None:
            run.final_sent, run.final_received = final
            # Also a last sample: a short run can send everything after the last progress line.
            run.samples.append(Sample(stamp, final[0], final[1], server.cpu_seconds(),
                                      procfs.cpu_seconds(proc.pid)))
            continue
        lost = parse_lost(line)
        if lost is not None:
            run.reported_lost = lost
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    run.exit_code = proc.wait(timeout=5)
    thread.join(timeout=5)
    run.wall_s = time.monotonic() - started
    run.output_tail = tail
    return run


def summarize(run: UclientRun, load: Load, *, plateau_intervals: int) -> dict[str, Any]:
    """The numbers one run contributes to its scenario (see README: how to read them)."""
    plateau = find_plateau(run.samples, plateau_intervals)
    out: dict[str, Any] = {
        "sent": run.sent,
        "received": run.received,
        "loss_pct": _pct(run.sent - run.received, run.sent),
        "exit_code": run.exit_code,
        "stopped_early": run.stopped_early,
        "timed_out": run.timed_out,
        "wall_s": round(run.wall_s, 2),
        "offered_msgs_per_s": load.offered_msgs_per_s,
    }
    if plateau is None or plateau.seconds <= 0:
        out["error"] = "no message was sent"
        out["output_tail"] = run.output_tail
        return out
    delivered = max(plateau.received, 0)
    rate = delivered / plateau.seconds
    out.update({
        "plateau_s": round(plateau.seconds, 3),
        "plateau_sent_msgs_per_s": round(plateau.sent / plateau.seconds, 1),
        "delivered_msgs_per_s": round(rate, 1),
        "delivered_mbit_per_s": round(rate * load.length * 8 / 1e6, 3),
        "plateau_loss_pct": _pct(plateau.sent - delivered, plateau.sent),
        "server_cpu_pct": round(100.0 * plateau.server_cpu_s / plateau.seconds, 1),
        "generator_cpu_pct": round(100.0 * plateau.generator_cpu_s / plateau.seconds, 1),
        # CPU per delivered message: the inverse of what one core could relay at this load.
        "server_cpu_us_per_msg": (round(1e6 * plateau.server_cpu_s / delivered, 2)
                                  if delivered and plateau.server_cpu_s > 0 else None),
        # CPU per message the client sent. Over TLS the client counts one message per TLS
        # record it reads, so a server that packs several messages into one record looks lossy
        # and its CPU per delivered message too high; per sent message it does not.
        "server_cpu_us_per_sent_msg": (round(1e6 * plateau.server_cpu_s / plateau.sent, 2)
                                       if plateau.server_cpu_s > 0 else None),
    })
    if run.sent == 0 or run.received == 0:
        out["error"] = "nothing was relayed"
        out["output_tail"] = run.output_tail
    return out


def _pct(part: int, whole: int) -> float:
    return round(100.0 * max(part, 0) / whole, 3) if whole else 0.0
