"""SystemdNotifier against real AF_UNIX datagram sockets (sd_notify(3) protocol)."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator

import pytest

from turnserver.io.sdnotify import SystemdNotifier


@pytest.fixture
def short_dir() -> Iterator[str]:
    # sockaddr_un paths are limited to 108 bytes; pytest's tmp_path can be
    # longer than that, so use a short directory of our own.
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as path:
        yield path


@pytest.fixture
def receiver(short_dir: str) -> Iterator[tuple[socket.socket, str]]:
    path = os.path.join(short_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


def _assert_queue_empty(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(2.0)


def test_each_report_is_exactly_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path}, monotonic_us=lambda: 123456789)
    assert notifier.enabled

    cases = [
        (notifier.ready, (), b"READY=1"),
        (notifier.ready, ("listening on 3 sockets",), b"READY=1\nSTATUS=listening on 3 sockets"),
        (notifier.reloading, (), b"RELOADING=1\nMONOTONIC_USEC=123456789"),
        (notifier.stopping, (), b"STOPPING=1"),
        (notifier.stopping, ("draining",), b"STOPPING=1\nSTATUS=draining"),
        (notifier.status, ("12 allocations, draining",), b"STATUS=12 allocations, draining"),
        (notifier.watchdog, (), b"WATCHDOG=1"),
    ]
    for method, args, expected in cases:
        assert method(*args) is True
        assert sock.recv(4096) == expected
    assert notifier.notify("A=1", "B=2") is True
    assert sock.recv(4096) == b"A=1\nB=2"
    _assert_queue_empty(sock)


def test_abstract_namespace_address() -> None:
    name = "turnd-test-" + os.urandom(8).hex()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        assert notifier.watchdog() is True
        assert sock.recv(4096) == b"WATCHDOG=1"
        _assert_queue_empty(sock)
    finally:
        sock.close()


def test_reloading_uses_clock_monotonic_by_default(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_sender_credentials_are_this_process(receiver: tuple[socket.socket, str]) -> None:
    # systemd (NotifyAccess=main) accepts a report only if the kernel-attached
    # SCM_CREDENTIALS name the main PID, so the datagram must come from us.
    sock, path = receiver
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    assert SystemdNotifier({"NOTIFY_SOCKET": path}).watchdog() is True
    ucred = struct.calcsize("3i")
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(ucred))
    assert data == b"WATCHDOG=1"
    creds = [
        struct.unpack("3i", cmsg_data[:ucred])
        for level, kind, cmsg_data in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert creds, "no SCM_CREDENTIALS attached"
    pid, uid, gid = creds[0]
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_status_text_cannot_inject_fields(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.status("bad\nREADY=1") is True
    assert sock.recv(4096) == b"STATUS=bad READY=1"
    assert notifier.ready("a\r\nb") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=a b"


@pytest.mark.parametrize(
    "fields",
    [(), ("READY",), ("READY=1\nSTOPPING=1",), ("READY=1", "STATUS=x\ny")],
)
def test_malformed_fields_are_refused_and_not_sent(
    receiver: tuple[socket.socket, str], fields: tuple[str, ...]
) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.notify(*fields) is False
    _assert_queue_empty(sock)


def test_unencodable_text_returns_false(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    # A lone surrogate that did not come from surrogateescape cannot be UTF-8.
    assert notifier.status("x\ud800y") is False
    _assert_queue_empty(sock)


def test_disabled_without_notify_socket() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "30000000"}):
        notifier = SystemdNotifier(env)
        assert notifier.enabled is False
        assert notifier.ready("up") is False
        assert notifier.reloading() is False
        assert notifier.stopping() is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        assert notifier.notify("READY=1") is False


def test_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "8000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.watchdog_interval_s() == 4.0
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_missing_socket_path_returns_false(short_dir: str) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": os.path.join(short_dir, "absent")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_missing_abstract_socket_returns_false() -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "@turnd-absent-" + os.urandom(8).hex()})
    assert notifier.ready() is False


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unsupported_addresses_return_false(value: str) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert notifier.enabled
    assert notifier.ready() is False


def test_path_that_is_not_a_socket_returns_false(short_dir: str) -> None:
    path = os.path.join(short_dir, "plain-file")
    with open(path, "w", encoding="ascii") as handle:
        handle.write("not a socket")
    assert SystemdNotifier({"NOTIFY_SOCKET": path}).ready() is False


def test_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    # Nobody reads the receiver, so its queue fills; a blocking send would
    # hang here, a non-blocking one reports failure.
    _sock, path = receiver
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    deadline = time.monotonic() + 10.0
    refused = False
    for _ in range(100_000):
        if not notifier.status("x" * 512):
            refused = True
            break
        assert time.monotonic() < deadline
    assert refused, "queue never filled"
    assert time.monotonic() < deadline


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
        ({}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-30000000"}, None),
        ({"WATCHDOG_USEC": "+30000000"}, None),
        ({"WATCHDOG_USEC": " 30000000"}, None),
        ({"WATCHDOG_USEC": "30_000_000"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(env).watchdog_interval_s() == expected
