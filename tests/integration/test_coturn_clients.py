"""coturn's own client tools against our server: Binding, channels, Send indications,
allocation to allocation and through an external peer. Judged by their summary lines:
turnutils_uclient exits 0 even at 100 % loss."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from turnserver.credentials import mint_credentials
from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

from .coturn_tools import assert_clean, needs_coturn, uclient
from .raw_client import RawTurnClient, code

pytestmark = needs_coturn

PEER_IP = "127.0.0.2"  # loopback, but not the relay address: an "external" peer


def run_uclient(server, *args: str, messages: int = 20) -> dict[str, int]:
    return uclient(server.secret, server.port("udp"), *args, messages=messages)


def test_stunclient_binding(turn_server) -> None:
    result = subprocess.run(["turnutils_stunclient", "-p", str(turn_server.port("udp")), "127.0.0.1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", result.stdout + result.stderr)


@pytest.fixture
def legacy_server(server_factory):
    # turnutils_uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF.
    return server_factory(legacy_channel_numbers=True, allowed_peers=[f"{PEER_IP}/32"])


def test_uclient_channels_allocation_to_allocation(legacy_server) -> None:
    assert_clean(run_uclient(legacy_server, "-y", "-c"))


def test_uclient_send_indications_allocation_to_allocation(legacy_server) -> None:
    assert_clean(run_uclient(legacy_server, "-y", "-c", "-s"))


def test_uclient_with_rtcp_pairs_uses_even_port_and_reservations(server_factory) -> None:
    # Without -c, turnutils_uclient allocates RTP with EVEN-PORT and the reservation bit, and
    # RTCP with the RESERVATION-TOKEN it got (RFC 8656 §7.2): RTP on an even port, RTCP on the
    # next one. The usage records (one per allocation, at its end) give the relayed ports.
    server = server_factory(legacy_channel_numbers=True, log_format="json")
    assert_clean(run_uclient(server, "-y", messages=10))
    server.stop()  # the allocations uclient leaves behind end now and get their records too
    records = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    ports = sorted(int(relayed.rsplit(":", 1)[1]) for r in records if r.get("logger") == "turnd.usage"
                   for relayed in r["usage"]["relayed"])
    assert len(ports) >= 4, ports  # two clients, each with an RTP and an RTCP allocation
    odd = [p for p in ports if p % 2]
    assert odd, f"no allocation got a reserved port: {ports}"
    # An odd port only ever comes from a reservation: the port below it is an EVEN-PORT allocation.
    assert all(p - 1 in ports for p in odd), ports


@pytest.fixture
def external_peer():
    port = 41000 + (int(time.time() * 1000) % 1000)
    proc = subprocess.Popen(["turnutils_peer", "-L", PEER_IP, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(timeout=5)


@pytest.mark.parametrize("mode", [["-c"], ["-c", "-s"]], ids=["channels", "send-indications"])
def test_uclient_through_external_peer(legacy_server, external_peer, mode) -> None:
    assert_clean(run_uclient(legacy_server, "-e", PEER_IP, "-r", str(external_peer), *mode))


COTURN_SECRET = "coturn-test-secret"


@pytest.fixture
def coturn(tmp_path):
    """coturn itself on 127.0.0.1 (UDP only), REST credentials from COTURN_SECRET."""
    if shutil.which("turnserver") is None:
        pytest.skip("coturn's turnserver is not installed")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        ["turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}", "--no-tcp",
         "--use-auth-secret", f"--static-auth-secret={COTURN_SECRET}", "--realm=test.turnd",
         "--min-port=52000", "--max-port=52100", "--no-cli", "--no-tls", "--no-dtls",
         "--allow-loopback-peers", f"--userdb={tmp_path / 'turndb'}", f"--pidfile={tmp_path / 'pid'}",
         f"--log-file={tmp_path / 'coturn.log'}", "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            client = RawTurnClient(("127.0.0.1", port), "", "")
            try:
                if client.transact_raw(*_binding_request(), timeout_s=0.2) is not None:
                    break
            finally:
                client.close()
        else:
            pytest.fail(f"coturn did not answer a Binding request on port {port}")
        yield ("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _binding_request() -> tuple[bytes, bytes]:
    msg = Message(Method.BINDING, MessageClass.REQUEST)
    return encode_message(msg), msg.transaction_id


def test_an_expired_rest_username_keeps_its_allocation_like_coturn(coturn, server_factory) -> None:
    # docs/credentials.md: with allow_refresh_after_expiry at its default, an allocation made
    # before the username's expiry can still be refreshed and given permissions and channels
    # after it, as coturn does; a new Allocate with that username is refused by both.
    turnd = server_factory(allowed_peers=[f"{PEER_IP}/32"])
    servers = {"coturn": (coturn, COTURN_SECRET), "turnd": (turnd.address("udp"), turnd.secret)}
    clients: dict[str, RawTurnClient] = {}
    results: dict[str, dict[str, int]] = {}
    try:
        for name, (address, secret) in servers.items():
            creds = mint_credentials(secret, "alice", 2)
            clients[name] = RawTurnClient(address, creds.username, creds.password)
            results[name] = {"allocate": code(clients[name].allocate())}
        time.sleep(3)  # both usernames are now past their expiry
        for name, (address, secret) in servers.items():
            client = clients[name]
            results[name]["refresh"] = code(client.request(Method.REFRESH, [(Attr.LIFETIME, 600)]))
            results[name]["create_permission"] = code(client.permit((PEER_IP, 9)))
            results[name]["channel_bind"] = code(client.bind(0x4000, (PEER_IP, 9)))
            late = clients[f"{name} late"] = RawTurnClient(address, client.username, client.password)
            results[name]["allocate_after_expiry"] = code(late.allocate())
    finally:
        for client in clients.values():
            client.close()
    assert results["coturn"] == {"allocate": 200, "refresh": 200, "create_permission": 200,
                                 "channel_bind": 200, "allocate_after_expiry": 401}, results
    assert results["turnd"] == results["coturn"], results
