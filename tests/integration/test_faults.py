"""Faults around a running server: a peer that answers with ICMP port unreachable, a client
that vanishes without a Refresh, a TCP client that stops reading and then goes away, and a relay
port range that runs out. After each the server keeps relaying for everyone else, and what the
faulty party held (its allocation, relay port, connection, memory) is given back.

The short form runs in the normal suite. The long form sends about seven times as many
datagrams toward the dead peer and five times the flood (120 MB) toward the stalled client:

    TURN_LONG_TESTS=1 python3 -m pytest -q -p no:cacheprovider tests/integration/test_faults.py

All traffic stays on 127.0.0.0/8; every loop is bounded in count and in time.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest

from turnserver.stun import Attr, Method

from .raw_client import RawTurnClient, code
from .test_stream_support import usage_records
from .server import RunningServer
from .test_soak import open_fds, scrape_now, vm_rss_kib, wait_until
from .test_stream_limits import allocated_client, relay_round_trip
from .test_stream_support import PEER_IP, STREAM_OPTIONS, udp_peer

# Not TURND_*: the server, which inherits the environment, reads those as its options.
LONG = os.environ.get("TURN_LONG_TESTS", "") not in ("", "0")

# This file's relay ranges, apart from tests/integration/server.py's 50000-50999.
FAULT_RELAY_PORTS = (56100, 56199)

def exhaustion_windows() -> list[int]:
    """Candidate 16-port ranges for the exhaustion test, outside the kernel's ephemeral range: a
    client socket bound to port 0 (this test's, or any other program's) may otherwise take one of
    the ports between the check and the allocation."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first, last = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        first, last = 32768, 60999
    candidates = [low for low in range(61440, 65520, 16)] + [low for low in range(20000, 21024, 16)]
    return [low for low in candidates if low + 15 < first or low > last]
ROUNDS = 2000 if LONG else 300
FLOOD_BATCHES = 200 if LONG else 40  # of 500 datagrams of 1,200 bytes each
VANISH_LIFETIME_S = 3


def fault_options(**extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "metrics_listen": "127.0.0.1:0",
        "log_format": "json",
        "relay_port_min": FAULT_RELAY_PORTS[0],
        "relay_port_max": FAULT_RELAY_PORTS[1],
        "allowed_peers": [f"{PEER_IP}/32"],
        # Nothing beyond loopback is ever relayed to, whatever a client asks.
        "denied_peers": ["0.0.0.0/0", "::/0"],
    }
    options.update(extra)
    return options


def channel_data(number: int, payload: bytes) -> bytes:
    return struct.pack("!HH", number, len(payload)) + payload


def usage(server: RunningServer) -> list[dict[str, Any]]:
    """The usage records the server logged (JSON log format)."""
    return [entry["usage"] for entry in usage_records(server)]


def icmp_dest_unreachables_received() -> int:
    """The kernel's count of ICMP destination unreachable messages received (this network
    namespace, all programs: it only grows)."""
    lines = [line.split() for line in open("/proc/net/snmp") if line.startswith("Icmp:")]
    return int(lines[1][lines[0].index("InDestUnreachs")])


def allocations_gauge(server: RunningServer) -> float:
    now = scrape_now(server)
    return sum(v for (name, _), v in now.samples.items() if name == "turn_allocations")


