"""Stream limits against the running server: many idle connections, max_connections, idle and
handshake timeouts, and a client that never reads while a peer floods it."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable

import pytest

from turnserver.stun import Attr

from .server import RunningServer
from .test_metrics import scrape
from .test_stream_support import (
    STREAM_OPTIONS,
    StreamTurnClient,
    connect,
    is_closed,
    stream_summary,
    udp_peer,
    vm_rss_kib,
)


def relay_round_trip(client: StreamTurnClient, peer: socket.socket, relayed: tuple[str, int],
                     channel: int, tag: bytes) -> None:
    """One ChannelData each way between ``client`` and its UDP ``peer``; asserts both arrive."""
    client.channel_data(channel, b"up-" + tag)
    data, source = peer.recvfrom(2048)
    while data != b"up-" + tag:  # earlier traffic may still be queued
        data, source = peer.recvfrom(2048)
    assert source == relayed
    peer.sendto(b"down-" + tag, relayed)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        frame = client.recv_frame(max(0.01, deadline - time.monotonic()))
        assert frame is not None, "no data from the peer"
        if frame[4:] == b"down-" + tag:
            return
    raise AssertionError("the peer's data never reached the client")


def allocated_client(server: RunningServer, transport: str = "tcp", channel: int = 0x4000,
                     **kwargs: Any) -> tuple[StreamTurnClient, socket.socket, tuple[str, int]]:
    client = StreamTurnClient(server, transport, **kwargs)
    peer = udp_peer()
    relayed = client.allocate()
    client.bind(channel, peer.getsockname())
    return client, peer, relayed


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_many_idle_connections_do_not_stop_a_new_client(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(max_connections=300, **STREAM_OPTIONS)
    idle = [connect(server, "tcp") for _ in range(200)]
    idle += [connect(server, "tcp-on-tls") for _ in range(50)]  # silent on the TLS port
    try:
        for transport in ("tcp", "tls"):
            client, peer, relayed = allocated_client(server, transport)
            try:
                for i in range(5):
                    relay_round_trip(client, peer, relayed, 0x4000, f"{transport}{i}".encode())
            finally:
                client.close()
                peer.close()
        # None of the idle ones was dropped to make room.
        assert not any(is_closed(sock, 0.001) for sock in idle[:200])
    finally:
        for sock in idle:
            sock.close()


def test_connections_beyond_max_connections_are_refused_while_allocations_keep_relaying(
        server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(max_connections=4, log_format="json", **STREAM_OPTIONS)
    client, peer, relayed = allocated_client(server)
    idle = [connect(server, "tcp"), connect(server, "tcp"), connect(server, "tcp-on-tls")]
    try:
        relay_round_trip(client, peer, relayed, 0x4000, b"full")
        for transport in ("tcp", "tcp-on-tls", "tcp"):
            try:
                extra = connect(server, transport)
            except ConnectionResetError:
                pass  # the refusal's reset came before connect() returned
            else:
                try:
                    assert is_closed(extra, 2.0), f"a {transport} connection over the cap was kept"
                finally:
                    extra.close()
            relay_round_trip(client, peer, relayed, 0x4000, transport.encode())
        # The kept connections were not touched.
        assert not any(is_closed(sock, 0.001) for sock in idle)
        # Room again once one goes: a new connection is served.
        idle.pop().close()
        def served() -> bool:
            probe = StreamTurnClient(server, "tcp")
            try:
                data, tid = probe.binding_bytes()
                probe.send_raw(data)
                return probe.wait_response(tid, 0.5) is not None
            except OSError:
                return False
            finally:
                probe.close()
        assert wait_until(served, 3.0)
        relay_round_trip(client, peer, relayed, 0x4000, b"after")
    finally:
        client.close()
        peer.close()
        for sock in idle:
            sock.close()
    server.stop()
    summary = stream_summary(server)
    assert summary["streams"]["closed"]["capacity"] >= 3


def test_idle_and_silent_connections_are_closed_after_their_timeouts(
        server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(stream_idle_timeout_s=1.0, tls_handshake_timeout_s=1.0, log_format="json",
                            **STREAM_OPTIONS)
    started = time.monotonic()
    silent_tcp = connect(server, "tcp")
    silent_tls = connect(server, "tcp-on-tls")
    half_open_tls = connect(server, "tcp-on-tls")
    half_open_tls.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    binding_only = StreamTurnClient(server, "tcp")
    client, peer, relayed = allocated_client(server)
    try:
        data, tid = binding_only.binding_bytes()
        assert binding_only.transact_raw(data, tid) is not None
        for sock in (silent_tcp, silent_tls, half_open_tls, binding_only.sock):
            assert is_closed(sock, 4.0)
        # Not before the timeout: the first of them cannot have gone in under a second.
        assert time.monotonic() - started >= 0.9
        # The connection with an allocation outlives the idle timeout and still relays.
        time.sleep(1.5)
        relay_round_trip(client, peer, relayed, 0x4000, b"still-here")
        # Once its allocation is gone and it stays quiet, it goes too.
        reply = client.refresh(0)
        assert reply.get(Attr.LIFETIME) == 0  # deleted
        ended = time.monotonic()
        assert client.closed_by_server(4.0)
        assert time.monotonic() - ended >= 0.9
    finally:
        for sock in (silent_tcp, silent_tls, half_open_tls):
            sock.close()
        binding_only.close()
        client.close()
        peer.close()
    server.stop()
    closed = stream_summary(server)["streams"]["closed"]
    assert closed["idle"] >= 3 and closed["handshake"] >= 2, closed


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_client_that_never_reads_costs_bounded_memory(server_factory: Callable[..., RunningServer],
                                                        transport: str) -> None:
    limit = 65536
    # No bandwidth cap: the flood must reach the stream layer, whose drops are under test.
    server = server_factory(stream_write_buffer_bytes=limit, log_format="json",
                            allocation_bandwidth_bytes_s=0, **STREAM_OPTIONS)
    # A small receive window, so the kernel cannot hide the backlog on the client's side.
    stalled, flood_peer, stalled_relayed = allocated_client(server, transport, rcvbuf=4096)
    other, other_peer, other_relayed = allocated_client(server, "tcp")
    try:
        relay_round_trip(other, other_peer, other_relayed, 0x4000, b"warm-up")
        baseline_kib = vm_rss_kib(server.proc.pid)
        payload = b"\xab" * 1200
        total_bytes = 0
        for batch in range(60):  # 60 x 500 x 1200 bytes = 36 MB at the stalled client
            for _ in range(500):
                flood_peer.sendto(payload, stalled_relayed)
            total_bytes += 500 * len(payload)
            time.sleep(0.005)  # let the server drain its relay socket instead of the kernel dropping
            if batch % 10 == 9:
                relay_round_trip(other, other_peer, other_relayed, 0x4000, f"during-{batch}".encode())
        relay_round_trip(other, other_peer, other_relayed, 0x4000, b"after")
        grown_kib = vm_rss_kib(server.proc.pid) - baseline_kib
        # Queued without bound, tens of MB would be held; the kernel's own socket buffers
        # (a few MB) are all that may add to the write limit.
        assert grown_kib < 6 * 1024, f"server RSS grew by {grown_kib} KiB while flooding {total_bytes} bytes"
    finally:
        stalled.close()
        flood_peer.close()
        other.close()
        other_peer.close()
    server.stop()
    summary = stream_summary(server)["streams"]
    assert summary["dropped_messages"] > 1000, summary
    assert summary["dropped_bytes"] >= summary["dropped_messages"] * 1200, summary


def test_a_closed_connection_whose_client_never_reads_is_cut_off_after_the_grace_period(
        server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(stream_write_buffer_bytes=65536, tls_handshake_timeout_s=1.0,
                            metrics_listen="127.0.0.1:0", allocation_bandwidth_bytes_s=0,
                            **STREAM_OPTIONS)
    stalled, flood_peer, stalled_relayed = allocated_client(server, "tcp", rcvbuf=4096)

    def open_tcp() -> float | None:
        return asyncio.run(scrape(server)).get("turn_stream_connections", transport="tcp")

    try:
        payload = b"\xcd" * 1200
        for _ in range(20):  # 12 MB: more than the kernel's socket buffers hold
            for _ in range(500):
                flood_peer.sendto(payload, stalled_relayed)
            time.sleep(0.005)
        # The server's queue toward the client is now full; a framing error makes it close
        # the connection, which cannot flush what is queued.
        stalled.send_raw(b"\xff" * 8)
        assert open_tcp() == 1
        assert wait_until(lambda: open_tcp() == 0, 4.0), "the connection was never let go"
    finally:
        stalled.close()
        flood_peer.close()
