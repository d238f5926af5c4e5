"""Relay sockets: the UDP ports allocations relay through (RFC 8656 §2.2, §7.2).

Each relay is a plain non-blocking socket watched with ``loop.add_reader`` and drained in a
bounded loop: measured here, that (or uvloop) moves several times what stdlib asyncio's
datagram endpoints do on this path. Each datagram goes to ``on_datagram``, which the server
sets to the data path's ``peer_datagram`` (io/dispatch.py).
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
from typing import Callable

from ..config import format_hostport
from ..turn.allocation import Address, family_of

_RECV_SIZE = 65536
# Datagrams handled per readiness callback before yielding to other sockets.
_DRAIN_BATCH = 64
_BIND_ATTEMPTS = 128


class UdpRelay:
    """One bound relay socket. Hashable by identity: the core keys allocations by it."""

    __slots__ = ("sock", "address", "__weakref__")

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self.sock = sock
        self.address = address

    def sendto(self, data: bytes, peer: Address) -> bool:
        try:
            self.sock.sendto(data, peer)
            return True
        except OSError:
            # A full send buffer or an ICMP error reported on the socket: media, so drop.
            return False

    def __repr__(self) -> str:
        return f"UdpRelay({format_hostport(*self.address)})"


class RelayPortPool:
    """Implements the core's ``RelayPorts``: binds relay sockets inside the port range."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        relay_addresses: list[str],
        port_range: tuple[int, int],
        on_datagram: Callable[[UdpRelay, bytes, Address, float], None],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.loop = loop
        self.port_min, self.port_max = port_range
        self.on_datagram = on_datagram
        self.rng = rng or random.SystemRandom()
        self._addresses: dict[int, list[str]] = {1: [], 2: []}
        for ip in relay_addresses:
            self._addresses[family_of(ip)].append(ip)
        self._in_use: dict[str, set[int]] = {ip: set() for ip in relay_addresses}
        self.open_count = 0
        self.bind_failures = 0

    # -- RelayPorts protocol -------------------------------------------------

    def families(self) -> set[int]:
        return {family for family, ips in self._addresses.items() if ips}

    def supports_dont_fragment(self) -> bool:
        return hasattr(socket, "IP_MTU_DISCOVER") and hasattr(socket, "IP_PMTUDISC_DO")

    def holds(self, ip: str, port: int) -> bool:
        """Whether a relay socket (an allocation's or a reservation's) is bound on ip:port now."""
        used = self._in_use.get(ip)
        return used is not None and port in used

    def capacity(self) -> int:
        """Ports in the range times relay addresses: what allocations can ever get."""
        return (self.port_max - self.port_min + 1) * sum(len(v) for v in self._addresses.values())

    def allocate(
        self, family: int, *, even_port: bool = False, reserve_next: bool = False,
        dont_fragment: bool = False,
    ) -> tuple[UdpRelay, UdpRelay | None] | None:
        ips = self._addresses.get(family) or []
        if not ips:
            return None
        ip = ips[0] if len(ips) == 1 else self.rng.choice(ips)
        used = self._in_use[ip]
        for _ in range(_BIND_ATTEMPTS):
            port = self.rng.randint(self.port_min, self.port_max)
            if even_port:
                port &= ~1
                if port < self.port_min or (reserve_next and port + 1 > self.port_max):
                    continue
            if port in used or (reserve_next and port + 1 in used):
                continue
            try:
                relay = self._bind(ip, port, dont_fragment)
                if relay is None:
                    continue
                reserved = None
                if reserve_next:
                    try:
                        reserved = self._bind(ip, port + 1, dont_fragment)
                    finally:
                        if reserved is None:
                            self.release(relay)
                    if reserved is None:
                        continue
            except OSError:
                # Out of descriptors or buffers, an address gone: no relay now (508), and
                # nothing half-bound is left behind.
                break
            return relay, reserved
        self.bind_failures += 1
        return None

    def release(self, endpoint: UdpRelay) -> None:  # type: ignore[override]
        sock = endpoint.sock
        if sock.fileno() < 0:
            return
        try:
            self.loop.remove_reader(sock.fileno())
        except (ValueError, OSError):
            pass
        self._in_use[endpoint.address[0]].discard(endpoint.address[1])
        sock.close()
        self.open_count -= 1

    # -- internals -----------------------------------------------------------

    def _bind(self, ip: str, port: int, dont_fragment: bool) -> UdpRelay | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if dont_fragment:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MTU_DISCOVER, socket.IP_PMTUDISC_DO)
                elif hasattr(socket, "IPV6_DONTFRAG"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DONTFRAG, 1)
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None  # taken by another program: try another port
            raise
        relay = UdpRelay(sock, (ip, port))
        self._in_use[ip].add(port)
        self.open_count += 1
        self.loop.add_reader(sock.fileno(), self._readable, relay)
        return relay

    def _readable(self, relay: UdpRelay) -> None:
        recvfrom = relay.sock.recvfrom
        on_datagram = self.on_datagram
        now = self.loop.time()
        for _ in range(_DRAIN_BATCH):
            try:
                data, addr = recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP errors (port unreachable) surface here on Linux; nothing to do.
                continue
            on_datagram(relay, data, addr if len(addr) == 2 else (addr[0], addr[1]), now)


def detect_relay_addresses() -> list[str]:
    """The host's primary IPv4 (and IPv6, when routed) address, for the embedded defaults.

    A UDP ``connect`` only asks the kernel for a route; no packet is sent.
    """
    found = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect((probe, 9))
            ip = sock.getsockname()[0]
            if ip not in ("0.0.0.0", "::"):
                found.append(ip)
        except OSError:
            pass
        finally:
            sock.close()
    return found or ["127.0.0.1"]
