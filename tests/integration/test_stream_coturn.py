"""coturn's turnutils_uclient over TCP (-t) and TLS (-t -S) against our server, allocation to
allocation. It exits 0 even at 100 % loss, so it is judged by its summary lines."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .server import RunningServer, start_server
from .test_stream_support import STREAM_OPTIONS

pytestmark = [
    pytest.mark.coturn,
    pytest.mark.skipif(shutil.which("turnutils_uclient") is None, reason="coturn's turnutils_* tools are not installed"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # turnutils_uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF.
    srv = start_server(Path(tmp_path_factory.mktemp("stream-coturn")), legacy_channel_numbers=True,
                       **STREAM_OPTIONS)
    yield srv
    srv.stop()


def uclient(server: RunningServer, port: int, *args: str) -> dict[str, int]:
    # -z 100: at its default 20 ms interval over TLS it reports a few losses even against
    # coturn itself (its own pacing, not the server).
    cmd = ["turnutils_uclient", "-y", "-c", "-n", "20", "-l", "120", "-W", server.secret, "-u", "streamclient",
           "-p", str(port), *args, "-z", "100", "127.0.0.1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", out)
    lost = re.search(r"Total lost packets (\d+)", out)
    assert totals and lost, f"no summary (exit {result.returncode}):\n{out[-2000:]}"
    sent, received = (int(x) for x in totals[-1])
    return {"sent": sent, "received": received, "lost": int(lost.group(1)), "exit": result.returncode}


def assert_clean(summary: dict[str, int]) -> None:
    assert summary["exit"] == 0, summary
    assert summary["sent"] > 0 and summary["sent"] == summary["received"], summary
    assert summary["lost"] == 0, summary


def test_uclient_over_tcp(server: RunningServer) -> None:
    assert_clean(uclient(server, server.port("tcp"), "-t"))


def test_uclient_over_tls(server: RunningServer) -> None:
    assert_clean(uclient(server, server.port("tls"), "-t", "-S"))

