"""RFC 8656 §12.5 stream framing against the running server, with raw sockets: STUN and
ChannelData whole, split byte by byte, coalesced, padded, and garbage after a good message.
Every test runs over plain TCP, over TLS, and as plain TURN sent to the TLS port."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

from turnserver.stun import Attr, MessageClass, Method, decode_message, encode_channel_data

from .server import RunningServer, start_server
from .test_stream_support import STREAM_OPTIONS, StreamTurnClient, connect, is_closed, udp_peer

TRANSPORTS = ["tcp", "tls", "tcp-on-tls"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = start_server(Path(tmp_path_factory.mktemp("stream-framing")), **STREAM_OPTIONS)
    yield srv
    srv.stop()


@pytest.fixture(params=TRANSPORTS)
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[StreamTurnClient]:
    c = StreamTurnClient(server, request.param)
    yield c
    c.close()


def test_allocate_whole_gets_401_then_success_with_the_stream_five_tuple(client: StreamTurnClient) -> None:
    relayed = client.allocate(LIFETIME=600)
    assert relayed[0] == "127.0.0.1" and 50000 <= relayed[1] <= 50999
    # The allocation belongs to this connection: a second Allocate on it is refused (437).
    data, tid = client.encode_request(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)])
    reply = client.transact_raw(data, tid)
    assert reply is not None and reply.get(Attr.ERROR_CODE)[0] == 437


def test_request_split_byte_by_byte_is_answered_once(client: StreamTurnClient) -> None:
    client.allocate()  # sets the nonce, so the split request carries integrity
    data, tid = client.encode_request(Method.REFRESH, [(Attr.LIFETIME, 1200)])
    assert len(data) > 60
    for i in range(len(data)):
        client.send_raw(data[i:i + 1])
        time.sleep(0.002)  # TCP_NODELAY: each byte leaves in its own segment
    reply = client.wait_response(tid)
    assert reply is not None and reply.msg_class == MessageClass.SUCCESS
    assert reply.get(Attr.LIFETIME) == 1200
    assert client.recv_frame(0.3) is None  # nothing else came back


def test_coalesced_requests_are_answered_in_order(client: StreamTurnClient) -> None:
    first, tid1 = client.binding_bytes()
    second, tid2 = client.binding_bytes()
    third, tid3 = client.binding_bytes()
    # Two and a half messages, then the rest: frames straddle the send boundaries.
    blob = first + second + third
    cut = len(first) + len(second) + 7
    client.send_raw(blob[:cut])
    time.sleep(0.05)
    client.send_raw(blob[cut:])
    ids = []
    for _ in range(3):
        frame = client.recv_frame()
        assert frame is not None
        msg = decode_message(frame)
        assert msg.msg_class == MessageClass.SUCCESS and msg.method == Method.BINDING
        ids.append(msg.transaction_id)
    assert ids == [tid1, tid2, tid3]


def test_channel_data_padded_both_ways(client: StreamTurnClient) -> None:
    peer = udp_peer()
    try:
        relayed = client.allocate()
        client.bind(0x4001, peer.getsockname())
        # Client -> peer: payloads of 5 and 6 bytes, each padded to a multiple of 4, in one
        # send together with a STUN request; the peer gets the payloads without padding.
        binding, tid = client.binding_bytes()
        client.send_raw(encode_channel_data(0x4001, b"abcde", pad=True)
                        + encode_channel_data(0x4001, b"fghijk", pad=True) + binding)
        assert peer.recvfrom(100) == (b"abcde", relayed)
        assert peer.recvfrom(100) == (b"fghijk", relayed)
        reply = client.wait_response(tid)
        assert reply is not None and reply.msg_class == MessageClass.SUCCESS
        # Peer -> client: 5 bytes arrive as 4 + 5 + 3 zero bytes, and the next frame starts
        # on the 4-byte boundary.
        peer.sendto(b"12345", relayed)
        assert client.recv_exact(12) == struct.pack("!HH", 0x4001, 5) + b"12345" + b"\x00\x00\x00"
        peer.sendto(b"12345678", relayed)
        assert client.recv_exact(12) == struct.pack("!HH", 0x4001, 8) + b"12345678"
    finally:
        peer.close()


def test_garbage_after_a_valid_request_answers_it_then_closes(server: RunningServer,
                                                                client: StreamTurnClient) -> None:
    binding, tid = client.binding_bytes()
    # 0xFF starts neither STUN nor ChannelData: the stream cannot be resynchronised.
    client.send_raw(binding + b"\xff" * 24)
    reply = client.wait_response(tid)
    assert reply is not None and reply.msg_class == MessageClass.SUCCESS
    assert client.closed_by_server()
    # The listener itself is unharmed: a new connection is served.
    other = StreamTurnClient(server, "tcp")
    try:
        data, tid2 = other.binding_bytes()
        reply = other.transact_raw(data, tid2)
        assert reply is not None and reply.msg_class == MessageClass.SUCCESS
    finally:
        other.close()


def test_stun_with_a_bad_magic_cookie_closes_the_connection(client: StreamTurnClient) -> None:
    binding, _ = client.binding_bytes()
    client.send_raw(binding[:4] + b"\x00\x00\x00\x00" + binding[8:])
    assert client.closed_by_server()


HANDSHAKE_TIMEOUT_S = 2.0


def test_tls_port_closes_a_silent_connection_only_after_the_handshake_timeout(tmp_path: Path) -> None:
    # A connection to the TLS port that sends nothing is still open after a moment (the server
    # waits for the first byte, it does not guess), and closed once tls_handshake_timeout_s
    # has passed.
    server = start_server(tmp_path / "turnd", tls_handshake_timeout_s=HANDSHAKE_TIMEOUT_S, **STREAM_OPTIONS)
    try:
        sock = connect(server, "tcp-on-tls")
        connected_at = time.monotonic()
        try:
            assert not is_closed(sock, HANDSHAKE_TIMEOUT_S / 2)
            assert is_closed(sock, HANDSHAKE_TIMEOUT_S + 3.0), "still open well after the handshake timeout"
            assert time.monotonic() - connected_at >= HANDSHAKE_TIMEOUT_S - 0.1
        finally:
            sock.close()
    finally:
        server.stop()
