"""Many UDP allocations at once, each through the full 401 dance: allocation rate and memory.

``turnutils_uclient`` sets its sessions up one every ~0.1 s and cannot hold them without sending,
so this small client does it instead: one UDP socket per allocation (every allocation needs its
own 5-tuple, RFC 8656 §7.2), a bounded number in flight, each sending an unauthenticated
Allocate, taking REALM and NONCE from the 401 and sending the authenticated Allocate
(RFC 8656 §7.1, RFC 8489 §9.2.4). Lost requests are retransmitted a bounded number of times.
The allocations stay open until :meth:`AllocationSet.close`, so the server's memory can be read
while it holds all of them.
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field

from turnserver.auth import long_term_key
from turnserver.credentials import mint_credentials
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message
from turnserver.stun.errors import StunDecodeError
from turnserver.turn.core import REQUESTED_TRANSPORT_UDP

from .servers import HOST, ServerUnderTest

RETRANSMIT_S = 0.5
MAX_ATTEMPTS = 4
# The first 401, then at most a couple of 438 Stale Nonce.
MAX_CHALLENGES = 3
LIFETIME_S = 600


@dataclass
class _Pending:
    sock: socket.socket
    request: Message
    sent_at: float = 0.0
    attempts: int = 0
    authenticated: bool = False
    challenges: int = 0


@dataclass
class AllocationSet:
    """Sockets that each hold one allocation on the server, plus how setting them up went."""

    server: tuple[str, int]
    sockets: list[socket.socket] = field(default_factory=list)
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.sockets)

    def close(self) -> None:
        """Close the client sockets; the server keeps the allocations until it stops."""
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def allocate_many(server: ServerUnderTest, count: int, *, concurrency: int = 50,
                  timeout_s: float = 120.0, user: str = "bench") -> AllocationSet:
    """Set up ``count`` allocations with at most ``concurrency`` in flight, bounded by ``timeout_s``."""
    address = (HOST, server.ports["udp"])
    creds = mint_credentials(server.secret, user, 3600)
    result = AllocationSet(address)
    selector = selectors.DefaultSelector()
    pending: dict[int, _Pending] = {}
    keys: dict[str, bytes] = {}
    started = time.monotonic()
    deadline = started + timeout_s
    to_start = count

    def fail(item: _Pending, reason: str) -> None:
        selector.unregister(item.sock)
        pending.pop(item.sock.fileno(), None)
        item.sock.close()
        result.failed += 1
        result.errors[reason] = result.errors.get(reason, 0) + 1

    def transmit(item: _Pending) -> None:
        item.attempts += 1
        item.sent_at = time.monotonic()
        try:
            item.sock.sendto(_encode(item, creds.username, keys), address)
        except OSError:
            pass  # a full buffer is a lost datagram: the retransmission covers it

    try:
        while (to_start or pending) and time.monotonic() < deadline:
            while to_start and len(pending) < concurrency:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind((HOST, 0))
                item = _Pending(sock, _allocate_request(None))
                pending[sock.fileno()] = item
                selector.register(sock, selectors.EVENT_READ, item)
                to_start -= 1
                transmit(item)
            for key, _ in selector.select(timeout=0.05):
                item = key.data
                try:
                    data = item.sock.recv(2048)
                except OSError:
                    continue
                try:
                    reply = decode_message(data)
                except StunDecodeError:
                    continue
                if reply.transaction_id != item.request.transaction_id:
                    continue  # a late answer to a retransmitted request
                if reply.msg_class == MessageClass.SUCCESS and item.authenticated:
                    selector.unregister(item.sock)
                    del pending[item.sock.fileno()]
                    result.sockets.append(item.sock)
                    continue
                code = reply.get(Attr.ERROR_CODE)
                status = code[0] if isinstance(code, tuple) else None
                # RFC 8489 §9.2.4: 401 carries REALM and NONCE; 438 a fresh NONCE.
                if status in (401, 438) and item.challenges < MAX_CHALLENGES:
                    if status == 401 and item.authenticated:
                        fail(item, "unauthorized")  # the credentials themselves were refused
                        continue
                    item.challenges += 1
                    realm = str(reply.get(Attr.REALM) or server.realm)
                    nonce = reply.get(Attr.NONCE)
                    if nonce is None:
                        fail(item, "no_nonce")
                        continue
                    if realm not in keys:
                        keys[realm] = long_term_key(creds.username, realm, creds.password)
                    item.request = _allocate_request((realm, str(nonce)))
                    item.authenticated = True
                    item.attempts = 0
                    transmit(item)
                    continue
                fail(item, f"error_{status}" if status is not None else "unexpected_reply")
            now = time.monotonic()
            for item in list(pending.values()):
                if now - item.sent_at >= RETRANSMIT_S:
                    if item.attempts >= MAX_ATTEMPTS:
                        fail(item, "timeout")
                    else:
                        transmit(item)
    finally:
        for item in list(pending.values()):
            fail(item, "deadline")
        selector.close()
    result.elapsed_s = time.monotonic() - started
    return result


def _allocate_request(auth: tuple[str, str] | None) -> Message:
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST)
    msg.add(Attr.REQUESTED_TRANSPORT, REQUESTED_TRANSPORT_UDP)
    msg.add(Attr.LIFETIME, LIFETIME_S)
    if auth is not None:
        # The realm travels with the request so _encode can pick the matching key.
        msg.add(Attr.REALM, auth[0]).add(Attr.NONCE, auth[1])
    return msg


def _encode(item: _Pending, username: str, keys: dict[str, bytes]) -> bytes:
    msg = item.request
    if not item.authenticated:
        return encode_message(msg)
    realm = str(msg.get(Attr.REALM))
    signed = Message(msg.method, msg.msg_class, msg.transaction_id,
                     [(Attr.USERNAME, username), *msg.attributes])
    return encode_message(signed, key=keys[realm])
