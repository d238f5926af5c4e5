"""RFC 8656 §9: CreatePermission, and the permission check on both data directions."""

from __future__ import annotations

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message
from turnserver.turn.core import SendToPeer

from .turn_harness import CLIENT, PEER, Client, FakeRelayPorts, code, make_core


def send_indication(h, peer, data: bytes, now: float, five_tuple=CLIENT):
    msg = Message(Method.SEND, MessageClass.INDICATION)
    msg.add(Attr.XOR_PEER_ADDRESS, peer).add(Attr.DATA, data)
    return h.core.handle_stun(encode_message(msg), five_tuple, now)


def relay_of(h):
    return h.core.allocations[CLIENT].relays[0]


def test_permission_lets_data_through_both_ways_and_expires_after_300s() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    assert send_indication(h, PEER, b"x", 1.0) is None  # no permission yet: dropped
    assert h.core.handle_peer_data(relay_of(h), b"in", PEER, 1.0) is None
    assert code(client.permit(2.0, PEER)) == 200
    out = send_indication(h, PEER, b"hello", 3.0)
    assert isinstance(out, SendToPeer) and out.data == b"hello" and out.peer == PEER
    # The permission is per IP: any port of that peer may answer.
    sink, frame = h.core.handle_peer_data(relay_of(h), b"back", (PEER[0], 7777), 3.0)
    data_ind = decode_message(frame)
    assert sink == "sink" and data_ind.method == Method.DATA
    assert data_ind.get(Attr.DATA) == b"back" and data_ind.get(Attr.XOR_PEER_ADDRESS) == (PEER[0], 7777)
    assert h.core.handle_peer_data(relay_of(h), b"x", ("203.0.113.51", 1), 3.0) is None
    # RFC 8656 §9: 300 s, refreshed by a new CreatePermission.
    assert send_indication(h, PEER, b"late", 302.1) is None
    assert code(client.permit(303.0, PEER)) == 200
    client.refresh(303.0)
    assert isinstance(send_indication(h, PEER, b"again", 600.0), SendToPeer)
    h.core.handle_timer(603.0)
    assert PEER[0] not in h.core.allocations[CLIENT].permissions


def test_several_peers_in_one_request() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    assert code(client.permit(1.0, PEER, ("203.0.113.60", 1), ("203.0.113.61", 2))) == 200
    assert set(h.core.allocations[CLIENT].permissions) == {PEER[0], "203.0.113.60", "203.0.113.61"}


def test_a_refused_peer_refuses_the_whole_request() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    reply = client.permit(1.0, PEER, ("10.0.0.1", 80))
    assert code(reply) == 403
    assert h.core.allocations[CLIENT].permissions == {}
    assert h.core.stats.policy_refusals["private"] == 1


def test_missing_peer_is_400_and_family_mismatch_443() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    assert code(client.send(Message(Method.CREATE_PERMISSION, MessageClass.REQUEST), 1.0)) == 400
    assert code(client.permit(1.0, ("2001:db8::5", 1))) == 443


def test_send_to_a_refused_peer_is_dropped_even_with_a_permission_elsewhere() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    client.permit(1.0, PEER)
    assert send_indication(h, ("127.0.0.1", 22), b"x", 2.0) is None
    assert send_indication(h, ("169.254.169.254", 80), b"x", 2.0) is None
    assert h.core.stats.dropped["policy"] == 2


def test_send_indication_without_data_or_peer_is_dropped() -> None:
    h = make_core()
    Client(h).allocate(0.0)
    msg = Message(Method.SEND, MessageClass.INDICATION).add(Attr.XOR_PEER_ADDRESS, PEER)
    assert h.core.handle_stun(encode_message(msg), CLIENT, 1.0) is None
    assert h.core.stats.dropped["bad_indication"] == 1


def test_own_relay_address_is_a_valid_peer_inside_the_range_only() -> None:
    h = make_core(allow=())
    client = Client(h)
    client.allocate(0.0)
    own = h.core.allocations[CLIENT].relays[0].address
    assert code(client.permit(1.0, (own[0], 0))) == 200
    assert code(client.bind(1.0, 0x4000, (own[0], 50050))) == 200
    assert code(client.bind(1.0, 0x4001, (own[0], 3478))) == 403  # our own listener
    assert code(client.bind(1.0, 0x4002, (own[0], 22))) == 403  # outside the relay range


def test_external_address_maps_to_the_bound_relay_address() -> None:
    h = make_core(allow=(), external_addresses={"192.0.2.1": "198.51.100.200"},
                  ports=FakeRelayPorts(ipv4="192.0.2.1"))
    client = Client(h)
    reply = client.allocate(0.0)
    assert reply.get(Attr.XOR_RELAYED_ADDRESS)[0] == "198.51.100.200"
    assert code(client.permit(1.0, ("198.51.100.200", 50010))) == 200
    assert "192.0.2.1" in h.core.allocations[CLIENT].permissions
    # Data from the other allocation arrives from the bound address and is shown as external.
    sink, frame = h.core.handle_peer_data(relay_of(h), b"x", ("192.0.2.1", 50010), 2.0)
    assert decode_message(frame).get(Attr.XOR_PEER_ADDRESS) == ("198.51.100.200", 50010)


