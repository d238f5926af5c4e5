"""Server snapshots: the JSON round trip, merging workers, counters that survive a worker's
death, the collector over several workers, and a parent's endpoint serving their sum."""

from __future__ import annotations

import asyncio
import json
from dataclasses import fields, replace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from turnserver.io.snapshot import process_usage, take_snapshot
from turnserver.metrics import Observability, build_registry
from turnserver.snapshot import (
    COUNTERS, GAUGES, IDENTITY, PARTS, CounterKeeper, ServerSnapshot, counters_of, merge,
)
from turnserver.stun import encode_channel_data

from .test_metrics import fake_server, full_streams
from .test_metrics_endpoint import get, http
from .turn_harness import CLIENT, PEER, Client, make_core

TIMEOUT_S = 30.0


def busy_snapshot(worker: int | None = None) -> ServerSnapshot:
    """A snapshot of a real core with traffic, a stream layer and TLS."""
    h = make_core()
    server = fake_server(h.core, streams=full_streams(), tls_not_after=1_900_000_000.0)
    alice = Client(h)
    alice.allocate()
    alice.bind(0.0, 0x4000, PEER)
    for size in (10, 20):
        h.core.handle_channel_data(encode_channel_data(0x4000, b"x" * size), CLIENT, 0.5)
    alice.permit(0.0, ("10.0.0.1", 0))  # refused by the policy: a counter moves
    return take_snapshot(server, worker=worker)


def worker_snapshot(worker: int, pid: int, *, created: int, allocations: int, cpu: float,
                    sent: int = 0, draining: bool = False) -> ServerSnapshot:
    return ServerSnapshot(
        worker=worker, pid=pid, has_core=True, has_relay_ports=True,
        allocations={("udp", "ipv4"): allocations},
        allocations_created={("udp", "ipv4"): created},
        requests={("allocate", 200): created},
        relayed_bytes={("client_to_peer", "udp"): sent},
        relay_ports_in_use=allocations, relay_ports_capacity=1000,
        draining=draining, cpu_seconds=cpu, resident_memory_bytes=50_000_000,
    )


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


# -- the record --------------------------------------------------------------------------


def test_every_field_has_exactly_one_kind() -> None:
    names = [f.name for f in fields(ServerSnapshot)]
    kinds = COUNTERS + GAUGES + PARTS + IDENTITY
    assert sorted(kinds) == sorted(names)
    assert len(set(kinds)) == len(kinds)


def test_a_real_snapshot_survives_json_unchanged() -> None:
    snap = busy_snapshot(worker=3)
    assert snap.has_core and snap.has_streams and snap.has_tls and snap.has_relay_ports
    assert snap.allocations == {("udp", "ipv4"): 1}
    assert snap.relayed_bytes[("client_to_peer", "udp")] == 30
    assert snap.policy_refusals["private"] == 1
    assert snap.limit_refusals["connections_per_source"] == 5  # the stream layer's, as counted
    wire = json.dumps(snap.to_dict())
    back = ServerSnapshot.from_dict(json.loads(wire))
    assert back == snap
    # A response code stays an int, so requests sort and label as before.
    assert all(isinstance(code, int) for _, code in back.requests)


def test_every_field_round_trips_with_values_unlike_the_defaults() -> None:
    snap = ServerSnapshot()
    for i, f in enumerate(fields(ServerSnapshot)):
        current = getattr(snap, f.name)
        if f.name == "requests":
            setattr(snap, f.name, {("allocate", 486): i + 1, ("refresh", 200): 2})
        elif f.name in ("allocations", "allocations_created", "relayed_bytes", "relayed_packets",
                        "tcp_connections"):
            setattr(snap, f.name, {("tcp", "ipv6"): i + 1, ("udp", "dual"): 7})
        elif isinstance(current, dict):
            setattr(snap, f.name, {"some_reason": i + 1})
        elif isinstance(current, bool):
            setattr(snap, f.name, True)
        elif f.name in ("cpu_seconds", "tls_not_after"):
            setattr(snap, f.name, i + 0.25)
        else:
            setattr(snap, f.name, i + 1)
    assert snap != ServerSnapshot()
    back = ServerSnapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    for f in fields(ServerSnapshot):
        assert getattr(back, f.name) == getattr(snap, f.name), f.name
    assert back == snap


def test_from_dict_keeps_defaults_for_missing_fields_and_rejects_bad_shapes() -> None:
    assert ServerSnapshot.from_dict({"permissions": 4, "unknown_field": 1}) == ServerSnapshot(permissions=4)
    with pytest.raises(ValueError):
        ServerSnapshot.from_dict({"requests": [["allocate", 200]]})
    with pytest.raises(TypeError):
        ServerSnapshot.from_dict({"dropped": [["not_stun", 1]]})
    with pytest.raises(TypeError):
        ServerSnapshot.from_dict({"draining": 1})


