"""aioice (an independent TURN client) over TCP and TLS against the running server:
allocation to allocation, data both ways; and what closing a stream connection does."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import aioice.turn
import pytest

from .server import RunningServer, start_server
from .test_stream_support import STREAM_OPTIONS, StreamTurnClient, client_tls_context, udp_peer, usage_records

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(Path(tmp_path_factory.mktemp("stream-aioice")), log_format="json", **STREAM_OPTIONS)
    yield srv
    srv.stop()


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))


async def relay_both_ways(server: RunningServer, transport: str) -> tuple[list[bytes], list[bytes]]:
    username, password = server.credentials("alice")
    port = server.port("tls" if transport in ("tls", "tcp-on-tls") else "tcp")
    context = client_tls_context(["stun.turn"]) if transport == "tls" else None
    addr = ("127.0.0.1", port)
    t1, p1 = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600,
                                                    transport="tcp", ssl=context)
    t2, p2 = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600,
                                                    transport="tcp", ssl=context)
    try:
        r1, r2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
        assert r1 != r2 and r1[0] == "127.0.0.1"
        # aioice binds a channel on first send, which also installs the permission; the first
        # datagram each way may arrive before the other side's permission exists.
        t1.sendto(b"open", r2)
        t2.sendto(b"open", r1)
        await asyncio.sleep(0.3)
        got1: list[bytes] = []
        got2: list[bytes] = []
        sizes = [1, 5, 100, 1001, 1400]  # odd sizes: ChannelData padding on the stream
        for i, size in enumerate(sizes):
            t1.sendto(bytes([i]) * size, r2)
            t2.sendto(bytes([100 + i]) * size, r1)
        deadline = time.monotonic() + TIMEOUT_S
        while (len(got1) < len(sizes) or len(got2) < len(sizes)) and time.monotonic() < deadline:
            for proto, got in ((p1, got1), (p2, got2)):
                while not proto.queue.empty():
                    data, _ = proto.queue.get_nowait()
                    if data != b"open":
                        got.append(data)
            await asyncio.sleep(0.02)
        return got1, got2
    finally:
        t1.close()
        t2.close()
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("transport", ["tcp", "tls", "tcp-on-tls"])
def test_aioice_allocation_to_allocation_both_ways(server: RunningServer, transport: str) -> None:
    got1, got2 = asyncio.run(asyncio.wait_for(relay_both_ways(server, transport), 20))
    sizes = [1, 5, 100, 1001, 1400]
    assert got2 == [bytes([i]) * size for i, size in enumerate(sizes)]
    assert got1 == [bytes([100 + i]) * size for i, size in enumerate(sizes)]


def test_usage_records_name_the_stream_transport(server: RunningServer) -> None:
    asyncio.run(asyncio.wait_for(relay_both_ways(server, "tls"), 20))
    asyncio.run(asyncio.wait_for(relay_both_ways(server, "tcp"), 20))
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        transports = {r["usage"]["transport"] for r in usage_records(server)}
        if {"tcp", "tls"} <= transports:
            break
        time.sleep(0.05)
    assert {"tcp", "tls"} <= transports


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_closing_the_connection_frees_the_allocation_at_once(server: RunningServer, transport: str) -> None:
    client = StreamTurnClient(server, transport)
    peer = udp_peer()
    try:
        relayed = client.allocate()
        client.bind(0x4000, peer.getsockname())
        peer.sendto(b"before", relayed)
        assert client.recv_frame() is not None  # the relay works while the connection lives
        client.close()
        # RFC 8656 §3.1: the allocation goes with the connection; no Refresh(0) was sent.
        deadline = time.monotonic() + 1.0
        freed = False
        while not freed and time.monotonic() < deadline:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind(relayed)
                freed = True
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        assert freed, "the relayed port stayed bound after the client closed its connection"
    finally:
        client.close()
        peer.close()
    deadline = time.monotonic() + 2.0
    record = None
    while record is None and time.monotonic() < deadline:
        record = next((r["usage"] for r in usage_records(server)
                       if r["usage"]["relayed"] == [f"{relayed[0]}:{relayed[1]}"]
                       and r["usage"]["reason"] == "connection_closed"), None)
        time.sleep(0.05)
    assert record is not None, "no usage record with reason connection_closed"
    assert record["transport"] == transport
    assert record["packets_to_client"] == 1
