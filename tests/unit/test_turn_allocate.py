"""RFC 8656 §7.1-7.2: Allocate, driven through the sans-IO core with a fake clock."""

from __future__ import annotations

import pytest

from turnserver.auth import ALGORITHM_SHA256
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message

from .turn_harness import (
    CLIENT, REALM, WALL_NOW, Client, FakeRelayPorts, code, make_core, request, rest_user,
)


def test_challenge_carries_realm_nonce_and_password_algorithms() -> None:
    h = make_core()
    reply = Client(h).raw(request(Method.ALLOCATE, REQUESTED_TRANSPORT=17))
    assert code(reply) == 401
    assert reply.get(Attr.REALM) == REALM
    assert reply.get(Attr.NONCE).startswith("obMatJos2")
    assert [a for a, _ in reply.get(Attr.PASSWORD_ALGORITHMS)] == [1, 2]
    assert Attr.MESSAGE_INTEGRITY not in reply
    assert not h.core.allocations


def test_success_response_rfc8656_7_2() -> None:
    h = make_core()
    reply = Client(h).allocate()
    assert code(reply) == 200
    relayed = reply.get(Attr.XOR_RELAYED_ADDRESS)
    assert relayed[0] == "192.0.2.1" and 50000 <= relayed[1] < 50100
    assert reply.get(Attr.LIFETIME) == 600
    assert reply.get(Attr.XOR_MAPPED_ADDRESS) == CLIENT[1]
    assert Attr.MESSAGE_INTEGRITY in reply
    assert CLIENT in h.core.allocations


def test_step2_retransmission_gets_the_same_bytes_and_another_transaction_gets_437() -> None:
    h = make_core()
    client = Client(h)
    client.allocate()
    # Re-send an Allocate with the original transaction ID: same answer, no new relay.
    alloc = h.core.allocations[CLIENT]
    msg = request(Method.ALLOCATE, REQUESTED_TRANSPORT=17)
    msg.transaction_id = alloc.transaction_id
    msg.add(Attr.USERNAME, client.username).add(Attr.REALM, REALM).add(Attr.NONCE, client.nonce)
    data = encode_message(msg, key=client.key)
    assert h.core.handle_stun(data, CLIENT, 1.0, "sink") == alloc.response
    assert len(h.ports.open) == 1
    assert code(client.allocate(2.0)) == 437


def test_missing_requested_transport_is_400_and_tcp_is_442() -> None:
    h = make_core()
    client = Client(h)
    assert code(client.send(request(Method.ALLOCATE))) == 400
    assert code(client.send(request(Method.ALLOCATE, REQUESTED_TRANSPORT=6))) == 442
    assert not h.core.allocations


@pytest.mark.parametrize("requested,granted", [(None, 600), (30, 600), (1200, 1200), (999999, 3600)])
def test_lifetime_arithmetic(requested: int | None, granted: int) -> None:
    h = make_core()
    attrs = {} if requested is None else {"LIFETIME": requested}
    assert Client(h).allocate(**attrs).get(Attr.LIFETIME) == granted


def test_configured_short_default_lifetime() -> None:
    h = make_core(default_lifetime_s=4, max_lifetime_s=60)
    assert Client(h).allocate(LIFETIME=4).get(Attr.LIFETIME) == 4


def test_even_port_with_reservation_then_token_gets_next_port() -> None:
    h = make_core(ports=FakeRelayPorts(ports=range(50001, 50011)))  # the first free port is odd
    first = Client(h).allocate(EVEN_PORT=True)
    port = first.get(Attr.XOR_RELAYED_ADDRESS)[1]
    token = first.get(Attr.RESERVATION_TOKEN)
    assert port % 2 == 0 and len(token) == 8
    other = ("udp", ("198.51.100.7", 40002), CLIENT[2])
    second = Client(h, five_tuple=other).allocate(1.0, RESERVATION_TOKEN=token)
    assert code(second) == 200
    assert second.get(Attr.XOR_RELAYED_ADDRESS)[1] == port + 1
    # A token works once.
    third = Client(h, five_tuple=("udp", ("198.51.100.7", 40004), CLIENT[2])).allocate(2.0, RESERVATION_TOKEN=token)
    assert code(third) == 508


