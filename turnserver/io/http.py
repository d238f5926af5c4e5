"""The operators' HTTP endpoint: ``/metrics`` and ``/health`` on the running event loop.

A tiny HTTP/1.1 responder, independent of what it serves: ``/metrics`` is whatever a
prometheus_client registry collects (turnserver/metrics.py builds one from a snapshot source),
``/health`` whatever a verdict callable says. So the same endpoint serves one process's own
counters or a parent's sum of its workers'.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest

from ..config import format_hostport, parse_hostport

log = logging.getLogger("turnd")

# Text format 0.0.4: what every Prometheus and promtool version reads (the client library's
# "latest" may announce a newer format that older scrapers reject).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_MAX_HEAD_BYTES = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsEndpoint:
    """A minimal HTTP/1.1 responder for ``/metrics`` and ``/health`` on the running loop.

    One request per connection (``Connection: close``): Prometheus and probes open few
    connections, and it keeps the parser small. Heads are bounded in size and time, and so is
    the number of connections served at once, so a misbehaving client costs little.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], tuple[int, str]],
        *,
        max_connections: int = 32,
        read_timeout_s: float = 5.0,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.health = health
        # Awaited before each answer (a parent asks its workers for fresh snapshots).
        self.refresh = refresh
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, port, limit=_MAX_HEAD_BYTES)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        except (asyncio.TimeoutError, OSError):
            pass

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
            except asyncio.TimeoutError:
                await self._respond(writer, "GET", 408, b"timeout\n")
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                await self._respond(writer, "GET", 400, b"bad request\n")
                return
            if self.refresh is not None:
                try:
                    await self.refresh()
                except Exception:
                    log.exception("refreshing the metrics failed; serving the last ones")
            method, status, body, content_type, extra = self.route(head)
            await self._respond(writer, method, status, body, content_type, extra)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # the endpoint must outlive any one request
            log.exception("metrics endpoint request failed")
        finally:
            writer.close()

    def route(self, head: bytes) -> tuple[str, int, bytes, str, dict[str, str]]:
        """(method, status, body, content type, extra headers) for one request head."""
        plain = "text/plain; charset=utf-8"
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = request_line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return "GET", 400, b"bad request\n", plain, {}
        if not version.startswith("HTTP/1."):
            return "GET", 400, b"bad request\n", plain, {}
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/health", "/healthz"):
            return method, 404, b"not found: try /metrics or /health\n", plain, {}
        if method not in ("GET", "HEAD"):
            return method, 405, b"method not allowed\n", plain, {"Allow": "GET, HEAD"}
        if path == "/metrics":
            try:
                body = generate_latest(self.registry)
            except Exception:
                log.exception("collecting metrics failed")
                return method, 500, b"collecting metrics failed\n", plain, {}
            return method, 200, body, METRICS_CONTENT_TYPE, {}
        status, text = self.health()
        return method, status, f"{text}\n".encode(), plain, {"Cache-Control": "no-store"}

    async def _respond(self, writer: asyncio.StreamWriter, method: str, status: int, body: bytes,
                       content_type: str = "text/plain; charset=utf-8",
                       extra: dict[str, str] | None = None) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines.extend(f"{k}: {v}" for k, v in (extra or {}).items())
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()


async def start_endpoint(
    spec: str, registry: CollectorRegistry, health: Callable[[], tuple[int, str]],
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> MetricsEndpoint:
    """An endpoint serving ``registry`` and ``health``, bound to ``spec`` (``metrics_listen``'s
    "IP:PORT"). A bind error is named like the listeners' errors, with the option to change."""
    host, port = parse_hostport(spec, "metrics_listen")
    endpoint = MetricsEndpoint(registry, health, refresh=refresh)
    try:
        address = await endpoint.start(host, port)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"metrics_listen {format_hostport(host, port)}: {reason}") from None
    log.info("metrics on http://%s/metrics, health on /health", format_hostport(*address))
    return endpoint
