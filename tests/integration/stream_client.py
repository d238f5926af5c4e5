"""A small synchronous TURN client over one TCP or TLS connection, for RFC 6062 tests: a control
connection (Allocate with REQUESTED-TRANSPORT 6, CreatePermission, Connect, and the
ConnectionAttempt indications the server sends), or a data connection (ConnectionBind, then
raw bytes)."""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any

from turnserver.auth import long_term_key
from turnserver.stun import Attr, Message, MessageClass, Method, StreamFramer, decode_message, encode_message

TIMEOUT_S = 5.0


class StreamTurnClient:
    def __init__(self, server: tuple[str, int], username: str, password: str, *,
                 realm: str = "test.turnd", tls: bool = False) -> None:
        self.username = username
        self.password = password
        self.realm = realm
        self.nonce: str | None = None
        sock = socket.create_connection(server, timeout=TIMEOUT_S)
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        self.sock = sock
        self.framer = StreamFramer()
        self.frames: list[bytes] = []
        self.indications: list[Message] = []
        self.raw = b""  # bytes after a ConnectionBind, no longer framed
        self.last_relayed: tuple[str, int] = ("", 0)

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        if not data:
            raise ConnectionError("the server closed the connection")
        self.frames.extend(self.framer.feed(data))
        return True

    def next_message(self, timeout_s: float = TIMEOUT_S) -> Message | None:
        deadline = time.monotonic() + timeout_s
        while not self.frames:
            if time.monotonic() >= deadline or not self._read(deadline):
                return None
        return decode_message(self.frames.pop(0))

    def request(self, method: int, attrs: list[tuple[int, Any]] | None = None, *,
                timeout_s: float = TIMEOUT_S) -> Message:
        reply: Message | None = None
        for _ in range(3):
            msg = Message(method, MessageClass.REQUEST, attributes=list(attrs or []))
            if self.nonce is not None:
                msg.add(Attr.USERNAME, self.username).add(Attr.REALM, self.realm).add(Attr.NONCE, self.nonce)
                data = encode_message(msg, key=self.key)
            else:
                data = encode_message(msg)
            self.sock.sendall(data)
            deadline = time.monotonic() + timeout_s
            reply = None
            while reply is None:
                got = self.next_message(max(0.0, deadline - time.monotonic()))
                assert got is not None, f"no answer to {Method(method).name}"
                if got.msg_class == MessageClass.INDICATION:
                    self.indications.append(got)
                elif got.transaction_id == msg.transaction_id:
                    reply = got
            error = reply.get(Attr.ERROR_CODE) if reply.msg_class == MessageClass.ERROR else None
            if error and error[0] in (401, 438) and Attr.NONCE in reply and (
                    self.nonce is None or error[0] == 438):
                self.nonce = reply.get(Attr.NONCE)
                continue
            return reply
        assert reply is not None
        return reply

    def allocate_tcp(self, family: int | None = None) -> Message:
        attrs: list[tuple[int, Any]] = [(Attr.REQUESTED_TRANSPORT, 6)]
        if family is not None:
            attrs.append((Attr.REQUESTED_ADDRESS_FAMILY, family))
        reply = self.request(Method.ALLOCATE, attrs)
        if reply.msg_class == MessageClass.SUCCESS:
            self.last_relayed = reply.get(Attr.XOR_RELAYED_ADDRESS)
        return reply

    def permit(self, *peers: tuple[str, int]) -> Message:
        return self.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, p) for p in peers])

    def connect(self, peer: tuple[str, int], timeout_s: float = 40.0) -> Message:
        return self.request(Method.CONNECT, [(Attr.XOR_PEER_ADDRESS, peer)], timeout_s=timeout_s)

    def wait_attempt(self, timeout_s: float = TIMEOUT_S) -> Message | None:
        """The next ConnectionAttempt indication (RFC 6062 §5.3)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for msg in self.indications:
                if msg.method == Method.CONNECTION_ATTEMPT:
                    self.indications.remove(msg)
                    return msg
            got = self.next_message(max(0.0, deadline - time.monotonic()))
            if got is None:
                return None
            if got.msg_class == MessageClass.INDICATION:
                self.indications.append(got)

    def connection_bind(self, cid: int, nonce: str | None = None) -> Message:
        """ConnectionBind on this (new) connection; on success its bytes are raw from here on."""
        self.nonce = nonce or self.nonce
        reply = self.request(Method.CONNECTION_BIND, [(Attr.CONNECTION_ID, cid)])
        if reply.msg_class == MessageClass.SUCCESS:
            self.raw = b"".join(self.frames) + self.framer.take_rest()
            self.frames = []
        return reply

    def recv_exactly(self, size: int, timeout_s: float = TIMEOUT_S) -> bytes:
        """Raw bytes of a data connection."""
        deadline = time.monotonic() + timeout_s
        out = bytearray(self.raw)
        self.raw = b""
        while len(out) < size:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(out)} of {size} bytes arrived"
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            out += chunk
        self.raw = bytes(out[size:])
        return bytes(out[:size])


def code(msg: Message) -> int:
    return 200 if msg.msg_class == MessageClass.SUCCESS else msg.get(Attr.ERROR_CODE)[0]


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` (a plain TCP peer's) sees its connection end (EOF or reset) in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False
