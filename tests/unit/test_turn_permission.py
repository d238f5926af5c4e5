"""RFC 8656 §9: CreatePermission, and the permission check on both data directions."""

from __future__ import annotations

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
