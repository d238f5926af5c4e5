"""The media paths between clients, the core and peers: what runs per packet, in one place.

Client to server: every message a client sends (a UDP datagram, or a frame a
:class:`~turnserver.stun.StreamFramer` cut from a TCP/TLS stream) goes through
:func:`client_message`, which looks at its first byte (RFC 8656 §12, RFC 7983):

* 0x00-0x3F is STUN, to ``core.handle_stun``; a Send indication's ``SendToPeer`` goes out on
  the relay socket here, a reply goes back to the caller, which writes it to the client;
* 0x40-0x4F is ChannelData (0x40-0x7F with ``legacy_channel_numbers``, RFC 5766's range), to
  ``core.handle_channel_data``, whose ``SendToPeer`` goes out on the relay socket here;
* anything else is dropped and counted as ``dropped["not_stun"]``.

Peer to client: :func:`peer_datagram` takes a datagram a relay socket received to
``core.handle_peer_data`` and hands the result to the allocation's :class:`Sink`. What the sink
drops is taken back out of the allocation's counters (``core.peer_data_dropped``), so the usage
record and the relayed-bytes metrics count what reached the kernel or the transport.

The callers keep what is theirs: the UDP listener its bounded ``recvfrom`` drain and the reply's
``sendto`` (io/server.py), a stream connection its framer and read back-pressure
(io/stream.py), the relay pool its drain of the relay sockets (io/relay.py).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Callable, Protocol

from ..turn.allocation import Address, FiveTuple
from ..turn.core import SendToPeer
from ..turn.stats import CoreStats

if TYPE_CHECKING:
    from ..turn.core import TurnCore
    from .relay import UdpRelay

log = logging.getLogger("turnd")

# What client_message returns for a STUN message that has no reply for the client (None
# means the message was not STUN): the caller re-arms the core's timer once per batch.
NO_REPLY = b""


class Sink(Protocol):
    """The way back to one client, kept in its allocation by the core."""

    def send(self, data: bytes) -> bool:
        """True when ``data`` was handed to the kernel or the transport; False when it was
        dropped (a full buffer, a closed connection)."""
        ...


# Gives the sink of the client at an address; called for STUN messages only (an Allocate
# keeps it), so no sink is built per ChannelData datagram.
SinkFor = Callable[[Address], Sink]


class UdpSink:
    """The way back to a UDP client: the listener socket it wrote to, and its address."""

    __slots__ = ("sock", "addr")

    def __init__(self, sock: socket.socket, addr: Address) -> None:
        self.sock = sock
        self.addr = addr

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendto(data, self.addr)
            return True
        except OSError:
            return False  # full buffer: it is media, drop it (peer_datagram counts it)


def send_to_peer(out: SendToPeer, stats: CoreStats) -> None:
    """Carry out the core's ``SendToPeer``; a datagram the kernel will not take is counted."""
    if not out.relay.sendto(out.data, out.peer):  # type: ignore[attr-defined]
        stats.dropped["send_failed"] += 1


def client_message(core: TurnCore, data: bytes, five_tuple: FiveTuple, now: float,
                   sink_for: SinkFor, channel_first_max: int) -> bytes | None:
    """One message from a client (``data`` is not empty). Returns None when it was not STUN;
    for STUN, the reply to send back to the client, or ``NO_REPLY``.

    ``channel_first_max`` is ``core.config.channel_max >> 8``, read once per batch.
    """
    first = data[0]
    if 0x40 <= first <= channel_first_max:
        out = core.handle_channel_data(data, five_tuple, now)
        if out is not None and not out.relay.sendto(out.data, out.peer):  # type: ignore[attr-defined]
            core.stats.dropped["send_failed"] += 1
        return None
    if first < 0x40:
        reply = core.handle_stun(data, five_tuple, now, sink_for(five_tuple[1]))
        if reply is None:
            return NO_REPLY
        if isinstance(reply, SendToPeer):
            send_to_peer(reply, core.stats)
            return NO_REPLY
        return reply
    # RFC 8656 §12: only STUN (0-63) and ChannelData (64-79) are valid (64-127 with
    # legacy_channel_numbers).
    core.stats.dropped["not_stun"] += 1
    return None


def peer_datagram(core: TurnCore, relay: UdpRelay, data: bytes, peer: Address, now: float) -> None:
    """A datagram a relay socket received, toward its allocation's client. The relay pool
    calls it through ``functools.partial(peer_datagram, core)``."""
    try:
        out = core.handle_peer_data(relay, data, peer, now)
        if out is not None:
            sink = out[0]
            if not sink.send(out[1]):
                core.peer_data_dropped(relay, len(data))
                if sink.__class__ is UdpSink:  # stream connections count their own drops
                    core.stats.dropped["send_failed"] += 1
    except Exception:
        core.stats.dropped["internal_error"] += 1
        log.exception("error relaying a peer datagram")
