"""RFC 6062 TCP allocations in the sans-IO core: Allocate with REQUESTED-TRANSPORT 6, Connect
(answered once the I/O layer reports the attempt), ConnectionAttempt for peers connecting in,
ConnectionBind, the 30 s bind timer, the per-allocation limit, and the end of it all with the
allocation. The I/O side is a recording fake; tests/integration/test_tcp_relay.py drives the
real sockets with coturn's client."""

from __future__ import annotations

from typing import Any

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message
from turnserver.stun.message import verify_message_integrity
from turnserver.turn.core import ConnectionBound
from turnserver.turn.tcp import BIND_TIMEOUT_S

from .turn_harness import PEER, Client, Harness, code, make_core, request

CONTROL = ("tcp", ("198.51.100.7", 40000), ("192.0.2.1", 3478))
DATA = ("tcp", ("198.51.100.7", 40001), ("192.0.2.1", 3478))
OTHER_PEER = ("203.0.113.51", 7000)


class FakeTcpPeers:
    def __init__(self) -> None:
        self.connects: list[tuple[Any, tuple[str, int], int]] = []
        self.closed: list[int] = []

    def connect(self, relay: Any, peer: tuple[str, int], cid: int) -> None:
        self.connects.append((relay, peer, cid))

    def close(self, cid: int) -> None:
        self.closed.append(cid)


def tcp_core(**config: Any) -> tuple[Harness, FakeTcpPeers]:
    h = make_core(**config)
    peers = FakeTcpPeers()
    h.core.tcp_peers = peers
    return h, peers


def tcp_allocate(client: Client, now: float = 0.0, **attrs: Any) -> Message:
    return client.send(request(Method.ALLOCATE, REQUESTED_TRANSPORT=6, **attrs), now)


def connect(client: Client, peer: tuple[str, int], now: float = 0.0) -> Any:
    return client.send_raw(request(Method.CONNECT, XOR_PEER_ADDRESS=peer), now)


def allocated(**config: Any) -> tuple[Harness, FakeTcpPeers, Client]:
    h, peers = tcp_core(**config)
    control = Client(h, CONTROL)
    assert code(tcp_allocate(control)) == 200
    return h, peers, control


def connected(h: Harness, peers: FakeTcpPeers, control: Client, peer=PEER, now: float = 0.0) -> int:
    assert connect(control, peer, now) is None  # answered later
    _, _, cid = peers.connects[-1]
    sink, reply = h.core.peer_connect_result(cid, True, now)
    assert sink == "sink" and code(decode_message(reply)) == 200
    return cid


# -- Allocate --------------------------------------------------------------------------------


def test_a_tcp_allocation_over_tcp_asks_the_pool_for_a_tcp_relay() -> None:
    h, _, control = allocated()
    allocation = h.core.allocations[CONTROL]
    assert allocation.relay_transport == "tcp"
    assert h.ports.tcp_requests == [True]
    assert h.core.sessions(1.0)[0]["relay_transport"] == "tcp"


@pytest.mark.parametrize("attrs, why", [
    ({"EVEN_PORT": False}, "EVEN-PORT"),
    ({"DONT_FRAGMENT": None}, "DONT-FRAGMENT"),
    ({"RESERVATION_TOKEN": b"12345678"}, "RESERVATION-TOKEN"),
])
def test_udp_only_attributes_in_a_tcp_allocate_get_400(attrs: dict, why: str) -> None:
    h, _ = tcp_core()
    assert code(tcp_allocate(Client(h, CONTROL), **attrs)) == 400, why
    assert not h.core.allocations


def test_a_tcp_allocation_over_udp_gets_400() -> None:
    h, _ = tcp_core()
    reply = tcp_allocate(Client(h))  # the harness's default 5-tuple is UDP
    assert code(reply) == 400
    assert "TCP or TLS" in reply.get(Attr.ERROR_CODE)[1]


def test_without_tcp_relay_or_an_io_side_a_tcp_allocation_gets_442() -> None:
    h, _ = tcp_core(tcp_relay=False)
    assert code(tcp_allocate(Client(h, CONTROL))) == 442
    plain = make_core()  # no TcpPeers given: as a server without stream listeners
    assert code(tcp_allocate(Client(plain, CONTROL))) == 442


