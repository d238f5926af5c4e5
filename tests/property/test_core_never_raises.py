"""The core's invariant: no input, however broken, raises out of a handler."""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

from ..unit.turn_harness import CLIENT, PEER, Client, make_core

H = make_core()
_client = Client(H)
_client.allocate(0.0)
_client.bind(0.0, 0x4000, PEER)
_RELAY = H.core.allocations[CLIENT].relays[0]
_VALID = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    H.core.handle_stun(data, CLIENT, 1.0)
    H.core.handle_channel_data(data, CLIENT, 1.0)
    H.core.handle_peer_data(_RELAY, data, PEER, 1.0)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_mutated_and_truncated_requests(pos: int, value: int, cut: int) -> None:
    data = bytearray(_VALID)
    data[pos] = value
    H.core.handle_stun(bytes(data[:cut]), CLIENT, 1.0)
    H.core.handle_stun(bytes(data), CLIENT, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=64))
def test_channel_data_headers(number: int, length: int, payload: bytes) -> None:
    H.core.handle_channel_data(struct.pack("!HH", number, length) + payload, CLIENT, 1.0)


def test_the_allocation_survived_the_fuzzing() -> None:
    assert CLIENT in H.core.allocations
