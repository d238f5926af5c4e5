"""The core's defences, each driven so that only that defence can stop the input.

Every test pairs the refused input with a control that is accepted, so a refusal is proven to
come from the defence under test and not from a malformed request. Assertions are on codes,
state (allocations, permissions, channels) and counters, never on reason phrases or on the
nonce's layout.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from typing import Any

import pytest

from turnserver.auth import ALGORITHM_MD5, ALGORITHM_SHA256, long_term_key, userhash
from turnserver.stun import (
    Attr,
    Message,
    MessageClass,
    Method,
    decode_message,
    encode_channel_data,
    encode_message,
    verify_message_integrity,
    verify_message_integrity_sha256,
)
from turnserver.turn.core import SendToPeer

from .turn_harness import CLIENT, PEER, REALM, Client, Harness, code, make_core, request, rest_user

PEER2 = ("203.0.113.51", 6001)  # permitted, never bound to a channel: Data indications
OWN_RELAY_IP = "192.0.2.1"  # the harness's relay address, also its listening address
OWN_LISTEN_PORT = 3478
MI256_TYPE = int(Attr.MESSAGE_INTEGRITY_SHA256)


def five_tuple(ip: str, port: int = 40000, transport: str = "udp") -> tuple[str, tuple[str, int], tuple[str, int]]:
    return (transport, (ip, port), ("192.0.2.1", 3478))


def challenge(h: Harness, ft: Any = CLIENT) -> str:
    """A real nonce, taken from the 401 an unauthenticated Allocate gets."""
    reply = h.core.handle_stun(encode_message(request(Method.ALLOCATE, REQUESTED_TRANSPORT=17)), ft, 0.0, "sink")
    assert isinstance(reply, bytes)
    msg = decode_message(reply)
    assert code(msg) == 401
    nonce = msg.get(Attr.NONCE)
    assert isinstance(nonce, str) and nonce
    return nonce


def signed(msg: Message, username: str, nonce: str, key: bytes) -> bytes:
    msg.add(Attr.USERNAME, username).add(Attr.REALM, REALM).add(Attr.NONCE, nonce)
    return encode_message(msg, key=key)


def stun(h: Harness, data: bytes, ft: Any = CLIENT, now: float = 0.0) -> Message:
    reply = h.core.handle_stun(data, ft, now, "sink")
    assert isinstance(reply, bytes), reply
    return decode_message(reply)


def send_indication(h: Harness, peer: tuple[str, int], data: bytes, now: float, ft: Any = CLIENT) -> Any:
    msg = Message(Method.SEND, MessageClass.INDICATION)
    msg.add(Attr.XOR_PEER_ADDRESS, peer).add(Attr.DATA, data)
    return h.core.handle_stun(encode_message(msg), ft, now)


def relay_of(h: Harness, ft: Any = CLIENT) -> Any:
    return h.core.allocations[ft].relays[0]


def dropped_total(h: Harness) -> int:
    return sum(h.core.stats.dropped.values())


# ---------------------------------------------------------------- 1. MESSAGE-INTEGRITY-SHA256


def with_mi256(msg: Message, key: bytes, *, size: int = 32, corrupt: int | None = None,
               sha1_first: bool = False) -> bytes:
    """``msg`` with MESSAGE-INTEGRITY-SHA256 of ``size`` bytes (RFC 8489 §14.6 allows 16-32);
    ``corrupt`` flips one bit of that MAC byte; ``sha1_first`` puts a correct
    MESSAGE-INTEGRITY before it."""
    base = encode_message(msg, key=key, integrity="sha1") if sha1_first else encode_message(msg)
    head, attrs = base[:20], base[20:]
    head = head[:2] + struct.pack("!H", len(attrs) + 4 + size) + head[4:]
    mac = bytearray(hmac.digest(key, head + attrs, "sha256")[:size])
    if corrupt is not None:
        mac[corrupt] ^= 0x01
    return head + attrs + struct.pack("!HH", MI256_TYPE, size) + bytes(mac)


def sha256_allocate(client: Client, nonce: str) -> Message:
    msg = request(Method.ALLOCATE, REQUESTED_TRANSPORT=17)
    msg.add(Attr.USERNAME, client.username).add(Attr.REALM, REALM).add(Attr.NONCE, nonce)
    if client.algorithm is not None:
        msg.add(Attr.PASSWORD_ALGORITHMS, [(ALGORITHM_MD5, b""), (ALGORITHM_SHA256, b"")])
        msg.add(Attr.PASSWORD_ALGORITHM, (client.algorithm, b""))
    return msg


def test_the_mi256_helper_matches_the_codec() -> None:
    """The helper that forges MACs builds exactly what the codec builds when uncorrupted."""
    msg = request(Method.ALLOCATE, REQUESTED_TRANSPORT=17)
    key = b"k" * 16
    assert with_mi256(msg, key) == encode_message(msg, key=key, integrity="sha256")
    assert with_mi256(msg, key, sha1_first=True) == encode_message(msg, key=key, integrity="both")


@pytest.mark.parametrize("algorithm", [None, ALGORITHM_SHA256], ids=["md5-key", "sha256-key"])
@pytest.mark.parametrize("size, corrupt, sha1_first", [
    (32, 0, False),   # full length, first byte wrong
    (32, 31, False),  # full length, last byte wrong
    (16, 0, False),   # truncated to 16 bytes, first byte wrong
    (16, 15, False),  # truncated, last byte wrong
    (20, 19, False),  # truncated to 20 bytes, last byte wrong
    (32, 31, True),   # a correct MESSAGE-INTEGRITY does not excuse a wrong -SHA256
], ids=["full-first", "full-last", "trunc16-first", "trunc16-last", "trunc20-last", "with-good-sha1"])
def test_a_wrong_sha256_mac_gets_401_and_allocates_nothing(algorithm: int | None, size: int, corrupt: int,
                                                           sha1_first: bool) -> None:
    """RFC 8489 §9.2.4: MESSAGE-INTEGRITY-SHA256 is checked, at any permitted length."""
    h = make_core()
    client = Client(h, algorithm=algorithm)
    nonce = challenge(h)
    before = h.core.stats.auth_failures["bad_integrity"]
    reply = stun(h, with_mi256(sha256_allocate(client, nonce), client.key, size=size, corrupt=corrupt,
                               sha1_first=sha1_first), now=1.0)
    assert code(reply) == 401
    assert not h.core.allocations and not h.ports.open
    assert h.core.stats.auth_failures["bad_integrity"] == before + 1
    assert sum(h.core.stats.allocations_created.values()) == 0
    # Control: the same request with the right MAC of the same length is accepted, and the
    # answer is signed the same way.
    reply = stun(h, with_mi256(sha256_allocate(client, nonce), client.key, size=size, sha1_first=sha1_first),
                 now=2.0)
    assert code(reply) == 200
    assert CLIENT in h.core.allocations
    assert verify_message_integrity_sha256(reply, client.key)


# ---------------------------------------------------------------- 2. forged nonces


def _changed(ch: str) -> str:
    """Another character, differing in a high bit of the base64 value when ``ch`` is base64."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.find(ch)
    return alphabet[(i + 32) % 64] if i >= 0 else "A"