# -- Connect -----------------------------------------------------------------------------------


def test_connect_is_answered_when_the_attempt_succeeds_with_a_signed_connection_id() -> None:
    h, peers, control = allocated()
    assert connect(control, PEER) is None
    ((relay, peer, cid),) = peers.connects
    assert relay is h.core.allocations[CONTROL].relays[0] and peer == PEER
    sink, reply = h.core.peer_connect_result(cid, True, 0.5)
    msg = decode_message(reply)
    assert msg.method == Method.CONNECT and code(msg) == 200
    assert msg.get(Attr.CONNECTION_ID) == cid
    assert verify_message_integrity(msg, control.key)
    assert h.core.stats.requests[("connect", 200)] == 1
    assert h.core.stats.tcp_connections[("outbound", "connected")] == 1


def test_a_failed_attempt_gets_447_and_the_peer_can_be_tried_again() -> None:
    h, peers, control = allocated()
    connect(control, PEER)
    cid = peers.connects[-1][2]
    _, reply = h.core.peer_connect_result(cid, False, 1.0)
    assert code(decode_message(reply)) == 447
    assert h.core.stats.requests[("connect", 447)] == 1
    assert not h.core.allocations[CONTROL].tcp_conns
    assert connect(control, PEER, 2.0) is None  # no 446: nothing is left of the first
    assert len(peers.connects) == 2


def test_a_second_connect_to_the_same_peer_gets_446_while_one_is_pending_or_bound() -> None:
    h, peers, control = allocated()
    connect(control, PEER)
    assert code(decode_message(connect(control, PEER))) == 446  # in progress
    cid = peers.connects[0][2]
    h.core.peer_connect_result(cid, True, 0.1)
    assert code(decode_message(connect(control, PEER))) == 446  # pending ConnectionBind
    assert len(peers.connects) == 1
    assert connect(control, OTHER_PEER) is None  # another peer is fine


def test_connect_refused_by_the_peer_policy_gets_403_and_opens_nothing() -> None:
    h, peers, control = allocated()
    reply = decode_message(connect(control, ("10.0.0.5", 80)))
    assert code(reply) == 403
    assert not peers.connects
    assert sum(h.core.stats.policy_refusals.values()) == 1


def test_connect_needs_a_peer_address_and_a_tcp_allocation() -> None:
    h, peers, control = allocated()
    assert code(control.send(request(Method.CONNECT))) == 400
    udp = make_core()
    udp.core.tcp_peers = FakeTcpPeers()
    client = Client(udp)
    assert code(client.allocate()) == 200
    reply = client.send(request(Method.CONNECT, XOR_PEER_ADDRESS=PEER))
    assert code(reply) == 400 and "TCP allocation" in reply.get(Attr.ERROR_CODE)[1]
    assert not peers.connects


def test_connect_without_an_allocation_gets_437_and_unauthenticated_401() -> None:
    h, peers = tcp_core()
    stranger = Client(h, CONTROL)
    assert code(stranger.send(request(Method.CONNECT, XOR_PEER_ADDRESS=PEER))) == 437
    assert code(stranger.raw(request(Method.CONNECT, XOR_PEER_ADDRESS=PEER))) == 401
    assert not peers.connects


def test_the_result_of_an_attempt_for_an_ended_allocation_is_none() -> None:
    h, peers, control = allocated()
    connect(control, PEER)
    cid = peers.connects[-1][2]
    assert code(control.refresh(1.0, lifetime=0)) == 200
    assert cid in peers.closed  # the core had the attempt closed
    assert h.core.peer_connect_result(cid, True, 2.0) is None


# -- ConnectionBind ------------------------------------------------------------------------------


