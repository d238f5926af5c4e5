"""The core's side of turnd admin: session records and disconnects (sans-IO)."""

from __future__ import annotations

from turnserver.io.admin import AdminError, client_filter

import pytest

from .turn_harness import CLIENT, PEER, Client, code, make_core, rest_user


def test_sessions_list_every_allocation_and_filter_by_user_and_client() -> None:
    h = make_core()
    h.core.id_prefix = "w3-"
    alice = Client(h)
    assert code(alice.allocate(0.0)) == 200
    assert code(alice.bind(1.0, 0x4000, PEER)) == 200
    bob_tuple = ("udp", ("203.0.113.9", 5000), CLIENT[2])
    bob = Client(h, bob_tuple, *rest_user("bob"))
    assert code(bob.allocate(2.0)) == 200
    sessions = h.core.sessions(10.0)
    assert [s["id"] for s in sessions] == ["w3-1", "w3-2"]
    first = sessions[0]
    assert first["client"] == "198.51.100.7:40000" and first["channels"] == 1
    assert first["permissions"] == 1 and first["age_s"] == 10.0
    assert first["expires_in_s"] == h.core.allocations[CLIENT].expires_at - 10.0
    assert [s["id"] for s in h.core.sessions(10.0, user="bob")] == ["w3-2"]
    assert [s["id"] for s in h.core.sessions(10.0, user=bob.username)] == ["w3-2"]
    assert [s["id"] for s in h.core.sessions(10.0, client=client_filter("203.0.113.0/24"))] == ["w3-2"]


def test_disconnect_needs_a_filter_and_ends_only_what_matches() -> None:
    h = make_core()
    clients = [Client(h, five_tuple=("udp", ("198.51.100.7", 40000 + i), CLIENT[2])) for i in range(3)]
    for client in clients:
        assert code(client.allocate(0.0)) == 200
    assert h.core.disconnect(1.0) == 0  # no filter: nothing
    assert h.core.disconnect(1.0, user="nobody") == 0
    assert h.core.disconnect(1.0, allocation_id="2") == 1
    assert h.core.disconnect(1.0, user="alice", client=client_filter("198.51.100.7")) == 2
    assert h.core.allocations == {}
    assert [reason for _, reason, _ in h.ended] == ["disconnected"] * 3
    assert h.core.stats.allocations_ended["disconnected"] == 3
    assert h.core.quotas.total() == 0


def test_a_bad_cidr_is_an_admin_error() -> None:
    with pytest.raises(AdminError):
        client_filter("not-a-network")
    assert client_filter(None) is None
