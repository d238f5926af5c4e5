"""Fixtures for the browser tests: a private network namespace to run Chromium and turnd in.

Chromium ignores the loopback interface: in a namespace with only ``lo`` it gathers no ICE
candidates at all.  One veth interface that is up is enough for it to use a TURN server and
relay candidates on 127.0.0.1, so each test gets its own namespace with ``lo`` and a veth pair
(both ends inside it: nothing reaches the host's network).  Everything the test starts runs in
that namespace, so on teardown ``ip netns pids`` lists exactly the processes to end.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
IP_TIMEOUT_S = 10.0
TEARDOWN_WAIT_S = 5.0
# The namespace's own address; only there so Chromium sees a non-loopback interface.
VETH_ADDRESS = "10.77.0.1/24"

_sequence = itertools.count()


def missing_requirement() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create a network namespace (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    try:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns is not usable: {exc}"
    if probe.returncode != 0:
        return f"ip netns is not usable: {probe.stderr.decode(errors='replace').strip()}"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (Debian package chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package (PyPI) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


@dataclass
class NetNamespace:
    name: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        result = _ip("netns", "pids", self.name, check=False)
        return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def _create(name: str) -> None:
    _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")
    _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    _ip("-n", name, "addr", "add", VETH_ADDRESS, "dev", "v0")
    _ip("-n", name, "link", "set", "v0", "up")
    _ip("-n", name, "link", "set", "v1", "up")


def _destroy(ns: NetNamespace) -> None:
    # Every process in this namespace was started by this test (the runner, turnd, Chromium
    # and its helpers), so ending each by PID ends only our own.
    deadline = time.monotonic() + TEARDOWN_WAIT_S
    pids = ns.pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = ns.pids()
    _ip("netns", "del", ns.name, check=False)


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A fresh network namespace with ``lo`` and one veth interface up; deleted afterwards."""
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    ns = NetNamespace(f"turndtest{os.getpid()}x{next(_sequence)}")
    try:
        _create(ns.name)
    except subprocess.CalledProcessError as exc:
        _ip("netns", "del", ns.name, check=False)
        pytest.fail(f"could not set up network namespace {ns.name}: {exc.stderr.strip()}")
    try:
        yield ns
    finally:
        _destroy(ns)
