"""The pure-Python twin of the compiled data path (turnserver/_datapath.c): same interface.

Used when the extension is missing or ``TURND_PURE_PYTHON=1`` is set (turnserver/accel.py).
Instead of one epoll descriptor and batched system calls it watches each socket with
``loop.add_reader`` and drains it with a bounded ``recvfrom`` loop; it sends each datagram with
``sendto``. What it forwards, and what it leaves to the callbacks, is exactly what the
extension does:

* a client's ChannelData with a route whose expiry is ahead, whose length fits, and for which
  both buckets (the allocation's and the server's) have credit, goes out on the relay socket;
* a peer datagram with a route under the same conditions goes to the client as ChannelData;
* everything else goes to ``on_client(ctx, data, addr, now)``, whose reply (bytes) is sent back
  to the client, or to ``on_peer(relay, data, addr, now)``.

Each route counts the bytes and packets it carried; ``take_counts`` hands them over.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Callable

Address = tuple[str, int]

_RECV_SIZE = 65536
_LISTENER_BATCH = 64
_RELAY_BATCH = 16
_HEADER = struct.Struct("!HH")


def monotonic() -> float:
    import time
    return time.monotonic()


class _Route:
    __slots__ = ("handle", "listener", "client", "number", "relay", "peer", "expires_at", "up",
                 "down", "bytes_up", "packets_up", "bytes_down", "packets_down", "up_key",
                 "down_key", "held")

    def __init__(self, handle: int, listener: socket.socket, client: Address, number: int,
                 relay: socket.socket, peer: Address, expires_at: float, up: Any, down: Any) -> None:
        self.handle = handle
        self.listener = listener
        self.client = client
        self.number = number
        self.relay = relay
        self.peer = peer
        self.expires_at = expires_at
        self.up = up
        self.down = down
        self.bytes_up = self.packets_up = self.bytes_down = self.packets_down = 0
        self.up_key = (listener.fileno(), client, number)
        self.down_key = (relay.fileno(), peer)
        self.held = -1  # offset of the peer port's byte in the shared held-port map, or -1


def _take(own: Any, server: Any, now: float, size: int) -> bool:
    """One packet through the allocation's bucket and the server's; credits unchanged when
    it may not go (the same arithmetic as turnserver/turn/core.py)."""
    own.credit -= size
    if own.credit < 0 and not own.refill(now, size):
        return False
    if server is not None:
        server.credit -= size
        if server.credit < 0 and not server.refill(now, size):
            own.credit += size
            return False
    return True


class DataPlane:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_client: Callable[[Any, bytes, Address, float], bytes | None],
                 on_peer: Callable[[Any, bytes, Address, float], None]) -> None:
        self.loop = loop
        self.on_client = on_client
        self.on_peer = on_peer
        self._listeners: dict[int, tuple[socket.socket, Any]] = {}
        self._relays: dict[int, tuple[socket.socket, Any]] = {}
        self._up: dict[tuple[int, Address, int], _Route] = {}
        self._down: dict[tuple[int, Address], _Route] = {}
        self._routes: dict[int, _Route] = {}
        self._dirty: set[int] = set()
        self._next = 0
        self._started = False
        self.server_up: Any = None
        self.server_down: Any = None
        self.shared: Any = None  # the held-port map of worker processes (set_shared)
        self._stats = dict.fromkeys(("fast_client_to_peer", "fast_peer_to_client", "slow_from_client",
                                     "slow_from_peer", "send_failed", "wakeups"), 0)

    # -- watching sockets ---------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for fd, (sock, ctx) in self._listeners.items():
            self.loop.add_reader(fd, self._listener_readable, sock, ctx)
        for fd, (sock, relay) in self._relays.items():
            self.loop.add_reader(fd, self._relay_readable, sock, relay)

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        for fd in list(self._listeners) + list(self._relays):
            try:
                self.loop.remove_reader(fd)
            except (ValueError, OSError):
                pass

    def run(self) -> None:
        """Nothing to do: each socket has its own reader callback."""

    def add_listener(self, sock: socket.socket, ctx: Any) -> None:
        fd = sock.fileno()
        if fd in self._listeners:
            raise ValueError("listener already added")
        self._listeners[fd] = (sock, ctx)
        if self._started:
            self.loop.add_reader(fd, self._listener_readable, sock, ctx)

    def remove_listener(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._listeners.pop(fd, None) is not None and self._started:
            try:
                self.loop.remove_reader(fd)
            except (ValueError, OSError):
                pass

    def add_relay(self, sock: socket.socket, relay: Any) -> None:
        fd = sock.fileno()
        self._relays[fd] = (sock, relay)
        if self._started:
            self.loop.add_reader(fd, self._relay_readable, sock, relay)

    def remove_relay(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._relays.pop(fd, None) is not None and self._started:
            try:
                self.loop.remove_reader(fd)
            except (ValueError, OSError):
                pass

    # -- routes -------------------------------------------------------------------------

    def set_shared(self, held_map: Any) -> None:
        self.shared = held_map

    def set_server_buckets(self, up: Any, down: Any) -> None:
        self.server_up = up
        self.server_down = down

    def add_route(self, listener: socket.socket, client: Address, number: int, relay: socket.socket,
                  peer: Address, expires_at: float, up: Any, down: Any, held: int = -1) -> int:
        if not 0x4000 <= number <= 0x7FFF:
            raise ValueError("channel number out of range")
        if held >= 0 and (self.shared is None or held >= len(self.shared)):
            raise ValueError("held offset outside the shared map")
        for ip, port in (client, peer):
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
            except (OSError, TypeError):
                raise ValueError(f"not an IP address: {ip}") from None
            if not 0 <= int(port) <= 65535:
                raise ValueError("port out of range")
        self._next += 1
        route = _Route(self._next, listener, (client[0], int(client[1])), number, relay,
                       (peer[0], int(peer[1])), float(expires_at), up, down)
        if route.up_key in self._up or route.down_key in self._down:
            raise ValueError("a route with that key exists")
        route.held = held
        self._up[route.up_key] = route
        self._down[route.down_key] = route
        self._routes[route.handle] = route
        return route.handle

    def set_expiry(self, handle: int, expires_at: float) -> None:
        self._routes[handle].expires_at = float(expires_at)

    def remove_route(self, handle: int) -> tuple[int, int, int, int]:
        route = self._routes.pop(handle)
        del self._up[route.up_key]
        del self._down[route.down_key]
        self._dirty.discard(handle)
        return route.bytes_up, route.packets_up, route.bytes_down, route.packets_down

    def take_counts(self) -> list[tuple[int, int, int, int, int]]:
        out = []
        for handle in self._dirty:
            route = self._routes.get(handle)
            if route is None:
                continue
            out.append((handle, route.bytes_up, route.packets_up, route.bytes_down, route.packets_down))
            route.bytes_up = route.packets_up = route.bytes_down = route.packets_down = 0
        self._dirty.clear()
        return out

    def stats(self) -> dict[str, int]:
        return dict(self._stats, routes=len(self._routes))

    # -- the drains ---------------------------------------------------------------------

    def _listener_readable(self, sock: socket.socket, ctx: Any) -> None:
        recvfrom = sock.recvfrom
        fd = sock.fileno()
        up = self._up
        server = self.server_up
        stats = self._stats
        now = self.loop.time()
        stats["wakeups"] += 1
        for _ in range(_LISTENER_BATCH):
            try:
                data, addr = recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if not data:
                continue
            if len(addr) != 2:
                addr = (addr[0], addr[1])  # IPv6: no flow info or scope
            first = data[0]
            if 0x40 <= first < 0x80 and len(data) >= 4:
                route = up.get((fd, addr, (first << 8) | data[1]))
                if route is not None and now < route.expires_at and (
                        route.held < 0 or self.shared[route.held]):
                    length = (data[2] << 8) | data[3]
                    if len(data) >= 4 + length and _take(route.up, server, now, length):
                        try:
                            route.relay.sendto(data[4:4 + length], route.peer)
                        except OSError:
                            stats["send_failed"] += 1
                            continue
                        route.bytes_up += length
                        route.packets_up += 1
                        stats["fast_client_to_peer"] += 1
                        self._dirty.add(route.handle)
                        continue
            stats["slow_from_client"] += 1
            reply = self.on_client(ctx, data, addr, now)
            if reply:
                try:
                    sock.sendto(reply, addr)
                except OSError:
                    stats["send_failed"] += 1
            if fd not in self._listeners:
                return  # the callback removed this listener

    def _relay_readable(self, sock: socket.socket, relay: Any) -> None:
        recvfrom = sock.recvfrom
        fd = sock.fileno()
        down = self._down
        server = self.server_down
        stats = self._stats
        now = self.loop.time()
        for _ in range(_RELAY_BATCH):
            try:
                data, addr = recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP errors (port unreachable) surface here on Linux
            if len(addr) != 2:
                addr = (addr[0], addr[1])
            route = down.get((fd, addr))
            size = len(data)
            if (route is not None and now < route.expires_at and size + 4 <= 65507
                    and _take(route.down, server, now, size)):
                try:
                    route.listener.sendto(_HEADER.pack(route.number, size) + data, route.client)
                except OSError:
                    stats["send_failed"] += 1
                    continue
                route.bytes_down += size
                route.packets_down += 1
                stats["fast_peer_to_client"] += 1
                self._dirty.add(route.handle)
                continue
            stats["slow_from_peer"] += 1
            self.on_peer(relay, data, addr, now)
