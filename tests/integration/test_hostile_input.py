"""Hostile input against the running server: after every burst it still answers, and an
allocation made before the burst still relays."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

from .raw_client import RawTurnClient, code

COOKIE = b"\x21\x12\xa4\x42"


@pytest.fixture
def relay_pair(turn_server):
    """Two allocations with channels to each other, relaying before any abuse."""
    a = RawTurnClient(turn_server.address(), *turn_server.credentials("a"))
    b = RawTurnClient(turn_server.address(), *turn_server.credentials("b"))
    ra, rb = a.relayed(a.allocate()), b.relayed(b.allocate())
    assert code(a.bind(0x4000, rb)) == 200 and code(b.bind(0x4001, ra)) == 200
    yield turn_server, a, b
    a.close()
    b.close()


def assert_still_serving(server, a: RawTurnClient, b: RawTurnClient) -> None:
    probe = RawTurnClient(server.address(), "x", "y")
    try:
        reply = probe.binding()
        assert reply is not None and code(reply) == 200
    finally:
        probe.close()
    payload = os.urandom(100)
    a.send_raw(struct.pack("!HH", 0x4000, len(payload)) + payload)
    got = b.recv()
    assert got == struct.pack("!HH", 0x4001, len(payload)) + payload
    assert server.alive()


def header(msg_type: int, length: int, txid: bytes | None = None) -> bytes:
    return struct.pack("!HH", msg_type, length) + COOKIE + (txid or os.urandom(12))


def burst(server, packets: list[bytes]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for packet in packets:
            sock.sendto(packet, server.address())
    finally:
        sock.close()


def test_random_bytes(relay_pair) -> None:
    server, a, b = relay_pair
    rng = random.Random(1)
    burst(server, [rng.randbytes(rng.randint(1, 1500)) for _ in range(500)])
    assert_still_serving(server, a, b)


def test_truncated_overlong_bad_cookie_and_wrong_lengths(relay_pair) -> None:
    server, a, b = relay_pair
    valid = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17))
    packets = [valid[:n] for n in range(len(valid))]  # every truncation
    packets.append(valid + os.urandom(3000))  # trailing junk / over-long
    packets.append(valid[:4] + b"\xde\xad\xbe\xef" + valid[8:])  # bad magic cookie
    packets += [valid[:2] + struct.pack("!H", n) + valid[4:] for n in (0, 3, 7, 400, 0xFFFF)]
    packets.append(header(0x0001, 65000) + os.urandom(60000))  # huge Binding with junk attributes
    burst(server, packets)
    assert_still_serving(server, a, b)


def test_attribute_overruns_get_400_with_the_same_transaction_id(relay_pair) -> None:
    server, a, b = relay_pair
    txid = os.urandom(12)
    body = struct.pack("!HH", Attr.SOFTWARE, 200) + b"abcd"  # claims 200 bytes, has 4
    reply = a.transact_raw(header(0x0003, len(body), txid) + body, txid)
    assert reply is not None and code(reply) == 400 and reply.transaction_id == txid
    assert_still_serving(server, a, b)


def test_bad_integrity_is_401(relay_pair) -> None:
    server, a, b = relay_pair
    msg = Message(Method.REFRESH, MessageClass.REQUEST)
    msg.add(Attr.USERNAME, a.username).add(Attr.REALM, a.realm).add(Attr.NONCE, a.nonce)
    data = encode_message(msg, key=b"\x00" * 16)
    reply = a.transact_raw(data, msg.transaction_id)
    assert reply is not None and code(reply) == 401
    assert_still_serving(server, a, b)


def test_unknown_comprehension_required_attributes_are_420_listing_them(relay_pair) -> None:
    server, a, b = relay_pair
    msg = Message(Method.BINDING, MessageClass.REQUEST).add(0x0031, b"abcd").add(0x7FFE, b"")
    reply = a.transact_raw(encode_message(msg), msg.transaction_id)
    assert reply is not None and code(reply) == 420
    assert reply.get(Attr.UNKNOWN_ATTRIBUTES) == [0x0031, 0x7FFE]
    assert_still_serving(server, a, b)


def test_channel_data_for_unbound_channels_is_dropped(relay_pair) -> None:
    server, a, b = relay_pair
    a.send_raw(struct.pack("!HH", 0x4FFF, 4) + b"nope")
    a.send_raw(struct.pack("!HH", 0x4000, 400) + b"short")  # length beyond the datagram
    assert b.recv(0.5) is None
    assert_still_serving(server, a, b)


def test_requests_from_another_five_tuple_get_437(relay_pair) -> None:
    server, a, b = relay_pair
    intruder = RawTurnClient(server.address(), a.username, a.password)
    try:
        intruder.nonce = None
        assert code(intruder.request(Method.REFRESH)) == 437
        assert code(intruder.permit(("127.0.0.1", 50001))) == 437
        assert code(intruder.bind(0x4000, ("127.0.0.1", 50001))) == 437
    finally:
        intruder.close()
    assert_still_serving(server, a, b)


def test_flood_of_allocates_without_credentials(relay_pair) -> None:
    server, a, b = relay_pair
    packets = [encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17))
               for _ in range(300)]
    burst(server, packets)
    assert_still_serving(server, a, b)
