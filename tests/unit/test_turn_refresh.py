"""RFC 8656 §7.3-7.4: Refresh, expiry and deletion, with a fake clock."""

from __future__ import annotations

from turnserver.stun import Attr

from .turn_harness import CLIENT, WALL_NOW, Client, code, make_core, rest_user


def test_allocation_expires_exactly_at_its_lifetime() -> None:
    h = make_core()
    Client(h).allocate(0.0)
    h.core.handle_timer(599.9)
    assert CLIENT in h.core.allocations
    assert h.core.next_deadline() == 600.0
    h.core.handle_timer(600.0)
    assert CLIENT not in h.core.allocations
    assert [reason for _, reason, _ in h.ended] == ["expired"]
    assert len(h.ports.released) == 1 and not h.ports.open


def test_refresh_extends_from_now() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    reply = client.refresh(500.0, lifetime=1200)
    assert code(reply) == 200 and reply.get(Attr.LIFETIME) == 1200
    h.core.handle_timer(600.0)  # the old deadline passes harmlessly
    assert CLIENT in h.core.allocations
    h.core.handle_timer(1700.0)
    assert CLIENT not in h.core.allocations


def test_refresh_without_lifetime_gives_the_default() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0, LIFETIME=3000)
    assert client.refresh(10.0).get(Attr.LIFETIME) == 600


def test_refresh_lifetime_zero_deletes_at_once() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    reply = client.refresh(5.0, lifetime=0)
    assert code(reply) == 200 and reply.get(Attr.LIFETIME) == 0
    assert CLIENT not in h.core.allocations
    assert h.ended[0][1] == "deleted"
    # A retransmitted delete finds nothing: 437 (RFC 8656 §7.3 notes this case).
    assert code(client.refresh(6.0, lifetime=0)) == 437


def test_refresh_after_expiry_is_437() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    assert code(client.refresh(601.0)) == 437


def test_refresh_with_other_credentials_is_441() -> None:
    h = make_core()
    Client(h).allocate(0.0)
    user, password = rest_user("mallory")
    assert code(Client(h, username=user, password=password).refresh(1.0)) == 441


def test_refresh_family_mismatch_is_443() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    assert code(client.refresh(1.0, REQUESTED_ADDRESS_FAMILY=2)) == 443


def test_expired_rest_username_may_refresh_by_default() -> None:
    h = make_core()
    user, password = rest_user(expires=WALL_NOW + 60)
    client = Client(h, username=user, password=password)
    client.allocate(0.0)
    h.wall[0] += 120  # the credential's own expiry passes during the call
    client.nonce = None  # fetch a fresh nonce, as a client would after 438
    assert code(client.refresh(120.0)) == 200
    assert code(client.permit(121.0, ("203.0.113.50", 1))) == 200


def test_expired_rest_username_refresh_refused_when_configured() -> None:
    h = make_core(allow_refresh_after_expiry=False)
    user, password = rest_user(expires=WALL_NOW + 60)
    client = Client(h, username=user, password=password)
    client.allocate(0.0)
    h.wall[0] += 120
    client.nonce = None
    assert code(client.refresh(120.0)) == 401


def test_requests_on_an_unknown_five_tuple_are_437() -> None:
    h = make_core()
    client = Client(h)
    assert code(client.refresh(0.0)) == 437
    assert code(client.permit(0.0, ("203.0.113.50", 1))) == 437
    assert code(client.bind(0.0, 0x4000, ("203.0.113.50", 1))) == 437


def test_shutdown_releases_every_relay() -> None:
    h = make_core()
    Client(h).allocate(0.0, EVEN_PORT=True)
    h.core.shutdown(1.0)
    assert not h.ports.open
    assert h.ended[0][1] == "shutdown"


def test_refreshes_do_not_grow_the_deadline_heap() -> None:
    # One heap entry per allocation, permission and channel, however often they are refreshed.
    h = make_core()
    client = Client(h)
    client.allocate(0.0)
    for i in range(2000):
        now = i * 0.1
        assert code(client.refresh(now)) == 200
        assert code(client.permit(now, ("203.0.113.50", 1))) == 200
    for i in range(200):
        assert code(client.bind(200.0 + i * 0.1, 0x4000, ("203.0.113.51", 2))) == 200
    assert len(h.core._timers) <= 4
    # Every deadline still falls when it should. Last refreshes: the allocation and the first
    # permission at 199.9, the channel and its permission at 219.9.
    alloc = h.core.allocations[CLIENT]
    h.core.handle_timer(499.85)
    assert set(alloc.permissions) == {"203.0.113.50", "203.0.113.51"}
    h.core.handle_timer(499.95)
    assert set(alloc.permissions) == {"203.0.113.51"}
    h.core.handle_timer(519.95)
    assert alloc.permissions == {} and 0x4000 in alloc.channels
    h.core.handle_timer(799.85)
    assert CLIENT in h.core.allocations
    h.core.handle_timer(799.95)
    assert CLIENT not in h.core.allocations


def test_permission_and_channel_expire_on_time_after_refreshes() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0, LIFETIME=3600)
    client.permit(0.0, ("203.0.113.50", 1))
    client.permit(100.0, ("203.0.113.50", 1))  # now good until 400
    client.bind(0.0, 0x4000, ("203.0.113.51", 2))
    client.bind(50.0, 0x4000, ("203.0.113.51", 2))  # channel until 650, permission until 350
    alloc = h.core.allocations[CLIENT]
    h.core.handle_timer(349.9)
    assert set(alloc.permissions) == {"203.0.113.50", "203.0.113.51"}
    h.core.handle_timer(350.0)
    assert set(alloc.permissions) == {"203.0.113.50"}
    h.core.handle_timer(400.0)
    assert alloc.permissions == {}
    h.core.handle_timer(649.9)
    assert 0x4000 in alloc.channels
    h.core.handle_timer(650.0)
    assert alloc.channels == {} and not h.core._routes


def test_refresh_to_a_shorter_lifetime_ends_the_allocation_at_the_new_time() -> None:
    h = make_core()
    client = Client(h)
    client.allocate(0.0, LIFETIME=3600)
    assert client.refresh(10.0).get(Attr.LIFETIME) == 600  # no LIFETIME: the default
    assert h.core.next_deadline() == 610.0
    h.core.handle_timer(610.0)
    assert CLIENT not in h.core.allocations
    assert [reason for _, reason, _ in h.ended] == ["expired"]
    assert not h.ports.open
    h.core.handle_timer(3600.0)  # the superseded deadline finds nothing to do
    assert len(h.ended) == 1
