"""The metrics collector read against a real sans-IO core (fake clock, fake relay ports)."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from turnserver import __version__
from turnserver.metrics import TurnCollector, build_registry
from turnserver.stun import encode_channel_data

from .turn_harness import CLIENT, PEER, Client, code, make_core, rest_user

OTHER_CLIENT = ("udp", ("198.51.100.8", 40001), ("192.0.2.1", 3478))


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


class FakePool:
    def __init__(self, open_count: int = 0, capacity: int = 100) -> None:
        self.open_count = open_count
        self.bind_failures = 0
        self._capacity = capacity

    def capacity(self) -> int:
        return self._capacity


def fake_server(core: Any = None, **extra: Any) -> SimpleNamespace:
    listeners = [SimpleNamespace(transport="udp"), SimpleNamespace(transport="udp"),
                 SimpleNamespace(transport="tls")]
    server = SimpleNamespace(core=core, relays=FakePool(), loop=FakeLoop(),
                             state=SimpleNamespace(listeners=listeners))
    for key, value in extra.items():
        setattr(server, key, value)
    return server


def value(registry: Any, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def relay_of(reply: Any) -> tuple[str, int]:
    from turnserver.stun import Attr

    return reply.get(Attr.XOR_RELAYED_ADDRESS)


def test_allocation_gauge_and_created_counter_follow_the_core() -> None:
    h = make_core()
    server = fake_server(h.core)
    registry = build_registry(server, process=False)
    assert value(registry, "turn_allocations", transport="udp", family="ipv4") == 0
    alice = Client(h)
    assert code(alice.allocate()) == 200
    assert value(registry, "turn_allocations", transport="udp", family="ipv4") == 1
    assert value(registry, "turn_allocations_created_total", transport="udp", family="ipv4") == 1
    # RFC 8656 §7.3: Refresh with lifetime 0 deletes; the gauge falls, the counters stay.
    assert code(alice.refresh(1.0, lifetime=0)) == 200
    assert value(registry, "turn_allocations", transport="udp", family="ipv4") == 0
    assert value(registry, "turn_allocations_created_total", transport="udp", family="ipv4") == 1
    assert value(registry, "turn_allocations_ended_total", reason="deleted") == 1
    assert value(registry, "turn_allocations_ended_total", reason="expired") == 0


def test_relayed_traffic_is_counted_live_and_survives_the_allocation_end() -> None:
    h = make_core()
    server = fake_server(h.core)
    registry = build_registry(server, process=False)
    alice = Client(h)
    relayed = relay_of(alice.allocate())
    assert code(alice.bind(0.0, 0x4000, PEER)) == 200
    relay = h.core.allocations[CLIENT].relays[0]
    assert relay.address == relayed
    for size in (100, 200, 300):
        assert h.core.handle_channel_data(encode_channel_data(0x4000, b"x" * size), CLIENT, 1.0) is not None
    up = value(registry, "turn_relayed_bytes_total", direction="client_to_peer", transport="udp")
    assert up == 600
    assert value(registry, "turn_relayed_packets_total", direction="client_to_peer", transport="udp") == 3
    # Live: the next scrape sees more while the allocation is still there.
    assert h.core.handle_peer_data(relay, b"y" * 50, PEER, 2.0) is not None
    assert value(registry, "turn_relayed_bytes_total", direction="peer_to_client", transport="udp") == 50
    assert value(registry, "turn_relayed_packets_total", direction="peer_to_client", transport="udp") == 1
    assert code(alice.refresh(3.0, lifetime=0)) == 200
    # Ended allocations' traffic moves to stats.ended_traffic: the counter never goes back.
    assert value(registry, "turn_relayed_bytes_total", direction="client_to_peer", transport="udp") == 600
    assert value(registry, "turn_relayed_bytes_total", direction="peer_to_client", transport="udp") == 50
    assert value(registry, "turn_relayed_bytes_total", direction="client_to_peer", transport="tcp") == 0


def test_permissions_and_channels_follow_installs_and_expiry() -> None:
    h = make_core()
    server = fake_server(h.core)
    registry = build_registry(server, process=False)
    alice = Client(h)
    alice.allocate()
    assert code(alice.permit(0.0, ("203.0.113.1", 0), ("203.0.113.2", 0))) == 200
    assert code(alice.bind(0.0, 0x4001, PEER)) == 200  # also installs PEER's permission
    assert value(registry, "turn_permissions") == 3
    assert value(registry, "turn_channels") == 1
    # RFC 8656 §9: permissions last 300 s; §12: channels 600 s. The server's loop runs the
    # core's timers at each deadline; scrape between the two.
    h.core.handle_timer(301.0)
    assert value(registry, "turn_permissions") == 0
    assert value(registry, "turn_channels") == 1
    assert code(alice.refresh(400.0)) == 200  # keep the allocation past the channel's expiry
    h.core.handle_timer(601.0)
    assert value(registry, "turn_channels") == 0
    assert value(registry, "turn_allocations", transport="udp", family="ipv4") == 1


def test_refusals_auth_failures_and_policy_are_counted_by_reason() -> None:
    h = make_core(user_quota=1)
    server = fake_server(h.core)
    registry = build_registry(server, process=False)
    username, password = rest_user()
    first = Client(h, username=username, password=password)
    assert code(first.allocate()) == 200
    # The same user from another 5-tuple is over its quota (RFC 8656 §7.2: 486).
    second = Client(h, five_tuple=OTHER_CLIENT, username=username, password=password)
    assert code(second.allocate()) == 486
    wrong = Client(h, five_tuple=("udp", ("198.51.100.9", 1), ("192.0.2.1", 3478)),
                   username=username, password="not-the-password")
    assert code(wrong.allocate()) == 401
    assert value(registry, "turn_allocations_refused_total", reason="quota") == 1
    assert value(registry, "turn_allocations_refused_total", reason="auth") == 1
    assert value(registry, "turn_allocations_refused_total", reason="capacity") == 0
    assert value(registry, "turn_auth_failures_total", reason="bad_integrity") == 1
    assert code(first.permit(0.0, ("10.0.0.1", 0))) == 403
    assert value(registry, "turn_peer_policy_refusals_total", reason="private") == 1
    assert value(registry, "turn_requests_total", method="create_permission", code="403") == 1
    assert value(registry, "turn_requests_total", method="allocate", code="486") == 1


def test_dropped_packets_by_reason_and_draining_flag() -> None:
    h = make_core()
    server = fake_server(h.core)
    registry = build_registry(server, process=False)
    assert h.core.handle_channel_data(encode_channel_data(0x4000, b"z"), CLIENT, 0.0) is None
    assert h.core.handle_stun(b"\x00\x01\x00", CLIENT, 0.0, "sink") is None
    assert value(registry, "turn_dropped_packets_total", reason="unbound_channel") == 1
    assert value(registry, "turn_dropped_packets_total", reason="not_stun") == 1
    assert value(registry, "turn_dropped_packets_total", reason="no_permission") == 0
    assert value(registry, "turn_draining") == 0
    h.core.draining = True
    assert value(registry, "turn_draining") == 1


def test_relay_ports_listeners_and_build_info() -> None:
    h = make_core()
    server = fake_server(h.core)
    server.relays.open_count = 7
    server.relays.bind_failures = 2
    registry = build_registry(server, process=False)
    assert value(registry, "turn_relay_ports_in_use") == 7
    assert value(registry, "turn_relay_ports_capacity") == 100
    assert value(registry, "turn_relay_bind_failures_total") == 2
    assert value(registry, "turn_listeners", transport="udp") == 2
    assert value(registry, "turn_listeners", transport="tls") == 1
    assert value(registry, "turn_listeners", transport="tcp") == 0
    assert value(registry, "turn_build_info", version=__version__,
                 python=TurnCollector(server).python_version) == 1


def test_no_username_client_address_or_allocation_id_in_the_exposition() -> None:
    h = make_core()
    server = fake_server(h.core)
    registry = build_registry(server, process=False)
    alice = Client(h)
    relayed = relay_of(alice.allocate())
    alice.permit(0.0, ("10.0.0.1", 0), ("203.0.113.9", 0))
    text = generate_latest(registry).decode()
    for secret_or_id in (alice.username, alice.username.split(":")[1], CLIENT[1][0], relayed[0],
                         str(relayed[1]), "203.0.113.9", "10.0.0.1"):
        assert secret_or_id not in text
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("turn_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)


def test_the_collector_tolerates_a_server_that_has_not_started() -> None:
    server = SimpleNamespace(core=None, relays=None, loop=None, config=None, state=None)
    registry = build_registry(server, process=False)
    text = generate_latest(registry).decode()
    assert "turn_build_info{" in text
    assert "turn_allocations" not in text


def test_no_stream_families_without_a_stream_layer() -> None:
    absent = build_registry(fake_server(None, streams=None), process=False)
    assert value(absent, "turn_stream_connections", transport="tcp") is None
    assert value(absent, "turn_stream_connections_accepted_total", transport="tcp") is None


def full_streams() -> SimpleNamespace:
    """Shaped like io/stream.py's StreamServer: stats (a StreamStats) and tls."""
    stats = SimpleNamespace(open={"tcp": 2, "tls": 1}, accepted={"tcp": 9, "tls": 4},
                            closed={"idle": 3, "handshake": 2, "framing": 0, "capacity": 1,
                                    "source_limit": 5, "peer_closed": 4, "shutdown": 0},
                            plain_on_tls=1, dropped_messages=12, dropped_bytes=3400, read_pauses=7,
                            handed_over={"tcp": 3, "tls": 1})
    return SimpleNamespace(stats=stats, tls=SimpleNamespace(reloads_ok=2, reloads_failed=1))


