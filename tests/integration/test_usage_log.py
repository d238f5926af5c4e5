"""Usage records of real relayed sessions, and the JSON log format of a real server.

Two aioice clients relay to each other through ``turnd``; the test knows every byte each one
sent and checks the usage record of each allocation against it. All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aioice.turn

from turnserver.auth import long_term_key

from .server import RunningServer
from .test_metrics import Collect, scrape, wait_for

TIMEOUT_S = 5.0


def usage_entries(server: RunningServer) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in server.log_text().splitlines()]
    return [e["usage"] for e in entries if e.get("logger") == "turnd.usage"]


def secret_forms(server: RunningServer, username: str, password: str) -> list[str]:
    key = long_term_key(username, server.options["realm"], password)
    return [server.secret, password, key.hex(), base64.b64encode(key).decode()]


def test_usage_records_match_what_the_clients_sent_and_hold_no_secret(server_factory: Any) -> None:
    server = server_factory(log_format="json", metrics_listen="127.0.0.1:0")
    username, password = server.credentials("alice")
    sizes_a = [100 + 37 * i for i in range(30)]  # A -> B
    sizes_b = [700] * 20  # B -> A
    started = time.monotonic()

    async def scenario() -> dict[str, Any]:
        addr = server.address("udp")
        t1, p1 = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600)
        t2, p2 = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600)
        r1, r2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
        try:
            # A's first packet reaches B's relay before B has any permission (RFC 8656 §10.3:
            # silently discarded), so the test knows exactly what each side got.
            t1.sendto(b"x" * 11, r2)

            async def first_dropped() -> bool:
                now = await scrape(server)
                return (now.get("turn_relayed_packets_total", direction="client_to_peer", transport="udp") == 1
                        and now.get("turn_dropped_packets_total", reason="no_permission") == 1)

            assert await wait_for(first_dropped)
            t2.sendto(b"y" * 13, r1)  # B's channel bind gives B its permission; A already has one
            assert await wait_for(lambda: p1.nbytes == 13)
            for size in sizes_a:
                t1.sendto(b"a" * size, r2)
                await asyncio.sleep(0.002)
            for size in sizes_b:
                t2.sendto(b"b" * size, r1)
                await asyncio.sleep(0.002)
            assert await wait_for(lambda: p2.nbytes == sum(sizes_a) and p1.nbytes == 13 + sum(sizes_b))
            received = {"a": (p1.nbytes, p1.received), "b": (p2.nbytes, p2.received)}
        finally:
            t1.close()
            t2.close()
        assert await wait_for(lambda: len(usage_entries(server)) == 2)
        return {"r1": r1, "r2": r2, "received": received}

    result = asyncio.run(asyncio.wait_for(scenario(), 60))
    elapsed = time.monotonic() - started
    records = {tuple(r["relayed"]): r for r in usage_entries(server)}
    a = records[(f"127.0.0.1:{result['r1'][1]}",)]
    b = records[(f"127.0.0.1:{result['r2'][1]}",)]
    # What each client sent through the relay...
    assert (a["bytes_to_peer"], a["packets_to_peer"]) == (11 + sum(sizes_a), 1 + len(sizes_a))
    assert (b["bytes_to_peer"], b["packets_to_peer"]) == (13 + sum(sizes_b), 1 + len(sizes_b))
    # ...and what each one received, which is what the other sent less the one discarded packet.
    assert (a["bytes_to_client"], a["packets_to_client"]) == result["received"]["a"]
    assert (b["bytes_to_client"], b["packets_to_client"]) == result["received"]["b"]
    assert b["bytes_to_client"] == sum(sizes_a) and a["bytes_to_client"] == 13 + sum(sizes_b)
    for record in (a, b):
        assert record["user"] == username
        assert record["transport"] == "udp"
        assert record["reason"] == "deleted"  # aioice closes with Refresh LIFETIME 0
        assert record["peers"] == 1
        assert record["client"].startswith("127.0.0.1:") and record["client"] != record["relayed"][0]
        assert 0 < record["duration_s"] < elapsed
        assert set(record) == {"user", "client", "transport", "relayed", "peers", "bytes_to_peer",
                               "packets_to_peer", "bytes_to_client", "packets_to_client",
                               "duration_s", "reason"}
    assert server.stop() == 0
    log = server.log_text()
    # The JSON format: every line the process wrote, start-up to exit, is one JSON object.
    lines = log.splitlines()
    assert len(lines) >= 4
    assert all(isinstance(json.loads(line), dict) for line in lines)
    for secret in secret_forms(server, username, password):
        assert secret not in log


def test_allocations_open_at_stop_are_recorded_with_reason_shutdown(server_factory: Any) -> None:
    server = server_factory()  # text format
    username, password = server.credentials("bob")

    async def scenario() -> None:
        transport, _ = await aioice.turn.create_turn_endpoint(Collect, server.address("udp"), username,
                                                              password, lifetime=600)
        try:
            assert server.stop() == 0
        finally:
            transport.close()  # its Refresh(0) goes unanswered; asyncio.run cancels it

    asyncio.run(asyncio.wait_for(scenario(), 60))
    log = server.log_text()
    usage = [line for line in log.splitlines() if "turnd.usage" in line]
    assert len(usage) == 1
    assert f"user={username} " in usage[0] and "reason=shutdown" in usage[0]
    assert "transport=udp" in usage[0] and "bytes_to_peer=0" in usage[0]
    for secret in secret_forms(server, username, password):
        assert secret not in log
