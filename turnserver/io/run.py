"""Process runner: event loop choice (uvloop), signals, the ready file."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from ..config import Config
from .server import TurnServer, write_ready_file

log = logging.getLogger("turnd")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        log.warning("uvloop is not available; using the stdlib event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(config: Config, *, secrets: list[bytes], static_users: dict[str, Any],
                ready_file: str | None) -> int:
    server = TurnServer(config, secrets=secrets, static_users=static_users)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file:
        write_ready_file(ready_file, server.ready_info())
    await stop.wait()
    log.info("stopping")
    await server.stop()
    return 0


def run_server(config: Config, *, secrets: list[bytes], static_users: dict[str, Any],
               ready_file: str | None = None) -> int:
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(
            serve(config, secrets=secrets, static_users=static_users, ready_file=ready_file)
        )
    finally:
        loop.close()
