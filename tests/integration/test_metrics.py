"""Live metrics from a real ``turnd serve``: scraped while aioice clients relay through it.

All traffic stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import aioice.turn
import pytest
from prometheus_client.parser import text_string_to_metric_families

from turnserver.client import ErrorResponse, TurnClient

from .server import RunningServer

TIMEOUT_S = 5.0
PACKET = 1000
PER_ROUND = 20


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT_S)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


async def scrape(server: RunningServer) -> Scrape:
    status, body = await http_get(server.port("metrics"), "/metrics")
    assert status == 200
    return Scrape(body)


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0
        self.nbytes = 0
        self.event = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1
        self.nbytes += len(data)
        self.event.set()


async def wait_for(predicate: Any, timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate() if asyncio.iscoroutinefunction(predicate) else predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def relay_pair(server: RunningServer) -> tuple[Any, Collect, Any, Collect]:
    """Two aioice allocations that can reach each other (channels bound both ways)."""
    addr = server.address("udp")
    user, password = server.credentials("alice")
    t1, p1 = await aioice.turn.create_turn_endpoint(Collect, addr, user, password, lifetime=600)
    t2, p2 = await aioice.turn.create_turn_endpoint(Collect, addr, user, password, lifetime=600)
    r1, r2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
    # aioice binds a channel (and with it a permission) on the first send to a peer; until
    # both sides have, the first packets may be dropped for want of a permission.
    for _ in range(50):
        t1.sendto(b"p", r2)
        t2.sendto(b"p", r1)
        await asyncio.sleep(0.05)
        if p1.received and p2.received:
            break
    assert p1.received and p2.received, "the relay pair never connected"
    return t1, p1, t2, p2


def test_metrics_move_while_the_relay_runs_and_allocations_come_and_go(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0")

    async def scenario() -> None:
        before = await scrape(server)
        assert before.get("turn_allocations", transport="udp", family="ipv4") == 0
        t1, p1, t2, p2 = await relay_pair(server)
        try:
            during = await scrape(server)
            assert during.get("turn_allocations", transport="udp", family="ipv4") == 2
            assert during.get("turn_allocations_created_total", transport="udp", family="ipv4") == 2
            assert during.get("turn_channels") == 2
            assert during.get("turn_permissions") == 2
            assert during.get("turn_relay_ports_in_use") == 2
            r1, r2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
            ups, downs = [], []
            for round_no in range(1, 5):
                want1, want2 = p1.received + PER_ROUND, p2.received + PER_ROUND
                for _ in range(PER_ROUND):
                    t1.sendto(b"a" * PACKET, r2)
                    t2.sendto(b"b" * PACKET, r1)
                    await asyncio.sleep(0.002)
                assert await wait_for(lambda: p1.received >= want1 and p2.received >= want2)
                now = await scrape(server)
                ups.append(now.get("turn_relayed_bytes_total", direction="client_to_peer", transport="udp"))
                downs.append(now.get("turn_relayed_bytes_total", direction="peer_to_client", transport="udp"))
                assert now.get("turn_allocations", transport="udp", family="ipv4") == 2  # still live
            # Each round both clients sent PER_ROUND packets of PACKET bytes and all arrived:
            # the counters moved by exactly that between scrapes, while the clients were open.
            for earlier, later in zip(ups, ups[1:]):
                assert later - earlier == 2 * PER_ROUND * PACKET
            for earlier, later in zip(downs, downs[1:]):
                assert later - earlier == 2 * PER_ROUND * PACKET
        finally:
            t1.close()
            t2.close()

        async def gone() -> bool:
            return (await scrape(server)).get("turn_allocations", transport="udp", family="ipv4") == 0

        assert await wait_for(gone)
        after = await scrape(server)
        # aioice deletes its allocation with Refresh lifetime 0 (RFC 8656 §7.3) on close.
        assert after.get("turn_allocations_ended_total", reason="deleted") == 2
        assert after.get("turn_relay_ports_in_use") == 0
        assert after.get("turn_channels") == 0
        final_up = after.get("turn_relayed_bytes_total", direction="client_to_peer", transport="udp")
        assert final_up is not None and final_up >= ups[-1]  # a counter never goes back

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_refusals_are_counted_under_the_right_label(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0", user_quota=1)
    addr = server.address("udp")

    async def scenario() -> None:
        user, password = server.credentials("alice")
        # Wrong password: the challenge is not a failure; the signed retry is (bad integrity).
        with pytest.raises(Exception):
            await aioice.turn.create_turn_endpoint(Collect, addr, user, "wrong-password")
        first, _ = await aioice.turn.create_turn_endpoint(Collect, addr, user, password)
        try:
            with pytest.raises(Exception):  # user_quota = 1: the same user again gets 486
                await aioice.turn.create_turn_endpoint(Collect, addr, user, password)
            bob_user, bob_password = server.credentials("bob")
            client = await TurnClient.connect("127.0.0.1", addr[1], transport="udp",
                                              username=bob_user, password=bob_password)
            try:
                await client.allocate()
                # 10.0.0.1 is private: the default peer policy refuses it (403) and the
                # server sends nothing anywhere.
                with pytest.raises(ErrorResponse) as refused:
                    await client.create_permission(("10.0.0.1", 0))
                assert refused.value.code == 403
            finally:
                await client.close()
            now = await scrape(server)
        finally:
            first.close()
        assert now.get("turn_allocations_refused_total", reason="auth") == 1
        assert now.get("turn_auth_failures_total", reason="bad_integrity") == 1
        assert now.get("turn_allocations_refused_total", reason="quota") == 1
        assert now.get("turn_requests_total", method="allocate", code="486") == 1
        assert now.get("turn_peer_policy_refusals_total", reason="private") == 1
        assert now.get("turn_requests_total", method="create_permission", code="403") == 1
        assert now.get("turn_allocations_refused_total", reason="capacity") == 0
        # alice's first allocation is still open; bob's went with client.close().
        assert now.get("turn_allocations", transport="udp", family="ipv4") == 1
        assert now.get("turn_allocations_ended_total", reason="deleted") == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_finds_no_problem_in_a_running_servers_exposition(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0")

    async def scenario() -> list[str]:
        bodies = [(await scrape(server)).text]
        t1, _, t2, _ = await relay_pair(server)
        try:
            bodies.append((await scrape(server)).text)
            with pytest.raises(Exception):
                user, _ = server.credentials("carol")
                await aioice.turn.create_turn_endpoint(Collect, server.address("udp"), user, "nope")
        finally:
            t1.close()
            t2.close()
        await asyncio.sleep(0.2)
        bodies.append((await scrape(server)).text)
        return bodies

    bodies = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert "turn_relayed_bytes_total" in bodies[1] and "process_cpu_seconds_total" in bodies[1]
    for body in bodies:
        result = subprocess.run(["promtool", "check", "metrics"], input=body.encode(),
                                capture_output=True, timeout=30)
        assert result.returncode == 0, (result.stdout + result.stderr).decode()
        assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_health_and_the_ready_file_entry(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0")
    entries = [e for e in server.info["listeners"] if e["transport"] == "metrics"]
    assert entries == [{"transport": "metrics", "host": "127.0.0.1", "port": server.port("metrics")}]

    async def scenario() -> None:
        assert await http_get(server.port("metrics"), "/health") == (200, "ok\n")
        assert await http_get(server.port("metrics"), "/healthz") == (200, "ok\n")
        assert (await http_get(server.port("metrics"), "/"))[0] == 404

    asyncio.run(asyncio.wait_for(scenario(), 30))
    port = server.port("metrics")
    assert server.stop() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_no_metrics_endpoint_when_disabled(turn_server: RunningServer) -> None:
    with pytest.raises(KeyError):
        turn_server.port("metrics")
    assert "metrics on" not in turn_server.log_text()


def test_a_flood_of_bad_packets_gives_one_summary_line_not_one_per_packet(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0")
    count = 300
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(b"\xff" * 20, server.address("udp"))  # neither STUN nor ChannelData

    async def counted() -> bool:
        value = (await scrape(server)).get("turn_dropped_packets_total", reason="not_stun")
        return value == count

    assert asyncio.run(asyncio.wait_for(wait_for(counted), 30))
    assert server.stop() == 0
    lines = [line for line in server.log_text().splitlines() if "not_stun" in line]
    # Shorter runs than the summary period still get their summary at stop.
    assert len(lines) == 1, lines
    assert f"dropped.not_stun={count}" in lines[0] and "WARNING" in lines[0]


def test_tcp_connections_and_the_tls_certificate_show_up(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0", listen_tcp=["127.0.0.1:0"], listen_tls=["127.0.0.1:0"])

    async def scenario() -> None:
        start = await scrape(server)
        assert start.get("turn_listeners", transport="tcp") == 1
        assert start.get("turn_listeners", transport="tls") == 1
        assert start.get("turn_stream_connections", transport="tcp") == 0
        # No certificate configured: the self-signed one made at start-up still has an expiry.
        not_after = start.get("turn_tls_certificate_not_after_timestamp_seconds")
        assert not_after is not None and not_after > time.time() + 86400
        assert start.get("turn_tls_reloads_total", result="ok") == 0
        server.signal(signal.SIGHUP)  # a reload re-reads the certificate

        async def reloaded() -> bool:
            return (await scrape(server)).get("turn_tls_reloads_total", result="ok") == 1

        assert await wait_for(reloaded)
        assert (await scrape(server)).get("turn_tls_reloads_total", result="failed") == 0
        user, password = server.credentials("dave")
        transport, _ = await aioice.turn.create_turn_endpoint(
            Collect, server.address("tcp"), user, password, transport="tcp")
        try:
            during = await scrape(server)
            assert during.get("turn_stream_connections", transport="tcp") == 1
            assert during.get("turn_stream_connections_accepted_total", transport="tcp") == 1
            assert during.get("turn_allocations", transport="tcp", family="ipv4") == 1
        finally:
            transport.close()

        async def closed() -> bool:
            now = await scrape(server)
            return (now.get("turn_stream_connections", transport="tcp") == 0
                    and now.get("turn_allocations", transport="tcp", family="ipv4") == 0)

        assert await wait_for(closed)
        after = await scrape(server)
        assert after.get("turn_allocations_created_total", transport="tcp", family="ipv4") == 1
        ended = sum(after.get("turn_allocations_ended_total", reason=r) or 0
                    for r in ("deleted", "connection_closed"))
        assert ended == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_health_says_draining_with_503_while_a_sigterm_drain_waits(server_factory: Any) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0")
    port = server.port("metrics")

    async def scenario() -> None:
        user, password = server.credentials("erin")
        transport, _ = await aioice.turn.create_turn_endpoint(Collect, server.address("udp"), user, password)
        try:
            assert await http_get(port, "/health") == (200, "ok\n")
            server.signal(signal.SIGTERM)  # the first SIGTERM drains: allocations stay

            async def draining() -> bool:
                return await http_get(port, "/health") == (503, "draining\n")

            assert await wait_for(draining)
            now = await scrape(server)  # metrics keep answering during the drain
            assert now.get("turn_draining") == 1
            assert now.get("turn_allocations", transport="udp", family="ipv4") == 1
            with pytest.raises(Exception):  # new allocations are refused (508)
                await aioice.turn.create_turn_endpoint(Collect, server.address("udp"), user, password)
            assert (await scrape(server)).get("turn_allocations_refused_total", reason="draining") == 1
        finally:
            transport.close()  # the last allocation goes: the drain completes and the process exits

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert server.proc.wait(timeout=15) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
