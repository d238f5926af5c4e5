"""The core's limits against one bad packet, one bad client and one leaked credential.

Each test drives the sans-IO core (fake clock, fake relay ports) to a limit, checks the
refusal and its counter, and checks that what stays under the limit still works.
"""

from __future__ import annotations

import struct
import time

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_channel_data, encode_message
from turnserver.stun.message import MAX_ATTRIBUTES
from turnserver.turn.core import MAX_UNKNOWN_LISTED
from turnserver.turn.limits import SourceRateLimiter, TokenBucket

from .turn_harness import CLIENT, PEER, REALM, Client, FakeRelayPorts, code, make_core, rest_user

UNKNOWN_TYPES = [t for t in range(0x0030, 0x8000) if t not in {int(a) for a in Attr}]


def five_tuple(ip: str, port: int = 40000) -> tuple[str, tuple[str, int], tuple[str, int]]:
    return ("udp", (ip, port), ("192.0.2.1", 3478))


def worst_binding(count: int) -> bytes:
    """A Binding request carrying ``count`` distinct unknown comprehension-required types."""
    body = b"".join(struct.pack("!HH", t, 0) for t in UNKNOWN_TYPES[:count])
    return struct.pack("!HHI", 0x0001, len(body), 0x2112A442) + b"\x01" * 12 + body


# -- one packet ---------------------------------------------------------------------------------


def test_the_worst_unknown_attribute_message_is_cheap_and_its_answer_bounded() -> None:
    h = make_core()
    data = worst_binding(16371)  # the 64 KiB datagram that took 1.86 s of CPU
    assert len(data) == 20 + 4 * 16371 <= 65535 + 20
    started = time.process_time()
    reply = h.core.handle_stun(data, CLIENT, 0.0)
    spent = time.process_time() - started
    msg = decode_message(reply)
    assert code(msg) == 400  # more attributes than any real message: malformed
    assert len(reply) == 28
    # Generous bounds, for a shared and noisy machine: a millisecond or so is typical.
    assert spent < 0.05, spent
    # Under the attribute limit, every unknown type is found, and the 420 lists 128.
    h = make_core()
    reply = h.core.handle_stun(worst_binding(MAX_ATTRIBUTES), CLIENT, 0.0)
    msg = decode_message(reply)
    assert code(msg) == 420
    assert msg.get(Attr.UNKNOWN_ATTRIBUTES) == UNKNOWN_TYPES[:MAX_UNKNOWN_LISTED]  # wire order
    assert len(reply) <= 20 + 8 + 4 + 2 * MAX_UNKNOWN_LISTED
    assert h.core.stats.dropped["internal_error"] == 0


@pytest.mark.parametrize("attributes", [MAX_ATTRIBUTES, MAX_ATTRIBUTES + 1, 16383])
def test_every_64k_message_shape_costs_a_bounded_time(attributes: int) -> None:
    # Each worst shape the decoder and core meet before authentication: unknown types,
    # optional types, repeated known ones (USERNAME), peer addresses.
    shapes = {
        "unknown": b"".join(struct.pack("!HH", t, 0) for t in UNKNOWN_TYPES[:attributes]),
        "optional": struct.pack("!HH", 0x8030, 0) * attributes,
        "usernames": struct.pack("!HH", Attr.USERNAME, 0) * attributes,
        "peers": struct.pack("!HHBBH4s", Attr.XOR_PEER_ADDRESS, 8, 0, 1, 1, b"\x01\x02\x03\x04")
        * min(attributes, 5459),
    }
    for name, body in shapes.items():
        for msg_type in (0x0001, 0x0003, 0x0008):  # Binding, Allocate, CreatePermission
            data = struct.pack("!HHI", msg_type, len(body), 0x2112A442) + b"\x02" * 12 + body
            h = make_core()
            started = time.process_time()
            reply = h.core.handle_stun(data, CLIENT, 0.0)
            spent = time.process_time() - started
            assert reply is not None and len(reply) <= 20 + 8 + 4 + 2 * MAX_UNKNOWN_LISTED + 80
            assert spent < 0.05, (name, hex(msg_type), spent)
            assert h.core.stats.dropped["internal_error"] == 0


