"""Methods outside what a request may be: methods no RFC defines get 400, with or without
credentials (RFC 8489 §6.3 would allow discarding them; an answer tells the client plainly);
a ConnectionAttempt sent by a client (an indication only the server sends) is dropped. RFC
6062's Connect and ConnectionBind are requests the server answers:
tests/unit/test_tcp_allocations.py."""

from __future__ import annotations

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

from .turn_harness import CLIENT, PEER, Client, code, make_core, request

UNKNOWN_METHOD = 0x0FF  # no STUN or TURN method has this number


@pytest.mark.parametrize("authenticated", [False, True], ids=["unauthenticated", "authenticated"])
def test_unknown_methods_get_400(authenticated: bool) -> None:
    h = make_core()
    alice = Client(h)
    if authenticated:
        assert code(alice.allocate()) == 200  # the allocation, and the nonce to sign with
    reply = alice.send(request(UNKNOWN_METHOD), 1.0, auth=authenticated)
    assert reply.msg_class == MessageClass.ERROR
    assert reply.method == UNKNOWN_METHOD
    assert code(reply) == 400
    assert h.core.stats.requests[("other", 400)] == 1
    # Not counted as a refused Allocate or an authentication failure.
    assert sum(h.core.stats.allocations_refused.values()) == 0
    assert sum(h.core.stats.auth_failures.values()) == 0


@pytest.mark.parametrize("method, attrs, name", [
    (Method.CONNECT, {"XOR_PEER_ADDRESS": PEER}, "connect"),
    (Method.CONNECTION_BIND, {"CONNECTION_ID": 1}, "connection_bind"),
])
def test_connect_and_connection_bind_are_authenticated_and_refused_over_udp(
        method: int, attrs: dict, name: str) -> None:
    h = make_core()
    alice = Client(h)
    assert code(alice.send(request(method, **attrs), 1.0, auth=False)) == 401
    assert code(alice.allocate()) == 200
    assert code(alice.send(request(method, **attrs), 1.0)) == 400  # a UDP allocation
    assert h.core.stats.requests[(name, 400)] == 1


def test_a_connection_attempt_indication_is_dropped_without_an_answer() -> None:
    h = make_core()
    msg = Message(Method.CONNECTION_ATTEMPT, MessageClass.INDICATION)
    msg.add(Attr.CONNECTION_ID, 1)
    msg.add(Attr.XOR_PEER_ADDRESS, PEER)
    assert h.core.handle_stun(encode_message(msg), CLIENT, 0.0, "sink") is None
    assert h.core.stats.dropped["unexpected_indication"] == 1
