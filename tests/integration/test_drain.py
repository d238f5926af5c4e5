"""SIGTERM drains a real turnd: existing allocations keep working, new ones are refused, and
the process exits 0 when they are gone, on a second SIGTERM, or at drain_timeout_s."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from turnserver.client import Address, ErrorResponse, TransactionTimeout, TransportError, TurnClient
from turnserver.credentials import mint_credentials

from .server import SECRET, RunningServer, start_server

LOG_WAIT_S = 10.0


async def wait_for_log(server: RunningServer, text: str) -> None:
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        if text in server.log_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log:\n{server.log_text()}")


async def wait_exit(server: RunningServer, timeout_s: float) -> tuple[int, float]:
    """(exit status, seconds waited), polling without blocking the loop."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        code = server.proc.poll()
        if code is not None:
            return code, time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"turnd still running after {timeout_s} s:\n{server.log_text()}")


async def client(server: RunningServer, user: str = "alice") -> TurnClient:
    creds = mint_credentials(SECRET, user, 600)
    return await TurnClient.connect("127.0.0.1", server.port("udp"), username=creds.username,
                                    password=creds.password, timeout_s=3.0)


async def round_trip(a: TurnClient, b: TurnClient, ra: Address, rb: Address, payload: bytes) -> None:
    a.send_to(rb, payload)
    assert await b.receive(2) == (ra, payload)
    b.send_to(ra, payload)
    assert await a.receive(2) == (rb, payload)


async def drain_started(server: RunningServer) -> None:
    server.signal(signal.SIGTERM)
    await wait_for_log(server, "SIGTERM: draining")


def test_drain_keeps_allocations_working_refuses_new_ones_and_exits_when_they_end(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd")

    async def main() -> None:
        a, b = await client(server), await client(server)
        ra, rb = await a.allocate(), await b.allocate()
        await a.channel_bind(rb)
        await b.create_permission(ra)
        await round_trip(a, b, ra, rb, b"before")

        await drain_started(server)
        late = await client(server, "late")
        with pytest.raises(ErrorResponse) as refused:
            await late.allocate()
        assert refused.value.code == 508
        assert refused.value.reason == "Server is draining"
        # Binding is still answered while draining.
        assert await late.binding() == late.local_address
        await late.close()

        # Existing allocations: data, Refresh, ChannelBind and CreatePermission all still work.
        await round_trip(a, b, ra, rb, b"while draining")
        assert await a.refresh(900) == 900
        await a.channel_bind(rb)
        await b.create_permission(ra)
        await round_trip(a, b, ra, rb, b"after refreshing")
        assert server.alive()

        await a.close()
        await asyncio.sleep(0.5)
        assert server.alive()  # b is still there
        await b.close()
        code, waited = await wait_exit(server, 5.0)
        assert code == 0
        assert waited < 2.0

    asyncio.run(asyncio.wait_for(main(), 60))
    log = server.log_text()
    assert "drain complete" in log
    assert log.count("reason=deleted") == 2
    assert "reason=shutdown" not in log


def test_drain_with_alternate_server_answers_300(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd", alternate_server="127.0.0.1:3479")

    async def main() -> None:
        holder = await client(server)
        await holder.allocate()  # keeps the drain going
        await drain_started(server)
        late = await client(server, "late")
        with pytest.raises(ErrorResponse) as refused:
            await late.allocate()
        # RFC 8489 §10: 300 Try Alternate with ALTERNATE-SERVER.
        assert refused.value.code == 300
        assert refused.value.alternate_server == ("127.0.0.1", 3479)
        await late.close()
        await holder.close()
        code, _ = await wait_exit(server, 5.0)
        assert code == 0

    asyncio.run(asyncio.wait_for(main(), 60))
    assert "300 Try Alternate to 127.0.0.1:3479" in server.log_text()


def test_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd")

    async def main() -> None:
        held = await client(server)
        await held.allocate()
        await drain_started(server)
        await asyncio.sleep(0.3)
        assert server.alive()
        server.signal(signal.SIGTERM)
        code, waited = await wait_exit(server, 5.0)
        assert code == 0
        assert waited < 2.0
        await held.close(deallocate=False)

    asyncio.run(asyncio.wait_for(main(), 30))
    log = server.log_text()
    assert "stopping at once, ending the drain with 1 allocation left" in log
    assert "reason=shutdown" in log  # the usage record is still written


def test_sigint_stops_without_draining(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd")

    async def main() -> None:
        held = await client(server)
        await held.allocate()
        server.signal(signal.SIGINT)
        code, waited = await wait_exit(server, 5.0)
        assert code == 0
        assert waited < 2.0
        await held.close(deallocate=False)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert "draining" not in server.log_text()


def test_drain_timeout_bounds_the_wait(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd", drain_timeout_s=1.0)

    async def main() -> None:
        held = await client(server)
        await held.allocate()
        started = time.monotonic()
        await drain_started(server)
        code, _ = await wait_exit(server, 10.0)
        elapsed = time.monotonic() - started
        assert code == 0
        assert 0.9 <= elapsed < 4.0
        # The server is gone: the allocation went with it.
        with pytest.raises((TransactionTimeout, TransportError)):
            await held.refresh(900)
        await held.close(deallocate=False)

    asyncio.run(asyncio.wait_for(main(), 30))
    log = server.log_text()
    assert "drain_timeout_s (1 s) passed with 1 allocation left" in log
    assert "reason=shutdown" in log


def test_drain_without_allocations_exits_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd")
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.0
    assert "drain complete" in server.log_text()