def _allocate_with_nonce(h: Harness, ft: Any, nonce: str, username: str, password: str) -> Message:
    key = long_term_key(username, REALM, password)
    return stun(h, signed(request(Method.ALLOCATE, REQUESTED_TRANSPORT=17), username, nonce, key), ft, 1.0)


def test_every_single_character_change_of_a_real_nonce_gets_438() -> None:
    """The nonce's MAC covers all of it: no one-character edit is accepted (each edit comes
    from its own client IP, with a nonce that IP was really given)."""
    h = make_core()
    username, password = rest_user()
    tried = 0
    position = 0
    while True:
        ft = five_tuple(f"198.51.{100 + position // 200}.{1 + position % 200}")
        nonce = challenge(h, ft)
        if position >= len(nonce):
            break
        forged = nonce[:position] + _changed(nonce[position]) + nonce[position + 1:]
        assert forged != nonce
        reply = _allocate_with_nonce(h, ft, forged, username, password)
        assert code(reply) == 438, (position, forged)
        assert not h.core.allocations and not h.ports.open
        tried += 1
        position += 1
    assert tried == len(nonce) > 0
    assert h.core.stats.requests[("allocate", 438)] == tried
    assert sum(h.core.stats.allocations_created.values()) == 0
    # Control: the nonce the last IP was given, unchanged, works.
    assert code(_allocate_with_nonce(h, ft, nonce, username, password)) == 200
    assert ft in h.core.allocations


