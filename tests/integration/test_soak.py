"""Soak: thousands of allocations come and go while a reference call relays, and afterwards the
server holds what it held before: memory, file descriptors, allocation and relay-port gauges.

Every allocation goes through the whole life a real client gives it, pipelined from many client
ports at once (each allocation needs its own 5-tuple, RFC 8656 §7.2): Allocate (the 401
challenge, then the signed request), Refresh, CreatePermission, ChannelBind, one ChannelData to
a peer, and then either Refresh with LIFETIME 0 (deleted) or silence (it expires at its short
lifetime). Meanwhile a reference call, two allocations exchanging ChannelData at 50 packets/s
each way, refreshes itself and must lose less than 1 %.

The short form (the normal suite) runs about 1,500 allocations in well under a minute. The long
form runs tens of thousands over several minutes:

    TURN_LONG_TESTS=1 python3 -m pytest -q -p no:cacheprovider tests/integration/test_soak.py

All traffic stays on 127.0.0.0/8; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import os
import select
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from turnserver.auth import long_term_key
from turnserver.stun import (
    Attr,
    Message,
    MessageClass,
    Method,
    decode_message,
    encode_channel_data,
    encode_message,
)
from turnserver.stun.errors import StunDecodeError

from .raw_client import RawTurnClient, code
from .server import RunningServer
from .test_metrics import Scrape, scrape

# Not TURND_*: the server, which inherits the environment, reads those as its options.
LONG = os.environ.get("TURN_LONG_TESTS", "") not in ("", "0")

PEER_IP = "127.0.0.2"  # loopback but not the relay address: let through by allowed_peers only
# The churning clients come from many loopback addresses, as many clients do: a server may well
# limit the unauthenticated answers (401 challenges) it sends to any one address.
CLIENT_IPS = tuple(f"127.0.1.{n}" for n in range(1, 65))
# This file's own relay range, apart from the one tests/integration/server.py gives the others.
SOAK_RELAY_PORTS = (54000, 55999)
LIFETIME_S = 5  # default and granted lifetime of the soak allocations
MAX_LIFETIME_S = 10  # what the reference call asks for, refreshing every REF_REFRESH_S
REF_REFRESH_S = 2.0
REF_REBIND_S = 60.0  # channels (600 s) and permissions (300 s) of the reference, renewed
REF_RATE = 50  # ChannelData per second, each way
REF_PAYLOAD = 160  # a 20 ms audio frame
RETRANSMIT_S = 0.5
MAX_ATTEMPTS = 5
MAX_CHALLENGES = 3

# Short form: enough allocations that a leak of a couple of KiB per allocation shows; long
# form: five minutes of churn. The warm-up runs first at the same rate, so what the server grows
# once (allocator pools, caches, lazily built code paths) is in the baseline.
COUNT = 30000 if LONG else 1500
WARMUP = 1200 if LONG else 900
# Allocations started per second: a steady churn. The allocations alive at once (RATE / 2 *
# LIFETIME_S left to expire, plus those in flight) set the allocator's high-water mark, so
# they must be as many in the warm-up as in the measured run: MAX_LIVE caps them, so that a
# run that fell behind (a loaded machine) does not catch up with a crowd of its own.
RATE = 100 if LONG else 150
CONCURRENCY = 48
MAX_LIVE = RATE // 2 * (LIFETIME_S + 1) + CONCURRENCY
RUN_TIMEOUT_S = 900.0 if LONG else 45.0

# The bound on RSS growth, measured first on a 2-core machine, after the warm-up, once every
# allocation had ended: short form +176 to +436 KiB across 1,500 allocations (the last with
# two busy loops competing for the CPUs), long form +312 KiB across 30,000, when an ended
# allocation is let go at once; +4,176 and +4,184 KiB for 1,500 (2.8 KiB per allocation,
# 82 MiB for 30,000) when the deadline heap keeps each ended allocation, with its permission
# and channel, until their old deadlines (300 and 600 s). 2 MiB (4 MiB for the long form) sits
# well between the two.
RSS_BOUND_KIB = 4096 if LONG else 2048


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape_now(server: RunningServer) -> Scrape:
    return asyncio.run(scrape(server))


def timer_gauges(now: Scrape) -> dict[str, float]:
    """Samples of any gauge about the core's deadline heap (a name with "timer" or "heap")."""
    return {name: value for (name, labels), value in now.samples.items()
            if ("timer" in name or "heap" in name) and not name.endswith(("_total", "_created"))}


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def soak_options(**extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "metrics_listen": "127.0.0.1:0",
        "relay_port_min": SOAK_RELAY_PORTS[0],
        "relay_port_max": SOAK_RELAY_PORTS[1],
        "default_lifetime_s": LIFETIME_S,
        "max_lifetime_s": MAX_LIFETIME_S,
        "allowed_peers": [f"{PEER_IP}/32"],
        # Nothing beyond loopback is ever relayed to, whatever a client asks.
        "denied_peers": ["0.0.0.0/0", "::/0"],
        "log_level": "warning",  # thousands of usage records would only fill the log
    }
    options.update(extra)
    return options


