"""The data plane the server runs: the compiled one (turnserver/_datapath.c) or its pure-Python
twin (turnserver/io/datapath_py.py), chosen once at import by turnserver/accel.py.

:class:`CoreRoutes` is what the TURN core sees of it (the core's ``FastRoutes``): the core
installs a route for each channel of a UDP allocation, keeps its expiry up to date, removes it,
and collects what it carried. Routes are keyed here by the sockets the I/O layer owns.
"""

from __future__ import annotations

import socket
from typing import Any

from ..accel import IMPLEMENTATION, native
from ..turn.allocation import Address, FiveTuple
from . import datapath_py

if native is not None:
    DataPlane: Any = native.DataPlane
    monotonic: Any = native.monotonic
else:
    DataPlane = datapath_py.DataPlane
    monotonic = datapath_py.monotonic

__all__ = ["IMPLEMENTATION", "DataPlane", "CoreRoutes", "monotonic"]


class CoreRoutes:
    """The core's ``FastRoutes`` over a :class:`DataPlane`: the listener socket of each UDP
    listening address and the relay's own socket give the route its keys."""

    def __init__(self, plane: Any) -> None:
        self.plane = plane
        self.listeners: dict[Address, socket.socket] = {}
        self._send_failed = 0

    def add(self, five_tuple: FiveTuple, number: int, relay: Any, peer: Address, expires_at: float,
            up: Any, down: Any, held: int | None = None) -> int | None:
        """A route for a channel, or None when the data plane cannot carry it (a TCP or TLS
        client, a listener it does not know): the core then relays it itself."""
        if five_tuple[0] != "udp":
            return None
        listener = self.listeners.get(five_tuple[2])
        sock = getattr(relay, "sock", None)
        if listener is None or sock is None:
            return None
        try:
            return self.plane.add_route(listener, five_tuple[1], number, sock, peer, expires_at, up,
                                        down, -1 if held is None else held)
        except (ValueError, TypeError, OSError):
            return None

    def set_expiry(self, handle: int, expires_at: float) -> None:
        self.plane.set_expiry(handle, expires_at)

    def remove(self, handle: int) -> tuple[int, int, int, int]:
        return self.plane.remove_route(handle)

    def take_counts(self) -> list[tuple[int, int, int, int, int]]:
        return self.plane.take_counts()

    def take_send_failures(self) -> int:
        """Datagrams the kernel refused since the last call (not counted on any route)."""
        total = self.plane.stats()["send_failed"]
        new, self._send_failed = total - self._send_failed, total
        return new