def test_send_with_an_unknown_comprehension_required_attribute_is_dropped() -> None:
    # RFC 8489 §6.3.2: discarded; comprehension-optional ones are ignored.
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    client.permit(1.0, PEER)
    msg = Message(Method.SEND, MessageClass.INDICATION)
    msg.add(Attr.XOR_PEER_ADDRESS, PEER).add(Attr.DATA, b"x").add(0x7001, b"??")
    assert h.core.handle_stun(encode_message(msg), CLIENT, 2.0) is None
    assert h.core.stats.dropped["unknown_attribute"] == 1
    msg = Message(Method.SEND, MessageClass.INDICATION)
    msg.add(Attr.XOR_PEER_ADDRESS, PEER).add(Attr.DATA, b"x").add(0xC001, b"??")
    assert isinstance(h.core.handle_stun(encode_message(msg), CLIENT, 2.0), SendToPeer)


def test_send_with_dont_fragment_is_dropped_when_the_relay_cannot_set_df() -> None:
    # RFC 8656 §11.2: DONT-FRAGMENT the server cannot honour is an unknown attribute.
    for supported in (True, False):
        h = make_core(ports=FakeRelayPorts(dont_fragment=supported))
        client = Client(h)
        client.allocate(0.0)
        client.permit(1.0, PEER)
        msg = Message(Method.SEND, MessageClass.INDICATION)
        msg.add(Attr.XOR_PEER_ADDRESS, PEER).add(Attr.DATA, b"x").add(Attr.DONT_FRAGMENT)
        out = h.core.handle_stun(encode_message(msg), CLIENT, 2.0)
        if supported:
            assert isinstance(out, SendToPeer) and out.data == b"x"
        else:
            assert out is None
            assert h.core.stats.dropped["dont_fragment_unsupported"] == 1


def test_data_indication_transaction_id_comes_from_the_injected_random_source() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    client.permit(1.0, PEER)
    h.core.random_bytes = lambda n: b"\x5a" * n
    _, frame = h.core.handle_peer_data(relay_of(h), b"x", PEER, 2.0)
    assert decode_message(frame).transaction_id == b"\x5a" * 12


@pytest.mark.parametrize("transport, family, peer, fits", [
    # Over a stream: 0xFFFF less XOR-PEER-ADDRESS (12) and the DATA header (4), padded.
    ("tcp", 1, PEER, 65516),
    ("tcp", 2, ("2001:db8::50", 6000), 65504),  # XOR-PEER-ADDRESS is 24 bytes for IPv6
    # Toward a UDP client over IPv4, the whole message must fit in one 65,507-byte datagram.
    ("udp", 1, PEER, 65468),
    ("udp", 2, ("2001:db8::50", 6000), 65456),
])
def test_peer_datagram_too_big_for_a_data_indication_is_dropped(transport: str, family: int, peer,
                                                                 fits: int) -> None:
    h = make_core(ports=FakeRelayPorts(ipv4="192.0.2.1" if family == 1 else None,
                                       ipv6="2001:db8::1" if family == 2 else None))
    five_tuple = (transport, CLIENT[1], CLIENT[2])
    client = Client(h, five_tuple=five_tuple)
    client.allocate(0.0, REQUESTED_ADDRESS_FAMILY=family)
    client.permit(1.0, peer)
    relay = h.core.allocations[five_tuple].relays[0]
    _, frame = h.core.handle_peer_data(relay, bytes(fits), peer, 2.0)
    assert decode_message(frame).get(Attr.DATA) == bytes(fits)
    for size in (fits + 1, 65535):
        assert h.core.handle_peer_data(relay, bytes(size), peer, 2.0) is None
    assert h.core.stats.dropped["too_big"] == 2
    assert h.core.allocations[five_tuple].packets_to_client == 1


def test_external_addresses_in_any_spelling() -> None:
    # The map comes from configuration, and the relay socket may carry its address as written
    # there too: "2001:DB8:0::1" and "2001:DB8::1" are both 2001:db8::1.
    h = make_core(allow=(), external_addresses={"2001:DB8:0::1": "2001:0DB8::200"},
                  relay_addresses=("2001:db8::1",), ports=FakeRelayPorts(ipv4=None, ipv6="2001:DB8::1"))
    client = Client(h)
    reply = client.allocate(0.0, REQUESTED_ADDRESS_FAMILY=2)
    assert reply.get(Attr.XOR_RELAYED_ADDRESS) == ("2001:db8::200", 50000)
    assert code(client.permit(1.0, ("2001:db8::200", 50010))) == 200
    assert set(h.core.allocations[CLIENT].permissions) == {"2001:db8::1"}
    assert code(client.bind(1.0, 0x4000, ("2001:db8::200", 50012))) == 200
    assert h.core.allocations[CLIENT].channels[0x4000].peer == ("2001:db8::1", 50012)
    _, frame = h.core.handle_peer_data(relay_of(h), b"x", ("2001:db8::1", 50010), 2.0)
    assert decode_message(frame).get(Attr.XOR_PEER_ADDRESS) == ("2001:db8::200", 50010)