def test_stream_layer_counters_are_exported() -> None:
    registry = build_registry(fake_server(None, streams=full_streams()), process=False)
    assert value(registry, "turn_stream_connections", transport="tcp") == 2
    assert value(registry, "turn_stream_connections", transport="tls") == 1
    assert value(registry, "turn_stream_connections_accepted_total", transport="tls") == 4
    assert value(registry, "turn_stream_connections_closed_total", reason="handshake") == 2
    assert value(registry, "turn_stream_connections_closed_total", reason="peer_closed") == 4
    assert value(registry, "turn_stream_plain_on_tls_total") == 1
    assert value(registry, "turn_stream_write_dropped_messages_total") == 12
    assert value(registry, "turn_stream_write_dropped_bytes_total") == 3400
    assert value(registry, "turn_stream_read_pauses_total") == 7
    assert value(registry, "turn_stream_handoffs_total", transport="tcp") == 3
    assert value(registry, "turn_stream_handoffs_total", transport="tls") == 1
    assert value(registry, "turn_stream_connections_closed_total", reason="source_limit") == 5
    assert value(registry, "turn_tls_reloads_total", result="ok") == 2
    assert value(registry, "turn_tls_reloads_total", result="failed") == 1


def test_stream_layer_without_tls_has_no_reload_counter() -> None:
    streams = full_streams()
    streams.tls = None
    registry = build_registry(fake_server(None, streams=streams), process=False)
    assert value(registry, "turn_stream_connections", transport="tcp") == 2
    assert value(registry, "turn_tls_reloads_total", result="ok") is None


