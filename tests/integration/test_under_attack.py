"""Honest calls keep relaying while the server is attacked.

A reference call (two UDP allocations relaying ChannelData to each other, 50 packets of 200
bytes a second each way, benchmarks/attack.py) runs while each attack runs alone at moderate
rates (``attack.MODERATE``), then while all of them run at once, each test against a fresh
turnd with UDP and TCP listeners. Proven for each: the call loses at most 1 % and goes no longer than 100 ms
without a packet in either direction while the attack runs, and afterwards the server still
answers a Binding and a fresh allocation still relays.

The gap asserted is ``max_relay_gap_ms``: the longest stretch without an arrival while a packet
was in flight, with arrival times from the kernel, so a test process that is scheduled late on
a busy machine neither hides nor invents a stall of the server. The raw gap between arrivals
and the sender's own gap are in every failure message.

The measurement itself is checked first on canned send and arrival times.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from benchmarks import attack
from benchmarks.attack import ATTACKS, MODERATE, MediaDirection, Target

from .server import RunningServer

PHASE_S = 3.0
MAX_LOSS_PCT = 1.0
MAX_GAP_MS = 100.0
# The permission flood's addresses (RFC 2544's benchmarking range) are permitted, never sent to.
FLOOD_NETWORK = "198.18.0.0/15"


# ------------------------------------------------------------------------- the measurement


def _direction(sends: list[float], arrivals: dict[int, float]) -> dict[str, Any]:
    d = MediaDirection("x")
    d.send_times.extend(sends)
    for seq, at in sorted(arrivals.items(), key=lambda item: item[1]):
        d.arrived(seq, at)
    return d.summary()


def test_steady_stream_has_the_send_interval_as_its_gap() -> None:
    sends = [i * 0.02 for i in range(50)]
    out = _direction(sends, {i: t + 0.001 for i, t in enumerate(sends)})
    assert out["loss_pct"] == 0.0 and out["received"] == 50
    assert out["max_gap_ms"] == pytest.approx(20.0, abs=0.01)
    assert out["sender_max_gap_ms"] == pytest.approx(20.0, abs=0.01)
    # Nothing was ever in flight for more than the 1 ms latency.
    assert out["max_relay_gap_ms"] == pytest.approx(1.0, abs=0.01)
    assert out["max_latency_ms"] == pytest.approx(1.0, abs=0.01)


def test_a_server_stall_is_a_relay_gap() -> None:
    # Everything sent from 0.2 s on is held until 0.5 s: the server stalled, the sender kept time.
    sends = [i * 0.02 for i in range(50)]
    arrivals = {i: (0.5 if 0.2 <= t < 0.5 else t + 0.001) for i, t in enumerate(sends)}
    out = _direction(sends, arrivals)
    assert out["loss_pct"] == 0.0
    # Packet 9 arrived at 0.181; nothing more until 0.5, though packet 10 was sent at 0.2.
    assert out["max_gap_ms"] == pytest.approx(319.0, abs=0.01)
    assert out["max_relay_gap_ms"] == pytest.approx(300.0, abs=0.01)
    assert out["sender_max_gap_ms"] == pytest.approx(20.0, abs=0.01)


def test_a_sender_pause_is_not_a_relay_gap() -> None:
    # The sender itself stops for 300 ms after packet 9; everything arrives 1 ms after it left.
    sends = [i * 0.02 + (0.3 if i >= 10 else 0.0) for i in range(50)]
    out = _direction(sends, {i: t + 0.001 for i, t in enumerate(sends)})
    assert out["max_gap_ms"] == pytest.approx(320.0, abs=0.01)
    assert out["sender_max_gap_ms"] == pytest.approx(320.0, abs=0.01)
    assert out["max_relay_gap_ms"] == pytest.approx(1.0, abs=0.01)


def test_a_stream_that_stops_is_lost_and_a_gap_to_the_end() -> None:
    sends = [i * 0.02 for i in range(50)]
    out = _direction(sends, {i: t + 0.001 for i, t in enumerate(sends) if i < 40})
    assert out["loss_pct"] == 20.0 and out["received"] == 40
    # The last arrival is packet 39's at 0.781; the last send was at 0.98, the first lost one
    # left at 0.8.
    assert out["max_gap_ms"] == pytest.approx(199.0, abs=0.01)
    assert out["max_relay_gap_ms"] == pytest.approx(180.0, abs=0.01)


def test_duplicates_and_reordering_are_counted_not_received_twice() -> None:
    d = MediaDirection("x")
    d.send_times.extend([0.0, 0.02, 0.04])
    for seq, at in ((0, 0.001), (2, 0.041), (1, 0.042), (1, 0.043)):
        d.arrived(seq, at)
    out = d.summary()
    assert (out["received"], out["duplicates"], out["reordered"], out["loss_pct"]) == (3, 1, 1, 0.0)


def test_attacks_refuse_addresses_off_loopback() -> None:
    with pytest.raises(ValueError):
        Target(udp=("192.0.2.1", 3478), tcp=None, secret="s", realm="r")
    with pytest.raises(ValueError):
        Target(udp=("127.0.0.1", 3478), tcp=("10.0.0.1", 3478), secret="s", realm="r")


# ------------------------------------------------------------------------- the real server


@pytest.fixture
def attacked_server(server_factory: Callable[..., RunningServer]) -> RunningServer:
    """A fresh turnd with UDP and TCP listeners for each test, so each attack is judged alone."""
    return server_factory(listen_tcp=["127.0.0.1:0"], allowed_peers=[FLOOD_NETWORK])


def target_of(server: RunningServer) -> Target:
    return Target(udp=server.address("udp"), tcp=server.address("tcp"), secret=server.secret,
                  realm=server.options["realm"], pid=server.proc.pid)


def call_problems(call: dict[str, Any], when: str) -> list[str]:
    """Each direction over the loss or gap limit, with the numbers that explain it."""
    problems = []
    for name in ("a_to_b", "b_to_a"):
        d = call[name]
        if d["loss_pct"] > MAX_LOSS_PCT or d["max_relay_gap_ms"] > MAX_GAP_MS:
            problems.append(
                f"{when}, {name}: loss {d['loss_pct']} % ({d['received']}/{d['sent']}), "
                f"relay gap {d['max_relay_gap_ms']} ms (raw gap {d['max_gap_ms']} ms, sender's own "
                f"gap {d['sender_max_gap_ms']} ms, max latency {d.get('max_latency_ms')} ms)")
    return problems


def _server_side(phase: dict[str, Any]) -> str:
    return (f"server CPU {phase.get('server_cpu_pct')} %, waited {phase.get('server_runqueue_wait_ms')} ms "
            f"for a CPU during the phase; longest stalls (s after start, ms): "
            f"{phase['call']['a_to_b'].get('longest_relay_gaps')} / {phase['call']['b_to_a'].get('longest_relay_gaps')}")


def assert_still_serving(server: RunningServer, target: Target, label: str) -> None:
    """A Binding is answered and a fresh allocation pair relays both ways."""
    assert server.alive(), f"turnd exited after {label}:\n{server.log_text()[-3000:]}"
    rtt = attack.binding_ms(target.udp)
    assert rtt is not None, f"no Binding answer after {label}"
    fresh = attack.reference_call(target, duration_s=1.0, drain_s=0.3, user=f"after-{label}")
    assert fresh["a_to_b"]["received"] > 0 and fresh["b_to_a"]["received"] > 0, fresh
    assert fresh["loss_pct"] <= MAX_LOSS_PCT, fresh


def _attack_ran(name: str, result: dict[str, Any]) -> None:
    """The attack really happened: it ran without error and sent what it was asked to."""
    assert not result.get("error"), result
    if name == "connection_flood":
        # Every connection was opened; how many the server keeps is its business.
        assert result["connected"] >= MODERATE.connections * 0.9, result
    elif name == "oversized":
        assert result["udp_big"]["sent"] >= MODERATE.big_per_s * PHASE_S * 0.8, result
        assert result["tcp_big"]["sent"] >= 1, result
    else:
        nominal = {"flood_401": MODERATE.flood_one_source_per_s + MODERATE.flood_many_ports_per_s,
                   "permission_flood": 1.0,  # paced by the answers: at least one a second
                   "never_reads": MODERATE.never_reads_per_s}[name]
        assert result["sent"] >= nominal * PHASE_S * 0.5, result


@pytest.mark.parametrize("name", list(ATTACKS))
def test_call_keeps_relaying_during_attack(attacked_server: RunningServer, name: str) -> None:
    target = target_of(attacked_server)
    phase = attack.run_phase(target, {name: MODERATE.kwargs(name)}, duration_s=PHASE_S, user=f"call-{name}")
    _attack_ran(name, phase["attacks"][name])
    problems = call_problems(phase["call"], f"during {name}")
    assert not problems, "\n".join(problems) + f"\n{_server_side(phase)}\nattack: {phase['attacks'][name]}"
    assert_still_serving(attacked_server, target, name)


def test_call_keeps_relaying_during_all_attacks_at_once(attacked_server: RunningServer) -> None:
    target = target_of(attacked_server)
    phase = attack.run_phase(target, {name: MODERATE.kwargs(name) for name in ATTACKS},
                             duration_s=PHASE_S, user="call-all")
    for name, result in phase["attacks"].items():
        _attack_ran(name, result)
    problems = call_problems(phase["call"], "during all attacks at once")
    assert not problems, "\n".join(problems) + f"\n{_server_side(phase)}"
    assert_still_serving(attacked_server, target, "all attacks")