class PeerCollector:
    """Receives on a UDP peer socket in a thread, so the socket's buffer never overflows
    while the test is busy sending."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                self.received.append(self.sock.recvfrom(65536))
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return

    def payloads(self) -> set[bytes]:
        return {data for data, _ in self.received}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


class RelayedClient:
    """A UDP allocation with a channel to a UDP peer of its own, for round trips."""

    def __init__(self, server: RunningServer, user: str, channel: int = 0x4000) -> None:
        self.client = RawTurnClient(server.address("udp"), *server.credentials(user))
        self.peer = udp_peer()
        reply = self.client.allocate()
        assert code(reply) == 200, reply
        self.relayed = self.client.relayed(reply)
        self.channel = channel
        assert code(self.client.bind(channel, self.peer.getsockname())) == 200

    def round_trip(self, tag: bytes) -> None:
        """One ChannelData to the peer and one datagram back; asserts both arrive."""
        self.client.send_raw(channel_data(self.channel, b"up-" + tag))
        deadline = time.monotonic() + 3.0
        while True:
            data, source = self.peer.recvfrom(65536)
            if data == b"up-" + tag:
                break
            assert time.monotonic() < deadline, "the client's data never reached its peer"
        assert source == self.relayed
        self.peer.sendto(b"down-" + tag, self.relayed)
        while True:
            data = self.client.recv(max(0.01, deadline - time.monotonic()))
            assert data is not None, "the peer's data never reached the client"
            if data == channel_data(self.channel, b"down-" + tag):
                return

    def close(self) -> None:
        self.client.close()
        self.peer.close()


# --------------------------------------------------------------------------- ICMP unreachable


def test_a_peer_answering_icmp_port_unreachable_does_not_disturb_the_relay(
        server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(**fault_options())
    main = RelayedClient(server, "main")
    other = RelayedClient(server, "other")
    # A port the kernel answers with ICMP port unreachable: bound once, then closed.
    gone = udp_peer()
    dead = gone.getsockname()
    gone.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((PEER_IP, 0))
        probe.connect(dead)
        probe.send(b"anyone?")
        probe.settimeout(2.0)
        with pytest.raises(ConnectionRefusedError):  # the ICMP error, reported on the socket
            probe.recv(100)
    assert code(main.client.permit(dead)) == 200
    assert code(main.client.bind(0x4001, dead)) == 200
    collectors = [PeerCollector(main.peer), PeerCollector(other.peer)]
    icmp_before = icmp_dest_unreachables_received()
    try:
        for i in range(ROUNDS):
            tag = b"%06d" % i
            main.client.send_raw(channel_data(0x4001, b"dead-" + tag))
            main.client.send_indication(dead, b"dead-send-" + tag)
            main.client.send_raw(channel_data(0x4000, b"live-" + tag))
            other.client.send_raw(channel_data(0x4000, b"other-" + tag))
            if i % 25 == 24:
                # Paced by what arrived: the listener's socket buffer is not under test here.
                wait_until(lambda: b"live-" + tag in collectors[0].payloads()
                           and b"other-" + tag in collectors[1].payloads(), 3.0, 0.002)
        want_main = {b"live-%06d" % i for i in range(ROUNDS)}
        want_other = {b"other-%06d" % i for i in range(ROUNDS)}
        assert wait_until(lambda: collectors[0].payloads() >= want_main
                          and collectors[1].payloads() >= want_other, 5.0)
    finally:
        for collector in collectors:
            collector.stop()
    # The kernel did answer the datagrams toward the dead port (loopback is not rate-limited).
    icmp = icmp_dest_unreachables_received() - icmp_before
    assert icmp >= 2 * ROUNDS, icmp
    # Every datagram to the live peer went out, on the allocation's own relayed address.
    assert collectors[0].payloads() == want_main
    assert {source for _, source in collectors[0].received} == {main.relayed}
    assert collectors[1].payloads() == want_other
    # And the way back still works on both allocations, as does a new one.
    main.peer.settimeout(3.0)
    other.peer.settimeout(3.0)
    for i in range(3):
        main.round_trip(b"after-%d" % i)
        other.round_trip(b"after-%d" % i)
    fresh = RelayedClient(server, "fresh")
    try:
        fresh.round_trip(b"fresh")
        binding = main.client.binding()
        assert binding is not None and code(binding) == 200
        assert server.alive()
        now = scrape_now(server)
        assert now.get("turn_dropped_packets_total", reason="internal_error") == 0
        # What the client sent toward the dead peer was relayed (or counted as refused by
        # the kernel), not lost inside the server.
        relayed = now.get("turn_relayed_packets_total", direction="client_to_peer", transport="udp")
        failed = now.get("turn_dropped_packets_total", reason="send_failed")
        assert relayed is not None and failed is not None
        print(f"icmp: {ROUNDS} rounds, {icmp} ICMP unreachables, relayed client_to_peer={relayed} "
              f"send_failed={failed}")
        assert relayed + failed == 4 * ROUNDS + 7, (relayed, failed)
    finally:
        fresh.close()
        main.close()
        other.close()


# --------------------------------------------------------------------------- a vanished client


def test_a_client_that_vanishes_without_refresh_expires_and_frees_its_relay_port(
        server_factory: Callable[..., RunningServer]) -> None:
    lifetime = VANISH_LIFETIME_S
    server = server_factory(**fault_options(default_lifetime_s=lifetime, max_lifetime_s=lifetime))
    survivor = RelayedClient(server, "survivor")
    vanishing = RelayedClient(server, "vanishing")
    allocated_at = time.monotonic()
    vanishing.round_trip(b"alive")
    relayed_port = vanishing.relayed[1]
    assert allocations_gauge(server) == 2
    vanishing.client.close()  # gone: no Refresh, no Refresh(0), nothing
    flood = vanishing.peer  # its peer keeps sending toward the vanished client
    gone_at: float | None = None
    rounds = 0
    refreshed_at = time.monotonic()
    deadline = allocated_at + lifetime + 3.0
    try:
        while time.monotonic() < deadline:
            for _ in range(5):
                flood.sendto(b"to-nobody", vanishing.relayed)
            survivor.round_trip(b"%d" % rounds)
            rounds += 1
            if time.monotonic() - refreshed_at > 1.0:  # the survivor does refresh
                assert code(survivor.client.request(Method.REFRESH, [(Attr.LIFETIME, lifetime)])) == 200
                refreshed_at = time.monotonic()
            if allocations_gauge(server) == 1:
                gone_at = time.monotonic()
                break
            time.sleep(0.05)
        assert gone_at is not None, "the vanished client's allocation never expired"
        print(f"vanished: gone {gone_at - allocated_at:.2f} s after its Allocate (lifetime {lifetime} s), "
              f"{rounds} survivor round trips meanwhile")
        # Not before its lifetime (the scrape is a little late, never early), and soon after.
        assert lifetime - 0.2 <= gone_at - allocated_at <= lifetime + 2.0, gone_at - allocated_at
        now = scrape_now(server)
        assert now.get("turn_relay_ports_in_use") == 1
        assert now.get("turn_allocations_ended_total", reason="expired") == 1
        # The relay socket is closed: its port can be bound again...
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", relayed_port))
        # ...and a new allocation gets a port, while the survivor never missed a round trip.
        newcomer = RelayedClient(server, "newcomer")
        try:
            newcomer.round_trip(b"new")
            survivor.round_trip(b"last")
        finally:
            newcomer.close()
    finally:
        survivor.close()
        flood.close()
    assert rounds > 10
    records = [r for r in usage(server) if r["relayed"] == [f"127.0.0.1:{relayed_port}"]]
    assert len(records) == 1, usage(server)
    assert records[0]["reason"] == "expired"
    assert lifetime - 0.2 <= records[0]["duration_s"] <= lifetime + 2.0, records[0]
    assert records[0]["packets_to_client"] >= 1 and records[0]["packets_to_peer"] == 1


# --------------------------------------------------------------------------- a client that stops reading


@pytest.mark.parametrize("goes_away", ["reset", "half_close"])
def test_a_tcp_client_that_stops_reading_costs_bounded_memory_and_is_cleaned_up(
        server_factory: Callable[..., RunningServer], goes_away: str) -> None:
    limit = 65536
    # No bandwidth cap: the flood must reach the connection's write buffer, which is under test.
    # The handshake timeout is also the grace a closing connection gets to flush its queue.
    server = server_factory(**fault_options(stream_write_buffer_bytes=limit, tls_handshake_timeout_s=1.0,
                                            allocation_bandwidth_bytes_s=0, **STREAM_OPTIONS))
    pid = server.proc.pid
    udp_other = RelayedClient(server, "udp-other")
    tcp_other, tcp_other_peer, tcp_other_relayed = allocated_client(server, "tcp", user="tcp-other")
    udp_other.peer.settimeout(3.0)
    try:
        relay_round_trip(tcp_other, tcp_other_peer, tcp_other_relayed, 0x4000, b"warm-up")
        udp_other.round_trip(b"warm-up")
        fds_before = open_fds(pid)
        # A small receive window, so the kernel cannot hide the backlog on the client's side.
        stalled, flood_peer, stalled_relayed = allocated_client(server, "tcp", rcvbuf=4096, user="stalled")
        relay_round_trip(stalled, flood_peer, stalled_relayed, 0x4000, b"still-reading")
        rss_before = vm_rss_kib(pid)
        payload = b"\xab" * 1200
        for batch in range(FLOOD_BATCHES):  # from here on the stalled client reads nothing
            for _ in range(500):
                flood_peer.sendto(payload, stalled_relayed)
            time.sleep(0.005)  # let the server drain its relay socket instead of the kernel dropping
            if batch % 10 == 9:
                relay_round_trip(tcp_other, tcp_other_peer, tcp_other_relayed, 0x4000, b"tcp-%d" % batch)
                udp_other.round_trip(b"udp-%d" % batch)
        grown_kib = vm_rss_kib(pid) - rss_before
        flooded = FLOOD_BATCHES * 500 * len(payload)
        # Queued without bound, tens of MB would be held; the kernel's own socket buffers (a few
        # MB) are all that may add to the write limit.
        assert grown_kib < 6 * 1024, f"server RSS grew by {grown_kib} KiB while flooding {flooded} bytes"
        during = scrape_now(server)
        dropped = during.get("turn_stream_write_dropped_messages_total")
        dropped_bytes = during.get("turn_stream_write_dropped_bytes_total")
        # (Some of the flood is lost before the server, in the relay socket's kernel buffer.)
        assert dropped is not None and dropped > 1000, dropped
        assert dropped_bytes is not None and dropped_bytes >= dropped * len(payload)
        print(f"stalled tcp ({goes_away}): flooded {flooded} bytes, RSS +{grown_kib} KiB, "
              f"dropped {dropped:.0f} messages / {dropped_bytes:.0f} bytes")
        assert during.get("turn_stream_connections", transport="tcp") == 2
        assert during.get("turn_allocations", transport="tcp", family="ipv4") == 2

        if goes_away == "reset":
            stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stalled.close()
        else:  # half-closed: the server sees EOF, while its queue toward the client stays full
            stalled.sock.shutdown(socket.SHUT_WR)
        left_at = time.monotonic()

        def allocation_gone() -> bool:
            now = scrape_now(server)
            return (now.get("turn_allocations", transport="tcp", family="ipv4") == 1
                    and now.get("turn_relay_ports_in_use") == 2)

        assert wait_until(allocation_gone, 2.0), "the stalled client's allocation outlived its connection"
        assert wait_until(lambda: scrape_now(server).get("turn_stream_connections", transport="tcp") == 1, 4.0)
        closed_after_s = time.monotonic() - left_at
        assert wait_until(lambda: open_fds(pid) == fds_before, 3.0), (open_fds(pid), fds_before)
        after = scrape_now(server)
        assert after.get("turn_allocations_ended_total", reason="connection_closed") == 1
        # The others never noticed.
        relay_round_trip(tcp_other, tcp_other_peer, tcp_other_relayed, 0x4000, b"after")
        udp_other.round_trip(b"after")
        if goes_away == "half_close":
            stalled.close()
        flood_peer.close()
    finally:
        tcp_other.close()
        tcp_other_peer.close()
        udp_other.close()
    assert closed_after_s < 4.0
    assert server.stop() == 0
    records = [r for r in usage(server) if r["user"].endswith(":stalled")]
    assert len(records) == 1 and records[0]["reason"] == "connection_closed", records
    # The usage record counts what was written toward the client: the one round trip before
    # the flood (a few bytes) and the part of the flood the buffers took, not what the full
    # write buffer dropped (turn_stream_write_dropped_*, of which ``dropped`` is a lower bound).
    assert records[0]["bytes_to_client"] + dropped * len(payload) <= flooded + 64


# --------------------------------------------------------------------------- port exhaustion


def free_window() -> tuple[int, int]:
    """The first 16-port range of exhaustion_windows() that no other program holds right now."""
    for low in exhaustion_windows():
        try:
            for port in range(low, low + 16):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low, low + 15
    pytest.fail("no free 16-port range for the relay: every candidate has a port taken")


def test_with_the_relay_range_used_up_allocate_gets_508_until_one_is_deleted(
        server_factory: Callable[..., RunningServer]) -> None:
    from turnserver.config import MIN_RELAY_PORTS

    low, high = free_window()
    assert high - low + 1 == MIN_RELAY_PORTS  # the smallest range the configuration accepts
    server = server_factory(**fault_options(relay_port_min=low, relay_port_max=high))
    clients: list[RawTurnClient] = []
    try:
        ports: list[int] = []
        for n in range(MIN_RELAY_PORTS):
            client = RawTurnClient(server.address("udp"), *server.credentials(f"u{n}"))
            clients.append(client)
            reply = client.allocate()
            assert code(reply) == 200, (n, reply)
            ports.append(client.relayed(reply)[1])
        assert sorted(ports) == list(range(low, high + 1))
        now = scrape_now(server)
        assert now.get("turn_relay_ports_in_use") == MIN_RELAY_PORTS
        assert now.get("turn_relay_ports_capacity") == MIN_RELAY_PORTS

        extra = RawTurnClient(server.address("udp"), *server.credentials("one-too-many"))
        clients.append(extra)
        refused = extra.allocate()
        assert code(refused) == 508, refused
        assert scrape_now(server).get("turn_allocations_refused_total", reason="capacity") == 1
        # The allocations there are keep working.
        assert code(clients[0].request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 200

        deleted = clients[5].request(Method.REFRESH, [(Attr.LIFETIME, 0)])
        assert code(deleted) == 200 and deleted.get(Attr.LIFETIME) == 0
        assert scrape_now(server).get("turn_relay_ports_in_use") == MIN_RELAY_PORTS - 1
        # The same 5-tuple that was refused now gets the one port that is free again.
        granted = extra.allocate()
        assert code(granted) == 200, granted
        assert extra.relayed(granted) == ("127.0.0.1", ports[5])
        now = scrape_now(server)
        assert now.get("turn_relay_ports_in_use") == MIN_RELAY_PORTS
        assert now.get("turn_allocations_refused_total", reason="capacity") == 1
        assert now.get("turn_dropped_packets_total", reason="internal_error") == 0
    finally:
        for client in clients:
            client.close()
