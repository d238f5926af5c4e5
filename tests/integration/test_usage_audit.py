"""usage_log_file on a real server: the records are what real clients did, hold no secret, and
verify; a SIGKILL loses at most the last flush interval, and a restart continues the chain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from turnserver.stun import Attr, Method

from .raw_client import RawTurnClient, code
from .server import SECRET, start_server

PEER = ("127.0.0.1", 9)  # never sent to: only permitted and bound


def lines(path: Path) -> list[dict]:
    out = []
    for p in sorted(path.parent.glob(path.name + ".2*")) + [path]:
        out += [json.loads(line) for line in p.read_bytes().splitlines()]
    return out


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    files = [str(p) for p in sorted(path.parent.glob(path.name + ".2*"))] + [str(path)]
    return subprocess.run([sys.executable, "-m", "turnserver", "verify-usage-log", *files],
                          capture_output=True, text=True, timeout=30)


def test_records_equal_what_the_clients_did_and_verify(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "usage.log"
    server = start_server(tmp_path / "turnd", usage_log_file=str(log), usage_log_flush_s=0.1,
                          allowed_peers=["127.0.0.1/32"])
    try:
        a = RawTurnClient(server.address("udp"), *server.credentials("alice"))
        b = RawTurnClient(server.address("udp"), *server.credentials("bob"))
        relayed = a.relayed(a.allocate())
        alice_port = a.sock.getsockname()[1]
        assert code(b.allocate()) == 200
        assert code(a.permit(PEER)) == 200
        assert code(a.bind(0x4001, ("127.0.0.1", 10))) == 200
        assert code(a.request(Method.REFRESH, [(Attr.LIFETIME, 900)])) == 200
        assert code(a.request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        a.close()
    finally:
        assert server.stop() == 0
    records = [r for r in lines(log) if r["event"] != "anchor"]
    alice = [r for r in records if r["user"].endswith(":alice")]
    assert [r["event"] for r in alice] == ["created", "permission", "channel", "refreshed", "ended"]
    assert alice[0]["relayed"] == [f"{relayed[0]}:{relayed[1]}"]
    assert all(r["client"] == f"127.0.0.1:{alice_port}" for r in alice)
    assert alice[1]["peers"] == ["127.0.0.1"] and alice[2]["channel"] == 0x4001
    assert alice[3]["lifetime_s"] == 900 and alice[4]["reason"] == "deleted"
    bob = [r for r in records if r["user"].endswith(":bob")]
    assert [r["event"] for r in bob] == ["created", "ended"] and bob[1]["reason"] == "shutdown"
    assert len({r["allocation"] for r in records}) == 2
    text = "".join(p.read_text() for p in log.parent.iterdir())
    assert SECRET not in text and server.credentials("alice")[1] not in text
    result = verify(log)
    assert result.returncode == 0 and "intact" in result.stdout, result.stdout


def test_a_sigkill_loses_at_most_the_last_flush_and_a_restart_continues(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "usage.log"
    options = dict(usage_log_file=str(log), usage_log_flush_s=0.2)
    server = start_server(tmp_path / "turnd", **options)
    clients = []
    for i in range(20):
        client = RawTurnClient(server.address("udp"), *server.credentials(f"u{i}"))
        assert code(client.allocate()) == 200
        clients.append(client)
    time.sleep(0.6)  # more than two flush intervals: all 20 are on disk
    for i in range(5):
        client = RawTurnClient(server.address("udp"), *server.credentials(f"late{i}"))
        assert code(client.allocate()) == 200
        clients.append(client)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    created = [r for r in lines(log) if r["event"] == "created"]
    assert len(created) >= 20  # at most the last interval's (the 5 late ones) may be missing
    assert {f"u{i}" for i in range(20)} <= {r["user"].split(":", 1)[1] for r in created}
    assert verify(log).returncode == 0
    # Cut the last line as a crash in the middle of a write would: verification says so, and
    # a restart puts the cut file aside and records the cut in its anchor.
    data = log.read_bytes()
    log.write_bytes(data[:-10])
    cut = verify(log)
    assert cut.returncode == 1 and "CUT" in cut.stdout
    again = start_server(tmp_path / "turnd2", **options)
    try:
        client = RawTurnClient(again.address("udp"), *again.credentials("after"))
        assert code(client.allocate()) == 200
        client.close()
    finally:
        assert again.stop() == 0
    result = verify(log)
    assert result.returncode == 0 and "note:" in result.stdout and "cut" in result.stdout
    for client in clients:
        client.close()
