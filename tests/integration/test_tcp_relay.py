"""TCP relay allocations (RFC 6062) through a running turnd: coturn's turnutils_uclient -T, which
opens connections both ways between two TCP allocations (over TCP and over TLS), and a small
client of ours for exact cases: a peer that connects in (and one without permission, reset), a
Connect to a listening peer (from the relayed address, as RFC 6062 §5.2 says), a peer that
refuses (447), a Connect the peer policy refuses (403), a client that never sends
ConnectionBind (both connections closed after 30 s), the per-allocation limit, and the end of
the control connection taking every peer connection with it. The bytes counted in the metrics
and the usage record are the bytes the peers received."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pytest

from turnserver.stun import Attr, Method

from .server import RunningServer
from .stream_client import StreamTurnClient, closed_by_server, code
from .test_metrics import scrape

PEER_IP = "127.0.0.1"


def tcp_server(server_factory: Callable[..., RunningServer], **extra: Any) -> RunningServer:
    options: dict[str, Any] = {"listen_tcp": ["127.0.0.1:0"], "metrics_listen": "127.0.0.1:0",
                               "allowed_peers": [f"{PEER_IP}/32"], "log_format": "json"}
    options.update(extra)
    return server_factory(**options)


def control(server: RunningServer, user: str = "alice", tls: bool = False) -> StreamTurnClient:
    client = StreamTurnClient(server.address("tls" if tls else "tcp"), *server.credentials(user), tls=tls)
    reply = client.allocate_tcp()
    assert code(reply) == 200, reply
    return client


def data_connection(server: RunningServer, owner: StreamTurnClient, cid: int) -> StreamTurnClient:
    data = StreamTurnClient(server.address("tcp"), owner.username, owner.password)
    data.nonce = owner.nonce  # the nonce is bound to the client's IP, not to the connection
    reply = data.connection_bind(cid)
    assert code(reply) == 200, reply
    return data


def listening_peer() -> socket.socket:
    sock = socket.socket()
    sock.bind((PEER_IP, 0))
    sock.listen(4)
    sock.settimeout(5.0)
    return sock


def usage_records(server: RunningServer) -> list[dict[str, Any]]:
    records = []
    for line in server.log_text().splitlines():
        if line.startswith("{") and '"usage"' in line:
            records.append(json.loads(line)["usage"])
    return records


def metric(scraped: Any, name: str, **labels: str) -> float:
    value = scraped.get(name, **labels)
    assert value is not None, f"{name}{labels} not exported"
    return value


@pytest.fixture
def uclient() -> str:
    path = shutil.which("turnutils_uclient")
    if path is None:
        pytest.skip("coturn's turnutils_uclient is not installed")
    return path


def run_uclient(uclient: str, server: RunningServer, *extra: str, port: int) -> str:
    # -z 100: over TLS at its default 20 ms uclient counts a few messages lost even against
    # coturn (it counts TLS records); at 100 ms it counts every one.
    args = [uclient, "-T", *extra, "-n", "20", "-l", "200", "-m", "2", "-z", "100",
            "-W", server.secret, "-u", "tcpuser", "-p", str(port), "127.0.0.1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=90)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    return text


def uclient_totals(text: str) -> tuple[int, int, int]:
    sent, received = map(int, re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\n", text + "\n")[-1])
    lost = int(re.findall(r"Total lost packets (\d+)", text)[-1])
    return sent, received, lost


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_uclient_relays_over_tcp_allocations_both_ways(server_factory, uclient: str,
                                                       transport: str) -> None:
    server = tcp_server(server_factory, listen_tls=["127.0.0.1:0"])
    extra = ("-S",) if transport == "tls" else ()
    text = run_uclient(uclient, server, *extra, port=server.port(transport))
    sent, received, lost = uclient_totals(text)
    assert sent == received == 40 and lost == 0, text[-1500:]
    scraped = asyncio.run(scrape(server))
    # Each of the two clients connected to the other's relayed address: one Connect each way,
    # each announced to the other side with ConnectionAttempt and bound by both.
    for direction in ("outbound", "inbound"):
        assert metric(scraped, "turn_tcp_peer_connections_total", direction=direction, result="bound") >= 1
    assert metric(scraped, "turn_requests_total", method="connection_bind", code="200") >= 2
    # 40 messages of 200 bytes went from client to peer, and came back from peer to client,
    # through the two allocations: each byte counted once per allocation it crossed.
    assert metric(scraped, "turn_relayed_bytes_total", direction="client_to_peer",
                  transport=transport) >= 40 * 200
    server.stop()
    records = [r for r in usage_records(server) if r.get("relay_transport") == "tcp"]
    assert len(records) >= 2 and all(r["transport"] == transport for r in records)
    assert sum(r["bytes_to_peer"] for r in records) >= 40 * 200
    assert all(r["tcp_connections"] >= 1 for r in records if r["bytes_to_peer"])


def test_a_peer_connects_in_and_bytes_go_both_ways(server_factory, tmp_path) -> None:
    audit = tmp_path / "usage.log"
    server = tcp_server(server_factory, usage_log_file=str(audit), usage_log_flush_s=0.05)
    alice = control(server)
    relayed = alice_relayed(alice)
    # No permission yet: the relay accepts at the kernel level and resets at once.
    early = socket.create_connection(relayed, timeout=5.0)
    assert closed_by_server(early, 5.0)
    early.close()
    assert alice.wait_attempt(0.5) is None
    assert code(alice.permit((PEER_IP, 0))) == 200
    peer = socket.create_connection(relayed, timeout=5.0)
    try:
        attempt = alice.wait_attempt()
        assert attempt is not None
        assert attempt.get(Attr.XOR_PEER_ADDRESS) == peer.getsockname()
        peer_port, cid = peer.getsockname()[1], attempt.get(Attr.CONNECTION_ID)
        data = data_connection(server, alice, cid)
        up = os.urandom(100_000)
        down = os.urandom(150_000)
        data.sock.sendall(up)
        got = bytearray()
        peer.settimeout(5.0)
        while len(got) < len(up):
            chunk = peer.recv(65536)
            assert chunk
            got += chunk
        assert bytes(got) == up
        peer.sendall(down)
        assert data.recv_exactly(len(down)) == down
        # The peer closes: the data connection ends too; the allocation stays.
        peer.close()
        assert closed_by_server(data.sock, 5.0)
        assert code(alice.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 200
        scraped = asyncio.run(scrape(server))
        assert metric(scraped, "turn_tcp_peer_connections_total", direction="inbound", result="no_permission") == 1
        assert metric(scraped, "turn_tcp_peer_connections_total", direction="inbound", result="bound") == 1
        assert metric(scraped, "turn_relayed_bytes_total", direction="client_to_peer", transport="tcp") == len(up)
        assert metric(scraped, "turn_relayed_bytes_total", direction="peer_to_client", transport="tcp") == len(down)
    finally:
        peer.close()
        alice.close()
    server.stop()
    (record,) = usage_records(server)
    assert (record["relay_transport"], record["tcp_connections"]) == ("tcp", 1)
    assert (record["bytes_to_peer"], record["bytes_to_client"]) == (len(up), len(down))
    # The audit log has the connection, with its peer, and the totals; its chain verifies.
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    (bound,) = [e for e in lines if e["event"] == "connection"]
    assert (bound["direction"], bound["peer"]) == ("inbound", f"{PEER_IP}:{peer_port}")
    assert bound["connection_id"] == cid
    (ended,) = [e for e in lines if e["event"] == "ended"]
    assert (ended["relay_transport"], ended["bytes_to_peer"]) == ("tcp", len(up))
    verified = subprocess.run([sys.executable, "-m", "turnserver", "verify-usage-log", str(audit)],
                              capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def alice_relayed(client: StreamTurnClient) -> tuple[str, int]:
    return client.last_relayed


def test_connect_reaches_a_listening_peer_from_the_relayed_address(server_factory) -> None:
    server = tcp_server(server_factory)
    alice = control(server)
    listener = listening_peer()
    try:
        reply = alice.connect(listener.getsockname())
        assert code(reply) == 200, reply
        accepted, source = listener.accept()
        # RFC 6062 §5.2: the relayed transport address is the local end of the connection.
        assert source == alice_relayed(alice)
        data = data_connection(server, alice, reply.get(Attr.CONNECTION_ID))
        data.sock.sendall(b"hello peer")
        accepted.settimeout(5.0)
        assert accepted.recv(100) == b"hello peer"
        accepted.sendall(b"hello client")
        assert data.recv_exactly(12) == b"hello client"
        # A second Connect to the same peer while this one is bound: 446.
        assert code(alice.connect(listener.getsockname())) == 446
        # The client's data connection closes: the peer's connection ends with it.
        data.close()
        assert closed_by_server(accepted, 5.0)
        accepted.close()
    finally:
        listener.close()
        alice.close()


def test_a_peer_that_refuses_gets_447_and_policy_refusals_get_403(server_factory) -> None:
    server = tcp_server(server_factory)
    alice = control(server)
    try:
        closed = socket.socket()
        closed.bind((PEER_IP, 0))
        refusing = closed.getsockname()
        closed.close()  # nothing listens there: the peer's kernel answers with a reset
        started = time.monotonic()
        assert code(alice.connect(refusing)) == 447
        assert time.monotonic() - started < 5.0
        # The server's own listening port is never a peer, nor is an address outside
        # allowed_peers (127.0.0.2 is loopback, refused by default): 403, no connection made.
        assert code(alice.connect(server.address("tcp"))) == 403
        assert code(alice.connect(("127.0.0.2", 9))) == 403
        scraped = asyncio.run(scrape(server))
        assert metric(scraped, "turn_requests_total", method="connect", code="447") == 1
        assert metric(scraped, "turn_requests_total", method="connect", code="403") == 2
        assert metric(scraped, "turn_tcp_peer_connections_total", direction="outbound", result="failed") == 1
        assert metric(scraped, "turn_tcp_peer_connections", state="connecting") == 0
    finally:
        alice.close()


def test_a_client_that_never_sends_connection_bind_loses_both_connections_after_30_s(
        server_factory) -> None:
    server = tcp_server(server_factory)
    alice = control(server)
    listener = listening_peer()
    inbound = None
    try:
        reply = alice.connect(listener.getsockname())
        assert code(reply) == 200
        outbound, _ = listener.accept()
        assert code(alice.permit((PEER_IP, 0))) == 200
        inbound = socket.create_connection(alice_relayed(alice), timeout=5.0)
        attempt = alice.wait_attempt()
        assert attempt is not None
        started = time.monotonic()
        # Neither is bound. Both stay open for 30 s, then both are closed.
        assert not closed_by_server(outbound, 25.0)
        assert closed_by_server(outbound, 10.0) and closed_by_server(inbound, 5.0)
        waited = time.monotonic() - started
        assert 25.0 <= waited <= 40.0
        # Too late now.
        late = StreamTurnClient(server.address("tcp"), alice.username, alice.password)
        late.nonce = alice.nonce
        assert code(late.connection_bind(attempt.get(Attr.CONNECTION_ID))) == 400
        late.close()
        scraped = asyncio.run(scrape(server))
        for direction in ("outbound", "inbound"):
            assert metric(scraped, "turn_tcp_peer_connections_total", direction=direction,
                          result="bind_timeout") == 1
        assert metric(scraped, "turn_tcp_peer_connections", state="pending") == 0
        outbound.close()
    finally:
        if inbound is not None:
            inbound.close()
        listener.close()
        alice.close()


def test_the_limit_per_allocation_and_the_end_of_the_control_connection(server_factory) -> None:
    server = tcp_server(server_factory, max_tcp_connections_per_allocation=1)
    alice = control(server)
    first, second = listening_peer(), listening_peer()
    try:
        reply = alice.connect(first.getsockname())
        assert code(reply) == 200
        accepted, _ = first.accept()
        data = data_connection(server, alice, reply.get(Attr.CONNECTION_ID))
        assert code(alice.connect(second.getsockname())) == 508
        # The control connection goes: the allocation ends, and its connections with it.
        alice.close()
        assert closed_by_server(accepted, 5.0)
        assert closed_by_server(data.sock, 5.0)
        accepted.close()
        data.close()
        scraped = asyncio.run(scrape(server))
        assert metric(scraped, "turn_limit_refusals_total", limit="tcp_connections") == 1
        assert metric(scraped, "turn_tcp_peer_connections", state="bound") == 0
    finally:
        first.close()
        second.close()
        alice.close()


def test_with_two_workers_a_data_connection_on_the_wrong_worker_is_handed_over(
        server_factory) -> None:
    totals = {"tcp": 0.0, "tls": 0.0}
    for attempt in range(3):
        handed = _data_connections_over_two_workers(server_factory, attempt)
        totals = {t: totals[t] + handed[t] for t in totals}
        if all(totals.values()):
            break
    assert all(totals.values()), totals


def _data_connections_over_two_workers(server_factory, attempt: int) -> dict[str, float]:
    """The kernel spreads TCP and TLS connections over the workers, so a data connection often
    reaches a worker other than the allocation's: its ConnectionBind still succeeds (the
    socket, or for TLS a bridge, goes to the right worker) and the bytes get through."""
    server = tcp_server(server_factory, workers=2, listen_tls=["127.0.0.1:0"],
                        relay_port_min=56800, relay_port_max=56863, user_quota=0)
    if attempt:
        time.sleep(0.1)
    listener = listening_peer()
    clients: list[StreamTurnClient] = []
    try:
        for round_ in range(12):
            tls = round_ % 2 == 1
            alice = control(server, f"u{attempt}-{round_}", tls=tls)
            clients.append(alice)
            reply = alice.connect(listener.getsockname())
            assert code(reply) == 200, reply
            accepted, _ = listener.accept()
            data = StreamTurnClient(server.address("tls" if tls else "tcp"), alice.username,
                                    alice.password, tls=tls)
            data.nonce = alice.nonce
            clients.append(data)
            assert code(data.connection_bind(reply.get(Attr.CONNECTION_ID))) == 200
            payload = os.urandom(20_000)
            data.sock.sendall(payload)
            got = bytearray()
            accepted.settimeout(5.0)
            while len(got) < len(payload):
                chunk = accepted.recv(65536)
                assert chunk
                got += chunk
            assert bytes(got) == payload
            accepted.sendall(payload[::-1])
            assert data.recv_exactly(len(payload)) == payload[::-1]
            accepted.close()
        scraped = asyncio.run(scrape(server))
        # 6 data connections of each transport, each on either worker: all 6 on their owner's
        # has odds of 1/64 per transport, so the test tries again with a fresh set then.
        handed = {t: metric(scraped, "turn_stream_handoffs_total", transport=t) for t in ("tcp", "tls")}
        assert metric(scraped, "turn_stream_connections_closed_total", reason="handed_off") == handed["tcp"]
        assert metric(scraped, "turn_tcp_peer_connections_total", direction="outbound", result="bound") == 12
        return handed
    finally:
        for client in clients:
            client.close()
        listener.close()
        server.stop()


def test_admin_lists_a_tcp_allocation_and_disconnect_closes_its_peer_connections(
        server_factory, tmp_path) -> None:
    from .test_admin import admin, admin_json

    server = tcp_server(server_factory, admin_socket=str(tmp_path / "admin.sock"))
    alice = control(server, "carol")
    listener = listening_peer()
    try:
        reply = alice.connect(listener.getsockname())
        assert code(reply) == 200
        accepted, _ = listener.accept()
        data = data_connection(server, alice, reply.get(Attr.CONNECTION_ID))
        data.sock.sendall(b"x" * 5000)
        accepted.settimeout(5.0)
        got = 0
        while got < 5000:
            chunk = accepted.recv(65536)
            assert chunk
            got += len(chunk)
        (session,) = admin_json(server, "sessions", "--user", "carol")["sessions"]
        assert (session["relay_transport"], session["tcp_connections"]) == ("tcp", 1)
        assert session["bytes_to_peer"] == 5000 and session["transport"] == "tcp"
        table = admin(server, "sessions").stdout
        assert "(tcp, 1 connection)" in table
        assert "1 allocation" in admin(server, "disconnect", "--user", "carol").stdout
        # The allocation is gone, and with it the peer connection and the data connection.
        assert closed_by_server(accepted, 5.0) and closed_by_server(data.sock, 5.0)
        accepted.close()
        data.close()
    finally:
        listener.close()
        alice.close()
    server.stop()
    (record,) = usage_records(server)
    assert record["reason"] == "disconnected" and record["bytes_to_peer"] == 5000


def test_the_bandwidth_cap_slows_a_tcp_allocation_and_drops_nothing(server_factory) -> None:
    """TCP cannot drop: over allocation_bandwidth_bytes_s the splice stops reading until the
    token bucket's debt is paid. 400 KB at 100 KB/s (a burst of one second's worth) takes at
    least 3 s, arrives whole, and the cap is counted."""
    server = tcp_server(server_factory, allocation_bandwidth_bytes_s=100_000)
    alice = control(server)
    listener = listening_peer()
    try:
        reply = alice.connect(listener.getsockname())
        accepted, _ = listener.accept()
        data = data_connection(server, alice, reply.get(Attr.CONNECTION_ID))
        payload = os.urandom(400_000)
        started = time.monotonic()
        data.sock.settimeout(30.0)
        data.sock.sendall(payload)
        got = bytearray()
        accepted.settimeout(10.0)
        while len(got) < len(payload):
            chunk = accepted.recv(65536)
            assert chunk
            got += chunk
        elapsed = time.monotonic() - started
        assert bytes(got) == payload
        assert elapsed >= 2.5, elapsed  # the cap's floor: (400 - 100) KB / 100 KB/s, less slack
        scraped = asyncio.run(scrape(server))
        assert metric(scraped, "turn_limit_refusals_total", limit="allocation_bandwidth") >= 1
        assert metric(scraped, "turn_relayed_bytes_total", direction="client_to_peer",
                      transport="tcp") == len(payload)
        accepted.close()
    finally:
        listener.close()
        alice.close()


def test_an_ipv6_tcp_allocation_connects_both_ways_on_ipv6(server_factory) -> None:
    """REQUESTED-ADDRESS-FAMILY IPv6 with a TCP allocation: the relayed address is on ::1, a
    Connect goes out from it, a peer on ::1 connects in, and a peer of the other family is 443."""
    server = tcp_server(server_factory, listen_tcp=["[::1]:0"], relay_addresses=["127.0.0.1", "::1"],
                        allowed_peers=["::1/128", f"{PEER_IP}/32"])
    alice = StreamTurnClient(("::1", server.port("tcp")), *server.credentials("v6"))
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(2)
    listener.settimeout(5.0)
    try:
        assert code(alice.allocate_tcp(family=2)) == 200
        relayed = alice.last_relayed
        assert relayed[0] == "::1"
        reply = alice.connect(listener.getsockname()[:2])
        assert code(reply) == 200, reply
        accepted, source = listener.accept()
        assert source[:2] == relayed  # from the relayed address (RFC 6062 §5.2)
        data = StreamTurnClient(("::1", server.port("tcp")), alice.username, alice.password)
        data.nonce = alice.nonce
        assert code(data.connection_bind(reply.get(Attr.CONNECTION_ID))) == 200
        data.sock.sendall(b"over six")
        accepted.settimeout(5.0)
        assert accepted.recv(100) == b"over six"
        assert code(alice.connect((PEER_IP, 9))) == 443  # an IPv4 peer of an IPv6 allocation
        assert code(alice.permit(("::1", 0))) == 200
        inbound = socket.create_connection(relayed, timeout=5.0)
        attempt = alice.wait_attempt()
        assert attempt is not None and attempt.get(Attr.XOR_PEER_ADDRESS) == inbound.getsockname()[:2]
        inbound.close()
        accepted.close()
        data.close()
    finally:
        listener.close()
        alice.close()