# --------------------------------------------------------------------------- reference call


class ReferenceCall:
    """Two allocations sending each other ChannelData at REF_RATE packets/s each way, on a
    thread of its own, refreshing their allocations (and, on long runs, channels) meanwhile."""

    def __init__(self, server: RunningServer) -> None:
        self.a = RawTurnClient(server.address("udp"), *server.credentials("reference-a"))
        self.b = RawTurnClient(server.address("udp"), *server.credentials("reference-b"))
        replies = [client.allocate(LIFETIME=MAX_LIFETIME_S) for client in (self.a, self.b)]
        assert [code(r) for r in replies] == [200, 200], replies
        self.relayed_a, self.relayed_b = (client.relayed(r) for client, r in zip((self.a, self.b), replies))
        assert code(self.a.bind(0x4000, self.relayed_b)) == 200
        assert code(self.b.bind(0x4000, self.relayed_a)) == 200
        self.sent = {"a": 0, "b": 0}
        self.received: dict[str, set[int]] = {"a": set(), "b": set()}  # by the receiving side
        self.refreshes = {"ok": 0, "failed": 0}
        self.failures: list[str] = []
        self._pending: dict[bytes, tuple[RawTurnClient, int, list[tuple[int, Any]], int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reference-call", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_s: float = 1.0) -> None:
        """Stop sending; keep receiving for ``drain_s`` so what is in flight is counted."""
        self._stop.set()
        self._thread.join(timeout=drain_s + 10.0)
        assert not self._thread.is_alive(), "the reference call thread did not stop"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        for client in (self.a, self.b):
            try:
                client.request(Method.REFRESH, [(Attr.LIFETIME, 0)])
            except AssertionError:
                pass
            client.close()

    @property
    def loss(self) -> float:
        sent = self.sent["a"] + self.sent["b"]
        got = len(self.received["b"]) + len(self.received["a"])
        return 1.0 - got / sent if sent else 1.0

    def _request(self, client: RawTurnClient, method: int, attrs: list[tuple[int, Any]], tries: int = 0) -> None:
        msg = Message(method, MessageClass.REQUEST, attributes=list(attrs))
        msg.add(Attr.USERNAME, client.username).add(Attr.REALM, client.realm).add(Attr.NONCE, client.nonce)
        self._pending[msg.transaction_id] = (client, method, attrs, tries)
        client.sock.sendto(encode_message(msg, key=client.key), client.server)

    def _refresh_all(self, rebind: bool) -> None:
        self._pending.clear()  # an unanswered refresh is simply repeated by the next one
        for client, peer in ((self.a, self.relayed_b), (self.b, self.relayed_a)):
            self._request(client, Method.REFRESH, [(Attr.LIFETIME, MAX_LIFETIME_S)])
            if rebind:
                self._request(client, Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000),
                                                             (Attr.XOR_PEER_ADDRESS, peer)])

    def _on_datagram(self, side: str, client: RawTurnClient, data: bytes) -> None:
        if data[:2] == b"\x40\x00" and len(data) >= 12:
            (seq,) = struct.unpack_from("!Q", data, 4)
            self.received[side].add(seq)
            return
        try:
            msg = decode_message(data)
        except StunDecodeError:
            self.failures.append(f"undecodable datagram at {side}: {data[:32].hex()}")
            return
        pending = self._pending.pop(msg.transaction_id, None)
        if pending is None:
            return
        owner, method, attrs, tries = pending
        if msg.msg_class == MessageClass.SUCCESS:
            self.refreshes["ok"] += 1
            return
        error = msg.get(Attr.ERROR_CODE)
        if error and error[0] in (401, 438) and Attr.NONCE in msg and tries < MAX_CHALLENGES:
            owner.nonce = msg.get(Attr.NONCE)
            self._request(owner, method, attrs, tries + 1)
            return
        self.refreshes["failed"] += 1
        self.failures.append(f"{Method(method).name} at {side}: {error}")

    def _run(self) -> None:
        sides = {self.a.sock: ("a", self.a, self.b), self.b.sock: ("b", self.b, self.a)}
        for sock in sides:
            sock.setblocking(False)
        interval = 1.0 / REF_RATE
        filler = b"\x00" * (REF_PAYLOAD - 8)
        started = time.monotonic()
        next_send = started
        next_refresh = started + REF_REFRESH_S
        next_rebind = started + REF_REBIND_S
        stopped_at: float | None = None
        hard_deadline = started + RUN_TIMEOUT_S + 60.0
        seq = 0
        while True:
            now = time.monotonic()
            if now > hard_deadline:
                self.failures.append("the reference call ran past its deadline")
                break
            if self._stop.is_set():
                stopped_at = stopped_at or now
                if now - stopped_at > 1.0:
                    break
            elif now >= next_send:
                for side, client, other in (("a", self.a, self.b), ("b", self.b, self.a)):
                    client.sock.sendto(encode_channel_data(0x4000, struct.pack("!Q", seq) + filler),
                                       client.server)
                    self.sent[side] += 1
                seq += 1
                next_send += interval
                if next_send < now - 1.0:  # the thread was starved for a second: do not burst
                    next_send = now
            if now >= next_refresh and not self._stop.is_set():
                rebind = now >= next_rebind
                self._refresh_all(rebind)
                next_refresh += REF_REFRESH_S
                if rebind:
                    next_rebind += REF_REBIND_S
            readable, _, _ = select.select(list(sides), [], [], max(0.0, min(next_send, next_refresh) - now))
            for sock in readable:
                side, client, _ = sides[sock]
                for _ in range(64):
                    try:
                        data = sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        self.failures.append(f"recv at {side}: {exc}")
                        break
                    # What "a" receives, "b" sent, and the reverse.
                    self._on_datagram(side, client, data)
        for sock in sides:
            sock.setblocking(True)