def test_certificate_expiry_is_the_servers_tls_not_after() -> None:
    server = fake_server(None, tls_not_after=1_900_000_000.0)
    registry = build_registry(server, process=False)
    assert value(registry, "turn_tls_certificate_not_after_timestamp_seconds") == 1_900_000_000.0
    server.tls_not_after = 1_950_000_000.0  # a SIGHUP reload loaded a renewed certificate
    assert value(registry, "turn_tls_certificate_not_after_timestamp_seconds") == 1_950_000_000.0
    no_tls = build_registry(fake_server(None, tls_not_after=None), process=False)
    assert value(no_tls, "turn_tls_certificate_not_after_timestamp_seconds") is None


def test_process_metrics_are_on_the_own_registry_not_the_global_one() -> None:
    from prometheus_client import REGISTRY

    registry = build_registry(fake_server(None))
    names = {family.name for family in registry.collect()}
    assert "python_info" in names
    assert "turn_build_info" in names
    assert all(not name.startswith("turn_") for name in (f.name for f in REGISTRY.collect()))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_exposition_with_traffic() -> None:
    h = make_core()
    server = fake_server(h.core, streams=full_streams(), tls_not_after=1_900_000_000.0)
    registry = build_registry(server)
    alice = Client(h)
    alice.allocate()
    alice.bind(0.0, 0x4000, PEER)
    h.core.handle_channel_data(encode_channel_data(0x4000, b"data"), CLIENT, 0.5)
    alice.permit(0.0, ("10.0.0.1", 0))
    body = generate_latest(registry)
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""
