"""RFC 8656 §11-12: ChannelBind, the rebinding rules, ChannelData both ways."""

from __future__ import annotations

import struct

import pytest

from turnserver.policy import PeerPolicy
from turnserver.stun import Attr, decode_message
from turnserver.turn.core import SendToPeer

from .turn_harness import CLIENT, PEER, Client, code, make_core

PEER2 = ("203.0.113.51", 6001)


def setup(**config):
    h = make_core(**config)
    client = Client(h)
    client.allocate(0.0)
    return h, client


def channel_data(number: int, payload: bytes) -> bytes:
    return struct.pack("!HH", number, len(payload)) + payload


def test_bound_channel_relays_both_ways() -> None:
    h, client = setup()
    assert code(client.bind(1.0, 0x4000, PEER)) == 200
    out = h.core.handle_channel_data(channel_data(0x4000, b"media"), CLIENT, 2.0)
    assert isinstance(out, SendToPeer) and out.data == b"media" and out.peer == PEER
    sink, frame = h.core.handle_peer_data(h.core.allocations[CLIENT].relays[0], b"abc", PEER, 2.0)
    assert frame == b"\x40\x00\x00\x03abc"  # UDP: no padding
    alloc = h.core.allocations[CLIENT]
    assert (alloc.bytes_to_peer, alloc.packets_to_peer) == (5, 1)
    assert (alloc.bytes_to_client, alloc.packets_to_client) == (3, 1)


def test_stream_clients_get_padded_channel_data() -> None:
    h = make_core()
    tcp = ("tcp", ("198.51.100.7", 40000), ("192.0.2.1", 3478))
    client = Client(h, five_tuple=tcp)
    client.allocate(0.0)
    client.bind(1.0, 0x4001, PEER)
    _, frame = h.core.handle_peer_data(h.core.allocations[tcp].relays[0], b"abcde", PEER, 2.0)
    assert frame == b"\x40\x01\x00\x05abcde\x00\x00\x00"


@pytest.mark.parametrize("number", [0x3FFF, 0x5000, 0x7FFF, 0xFFFF])
def test_channel_numbers_outside_rfc8656_range_are_400(number: int) -> None:
    h, client = setup()
    assert code(client.bind(1.0, number, PEER)) == 400


def test_legacy_range_accepted_when_configured() -> None:
    h, client = setup(legacy_channel_numbers=True)
    assert code(client.bind(1.0, 0x7FFE, PEER)) == 200
    assert code(client.bind(1.0, 0x8000, PEER2)) == 400
    assert isinstance(h.core.handle_channel_data(channel_data(0x7FFE, b"x"), CLIENT, 2.0), SendToPeer)


def test_rebinding_rules() -> None:
    h, client = setup()
    assert code(client.bind(1.0, 0x4000, PEER)) == 200
    assert code(client.bind(2.0, 0x4000, PEER)) == 200  # same pair: refresh
    assert code(client.bind(2.0, 0x4000, PEER2)) == 400  # channel bound to another peer
    assert code(client.bind(2.0, 0x4001, PEER)) == 400  # peer bound to another channel
    assert code(client.bind(2.0, 0x4001, PEER2)) == 200


def test_channel_expires_after_600s_then_data_goes_as_indications() -> None:
    h, client = setup()
    client.bind(1.0, 0x4000, PEER)
    client.permit(400.0, PEER)  # keep the permission alive past the channel
    client.refresh(400.0)
    assert h.core.handle_channel_data(channel_data(0x4000, b"x"), CLIENT, 601.5) is None
    _, frame = h.core.handle_peer_data(h.core.allocations[CLIENT].relays[0], b"y", PEER, 601.5)
    assert decode_message(frame).get(Attr.DATA) == b"y"
    h.core.handle_timer(602.0)
    assert h.core.allocations[CLIENT].channels == {}
    # After expiry the number may be bound to another peer.
    assert code(client.bind(603.0, 0x4000, PEER2)) == 200


def test_channel_bind_installs_and_refreshes_the_permission() -> None:
    h, client = setup()
    client.bind(1.0, 0x4000, PEER)
    assert h.core.allocations[CLIENT].permissions[PEER[0]] == 301.0
    client.bind(250.0, 0x4000, PEER)
    assert h.core.allocations[CLIENT].permissions[PEER[0]] == 550.0
    # Without refresh the permission lapses at 550 even though the channel lives to 850.
    assert h.core.handle_channel_data(channel_data(0x4000, b"x"), CLIENT, 551.0) is None
    assert h.core.stats.dropped["no_permission"] == 1


def test_unbound_channel_and_truncated_channel_data_are_dropped() -> None:
    h, client = setup()
    assert h.core.handle_channel_data(channel_data(0x4005, b"x"), CLIENT, 1.0) is None
    client.bind(1.0, 0x4000, PEER)
    assert h.core.handle_channel_data(b"\x40\x00\x00\x10abc", CLIENT, 2.0) is None
    assert h.core.handle_channel_data(b"\x40", CLIENT, 2.0) is None
    assert h.core.stats.dropped["unbound_channel"] == 1
    assert h.core.stats.dropped["malformed"] == 2


