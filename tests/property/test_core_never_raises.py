"""The core's invariant: no input, however broken, raises out of a handler.

``handle_stun`` turns an unexpected exception into a 500 and counts it in
``stats.dropped["internal_error"]``, so "nothing raised" is checked twice after every
example: no exception came out, and the last-resort handler never had to step in.
"""

from __future__ import annotations

import struct

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from turnserver.stun import MAGIC_COOKIE, Attr, Message, MessageClass, Method, decode_message, encode_message
from turnserver.turn.core import SendToPeer

from ..unit.turn_harness import CLIENT, PEER, Client, code, make_core, request

H = make_core()
_client = Client(H)
_client.allocate(0.0)
_client.bind(0.0, 0x4000, PEER)
_PERMITTED = ("203.0.113.60", 7000)  # a permission, no channel: Data indications
_client.permit(0.0, _PERMITTED)
_RELAY = H.core.allocations[CLIENT].relays[0]
_VALID = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17))
_PEERS = [
    PEER,  # bound to channel 0x4000
    (PEER[0], PEER[1] + 1),  # same IP, another port: permitted, no channel
    _PERMITTED,
    ("203.0.113.61", 7000),  # no permission
    ("2001:db8::61", 7000),  # no permission, and a family the allocation has no relay for
]


def assert_core_intact() -> None:
    """No example so far needed the last-resort handler, and the allocation is still there."""
    assert H.core.stats.dropped["internal_error"] == 0
    assert CLIENT in H.core.allocations


def check_stun(result: Any) -> None:
    assert result is None or isinstance(result, (bytes, SendToPeer))


def check_to_peer(result: Any) -> None:
    assert result is None or isinstance(result, SendToPeer)


def check_to_client(result: Any) -> None:
    assert result is None or (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], bytes))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    check_stun(H.core.handle_stun(data, CLIENT, 1.0))
    check_to_peer(H.core.handle_channel_data(data, CLIENT, 1.0))
    check_to_client(H.core.handle_peer_data(_RELAY, data, PEER, 1.0))
    assert_core_intact()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_PEERS), st.one_of(st.integers(0, 1500), st.integers(65000, 65535)),
       st.binary(min_size=1, max_size=1))
def test_peer_datagrams_of_every_size_from_every_kind_of_peer(peer, size: int, fill: bytes) -> None:
    check_to_client(H.core.handle_peer_data(_RELAY, fill * size, peer, 1.0))
    assert_core_intact()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0x3FFF), st.binary(max_size=120), st.booleans())
def test_random_bodies_behind_a_sound_stun_header(msg_type: int, body: bytes, pad: bool) -> None:
    """Random bytes rarely pass the header checks; these reach every class and method."""
    if pad:
        body += b"\x00" * (-len(body) % 4)
    data = struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + b"\x07" * 12 + body
    check_stun(H.core.handle_stun(data, CLIENT, 1.0))
    assert_core_intact()


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_mutated_and_truncated_requests(pos: int, value: int, cut: int) -> None:
    data = bytearray(_VALID)
    data[pos] = value
    check_stun(H.core.handle_stun(bytes(data[:cut]), CLIENT, 1.0))
    check_stun(H.core.handle_stun(bytes(data), CLIENT, 1.0))
    assert_core_intact()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_channel_data_headers(number: int, length: int, payload: bytes) -> None:
    check_to_peer(H.core.handle_channel_data(struct.pack("!HH", number, length) + payload, CLIENT, 1.0))
    assert_core_intact()


def test_the_allocation_survived_the_fuzzing() -> None:
    assert_core_intact()


def test_an_exception_in_a_handler_is_a_500_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter the tests above watch really moves when a handler raises."""
    h = make_core()

    def broken(*args: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(h.core, "_handle_binding", broken)
    reply = h.core.handle_stun(encode_message(request(Method.BINDING)), CLIENT, 0.0)
    assert isinstance(reply, bytes) and code(decode_message(reply)) == 500
    assert h.core.stats.dropped["internal_error"] == 1
