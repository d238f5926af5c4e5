"""A datagram the kernel will not take is dropped and counted, never raised."""

from __future__ import annotations

import socket

from turnserver.io.relay import UdpRelay
from turnserver.io.server import UdpSink


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


def test_relay_reports_a_failed_send() -> None:
    relay = UdpRelay(closed_socket(), ("127.0.0.1", 50000))
    assert relay.sendto(b"x", ("127.0.0.1", 9)) is False


def test_failed_sends_are_counted_as_send_failed(tmp_path) -> None:
    from turnserver.io.server import TurnServer

    from .turn_harness import make_core

    harness = make_core()

    class FailingSink:
        def send(self, data: bytes) -> bool:
            return False

    class Loop:
        def time(self) -> float:
            return 1.0

    server = TurnServer.__new__(TurnServer)
    server.core = harness.core
    server.loop = Loop()  # type: ignore[assignment]
    harness.core.handle_peer_data = lambda relay, data, peer, now: (FailingSink(), data)  # type: ignore[method-assign]
    server._on_peer_datagram(None, b"media", ("203.0.113.5", 1))  # type: ignore[arg-type]
    assert harness.core.stats.dropped["send_failed"] == 1