def test_unknown_attribute_check_costs_linear_operations() -> None:
    # Counted, not timed: every attribute is compared a bounded number of times.
    class CountingInt(int):
        compared = 0

        def __hash__(self) -> int:
            CountingInt.compared += 1
            return int.__hash__(self)

    msg = Message(Method.BINDING, MessageClass.REQUEST)
    for n in (1000, 4000):
        CountingInt.compared = 0
        msg.attributes = [(CountingInt(t), b"") for t in UNKNOWN_TYPES[:n]]
        assert len(msg.unknown_comprehension_required()) == n
        assert CountingInt.compared <= 3 * n  # known-set, seen-set lookup and insert
    assert len(msg.unknown_comprehension_required(MAX_UNKNOWN_LISTED)) == MAX_UNKNOWN_LISTED


# -- permissions and channels ---------------------------------------------------------------------


def v4_peers(count: int) -> list[tuple[str, int]]:
    # 203.0.113.0/24 and 198.51.100.0/24 are allowed by the harness (documentation ranges).
    return [(f"203.0.113.{i % 250 + 1}", 6000) if i < 250 else (f"2001:db8::{i:x}", 6000)
            for i in range(count)]


def test_permissions_per_allocation_are_capped_with_508() -> None:
    h = make_core(max_permissions_per_allocation=5)
    client = Client(h)
    assert code(client.allocate()) == 200
    allocation = h.core.allocations[CLIENT]
    assert code(client.permit(0.0, *v4_peers(5))) == 200
    assert len(allocation.permissions) == 5
    # Refreshing those five needs no room; a sixth IP does.
    assert code(client.permit(1.0, *v4_peers(5))) == 200
    sixth = ("203.0.113.200", 6000)
    assert code(client.permit(1.0, sixth)) == 508
    assert code(client.bind(1.0, 0x4000, sixth)) == 508  # ChannelBind installs one too
    assert h.core.stats.limit_refusals["permissions"] == 2
    assert sixth[0] not in allocation.permissions
    # Once the five have expired (before their timers run) there is room again.
    assert code(client.permit(301.5, sixth)) == 200
    assert list(allocation.permissions) == [sixth[0]]


def test_a_request_with_more_addresses_than_the_cap_installs_nothing() -> None:
    h = make_core(allow=("203.0.113.0/24", "198.51.100.0/24"))  # default cap: 128
    client = Client(h)
    client.allocate()
    many = [(f"203.0.113.{i % 250 + 1}", 6000 + i) for i in range(500)]
    reply = client.permit(0.0, *many)
    assert code(reply) == 508
    assert h.core.allocations[CLIENT].permissions == {}
    distinct = [(f"198.51.100.{i}", 6000) for i in range(1, 129)] + [("203.0.113.1", 6000)]
    assert code(client.permit(0.0, *distinct[:128])) == 200
    assert len(h.core.allocations[CLIENT].permissions) == 128
    assert code(client.permit(0.0, *distinct[1:])) == 508  # 127 known and one new: no room


def test_channels_per_allocation_are_capped_with_508() -> None:
    h = make_core(max_channels_per_allocation=3)
    client = Client(h)
    client.allocate()
    targets = v4_peers(4)
    for i in range(3):
        assert code(client.bind(0.0, 0x4000 + i, targets[i])) == 200
    assert code(client.bind(0.0, 0x4003, targets[3])) == 508
    assert h.core.stats.limit_refusals["channels"] == 1
    for i in range(3):
        assert code(client.bind(10.0, 0x4000 + i, targets[i])) == 200  # a rebind needs no room
    assert code(client.refresh(300.0, lifetime=3600)) == 200
    # Expired channels (not yet swept by the timer) make room; live ones do not.
    assert code(client.bind(601.0, 0x4003, targets[3])) == 508
    assert code(client.bind(611.0, 0x4003, targets[3])) == 200


# -- quotas ---------------------------------------------------------------------------------------