def test_channel_data_from_another_five_tuple_is_dropped() -> None:
    h, client = setup()
    client.bind(1.0, 0x4000, PEER)
    other = ("udp", ("198.51.100.99", 1), CLIENT[2])
    assert h.core.handle_channel_data(channel_data(0x4000, b"x"), other, 2.0) is None


def test_policy_refuses_channel_to_private_peer() -> None:
    h, client = setup()
    assert code(client.bind(1.0, 0x4000, ("192.168.1.1", 5000))) == 403
    assert h.core.allocations[CLIENT].channels == {}


def test_deleting_the_allocation_removes_channel_routes() -> None:
    h, client = setup()
    client.bind(1.0, 0x4000, PEER)
    client.refresh(2.0, lifetime=0)
    assert h.core.handle_channel_data(channel_data(0x4000, b"x"), CLIENT, 3.0) is None
    assert not h.core._routes


def test_stream_client_on_a_legacy_channel_gets_padded_channel_data() -> None:
    h = make_core(legacy_channel_numbers=True)
    tcp = ("tcp", ("198.51.100.7", 40000), ("192.0.2.1", 3478))
    client = Client(h, five_tuple=tcp)
    client.allocate(0.0)
    assert code(client.bind(1.0, 0x7FFE, PEER)) == 200
    _, frame = h.core.handle_peer_data(h.core.allocations[tcp].relays[0], b"abcde", PEER, 2.0)
    assert frame == b"\x7f\xfe\x00\x05abcde\x00\x00\x00"


def test_channel_carries_the_largest_datagram() -> None:
    """Over a stream the ChannelData length field is the only bound; toward a UDP client, the
    frame must fit in one datagram (65,507 bytes over IPv4), so a bigger one is dropped as
    too_big, not handed to a kernel that would refuse it."""
    h = make_core()
    tcp = ("tcp", CLIENT[1], CLIENT[2])
    stream_client = Client(h, five_tuple=tcp)
    stream_client.allocate(0.0)
    stream_client.bind(1.0, 0x4000, PEER)
    _, frame = h.core.handle_peer_data(h.core.allocations[tcp].relays[0], bytes(65535), PEER, 2.0)
    assert frame[:4] == b"\x40\x00\xff\xff" and len(frame) == 4 + 65536  # padded to 4 on a stream

    h, client = setup()
    client.bind(1.0, 0x4000, PEER)
    relay = h.core.allocations[CLIENT].relays[0]
    _, frame = h.core.handle_peer_data(relay, bytes(65503), PEER, 2.0)
    assert len(frame) == 65507
    assert h.core.handle_peer_data(relay, bytes(65504), PEER, 2.0) is None
    assert h.core.stats.dropped["too_big"] == 1
    allocation = h.core.allocations[CLIENT]
    assert allocation.bytes_to_client == 65503  # the dropped one is not counted


def test_policy_reload_removes_permissions_and_channels_it_refuses() -> None:
    h, client = setup()
    other = ("udp", ("198.51.100.8", 40000), CLIENT[2])
    bob = Client(h, five_tuple=other)
    bob.allocate(0.0)
    assert code(client.bind(1.0, 0x4000, PEER)) == 200
    assert code(client.bind(1.0, 0x4001, PEER2)) == 200
    assert code(bob.permit(1.0, PEER)) == 200
    relay = h.core.allocations[CLIENT].relays[0]
    # The operator narrows the allowed peers to PEER2 alone; PEER is documentation space again.
    h.core.reconfigure(policy=PeerPolicy(allow=[f"{PEER2[0]}/32"], relay_addresses=["192.0.2.1"],
                                         relay_port_range=(50000, 50099)))
    alice_alloc = h.core.allocations[CLIENT]
    assert set(alice_alloc.permissions) == {PEER2[0]}
    assert set(alice_alloc.channels) == {0x4001} and set(alice_alloc.peer_channels) == {PEER2}
    assert h.core.allocations[other].permissions == {}
    assert h.core.stats.policy_refusals["documentation"] == 3  # two permissions, one channel
    # Nothing flows toward or from PEER any more, on the channel or otherwise.
    assert h.core.handle_channel_data(channel_data(0x4000, b"x"), CLIENT, 2.0) is None
    assert h.core.stats.dropped["unbound_channel"] == 1
    assert h.core.handle_peer_data(relay, b"x", PEER, 2.0) is None
    assert h.core.stats.dropped["no_permission"] == 1
    assert isinstance(h.core.handle_channel_data(channel_data(0x4001, b"y"), CLIENT, 2.0), SendToPeer)
    # Asking again is refused, and the stale deadlines of what was removed pass harmlessly.
    assert code(client.bind(3.0, 0x4000, PEER)) == 403
    h.core.handle_timer(700.0)
    assert CLIENT not in h.core.allocations


def test_reload_with_the_same_policy_keeps_everything() -> None:
    h, client = setup()
    client.bind(1.0, 0x4000, PEER)
    h.core.reconfigure(policy=h.core.policy)
    assert set(h.core.allocations[CLIENT].permissions) == {PEER[0]}
    assert isinstance(h.core.handle_channel_data(channel_data(0x4000, b"x"), CLIENT, 2.0), SendToPeer)
    assert sum(h.core.stats.policy_refusals.values()) == 0
