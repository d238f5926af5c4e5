"""A deliberately small, synchronous TURN client over a plain UDP socket, for tests that need
to send exact bytes (hostile input, policy checks) to the running server."""

from __future__ import annotations

import socket
import time
from typing import Any

from turnserver.auth import long_term_key
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message

TIMEOUT_S = 2.0


class RawTurnClient:
    def __init__(self, server: tuple[str, int], username: str, password: str, realm: str = "test.turnd",
                 family: int = socket.AF_INET, bind_ip: str | None = None) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.realm = realm
        self.nonce: str | None = None
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((bind_ip or ("127.0.0.1" if family == socket.AF_INET else "::1"), 0))
        self.sock.settimeout(TIMEOUT_S)

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, self.realm, self.password)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def recv(self, timeout_s: float = TIMEOUT_S) -> bytes | None:
        self.sock.settimeout(timeout_s)
        try:
            data, _ = self.sock.recvfrom(65536)
            return data
        except (socket.timeout, TimeoutError):
            return None

    def transact_raw(self, data: bytes, transaction_id: bytes, timeout_s: float = TIMEOUT_S) -> Message | None:
        """Send bytes and wait for the response with that transaction ID (skipping data)."""
        self.send_raw(data)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = self.recv(max(0.01, deadline - time.monotonic()))
            if reply is None:
                return None
            if reply[0] < 0x40:
                msg = decode_message(reply)
                if msg.transaction_id == transaction_id and msg.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR):
                    return msg
        return None

    def request(self, method: int, attrs: list[tuple[int, Any]] | None = None, *, auth: bool = True) -> Message:
        for _ in range(3):
            msg = Message(method, MessageClass.REQUEST, attributes=list(attrs or []))
            if auth and self.nonce is not None:
                msg.add(Attr.USERNAME, self.username).add(Attr.REALM, self.realm).add(Attr.NONCE, self.nonce)
                data = encode_message(msg, key=self.key)
            else:
                data = encode_message(msg)
            reply = self.transact_raw(data, msg.transaction_id)
            assert reply is not None, f"no answer to {Method(method).name}"
            if auth and reply.msg_class == MessageClass.ERROR and reply.get(Attr.ERROR_CODE)[0] in (401, 438) \
                    and Attr.NONCE in reply and (self.nonce is None or reply.get(Attr.ERROR_CODE)[0] == 438):
                self.nonce = reply.get(Attr.NONCE)
                self.realm = reply.get(Attr.REALM) or self.realm
                continue
            return reply
        return reply

    def allocate(self, **extra: Any) -> Message:
        attrs = [(Attr.REQUESTED_TRANSPORT, 17)] + [(Attr[k], v) for k, v in extra.items()]
        return self.request(Method.ALLOCATE, attrs)

    def relayed(self, reply: Message) -> tuple[str, int]:
        return reply.get(Attr.XOR_RELAYED_ADDRESS)

    def permit(self, *peers: tuple[str, int]) -> Message:
        return self.request(Method.CREATE_PERMISSION, [(Attr.XOR_PEER_ADDRESS, p) for p in peers])

    def bind(self, number: int, peer: tuple[str, int]) -> Message:
        return self.request(Method.CHANNEL_BIND, [(Attr.CHANNEL_NUMBER, number), (Attr.XOR_PEER_ADDRESS, peer)])

    def send_indication(self, peer: tuple[str, int], data: bytes) -> None:
        msg = Message(Method.SEND, MessageClass.INDICATION)
        msg.add(Attr.XOR_PEER_ADDRESS, peer).add(Attr.DATA, data)
        self.send_raw(encode_message(msg))

    def binding(self) -> Message | None:
        msg = Message(Method.BINDING, MessageClass.REQUEST)
        return self.transact_raw(encode_message(msg), msg.transaction_id)


def code(msg: Message) -> int:
    return 200 if msg.msg_class == MessageClass.SUCCESS else msg.get(Attr.ERROR_CODE)[0]
