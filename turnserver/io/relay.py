"""Relay sockets: the UDP ports allocations relay through (RFC 8656 §2.2, §7.2).

Each relay is a plain non-blocking socket handed to the data plane (io/datapath.py), which
watches and drains it: a datagram on a bound channel of a UDP client goes straight to the
client, any other goes to the data path's ``peer_datagram`` (io/dispatch.py).

A TCP allocation (RFC 6062) gets a :class:`TcpRelay`: a listening TCP socket on the relayed
address, and a UDP socket bound on the same port that nobody reads. That UDP socket holds the
port as every relay port is held (the worker processes' shared map, the peer policy's
own-port check), so one port number is one allocation's, whatever its transport. The
listener and the connections made from its address (io/tcp_relay.py) set SO_REUSEPORT, as
RFC 6062 §5.2 has the relayed address be the local end of every peer connection.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
from typing import Any

from ..config import format_hostport
from ..turn.allocation import Address, family_of

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


class TcpRelay(UdpRelay):
    """A TCP allocation's relayed address: ``listener`` accepts peer connections, ``sock``
    (the UDP one) only holds the port."""

    __slots__ = ("listener",)

    def __init__(self, sock: socket.socket, listener: socket.socket, address: Address) -> None:
        super().__init__(sock, address)
        self.listener = listener

    def sendto(self, data: bytes, peer: Address) -> bool:
        return False  # a TCP allocation sends no datagrams

    def __repr__(self) -> str:
        return f"TcpRelay({format_hostport(*self.address)})"


def reusable_tcp_socket(ip: str) -> socket.socket:
    """A non-blocking TCP socket that may share its address with a TCP relay's listener."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if ":" in ip:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except OSError:
        sock.close()
        raise
    return sock


class RelayPortPool:
    """Implements the core's ``RelayPorts``: binds relay sockets inside the port range."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        relay_addresses: list[str],
        port_range: tuple[int, int],
        plane: Any,
        *,
        rng: random.Random | None = None,
        shared_held: Any = None,
    ) -> None:
        self.loop = loop
        self.port_min, self.port_max = port_range
        self.plane = plane  # watches the relay sockets: add_relay(sock, relay), remove_relay(sock)
        self.rng = rng or random.SystemRandom()
        self._addresses: dict[int, list[str]] = {1: [], 2: []}
        for ip in relay_addresses:
            self._addresses[family_of(ip)].append(ip)
        self._in_use: dict[str, set[int]] = {ip: set() for ip in relay_addresses}
        self.open_count = 0
        self.bind_failures = 0
        # With worker processes: which ports any worker holds (io/shared.py HeldPorts).
        self.shared_held = shared_held
        # Told of each TCP relay's listener, opened and closed (io/tcp_relay.py).
        self.on_tcp_listen: Any = None
        self.on_tcp_close: Any = None

    # -- RelayPorts protocol -------------------------------------------------

    def families(self) -> set[int]:
        return {family for family, ips in self._addresses.items() if ips}

    def supports_dont_fragment(self) -> bool:
        return hasattr(socket, "IP_MTU_DISCOVER") and hasattr(socket, "IP_PMTUDISC_DO")

    def holds(self, ip: str, port: int) -> bool:
        """Whether a relay socket (an allocation's or a reservation's) is bound on ip:port now,
        by this process or, with worker processes, by any of them."""
        if self.shared_held is not None:
            return self.shared_held.held(ip, port)
        return self.holds_here(ip, port)

    def held_offset(self, ip: str, port: int) -> int | None:
        """Where the shared held-port map keeps ip:port (worker processes), for the data plane
        to read per packet; None without one."""
        if self.shared_held is None:
            return None
        offset = self.shared_held.offset(ip, port)
        return offset if offset >= 0 else None

    def holds_here(self, ip: str, port: int) -> bool:
        """Whether this process holds ip:port (so its core hears when the port goes)."""
        used = self._in_use.get(ip)
        return used is not None and port in used

    def capacity(self) -> int:
        """Ports in the range times relay addresses: what allocations can ever get."""
        return (self.port_max - self.port_min + 1) * sum(len(v) for v in self._addresses.values())

    def allocate(
        self, family: int, *, even_port: bool = False, reserve_next: bool = False,
        dont_fragment: bool = False, tcp: bool = False,
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
                relay = self._bind_tcp(ip, port) if tcp else self._bind(ip, port, dont_fragment)
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
        if isinstance(endpoint, TcpRelay):
            if self.on_tcp_close is not None:
                self.on_tcp_close(endpoint)
            endpoint.listener.close()
        else:
            try:
                self.plane.remove_relay(sock)
            except (ValueError, OSError):
                pass
        self._in_use[endpoint.address[0]].discard(endpoint.address[1])
        if self.shared_held is not None:
            self.shared_held.set(endpoint.address[0], endpoint.address[1], False)
        sock.close()
        self.open_count -= 1

    # -- internals -----------------------------------------------------------

    def _bind_tcp(self, ip: str, port: int) -> TcpRelay | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        hold = socket.socket(family, socket.SOCK_DGRAM)
        listener: socket.socket | None = None
        try:
            hold.bind((ip, port))
            listener = reusable_tcp_socket(ip)
            listener.bind((ip, port))
            listener.listen(64)
        except OSError as exc:
            hold.close()
            if listener is not None:
                listener.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            raise
        relay = TcpRelay(hold, listener, (ip, port))
        self._in_use[ip].add(port)
        if self.shared_held is not None:
            self.shared_held.set(ip, port, True)
        self.open_count += 1
        if self.on_tcp_listen is not None:
            self.on_tcp_listen(relay)
        return relay

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
        try:
            self.plane.add_relay(sock, relay)
        except OSError:
            sock.close()
            raise
        self._in_use[ip].add(port)
        if self.shared_held is not None:
            self.shared_held.set(ip, port, True)
        self.open_count += 1
        return relay


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
