"""A small asyncio TURN client (the client side of RFC 8656 over RFC 8489), on our own codec.

It exists so the project can check a server from the outside the way a client would
(``turnd probe``) and so tests can drive one, without depending on another TURN stack.
It speaks UDP, TCP and TLS to the server and always asks for a UDP relay (REQUESTED-TRANSPORT
17): that is what WebRTC clients do.

Usage::

    client = await TurnClient.connect("turn.example.com", 3478, transport="udp",
                                      username=creds.username, password=creds.password)
    try:
        relayed = await client.allocate()
        await client.create_permission(peer)
        client.send_to(peer, b"hello")             # Send indication, or ChannelData once bound
        peer, data = await client.receive(timeout_s=2)
    finally:
        await client.close()                        # Refresh(0), then close the socket

Every wait is bounded: a transaction gives up after ``timeout_s`` (UDP retransmits inside it,
RFC 8489 §6.2.1), and ``receive`` takes a timeout. Failures raise :class:`TurnClientError`
subclasses: :class:`ErrorResponse` (the server said no, with its code), :class:`TransactionTimeout`
and :class:`TransportError` (connection refused, reset, TLS failures; ``cause`` keeps the OS or
SSL exception).
"""

from __future__ import annotations

import asyncio
import os
import ssl as _ssl
from dataclasses import dataclass
from typing import Any

from .auth.keys import ALGORITHM_MD5, ALGORITHM_SHA256, long_term_key
from .auth.nonce import NonceManager
from .stun import (
    Attr,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    StunDecodeError,
    decode_channel_data,
    decode_message,
    encode_channel_data,
    encode_message,
    verify_message_integrity,
    verify_message_integrity_sha256,
)
from .stun.channel_data import CHANNEL_MAX, CHANNEL_MIN
from .stun.errors import FramingError
from .turn.core import REQUESTED_TRANSPORT_UDP
from .turn.errors import REASONS

__all__ = [
    "ALPN_STUN_TURN",
    "Address",
    "ClientStats",
    "ErrorResponse",
    "TransactionTimeout",
    "TransportError",
    "TurnClient",
    "TurnClientError",
    "client_tls_context",
    "describe_transport_error",
]

Address = tuple[str, int]

DEFAULT_TIMEOUT_S = 5.0
# RFC 8489 §6.2.1: initial RTO of 500 ms, doubled each retransmission, Rc = 7 transmissions.
INITIAL_RTO_S = 0.5
MAX_TRANSMISSIONS = 7
# RFC 7443: the ALPN protocol id a TURN client offers over TLS.
ALPN_STUN_TURN = "stun.turn"
# Received data waiting for receive(); beyond this it is dropped and counted, like a socket buffer.
DEFAULT_QUEUE_SIZE = 4096
# Two 438s in a row for one request means the server's clock and nonces disagree with us; a
# third try would not do better.
_MAX_STALE_RETRIES = 2
_RECV_SIZE = 65536
TRANSPORTS = ("udp", "tcp", "tls")


class TurnClientError(Exception):
    """Anything that made a client operation fail."""


class TransactionTimeout(TurnClientError):
    """No response within the transaction's time limit."""


