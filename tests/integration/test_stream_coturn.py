"""coturn's turnutils_uclient over TCP (-t) and TLS (-t -S) against our server, allocation to
allocation. It exits 0 even at 100 % loss, so it is judged by its summary lines."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .coturn_tools import assert_clean, needs_coturn, uclient
from .server import RunningServer, start_server
from .test_stream_support import STREAM_OPTIONS

pytestmark = needs_coturn


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # turnutils_uclient picks channel numbers from RFC 5766's 0x4000-0x7FFF.
    srv = start_server(Path(tmp_path_factory.mktemp("stream-coturn")), legacy_channel_numbers=True,
                       **STREAM_OPTIONS)
    yield srv
    srv.stop()


def stream_uclient(server: RunningServer, port: int, *args: str) -> dict[str, int]:
    # -z 100: at its default 20 ms interval over TLS it reports a few losses even against
    # coturn itself (its own pacing, not the server).
    return uclient(server.secret, port, "-y", "-c", *args, "-z", "100", user="streamclient")


def test_uclient_over_tcp(server: RunningServer) -> None:
    assert_clean(stream_uclient(server, server.port("tcp"), "-t"))


def test_uclient_over_tls(server: RunningServer) -> None:
    assert_clean(stream_uclient(server, server.port("tls"), "-t", "-S"))

