"""Failed authentications are logged one line each, with the client's address, the user part
and the reason, never a password or key; rate-limited per source; and the shipped fail2ban
filter (systemd/fail2ban/turnd.conf, shown in docs/deploy.md) matches the real lines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from .raw_client import RawTurnClient, code
from .server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "systemd" / "fail2ban" / "turnd.conf"
DEPLOY = ROOT / "docs" / "deploy.md"


def fail(server: RunningServer, source_port_clients: int, *, password: str = "wrong-password",
         user: str = "mallory") -> None:
    username = f"{int(time.time()) + 600}:{user}"
    for _ in range(source_port_clients):
        client = RawTurnClient(server.address("udp"), username, password)
        try:
            assert code(client.allocate()) == 401
        finally:
            client.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_each_failure_is_one_line_with_address_user_and_reason(
        server_factory: Callable[..., RunningServer], log_format: str) -> None:
    server = server_factory(log_format=log_format)
    fail(server, 3, password="hunter2-secret-password")
    good = RawTurnClient(server.address("udp"), *server.credentials("alice"))
    assert code(good.allocate()) == 200
    good.close()
    time.sleep(0.3)
    server.stop()
    lines = [line for line in server.log_text().splitlines() if "authentication failed" in line]
    assert len(lines) == 3, lines
    for line in lines:
        if log_format == "json":
            failure = json.loads(line)["auth_failure"]
            assert failure["client"] == "127.0.0.1" and failure["reason"] == "bad_integrity"
            assert failure["user"] == "mallory" and failure["method"] == "allocate"
        else:
            assert re.search(r"turnd\.auth: authentication failed client=127\.0\.0\.1 port=\d+ "
                             r"reason=bad_integrity user=mallory method=allocate transport=udp$", line)
    assert "hunter2" not in server.log_text()
    assert "alice" not in "\n".join(lines)  # the good login is not a failure


def test_failure_lines_are_rate_limited_per_source(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory()
    fail(server, 12)
    time.sleep(0.2)
    server.stop()
    lines = [line for line in server.log_text().splitlines() if "authentication failed" in line]
    assert 5 <= len(lines) <= 7, len(lines)  # a burst of 5, then one per 5 s
    # The counter still counts every one.
    assert "auth_failures.bad_integrity=12" in server.log_text()


def test_the_deploy_guide_shows_the_shipped_filter() -> None:
    shipped = [line for line in FILTER.read_text().splitlines()
               if line.startswith(("failregex", "            ^", "ignoreregex", "journalmatch"))]
    doc = DEPLOY.read_text()
    for line in shipped:
        assert line in doc, line


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban not installed")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_fail2ban_regex_matches_the_real_lines_and_nothing_else(
        server_factory: Callable[..., RunningServer], log_format: str, tmp_path: Path) -> None:
    server = server_factory(log_format=log_format, log_level="debug")
    fail(server, 4)
    fail(server, 1, user="x" * 200)
    # A forged source can send a nonce the server never issued: logged at debug, never matched.
    from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

    forged = Message(Method.ALLOCATE, MessageClass.REQUEST)
    for attr, value in ((Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, "1:victim"),
                        (Attr.REALM, "test.turnd"), (Attr.NONCE, "obMatJos2wAAAnotissuedhere")):
        forged.add(attr, value)
    import socket as _socket

    with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for _ in range(3):
            sock.sendto(encode_message(forged, key=b"k" * 16), server.address("udp"))
            sock.recv(1024)  # the 438
    good = RawTurnClient(server.address("udp"), *server.credentials("alice"))
    assert code(good.allocate()) == 200
    good.close()
    time.sleep(0.3)
    server.stop()
    log = tmp_path / "turnd.log"
    log.write_text(server.log_text())
    filter_copy = tmp_path / "turnd.conf"
    # fail2ban-regex reads a filter file; journalmatch only applies to the journal backend.
    filter_copy.write_text(FILTER.read_text())
    result = subprocess.run(["fail2ban-regex", "--print-all-matched", str(log), str(filter_copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    matched = re.search(r"Lines: \d+ lines, \d+ ignored, (\d+) matched", result.stdout)
    assert matched is not None, result.stdout
    assert int(matched.group(1)) == 5, result.stdout
    assert "127.0.0.1" in result.stdout
    assert "bad_nonce" in server.log_text()  # logged (at debug), but not matched
