"""How the core drives the data plane (``TurnCore.fast_routes``): a route per channel of a UDP
allocation, with the earliest of the channel's, the permission's and the allocation's expiry,
moved whenever one of them changes, removed with the channel or the allocation, and whatever
it carried folded into the allocation's counters (so the usage record and the metrics count
it). Also in-process against the real data plane in use, compiled or twin."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from turnserver import accel
from turnserver.policy import PeerPolicy

from .test_client import connect, start_server
from .turn_harness import CLIENT, PEER, Client, code, make_core

PEER2 = ("203.0.113.51", 6001)


class RecordingRoutes:
    """A FastRoutes that keeps what the core asked of it."""

    def __init__(self) -> None:
        self.routes: dict[int, dict[str, Any]] = {}
        self.removed: list[int] = []
        self.counts: dict[int, tuple[int, int, int, int]] = {}
        self.failures = 0
        self.next = 0

    def add(self, five_tuple, number, relay, peer, expires_at, up, down, held=None):
        if five_tuple[0] != "udp":
            return None
        self.next += 1
        self.routes[self.next] = {"five_tuple": five_tuple, "number": number, "peer": peer,
                                  "expires_at": expires_at, "up": up, "down": down, "relay": relay}
        return self.next

    def set_expiry(self, handle, expires_at):
        self.routes[handle]["expires_at"] = expires_at

    def remove(self, handle):
        del self.routes[handle]
        self.removed.append(handle)
        return self.counts.pop(handle, (0, 0, 0, 0))

    def take_counts(self):
        out = [(h, *c) for h, c in self.counts.items()]
        self.counts.clear()
        return out

    def take_send_failures(self):
        n, self.failures = self.failures, 0
        return n


def setup(**config):
    h = make_core(**config)
    routes = RecordingRoutes()
    h.core.fast_routes = routes
    client = Client(h)
    assert code(client.allocate(0.0)) == 200
    return h, client, routes


def only(routes: RecordingRoutes) -> dict[str, Any]:
    assert len(routes.routes) == 1, routes.routes
    return next(iter(routes.routes.values()))


def test_a_channel_gets_a_route_with_the_earliest_expiry_and_the_allocation_buckets() -> None:
    h, client, routes = setup(default_lifetime_s=600)
    assert code(client.bind(10.0, 0x4000, PEER)) == 200
    route = only(routes)
    allocation = h.core.allocations[CLIENT]
    assert route["number"] == 0x4000 and route["peer"] == PEER and route["five_tuple"] == CLIENT
    # Channel 610, permission 310, allocation 600: the permission comes first.
    assert route["expires_at"] == 310.0
    assert route["up"] is allocation.up and route["down"] is allocation.down
    assert route["relay"] is allocation.relays[0]
    # A CreatePermission at 200 refreshes the permission to 500; the allocation (600) is next.
    assert code(client.permit(200.0, PEER)) == 200
    assert only(routes)["expires_at"] == 500.0
    # A Refresh moves the allocation to 900: the permission (500) is the earliest again.
    assert code(client.refresh(300.0, 600)) == 200
    assert only(routes)["expires_at"] == 500.0
    assert code(client.permit(450.0, PEER)) == 200
    assert only(routes)["expires_at"] == 610.0  # now the channel (bound at 10) is first
    # A rebind refreshes the channel (1060) and the permission with it (760); the allocation
    # (900) is later.
    assert code(client.bind(460.0, 0x4000, PEER)) == 200
    assert only(routes)["expires_at"] == 760.0
    # A permission for another peer does not touch this route.
    assert code(client.permit(470.0, PEER2)) == 200
    assert only(routes)["expires_at"] == 760.0


def test_routes_go_with_their_channel_and_their_allocation_and_their_counts_are_kept() -> None:
    h, client, routes = setup(default_lifetime_s=3600, max_lifetime_s=3600)
    assert code(client.bind(1.0, 0x4000, PEER)) == 200
    assert code(client.bind(1.0, 0x4001, PEER2)) == 200
    assert len(routes.routes) == 2
    first, second = sorted(routes.routes)
    routes.counts[first] = (100, 2, 50, 1)
    h.core.fold_route_counts()
    allocation = h.core.allocations[CLIENT]
    assert (allocation.bytes_to_peer, allocation.packets_to_peer) == (100, 2)
    assert (allocation.bytes_to_client, allocation.packets_to_client) == (50, 1)
    # The channel expires: its route goes at the core's deadline.
    h.core.handle_timer(700.0)  # the channels (601) and the permissions (301) have expired
    assert routes.routes == {} and set(routes.removed) == {first, second}
    # Deleting the allocation adds what its routes carried since the last fold first.
    assert code(client.bind(701.0, 0x4002, PEER)) == 200
    third = max(routes.routes)
    routes.counts[third] = (7, 1, 9, 3)
    routes.failures = 2
    assert code(client.refresh(702.0, 0)) == 200
    assert routes.routes == {}
    usage = h.ended[-1][0]
    assert (usage.bytes_to_peer, usage.packets_to_peer) == (107, 3)
    assert (usage.bytes_to_client, usage.packets_to_client) == (59, 4)
    h.core.fold_route_counts()
    assert h.core.stats.dropped["send_failed"] == 2


def test_a_reload_that_refuses_the_peer_closes_the_route() -> None:
    h, client, routes = setup()
    assert code(client.bind(1.0, 0x4000, PEER)) == 200
    h.core.reconfigure(policy=PeerPolicy(allow=("2001:db8::/32",), relay_addresses=("192.0.2.1",),
                                         relay_port_range=(50000, 50099)))
    assert routes.routes == {}  # the channel was unbound, so its route went


def test_stream_allocations_have_no_route() -> None:
    h = make_core()
    routes = RecordingRoutes()
    h.core.fast_routes = routes
    tcp = ("tcp", CLIENT[1], CLIENT[2])
    client = Client(h, five_tuple=tcp)
    assert code(client.allocate(0.0)) == 200
    assert code(client.bind(1.0, 0x4000, PEER)) == 200
    assert routes.routes == {}


def test_a_real_server_carries_channel_data_on_the_data_plane_and_counts_it() -> None:
    expected = "python" if os.environ.get("TURND_PURE_PYTHON", "") not in ("", "0") else "c"
    try:
        import turnserver._datapath  # noqa: F401
    except ImportError:
        expected = "python"
    assert accel.IMPLEMENTATION == expected

    async def main() -> None:
        server = await start_server()
        try:
            a = await connect(server)
            b = await connect(server)
            ra = await a.allocate()
            rb = await b.allocate()
            await a.channel_bind(rb)
            await b.channel_bind(ra)
            for i in range(50):
                a.send_to(rb, b"ping %d" % i)
                assert await b.receive(2) == (ra, b"ping %d" % i)
                b.send_to(ra, b"pong %d" % i)
                assert await a.receive(2) == (rb, b"pong %d" % i)
            stats = server.plane.stats()
            # Each datagram crossed the server once client to peer and once peer to client.
            assert stats["fast_client_to_peer"] >= 100 and stats["fast_peer_to_client"] >= 100
            assert stats["routes"] == 2
            assert server.core is not None
            server.core.fold_route_counts()
            total = sum(al.packets_to_peer for al in server.core.allocations.values())
            assert total == 100
            await a.close()
            await b.close()
        finally:
            await server.stop()

    asyncio.run(main())
