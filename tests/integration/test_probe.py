"""``turnd probe`` against a real turnd: passing, failing with the reason, usage errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from turnserver.client import TurnClient
from turnserver.credentials import mint_credentials

from .server import RELAY_PORTS, SECRET, RunningServer, start_server

PROBE_TIMEOUT_S = 60


def probe(*args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TURND_SECRETS", None)
    if secret is not None:
        env["TURND_SECRETS"] = secret
    return subprocess.run(
        [sys.executable, "-m", "turnserver", "probe", *args],
        capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S,
    )


def ports_args(server: RunningServer) -> list[str]:
    args = []
    for lst in server.info["listeners"]:
        args += [f"--{lst['transport']}-port", str(lst["port"])]
    return args


def test_probe_passes_over_udp_and_relays_real_data(turn_server: RunningServer) -> None:
    result = probe("127.0.0.1", *ports_args(turn_server), "--transports", "udp", "--timeout", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    port = turn_server.port("udp")
    lines = result.stdout.splitlines()
    assert re.fullmatch(
        rf"udp  127\.0\.0\.1:{port}  PASS  binding [0-9.]+ ms, allocate [0-9.]+ ms, relay round trip "
        r"[0-9.]+ ms \(mapped 127\.0\.0\.1:\d+, relayed 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+\)",
        lines[0],
    ), lines[0]
    assert lines[-1] == "1 of 1 checks passed"
    # The server saw two allocations carry data both ways, then deleted: one for the probe's
    # user, one for its "-peer" user (so that a user_quota of 1 does not fail the probe).
    deadline = time.monotonic() + 5
    while turn_server.log_text().count(":probe") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = turn_server.log_text().splitlines()
    records = [line for line in lines if ":probe " in line or ":probe-peer " in line]
    assert len(records) == 2
    assert sum(":probe-peer " in line for line in records) == 1
    for record in records:
        assert "reason=deleted" in record
        assert "packets_to_peer=1" in record and "packets_to_client=1" in record


def test_probe_json_output(turn_server: RunningServer, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# the first line that is a secret mints\n{SECRET}\n")
    result = probe("127.0.0.1", "--udp-port", str(turn_server.port("udp")), "--transports", "udp",
                   "--secrets-file", str(secrets), "--user", "monitor", "--json", secret=None)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    (udp,) = report["results"]
    assert udp["transport"] == "udp" and udp["ok"] is True and udp["step"] == "done"
    assert udp["error"] is None
    assert udp["binding_rtt_ms"] > 0 and udp["relay_rtt_ms"] > 0
    assert len(udp["relayed"]) == 2
    for relayed in udp["relayed"]:
        host, port = relayed.rsplit(":", 1)
        assert host == "127.0.0.1" and RELAY_PORTS[0] <= int(port) <= RELAY_PORTS[1]
    assert ":monitor " in turn_server.log_text() or ":monitor" in turn_server.log_text()


def test_probe_with_a_wrong_secret_fails_with_the_reason(turn_server: RunningServer) -> None:
    result = probe("127.0.0.1", "--udp-port", str(turn_server.port("udp")), "--transports", "udp",
                   secret="not-the-secret")
    assert result.returncode == 1
    # The code and the hint, not the reason phrase: unauthenticated answers may carry none.
    assert re.search(rf"^udp  127\.0\.0\.1:{turn_server.port('udp')}  FAIL  allocate: 401\b.*wrong secret\?$",
                     result.stdout, re.MULTILINE), result.stdout
    assert result.stdout.splitlines()[-1] == "0 of 1 checks passed"


def test_probe_nothing_listening_is_connection_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = probe("127.0.0.1", "--udp-port", str(port), "--transports", "udp", "--timeout", "2")
    assert result.returncode == 1
    assert "FAIL  binding: connection refused" in result.stdout


def test_probe_against_a_draining_server_says_so(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd")

    async def hold_and_drain() -> TurnClient:
        creds = mint_credentials(SECRET, "holder", 600)
        holder = await TurnClient.connect("127.0.0.1", server.port("udp"), username=creds.username,
                                          password=creds.password)
        await holder.allocate()
        return holder

    try:
        loop = asyncio.new_event_loop()
        holder = loop.run_until_complete(hold_and_drain())
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "SIGTERM: draining" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        result = probe("127.0.0.1", "--udp-port", str(server.port("udp")), "--transports", "udp")
        assert result.returncode == 1
        assert "FAIL  allocate: 508 Server is draining" in result.stdout
        loop.run_until_complete(holder.close())
        loop.close()
        assert server.proc.wait(timeout=10) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("args, secret, message", [
    (["127.0.0.1", "--transports", "udp"], None, "no shared secret"),
    (["127.0.0.1", "--transports", "udp,quic"], SECRET, "'quic' is not one of"),
    (["127.0.0.1", "--udp-port", "70000"], SECRET, "--udp-port"),
    (["127.0.0.1", "--user", "a:b"], SECRET, "--user"),
    (["127.0.0.1", "--secrets-file", "/nonexistent/secrets"], None, "cannot read"),
    ([], SECRET, "HOST"),
])
def test_probe_usage_errors_exit_2(args: list[str], secret: str | None, message: str) -> None:
    result = probe(*args, secret=secret)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def _stream_server(tmp_path: Path) -> RunningServer:
    """A server with UDP, TCP and TLS listeners; a listener asked for and missing is a failure."""
    server = start_server(tmp_path / "turnd", listen_tcp=["127.0.0.1:0"], listen_tls=["127.0.0.1:0"])
    transports = sorted(lst["transport"] for lst in server.info["listeners"])
    if not {"udp", "tcp", "tls"} <= set(transports):
        log = server.log_text()
        server.stop()
        pytest.fail(f"asked for one UDP, one TCP and one TLS listener, the server reports {transports}:\n{log}")
    return server


def test_probe_passes_over_every_transport(tmp_path: Path) -> None:
    server = _stream_server(tmp_path)
    try:
        # The embedded self-signed certificate needs --insecure.
        result = probe("127.0.0.1", *ports_args(server), "--insecure", "--timeout", "3")
        assert result.returncode == 0, result.stdout + result.stderr + server.log_text()
        lines = result.stdout.splitlines()
        assert [line.split()[0] for line in lines[:3]] == ["udp", "tcp", "tls"]
        assert all("  PASS  " in line for line in lines[:3])
        assert lines[2].endswith(", ALPN stun.turn)")  # RFC 7443: the server agreed to "stun.turn"
        assert "ALPN" not in lines[0] + lines[1]
        assert lines[-1] == "3 of 3 checks passed"
        report = json.loads(probe("127.0.0.1", *ports_args(server), "--insecure", "--json").stdout)
        assert [r["alpn"] for r in report["results"]] == [None, None, "stun.turn"]
        assert [r["ok"] for r in report["results"]] == [True, True, True]
    finally:
        server.stop()


def test_probe_tls_without_insecure_reports_the_verify_error(tmp_path: Path) -> None:
    server = _stream_server(tmp_path)
    try:
        result = probe("127.0.0.1", *ports_args(server), "--transports", "tls", "--timeout", "3")
        assert result.returncode == 1
        assert "FAIL  connect: TLS certificate verify failed" in result.stdout
        assert "--insecure" in result.stdout
    finally:
        server.stop()
