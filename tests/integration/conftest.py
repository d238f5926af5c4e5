from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .server import RunningServer, start_server


@pytest.fixture
def turn_server(tmp_path: Path) -> Iterator[RunningServer]:
    """A real turnd on 127.0.0.1 (UDP), relaying on 127.0.0.1, default policy."""
    server = start_server(tmp_path / "turnd")
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start servers with custom options; all are stopped at the end of the test."""
    started: list[RunningServer] = []
    counter = iter(range(1000))

    def factory(**options) -> RunningServer:
        server = start_server(tmp_path / f"turnd{next(counter)}", **options)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
