"""Methods the server does not offer: RFC 6062's Connect, ConnectionBind and ConnectionAttempt,
and methods no RFC defines. Requests get 400, with or without credentials (RFC 8489 §6.3 would
allow discarding them; an answer tells the client plainly); indications are dropped."""

from __future__ import annotations

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

from .turn_harness import CLIENT, PEER, Client, code, make_core, request

UNKNOWN_METHOD = 0x0FF  # no STUN or TURN method has this number


@pytest.mark.parametrize("method, attrs", [
    (Method.CONNECT, {"XOR_PEER_ADDRESS": PEER}),
    (Method.CONNECTION_BIND, {"CONNECTION_ID": 1}),
    (UNKNOWN_METHOD, {}),
], ids=["connect", "connection_bind", "unknown"])
@pytest.mark.parametrize("authenticated", [False, True], ids=["unauthenticated", "authenticated"])
def test_unsupported_methods_get_400(method: int, attrs: dict, authenticated: bool) -> None:
    h = make_core()
    alice = Client(h)
    if authenticated:
        assert code(alice.allocate()) == 200  # the allocation, and the nonce to sign with
    reply = alice.send(request(method, **attrs), 1.0, auth=authenticated)
    assert reply.msg_class == MessageClass.ERROR
    assert reply.method == method
    assert code(reply) == 400
    assert h.core.stats.requests[("other", 400)] == 1
    # Not counted as a refused Allocate or an authentication failure.
    assert sum(h.core.stats.allocations_refused.values()) == 0
    assert sum(h.core.stats.auth_failures.values()) == 0


def test_a_connection_attempt_indication_is_dropped_without_an_answer() -> None:
    h = make_core()
    msg = Message(Method.CONNECTION_ATTEMPT, MessageClass.INDICATION)
    msg.add(Attr.CONNECTION_ID, 1)
    msg.add(Attr.XOR_PEER_ADDRESS, PEER)
    assert h.core.handle_stun(encode_message(msg), CLIENT, 0.0, "sink") is None
    assert h.core.stats.dropped["unexpected_indication"] == 1
