"""What a real turnd tells systemd through NOTIFY_SOCKET (sd_notify(3)), received on a
datagram socket this test owns: READY, WATCHDOG, STATUS, RELOADING around SIGHUP, STOPPING."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from turnserver.client import TurnClient
from turnserver.credentials import mint_credentials

from .server import SECRET, RunningServer, start_server

RECV_WAIT_S = 10.0


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # An abstract socket name: no path-length limit, nothing left on disk.
    name = f"@turnd-test-{os.getpid()}-{os.urandom(4).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    try:
        yield sock, name
    finally:
        sock.close()


class Notifications:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[dict[str, str]] = []

    def next_with(self, key: str, value: str | None = None) -> dict[str, str]:
        """The next datagram assigning ``key`` (with ``value``, if given); others are kept."""
        deadline = time.monotonic() + RECV_WAIT_S
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                break
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.seen.append(fields)
            if key in fields and (value is None or fields[key] == value):
                return fields
        raise AssertionError(f"no {key}={value or '*'} within {RECV_WAIT_S} s; got {self.seen}")


def start(tmp_path: Path, name: str, **options: object) -> RunningServer:
    return start_server(tmp_path / "turnd", env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"},
                        **options)


def test_ready_watchdog_status_reload_and_stopping(tmp_path: Path,
                                                   notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    server = start(tmp_path, name)
    notes = Notifications(sock)
    try:
        ready = notes.next_with("READY", "1")
        assert ready["STATUS"] == "0 allocations"
        # The ready file was written first: whoever waits for READY=1 can use the listeners.
        assert server.info["listeners"]
        # WATCHDOG_USEC=400000 asks for a ping at least every 0.2 s.
        started = time.monotonic()
        notes.next_with("WATCHDOG", "1")
        notes.next_with("WATCHDOG", "1")
        assert time.monotonic() - started < 2.0

        async def with_allocation() -> None:
            creds = mint_credentials(SECRET, "alice", 600)
            client = await TurnClient.connect("127.0.0.1", server.port("udp"),
                                              username=creds.username, password=creds.password)
            await client.allocate()
            notes.next_with("STATUS", "1 allocation")

            before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            server.signal(signal.SIGHUP)
            reloading = notes.next_with("RELOADING", "1")
            after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            # The same clock as systemd's, taken when the reload began.
            assert before_us <= int(reloading["MONOTONIC_USEC"]) <= after_us
            again = notes.next_with("READY", "1")
            assert again["STATUS"] == "1 allocation"

            server.signal(signal.SIGTERM)
            stopping = notes.next_with("STOPPING", "1")
            assert stopping["STATUS"] == "draining, 1 allocation left"
            await client.close()

        asyncio.run(asyncio.wait_for(with_allocation(), 30))
        assert server.proc.wait(timeout=10) == 0
    finally:
        server.stop()


def test_a_refused_reload_still_reports_ready(tmp_path: Path,
                                              notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    server = start(tmp_path, name)
    notes = Notifications(sock)
    try:
        notes.next_with("READY", "1")
        server.config_path.write_text(server.config_path.read_text() + "default_lifetime_s = 0\n")
        server.signal(signal.SIGHUP)
        notes.next_with("RELOADING", "1")
        # systemd waits for READY=1 after RELOADING=1 whatever the outcome.
        notes.next_with("READY", "1")
        assert "reload refused" in server.log_text()
        assert server.alive()
    finally:
        assert server.stop() == 0


def test_sigint_reports_stopping(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    server = start(tmp_path, name)
    notes = Notifications(sock)
    try:
        notes.next_with("READY", "1")
        server.signal(signal.SIGINT)
        assert notes.next_with("STOPPING", "1")["STATUS"] == "stopping"
        assert server.proc.wait(timeout=10) == 0
    finally:
        server.stop()
