"""One worker process: a TurnServer on sockets its parent made (io/supervisor.py).

Started as ``python -m turnserver.io.worker CONTROL_FD``. The first line on the control socket
is the start message: the configuration, the credentials, the nonce key, the inherited
listening sockets, the relay port slice and the shared memory. Then the worker serves, and
answers on the same socket:

* ``hello`` with ``ready`` once it serves;
* ``snapshot`` with its metrics snapshot (turnserver/snapshot.py);
* ``reload`` (a configuration the parent has checked) with ``reloaded`` and what was applied;
* ``drain`` and ``stop`` as SIGTERM and SIGINT do in a single process.

If the parent goes away (the control socket closes), the worker stops. Signals sent to a
worker directly keep their meaning (SIGTERM drains it, SIGINT stops it); SIGHUP is the
parent's to handle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from ..logs import setup_logging
from .admin import AdminError, LocalAdmin, set_log_level
from .run import Daemon, new_event_loop
from .server import TurnServer, WorkerSetup
from .shared import HeldPorts, SharedLedger, SharedMemory
from .snapshot import take_snapshot
from .supervisor import config_from_json, encode_line, users_from_json

log = logging.getLogger("turnd")


class WorkerDaemon(Daemon):
    """A Daemon whose reloads come from the parent, never from SIGHUP."""

    def __init__(self, server: TurnServer, index: int, channel: socket.socket, early: bytes) -> None:
        super().__init__(server, handle_hup=False)
        self.index = index
        self.channel = channel
        self.early = early  # what came after the start message in the same read
        self.writer: asyncio.StreamWriter | None = None

    def post(self, message: dict[str, Any]) -> None:
        if self.writer is not None:
            try:
                self.writer.write(encode_line(message))
            except (ConnectionError, OSError, RuntimeError):
                pass

    async def control(self) -> None:
        reader, self.writer = await asyncio.open_connection(sock=self.channel, limit=64 * 1024 * 1024)
        if self.early:
            reader.feed_data(self.early)  # ahead of anything read from the socket since
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                kind = message.get("type")
                if kind == "hello":
                    self.post({"type": "ready", "pid": os.getpid()})
                elif kind == "snapshot":
                    snap = take_snapshot(self.server, worker=self.index)
                    self.post({"type": "snapshot", "snapshot": snap.to_dict()})
                elif kind == "reload":
                    self.post(self.apply(message))
                elif kind == "admin":
                    self.post({"type": "admin-answer", **self.admin_part(message)})
                elif kind == "drain":
                    if not self.draining:
                        self.request_drain()
                elif kind == "stop":
                    self.request_stop()
        except (ConnectionError, OSError):
            pass
        log.info("the parent process is gone: stopping")
        self.request_stop()

    def drained(self) -> None:
        """Its allocations are gone (or drain_timeout_s passed): the parent decides when all
        workers stop, so until then new clients that land here still get their 508."""
        if self.writer is None:
            self._stop.set()
            return
        self.post({"type": "drained", "allocations": self.allocation_count()})

    def admin_part(self, message: dict[str, Any]) -> dict[str, Any]:
        """This worker's share of a turnd admin command (the parent adds them up)."""
        request = message.get("request", {})
        admin = LocalAdmin(self.server, self)
        try:
            command = request.get("command")
            if command == "sessions":
                sessions = admin.sessions_part(request)
                for record in sessions:
                    record["worker"] = self.index
                return {"sessions": sessions}
            if command == "disconnect":
                return {"disconnected": admin.disconnect_part(request)}
            if command == "status":
                return admin.status_part()
            if command == "loglevel":
                return {"level": set_log_level(request.get("level"))}
        except AdminError as exc:
            return {"error": str(exc)}
        return {"error": f"unknown command {request.get('command')!r}"}

    def apply(self, message: dict[str, Any]) -> dict[str, Any]:
        config = config_from_json(message["config"])
        secrets = [bytes.fromhex(s) for s in message["secrets"]]
        users = users_from_json(message["static_users"])
        old = self.server.config
        try:
            report = self.server.reload(config, secrets, users)
        except Exception as exc:
            log.exception("reload failed; keeping the previous configuration")
            return {"type": "reloaded", "ok": False, "error": str(exc)}
        new = self.server.config
        if (new.log_level, new.log_format) != (old.log_level, old.log_format):
            setup_logging(new.log_level, new.log_format)
        return {"type": "reloaded", "ok": True, "applied": report.applied,
                "needs_restart": report.needs_restart, "tls_reloaded": report.tls_reloaded}


async def serve_worker(start: dict[str, Any], channel: socket.socket, early: bytes = b"") -> int:
    index = int(start["index"])
    config = config_from_json(start["config"])
    shared = start["shared"]
    memory = SharedMemory(int(shared["fd"]), int(shared["workers"]), int(shared["slots"]),
                          int(shared["addresses"]))
    nonce_key = bytes.fromhex(start["nonce_key"])
    listen_sockets = [(transport, socket.socket(fileno=int(fd))) for transport, fd in start["listeners"]]
    for _, sock in listen_sockets:
        sock.setblocking(False)
    setup = WorkerSetup(
        index=index, listen_sockets=listen_sockets,
        relay_port_slice=(int(start["slice"][0]), int(start["slice"][1])), nonce_key=nonce_key,
        quotas=SharedLedger(memory, index, nonce_key),
        held_ports=HeldPorts(memory, list(start["relay_addresses"])),
        parent_listening=[(h, int(p)) for h, p in start["parent_listening"]],
        self_signed=(tuple(p.encode("ascii") for p in start["self_signed"])  # type: ignore[arg-type]
                     if start.get("self_signed") else None),
        handoff=(socket.socket(fileno=int(start["handoff"]))
                 if start.get("handoff") is not None else None),
        count=int(start.get("count", 1)),
    )
    server = TurnServer(config, secrets=[bytes.fromhex(s) for s in start["secrets"]],
                        static_users=users_from_json(start["static_users"]), worker=setup)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot start: %s", exc.strerror or exc)
        return 1
    assert server.core is not None
    server.core.id_prefix = f"w{index}-"  # allocation ids unique over the workers
    daemon = WorkerDaemon(server, index, channel, early)
    control = asyncio.get_running_loop().create_task(daemon.control())
    try:
        return await daemon.run()
    finally:
        control.cancel()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    channel = socket.socket(fileno=int(args[0]))
    channel.setblocking(True)
    line = b""
    while not line.endswith(b"\n"):
        chunk = channel.recv(1 << 20)
        if not chunk:
            return 1
        line += chunk
    first, _, rest = line.partition(b"\n")
    start = json.loads(first)
    config = config_from_json(start["config"])
    setup_logging(config.log_level, config.log_format, worker=int(start["index"]))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel.setblocking(False)
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(serve_worker(start, channel, rest))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