@pytest.mark.parametrize("garbage", [
    "garbage",
    "0" * 32,
    "A" * 45,
    "obMatJos2AAAA" + "0" * 32,
    "obMatJos2" + "x" * 36,
    "\u00e9t\u00e9",  # not ASCII
    "-" * 128,
], ids=["word", "zeros", "letters", "cookie-and-zeros", "cookie-and-junk", "not-ascii", "longest"])
def test_a_garbage_nonce_gets_438(garbage: str) -> None:
    h = make_core()
    username, password = rest_user()
    reply = _allocate_with_nonce(h, CLIENT, garbage, username, password)
    assert code(reply) == 438
    assert not h.core.allocations and not h.ports.open
    assert Attr.NONCE in reply  # a 438 hands out a fresh nonce...
    assert code(_allocate_with_nonce(h, CLIENT, reply.get(Attr.NONCE), username, password)) == 200  # ...that works


def test_a_nonce_issued_to_another_ip_gets_438() -> None:
    h = make_core()
    username, password = rest_user()
    other = five_tuple("198.51.100.99")
    # Issued by the core's own nonce manager, and from a real 401, to other IPs.
    for nonce in (h.core.nonces.make("198.51.100.200"), challenge(h, other)):
        reply = _allocate_with_nonce(h, CLIENT, nonce, username, password)
        assert code(reply) == 438
        assert not h.core.allocations and not h.ports.open
    # Control: the other IP's nonce works from that IP, and the same user's port change does
    # not matter (the nonce is bound to the IP only).
    nonce = challenge(h, other)
    assert code(_allocate_with_nonce(h, five_tuple("198.51.100.99", 40001), nonce, username, password)) == 200
    assert sum(h.core.stats.allocations_created.values()) == 1


@pytest.mark.parametrize("kind", ["flipped", "garbage", "other_ip"])
def test_a_forged_nonce_installs_no_permission_on_a_live_allocation(kind: str) -> None:
    h = make_core()
    client = Client(h)
    assert code(client.allocate(0.0)) == 200
    real = client.nonce
    assert real
    forged = {
        "flipped": real[:-1] + _changed(real[-1]),
        "garbage": "garbage-nonce",
        "other_ip": h.core.nonces.make("198.51.100.201"),
    }[kind]
    msg = request(Method.CREATE_PERMISSION, XOR_PEER_ADDRESS=PEER)
    reply = stun(h, signed(msg, client.username, forged, client.key), now=1.0)
    assert code(reply) == 438
    assert h.core.allocations[CLIENT].permissions == {}
    assert send_indication(h, PEER, b"x", 2.0) is None
    # Control: the genuine nonce installs it.
    assert code(client.permit(3.0, PEER)) == 200
    assert PEER[0] in h.core.allocations[CLIENT].permissions


# ---------------------------------------------------------------- 3. the own-port rule on Send


SECOND_CLIENT = five_tuple("198.51.100.8")


