"""coturn's own client tools against our server: Binding, channels, Send indications,
allocation to allocation and through an external peer. Judged by their summary lines:
turnutils_uclient exits 0 even at 100 % loss."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from .coturn_tools import assert_clean, needs_coturn, uclient

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


def test_uclient_with_rtcp_pairs_uses_even_port_and_reservations(legacy_server) -> None:
    # Without -c it also asks for EVEN-PORT with the reservation bit and uses RESERVATION-TOKEN.
    assert_clean(run_uclient(legacy_server, "-y", messages=10))


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
