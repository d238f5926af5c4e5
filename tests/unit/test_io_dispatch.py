"""The data path (turnserver/io/dispatch.py): the first byte of a client message decides where
it goes, for UDP datagrams and stream frames alike; peer data a sink drops is taken back out
of the allocation's counters, so the usage record counts what was delivered."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

from turnserver.config import Config
from turnserver.io import stream
from turnserver.io.dispatch import NO_REPLY, UdpSink, client_message, peer_datagram
from turnserver.io.relay import UdpRelay
from turnserver.io.stream import StreamConnection, StreamServer
from turnserver.stun import Message, MessageClass, Method, decode_message, encode_message

from .turn_harness import CLIENT, PEER, Client, make_core


def closed_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    return sock


class SinkFor:
    """Records which clients a sink was asked for."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    def __call__(self, client: Any) -> str:
        self.asked.append(client)
        return "sink"


def channel_data(number: int, payload: bytes) -> bytes:
    return struct.pack("!HH", number, len(payload)) + payload


def first_max(core: Any) -> int:
    return core.config.channel_max >> 8


def test_stun_goes_to_the_core_with_a_sink_and_its_reply_comes_back() -> None:
    h = make_core()
    sink_for = SinkFor()
    binding = encode_message(Message(Method.BINDING, MessageClass.REQUEST, b"t" * 12))
    reply = client_message(h.core, binding, CLIENT, 1.0, sink_for, first_max(h.core))
    assert reply is not None and reply != NO_REPLY
    answer = decode_message(reply)
    assert (answer.method, answer.msg_class, answer.transaction_id) == (
        Method.BINDING, MessageClass.SUCCESS, b"t" * 12)
    assert sink_for.asked == [CLIENT[1]]
    # STUN with nothing to answer (an indication other than Send) is still STUN: NO_REPLY.
    indication = encode_message(Message(Method.BINDING, MessageClass.INDICATION, b"i" * 12))
    assert client_message(h.core, indication, CLIENT, 1.0, sink_for, first_max(h.core)) == NO_REPLY
    assert h.core.stats.dropped["unexpected_indication"] == 1


def test_channel_data_and_other_bytes_are_not_stun_and_build_no_sink() -> None:
    h = make_core()
    sink_for = SinkFor()
    dropped = h.core.stats.dropped
    assert client_message(h.core, channel_data(0x4000, b"x"), CLIENT, 1.0, sink_for, first_max(h.core)) is None
    assert dropped["unbound_channel"] == 1
    # 0x5000 is RFC 5766's range only: not ChannelData unless legacy_channel_numbers.
    assert client_message(h.core, channel_data(0x5000, b"x"), CLIENT, 1.0, sink_for, first_max(h.core)) is None
    assert dropped["not_stun"] == 1 and dropped["unbound_channel"] == 1
    for first in (0x80, 0xC0, 0xFF):
        assert client_message(h.core, bytes([first]) * 8, CLIENT, 1.0, sink_for, first_max(h.core)) is None
    assert dropped["not_stun"] == 4
    assert sink_for.asked == []
    legacy = make_core(legacy_channel_numbers=True)
    assert client_message(legacy.core, channel_data(0x5000, b"x"), CLIENT, 1.0, sink_for,
                          first_max(legacy.core)) is None
    assert legacy.core.stats.dropped["unbound_channel"] == 1
    assert legacy.core.stats.dropped["not_stun"] == 0


