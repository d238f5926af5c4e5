"""The data plane, compiled and pure-Python, on real loopback sockets: the same behaviour from
both (turnserver/_datapath.c and turnserver/io/datapath_py.py).

Each test runs against each implementation present: what a route carries (and how it is
framed and counted), and everything it must leave to the callbacks (no route, an expired
route, an empty bucket, a short or truncated frame, STUN).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from turnserver.io import datapath_py
from turnserver.turn.limits import PyTokenBucket

try:
    from turnserver import _datapath as native
except ImportError:  # not built here: the twin alone is tested
    native = None

IMPLEMENTATIONS = [pytest.param((datapath_py.DataPlane, PyTokenBucket, datapath_py.monotonic), id="python")]
if native is not None:
    IMPLEMENTATIONS.append(pytest.param((native.DataPlane, native.TokenBucket, native.monotonic), id="c"))

HOST = "127.0.0.1"
NUMBER = 0x4001


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


@dataclass
class Rig:
    """A listener and a relay socket in a data plane, a client and a peer outside it."""

    plane: Any
    bucket: Callable[[float, float], Any]
    clock: Callable[[], float]
    loop: asyncio.AbstractEventLoop
    listener: socket.socket
    relay: socket.socket
    client: socket.socket
    peer: socket.socket
    from_clients: list[tuple[Any, bytes, tuple[str, int]]] = field(default_factory=list)
    from_peers: list[tuple[Any, bytes, tuple[str, int]]] = field(default_factory=list)
    replies: dict[bytes, bytes] = field(default_factory=dict)
    callback: list[Any] = field(default_factory=lambda: [None])  # replaces on_client when set

    def route(self, expires_in: float = 60.0, up: Any = None, down: Any = None) -> int:
        now = self.clock()
        return self.plane.add_route(self.listener, self.client.getsockname(), NUMBER, self.relay,
                                    self.peer.getsockname(), now + expires_in,
                                    up if up is not None else self.bucket(0, now),
                                    down if down is not None else self.bucket(0, now))

    async def settle(self, until: Callable[[], bool], timeout_s: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until():
                return True
            await asyncio.sleep(0.005)
        return until()


def recv_all(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    out = []
    for _ in range(1000):
        try:
            data, addr = sock.recvfrom(65536)
        except BlockingIOError:
            break
        out.append((data, addr))
    return out


async def wait_recv(sock: socket.socket, count: int, timeout_s: float = 2.0) -> list[tuple[bytes, Any]]:
    got: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += recv_all(sock)
        await asyncio.sleep(0.005)
    return got


def run_with(impl: tuple[Any, Any, Any], body: Callable[[Rig], Any]) -> None:
    plane_cls, bucket_cls, clock = impl

    async def main() -> None:
        loop = asyncio.get_running_loop()
        socks = [udp() for _ in range(4)]
        rig: Rig

        def on_client(ctx: Any, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
            if rig.callback[0] is not None:
                return rig.callback[0](ctx, data, addr, now)
            rig.from_clients.append((ctx, data, addr))
            return rig.replies.get(data)

        def on_peer(relay: Any, data: bytes, addr: tuple[str, int], now: float) -> None:
            rig.from_peers.append((relay, data, addr))

        plane = plane_cls(loop, on_client, on_peer)
        rig = Rig(plane, bucket_cls, clock, loop, *socks)
        plane.add_listener(rig.listener, "listener-ctx")
        plane.add_relay(rig.relay, "relay-obj")
        plane.start()
        try:
            await body(rig)
        finally:
            plane.close()
            plane.remove_relay(rig.relay)
            plane.remove_listener(rig.listener)  # a second removal is harmless
            for sock in socks:
                sock.close()

    asyncio.run(main())


def channel_data(payload: bytes, number: int = NUMBER, length: int | None = None) -> bytes:
    return struct.pack("!HH", number, len(payload) if length is None else length) + payload


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_route_carries_channel_data_both_ways_framed_and_counted(impl) -> None:
    async def body(rig: Rig) -> None:
        handle = rig.route()
        listener = rig.listener.getsockname()
        relay = rig.relay.getsockname()
        for i in range(5):
            rig.client.sendto(channel_data(b"up%d" % i), listener)
        got = await wait_recv(rig.peer, 5)
        assert [d for d, _ in got] == [b"up%d" % i for i in range(5)]
        assert {a for _, a in got} == {relay}  # from the relay socket
        for i in range(3):
            rig.peer.sendto(b"down-%d" % i, relay)
        back = await wait_recv(rig.client, 3)
        assert [d for d, _ in back] == [channel_data(b"down-%d" % i) for i in range(3)]
        assert {a for _, a in back} == {listener}  # from the listener, no padding over UDP
        assert rig.from_clients == [] and rig.from_peers == []
        counts = {c[0]: c[1:] for c in rig.plane.take_counts()}
        assert counts == {handle: (sum(len(b"up%d" % i) for i in range(5)), 5,
                                   sum(len(b"down-%d" % i) for i in range(3)), 3)}
        assert rig.plane.take_counts() == []  # deltas: nothing new
        rig.client.sendto(channel_data(b"last"), listener)
        await wait_recv(rig.peer, 1)
        assert rig.plane.remove_route(handle) == (4, 1, 0, 0)
        stats = rig.plane.stats()
        assert stats["fast_client_to_peer"] == 6 and stats["fast_peer_to_client"] == 3
        assert stats["routes"] == 0

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_without_a_valid_route_everything_goes_to_the_callbacks_unchanged(impl) -> None:
    async def body(rig: Rig) -> None:
        listener = rig.listener.getsockname()
        relay = rig.relay.getsockname()
        client = rig.client.getsockname()
        stun = b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"t" * 12
        rig.replies[stun] = b"the reply"
        rig.client.sendto(stun, listener)
        rig.client.sendto(channel_data(b"no route"), listener)
        rig.peer.sendto(b"no route down", relay)
        assert await rig.settle(lambda: len(rig.from_clients) == 2 and len(rig.from_peers) == 1)
        assert rig.from_clients == [("listener-ctx", stun, client),
                                    ("listener-ctx", channel_data(b"no route"), client)]
        assert rig.from_peers == [("relay-obj", b"no route down", rig.peer.getsockname())]
        # The callback's reply went back to the client from the listener.
        assert await wait_recv(rig.client, 1) == [(b"the reply", listener)]

        handle = rig.route()
        rig.from_clients.clear()
        bad = [
            channel_data(b"short", length=50),          # length beyond the datagram
            b"\x40\x01\x00",                            # under 4 bytes
            channel_data(b"other channel", number=0x4002),
        ]
        for packet in bad:
            rig.client.sendto(packet, listener)
        assert await rig.settle(lambda: len(rig.from_clients) == 3)
        assert [d for _, d, _ in rig.from_clients] == bad
        assert recv_all(rig.peer) == []
        # Padding after the frame is allowed (the length field says what is data).
        rig.client.sendto(channel_data(b"abc") + b"\x00", listener)
        assert [d for d, _ in await wait_recv(rig.peer, 1)] == [b"abc"]
        rig.plane.remove_route(handle)

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_expired_route_carries_nothing_and_a_new_expiry_brings_it_back(impl) -> None:
    async def body(rig: Rig) -> None:
        listener = rig.listener.getsockname()
        relay = rig.relay.getsockname()
        handle = rig.route(expires_in=-0.001)
        rig.client.sendto(channel_data(b"late"), listener)
        rig.peer.sendto(b"late down", relay)
        assert await rig.settle(lambda: len(rig.from_clients) == 1 and len(rig.from_peers) == 1)
        assert recv_all(rig.peer) == [] and recv_all(rig.client) == []
        rig.plane.set_expiry(handle, rig.clock() + 30)
        rig.client.sendto(channel_data(b"again"), listener)
        assert [d for d, _ in await wait_recv(rig.peer, 1)] == [b"again"]
        assert rig.plane.remove_route(handle) == (5, 1, 0, 0)
        with pytest.raises(KeyError):
            rig.plane.set_expiry(handle, 0.0)

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_empty_bucket_leaves_the_packet_to_the_core_with_its_credit_intact(impl) -> None:
    async def body(rig: Rig) -> None:
        listener = rig.listener.getsockname()
        now = rig.clock()
        up = rig.bucket(100, now)  # 100 bytes/s, a burst of 100
        server_up = rig.bucket(0, now)
        rig.plane.set_server_buckets(server_up, rig.bucket(0, now))
        handle = rig.route(up=up)
        rig.client.sendto(channel_data(b"x" * 80), listener)
        assert [len(d) for d, _ in await wait_recv(rig.peer, 1)] == [80]
        credit = up.credit
        assert credit <= 20.5
        rig.client.sendto(channel_data(b"y" * 80), listener)  # over the cap
        assert await rig.settle(lambda: len(rig.from_clients) == 1)
        assert recv_all(rig.peer) == []
        assert up.credit == pytest.approx(credit, abs=2.0)  # only what accrued, no packet taken
        # The server's bucket refuses too: the allocation's credit is given back.
        up.set_rate(0, rig.clock())
        server_up.set_rate(10, rig.clock())
        server_up.credit = 0.0
        rig.client.sendto(channel_data(b"z" * 50), listener)
        assert await rig.settle(lambda: len(rig.from_clients) == 2)
        assert recv_all(rig.peer) == []
        rig.plane.remove_route(handle)

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_route_keys_are_unique_and_arguments_checked(impl) -> None:
    async def body(rig: Rig) -> None:
        handle = rig.route()
        with pytest.raises(ValueError):
            rig.route()  # the same client, listener and channel
        now = rig.clock()
        with pytest.raises(ValueError):
            rig.plane.add_route(rig.listener, ("not an ip", 1), NUMBER + 1, rig.relay, ("127.0.0.9", 9),
                                now + 1, rig.bucket(0, now), rig.bucket(0, now))
        with pytest.raises(ValueError):
            rig.plane.add_route(rig.listener, (HOST, 1), 0x3FFF, rig.relay, ("127.0.0.9", 9),
                                now + 1, rig.bucket(0, now), rig.bucket(0, now))
        assert rig.plane.remove_route(handle) == (0, 0, 0, 0)
        with pytest.raises(KeyError):
            rig.plane.remove_route(handle)
        again = rig.route()  # the key is free again
        rig.plane.remove_route(again)

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_many_routes_each_reach_their_own_peer(impl) -> None:
    """Past the first table size: every route is found, and only its own."""

    async def body(rig: Rig) -> None:
        listener = rig.listener.getsockname()
        now = rig.clock()
        handles = []
        for i in range(3000):
            handles.append(rig.plane.add_route(rig.listener, (HOST, 10000 + i), 0x4000 + (i % 0x0FFF),
                                               rig.relay, ("127.0.0.2", 20000 + i), now + 60,
                                               rig.bucket(0, now), rig.bucket(0, now)))
        handle = rig.route()
        rig.client.sendto(channel_data(b"mine"), listener)
        assert [d for d, _ in await wait_recv(rig.peer, 1)] == [b"mine"]
        for h in handles[::2]:
            rig.plane.remove_route(h)
        rig.client.sendto(channel_data(b"still"), listener)
        assert [d for d, _ in await wait_recv(rig.peer, 1)] == [b"still"]
        assert rig.plane.stats()["routes"] == 1 + len(handles) // 2
        rig.plane.remove_route(handle)

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_buckets_share_one_arithmetic(impl) -> None:
    _, bucket_cls, _ = impl
    bucket = bucket_cls(1000, 10.0)
    assert (bucket.rate, bucket.burst, bucket.credit) == (1000, 1000, 1000)
    bucket.credit -= 1500
    assert not bucket.refill(10.0, 1500)  # no time has passed: refused, credit given back
    assert bucket.credit == 1000
    bucket.credit -= 1000  # empty now, at t=10
    bucket.credit -= 400
    assert bucket.refill(10.5, 400)  # half a second accrued 500
    assert bucket.credit == pytest.approx(100)
    bucket.credit -= 200
    assert not bucket.refill(10.5, 200)
    assert bucket.credit == pytest.approx(100)
    # A negative interval (two clocks) never takes credit back.
    other = bucket_cls(1000, 10.0)
    other.credit = -10.0
    assert not other.refill(9.0, 0)
    assert other.credit == -10.0 and other.stamp == 10.0
    unlimited = bucket_cls(0, 0.0)
    assert unlimited.credit == float("inf")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_listener_removed_by_its_own_callback_is_drained_no_further(impl) -> None:
    async def body(rig: Rig) -> None:
        listener = rig.listener.getsockname()
        removed: list[bool] = []

        def removing(ctx: Any, data: bytes, addr: Any, now: float) -> bytes | None:
            rig.from_clients.append((ctx, data, addr))
            if not removed:
                removed.append(True)
                rig.plane.remove_listener(rig.listener)
            return b"reply"

        rig.callback[0] = removing
        rig.plane.close()  # not watching: all three are queued before the plane looks
        for i in range(3):
            rig.client.sendto(b"\x00\x01\x00\x00stun%d" % i, listener)
        await asyncio.sleep(0.05)
        rig.plane.start()
        assert await rig.settle(lambda: len(rig.from_clients) >= 1)
        await asyncio.sleep(0.1)
        assert len(rig.from_clients) == 1
        assert [d for d, _ in recv_all(rig.client)] == [b"reply"]

    run_with(impl, body)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_route_with_a_held_flag_carries_only_while_the_port_is_held(impl) -> None:
    """Worker processes: a peer on our own relay address, on a port another worker holds; the
    route reads that worker's byte in the shared map per packet."""

    async def body(rig: Rig) -> None:
        listener = rig.listener.getsockname()
        held_map = bytearray(64)
        rig.plane.set_shared(held_map)
        now = rig.clock()
        handle = rig.plane.add_route(rig.listener, rig.client.getsockname(), NUMBER, rig.relay,
                                     rig.peer.getsockname(), now + 60, rig.bucket(0, now),
                                     rig.bucket(0, now), 17)
        rig.client.sendto(channel_data(b"released"), listener)
        assert await rig.settle(lambda: len(rig.from_clients) == 1)
        assert recv_all(rig.peer) == []
        held_map[17] = 1
        rig.client.sendto(channel_data(b"held"), listener)
        assert [d for d, _ in await wait_recv(rig.peer, 1)] == [b"held"]
        held_map[17] = 0
        rig.client.sendto(channel_data(b"released again"), listener)
        assert await rig.settle(lambda: len(rig.from_clients) == 2)
        assert recv_all(rig.peer) == []
        rig.plane.remove_route(handle)
        with pytest.raises(ValueError):  # outside the map
            rig.plane.add_route(rig.listener, (HOST, 9), NUMBER + 1, rig.relay, (HOST, 10),
                                now + 60, rig.bucket(0, now), rig.bucket(0, now), 64)

    run_with(impl, body)