@pytest.mark.parametrize("allow, port", [
    (("203.0.113.0/24",), OWN_LISTEN_PORT),
    (("203.0.113.0/24",), 40000),
    (("203.0.113.0/24",), 50100),
    (("203.0.113.0/24",), 65535),
    # An allow CIDR that covers the server itself still never opens its listening port.
    (("203.0.113.0/24", "192.0.2.0/24"), OWN_LISTEN_PORT),
], ids=["listening-port", "below-relay-range", "above-relay-range", "top-port", "allowed-cidr-listening-port"])
def test_send_toward_an_own_non_relay_port_is_refused_despite_a_permission(allow: tuple[str, ...],
                                                                           port: int) -> None:
    """A permission for the server's own address (two clients of one server may talk) does not
    open its listening port or ports outside the relay range: only the port rule stops these."""
    h = make_core(allow=allow)
    client = Client(h)
    assert code(client.allocate(0.0)) == 200
    other = Client(h, SECOND_CLIENT)
    assert code(other.allocate(0.0)) == 200
    assert code(client.permit(0.0, (OWN_RELAY_IP, 0))) == 200
    assert OWN_RELAY_IP in h.core.allocations[CLIENT].permissions
    refusals = dict(h.core.stats.policy_refusals)
    policy_drops = h.core.stats.dropped["policy"]
    assert send_indication(h, (OWN_RELAY_IP, port), b"loop", 1.0) is None
    assert h.core.stats.policy_refusals["own_port"] == refusals.get("own_port", 0) + 1
    assert sum(h.core.stats.policy_refusals.values()) == sum(refusals.values()) + 1
    assert h.core.stats.dropped["policy"] == policy_drops + 1
    assert h.core.allocations[CLIENT].packets_to_peer == 0
    assert h.core.allocations[CLIENT].bytes_to_peer == 0
    # Control: the same address on the relay port of another allocation of this server is
    # relayed, under the same permission.
    target = relay_of(h, SECOND_CLIENT).address
    assert target[0] == OWN_RELAY_IP
    out = send_indication(h, target, b"hi", 2.0)
    assert isinstance(out, SendToPeer) and out.peer == target and out.data == b"hi"
    assert h.core.stats.dropped["policy"] == policy_drops + 1


# ---------------------------------------------------------------- 5. quota slots come back


QUOTA = 2


def quota_clients(h: Harness, count: int, first_port: int, transport: str = "udp") -> list[Client]:
    """``count`` clients of one user (one credential), each on its own 5-tuple, sharing one
    nonce so that only one challenge is spent."""
    username, password = rest_user("quota-user")
    clients = [Client(h, five_tuple("198.51.100.7", first_port + i, transport), username, password)
               for i in range(count)]
    nonce = challenge(h, clients[0].five_tuple)
    for c in clients:
        c.nonce = nonce
    return clients


def _ended_by_refresh(h: Harness, victim: Client, now: float) -> None:
    assert code(victim.refresh(now, lifetime=0)) == 200


def _ended_by_expiry(h: Harness, victim: Client, now: float) -> None:
    h.core.handle_timer(now)


def _ended_by_connection_close(h: Harness, victim: Client, now: float) -> None:
    h.core.connection_closed(victim.five_tuple, now)


@pytest.mark.parametrize("end, transport, reason, now", [
    (_ended_by_refresh, "udp", "deleted", 200.0),
    (_ended_by_expiry, "udp", "expired", 601.0),
    (_ended_by_connection_close, "tcp", "connection_closed", 200.0),
], ids=["refresh-0", "expiry", "connection-closed"])
def test_an_ended_allocation_gives_its_quota_slot_back(end: Callable[[Harness, Client, float], None],
                                                       transport: str, reason: str, now: float) -> None:
    h = make_core(user_quota=QUOTA)
    first, *rest = quota_clients(h, QUOTA + 2, 41000, transport)
    # The first allocation is older than the others, so that only it has expired at t=601.
    assert code(first.allocate(0.0)) == 200
    holders = rest[:QUOTA - 1]
    for c in holders:
        assert code(c.allocate(100.0)) == 200
    newcomer, extra = rest[QUOTA - 1:]
    assert code(newcomer.allocate(101.0)) == 486  # full
    end(h, first, now)
    assert first.five_tuple not in h.core.allocations
    assert h.core.stats.allocations_ended[reason] == 1
    assert all(c.five_tuple in h.core.allocations for c in holders)
    # The freed slot is usable: one new allocation succeeds, the next one is over quota again.
    assert code(newcomer.allocate(now)) == 200
    assert code(extra.allocate(now)) == 486
    assert h.core.stats.allocations_refused["quota"] == 2
    assert len(h.core.allocations) == QUOTA


def test_a_full_quota_stays_full_while_allocations_live() -> None:
    """The control for the test above: without an end, the slot stays taken."""
    h = make_core(user_quota=QUOTA)
    clients = quota_clients(h, QUOTA + 1, 42000)
    for c in clients[:QUOTA]:
        assert code(c.allocate(0.0)) == 200
    h.core.handle_timer(300.0)  # nothing has expired yet
    assert code(clients[QUOTA].allocate(300.0)) == 486


# ---------------------------------------------------------------- 6. USERHASH


STATIC_USER, STATIC_PASSWORD = "carol", "carol-password"


