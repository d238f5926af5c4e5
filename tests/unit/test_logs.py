"""Log formats: JSON lines that always parse, text lines that stay one per record, usage records."""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Iterator

import pytest

from turnserver.io.server import usage_record
from turnserver.logs import BurstLimit, JsonFormatter, TextFormatter, setup_logging
from turnserver.turn.allocation import Allocation


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def emit(fmt: str, level: str = "debug") -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    setup_logging(level, fmt, stream)
    return stream, logging.getLogger("turnd.test.logs")


def hostile_records(log: logging.Logger) -> None:
    """Records that break naive formatters: newlines, Unicode line separators, odd extras."""
    log.info("plain")
    log.warning("two\nlines and a %s", "carriage\rreturn")
    log.info("unicode line separators \u2028 \u2029 \x85 and NUL \x00")
    log.info("usage", extra={"usage": {"user": "1700000000:ali ce", "relayed": ["127.0.0.1:50000"]}})
    log.info("clashing keys", extra={"level": "forged", "ts": 0, "logger": "forged"})
    circular: dict[str, Any] = {}
    circular["self"] = circular
    log.info("circular", extra={"loop": circular})
    log.info("not serialisable", extra={"obj": object(), "raw": b"\xff\x00"})
    log.info("bad args %d", "not a number")
    try:
        raise ValueError("inner\nmessage")
    except ValueError:
        log.exception("with a traceback")
    log.info("stack", stack_info=True)


def test_every_json_line_parses_as_one_object(restore_root: None) -> None:
    stream, log = emit("json")
    hostile_records(log)
    text = stream.getvalue()
    # str.splitlines also splits on U+2028/U+2029/U+0085: the strictest splitter there is.
    lines = text.splitlines()
    assert len(lines) == 10
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) for e in entries)
    assert [e["level"] for e in entries[:2]] == ["info", "warning"]
    assert entries[1]["msg"] == "two\nlines and a carriage\rreturn"
    assert "\u2028" in entries[2]["msg"] and "\x00" in entries[2]["msg"]
    assert entries[3]["usage"] == {"user": "1700000000:ali ce", "relayed": ["127.0.0.1:50000"]}
    # Extras never overwrite the formatter's own keys.
    assert entries[4]["level"] == "info" and entries[4]["logger"] == "turnd.test.logs"
    assert entries[4]["extra_level"] == "forged" and entries[4]["extra_logger"] == "forged"
    assert entries[5]["msg"] == "circular" and "self" in entries[5]["loop"]
    assert entries[6]["obj"].startswith("<object object")
    assert entries[7]["msg"].startswith("bad args")
    assert "ValueError: inner\nmessage" in entries[8]["exc"]
    assert "stack" in entries[9] and entries[9]["stack"].startswith("Stack (most recent call last)")
    for entry in entries:
        assert entry["ts"].endswith("Z") and entry["logger"] == "turnd.test.logs"


