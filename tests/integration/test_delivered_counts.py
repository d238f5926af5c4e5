"""Bytes counted toward a client are the bytes delivered to it: peer data that a full stream
write buffer drops, or that the kernel refuses to send to a UDP client, is in neither the
usage record nor ``turn_relayed_*_total``. All traffic stays on 127.0.0.0/8; every loop is
bounded in count and in time."""

from __future__ import annotations

import time
from typing import Any, Callable

from .server import RunningServer
from .test_faults import RelayedClient, usage
from .test_soak import scrape_now, wait_until
from .test_stream_limits import allocated_client
from .test_stream_support import PEER_IP, STREAM_OPTIONS

# Datagrams the peer sends per burst: fewer than the relay socket's receive buffer holds, so
# the kernel drops none before the server reads them.
BURST = 40
BURSTS = 40  # 1,600 x 1,200 bytes: several times what the write buffer and the kernel hold


def peer_to_client(server: RunningServer, transport: str) -> tuple[float, float]:
    """(datagrams counted toward clients of ``transport``, stream messages dropped)."""
    now = scrape_now(server)
    counted = now.get("turn_relayed_packets_total", direction="peer_to_client", transport=transport)
    dropped = now.get("turn_stream_write_dropped_messages_total")
    return counted or 0.0, dropped or 0.0


def test_a_stream_client_that_does_not_read_is_billed_for_what_was_written(
        server_factory: Callable[..., RunningServer]) -> None:
    # No bandwidth cap: every datagram reaches the connection's write buffer.
    server = server_factory(stream_write_buffer_bytes=65536, log_format="json",
                            metrics_listen="127.0.0.1:0", allocation_bandwidth_bytes_s=0,
                            **STREAM_OPTIONS)
    # A small receive window, so the kernel cannot hide the backlog on the client's side.
    client, peer, relayed = allocated_client(server, "tcp", rcvbuf=4096, user="stalled")
    payload = b"\xab" * 1200  # a multiple of 4: no padding on the stream
    sent = 0
    received: list[bytes] = []
    try:
        for _ in range(BURSTS):  # the client reads nothing meanwhile
            for _ in range(BURST):
                peer.sendto(payload, relayed)
            sent += BURST
            # Paced by what the server has taken off the relay socket.
            assert wait_until(lambda: sum(peer_to_client(server, "tcp")) >= sent, 5.0), \
                (sent, peer_to_client(server, "tcp"))
        counted, dropped = peer_to_client(server, "tcp")
        print(f"stalled tcp: {sent} datagrams offered, {counted:.0f} counted, {dropped:.0f} dropped")
        assert dropped > 0, "the write buffer never filled: nothing here was under test"
        # Offered = written + dropped, each datagram counted once.
        assert counted + dropped == sent, (counted, dropped, sent)
        # Now the client reads everything that was written to it.
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            frame = client.recv_frame(1.0)
            if frame is None:
                break
            received.append(frame)
        assert all(frame[:2] == b"\x40\x00" and frame[4:] == payload for frame in received)
        assert len(received) == counted, (len(received), counted)
    finally:
        client.close()
        peer.close()
    assert server.stop() == 0
    records = [r for r in usage(server) if r["user"].endswith(":stalled")]
    assert len(records) == 1, records
    assert records[0]["packets_to_client"] == len(received) == sent - dropped
    assert records[0]["bytes_to_client"] == len(received) * len(payload)


def test_a_peer_datagram_too_big_for_a_udp_client_is_counted_not_billed(
        server_factory: Callable[..., RunningServer]) -> None:
    options: dict[str, Any] = {"log_format": "json", "metrics_listen": "127.0.0.1:0",
                               "allowed_peers": [f"{PEER_IP}/32"]}
    server = server_factory(**options)
    relayed = RelayedClient(server, "big")
    try:
        # 65,507 bytes is the most an IPv4 UDP datagram carries: the relay takes it, but with
        # the 4-byte ChannelData header it no longer fits in one toward the client, so the
        # core drops it as too_big before the kernel would refuse it.
        relayed.peer.sendto(b"\x00" * 65507, relayed.relayed)
        relayed.round_trip(b"after")  # and the way back still works
        now = scrape_now(server)
        assert now.get("turn_dropped_packets_total", reason="too_big") == 1
        assert now.get("turn_dropped_packets_total", reason="send_failed") == 0
        assert now.get("turn_relayed_packets_total", direction="peer_to_client", transport="udp") == 1
        assert now.get("turn_relayed_bytes_total", direction="peer_to_client", transport="udp") == \
            len(b"down-after")
    finally:
        relayed.close()
    assert server.stop() == 0
    records = [r for r in usage(server) if r["user"].endswith(":big")]
    assert len(records) == 1, records
    assert (records[0]["bytes_to_client"], records[0]["packets_to_client"]) == (len(b"down-after"), 1)