def userhash_request(method: int, uh: bytes, nonce: str, algorithm: int | None, **attrs: Any) -> Message:
    msg = request(method, **attrs)
    msg.add(Attr.USERHASH, uh).add(Attr.REALM, REALM).add(Attr.NONCE, nonce)
    if algorithm is not None:
        msg.add(Attr.PASSWORD_ALGORITHMS, [(ALGORITHM_MD5, b""), (ALGORITHM_SHA256, b"")])
        msg.add(Attr.PASSWORD_ALGORITHM, (algorithm, b""))
    return msg


@pytest.mark.parametrize("algorithm", [None, ALGORITHM_MD5, ALGORITHM_SHA256], ids=["plain", "md5", "sha256"])
def test_a_static_user_logs_in_with_userhash_alone(algorithm: int | None) -> None:
    """RFC 8489 §9.2.4, §14.4: USERHASH instead of USERNAME identifies a static user."""
    h = make_core(static_users={STATIC_USER: STATIC_PASSWORD})
    key = long_term_key(STATIC_USER, REALM, STATIC_PASSWORD, algorithm or ALGORITHM_MD5)
    nonce = challenge(h)
    msg = userhash_request(Method.ALLOCATE, userhash(STATIC_USER, REALM), nonce, algorithm, REQUESTED_TRANSPORT=17)
    assert Attr.USERNAME not in msg
    reply = stun(h, encode_message(msg, key=key), now=1.0)
    assert code(reply) == 200
    assert verify_message_integrity(reply, key)  # signed with carol's key
    assert h.core.allocations[CLIENT].username == STATIC_USER
    # The allocation belongs to carol: a Refresh by USERHASH, and one by USERNAME, both pass.
    msg = userhash_request(Method.REFRESH, userhash(STATIC_USER, REALM), nonce, algorithm)
    assert code(stun(h, encode_message(msg, key=key), now=2.0)) == 200
    client = Client(h, username=STATIC_USER, password=STATIC_PASSWORD, algorithm=algorithm)
    client.nonce = nonce
    assert code(client.refresh(3.0)) == 200


@pytest.mark.parametrize("case", ["unknown-user", "flipped-hash", "other-realm", "wrong-password",
                                  "rest-user-hash"])
def test_a_wrong_userhash_gets_401_and_allocates_nothing(case: str) -> None:
    h = make_core(static_users={STATIC_USER: STATIC_PASSWORD})
    good = userhash(STATIC_USER, REALM)
    key = long_term_key(STATIC_USER, REALM, STATIC_PASSWORD)
    rest_name, _ = rest_user()
    uh = {
        "unknown-user": userhash("mallory", REALM),
        "flipped-hash": bytes([good[0] ^ 0x80]) + good[1:],
        "other-realm": userhash(STATIC_USER, "other.realm"),
        "wrong-password": good,
        "rest-user-hash": userhash(rest_name, REALM),  # REST names cannot be recovered from a hash
    }[case]
    if case == "wrong-password":
        key = long_term_key(STATIC_USER, REALM, "not-carols-password")
    nonce = challenge(h)
    reply = stun(h, encode_message(userhash_request(Method.ALLOCATE, uh, nonce, None, REQUESTED_TRANSPORT=17),
                                   key=key), now=1.0)
    assert code(reply) == 401
    assert not h.core.allocations and not h.ports.open
    assert sum(h.core.stats.auth_failures.values()) == 1


# ---------------------------------------------------------------- 7. expiry checked on lookup


def _data_inputs(h: Harness) -> dict[str, Callable[[float], Any]]:
    """The four data paths, each toward a permitted peer: PEER has channel 0x4000, PEER2 none."""
    relay = relay_of(h)
    return {
        "peer_via_channel": lambda now: h.core.handle_peer_data(relay, b"down", PEER, now),
        "peer_via_data_indication": lambda now: h.core.handle_peer_data(relay, b"down", PEER2, now),
        "channel_data": lambda now: h.core.handle_channel_data(encode_channel_data(0x4000, b"up"), CLIENT, now),
        "send_indication": lambda now: send_indication(h, PEER2, b"up", now),
    }


def _assert_all_delivered(inputs: dict[str, Callable[[float], Any]], now: float) -> None:
    for name, feed in inputs.items():
        assert feed(now) is not None, name


