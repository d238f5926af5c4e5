"""The side-by-side benchmark harness (benchmarks/) works: ``run.py --quick`` starts turnd and
coturn, drives both, and writes JSON with every scenario measured on both servers.

Nothing here asserts a timing or a ratio: quick sizes measure nothing, and a shared machine is
noisy. What is checked is that the harness produced numbers, that traffic really crossed both
servers, and that the reported ratios are the arithmetic of the reported medians. The parsing
of turnutils_uclient's output and the plateau choice are checked on canned input, and so are the
closed-loop generator's summary (benchmarks/closedloop.py), the --cores parsing, the column
of a second turnd, uclient's transport flags and the run's TLS certificate.
"""

from __future__ import annotations

import ipaddress
import json
import math
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loadgen import Load, Sample, find_plateau, parse_final, parse_lost, parse_progress, summarize
from benchmarks.closedloop import LoopLoad, Prepared, busy_pct, summarize as summarize_loop
from benchmarks.loadgen import UclientRun
from benchmarks.results import Metric, ScenarioResult, format_table
from benchmarks.servers import (ServerUnderTest, coturn_available, make_tls_files, parse_cpu_list,
                                pinned)

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAY_SCENARIOS = ("udp_channel", "udp_channel_heavy", "udp_send", "tcp_channel", "tls_channel",
                   "tcp_relay")
CLOSED_LOOP_SCENARIOS = ("closed_loop_100", "closed_loop_1000", "closed_loop_send_100")
RATE_SCENARIOS = ("fixed_rate", "latency_at_half_knee")
ALL_SCENARIOS = (*RELAY_SCENARIOS, "allocation_rate", "memory_per_allocation",
                 *CLOSED_LOOP_SCENARIOS, *RATE_SCENARIOS)
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
    # The same CPU over the 2000 messages sent in the plateau (what tls_channel compares too).
    assert out["server_cpu_us_per_sent_msg"] == 475.0
    assert out["offered_msgs_per_s"] == 2000.0
    assert "error" not in out


def test_summary_flags_a_run_that_relayed_nothing() -> None:
    load = Load(clients=2, messages=10, length=100)
    run = UclientRun(command=[], samples=_samples([0, 10, 20], [0, 0, 0]), final_sent=20,
                     final_received=0, exit_code=0)
    out = summarize(run, load, plateau_intervals=1)
    assert out["error"] == "nothing was relayed"
    assert out["loss_pct"] == 100.0


def _generator_output(**over: object) -> dict[str, object]:
    gen: dict[str, object] = {
        "round_trips_per_s": 1000.0, "sent": 5010, "received": 5000, "lost": 10, "late": 2,
        "duplicates": 0, "send_errors": 0, "bad": 0, "generator_cpu_pct": 40.0, "generator_cpu_s": 2.0,
        "window_s": 5.0, "error": None,
        "latency_us": {"p50": 120.5, "p99": 900.5, "p999": 2000.5, "max": 2500.0, "mean": 150.0},
    }
    gen.update(over)
    return gen


def test_closed_loop_summary_counts_two_datagrams_per_round_trip() -> None:
    load = LoopLoad(allocations=3, duration_s=5.0)
    prepared = Prepared(failed=0, setup_s=0.2)
    prepared.flows = [object()] * 3  # type: ignore[list-item]
    raw = {"generator": _generator_output(), "server_cpu_s": 0.05, "server_window_s": 5.0,
           "cores_busy_pct": {"0": 80.0, "1": 55.5}}
    out = summarize_loop(raw, load, prepared, server_cpus=[0], generator_cpus=[1])
    assert out["round_trips_per_s"] == 1000.0 and out["relayed_datagrams_per_s"] == 2000.0
    # 0.05 s of server CPU over 2 x 5000 relayed datagrams.
    assert out["server_cpu_us_per_datagram"] == 5.0
    assert out["server_cpu_pct"] == 1.0
    assert out["loss_pct"] == pytest.approx(100 * 10 / 5010, abs=1e-3)
    assert (out["latency_p50_us"], out["latency_p99_us"], out["latency_p999_us"]) == (120.5, 900.5, 2000.5)
    assert (out["server_core_busy_pct"], out["generator_core_busy_pct"]) == (80.0, 55.5)
    assert out["sent_round_trips_per_s"] == 1002.0
    assert "error" not in out


def test_closed_loop_summary_flags_a_run_where_nothing_came_back() -> None:
    prepared = Prepared()
    prepared.flows = [object()]  # type: ignore[list-item]
    raw = {"generator": _generator_output(round_trips_per_s=0.0, received=0, lost=5010,
                                          latency_us={"p50": -1, "p99": -1, "p999": -1, "max": 0, "mean": -1})}
    out = summarize_loop(raw, LoopLoad(allocations=1), prepared)
    assert out["error"].startswith("nothing came back")
    assert out["latency_p50_us"] is None and out["server_cpu_us_per_datagram"] is None