def test_user_quota_counts_the_user_part_of_rest_usernames() -> None:
    h = make_core(user_quota=2)
    names = [rest_user("alice", expires=1_800_003_600 + i) for i in range(3)]
    clients = [Client(h, five_tuple("198.51.100.7", 41000 + i), *names[i]) for i in range(3)]
    assert code(clients[0].allocate()) == 200
    assert code(clients[1].allocate()) == 200
    assert code(clients[2].allocate()) == 486  # a third credential for alice, same quota
    assert h.core.stats.limit_refusals["user_quota"] == 1
    bob = Client(h, five_tuple("198.51.100.7", 42000), *rest_user("bob"))
    assert code(bob.allocate()) == 200


def test_reservations_count_toward_the_user_quota_and_max_allocations() -> None:
    # Allocate with EVEN-PORT R, then Refresh(0), in a loop, used to hold half the pool.
    h = make_core(user_quota=2)
    first = Client(h, five_tuple("198.51.100.7", 41000))
    reply = first.allocate(EVEN_PORT=True)
    assert code(reply) == 200 and reply.get(Attr.RESERVATION_TOKEN) is not None
    assert code(first.refresh(1.0, lifetime=0)) == 200
    assert h.core.reservation_count == 1
    second = Client(h, five_tuple("198.51.100.7", 41001))
    assert code(second.allocate(2.0, EVEN_PORT=True)) == 486  # 1 reserved + 2 needed > 2
    assert code(second.allocate(2.0)) == 200  # a plain allocation still fits
    third = Client(h, five_tuple("198.51.100.7", 41002))
    assert code(third.allocate(2.0)) == 486
    # The reservation lapses after 30 s and gives its slot back with its port.
    h.core.handle_timer(31.0)
    assert h.core.reservation_count == 0
    assert code(third.allocate(31.0)) == 200
    capped = make_core(max_allocations=2, user_quota=0)
    c = Client(capped, five_tuple("198.51.100.7", 41000))
    assert code(c.allocate(EVEN_PORT=True)) == 200  # one allocation and one reservation
    other = Client(capped, five_tuple("198.51.100.8", 41000), *rest_user("bob"))
    assert code(other.allocate()) == 508
    assert capped.core.stats.limit_refusals["max_allocations"] == 1


def test_using_ones_own_reservation_is_not_counted_twice() -> None:
    h = make_core(user_quota=2)
    first = Client(h, five_tuple("198.51.100.7", 41000))
    token = first.allocate(EVEN_PORT=True).get(Attr.RESERVATION_TOKEN)
    second = Client(h, five_tuple("198.51.100.7", 41001))
    reply = second.allocate(1.0, RESERVATION_TOKEN=token)
    assert code(reply) == 200
    assert h.core.reservation_count == 0
    assert h.core.quotas.user_count("alice") == 2 and h.core.quotas.total() == 2


# -- bandwidth ------------------------------------------------------------------------------------


def bound_pair(h, rate_peer=PEER):
    client = Client(h)
    client.allocate()
    assert code(client.bind(0.0, 0x4000, rate_peer)) == 200
    relay = next(iter(h.core._by_relay))
    return client, relay


def test_the_allocation_bandwidth_cap_drops_and_counts_the_excess_each_way() -> None:
    h = make_core(allocation_bandwidth_bytes_s=1000)
    _, relay = bound_pair(h)
    frame = encode_channel_data(0x4000, b"x" * 600)
    assert h.core.handle_channel_data(frame, CLIENT, 0.0) is not None
    assert h.core.handle_channel_data(frame, CLIENT, 0.1) is None  # 1200 > 1000 + 100
    assert h.core.stats.limit_refusals["allocation_bandwidth"] == 1
    assert h.core.handle_channel_data(frame, CLIENT, 0.7) is not None  # refilled
    allocation = h.core.allocations[CLIENT]
    assert allocation.bytes_to_peer == 1200 and allocation.packets_to_peer == 2
    # The other direction has its own bucket.
    assert h.core.handle_peer_data(relay, b"y" * 900, PEER, 0.0) is not None
    assert h.core.handle_peer_data(relay, b"y" * 900, PEER, 0.05) is None
    assert h.core.stats.limit_refusals["allocation_bandwidth"] == 2
    assert allocation.bytes_to_client == 900


