"""turnd admin against a real server: the commands through the real CLI, with real clients
(raw TURN clients, aioice, turnutils_uclient for many sessions), in one process and with two
workers; an unprivileged user is refused; a malformed request gets an error and the server
keeps serving."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from turnserver.stun import Attr, Method

from .raw_client import RawTurnClient, code
from .server import RunningServer
from .test_soak import wait_until


def socket_of(server: RunningServer) -> str:
    return str(server.options["admin_socket"])


def admin(server: RunningServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real CLI."""
    command = [sys.executable, "-m", "turnserver", "admin", "--socket", socket_of(server), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check:
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


def as_nobody(path: Path, request: dict[str, Any]) -> str:
    """One request to the admin socket from a child process running as the user nobody: the
    answer line, or the name of the error connect() raised."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os and socket
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(str(path))
                sock.sendall(json.dumps(request).encode() + b"\n")
                out = sock.makefile("rb").readline()
            except OSError as exc:
                out = type(exc).__name__.encode()
            os.write(write_end, out)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode().strip()


def admin_json(server: RunningServer, *args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "turnserver", "admin", "--json", "--socket",
                             socket_of(server), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def start(server_factory, tmp_path: Path, **extra: Any) -> RunningServer:
    path = tmp_path / f"admin-{os.urandom(3).hex()}.sock"
    return server_factory(admin_socket=str(path), log_format="json", metrics_listen="127.0.0.1:0",
                          **extra)


def allocated(server: RunningServer, user: str) -> RawTurnClient:
    client = RawTurnClient(server.address("udp"), *server.credentials(user))
    assert code(client.allocate()) == 200
    return client


@pytest.mark.parametrize("workers", [1, 2])
def test_sessions_and_disconnect_a_user_whose_next_refresh_gets_437(server_factory, tmp_path,
                                                                    workers: int) -> None:
    server = start(server_factory, tmp_path, workers=workers,
                   relay_port_min=56800, relay_port_max=56863)
    leaked = [allocated(server, "leaked") for _ in range(4)]
    other = allocated(server, "other")
    try:
        status = admin_json(server, "status")
        assert status["ok"] and status["workers"] == workers and status["allocations"] == 5
        assert status["workers_answering"] == workers and status["draining"] is False
        listing = admin_json(server, "sessions")["sessions"]
        assert len(listing) == 5
        mine = [s for s in listing if s["user"].endswith(":leaked")]
        assert len(mine) == 4 and len({s["id"] for s in listing}) == 5
        ports = {c.sock.getsockname()[1] for c in leaked}
        assert {int(s["client"].rsplit(":", 1)[1]) for s in mine} == ports
        if workers == 2:
            assert {s["worker"] for s in listing} <= {0, 1}
        assert len(admin_json(server, "sessions", "--user", "leaked")["sessions"]) == 4
        assert len(admin_json(server, "sessions", "--client", "127.0.0.0/8")["sessions"]) == 5
        assert admin_json(server, "sessions", "--client", "10.0.0.0/8")["sessions"] == []
        # The people's table too.
        table = admin(server, "sessions", "--user", "leaked").stdout
        assert "4 allocations" in table and "USER" in table

        result = admin(server, "disconnect", "--user", "leaked")
        assert "disconnected 4 allocations" in result.stdout
        for client in leaked:
            assert code(client.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 437
        assert code(other.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 200
        one = admin_json(server, "sessions")["sessions"]
        assert len(one) == 1
        assert admin_json(server, "disconnect", "--allocation", one[0]["id"])["disconnected"] == 1
        assert code(other.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 437
    finally:
        for client in leaked + [other]:
            client.close()
    server.stop()
    records = [json.loads(line)["usage"] for line in server.log_text().splitlines()
               if '"allocation ended"' in line]
    assert [r["reason"] for r in records].count("disconnected") == 5


def test_many_uclient_sessions_are_listed_while_they_run(server_factory, tmp_path) -> None:
    if shutil.which("turnutils_uclient") is None:
        pytest.fail("turnutils_uclient is needed (Debian package coturn)")
    server = start(server_factory, tmp_path, allowed_peers=["127.0.0.1/32"],
                   legacy_channel_numbers=True)
    username, password = server.credentials("uclient")
    proc = subprocess.Popen(
        ["turnutils_uclient", "-y", "-c", "-m", "10", "-n", "3000", "-z", "1", "-l", "100",
         "-u", username, "-w", password, "-r", str(server.port("udp")), "-p",
         str(server.port("udp")), "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listed() -> bool:
            return len(admin_json(server, "sessions", "--user", "uclient")["sessions"]) >= 10
        assert wait_until(listed, 20.0, 0.5)
        sessions = admin_json(server, "sessions", "--user", "uclient")["sessions"]
        assert all(s["user"] == username for s in sessions)
        assert all(s["channels"] >= 1 for s in sessions if s["packets_to_peer"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_an_unprivileged_user_is_refused_and_a_malformed_request_changes_nothing(
        server_factory, tmp_path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    # A directory nobody may pass through (pytest's own is 0700), so only the socket's own
    # mode and the server's check stand in the way.
    import tempfile
    directory = Path(tempfile.mkdtemp(prefix="turnd-admin-"))
    directory.chmod(0o711)
    server = server_factory(admin_socket=str(directory / "admin.sock"), log_format="json")
    path = Path(socket_of(server))
    assert (path.stat().st_mode & 0o777) == 0o660
    client = allocated(server, "kept")
    try:
        # The file's mode keeps nobody out first; with it opened up, SO_PEERCRED still does.
        assert "PermissionError" in as_nobody(path, {"command": "status"})
        os.chmod(path, 0o666)
        answer = json.loads(as_nobody(path, {"command": "disconnect", "user": "kept"}))
        assert answer["ok"] is False and "permission denied" in answer["error"]
        assert "refused a request from uid" in server.log_text()
        for garbage in (b"not json\n", b"[1, 2]\n", b'{"command": 5}\n', b"\xff" * 70000 + b"\n"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(garbage)
            answer = json.loads(sock.makefile("rb").readline())
            sock.close()
            assert answer["ok"] is False and "malformed" in answer["error"]
        unknown = admin(server, "--json", "loglevel", "info")
        assert json.loads(unknown.stdout)["level"] == "info"
        assert code(client.request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 200
        assert admin_json(server, "status")["allocations"] == 1
    finally:
        client.close()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_reload_drain_and_loglevel(server_factory, tmp_path) -> None:
    server = start(server_factory, tmp_path, workers=2, relay_port_min=56900, relay_port_max=56963,
                   drain_timeout_s=30)
    client = allocated(server, "stays")
    try:
        assert admin_json(server, "status")["generation"] == 0
        reload = admin_json(server, "reload")
        assert reload["applied"] is True and reload["generation"] == 1
        assert admin_json(server, "status")["generation"] == 1
        level = admin_json(server, "loglevel", "debug")
        assert level["level"] == "debug" and level["workers_missing"] == []
        assert admin_json(server, "drain")["draining"] is True
        assert wait_until(lambda: admin_json(server, "status")["draining"], 5.0)
        fresh = RawTurnClient(server.address("udp"), *server.credentials("late"))
        assert code(fresh.allocate()) == 508
        fresh.close()
        assert code(client.request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        assert server.proc.wait(timeout=15) == 0
    finally:
        client.close()


def test_without_a_usable_path_the_server_serves_and_says_so(server_factory, tmp_path) -> None:
    server = server_factory(admin_socket=str(tmp_path / "missing" / "dir" / "admin.sock"))
    assert "turnd admin is not available" in server.log_text()
    client = allocated(server, "fine")
    client.close()
    missing = subprocess.run([sys.executable, "-m", "turnserver", "admin", "--socket",
                              str(tmp_path / "missing" / "dir" / "admin.sock"), "status"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "is turnd running" in missing.stderr


def test_aioice_sessions_over_udp_and_tcp_are_listed_and_disconnected(server_factory, tmp_path) -> None:
    """An independent client: aioice's allocations (UDP and TCP) show in sessions; after a
    disconnect its own Refresh fails with 437, which makes aioice close the allocation."""
    import asyncio

    import aioice.stun
    import aioice.turn

    server = start(server_factory, tmp_path, listen_tcp=["127.0.0.1:0"])
    username, password = server.credentials("aioice")

    async def main() -> None:
        endpoints = [await aioice.turn.create_turn_endpoint(
            asyncio.DatagramProtocol, ("127.0.0.1", server.port(transport)), username, password,
            lifetime=600, transport=transport) for transport in ("udp", "tcp")]
        try:
            listing = await asyncio.to_thread(admin_json, server, "sessions", "--user", "aioice")
            assert sorted(s["transport"] for s in listing["sessions"]) == ["tcp", "udp"]
            relayed = {f"{t.get_extra_info('sockname')[0]}:{t.get_extra_info('sockname')[1]}"
                       for t, _ in endpoints}
            assert {r for s in listing["sessions"] for r in s["relayed"]} == relayed
            result = await asyncio.to_thread(admin, server, "disconnect", "--user", username)
            assert "disconnected 2 allocations" in result.stdout
            for transport, _ in endpoints:
                protocol = transport._TurnTransport__inner_protocol  # aioice's own TURN client
                request = aioice.stun.Message(message_method=aioice.stun.Method.REFRESH,
                                              message_class=aioice.stun.Class.REQUEST)
                request.attributes["LIFETIME"] = 600
                with pytest.raises(aioice.stun.TransactionFailed) as failed:
                    await protocol.request_with_retry(request)
                assert failed.value.response.attributes["ERROR-CODE"][0] == 437
        finally:
            for transport, _ in endpoints:
                transport.close()

    asyncio.run(asyncio.wait_for(main(), 30))