def test_core_busy_share_is_the_busiest_of_the_cores_named() -> None:
    before = {0: (100, 1000), 1: (500, 1000)}
    after = {0: (190, 1100), 1: (550, 1100)}
    assert busy_pct(before, after, [0]) == 90.0
    assert busy_pct(before, after, [0, 1]) == 90.0
    assert busy_pct(before, after, [1]) == 50.0
    assert busy_pct(before, after, [7]) is None


def test_cpu_lists_parse_as_taskset_does() -> None:
    assert parse_cpu_list("0") == [0]
    assert parse_cpu_list("0-3") == [0, 1, 2, 3]
    assert parse_cpu_list("4,0-1") == [0, 1, 4]
    for bad in ("", "3-1", "x", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)
    if pinned(["true"], [0, 2]) != ["true"]:  # taskset is installed
        assert pinned(["true"], [0, 2])[:3] == ["taskset", "-c", "0,2"]


def test_a_second_turnd_gets_its_own_column_and_ratio() -> None:
    sc = ScenarioResult("x", "t", "rate", "u", True, [Metric("rate", "rate")])
    sc.add("turnd", {"rate": 90.0})
    sc.add("coturn", {"rate": 100.0})
    sc.add("turnd-pure", {"rate": 40.0})
    doc = sc.as_dict()
    assert doc["ratio"]["rate"] == 0.9
    assert doc["ratio_to_coturn"] == {"turnd-pure": {"rate": 0.4}}
    assert doc["turnd-pure"]["median"]["rate"] == 40.0
    header = format_table([sc]).splitlines()[0].split()
    assert header == ["scenario", "metric", "turnd", "coturn", "turnd-pure", "turnd/coturn",
                      "turnd-pure/coturn", "target"]
    plain = ScenarioResult("y", "t", "rate", "u", True, [Metric("rate", "rate")])
    plain.add("turnd", {"rate": 1.0})
    plain.add("coturn", {"rate": 2.0})
    assert "ratio_to_coturn" not in plain.as_dict()


def test_uclient_transport_flags_and_port_follow_the_scenario_transport() -> None:
    server = ServerUnderTest("turnd", None, {"udp": 1001, "tcp": 1002, "tls": 1003},  # type: ignore[arg-type]
                             Path("."), Path("."))
    commands = {t: Load(clients=2, messages=10, length=100, transport=t).command(server)
                for t in ("udp", "tcp", "tls")}
    for transport, command in commands.items():
        assert command[command.index("-p") + 1] == str(server.ports[transport])
    assert "-t" not in commands["udp"] and "-S" not in commands["udp"]
    assert "-t" in commands["tcp"] and "-S" not in commands["tcp"]
    # -S without -t would be DTLS: TLS over TCP needs both.
    assert "-t" in commands["tls"] and "-S" in commands["tls"]


def test_run_certificate_is_self_signed_for_loopback_and_its_key_private(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_tls_files(tmp_path / "tls")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.issuer == cert.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    # The pair matches: a server context accepts it (a mismatched key raises here).
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert, files.key)
    # A second run gets a fresh certificate, not the same one.
    again = make_tls_files(tmp_path / "tls")
    assert x509.load_pem_x509_certificate(again.cert.read_bytes()).serial_number != cert.serial_number


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
    for name in (*CLOSED_LOOP_SCENARIOS, *RATE_SCENARIOS):
        for server in ("turnd", "coturn"):
            for run in doc["scenarios"][name][server]["runs"]:
                # Round trips came back through the server, none more than were sent, and the
                # percentiles are in order.
                # Setting up can lose one to a loaded machine; most must be there.
                assert run["allocations"] > 2 * run["setup_failed"], (name, server, run)
                assert 0 < run["received"] <= run["sent"] + run["duplicates"], (name, server, run)
                assert run["relayed_datagrams_per_s"] == pytest.approx(2 * run["round_trips_per_s"], abs=0.2)
                assert run["latency_p50_us"] <= run["latency_p99_us"] <= run["latency_p999_us"], (name, run)
                assert run["released"] == run["allocations"], (name, server, run)
    half = doc["settings"]["half_knee"]
    # The half-knee rate is half of coturn's closed-loop rate in the same run.
    assert half["rate"] == pytest.approx(
        doc["scenarios"]["closed_loop_100"]["coturn"]["median"]["round_trips_per_s"] / 2, abs=0.1)
    for run in doc["scenarios"]["latency_at_half_knee"]["turnd"]["runs"]:
        assert run["offered_round_trips_per_s"] == half["rate"]
    for server in ("turnd", "coturn"):
        rate = doc["scenarios"]["allocation_rate"][server]["runs"][0]
        assert rate["allocations"] == QUICK_ALLOCATIONS and rate["failed"] == 0, (server, rate)
        memory = doc["scenarios"]["memory_per_allocation"][server]["runs"][0]
        assert memory["rss_idle_kib"] > 0 and memory["rss_loaded_kib"] > 0, (server, memory)