class TransportError(TurnClientError):
    """The connection to the server failed: refused, reset, unreachable, or a TLS error."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class ErrorResponse(TurnClientError):
    """The server answered with an error response (RFC 8489 §14.8 ERROR-CODE)."""

    def __init__(self, method: int, code: int, reason: str, response: Message) -> None:
        super().__init__(f"{code} {reason}")
        self.method = method
        self.code = code
        self.reason = reason
        self.response = response

    @property
    def alternate_server(self) -> Address | None:
        """ALTERNATE-SERVER of a 300 Try Alternate (RFC 8489 §10), if any."""
        value = self.response.get(Attr.ALTERNATE_SERVER)
        return value if isinstance(value, tuple) else None


@dataclass
class ClientStats:
    """Plain counters, read by tests."""

    requests_sent: int = 0  # transmissions, retransmissions included
    retransmissions: int = 0
    responses_discarded: int = 0  # unknown transaction, or integrity did not verify
    data_received: int = 0
    data_dropped: int = 0  # queue full, unknown channel, undecodable
    data_sent: int = 0


class _Pending:
    __slots__ = ("future", "key", "transmissions")

    def __init__(self, future: asyncio.Future[Message], key: bytes | None) -> None:
        self.future = future
        self.key = key
        self.transmissions = 0


class _Link:
    """The way to the server: a connected UDP socket or a TCP/TLS stream."""

    reliable = False

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def local_address(self) -> Address:
        raise NotImplementedError


class _UdpLink(_Link, asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.client: TurnClient | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.client is not None:
            self.client._on_frame(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected UDP socket the kernel reports ICMP port unreachable as ECONNREFUSED:
        # the quickest sign that nothing listens on the server's port.
        if self.client is not None:
            self.client._on_link_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client._on_link_closed(exc)

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise TransportError("connection closed")
        self.transport.sendto(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def local_address(self) -> Address:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return (name[0], name[1])


class _StreamLink(_Link):
    reliable = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.client: TurnClient | None = None
        self.framer = StreamFramer()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                chunk = await self.reader.read(_RECV_SIZE)
                if not chunk:
                    break
                for frame in self.framer.feed(chunk):
                    if self.client is not None:
                        self.client._on_frame(frame)
        except FramingError as exc:
            error = TransportError(f"server sent bytes that are neither STUN nor ChannelData: {exc}")
        except (OSError, _ssl.SSLError) as exc:
            error = exc
        except asyncio.CancelledError:
            return
        if self.client is not None:
            self.client._on_link_closed(error)

    def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise TransportError("connection closed")
        self.writer.write(data)

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()

    @property
    def local_address(self) -> Address:
        name = self.writer.get_extra_info("sockname")
        return (name[0], name[1])


def client_tls_context(*, verify: bool = True, ca_file: str | None = None) -> _ssl.SSLContext:
    """The system's default client context, offering ALPN "stun.turn" (RFC 7443).

    ``ca_file`` trusts the CA certificates in that PEM file instead of the system's (one's own
    CA). ``verify=False`` accepts any certificate (a self-signed test server, say); the
    connection is still encrypted but no longer authenticated.
    """
    context = _ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = _ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_STUN_TURN])
    return context


def describe_transport_error(exc: BaseException) -> str:
    """A short, operator-readable reason for a connection failure."""
    if isinstance(exc, TransportError):
        return str(exc)
    if isinstance(exc, _ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, _ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


class TurnClient:
    """One client 5-tuple: at most one allocation, its permissions and channels."""

    def __init__(
        self,
        link: _Link,
        *,
        transport: str,
        server: Address,
        username: str = "",
        password: str = "",
        software: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        initial_rto_s: float = INITIAL_RTO_S,
        password_algorithm: int = ALGORITHM_MD5,
        integrity: str = "sha1",
        fingerprint: bool = True,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        if password_algorithm not in (ALGORITHM_MD5, ALGORITHM_SHA256):
            raise ValueError("password_algorithm must be ALGORITHM_MD5 or ALGORITHM_SHA256")
        if integrity not in ("sha1", "sha256", "both"):
            raise ValueError('integrity must be "sha1", "sha256" or "both"')
        self._link = link
        self.transport = transport
        self.server = server
        self.username = username
        self._password = password
        self.software = software
        self.timeout_s = timeout_s
        self.initial_rto_s = initial_rto_s
        self.password_algorithm = password_algorithm
        self.integrity = integrity
        self.fingerprint = fingerprint
        self.stats = ClientStats()
        self.relayed_address: Address | None = None
        self.mapped_address: Address | None = None
        self.lifetime_s: int | None = None
        self.realm: str | None = None
        self._nonce: str | None = None
        self._server_algorithms: list[tuple[int, bytes]] | None = None
        self._key: bytes | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._received: asyncio.Queue[tuple[Address, bytes]] = asyncio.Queue(queue_size)
        self._channels: dict[int, Address] = {}
        self._peer_channels: dict[Address, int] = {}
        self._next_channel = CHANNEL_MIN
        self._closed = False
        self._link_error: TransportError | None = None

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        transport: str = "udp",
        ssl_context: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_address: Address | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        **options: Any,
    ) -> TurnClient:
        """Open the link to ``host:port`` and return a client on it.

        For ``tls`` without ``ssl_context`` the system's default verification applies (the
        certificate must match ``server_hostname``, default ``host``) and ALPN "stun.turn" is
        offered. Connection failures
        raise :class:`TransportError` (its ``cause`` is the OS or SSL error); a TCP/TLS
        connection that takes longer than ``timeout_s`` raises :class:`TransactionTimeout`.
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        loop = asyncio.get_running_loop()
        link: _Link
        try:
            if transport == "udp":
                _, udp = await loop.create_datagram_endpoint(
                    _UdpLink, remote_addr=(host, port), local_addr=local_address,
                )
                link = udp
                peer = udp.transport.get_extra_info("peername") if udp.transport else (host, port)
            else:
                context: _ssl.SSLContext | None = None
                if transport == "tls":
                    context = ssl_context or client_tls_context()
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host, port, ssl=context, local_addr=local_address,
                        server_hostname=(server_hostname or host) if context else None,
                    ),
                    timeout_s,
                )
                stream = _StreamLink(reader, writer)
                link = stream
                peer = writer.get_extra_info("peername")
        except asyncio.TimeoutError:
            raise TransactionTimeout(f"no {transport} connection within {timeout_s:g} s") from None
        except (OSError, _ssl.SSLError) as exc:
            raise TransportError(describe_transport_error(exc), exc) from None
        client = cls(link, transport=transport, server=(peer[0], peer[1]), timeout_s=timeout_s, **options)
        if isinstance(link, _UdpLink):
            link.client = client
        elif isinstance(link, _StreamLink):
            link.client = client
            link.start()
        return client

    @property
    def local_address(self) -> Address:
        return self._link.local_address

    @property
    def alpn_protocol(self) -> str | None:
        """The ALPN protocol the TLS handshake settled on (RFC 7443), None without TLS or ALPN."""
        if not isinstance(self._link, _StreamLink):
            return None
        ssl_object = self._link.writer.get_extra_info("ssl_object")
        return ssl_object.selected_alpn_protocol() if ssl_object is not None else None

    @property
    def channels(self) -> dict[int, Address]:
        """Bound channel numbers and their peers (a copy)."""
        return dict(self._channels)

    # ------------------------------------------------------------------ incoming

    def _on_frame(self, data: bytes) -> None:
        if not data:
            return
        first = data[0]
        if 0x40 <= first <= 0x4F:
            self._on_channel_data(data)
            return
        if first >= 0x40:
            self.stats.data_dropped += 1
            return
        try:
            msg = decode_message(data)
        except StunDecodeError:
            self.stats.responses_discarded += 1
            return
        if msg.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR):
            self._on_response(msg)
        elif msg.msg_class == MessageClass.INDICATION and msg.method == Method.DATA:
            peer = msg.get(Attr.XOR_PEER_ADDRESS)
            payload = msg.get(Attr.DATA)
            if isinstance(peer, tuple) and isinstance(payload, bytes):
                self._deliver(peer, payload)
            else:
                self.stats.data_dropped += 1  # RFC 8656 §11.4: malformed Data indications are dropped
        else:
            self.stats.responses_discarded += 1

    def _on_response(self, msg: Message) -> None:
        pending = self._pending.get(msg.transaction_id)
        if pending is None or pending.future.done():
            self.stats.responses_discarded += 1  # a late answer to a retransmission, or spoofed
            return
        if pending.key is not None and msg.msg_class == MessageClass.SUCCESS:
            # RFC 8489 §9.2.5: a success response to an authenticated request must carry
            # integrity made with our key; anything else is discarded as if never received.
            if Attr.MESSAGE_INTEGRITY_SHA256 in msg:
                ok = verify_message_integrity_sha256(msg, pending.key)
            else:
                ok = verify_message_integrity(msg, pending.key)
            if not ok:
                self.stats.responses_discarded += 1
                return
        del self._pending[msg.transaction_id]
        pending.future.set_result(msg)

    def _on_channel_data(self, data: bytes) -> None:
        try:
            number, payload = decode_channel_data(data)
        except StunDecodeError:
            self.stats.data_dropped += 1
            return
        peer = self._channels.get(number)
        if peer is None:
            self.stats.data_dropped += 1  # RFC 8656 §12.6: an unbound channel's data is discarded
            return
        self._deliver(peer, payload)

    def _deliver(self, peer: Address, payload: bytes) -> None:
        try:
            self._received.put_nowait((peer, payload))
            self.stats.data_received += 1
        except asyncio.QueueFull:
            self.stats.data_dropped += 1

    def _on_link_error(self, exc: BaseException) -> None:
        error = TransportError(describe_transport_error(exc), exc)
        if self.transport == "udp" and isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
            # An ICMP error refers to some datagram we sent; fail what is waiting and let a later
            # send try again (the server may have come up in between).
            self._fail_pending(error)
            return
        self._link_error = error
        self._fail_pending(error)

    def _on_link_closed(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        error = TransportError(
            describe_transport_error(exc) if exc is not None else "connection closed by the server",
            exc,
        )
        self._link_error = error
        self._fail_pending(error)

    def _fail_pending(self, error: TurnClientError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for entry in pending:
            if not entry.future.done():
                entry.future.set_exception(error)

    # ------------------------------------------------------------------ transactions

    def _send_raw(self, data: bytes) -> None:
        if self._closed:
            raise TransportError("client is closed")
        if self._link_error is not None:
            raise self._link_error
        try:
            self._link.send(data)
        except TransportError:
            raise
        except OSError as exc:
            raise TransportError(describe_transport_error(exc), exc) from None

    async def _transact(self, msg: Message, key: bytes | None) -> Message:
        """Send one request and wait for its response, retransmitting over UDP."""
        if self.software:
            msg.add(Attr.SOFTWARE, self.software)
        data = encode_message(msg, key=key, integrity=self.integrity, fingerprint=self.fingerprint)
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), key)
        self._pending[msg.transaction_id] = pending
        deadline = loop.time() + self.timeout_s
        rto = self.initial_rto_s
        try:
            while True:
                self._send_raw(data)
                pending.transmissions += 1
                self.stats.requests_sent += 1
                if pending.transmissions > 1:
                    self.stats.retransmissions += 1
                remaining = deadline - loop.time()
                if self._link.reliable or pending.transmissions >= MAX_TRANSMISSIONS:
                    # RFC 8489 §6.2.2: over TCP/TLS the request is sent once; the transport
                    # retransmits. After the last UDP transmission, wait out the deadline.
                    wait = remaining
                else:
                    wait = min(rto, remaining)
                if wait > 0:
                    done, _ = await asyncio.wait({pending.future}, timeout=wait)
                    if done:
                        return pending.future.result()
                if loop.time() >= deadline or self._link.reliable or pending.transmissions >= MAX_TRANSMISSIONS:
                    raise TransactionTimeout(
                        f"no answer to {method_name(msg.method)} within {self.timeout_s:g} s"
                    )
                rto *= 2
        finally:
            if self._pending.get(msg.transaction_id) is pending:
                del self._pending[msg.transaction_id]

    async def request(self, msg: Message, *, authenticate: bool = True) -> Message:
        """Run one request to a success response; raise :class:`ErrorResponse` otherwise.

        With ``authenticate`` the long-term credential mechanism (RFC 8489 §9.2) is used:
        a request goes unsigned until the server's first 401 tells us REALM and NONCE; after
        that every request is signed with the cached nonce, and a 438 Stale Nonce is retried
        with the fresh one the server sent.
        """
        attributes = list(msg.attributes)
        stale_retries = 0
        challenged = False
        while True:
            attempt = Message(msg.method, msg.msg_class, os.urandom(12), attributes)
            key = self._sign(attempt) if authenticate else None
            response = await self._transact(attempt, key)
            if response.msg_class == MessageClass.SUCCESS:
                return response
            code, reason = _error_of(response)
            if authenticate and code == 401 and not challenged and key is None:
                # RFC 8489 §9.2.5: the challenge; retry once with the credentials.
                challenged = True
                self._take_challenge(response)
                continue
            if authenticate and code == 438 and stale_retries < _MAX_STALE_RETRIES:
                # RFC 8489 §9.2.5: Stale Nonce; retry with the new NONCE (and REALM).
                stale_retries += 1
                self._take_challenge(response)
                continue
            raise ErrorResponse(msg.method, code, reason, response)

    def _take_challenge(self, response: Message) -> None:
        realm = response.get(Attr.REALM)
        nonce = response.get(Attr.NONCE)
        if not isinstance(realm, str) or not isinstance(nonce, str):
            code, reason = _error_of(response)
            raise ErrorResponse(response.method, code, f"{reason} (challenge without REALM/NONCE)", response)
        if realm != self.realm:
            self._key = None
        self.realm = realm
        self._nonce = nonce
        algorithms = response.get(Attr.PASSWORD_ALGORITHMS)
        self._server_algorithms = list(algorithms) if isinstance(algorithms, list) else None

    def _sign(self, msg: Message) -> bytes | None:
        """Add USERNAME, REALM, NONCE (and the algorithm attributes); return the key, or None
        while the server has not challenged us yet."""
        if self.realm is None or self._nonce is None:
            return None
        msg.add(Attr.USERNAME, self.username)
        msg.add(Attr.REALM, self.realm)
        msg.add(Attr.NONCE, self._nonce)
        if self.password_algorithm != ALGORITHM_MD5:
            # RFC 8489 §9.2.3.2: a non-default algorithm needs the server to offer it (the
            # security-feature bit in the nonce cookie) and PASSWORD-ALGORITHMS echoed back.
            offered = self._server_algorithms or []
            if not NonceManager.has_password_algorithms_feature(self._nonce) or not any(
                alg == self.password_algorithm for alg, _ in offered
            ):
                raise TurnClientError("the server does not offer the requested password algorithm")
            msg.add(Attr.PASSWORD_ALGORITHMS, offered)
            msg.add(Attr.PASSWORD_ALGORITHM, (self.password_algorithm, b""))
        if self._key is None:
            self._key = long_term_key(self.username, self.realm, self._password, self.password_algorithm)
        return self._key

    # ------------------------------------------------------------------ STUN and TURN methods

    async def binding(self) -> Address:
        """RFC 8489 §3: a Binding request; returns the reflexive transport address."""
        response = await self.request(Message(Method.BINDING, MessageClass.REQUEST), authenticate=False)
        mapped = response.get(Attr.XOR_MAPPED_ADDRESS) or response.get(Attr.MAPPED_ADDRESS)
        if not isinstance(mapped, tuple):
            raise TurnClientError("Binding response without XOR-MAPPED-ADDRESS")
        self.mapped_address = mapped
        return mapped

    async def allocate(
        self,
        *,
        lifetime_s: int | None = None,
        family: int | None = None,
        dont_fragment: bool = False,
    ) -> Address:
        """RFC 8656 §7.1: ask for a UDP relayed transport address; returns it."""
        msg = Message(Method.ALLOCATE, MessageClass.REQUEST)
        msg.add(Attr.REQUESTED_TRANSPORT, REQUESTED_TRANSPORT_UDP)
        if lifetime_s is not None:
            msg.add(Attr.LIFETIME, lifetime_s)
        if family is not None:
            msg.add(Attr.REQUESTED_ADDRESS_FAMILY, family)
        if dont_fragment:
            msg.add(Attr.DONT_FRAGMENT)
        response = await self.request(msg)
        relayed = response.get(Attr.XOR_RELAYED_ADDRESS)
        if not isinstance(relayed, tuple):
            raise TurnClientError("Allocate success without XOR-RELAYED-ADDRESS")
        self.relayed_address = relayed
        mapped = response.get(Attr.XOR_MAPPED_ADDRESS)
        if isinstance(mapped, tuple):
            self.mapped_address = mapped
        lifetime = response.get(Attr.LIFETIME)
        self.lifetime_s = lifetime if isinstance(lifetime, int) else None
        return relayed

    async def refresh(self, lifetime_s: int | None = None) -> int:
        """RFC 8656 §8.1: extend the allocation; ``0`` deletes it. Returns the granted lifetime."""
        msg = Message(Method.REFRESH, MessageClass.REQUEST)
        if lifetime_s is not None:
            msg.add(Attr.LIFETIME, lifetime_s)
        response = await self.request(msg)
        lifetime = response.get(Attr.LIFETIME)
        granted = lifetime if isinstance(lifetime, int) else 0
        self.lifetime_s = granted
        if lifetime_s == 0:
            self.relayed_address = None
            self._channels.clear()
            self._peer_channels.clear()
        return granted

    async def create_permission(self, *peers: Address) -> None:
        """RFC 8656 §10.1: install (or refresh) permissions for the peers' IP addresses."""
        if not peers:
            raise ValueError("create_permission needs at least one peer")
        msg = Message(Method.CREATE_PERMISSION, MessageClass.REQUEST)
        for peer in peers:
            msg.add(Attr.XOR_PEER_ADDRESS, (peer[0], peer[1]))
        await self.request(msg)

    async def channel_bind(self, peer: Address, number: int | None = None) -> int:
        """RFC 8656 §12.1: bind (or refresh) a channel to ``peer``; returns its number."""
        peer = (peer[0], peer[1])
        if number is None:
            number = self._peer_channels.get(peer)
        if number is None:
            number = self._free_channel()
        if not CHANNEL_MIN <= number <= CHANNEL_MAX:
            raise ValueError("channel numbers are 0x4000-0x4FFF (RFC 8656 §12)")
        msg = Message(Method.CHANNEL_BIND, MessageClass.REQUEST)
        msg.add(Attr.CHANNEL_NUMBER, number)
        msg.add(Attr.XOR_PEER_ADDRESS, peer)
        await self.request(msg)
        self._channels[number] = peer
        self._peer_channels[peer] = number
        return number

    def _free_channel(self) -> int:
        for _ in range(CHANNEL_MAX - CHANNEL_MIN + 1):
            number = self._next_channel
            self._next_channel = CHANNEL_MIN if number == CHANNEL_MAX else number + 1
            if number not in self._channels:
                return number
        raise TurnClientError("every channel number is in use")

    # ------------------------------------------------------------------ data

    def send_indication(self, peer: Address, data: bytes) -> None:
        """RFC 8656 §11.1: a Send indication (no integrity: indications are not authenticated)."""
        msg = Message(Method.SEND, MessageClass.INDICATION)
        msg.add(Attr.XOR_PEER_ADDRESS, (peer[0], peer[1]))
        msg.add(Attr.DATA, data)
        self._send_raw(encode_message(msg))
        self.stats.data_sent += 1

    def send_channel_data(self, number: int, data: bytes) -> None:
        """RFC 8656 §12.4: ChannelData on a bound channel; padded on TCP/TLS (§12.5)."""
        if number not in self._channels:
            raise TurnClientError(f"channel 0x{number:04x} is not bound")
        self._send_raw(encode_channel_data(number, data, pad=self._link.reliable))
        self.stats.data_sent += 1

    def send_to(self, peer: Address, data: bytes) -> None:
        """ChannelData when a channel to ``peer`` is bound, else a Send indication."""
        number = self._peer_channels.get((peer[0], peer[1]))
        if number is not None:
            self.send_channel_data(number, data)
        else:
            self.send_indication(peer, data)

    async def receive(self, timeout_s: float | None = None) -> tuple[Address, bytes]:
        """The next relayed datagram as ``(peer, data)``; TransactionTimeout when none comes."""
        wait = self.timeout_s if timeout_s is None else timeout_s
        if self._received.empty() and self._link_error is not None:
            raise self._link_error
        try:
            return await asyncio.wait_for(self._received.get(), wait)
        except asyncio.TimeoutError:
            raise TransactionTimeout(f"no relayed data within {wait:g} s") from None

    # ------------------------------------------------------------------ closing

    async def close(self, *, deallocate: bool = True, timeout_s: float = 1.0) -> None:
        """Delete the allocation (Refresh with LIFETIME 0, best effort) and close the link."""
        if self._closed:
            return
        if deallocate and self.relayed_address is not None and self._link_error is None:
            saved = self.timeout_s
            self.timeout_s = min(saved, timeout_s)
            try:
                await self.refresh(0)
            except TurnClientError:
                pass  # the server forgets it at expiry anyway
            finally:
                self.timeout_s = saved
        self._closed = True
        self._fail_pending(TransportError("client closed"))
        self._link.close()
        if isinstance(self._link, _StreamLink):
            try:
                await asyncio.wait_for(self._link.writer.wait_closed(), timeout_s)
            except (asyncio.TimeoutError, OSError, _ssl.SSLError):
                pass

    async def __aenter__(self) -> TurnClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _error_of(response: Message) -> tuple[int, str]:
    value = response.get(Attr.ERROR_CODE)
    if isinstance(value, tuple) and len(value) == 2:
        code = int(value[0])
        # Servers may leave the reason phrase out (turnd does on unauthenticated answers).
        return code, str(value[1]) or REASONS.get(code, "")
    return 0, "error response without ERROR-CODE"


_METHOD_NAMES: dict[int, str] = {
    Method.BINDING: "Binding",
    Method.ALLOCATE: "Allocate",
    Method.REFRESH: "Refresh",
    Method.CREATE_PERMISSION: "CreatePermission",
    Method.CHANNEL_BIND: "ChannelBind",
}


def method_name(method: int) -> str:
    """The RFC's name for a STUN/TURN method, for messages."""
    return _METHOD_NAMES.get(method, f"method 0x{method:03x}")