def test_reservation_expires_after_30_seconds_and_releases_the_port() -> None:
    h = make_core()
    token = Client(h).allocate(EVEN_PORT=True).get(Attr.RESERVATION_TOKEN)
    h.core.handle_timer(31.0)
    assert any(r.address[1] % 2 == 1 for r in h.ports.released)
    other = ("udp", ("198.51.100.7", 40002), CLIENT[2])
    assert code(Client(h, five_tuple=other).allocate(32.0, RESERVATION_TOKEN=token)) == 508


def test_even_port_without_reservation() -> None:
    h = make_core(ports=FakeRelayPorts(ports=range(50001, 50011)))  # the first free port is odd
    reply = Client(h).allocate(EVEN_PORT=False)
    assert reply.get(Attr.XOR_RELAYED_ADDRESS)[1] % 2 == 0
    assert Attr.RESERVATION_TOKEN not in reply
    assert len(h.ports.open) == 1  # R bit 0: nothing reserved
    # Without EVEN-PORT the same pool hands out the odd port.
    other = ("udp", ("198.51.100.7", 40002), CLIENT[2])
    assert Client(h, five_tuple=other).allocate().get(Attr.XOR_RELAYED_ADDRESS)[1] == 50001


@pytest.mark.parametrize("attrs", [
    {"RESERVATION_TOKEN": b"12345678", "EVEN_PORT": False},
    {"RESERVATION_TOKEN": b"12345678", "REQUESTED_ADDRESS_FAMILY": 1},
    {"REQUESTED_ADDRESS_FAMILY": 1, "ADDITIONAL_ADDRESS_FAMILY": 2},
    {"ADDITIONAL_ADDRESS_FAMILY": 1},
])
def test_conflicting_attributes_are_400(attrs: dict) -> None:
    h = make_core(ports=FakeRelayPorts(ipv6="2001:db8::1"))
    assert code(Client(h).allocate(**attrs)) == 400


def test_requested_family_not_available_is_440() -> None:
    h = make_core()
    assert code(Client(h).allocate(REQUESTED_ADDRESS_FAMILY=2)) == 440
    assert code(Client(h, five_tuple=("udp", ("198.51.100.7", 1), CLIENT[2])).allocate(REQUESTED_ADDRESS_FAMILY=9)) == 440


def test_ipv6_allocation() -> None:
    h = make_core(ports=FakeRelayPorts(ipv4=None, ipv6="2001:db8::1"))
    reply = Client(h).allocate(REQUESTED_ADDRESS_FAMILY=2)
    assert code(reply) == 200
    assert reply.get(Attr.XOR_RELAYED_ADDRESS)[0] == "2001:db8::1"


def test_dual_allocation_gives_two_relayed_addresses() -> None:
    h = make_core(ports=FakeRelayPorts(ipv6="2001:db8::1"))
    reply = Client(h).allocate(ADDITIONAL_ADDRESS_FAMILY=2)
    assert [a[0] for a in reply.get_all(Attr.XOR_RELAYED_ADDRESS)] == ["192.0.2.1", "2001:db8::1"]
    assert Attr.ADDRESS_ERROR_CODE not in reply


def test_dual_allocation_without_ipv6_keeps_ipv4_and_reports_address_error() -> None:
    h = make_core()
    reply = Client(h).allocate(ADDITIONAL_ADDRESS_FAMILY=2)
    assert code(reply) == 200
    assert len(reply.get_all(Attr.XOR_RELAYED_ADDRESS)) == 1
    assert reply.get(Attr.ADDRESS_ERROR_CODE) == (2, 440, "Address Family not Supported")


