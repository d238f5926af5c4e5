"""The side-by-side benchmark harness (benchmarks/) works: ``run.py --quick`` starts turnd and
coturn, drives both, and writes JSON with every scenario measured on both servers.

Nothing here asserts a timing or a ratio: quick sizes measure nothing, and a shared machine is
noisy. What is checked is that the harness produced numbers, that traffic really crossed both
servers, and that the reported ratios are the arithmetic of the reported medians. The parsing
of turnutils_uclient's output and the plateau choice are checked on canned input.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loadgen import Load, Sample, find_plateau, parse_final, parse_lost, parse_progress, summarize
from benchmarks.loadgen import UclientRun
from benchmarks.servers import coturn_available

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAY_SCENARIOS = ("udp_channel", "udp_channel_heavy", "udp_send", "tcp_channel")
ALL_SCENARIOS = (*RELAY_SCENARIOS, "allocation_rate", "memory_per_allocation")
QUICK_ALLOCATIONS = 20
RUN_TIMEOUT_S = 180


# ------------------------------------------------------------------------- canned input

PROGRESS = "3: : start_mclient: msz=20, tot_send_msgs=3559, tot_recv_msgs=3543, tot_send_bytes ~ 355900, tot_recv_bytes ~ 354300"
FINAL = "11: : start_mclient: tot_send_msgs=100000, tot_recv_msgs=99990"
LOST = "11: : Total lost packets 10 (0.010000%), total send dropped 0 (0.000000%)"


def test_progress_line_gives_running_totals() -> None:
    assert parse_progress(PROGRESS) == (3559, 3543)
    assert parse_final(PROGRESS) is None  # a progress line is not the closing one


def test_final_line_gives_closing_totals() -> None:
    assert parse_final(FINAL) == (100000, 99990)
    assert parse_progress(FINAL) is None
    assert parse_lost(LOST) == 10
    assert parse_lost(PROGRESS) is None


def _samples(sent: list[int], received: list[int]) -> list[Sample]:
    # One sample a second; the server burns 0.5 ms of CPU per message received.
    return [Sample(float(t), s, r, r * 0.0005, t * 0.1) for t, (s, r) in enumerate(zip(sent, received))]


def test_plateau_is_where_the_most_was_sent() -> None:
    # Ramp up, two full seconds of 1000/s (second of them loses 100), ramp down.
    samples = _samples([0, 200, 1200, 2200, 2500], [0, 200, 1200, 2100, 2400])
    plateau = find_plateau(samples, 2)
    assert plateau is not None
    assert (plateau.seconds, plateau.sent, plateau.received) == (2.0, 2000, 1900)
    assert math.isclose(plateau.server_cpu_s, 1900 * 0.0005)


def test_plateau_with_fewer_samples_than_asked_spans_them_all() -> None:
    plateau = find_plateau(_samples([0, 300], [0, 290]), 3)
    assert plateau is not None and (plateau.seconds, plateau.sent, plateau.received) == (1.0, 300, 290)
    assert find_plateau(_samples([0, 0, 0], [0, 0, 0]), 1) is None
    assert find_plateau(_samples([5], [5]), 1) is None


def test_summary_reports_rate_loss_and_cpu_per_message_of_the_plateau() -> None:
    load = Load(clients=2, messages=1250, length=100)
    run = UclientRun(command=[], samples=_samples([0, 200, 1200, 2200, 2500], [0, 200, 1200, 2100, 2400]),
                     final_sent=2500, final_received=2400, exit_code=0)
    out = summarize(run, load, plateau_intervals=2)
    assert out["delivered_msgs_per_s"] == 950.0
    assert out["delivered_mbit_per_s"] == 0.76  # 950 msg/s x 100 bytes x 8 bits
    assert out["plateau_loss_pct"] == 5.0
    assert out["loss_pct"] == 4.0
    assert out["server_cpu_us_per_msg"] == 500.0
    assert out["offered_msgs_per_s"] == 2000.0
    assert "error" not in out


def test_summary_flags_a_run_that_relayed_nothing() -> None:
    load = Load(clients=2, messages=10, length=100)
    run = UclientRun(command=[], samples=_samples([0, 10, 20], [0, 0, 0]), final_sent=20,
                     final_received=0, exit_code=0)
    out = summarize(run, load, plateau_intervals=1)
    assert out["error"] == "nothing was relayed"
    assert out["loss_pct"] == 100.0


# ------------------------------------------------------------------------- the real harness


@pytest.mark.coturn
@pytest.mark.skipif(not coturn_available(), reason="coturn (turnserver, turnutils_uclient) is not installed")
def test_quick_run_measures_every_scenario_on_both_servers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=str(REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["quick"] is True
    assert set(doc["scenarios"]) == set(ALL_SCENARIOS)
    # Every scenario appears in the printed table too.
    for name in ALL_SCENARIOS:
        assert name in proc.stdout

    for name, scenario in doc["scenarios"].items():
        headline = scenario["headline"]
        medians = {}
        for server in ("turnd", "coturn"):
            runs = scenario[server]["runs"]
            assert runs, f"{name}: no run of {server}"
            for run in runs:
                assert "error" not in run, f"{name} on {server}: {run}"
            value = scenario[server]["median"][headline]
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, server, value)
            if name != "memory_per_allocation":  # RSS growth for 20 allocations may round to 0
                assert value > 0, (name, server, value)
            medians[server] = value
        # The ratio is the report's arithmetic on its own medians, whatever its value.
        if medians["coturn"]:
            assert scenario["ratio"][headline] == pytest.approx(medians["turnd"] / medians["coturn"], abs=1e-3)
        else:
            assert scenario["ratio"][headline] is None
        assert scenario["target_met"] is None  # quick numbers are never judged

    for name in RELAY_SCENARIOS:
        for server in ("turnd", "coturn"):
            for run in doc["scenarios"][name][server]["runs"]:
                # Traffic crossed the server: the client got back messages it sent.
                assert run["sent"] > 0 and 0 < run["received"] <= run["sent"], (name, server, run)
    for server in ("turnd", "coturn"):
        rate = doc["scenarios"]["allocation_rate"][server]["runs"][0]
        assert rate["allocations"] == QUICK_ALLOCATIONS and rate["failed"] == 0, (server, rate)
        memory = doc["scenarios"]["memory_per_allocation"][server]["runs"][0]
        assert memory["rss_idle_kib"] > 0 and memory["rss_loaded_kib"] > 0, (server, memory)