def test_the_fold_hook_runs_before_the_allocations_are_read() -> None:
    h = make_core()
    alice = Client(h)
    alice.allocate()
    allocation = h.core.allocations[CLIENT]

    def fold_route_counts() -> None:
        allocation.bytes_to_peer += 1234
        allocation.packets_to_peer += 2

    h.core.fold_route_counts = fold_route_counts  # type: ignore[attr-defined]
    snap = take_snapshot(fake_server(h.core))
    assert snap.relayed_bytes[("client_to_peer", "udp")] == 1234
    assert snap.relayed_packets[("client_to_peer", "udp")] == 2


def test_the_snapshot_carries_this_processes_cpu_and_memory() -> None:
    sum(i * i for i in range(200_000))  # some CPU time, whatever ran before
    cpu, rss = process_usage()
    snap = take_snapshot(fake_server(None))
    assert cpu > 0 and snap.cpu_seconds >= cpu
    assert rss > 1_000_000 and snap.resident_memory_bytes > 1_000_000
    assert snap.pid > 0 and not snap.has_core


# -- merging -----------------------------------------------------------------------------


def test_merge_adds_counters_and_gauges_and_takes_any_and_earliest() -> None:
    a = worker_snapshot(0, 100, created=5, allocations=2, cpu=1.5, sent=700)
    a.tls_not_after = 2_000_000_000.0
    a.dropped = {"not_stun": 3}
    b = worker_snapshot(1, 101, created=7, allocations=3, cpu=2.0, sent=300, draining=True)
    b.tls_not_after = 1_900_000_000.0
    b.dropped = {"not_stun": 1, "malformed": 4}
    b.has_streams = True
    b.requests[("refresh", 200)] = 9
    before = (a.to_dict(), b.to_dict())
    total = merge([a, b])
    assert total.allocations_created == {("udp", "ipv4"): 12}
    assert total.allocations == {("udp", "ipv4"): 5}
    assert total.requests == {("allocate", 200): 12, ("refresh", 200): 9}
    assert total.dropped == {"not_stun": 4, "malformed": 4}
    assert total.relayed_bytes == {("client_to_peer", "udp"): 1000}
    assert total.relay_ports_in_use == 5 and total.relay_ports_capacity == 2000  # disjoint slices
    assert total.cpu_seconds == 3.5 and total.resident_memory_bytes == 100_000_000
    assert total.draining is True and total.has_streams is True and total.has_core is True
    assert total.tls_not_after == 1_900_000_000.0
    assert total.worker is None and total.pid == 0
    assert (a.to_dict(), b.to_dict()) == before  # the inputs are untouched


def test_merge_of_one_snapshot_gives_the_same_exposition() -> None:
    snap = busy_snapshot()
    alone = generate_latest(build_registry(lambda: snap, process=False))
    merged = generate_latest(build_registry(lambda: merge([snap]), process=False))
    assert alone == merged
    assert b"turn_relayed_bytes_total" in alone


# -- counters across a worker's death -----------------------------------------------------


def test_a_replaced_workers_counters_never_go_backwards() -> None:
    keeper = CounterKeeper()
    seen: list[ServerSnapshot] = []

    def scrape() -> ServerSnapshot:
        total = keeper.total()
        seen.append(total)
        return total

    keeper.update(worker_snapshot(0, 100, created=10, allocations=4, cpu=3.0, sent=5000))
    keeper.update(worker_snapshot(1, 101, created=6, allocations=2, cpu=1.0, sent=100))
    first = scrape()
    assert first.allocations_created[("udp", "ipv4")] == 16
    # Worker 0 dies; its last counters stay, its gauges go.
    keeper.worker_exited(0)
    after_death = scrape()
    assert after_death.allocations_created[("udp", "ipv4")] == 16
    assert after_death.allocations[("udp", "ipv4")] == 2
    assert after_death.relay_ports_in_use == 2
    # Its replacement starts from zero.
    keeper.update(worker_snapshot(0, 200, created=0, allocations=0, cpu=0.1))
    replaced = scrape()
    assert replaced.allocations_created[("udp", "ipv4")] == 16
    assert replaced.relayed_bytes[("client_to_peer", "udp")] == 5100
    keeper.update(worker_snapshot(0, 200, created=3, allocations=1, cpu=0.5))
    grown = scrape()
    assert grown.allocations_created[("udp", "ipv4")] == 19
    assert grown.allocations[("udp", "ipv4")] == 3
    assert grown.cpu_seconds == pytest.approx(3.0 + 0.5 + 1.0)
    # A second death in the same slot, seen only through a new process id.
    keeper.update(worker_snapshot(0, 300, created=0, allocations=0, cpu=0.0))
    scrape()
    # Every counter of every scrape is at least what the scrape before showed.
    for earlier, later in zip(seen, seen[1:]):
        for name in COUNTERS:
            old, new = getattr(earlier, name), getattr(later, name)
            if isinstance(old, dict):
                assert all(new.get(k, 0) >= v for k, v in old.items()), name
            else:
                assert new >= old, name
    assert seen[-1].allocations_created[("udp", "ipv4")] == 19
    assert seen[-1].allocations == {("udp", "ipv4"): 2}