def test_the_server_bandwidth_cap_is_shared_and_reloadable() -> None:
    h = make_core(allocation_bandwidth_bytes_s=0, server_bandwidth_bytes_s=1000)
    a = Client(h, five_tuple("198.51.100.7"))
    b = Client(h, five_tuple("198.51.100.8"), *rest_user("bob"))
    for client in (a, b):
        client.allocate()
        client.bind(0.0, 0x4000, PEER)
    frame = encode_channel_data(0x4000, b"x" * 600)
    assert h.core.handle_channel_data(frame, a.five_tuple, 0.0) is not None
    assert h.core.handle_channel_data(frame, b.five_tuple, 0.0) is None
    assert h.core.stats.limit_refusals["server_bandwidth"] == 1
    from dataclasses import replace

    h.core.reconfigure(config=replace(h.core.config, server_bandwidth_bytes_s=0))
    for _ in range(100):
        assert h.core.handle_channel_data(frame, b.five_tuple, 0.0) is not None


def test_a_reload_applies_a_new_allocation_cap_to_live_allocations() -> None:
    from dataclasses import replace

    h = make_core(allocation_bandwidth_bytes_s=0)
    bound_pair(h)
    frame = encode_channel_data(0x4000, b"x" * 600)
    assert all(h.core.handle_channel_data(frame, CLIENT, 0.0) for _ in range(50))
    h.core.reconfigure(config=replace(h.core.config, allocation_bandwidth_bytes_s=1000))
    results = [h.core.handle_channel_data(frame, CLIENT, 1.0) is not None for _ in range(5)]
    # A full bucket (1000) and the second since the last refill: two of 600 bytes, no more.
    assert results == [True, True, False, False, False]


def test_token_bucket_is_unlimited_at_zero_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(0, 0.0)
    bucket.credit -= 10**12
    assert bucket.credit > 0
    bucket = TokenBucket(100, 0.0)
    taken = 0
    for step in range(1000):  # ten seconds in 10 ms steps, 7 bytes each step
        bucket.credit -= 7
        if bucket.credit >= 0 or bucket.refill(step * 0.01, 7):
            taken += 7
        else:
            pass
    assert 1000 <= taken <= 1100 + 7  # 100 B/s for 10 s, plus the first second's burst


# -- reflection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION,
                                    Method.CHANNEL_BIND])
def test_an_unauthenticated_answer_is_at_most_four_times_the_request(method: int) -> None:
    h = make_core(software="turnd")
    data = encode_message(Message(method, MessageClass.REQUEST))
    assert len(data) == 20
    reply = h.core.handle_stun(data, CLIENT, 0.0)
    msg = decode_message(reply)
    assert code(msg) == 401
    # The harness's realm "unit.test" takes 4 bytes more than the default "turnd".
    realm_extra = ((len(REALM) + 3) & ~3) - 8
    assert len(reply) - realm_extra <= 4 * len(data), (len(reply), msg)
    assert Attr.SOFTWARE not in msg and msg.get(Attr.ERROR_CODE)[1] == ""
    # An authenticated answer still carries SOFTWARE and reason phrases.
    client = Client(h)
    ok = client.allocate()
    assert ok.get(Attr.SOFTWARE) == "turnd"
    assert client.allocate(1.0).get(Attr.ERROR_CODE) == (437, "Allocation Mismatch")


def test_a_binding_answer_is_at_most_1_6_times_the_request() -> None:
    h = make_core(software="turnd")
    data = encode_message(Message(Method.BINDING, MessageClass.REQUEST))
    reply = h.core.handle_stun(data, CLIENT, 0.0)
    assert len(reply) <= 1.6 * len(data)
    assert Attr.SOFTWARE not in decode_message(reply)