def test_dual_allocation_with_ipv6_out_of_ports_reports_508() -> None:
    # RFC 8656 §7.2 step 9: IPv6 is supported but has no port left: partial success, 508.
    ports = FakeRelayPorts(ipv6="2001:db8::1")
    ports.free[2] = []
    h = make_core(ports=ports)
    reply = Client(h).allocate(ADDITIONAL_ADDRESS_FAMILY=2)
    assert code(reply) == 200
    assert [a[0] for a in reply.get_all(Attr.XOR_RELAYED_ADDRESS)] == ["192.0.2.1"]
    assert reply.get(Attr.ADDRESS_ERROR_CODE) == (2, 508, "Insufficient Capacity")


def test_ipv6_only_server_refuses_a_dual_allocation_with_440() -> None:
    # RFC 8656 §7.2 step 7: without REQUESTED-ADDRESS-FAMILY the allocation is IPv4; a server
    # without IPv4 answers 440, ADDITIONAL-ADDRESS-FAMILY or not.
    h = make_core(ports=FakeRelayPorts(ipv4=None, ipv6="2001:db8::1"))
    reply = Client(h).allocate(ADDITIONAL_ADDRESS_FAMILY=2)
    assert code(reply) == 440
    assert Attr.XOR_RELAYED_ADDRESS not in reply
    assert not h.core.allocations and not h.ports.open


def test_dont_fragment_supported_sets_df_and_unsupported_is_420() -> None:
    h = make_core()
    assert code(Client(h).allocate(DONT_FRAGMENT=None)) == 200
    assert h.ports.df_requests == [True]
    h2 = make_core(ports=FakeRelayPorts(dont_fragment=False))
    reply = Client(h2).allocate(DONT_FRAGMENT=None)
    assert code(reply) == 420
    assert reply.get(Attr.UNKNOWN_ATTRIBUTES) == [Attr.DONT_FRAGMENT]


def test_unknown_comprehension_required_attribute_is_420_listing_it() -> None:
    h = make_core()
    msg = request(Method.ALLOCATE, REQUESTED_TRANSPORT=17)
    msg.add(0x0077, b"\x01\x02\x03\x04")
    msg.add(0x7001, b"")
    msg.add(0xC001, b"x")  # comprehension-optional: ignored
    reply = Client(h).raw(msg)
    assert code(reply) == 420
    assert reply.get(Attr.UNKNOWN_ATTRIBUTES) == [0x0077, 0x7001]


def test_user_quota_486_and_capacity_508() -> None:
    h = make_core(user_quota=1)
    assert code(Client(h).allocate()) == 200
    other = ("udp", ("198.51.100.8", 1), CLIENT[2])
    assert code(Client(h, five_tuple=other).allocate()) == 486
    assert h.core.stats.allocations_refused["quota"] == 1
    h2 = make_core(max_allocations=1)
    Client(h2).allocate()
    assert code(Client(h2, five_tuple=other).allocate()) == 508
    h3 = make_core(ports=FakeRelayPorts(ports=range(50000, 50001)))
    Client(h3).allocate()
    assert code(Client(h3, five_tuple=other).allocate()) == 508
    assert h3.core.stats.allocations_refused["capacity"] == 1


def test_draining_refuses_new_allocations() -> None:
    h = make_core()
    h.core.draining = True
    assert code(Client(h).allocate()) == 508
    h2 = make_core(alternate_server=("203.0.113.9", 3478))
    h2.core.draining = True
    reply = Client(h2).allocate()
    assert code(reply) == 300
    assert reply.get(Attr.ALTERNATE_SERVER) == ("203.0.113.9", 3478)


def test_wrong_password_unknown_user_and_expired_username_are_401() -> None:
    h = make_core()
    username, _ = rest_user()
    assert code(Client(h, username=username, password="wrong").allocate()) == 401
    assert code(Client(h, username="nobody", password="x").allocate()) == 401
    old_user, old_password = rest_user(expires=WALL_NOW - 1)
    assert code(Client(h, username=old_user, password=old_password).allocate()) == 401
    assert h.core.stats.auth_failures["bad_integrity"] == 1
    assert h.core.stats.auth_failures["unknown_user"] == 1
    assert h.core.stats.auth_failures["expired_username"] == 1
    assert not h.core.allocations


