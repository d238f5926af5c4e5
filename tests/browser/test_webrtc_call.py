"""A real browser relays a WebRTC call through turnd, over UDP, TCP and TLS.

Headless Chromium (driven by Playwright) makes a call between two RTCPeerConnections in one
page with ``iceTransportPolicy: 'relay'``, so ICE can only succeed through turnd: a data
channel echoes messages and a fake microphone sends audio.  The runner (run_call.py) does the
call inside a network namespace of the test's own and prints what getStats() and turnd's usage
log say; this test judges it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import NetNamespace

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("run_call.py")
MESSAGES = 5
CALL_TIMEOUT_S = 15.0
# Hard bound on one run (server start, browser start, call, shutdown); one run takes 2-7 s.
RUN_TIMEOUT_S = 50.0


def run_call(ns: NetNamespace, transport: str, workdir: Path) -> dict[str, Any]:
    argv = ns.exec_argv([
        sys.executable, str(RUNNER), "--transport", transport, "--workdir", str(workdir),
        "--messages", str(MESSAGES), "--call-timeout", str(CALL_TIMEOUT_S),
    ])
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        # The netns fixture ends whatever is left in the namespace.
        pytest.fail(f"the {transport} call did not finish in {RUN_TIMEOUT_S} s; stderr:\n{exc.stderr!r}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"runner printed no verdict (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}"
    verdict: dict[str, Any] = json.loads(lines[-1])
    assert verdict["error"] is None and proc.returncode == 0, (
        f"{verdict['error']}\nserver log:\n" + "\n".join(verdict.get("server_log_tail", []))
        + f"\nrunner stderr:\n{proc.stderr[-4000:]}"
    )
    return verdict


def check_selected_pair(side: str, stats: dict[str, Any], transport: str) -> None:
    assert stats is not None, f"{side}: no stats"
    assert stats["pairId"], f"{side}: the transport has no selectedCandidatePairId: {stats}"
    local, remote = stats["local"], stats["remote"]
    assert local is not None and remote is not None, f"{side}: selected pair without candidates: {stats}"
    assert local["candidateType"] == "relay", f"{side}: local candidate {local}"
    assert remote["candidateType"] == "relay", f"{side}: remote candidate {remote}"
    # relayProtocol is how the browser reached turnd: "udp", "tcp" or "tls".
    assert local["relayProtocol"] == transport, f"{side}: local candidate {local}"
    # turnd relays on 127.0.0.1 only (relay_addresses in the runner's config).
    assert local["address"] == "127.0.0.1" and remote["address"] == "127.0.0.1", stats
    assert stats["pair"]["bytesSent"] > 0 and stats["pair"]["bytesReceived"] > 0, stats["pair"]


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
def test_relay_only_call_through_turnd(netns: NetNamespace, tmp_path: Path, transport: str) -> None:
    verdict = run_call(netns, transport, tmp_path)
    page = verdict["page"]
    context = f"page errors: {page['errors']}; console: {verdict.get('console')}"
    assert page["ok"], context
    assert not page["errors"], context

    # The ICE transport of both peers runs relay to relay over the asked client transport.
    check_selected_pair("caller", page["caller"], transport)
    check_selected_pair("callee", page["callee"], transport)
    assert page["caller"]["local"]["port"] == page["callee"]["remote"]["port"]
    assert page["callee"]["local"]["port"] == page["caller"]["remote"]["port"]
    for side in ("caller", "callee"):
        assert page["gathered"][side], f"{side} gathered no candidates"
        assert all(" typ relay " in c for c in page["gathered"][side]), page["gathered"][side]

    # The data channel round trip: every message came back, in order.
    assert len(page["sent"]) == MESSAGES
    assert page["echoes"] == [f"echo:{m}" for m in page["sent"]]

    # Audio from the fake microphone arrived, and RTP loss is reported.
    assert page["remoteTrackKind"] == "audio"
    inbound = page["callee"]["inboundAudio"]
    assert inbound, "callee has no inbound-rtp audio stats"
    assert any(a["packetsReceived"] > 0 for a in inbound), inbound
    assert all(isinstance(a.get("packetsLost"), int) for a in inbound), inbound

    # turnd's usage records: the allocations were made over the asked client transport, and the
    # relay addresses of the selected candidates are allocations that carried traffic both ways.
    usage = [r for r in verdict["usage"] if r["user"] == verdict["username"]]
    assert len(usage) >= 2, verdict["usage"]
    assert {r["transport"] for r in usage} == {transport}, usage
    for side in ("caller", "callee"):
        local = page[side]["local"]
        relayed = f"{local['address']}:{local['port']}"
        owners = [r for r in usage if relayed in r["relayed"]]
        assert len(owners) == 1, (relayed, usage)
        assert owners[0]["packets_to_peer"] > 0 and owners[0]["packets_to_client"] > 0, owners[0]
        assert owners[0]["peers"] >= 1, owners[0]
    assert verdict["server_exit"] == 0
