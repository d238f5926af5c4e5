"""The I/O layer's edges: datagrams the kernel will not take are dropped and counted, never
raised; a relay bind that fails leaves nothing half-bound behind; configured addresses are
canonical before anything compares them."""

from __future__ import annotations

import asyncio
import errno
import socket

from turnserver.io.dispatch import UdpSink, send_to_peer
from turnserver.io.datapath import DataPlane
from turnserver.io.relay import RelayPortPool, UdpRelay
from turnserver.turn.core import SendToPeer
from turnserver.turn.stats import CoreStats


def closed_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    return sock


def test_udp_sink_reports_a_failed_send() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(1.0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert UdpSink(sender, receiver.getsockname()).send(b"ok") is True
        assert receiver.recvfrom(16)[0] == b"ok"
        assert UdpSink(closed_socket(), receiver.getsockname()).send(b"x") is False
    finally:
        receiver.close()
        sender.close()


def test_send_to_peer_counts_only_failures() -> None:
    # Every client->peer path (UDP ChannelData, Send indications, TCP/TLS frames) uses it.
    stats = CoreStats()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        send_to_peer(SendToPeer(UdpRelay(sender, ("127.0.0.1", 0)), b"ok", receiver.getsockname()), stats)
        assert stats.dropped["send_failed"] == 0
        send_to_peer(SendToPeer(UdpRelay(closed_socket(), ("127.0.0.1", 0)), b"x", receiver.getsockname()), stats)
        assert stats.dropped["send_failed"] == 1
    finally:
        receiver.close()
        sender.close()


def test_a_failing_reservation_bind_releases_the_first_port() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        pool = RelayPortPool(loop, ["127.0.0.1"], (50200, 50299), DataPlane(loop, None, None))
        real_bind = pool._bind
        calls = []

        def bind(ip: str, port: int, df: bool):
            calls.append(port)
            if len(calls) == 2:  # the reserved port+1: out of descriptors
                raise OSError(errno.EMFILE, "Too many open files")
            return real_bind(ip, port, df)

        pool._bind = bind  # type: ignore[method-assign]
        assert pool.allocate(1, even_port=True, reserve_next=True) is None
        assert pool.open_count == 0 and pool._in_use["127.0.0.1"] == set()
        assert pool.bind_failures == 1
        pool._bind = real_bind  # type: ignore[method-assign]
        relay, reserved = pool.allocate(1, even_port=True, reserve_next=True)
        assert reserved is not None and reserved.address[1] == relay.address[1] + 1
        pool.release(relay)
        pool.release(reserved)
        assert pool.open_count == 0

    asyncio.run(run())


def test_configured_addresses_are_canonicalised() -> None:
    from turnserver.config import load_config
    from turnserver.io.server import external_map

    config = load_config(None, env={}, overrides={"relay_addresses": ["2001:DB8:0::1"],
                                                  "external_addresses": ["2001:DB8:0:0::9=2001:db8::1"]})
    assert external_map(config, ["2001:db8::1"]) == {"2001:db8::1": "2001:db8::9"}


def test_descriptors_needed_counts_relays_connections_and_listeners() -> None:
    from turnserver.config import Config
    from turnserver.io.server import descriptors_needed

    config = Config(max_allocations=1000, max_connections=500, relay_port_min=50000,
                    relay_port_max=59999, listen_udp=("0.0.0.0:3478",), listen_tcp=("0.0.0.0:3478",),
                    listen_tls=())
    # TCP allocations: a connection may also hold a relay listener and a peer connection.
    assert descriptors_needed(config, ["192.0.2.1"]) == 1000 + 3 * 500 + 2 + 64
    # Dual stack: two relay sockets per allocation; never more than the port range holds.
    assert descriptors_needed(config, ["192.0.2.1", "2001:db8::1"]) == 2000 + 3 * 500 + 2 + 64
    udp_only = Config(max_allocations=1000, max_connections=500, relay_port_min=50000,
                      relay_port_max=59999, listen_udp=("0.0.0.0:3478",),
                      listen_tcp=("0.0.0.0:3478",), listen_tls=(), tcp_relay=False)
    assert descriptors_needed(udp_only, ["192.0.2.1"]) == 1000 + 500 + 2 + 64
    unlimited = Config(max_allocations=0, relay_port_min=50000, relay_port_max=50099,
                       listen_tcp=(), listen_tls=())
    assert descriptors_needed(unlimited, ["192.0.2.1"]) == 100 + 0 + 2 + 64


def test_the_soft_descriptor_limit_is_raised_and_a_short_hard_limit_warned_about() -> None:
    # In a child process, so this one's limits stay as they are.
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from turnserver.io.server import fit_descriptor_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
        "assert fit_descriptor_limit(2000) is None\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 2000\n"
        "warning = fit_descriptor_limit(10000)\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 4096\n"
        "assert 'max_allocations' in warning and 'max_connections' in warning, warning\n"
        "assert 'LimitNOFILE' in warning and '4096' in warning, warning\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