def test_stale_nonce_is_438_with_a_fresh_nonce() -> None:
    h = make_core()
    client = Client(h)
    client.allocate()
    h.wall[0] += 601  # the nonce carries its own expiry
    reply = client.refresh(10.0)
    assert code(reply) == 438
    assert reply.get(Attr.NONCE) and reply.get(Attr.NONCE) != client.nonce


def test_missing_realm_is_400() -> None:
    h = make_core()
    client = Client(h)
    client.allocate()
    msg = request(Method.REFRESH)
    msg.add(Attr.USERNAME, client.username).add(Attr.NONCE, client.nonce)
    reply = decode_message(h.core.handle_stun(encode_message(msg, key=client.key), CLIENT, 1.0))
    assert code(reply) == 400


def test_sha256_password_algorithm_and_message_integrity_sha256() -> None:
    h = make_core()
    client = Client(h, algorithm=ALGORITHM_SHA256)
    reply = client.allocate()
    assert code(reply) == 200
    assert Attr.MESSAGE_INTEGRITY_SHA256 in reply and Attr.MESSAGE_INTEGRITY not in reply


def test_password_algorithm_must_be_an_entry_of_password_algorithms_parameters_included() -> None:
    # RFC 8489 §9.2.4: the algorithm number alone is not enough.
    h = make_core()
    client = Client(h)
    client.allocate()  # get a nonce
    msg = request(Method.REFRESH, PASSWORD_ALGORITHMS=[(1, b""), (2, b"")], PASSWORD_ALGORITHM=(2, b"xx"))
    msg.add(Attr.USERNAME, client.username).add(Attr.REALM, REALM).add(Attr.NONCE, client.nonce)
    reply = decode_message(h.core.handle_stun(encode_message(msg, key=client.key), CLIENT, 1.0))
    assert code(reply) == 400
    assert h.core.stats.auth_failures["bad_request"] == 1


def test_password_algorithms_mismatch_is_400() -> None:
    h = make_core()
    client = Client(h)
    client.allocate()  # get a nonce
    msg = request(Method.REFRESH, PASSWORD_ALGORITHMS=[(2, b"")], PASSWORD_ALGORITHM=(2, b""))
    msg.add(Attr.USERNAME, client.username).add(Attr.REALM, REALM).add(Attr.NONCE, client.nonce)
    reply = decode_message(h.core.handle_stun(encode_message(msg, key=client.key), CLIENT, 1.0))
    assert code(reply) == 400


def test_static_user() -> None:
    h = make_core(static_users={"bob": "hunter2"})
    assert code(Client(h, username="bob", password="hunter2").allocate()) == 200


def test_malformed_request_gets_400_with_the_same_transaction_id() -> None:
    h = make_core()
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST)
    data = bytearray(encode_message(msg.add(Attr.LIFETIME, 5)))
    data[22:24] = b"\x00\x08"  # LIFETIME claims 8 bytes; only 4 follow in the message
    reply = h.core.handle_stun(bytes(data), CLIENT, 0.0)
    assert reply is not None
    decoded = decode_message(reply)
    assert code(decoded) == 400 and decoded.transaction_id == msg.transaction_id


def test_responses_and_indications_from_clients_are_dropped() -> None:
    h = make_core()
    for cls in (MessageClass.SUCCESS, MessageClass.ERROR):
        assert h.core.handle_stun(encode_message(Message(Method.ALLOCATE, cls)), CLIENT, 0.0) is None
    assert h.core.handle_stun(encode_message(Message(Method.DATA, MessageClass.INDICATION)), CLIENT, 0.0) is None
    assert h.core.stats.dropped["unsolicited_response"] == 2


def test_binding_needs_no_credentials() -> None:
    h = make_core()
    reply = Client(h).raw(Message(Method.BINDING, MessageClass.REQUEST))
    assert code(reply) == 200
    assert reply.get(Attr.XOR_MAPPED_ADDRESS) == CLIENT[1]