def _assert_none_delivered(h: Harness, inputs: dict[str, Callable[[float], Any]], now: float,
                           reasons: dict[str, set[str]]) -> None:
    allocation = h.core.allocations[CLIENT]
    counters = (allocation.bytes_to_peer, allocation.packets_to_peer,
                allocation.bytes_to_client, allocation.packets_to_client)
    for name, feed in inputs.items():
        before = dict(h.core.stats.dropped)
        assert feed(now) is None, name
        moved = {r for r, n in h.core.stats.dropped.items() if n != before.get(r, 0)}
        assert len(moved) == 1 and moved <= reasons[name], (name, moved)
        (reason,) = moved
        assert h.core.stats.dropped[reason] == before.get(reason, 0) + 1
    assert (allocation.bytes_to_peer, allocation.packets_to_peer,
            allocation.bytes_to_client, allocation.packets_to_client) == counters


def test_an_expired_allocation_relays_nothing_before_its_timer_runs() -> None:
    h = make_core()
    client = Client(h)
    assert code(client.allocate(0.0)) == 200  # expires at 600
    # Permission (800) and channel (1100) outlive the allocation.
    assert code(client.permit(500.0, PEER, PEER2)) == 200
    assert code(client.bind(500.0, 0x4000, PEER)) == 200
    inputs = _data_inputs(h)
    _assert_all_delivered(inputs, 599.0)
    assert h.core.next_deadline() is not None and h.core.next_deadline() <= 600.0
    # handle_timer is not called: the allocation is still stored, but expired.
    assert CLIENT in h.core.allocations
    _assert_none_delivered(h, inputs, 601.0, {
        "peer_via_channel": {"no_allocation"},
        "peer_via_data_indication": {"no_allocation"},
        "channel_data": {"unbound_channel", "no_allocation"},
        "send_indication": {"no_allocation"},
    })


def test_an_expired_permission_relays_nothing_before_its_timer_runs() -> None:
    h = make_core()
    client = Client(h)
    assert code(client.allocate(0.0, LIFETIME=3600)) == 200
    assert code(client.bind(0.0, 0x4000, PEER)) == 200  # channel until 600, permission until 300
    assert code(client.permit(0.0, PEER2)) == 200  # until 300
    inputs = _data_inputs(h)
    _assert_all_delivered(inputs, 299.0)
    assert PEER[0] in h.core.allocations[CLIENT].permissions
    _assert_none_delivered(h, inputs, 301.0, {name: {"no_permission"} for name in inputs})
    assert 0x4000 in h.core.allocations[CLIENT].channels  # the channel itself is still bound


def test_an_expired_channel_carries_nothing_before_its_timer_runs() -> None:
    h = make_core()
    client = Client(h)
    assert code(client.allocate(0.0, LIFETIME=3600)) == 200
    assert code(client.bind(0.0, 0x4000, PEER)) == 200  # channel until 600
    assert code(client.permit(500.0, PEER)) == 200  # permission until 800
    channel_data = encode_channel_data(0x4000, b"up")
    assert isinstance(h.core.handle_channel_data(channel_data, CLIENT, 599.0), SendToPeer)
    _, frame = h.core.handle_peer_data(relay_of(h), b"down", PEER, 599.0)
    assert frame[:2] == b"\x40\x00"  # ChannelData while the channel lives
    assert 0x4000 in h.core.allocations[CLIENT].channels
    before = h.core.stats.dropped["unbound_channel"]
    sent = h.core.allocations[CLIENT].packets_to_peer
    assert h.core.handle_channel_data(channel_data, CLIENT, 601.0) is None
    assert h.core.stats.dropped["unbound_channel"] == before + 1
    assert h.core.allocations[CLIENT].packets_to_peer == sent
    # The peer still has a permission: its data comes as a Data indication, not on the channel.
    sink, frame = h.core.handle_peer_data(relay_of(h), b"down", PEER, 601.0)
    indication = decode_message(frame)
    assert indication.msg_class == MessageClass.INDICATION and indication.method == Method.DATA
    assert indication.get(Attr.XOR_PEER_ADDRESS) == PEER and indication.get(Attr.DATA) == b"down"
