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


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    H.core.handle_stun(data, CLIENT, 1.0)
    H.core.handle_channel_data(data, CLIENT, 1.0)
    H.core.handle_peer_data(_RELAY, data, PEER, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_PEERS), st.one_of(st.integers(0, 1500), st.integers(65000, 65535)),
       st.binary(min_size=1, max_size=1))
def test_peer_datagrams_of_every_size_from_every_kind_of_peer(peer, size: int, fill: bytes) -> None:
    H.core.handle_peer_data(_RELAY, fill * size, peer, 1.0)


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
    # The last-resort handler never had to step in.
    assert H.core.stats.dropped["internal_error"] == 0
