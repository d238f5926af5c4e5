"""The in-loop HTTP responder, the health verdict and the rate-limited trouble summary."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from turnserver.logs import TextFormatter
from turnserver.metrics import METRICS_CONTENT_TYPE, MetricsEndpoint, Observability, TroubleReporter

TIMEOUT_S = 5.0


class OneGauge:
    def __init__(self) -> None:
        self.value = 1.0

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        yield GaugeMetricFamily("turn_test_value", "A value the test sets.", value=self.value)


def make_registry() -> tuple[CollectorRegistry, OneGauge]:
    registry = CollectorRegistry()
    gauge = OneGauge()
    registry.register(gauge)
    return registry, gauge


async def http(port: int, raw: bytes, *, half_close: bool = False) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT_S)
    try:
        writer.write(raw)
        await writer.drain()
        if half_close:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), TIMEOUT_S)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return status, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n".encode()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_metrics_and_health_over_a_real_socket() -> None:
    registry, gauge = make_registry()
    verdict = [(200, "ok")]

    async def scenario() -> None:
        endpoint = MetricsEndpoint(registry, lambda: verdict[0])
        host, port = await endpoint.start("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        try:
            status, headers, body = await http(port, get("/metrics"))
            assert status == 200
            assert headers["content-type"] == METRICS_CONTENT_TYPE
            assert int(headers["content-length"]) == len(body)
            assert b"turn_test_value 1.0" in body
            gauge.value = 42.0  # read at scrape time, not at start
            status, _, body = await http(port, get("/metrics?x=1"))
            assert b"turn_test_value 42.0" in body
            for path in ("/health", "/healthz"):
                status, headers, body = await http(port, get(path))
                assert (status, body) == (200, b"ok\n")
                assert headers["cache-control"] == "no-store"
            verdict[0] = (503, "draining")
            status, _, body = await http(port, get("/health"))
            assert (status, body) == (503, b"draining\n")
            status, headers, body = await http(port, get("/health", "HEAD"))
            assert status == 503 and body == b"" and headers["content-length"] == str(len(b"draining\n"))
        finally:
            await endpoint.stop()
        with pytest.raises(OSError):
            await http(port, get("/health"))

    run(scenario())


def test_bad_requests_get_4xx_and_the_endpoint_keeps_serving() -> None:
    registry, _ = make_registry()

    async def scenario() -> None:
        endpoint = MetricsEndpoint(registry, lambda: (200, "ok"), read_timeout_s=0.3)
        _, port = await endpoint.start("127.0.0.1", 0)
        try:
            assert (await http(port, get("/nope")))[0] == 404
            status, headers, _ = await http(port, get("/metrics", "POST"))
            assert status == 405 and headers["allow"] == "GET, HEAD"
            assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
            assert (await http(port, b"GET /metrics SPDY/3\r\n\r\n"))[0] == 400
            assert (await http(port, b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"))[0] == 400
            # A head larger than the limit, and a head cut short by the client.
            assert (await http(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"))[0] == 400
            assert (await http(port, b"GET /metr", half_close=True))[0] == 400
            # A client that never finishes its head is answered 408 and cut off.
            assert (await http(port, b"GET /metrics HTTP/1.1\r\n"))[0] == 408
            assert (await http(port, get("/metrics")))[0] == 200
        finally:
            await endpoint.stop()

    run(scenario())


def test_a_failing_collector_gives_500_not_a_dead_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()

    class Broken:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Any:
            raise RuntimeError("boom")

    registry.register(Broken())

    async def scenario() -> None:
        endpoint = MetricsEndpoint(registry, lambda: (200, "ok"))
        _, port = await endpoint.start("127.0.0.1", 0)
        try:
            assert (await http(port, get("/metrics")))[0] == 500
            assert (await http(port, get("/health")))[0] == 200
        finally:
            await endpoint.stop()

    with caplog.at_level(logging.ERROR, logger="turnd"):
        run(scenario())
    assert any("collecting metrics failed" in r.getMessage() for r in caplog.records)


def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    registry, _ = make_registry()

    async def scenario() -> None:
        endpoint = MetricsEndpoint(registry, lambda: (200, "ok"), max_connections=2, read_timeout_s=3.0)
        _, port = await endpoint.start("127.0.0.1", 0)
        idle = []
        try:
            for _ in range(2):  # two clients that say nothing hold both slots
                idle.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/metrics"))
            assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
            writer.close()
        finally:
            for _, w in idle:
                w.close()
            await endpoint.stop()

    run(scenario())


def server_stub(draining: bool = False, with_core: bool = True, metrics_listen: str = "") -> SimpleNamespace:
    core = SimpleNamespace(draining=draining, stats=new_stats(), allocations={}) if with_core else None
    return SimpleNamespace(core=core, relays=None, loop=None, state=None,
                           config=SimpleNamespace(metrics_listen=metrics_listen, tls_cert_file=None,
                                                  listen_tls=()))


def test_health_is_ok_only_between_start_and_stop_and_not_while_draining() -> None:
    server = server_stub(metrics_listen="127.0.0.1:0")

    async def scenario() -> None:
        obs = Observability(server)
        assert obs.health() == (503, "down")
        assert obs.ready_entries() == []
        await obs.start()
        try:
            assert obs.health() == (200, "ok")
            entries = obs.ready_entries()
            assert len(entries) == 1 and entries[0]["transport"] == "metrics"
            port = entries[0]["port"]
            assert (await http(port, get("/health")))[:1] == (200,)
            server.core.draining = True
            status, _, body = await http(port, get("/health"))
            assert (status, body) == (503, b"draining\n")
        finally:
            await obs.stop()
        assert obs.health() == (503, "down")
        assert obs.ready_entries() == []

    run(scenario())


def test_no_endpoint_when_metrics_listen_is_empty() -> None:
    async def scenario() -> None:
        obs = Observability(server_stub(metrics_listen=""))
        await obs.start()
        try:
            assert obs.endpoint is None and obs.ready_entries() == []
            assert obs.health() == (200, "ok")  # health is about the relay, not the endpoint
        finally:
            await obs.stop()

    run(scenario())


def new_stats() -> SimpleNamespace:
    return SimpleNamespace(dropped=defaultdict(int), policy_refusals=defaultdict(int),
                           auth_failures=defaultdict(int), allocations_refused=defaultdict(int))


def test_trouble_reporter_logs_one_line_with_what_moved(caplog: pytest.LogCaptureFixture) -> None:
    stats = new_stats()
    stats.dropped["not_stun"] = 5  # before the reporter: not reported
    logger = logging.getLogger("turnd.test.trouble")
    reporter = TroubleReporter(lambda: stats, logger)
    with caplog.at_level(logging.DEBUG, logger="turnd.test.trouble"):
        assert reporter.check(10.0) is None
        for _ in range(500):  # a flood: one line for all of it
            stats.dropped["not_stun"] += 1
            stats.auth_failures["bad_integrity"] += 1
        stats.policy_refusals["private"] += 3
        stats.allocations_refused["auth"] += 2
        moved = reporter.check(10.0)
        assert moved == {
            "dropped": {"not_stun": 500},
            "policy_refusals": {"private": 3},
            "auth_failures": {"bad_integrity": 500},
            "allocations_refused": {"auth": 2},
        }
        assert reporter.check(10.0) is None  # nothing since
    records = [r for r in caplog.records if r.name == "turnd.test.trouble"]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "refusals and drops in the last 10 s:"
    assert record.trouble == moved  # type: ignore[attr-defined]
    line = TextFormatter().format(record)
    assert line.endswith("refusals and drops in the last 10 s: dropped.not_stun=500 "
                         "policy_refusals.private=3 auth_failures.bad_integrity=500 "
                         "allocations_refused.auth=2")


def test_routine_drops_alone_stay_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    stats = new_stats()
    logger = logging.getLogger("turnd.test.routine")
    reporter = TroubleReporter(lambda: stats, logger)
    with caplog.at_level(logging.DEBUG, logger="turnd.test.routine"):
        stats.dropped["no_permission"] += 4
        reporter.check(10.0)
        stats.dropped["no_permission"] += 1
        stats.dropped["malformed"] += 1
        reporter.check(10.0)
    levels = [r.levelno for r in caplog.records if r.name == "turnd.test.routine"]
    assert levels == [logging.DEBUG, logging.WARNING]


def test_trouble_reporter_counts_from_when_the_core_appears() -> None:
    holder: dict[str, Any] = {"stats": None}
    reporter = TroubleReporter(lambda: holder["stats"], logging.getLogger("turnd.test.late"))
    assert reporter.check(10.0) is None
    stats = new_stats()
    stats.dropped["not_stun"] = 100
    holder["stats"] = stats
    assert reporter.check(10.0) is None  # its past is not news
    stats.dropped["not_stun"] += 1
    assert reporter.check(10.0) == {"dropped": {"not_stun": 1}}


def test_observability_runs_the_trouble_summary_on_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    server = server_stub()

    async def scenario() -> None:
        obs = Observability(server, trouble_interval_s=0.05)
        await obs.start()
        try:
            server.core.stats.auth_failures["unknown_user"] += 7
            for _ in range(100):  # bounded: at most 5 s
                if any(getattr(r, "trouble", None) for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            server.core.stats.auth_failures["unknown_user"] += 2  # reported at stop
        finally:
            await obs.stop()

    with caplog.at_level(logging.DEBUG, logger="turnd"):
        run(scenario())
    reports = [r.trouble for r in caplog.records if getattr(r, "trouble", None)]  # type: ignore[attr-defined]
    assert reports[0] == {"auth_failures": {"unknown_user": 7}}
    assert reports[-1] == {"auth_failures": {"unknown_user": 2}}