def test_connection_bind_on_a_new_connection_binds_and_stops_the_timer() -> None:
    h, peers, control = allocated()
    cid = connected(h, peers, control)
    data = Client(h, DATA)
    bound = data.send_raw(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 1.0)
    assert isinstance(bound, ConnectionBound)
    assert bound.connection.cid == cid and bound.connection.state == "bound"
    reply = decode_message(bound.reply)
    assert reply.method == Method.CONNECTION_BIND and code(reply) == 200
    h.core.handle_timer(BIND_TIMEOUT_S + 5.0)
    assert not peers.closed  # bound: the 30 s timer no longer applies
    assert h.core.tcp_connection_states == {"connecting": 0, "pending": 0, "bound": 1}
    assert h.core.stats.tcp_connections[("outbound", "bound")] == 1


def test_connection_bind_with_an_unknown_id_or_twice_gets_400() -> None:
    h, peers, control = allocated()
    cid = connected(h, peers, control)
    data = Client(h, DATA)
    assert code(data.send(request(Method.CONNECTION_BIND, CONNECTION_ID=cid ^ 0x55), 1.0)) == 400
    assert code(data.send(request(Method.CONNECTION_BIND), 1.0)) == 400
    assert isinstance(data.send_raw(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 1.0),
                      ConnectionBound)
    again = Client(h, ("tcp", ("198.51.100.7", 40002), ("192.0.2.1", 3478)))
    assert code(again.send(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 1.0)) == 400


def test_connection_bind_by_another_user_gets_441() -> None:
    from .turn_harness import rest_user

    h, peers, control = allocated()
    cid = connected(h, peers, control)
    user, password = rest_user("mallory")
    mallory = Client(h, DATA, user, password)
    assert code(mallory.send(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 1.0)) == 441
    assert h.core.tcp_connection_states["pending"] == 1


def test_connection_bind_on_the_control_connection_or_over_udp_gets_400() -> None:
    h, peers, control = allocated()
    cid = connected(h, peers, control)
    assert code(control.send(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 1.0)) == 400
    assert code(Client(h).send(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 1.0)) == 400
    assert h.core.tcp_connection_states["pending"] == 1


def test_a_peer_connection_never_bound_is_closed_after_30_seconds() -> None:
    h, peers, control = allocated()
    cid = connected(h, peers, control, now=10.0)
    h.core.handle_timer(10.0 + BIND_TIMEOUT_S - 0.5)
    assert not peers.closed
    h.core.handle_timer(10.0 + BIND_TIMEOUT_S)
    assert peers.closed == [cid]
    assert h.core.stats.tcp_connections[("outbound", "bind_timeout")] == 1
    data = Client(h, DATA)
    assert code(data.send(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 41.0)) == 400


# -- peers connecting in ------------------------------------------------------------------------


def test_a_peer_without_permission_is_refused_and_with_one_announced() -> None:
    h, peers, control = allocated()
    relay = h.core.allocations[CONTROL].relays[0]
    assert h.core.peer_connection_arrived(relay, PEER, 1.0) is None
    assert h.core.stats.tcp_connections[("inbound", "no_permission")] == 1
    assert code(control.permit(1.0, PEER)) == 200
    cid, sink, data = h.core.peer_connection_arrived(relay, PEER, 2.0)
    assert sink == "sink"
    msg = decode_message(data)
    assert (msg.method, msg.msg_class) == (Method.CONNECTION_ATTEMPT, MessageClass.INDICATION)
    assert msg.get(Attr.XOR_PEER_ADDRESS) == PEER and msg.get(Attr.CONNECTION_ID) == cid
    bound = Client(h, DATA).send_raw(request(Method.CONNECTION_BIND, CONNECTION_ID=cid), 3.0)
    assert isinstance(bound, ConnectionBound) and bound.connection.direction == "inbound"


def test_an_inbound_connection_not_bound_in_30_seconds_is_closed() -> None:
    h, peers, control = allocated()
    control.permit(0.0, PEER)
    cid, _, _ = h.core.peer_connection_arrived(h.core.allocations[CONTROL].relays[0], PEER, 1.0)
    h.core.handle_timer(1.0 + BIND_TIMEOUT_S)
    assert peers.closed == [cid]
    assert h.core.stats.tcp_connections[("inbound", "bind_timeout")] == 1