def test_text_lines_keep_one_record_per_line_apart_from_tracebacks(restore_root: None) -> None:
    stream, log = emit("text")
    log.warning("two\nlines from %s", "a client")
    log.info("allocation ended", extra={"usage": {"user": "1700000000:ali ce", "bytes_to_peer": 12,
                                                  "relayed": ["127.0.0.1:50000", "[::1]:50001"]}})
    log.warning("summary", extra={"trouble": {"dropped": {"not_stun": 3}, "auth_failures": {"x": 1}}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("WARNING turnd.test.logs: two\\nlines from a client")
    assert lines[1].endswith('allocation ended user="1700000000:ali ce" bytes_to_peer=12 '
                             'relayed=127.0.0.1:50000,[::1]:50001')
    assert lines[2].endswith("summary dropped.not_stun=3 auth_failures.x=1")


def test_text_traceback_follows_the_pairs(restore_root: None) -> None:
    stream, log = emit("text")
    try:
        raise KeyError("k")
    except KeyError:
        log.exception("failed", extra={"usage": {"reason": "x"}})
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("ERROR turnd.test.logs: failed reason=x")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "KeyError: 'k'"


def test_setup_logging_replaces_handlers_and_sets_the_level(restore_root: None) -> None:
    stream, log = emit("json", level="warning")
    log.info("hidden")
    log.warning("shown")
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["shown"]
    root = logging.getLogger()
    assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
    stream2, log = emit("text")  # a reload switches the format in place
    assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, TextFormatter)
    log.info("now text")
    assert stream.getvalue().count("\n") == 1
    assert stream2.getvalue().rstrip().endswith("INFO turnd.test.logs: now text")


class Relay:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address


def make_allocation() -> Allocation:
    allocation = Allocation(
        ("tcp", ("198.51.100.7", 40000), ("192.0.2.1", 3478)), None, "1800000000:alice",
        [Relay(("192.0.2.1", 50002)), Relay(("2001:db8::1", 50004))], 100.0, 600, b"t" * 12,
    )
    allocation.peers_seen.update({"203.0.113.1", "203.0.113.2"})
    allocation.bytes_to_peer, allocation.packets_to_peer = 1234, 10
    allocation.bytes_to_client, allocation.packets_to_client = 5678, 20
    return allocation


def test_usage_record_has_every_field_and_no_key_material() -> None:
    allocation = make_allocation()
    record = usage_record(allocation, "connection_closed", 161.5)
    assert record == {
        "user": "1800000000:alice",
        "client": "198.51.100.7:40000",
        "transport": "tcp",
        "relayed": ["192.0.2.1:50002", "[2001:db8::1]:50004"],
        "peers": 2,
        "bytes_to_peer": 1234,
        "packets_to_peer": 10,
        "bytes_to_client": 5678,
        "packets_to_client": 20,
        "duration_s": 61.5,
        "reason": "connection_closed",
    }
    assert "key" not in record
    # The allocation holds no key material to leak in the first place.
    assert not hasattr(allocation, "key")


def test_usage_record_round_trips_through_the_json_formatter(restore_root: None) -> None:
    stream, _ = emit("json")
    logging.getLogger("turnd.usage").info(
        "allocation ended", extra={"usage": usage_record(make_allocation(), "expired", 700.0)})
    entry = json.loads(stream.getvalue())
    assert entry["logger"] == "turnd.usage"
    assert entry["usage"]["reason"] == "expired" and entry["usage"]["duration_s"] == 600.0
    assert entry["usage"]["bytes_to_client"] == 5678


def test_burst_limit_holds_back_a_flood_per_call_site_and_reports_the_count() -> None:
    clock = [0.0]
    limit = BurstLimit(burst=3, interval_s=10.0, clock=lambda: clock[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(limit)
    log = logging.getLogger("turnd.test.burst")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)

    def handle_packet(i: int) -> None:  # one call site, hit by every packet of a flood
        try:
            raise ValueError(i)
        except ValueError:
            log.exception("error handling a datagram")

    try:
        for i in range(1000):
            handle_packet(i)
        log.warning("another site")  # its own budget
        log.info("usage records are never held back")
        for _ in range(10):
            log.debug("nor is debug")
        clock[0] = 10.0
        for i in range(2):
            handle_packet(i)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    flood = [e for e in entries if e["msg"] == "error handling a datagram"]
    assert len(flood) == 5  # 3 in the first window, 2 in the next
    assert all("suppressed" not in e for e in flood[:3])
    assert flood[3]["suppressed"] == 997 and "suppressed" not in flood[4]
    assert "ValueError: 0" in flood[0]["exc"]
    assert [e["msg"] for e in entries].count("another site") == 1
    assert [e["msg"] for e in entries].count("nor is debug") == 10
    assert [e["msg"] for e in entries].count("usage records are never held back") == 1


def test_setup_logging_installs_the_burst_limit(restore_root: None) -> None:
    stream, log = emit("text")
    for _ in range(50):
        log.warning("same warning, same line")
    assert stream.getvalue().count("same warning") == 5