# --------------------------------------------------------------------------- pipelined churn


@dataclass
class Session:
    """One allocation's life, one request at a time, on a client socket of its own."""

    sock: socket.socket
    delete: bool
    user: int
    step: int = 0
    request: bytes = b""
    transaction_id: bytes = b""
    sent_at: float = 0.0
    attempts: int = 0
    challenges: int = 0
    nonce: str | None = None
    realm: str = "test.turnd"
    relayed: tuple[str, int] | None = None


@dataclass
class ChurnResult:
    completed: int = 0
    deleted: int = 0
    left_to_expire: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    peer_datagrams: int = 0
    elapsed_s: float = 0.0
    last_end_at: float = 0.0  # monotonic time by which every allocation should be gone

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


# The steps of a session; the last one depends on ``Session.delete``.
ALLOCATE, REFRESH, PERMISSION, CHANNEL, DELETE = range(5)


def churn(server: RunningServer, count: int, peers: list[socket.socket], *, rate: float = RATE,
          concurrency: int = CONCURRENCY, timeout_s: float = RUN_TIMEOUT_S) -> ChurnResult:
    """Run ``count`` allocations through their whole life, starting ``rate`` per second with
    at most ``concurrency`` in flight."""
    address = server.address("udp")
    # As many users as client addresses: a per-user quota never decides anything here.
    users = [server.credentials(f"soak{n}", ttl_s=3600) for n in range(len(CLIENT_IPS))]
    keys: dict[tuple[int, str], bytes] = {}
    result = ChurnResult()
    selector = selectors.DefaultSelector()
    for peer in peers:
        peer.setblocking(False)
        selector.register(peer, selectors.EVENT_READ, None)
    live: dict[int, Session] = {}
    lingering: list[tuple[float, socket.socket]] = []  # sockets of allocations left to expire
    started = time.monotonic()
    deadline = started + timeout_s
    to_start = count

    def key_for(user: int, realm: str) -> bytes:
        if (user, realm) not in keys:
            keys[user, realm] = long_term_key(users[user][0], realm, users[user][1])
        return keys[user, realm]

    def build(s: Session) -> None:
        peer = peers[s.sock.fileno() % len(peers)].getsockname()
        if s.step == ALLOCATE:
            method, attrs = Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17), (Attr.LIFETIME, LIFETIME_S)]
        elif s.step == REFRESH:
            method, attrs = Method.REFRESH, [(Attr.LIFETIME, LIFETIME_S)]
        elif s.step == PERMISSION:
            method, attrs = Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, peer)]
        elif s.step == CHANNEL:
            method, attrs = Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, peer)]
        else:
            method, attrs = Method.REFRESH, [(Attr.LIFETIME, 0)]
        msg = Message(method, MessageClass.REQUEST, attributes=attrs)
        if s.nonce is None:
            data = encode_message(msg)
        else:
            msg.add(Attr.USERNAME, users[s.user][0]).add(Attr.REALM, s.realm).add(Attr.NONCE, s.nonce)
            data = encode_message(msg, key=key_for(s.user, s.realm))
        s.request, s.transaction_id, s.attempts = data, msg.transaction_id, 0

    def send(s: Session, now: float) -> None:
        s.sock.send(s.request)
        s.sent_at = now
        s.attempts += 1

    def finish(s: Session, now: float, reason: str | None = None) -> None:
        selector.unregister(s.sock)
        del live[s.sock.fileno()]
        if reason is not None:
            result.fail(reason)
            s.sock.close()
            return
        result.completed += 1
        if s.delete:
            result.deleted += 1
            s.sock.close()
        else:
            # Silent from now on. The socket stays open until the allocation is gone, so the
            # kernel cannot hand its port to a new session whose 5-tuple would clash with it.
            result.left_to_expire += 1
            lingering.append((now + LIFETIME_S + 1.0, s.sock))
        result.last_end_at = max(result.last_end_at, now + (0 if s.delete else LIFETIME_S))

    def start_one(now: float, index: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((CLIENT_IPS[index % len(CLIENT_IPS)], 0))
        sock.connect(address)
        sock.setblocking(False)
        s = Session(sock, delete=index % 2 == 0, user=index % len(CLIENT_IPS))
        live[sock.fileno()] = s
        selector.register(sock, selectors.EVENT_READ, s)
        build(s)
        send(s, now)

    def advance(s: Session, reply: Message, now: float) -> None:
        if reply.msg_class == MessageClass.ERROR:
            error = reply.get(Attr.ERROR_CODE)[0]
            if error in (401, 438) and Attr.NONCE in reply and s.challenges < MAX_CHALLENGES:
                s.challenges += 1
                s.nonce = reply.get(Attr.NONCE)
                s.realm = reply.get(Attr.REALM) or s.realm
                build(s)
                send(s, now)
                return
            finish(s, now, f"step {s.step}: {error}")
            return
        if s.step == ALLOCATE:
            s.relayed = reply.get(Attr.XOR_RELAYED_ADDRESS)
        if s.step == CHANNEL:
            s.sock.send(encode_channel_data(0x4000, b"soak" * 25))  # one datagram to the peer
        if s.step == DELETE or (s.step == CHANNEL and not s.delete):
            finish(s, now)
            return
        s.step += 1
        build(s)
        send(s, now)

    index = 0
    try:
        while (to_start or live) and time.monotonic() < deadline:
            now = time.monotonic()
            while (to_start and len(live) < concurrency and len(live) + len(lingering) < MAX_LIVE
                   and started + index / rate <= now):
                start_one(now, index)
                index += 1
                to_start -= 1
            for ready, _ in selector.select(timeout=0.01):
                s = ready.data
                sock = ready.fileobj
                for _ in range(64):
                    try:
                        data = sock.recv(65536)  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionRefusedError:
                        break
                    if s is None:
                        result.peer_datagrams += 1
                        continue
                    try:
                        reply = decode_message(data)
                    except StunDecodeError:
                        continue
                    if reply.transaction_id == s.transaction_id and s.sock.fileno() in live:
                        advance(s, reply, now)
                        break
            now = time.monotonic()
            for s in list(live.values()):
                if now - s.sent_at > RETRANSMIT_S:
                    if s.attempts >= MAX_ATTEMPTS:
                        finish(s, now, f"step {s.step}: no answer")
                    else:
                        send(s, now)
            while lingering and lingering[0][0] <= now:
                lingering.pop(0)[1].close()
        for s in list(live.values()):
            finish(s, time.monotonic(), "run timeout")
        # Count the peers' last datagrams.
        for _ in range(20):
            events = selector.select(timeout=0.05)
            if not events:
                break
            for ready, _ in events:
                for _ in range(64):
                    try:
                        ready.fileobj.recv(65536)  # type: ignore[union-attr]
                        result.peer_datagrams += 1
                    except (BlockingIOError, InterruptedError):
                        break
    finally:
        for s in list(live.values()):
            s.sock.close()
        for _, sock in lingering:
            sock.close()
        selector.close()
    result.elapsed_s = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- the test


@dataclass
class Level:
    rss_kib: int
    fds: int
    allocations: float
    relay_ports: float
    permissions: float
    channels: float
    timers: dict[str, float]


def level(server: RunningServer) -> Level:
    now = scrape_now(server)
    pid = server.proc.pid
    return Level(
        rss_kib=vm_rss_kib(pid),
        fds=open_fds(pid),
        allocations=sum(v for (name, _), v in now.samples.items() if name == "turn_allocations"),
        relay_ports=now.get("turn_relay_ports_in_use") or 0.0,
        permissions=now.get("turn_permissions") or 0.0,
        channels=now.get("turn_channels") or 0.0,
        timers=timer_gauges(now),
    )


def wait_for_gauges(server: RunningServer, allocations: float, relay_ports: float, timeout_s: float) -> Level:
    """Poll until both gauges are back at the given values (or the timeout); the last reading."""
    reading = level(server)
    deadline = time.monotonic() + timeout_s
    while (reading.allocations, reading.relay_ports) != (allocations, relay_ports) and time.monotonic() < deadline:
        time.sleep(0.1)
        reading = level(server)
    return reading


def test_thousands_of_allocations_come_and_go_and_the_server_returns_to_its_starting_level(
        server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(**soak_options())
    pid = server.proc.pid
    at_start = level(server)
    peers = []
    for _ in range(4):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind((PEER_IP, 0))
        peers.append(peer)
    reference = ReferenceCall(server)
    reference.start()
    try:
        warm = churn(server, WARMUP, peers)
        assert warm.failures == {} and warm.completed == WARMUP, warm
        # The warm-up's allocations are all gone before the baseline is taken.
        baseline = wait_for_gauges(server, 2, 2, max(0.0, warm.last_end_at - time.monotonic()) + 5.0)
        assert (baseline.allocations, baseline.relay_ports) == (2, 2), baseline
        assert (baseline.permissions, baseline.channels) == (2, 2), baseline

        run = churn(server, COUNT, peers)
        churn_end_rss = vm_rss_kib(pid)
        assert run.failures == {} and run.completed == COUNT, run
        assert run.deleted == COUNT // 2 + COUNT % 2 and run.left_to_expire == COUNT // 2, run
        # Every session sent one ChannelData to a peer after its ChannelBind.
        assert run.peer_datagrams >= 0.99 * COUNT, run

        ended_by = run.last_end_at
        after = wait_for_gauges(server, baseline.allocations, baseline.relay_ports,
                                max(0.0, ended_by - time.monotonic()) + 5.0)
        waited_s = time.monotonic() - ended_by
        # File descriptors: the scrape's own connection may close a moment after its answer.
        wait_until(lambda: open_fds(pid) == baseline.fds, 3.0)
        after.fds = open_fds(pid)
        reference.stop()
        assert server.alive()
    finally:
        if reference.running:
            reference.stop()
        reference.close()
        for peer in peers:
            peer.close()

    report = (f"rss_kib start={at_start.rss_kib} baseline={baseline.rss_kib} at_churn_end={churn_end_rss} "
              f"after={after.rss_kib} (bound +{RSS_BOUND_KIB}); "
              f"fds start={at_start.fds} baseline={baseline.fds} after={after.fds}; "
              f"allocations {baseline.allocations}->{after.allocations}, relay ports "
              f"{baseline.relay_ports}->{after.relay_ports}; timer gauges {baseline.timers}->{after.timers}; "
              f"{COUNT} allocations in {run.elapsed_s:.1f} s ({COUNT / run.elapsed_s:.0f}/s), gone "
              f"{waited_s:.1f} s after the last lifetime ran out; reference sent={reference.sent} "
              f"received={ {k: len(v) for k, v in reference.received.items()} } loss={reference.loss:.4%} "
              f"refreshes={reference.refreshes}")
    print(report)
    assert reference.failures == [], (reference.failures[:10], report)
    assert reference.refreshes["failed"] == 0 and reference.refreshes["ok"] > 0, report
    assert reference.loss < 0.01, report
    assert (after.allocations, after.relay_ports) == (baseline.allocations, baseline.relay_ports), report
    assert (after.permissions, after.channels) == (baseline.permissions, baseline.channels), report
    assert after.fds == baseline.fds, report
    if baseline.timers:  # the core's deadline heap, when the server exports its size
        # Each ended allocation leaves up to three stale entries (its lifetime, permission and
        # channel). Kept until their old deadlines they would number 3 * COUNT; the core
        # drops them once they are half the heap, so it holds at most twice the live entries
        # (the reference call's allocations, permissions and channels).
        assert set(after.timers) == set(baseline.timers), report
        live = after.allocations + after.permissions + after.channels
        for name, value in after.timers.items():
            assert value <= 2 * live + 1, report
    assert after.rss_kib - baseline.rss_kib <= RSS_BOUND_KIB, report
