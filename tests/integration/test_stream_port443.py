"""TURN on port 443 for clients behind firewalls that only let HTTPS out: UDP and TLS bound on
the same port, and plain TCP TURN answered on that TLS port too. The tested listener options:

    listen_udp = ["127.0.0.1:443"]
    listen_tcp = []
    listen_tls = ["127.0.0.1:443"]

(``listen_tcp`` must not name the TLS port: the TLS listener already takes plain TURN there.)
Binding 443 needs root or CAP_NET_BIND_SERVICE; the test is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest

from .server import RunningServer, start_server
from .test_stream_aioice import relay_both_ways

PORT = 443


def port_free(kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            # As the server binds: connections of an earlier run in TIME_WAIT do not count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", PORT))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (port_free(socket.SOCK_STREAM) and port_free(socket.SOCK_DGRAM)),
    reason="binding 127.0.0.1:443 needs root and a free port 443",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(Path(tmp_path_factory.mktemp("port443")), listen_udp=[f"127.0.0.1:{PORT}"],
                       listen_tcp=[], listen_tls=[f"127.0.0.1:{PORT}"])
    yield srv
    srv.stop()


def test_udp_and_tls_share_port_443(server: RunningServer) -> None:
    assert server.port("udp") == PORT and server.port("tls") == PORT


@pytest.mark.parametrize("transport", ["tls", "tcp-on-tls"])
def test_relaying_over_port_443(server: RunningServer, transport: str) -> None:
    got1, got2 = asyncio.run(asyncio.wait_for(relay_both_ways(server, transport), 20))
    sizes = [1, 5, 100, 1001, 1400]
    assert got2 == [bytes([i]) * size for i, size in enumerate(sizes)]
    assert got1 == [bytes([100 + i]) * size for i, size in enumerate(sizes)]


def test_udp_relaying_over_port_443(server: RunningServer) -> None:
    import aioice.turn

    from .test_stream_aioice import Collect

    async def scenario() -> tuple[bytes, bytes]:
        username, password = server.credentials("alice")
        addr = ("127.0.0.1", PORT)
        t1, p1 = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600)
        t2, p2 = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600)
        try:
            r1, r2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
            t1.sendto(b"open", r2)
            t2.sendto(b"open", r1)
            await asyncio.sleep(0.3)
            t1.sendto(b"to-two", r2)
            t2.sendto(b"to-one", r1)
            async def next_real(proto: Collect) -> bytes:
                while True:
                    data, _ = await proto.queue.get()
                    if data != b"open":
                        return data
            return await asyncio.wait_for(next_real(p1), 5), await asyncio.wait_for(next_real(p2), 5)
        finally:
            t1.close()
            t2.close()
            await asyncio.sleep(0.2)

    assert asyncio.run(scenario()) == (b"to-one", b"to-two")