def test_a_late_snapshot_from_the_dead_worker_is_not_counted_twice() -> None:
    keeper = CounterKeeper()
    keeper.update(worker_snapshot(0, 100, created=10, allocations=4, cpu=1.0))
    keeper.worker_exited(0)
    keeper.update(worker_snapshot(0, 100, created=12, allocations=4, cpu=1.2))  # still in the pipe
    keeper.update(worker_snapshot(0, 200, created=1, allocations=1, cpu=0.1))
    (slot,) = keeper.snapshots()
    assert slot.worker == 0 and slot.pid == 200
    assert slot.allocations_created == {("udp", "ipv4"): 13}
    assert slot.allocations == {("udp", "ipv4"): 1}


def test_a_slot_with_no_live_process_keeps_counters_but_no_gauges() -> None:
    keeper = CounterKeeper()
    keeper.update(worker_snapshot(2, 100, created=4, allocations=4, cpu=2.0))
    keeper.worker_exited(2)
    (slot,) = keeper.snapshots()
    # No process runs there now (pid 0); what is left is the dead one's counters.
    assert slot == replace(counters_of(worker_snapshot(2, 100, created=4, allocations=4, cpu=2.0)), pid=0)
    assert slot.allocations == {} and slot.relay_ports_capacity == 0
    with pytest.raises(ValueError):
        keeper.update(ServerSnapshot())  # a worker's snapshot must name its slot


# -- the collector over several workers ----------------------------------------------------


def test_only_the_per_worker_families_carry_a_worker_label() -> None:
    keeper = CounterKeeper()
    keeper.update(worker_snapshot(0, 100, created=5, allocations=2, cpu=1.5, sent=700))
    keeper.update(worker_snapshot(1, 101, created=7, allocations=3, cpu=2.0, sent=300))
    text = generate_latest(build_registry(keeper.snapshots, process=False)).decode()
    found = families(text)
    labelled = {name for name, f in found.items() if any("worker" in s.labels for s in f.samples)}
    assert labelled == {"turn_worker_allocations", "turn_worker_cpu_seconds"}
    assert sample(text, "turn_worker_allocations", worker="0") == 2
    assert sample(text, "turn_worker_allocations", worker="1") == 3
    assert sample(text, "turn_worker_cpu_seconds_total", worker="1") == 2.0
    assert found["turn_worker_cpu_seconds"].type == "counter"
    # Everything else is the sum, labelled as for one process.
    assert sample(text, "turn_allocations", transport="udp", family="ipv4") == 5
    assert sample(text, "turn_allocations_created_total", transport="udp", family="ipv4") == 12
    assert sample(text, "turn_relayed_bytes_total", direction="client_to_peer", transport="udp") == 1000
    assert sample(text, "turn_relay_ports_capacity") == 2000


def test_one_unnamed_snapshot_has_no_per_worker_families() -> None:
    snap = busy_snapshot()
    single = generate_latest(build_registry(lambda: snap, process=False)).decode()
    assert "turn_worker_" not in single
    named = busy_snapshot(worker=0)
    one_worker = generate_latest(build_registry(lambda: [named], process=False)).decode()
    assert sample(one_worker, "turn_worker_allocations", worker="0") == 1
    two_unnamed = generate_latest(build_registry(lambda: [snap, snap], process=False)).decode()
    assert sample(two_unnamed, "turn_worker_allocations", worker="1") == 1
    assert sample(two_unnamed, "turn_allocations", transport="udp", family="ipv4") == 2


def test_a_parent_serves_the_sum_of_its_workers_without_a_server() -> None:
    keeper = CounterKeeper()
    keeper.update(worker_snapshot(0, 100, created=5, allocations=2, cpu=1.5))
    keeper.update(worker_snapshot(1, 101, created=7, allocations=3, cpu=2.0))

    async def scenario() -> None:
        obs = Observability(snapshot_source=keeper.snapshots, metrics_listen="127.0.0.1:0")
        assert obs.health() == (503, "down")
        await obs.start()
        try:
            (entry,) = obs.ready_entries()
            status, _, body = await http(entry["port"], get("/metrics"))
            assert status == 200
            text = body.decode()
            assert sample(text, "turn_allocations_created_total", transport="udp", family="ipv4") == 12
            assert sample(text, "turn_worker_allocations", worker="1") == 3
            assert (await http(entry["port"], get("/health")))[2] == b"ok\n"
            keeper.update(worker_snapshot(1, 101, created=7, allocations=3, cpu=2.1, draining=True))
            status, _, body = await http(entry["port"], get("/health"))
            assert (status, body) == (503, b"draining\n")
        finally:
            await obs.stop()
        assert obs.health() == (503, "down")

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))


def test_observability_needs_a_server_or_a_snapshot_source() -> None:
    with pytest.raises(TypeError):
        Observability()