def test_a_peer_on_a_relay_no_allocation_holds_is_refused() -> None:
    h, _, _ = allocated()
    from .turn_harness import FakeRelay

    assert h.core.peer_connection_arrived(FakeRelay(("192.0.2.1", 50099)), PEER, 1.0) is None
    assert h.core.stats.tcp_connections[("inbound", "no_allocation")] == 1


# -- limits and ends ------------------------------------------------------------------------------


def test_connections_per_allocation_are_limited_both_ways() -> None:
    h, peers, control = allocated(max_tcp_connections_per_allocation=1)
    connected(h, peers, control)
    reply = decode_message(connect(control, OTHER_PEER))
    assert code(reply) == 508
    control.permit(0.0, OTHER_PEER)
    relay = h.core.allocations[CONTROL].relays[0]
    assert h.core.peer_connection_arrived(relay, OTHER_PEER, 1.0) is None
    assert h.core.stats.limit_refusals["tcp_connections"] == 2
    assert len(peers.connects) == 1


def test_the_end_of_the_allocation_closes_every_peer_connection() -> None:
    h, peers, control = allocated()
    first = connected(h, peers, control)
    Client(h, DATA).send_raw(request(Method.CONNECTION_BIND, CONNECTION_ID=first), 1.0)
    connect(control, OTHER_PEER, 1.0)
    second = peers.connects[-1][2]
    h.core.connection_closed(CONTROL, 2.0)  # the control connection went away
    assert sorted(peers.closed) == sorted([first, second])
    assert h.core.tcp_connection_states == {"connecting": 0, "pending": 0, "bound": 0}
    allocation, reason, _ = h.ended[-1]
    assert reason == "connection_closed" and allocation.tcp_connections_total == 2


def test_a_closed_peer_connection_frees_its_slot_and_its_peer() -> None:
    h, peers, control = allocated(max_tcp_connections_per_allocation=1)
    cid = connected(h, peers, control)
    h.core.peer_connection_closed(cid)
    assert connect(control, PEER, 1.0) is None  # neither 446 nor 508
    assert peers.closed == []  # the I/O layer closed it itself: nothing to ask


def test_a_tcp_allocation_has_no_channels_and_no_send_indications() -> None:
    h, _, control = allocated()
    assert code(control.bind(0.0, 0x4000, PEER)) == 400
    control.permit(0.0, PEER)
    send = Message(Method.SEND, MessageClass.INDICATION)
    send.add(Attr.XOR_PEER_ADDRESS, PEER).add(Attr.DATA, b"x")
    assert h.core.handle_stun(encode_message(send), CONTROL, 1.0, "sink") is None
    assert h.core.stats.dropped["tcp_allocation"] == 1


def test_connection_ids_carry_the_worker_base_and_are_unique() -> None:
    h, peers, control = allocated()
    h.core.cid_base = 3 << 24
    for port in range(10):
        connect(control, ("203.0.113.60", 8000 + port))
    cids = [cid for _, _, cid in peers.connects]
    assert len(set(cids)) == 10 and all(cid >> 24 == 3 for cid in cids)


def test_a_reloaded_policy_closes_peer_connections_it_now_refuses() -> None:
    from turnserver.policy import PeerPolicy

    h, peers, control = allocated()
    kept = connected(h, peers, control, OTHER_PEER)
    cut = connected(h, peers, control, PEER)
    h.core.reconfigure(policy=PeerPolicy(allow=("203.0.113.51/32",), relay_addresses=("192.0.2.1",),
                                         relay_port_range=(50000, 50099)))
    assert peers.closed == [cut]
    assert set(h.core.allocations[CONTROL].tcp_conns) == {kept}
    assert sum(h.core.stats.policy_refusals.values()) == 1


def test_a_connection_id_names_its_worker_and_only_a_running_one() -> None:
    from turnserver.io.handoff import owner_of

    assert owner_of((2 << 24) | 77, own=0, count=4) == 1  # worker 1's
    assert owner_of((1 << 24) | 77, own=0, count=4) is None  # this worker's own
    assert owner_of(77, own=0, count=4) is None  # a single process's: no worker at all
    assert owner_of((9 << 24) | 77, own=0, count=4) is None  # no such worker: answered here
