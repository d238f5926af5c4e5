"""The admin socket: live control for operators (``turnd admin``), on a local Unix socket only.

One request per connection: a JSON object on one line, ``{"command": ..., ...}``; one JSON
object back on one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``. The socket
file is mode 0660 (group ``turnd`` when that group exists), and every connection's peer is
checked with SO_PEERCRED besides: root, this server's own user, or a member of the socket's
group. Nothing is listened for on the network.

Commands (answered by :class:`LocalAdmin` in a single process, and by the parent for all its
workers, io/supervisor.py):

* ``status``: version, uptime, workers, allocations, relayed bit rate, drain state, the
  configuration generation (how many reloads were applied);
* ``sessions`` (``user``, ``client`` CIDR): one record per allocation;
* ``disconnect`` (``user``, ``allocation``, ``client``): end those allocations now;
* ``reload``, ``drain``, ``loglevel`` (``level``, until the next reload).
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import Any, Awaitable, Callable

from .. import __version__

log = logging.getLogger("turnd")

ADMIN_GROUP = "turnd"
MAX_REQUEST_BYTES = 64 * 1024
READ_TIMEOUT_S = 5.0
LOG_LEVELS = ("debug", "info", "warning", "error")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class AdminError(Exception):
    """A request the server cannot carry out: its text goes back to the client."""


def client_filter(cidr: str | None) -> Callable[[str], bool] | None:
    """A predicate on client IPs for ``--client CIDR``; AdminError when it is not one."""
    if cidr is None:
        return None
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise AdminError(f"client: {cidr!r} is not an IP address or CIDR") from None

    def matches(ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in network
        except ValueError:
            return False
    return matches


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def _groups_of(pid: int, gid: int) -> set[int]:
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return groups


def allowed(pid: int, uid: int, gid: int, socket_gid: int | None) -> bool:
    """Root, the server's own user, or a member of the socket's group."""
    if uid == 0 or uid == os.geteuid():
        return True
    return socket_gid is not None and socket_gid in _groups_of(pid, gid)


class AdminServer:
    """Serves ``handler`` on the Unix socket at ``path``."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.socket_gid: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        path = self.path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise OSError(f"admin_socket {path}: exists and is not a socket")
            os.unlink(path)  # left by a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o117)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o660)
            try:
                group = grp.getgrnam(ADMIN_GROUP).gr_gid
            except KeyError:
                group = None
            if group is not None and os.geteuid() == 0:
                os.chown(path, -1, group)
            self.socket_gid = os.stat(path).st_gid
            sock.listen(16)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"admin_socket {path}: {exc.strerror or exc}") from None
        self._server = await asyncio.start_unix_server(self._accept, sock=sock,
                                                       limit=MAX_REQUEST_BYTES)
        log.info("admin socket %s", path)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= 16:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, gid = peer_credentials(sock)
            if not allowed(pid, uid, gid, self.socket_gid):
                log.warning("admin socket: refused a request from uid %d (pid %d): not root, "
                            "this server's user or group %s", uid, pid, ADMIN_GROUP)
                # Its request is read (and ignored) first: a socket closed with unread data
                # resets the connection, and the answer could be lost with it.
                try:
                    await asyncio.wait_for(reader.readline(), 1.0)
                except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError,
                        asyncio.TimeoutError):
                    pass
                await self._answer(writer, {"ok": False, "error": "permission denied: root, the "
                                            f"server's user or group {ADMIN_GROUP} only"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ValueError("not a request object")
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError,
                    asyncio.TimeoutError, UnicodeDecodeError):
                await self._answer(writer, {"ok": False, "error": "malformed request: one JSON "
                                            "object with a \"command\" on one line"})
                return
            try:
                answer = await self.handler(request)
                answer = {"ok": True, **answer}
            except AdminError as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception:
                log.exception("admin request %r failed", request.get("command"))
                answer = {"ok": False, "error": "internal error (see the server's log)"}
            if answer.get("ok"):
                log.info("admin: %s by uid %d", request["command"], uid)
            await self._answer(writer, answer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        await writer.drain()


class RateMeter:
    """Relayed bits per second between two status requests (from the relayed-bytes counters)."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def rate(self, total_bytes: int) -> float:
        now = time.monotonic()
        last, self._last = self._last, (now, total_bytes)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, (total_bytes - last[1]) * 8 / (now - last[0]))


def relayed_bytes(snapshot: Any) -> int:
    """Application bytes relayed in both directions, from a ServerSnapshot."""
    return sum(int(v) for v in snapshot.relayed_bytes.values())


class LocalAdmin:
    """The commands, for one process (or one worker, asked by its parent)."""

    def __init__(self, server: Any, daemon: Any) -> None:
        self.server = server
        self.daemon = daemon
        self.started = time.time()
        self.meter = RateMeter()

    def now(self) -> float:
        assert self.server.loop is not None
        return self.server.loop.time()

    def status_part(self) -> dict[str, Any]:
        core = self.server.core
        from .snapshot import take_snapshot

        snap = take_snapshot(self.server)
        return {"allocations": len(core.allocations) if core is not None else 0,
                "relayed_bytes": relayed_bytes(snap),
                "draining": bool(getattr(core, "draining", False))}

    def sessions_part(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        core = self.server.core
        if core is None:
            return []
        return core.sessions(self.now(), user=request.get("user"),
                             client=client_filter(request.get("client")))

    def disconnect_part(self, request: dict[str, Any]) -> int:
        core = self.server.core
        if core is None:
            return 0
        return core.disconnect(self.now(), user=request.get("user"),
                               allocation_id=request.get("allocation"),
                               client=client_filter(request.get("client")))

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["command"]
        if command == "status":
            part = self.status_part()
            return {"version": __version__, "uptime_s": round(time.time() - self.started, 1),
                    "workers": 1, "workers_answering": 1, "allocations": part["allocations"],
                    "relayed_bit_rate": round(self.meter.rate(part["relayed_bytes"])),
                    "draining": part["draining"], "generation": self.daemon.generation}
        if command == "sessions":
            sessions = self.sessions_part(request)
            return {"sessions": sessions, "workers_missing": []}
        if command == "disconnect":
            check_disconnect(request)
            return {"disconnected": self.disconnect_part(request), "workers_missing": []}
        if command == "reload":
            applied = await self.daemon.reload()
            return {"applied": bool(applied), "generation": self.daemon.generation}
        if command == "drain":
            self.daemon.request_drain()
            return {"draining": True}
        if command == "loglevel":
            return {"level": set_log_level(request.get("level"))}
        raise AdminError(f"unknown command {command!r}: status, sessions, disconnect, reload, "
                         "drain or loglevel")


def check_disconnect(request: dict[str, Any]) -> None:
    if not any(request.get(k) for k in ("user", "allocation", "client")):
        raise AdminError("disconnect needs --user, --allocation or --client")
    client_filter(request.get("client"))


def set_log_level(level: Any) -> str:
    if level not in LOG_LEVELS:
        raise AdminError(f"level must be one of {', '.join(LOG_LEVELS)}")
    logging.getLogger().setLevel(getattr(logging, str(level).upper()))
    log.warning("admin: log level set to %s until the next reload", level)
    return str(level)