def test_a_burst_from_one_source_gets_at_most_100_answers_and_others_are_answered() -> None:
    h = make_core()
    data = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, attributes=[
        (Attr.REQUESTED_TRANSPORT, 17)]))
    flood = five_tuple("198.51.100.66", 5000)
    answered = sum(1 for i in range(2000)
                   if h.core.handle_stun(data, flood, i / 2000) is not None)
    assert 40 <= answered <= 100
    assert h.core.stats.limit_refusals["challenge_rate"] == 2000 - answered
    # Another source, at the same moment, is answered at once, and so is the flooder's
    # authenticated traffic on a live allocation.
    other = Client(h, five_tuple("198.51.100.67"))
    assert code(other.allocate(1.0)) == 200
    # A spoofed flood from many sources keeps no state per source: the table stays the size
    # it was built with.
    for i in range(5000):
        h.core.handle_stun(data, five_tuple(f"10.{i // 250}.{i % 250}.1", 5000), 2.0)
    assert h.core._challenges.slots == 4096


def test_the_challenge_limit_is_for_udp_only_a_stream_source_is_proved() -> None:
    """Over TCP and TLS the handshake proves the source and nothing is reflected; a withheld
    401 would only stall a client that, on a reliable transport, never sends again (coturn's
    turnutils_uclient -T with 24 sessions from one address stalled on it)."""
    h = make_core()
    data = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, attributes=[
        (Attr.REQUESTED_TRANSPORT, 17)]))
    for kind in ("tcp", "tls"):
        stream = (kind, ("198.51.100.66", 5000), ("192.0.2.1", 3478))
        assert all(h.core.handle_stun(data, stream, i / 2000) is not None for i in range(500))
    assert h.core.stats.limit_refusals["challenge_rate"] == 0
    malformed = data[:22] + b"\x00\x08" + data[24:]  # an attribute longer than the message
    stream = ("tcp", ("198.51.100.66", 5001), ("192.0.2.1", 3478))
    assert all(code(decode_message(h.core.handle_stun(malformed, stream, 1.0))) == 400
               for _ in range(100))
    udp = five_tuple("198.51.100.66", 5000)
    assert sum(1 for i in range(500) if h.core.handle_stun(data, udp, 2.0) is not None) <= 100


def test_the_challenge_limit_can_be_turned_off() -> None:
    h = make_core(challenge_rate_per_source=0)
    data = encode_message(Message(Method.REFRESH, MessageClass.REQUEST))
    assert all(h.core.handle_stun(data, CLIENT, 0.0) is not None for _ in range(500))