def test_bound_channel_data_goes_out_on_the_relay_socket_and_a_refused_send_is_counted() -> None:
    h = make_core()
    client = Client(h)
    client.allocate()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(1.0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.bind(0.0, 0x4000, PEER)
        route = h.core._routes[(CLIENT, 0x4000)]
        # The relay socket and the peer it reaches are loopback ones: nothing leaves the host.
        route.relay = UdpRelay(sender, ("127.0.0.1", 0))
        route.channel.peer = receiver.getsockname()
        h.core.allocations[CLIENT].permissions["127.0.0.1"] = 1e9
        assert client_message(h.core, channel_data(0x4000, b"media"), CLIENT, 1.0, SinkFor(),
                              first_max(h.core)) is None
        assert receiver.recvfrom(64)[0] == b"media"
        assert h.core.stats.dropped["send_failed"] == 0
        route.relay = UdpRelay(closed_socket(), ("127.0.0.1", 0))
        client_message(h.core, channel_data(0x4000, b"lost"), CLIENT, 1.0, SinkFor(), first_max(h.core))
        assert h.core.stats.dropped["send_failed"] == 1
    finally:
        receiver.close()
        sender.close()


def allocated_with_channel() -> tuple[Any, Any, Any]:
    h = make_core()
    client = Client(h)
    client.allocate()
    client.bind(0.0, 0x4000, PEER)
    allocation = h.core.allocations[CLIENT]
    return h, allocation, allocation.relays[0]


def test_peer_data_a_udp_client_cannot_be_sent_is_counted_and_not_billed() -> None:
    h, allocation, relay = allocated_with_channel()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(1.0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        allocation.sink = UdpSink(sender, receiver.getsockname())
        peer_datagram(h.core, relay, b"delivered", PEER, 1.0)
        assert receiver.recvfrom(64)[0] == channel_data(0x4000, b"delivered")
        # The kernel refuses the next one (the socket is gone): nothing reached the client.
        allocation.sink = UdpSink(closed_socket(), receiver.getsockname())
        peer_datagram(h.core, relay, b"refused-by-kernel", PEER, 1.0)
    finally:
        receiver.close()
        sender.close()
    assert h.core.stats.dropped["send_failed"] == 1
    assert (allocation.bytes_to_client, allocation.packets_to_client) == (len(b"delivered"), 1)
    h.core.shutdown(2.0)
    assert h.core.stats.ended_traffic[("peer_to_client", "udp")] == [len(b"delivered"), 1]


def test_a_sink_that_raises_is_counted_as_an_internal_error() -> None:
    h, allocation, relay = allocated_with_channel()

    class Broken:
        def send(self, data: bytes) -> bool:
            raise RuntimeError("broken sink")

    allocation.sink = Broken()
    peer_datagram(h.core, relay, b"x", PEER, 1.0)
    assert h.core.stats.dropped["internal_error"] == 1


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_stream_connection_is_a_sink_that_reports_and_counts_what_it_drops() -> None:
    loop = asyncio.new_event_loop()
    try:
        streams = StreamServer(loop, get_config=Config, get_core=lambda: None, on_stun=lambda: None)
        conn = StreamConnection(streams, "tcp")
        assert conn.send(b"before-ready") is False  # no transport yet
        transport = FakeTransport()
        conn._transport = transport  # type: ignore[assignment]
        conn._state = stream._READY
        assert conn.send(b"written") is True
        conn.pause_writing()
        assert conn.send(b"dropped") is False
        assert transport.written == [b"written"]
        assert (streams.stats.dropped_messages, streams.stats.dropped_bytes) == (
            2, len(b"before-ready") + len(b"dropped"))

        # Through the data path: what the full buffer dropped is not billed to the client, and
        # is not a send_failed (the stream counters have it).
        h, allocation, relay = allocated_with_channel()
        allocation.sink = conn
        conn.resume_writing()
        peer_datagram(h.core, relay, b"sent", PEER, 1.0)
        conn.pause_writing()
        peer_datagram(h.core, relay, b"not-sent", PEER, 1.0)
        assert transport.written[1:] == [channel_data(0x4000, b"sent")]
        assert (allocation.bytes_to_client, allocation.packets_to_client) == (len(b"sent"), 1)
        assert h.core.stats.dropped["send_failed"] == 0
        assert streams.stats.dropped_messages == 3
    finally:
        loop.close()
