"""aioice's TURN client (an independent implementation) against the running server over UDP."""

from __future__ import annotations

import asyncio
import time

import aioice.turn

from turnserver.stun import Method

from .raw_client import RawTurnClient, code


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.queue.put_nowait((data, addr))


async def open_pair(server, lifetime: int):
    address = server.address("udp")
    user, password = server.credentials("alice")
    t1, p1 = await aioice.turn.create_turn_endpoint(Collect, address, user, password, lifetime=lifetime)
    t2, p2 = await aioice.turn.create_turn_endpoint(Collect, address, user, password, lifetime=lifetime)
    return (t1, p1), (t2, p2)


async def exchange(a, b, payload: bytes, timeout_s: float = 3.0) -> bytes:
    (ta, _), (tb, pb) = a, b
    ta.sendto(payload, tb.get_extra_info("sockname"))
    data, _ = await asyncio.wait_for(pb.queue.get(), timeout_s)
    return data


def test_allocation_to_allocation_both_ways_and_refresh(server_factory) -> None:
    # A short default lifetime makes aioice's Refresh (at 5/6 of the lifetime) run within the test.
    server = server_factory(default_lifetime_s=3, max_lifetime_s=60)

    async def run() -> None:
        a, b = await open_pair(server, lifetime=3)
        try:
            # Each side sends once so both have a permission (aioice binds a channel on send).
            a[0].sendto(b"prime", b[0].get_extra_info("sockname"))
            b[0].sendto(b"prime", a[0].get_extra_info("sockname"))
            await asyncio.sleep(0.3)
            for q in (a[1].queue, b[1].queue):
                while not q.empty():
                    q.get_nowait()
            assert await exchange(a, b, b"ping") == b"ping"
            assert await exchange(b, a, b"pong") == b"pong"
            # Outlive the 3 s lifetime twice: only aioice's Refresh keeps the allocations.
            started = time.monotonic()
            while time.monotonic() - started < 7.0:
                assert await exchange(a, b, b"x" * 200) == b"x" * 200
                await asyncio.sleep(0.5)
            assert await exchange(b, a, b"still here") == b"still here"
        finally:
            a[0].close()
            b[0].close()
            await asyncio.sleep(0.3)

    asyncio.run(run())
    log = server.log_text()
    assert log.count("reason=deleted") == 2, log  # aioice deleted both with Refresh(0)
    assert "reason=expired" not in log


def test_without_refresh_the_allocation_expires(server_factory) -> None:
    # aioice schedules its Refresh from the granted lifetime, so use the raw client, which never refreshes.
    server = server_factory(default_lifetime_s=2, max_lifetime_s=2)
    client = RawTurnClient(server.address("udp"), *server.credentials("bob"))
    try:
        assert code(client.allocate()) == 200
        time.sleep(3.0)
        assert code(client.request(Method.REFRESH)) == 437
    finally:
        client.close()
    assert server.log_text().count("reason=expired") == 1