def test_source_rate_limiter_refills() -> None:
    limiter = SourceRateLimiter(10, 5, seed=1, slots=16)
    assert [limiter.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("a", 0.1)  # one token back after 100 ms
    assert not limiter.allow("a", 0.1)


# -- memory held after allocations end ------------------------------------------------------------


def test_ended_allocations_free_their_state_and_the_heap_compacts_at_once() -> None:
    h = make_core(user_quota=0, max_allocations=0, challenge_rate_per_source=0,
                  ports=FakeRelayPorts(ports=range(50000, 52100)))
    baseline = h.core.timer_entries
    clients = []
    for i in range(2000):
        client = Client(h, five_tuple("198.51.100.7", 10000 + i))
        assert code(client.allocate(1.0)) == 200
        assert code(client.bind(1.0, 0x4000, PEER)) == 200
        clients.append(client)
    assert h.core.timer_entries >= 3 * 2000  # allocation, permission and channel entries
    ended = [h.core.allocations[c.five_tuple] for c in clients]
    for client in clients:
        assert code(client.refresh(2.0, lifetime=0)) == 200
    # Not at the old deadlines (600 s away): now.
    assert h.core.timer_entries <= baseline + 1  # at most twice the live entries: none live
    assert not h.core.allocations and not h.core._routes and not h.core._by_relay
    for allocation in ended:
        assert allocation.sink is None and allocation.permissions == {} and allocation.channels == {}
    assert len(h.ended) == 2000 and all(reason == "deleted" for _, reason, _ in h.ended)
    h.core.handle_timer(10_000.0)
    assert h.core.timer_entries == 0


def test_the_heap_still_expires_everything_after_compaction() -> None:
    h = make_core(user_quota=0, challenge_rate_per_source=0,
                  ports=FakeRelayPorts(ports=range(50000, 50400)))
    keep = [Client(h, five_tuple("198.51.100.8", 20000 + i)) for i in range(10)]
    for client in keep:
        client.allocate(0.0)
        client.permit(0.0, PEER)
    churn = [Client(h, five_tuple("198.51.100.7", 10000 + i)) for i in range(300)]
    for client in churn:
        client.allocate(0.0)
        client.refresh(0.5, lifetime=0)
    assert len(h.core.allocations) == 10
    h.core.handle_timer(301.0)  # the permissions of the kept ones expire
    assert all(not h.core.allocations[c.five_tuple].permissions for c in keep)
    h.core.handle_timer(601.0)
    assert not h.core.allocations
    assert sorted(r for _, r, _ in h.ended).count("expired") == 10


# -- peers on the server's own relay ports ---------------------------------------------------------


def test_a_channel_to_an_own_relay_port_stops_when_the_port_is_released() -> None:
    from turnserver.policy import PeerPolicy

    h = make_core()
    a = Client(h, five_tuple("198.51.100.7"))
    b = Client(h, five_tuple("198.51.100.8"), *rest_user("bob"))
    a.allocate()
    b.allocate()
    relay_b = h.core.allocations[b.five_tuple].relays[0]
    held = {relay.address for relay in h.ports.open}
    h.core.reconfigure(policy=PeerPolicy(relay_addresses=["192.0.2.1"], relay_port_range=(50000, 50099),
                                         listening=[("192.0.2.1", 3478)],
                                         port_held=lambda ip, port: (ip, port) in held))
    assert code(a.bind(0.0, 0x4000, relay_b.address)) == 200
    frame = encode_channel_data(0x4000, b"hello")
    assert h.core.handle_channel_data(frame, a.five_tuple, 1.0) is not None
    b.refresh(1.0, lifetime=0)
    held.discard(relay_b.address)  # the port is free now: another program may bind it
    assert h.core.handle_channel_data(frame, a.five_tuple, 1.5) is None
    assert h.core.stats.policy_refusals["own_port"] == 1
    # A port of the relay range nobody holds is refused from the start.
    assert code(a.bind(2.0, 0x4001, ("192.0.2.1", 50099))) == 403


def test_limits_are_counted_in_the_metrics() -> None:
    from prometheus_client import generate_latest

    from turnserver.metrics import build_registry

    from .test_metrics import fake_server

    h = make_core(max_channels_per_allocation=1)
    client = Client(h)
    client.allocate()
    client.bind(0.0, 0x4000, PEER)
    client.bind(0.0, 0x4001, ("203.0.113.51", 6000))
    text = generate_latest(build_registry(fake_server(h.core), process=False)).decode()
    assert 'turn_limit_refusals_total{limit="channels"} 1.0' in text
    assert 'turn_limit_refusals_total{limit="challenge_rate"} 0.0' in text
    assert "turn_timer_entries " in text


def test_a_policy_refusal_names_the_rule_in_its_reason_phrase() -> None:
    h = make_core(allow=("203.0.113.0/24", "192.0.2.0/24"))
    client = Client(h)
    client.allocate()
    listening = client.bind(0.0, 0x4000, ("192.0.2.1", 3478))  # the harness's listener
    assert listening.get(Attr.ERROR_CODE) == (
        403, "Peer is a listening port of this server or a relay port it does not hold")
    loopback = client.bind(0.0, 0x4001, ("127.0.0.1", 9))
    assert loopback.get(Attr.ERROR_CODE) == (403, "Peer address not allowed (loopback)")


def test_policy_refusal_series_are_exported_at_zero() -> None:
    from prometheus_client import generate_latest

    from turnserver.metrics import POLICY_REASONS, build_registry

    from .test_metrics import fake_server

    text = generate_latest(build_registry(fake_server(make_core().core), process=False)).decode()
    for reason in POLICY_REASONS:
        assert f'turn_peer_policy_refusals_total{{reason="{reason}"}} 0.0' in text


def test_an_ipv6_request_to_an_ipv4_only_relay_is_refused_as_family_not_capacity() -> None:
    # The capacity alert must not fire for a client that asks for what the server never had.
    h = make_core()
    reply = Client(h).allocate(REQUESTED_ADDRESS_FAMILY=2)
    assert code(reply) == 440
    assert h.core.stats.allocations_refused["family"] == 1
    assert h.core.stats.allocations_refused["capacity"] == 0
