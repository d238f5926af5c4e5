"""turnserver.client against an in-process server and against scripted fake servers.

All traffic stays on 127.0.0.1; every wait is bounded by the client's own timeouts.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from turnserver.auth.keys import ALGORITHM_SHA256, long_term_key
from turnserver.client import (
    ErrorResponse,
    TransactionTimeout,
    TransportError,
    TurnClient,
    TurnClientError,
)
from turnserver.config import load_config
from turnserver.credentials import mint_credentials
from turnserver.io.server import TurnServer
from turnserver.stun import (
    Attr,
    Message,
    MessageClass,
    Method,
    StreamFramer,
    decode_message,
    encode_channel_data,
    encode_message,
    verify_fingerprint,
)

SECRET = "client-test-secret"
REALM = "client.test"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def start_server(wall_clock: Callable[[], float] = time.time, **overrides: Any) -> TurnServer:
    options: dict[str, Any] = {
        "listen_udp": ["127.0.0.1:0"], "listen_tcp": [], "listen_tls": [],
        "relay_addresses": ["127.0.0.1"], "relay_port_min": 51000, "relay_port_max": 51999,
        "metrics_listen": "", "realm": REALM,
    }
    options.update(overrides)
    config = load_config(None, env={}, overrides=options)
    server = TurnServer(config, secrets=[SECRET.encode()], wall_clock=wall_clock)
    await server.start()
    return server


def udp_port(server: TurnServer) -> int:
    return server.state.listeners[0].address[1]


async def connect(server: TurnServer, secret: str = SECRET, **options: Any) -> TurnClient:
    creds = mint_credentials(secret, "alice", 600)
    return await TurnClient.connect("127.0.0.1", udp_port(server), username=creds.username,
                                    password=creds.password, **options)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- against the real server


def test_binding_returns_the_reflexive_address_without_credentials() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            client = await TurnClient.connect("127.0.0.1", udp_port(server))
            mapped = await client.binding()
            assert mapped == client.local_address
            assert server.core is not None
            assert server.core.stats.requests[("binding", 200)] == 1
            await client.close()
        finally:
            await server.stop()

    run(main())


@pytest.mark.parametrize("fingerprint", [True, False])
def test_responses_carry_fingerprint_when_the_request_did(fingerprint: bool) -> None:
    async def main() -> None:
        server = await start_server()
        try:
            client = await TurnClient.connect("127.0.0.1", udp_port(server), fingerprint=fingerprint)
            response = await client.request(Message(Method.BINDING, MessageClass.REQUEST),
                                             authenticate=False)
            # RFC 8489 §7: the decoder already refused a FINGERPRINT that does not match.
            assert (Attr.FINGERPRINT in response) is fingerprint
            assert verify_fingerprint(response) is fingerprint
            await client.close()
        finally:
            await server.stop()

    run(main())


def test_allocate_is_challenged_once_then_signed_with_the_cached_nonce() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            client = await connect(server)
            relayed = await client.allocate(lifetime_s=1200)
            assert relayed[0] == "127.0.0.1" and 51000 <= relayed[1] <= 51999
            assert client.realm == REALM
            assert client.lifetime_s == 1200
            assert client.mapped_address == client.local_address
            # RFC 8489 §9.2: one 401, then the signed Allocate.
            assert server.core is not None
            assert server.core.stats.requests[("allocate", 401)] == 1
            assert server.core.stats.requests[("allocate", 200)] == 1
            # Later requests reuse REALM/NONCE: no second challenge.
            assert await client.refresh(900) == 900
            assert server.core.stats.requests[("refresh", 401)] == 0
            assert client.stats.requests_sent == 3
            await client.close()
            assert server.core.allocations == {}
            assert server.core.stats.allocations_ended["deleted"] == 1
        finally:
            await server.stop()

    run(main())


def test_wrong_secret_raises_401_after_one_signed_try() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            client = await connect(server, secret="not-the-secret")
            with pytest.raises(ErrorResponse) as caught:
                await client.allocate()
            assert caught.value.code == 401
            assert caught.value.method == Method.ALLOCATE
            assert client.relayed_address is None
            assert server.core is not None
            assert server.core.stats.requests[("allocate", 401)] == 2
            assert server.core.allocations == {}
            await client.close()
        finally:
            await server.stop()

    run(main())


def test_two_allocations_relay_both_ways_over_channel_send_and_data() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            a = await connect(server)
            b = await connect(server)
            ra = await a.allocate()
            rb = await b.allocate()
            number = await a.channel_bind(rb)
            assert 0x4000 <= number <= 0x4FFF
            assert a.channels == {number: rb}
            await b.create_permission(ra)
            a.send_to(rb, b"over a channel")  # ChannelData in, Data indication out
            assert await b.receive(2) == (ra, b"over a channel")
            b.send_to(ra, b"over an indication")  # Send indication in, ChannelData out
            assert await a.receive(2) == (rb, b"over an indication")
            assert server.core is not None
            server.core.fold_route_counts()  # what the data plane carried on the channel
            allocation = server.core.allocations[("udp", a.local_address, ("127.0.0.1", udp_port(server)))]
            assert allocation.packets_to_peer == 1 and allocation.packets_to_client == 1
            assert a.stats.data_sent == 1 and a.stats.data_received == 1
            await a.close()
            await b.close()
        finally:
            await server.stop()

    run(main())


def test_a_stale_nonce_is_retried_with_the_fresh_one() -> None:
    async def main() -> None:
        clock = FakeClock()
        server = await start_server(wall_clock=clock, nonce_lifetime_s=60)
        try:
            client = await connect(server)
            await client.allocate()
            clock.now += 61  # the cached nonce has expired; the credentials have not
            assert await client.refresh(900) == 900
            assert server.core is not None
            assert server.core.stats.requests[("refresh", 438)] == 1
            assert server.core.stats.requests[("refresh", 200)] == 1
            await client.close()
        finally:
            await server.stop()

    run(main())


def test_sha256_password_algorithm_and_integrity() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            client = await connect(server, password_algorithm=ALGORITHM_SHA256, integrity="sha256")
            await client.allocate()
            assert server.core is not None
            # Only MESSAGE-INTEGRITY-SHA256 was sent, over the SHA-256 long-term key: the
            # server accepted it, and the client verified the server's SHA-256 answers.
            assert len(server.core.allocations) == 1 and client.relayed_address is not None
            assert server.core.stats.requests[("allocate", 200)] == 1
            assert server.core.stats.auth_failures == {}
            await client.close()
        finally:
            await server.stop()

    run(main())


def test_draining_server_refuses_allocate_with_508() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            assert server.core is not None
            server.core.draining = True
            client = await connect(server)
            with pytest.raises(ErrorResponse) as caught:
                await client.allocate()
            assert caught.value.code == 508
            assert "draining" in caught.value.reason.lower()
            assert caught.value.alternate_server is None
            await client.close()
        finally:
            await server.stop()

    run(main())


def test_channel_data_on_an_unbound_channel_is_refused_locally() -> None:
    async def main() -> None:
        server = await start_server()
        try:
            client = await connect(server)
            await client.allocate()
            with pytest.raises(TurnClientError):
                client.send_channel_data(0x4001, b"x")
            await client.close()
        finally:
            await server.stop()

    run(main())


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_stream_transports_relay_with_padded_channel_data(transport: str) -> None:
    async def main() -> None:
        server = await start_server(**{f"listen_{transport}": ["127.0.0.1:0"]})
        try:
            (listener,) = [lst for lst in server.state.listeners if lst.transport == transport]
            creds = mint_credentials(SECRET, "alice", 600)
            options: dict[str, Any] = {"transport": transport, "username": creds.username,
                                       "password": creds.password, "timeout_s": 3.0}
            if transport == "tls":
                from turnserver.client import client_tls_context

                options["ssl_context"] = client_tls_context(verify=False)
            a = await TurnClient.connect("127.0.0.1", listener.address[1], **options)
            b = await TurnClient.connect("127.0.0.1", listener.address[1], **options)
            ra, rb = await a.allocate(), await b.allocate()
            await a.channel_bind(rb)
            await b.channel_bind(ra)
            # Lengths 1..5 cover every amount of RFC 8656 §12.5 padding, both ways.
            for size in range(1, 6):
                a.send_to(rb, b"a" * size)
                assert await b.receive(2) == (ra, b"a" * size)
                b.send_to(ra, b"b" * size)
                assert await a.receive(2) == (rb, b"b" * size)
            if transport == "tls":
                assert a.alpn_protocol == "stun.turn"
            assert server.core is not None
            assert {ft[0] for ft in server.core.allocations} == {transport}
            await a.close()
            await b.close()
            assert server.core.allocations == {}
        finally:
            await server.stop()

    run(main())


# ---------------------------------------------------------------------- UDP failure modes


class Recorder(asyncio.DatagramProtocol):
    """A UDP 'server' that answers nothing, or what ``answer`` returns."""

    def __init__(self, answer: Callable[[Message], bytes | None] | None = None) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((time.monotonic(), data))
        if self.answer is not None and self.transport is not None:
            reply = self.answer(decode_message(data))
            if reply is not None:
                self.transport.sendto(reply, addr)


async def fake_udp_server(answer: Callable[[Message], bytes | None] | None = None
                          ) -> tuple[asyncio.DatagramTransport, Recorder, int]:
    loop = asyncio.get_running_loop()
    transport, recorder = await loop.create_datagram_endpoint(
        lambda: Recorder(answer), local_addr=("127.0.0.1", 0))
    return transport, recorder, transport.get_extra_info("sockname")[1]


def test_udp_retransmits_with_doubling_rto_until_the_deadline() -> None:
    async def main() -> None:
        transport, recorder, port = await fake_udp_server()
        try:
            client = await TurnClient.connect("127.0.0.1", port, timeout_s=1.0, initial_rto_s=0.1)
            started = time.monotonic()
            with pytest.raises(TransactionTimeout):
                await client.binding()
            elapsed = time.monotonic() - started
            # RFC 8489 §6.2.1: sent at 0, 0.1, 0.3, 0.7 s; the next (1.5 s) is past the deadline.
            assert len(recorder.received) == 4
            assert 0.9 <= elapsed < 1.6
            tids = {data[8:20] for _, data in recorder.received}
            assert len(tids) == 1  # a retransmission is the same transaction
            gaps = [b[0] - a[0] for a, b in zip(recorder.received, recorder.received[1:])]
            assert gaps[1] > gaps[0] * 1.5 and gaps[2] > gaps[1] * 1.5
            assert client.stats.retransmissions == 3
            await client.close()
        finally:
            transport.close()

    run(main())


def test_udp_stops_after_seven_transmissions() -> None:
    async def main() -> None:
        transport, recorder, port = await fake_udp_server()
        try:
            client = await TurnClient.connect("127.0.0.1", port, timeout_s=1.5, initial_rto_s=0.01)
            with pytest.raises(TransactionTimeout):
                await client.binding()
            # Rc = 7: the last one goes out at about 0.63 s, then the client only waits.
            assert len(recorder.received) == 7
            await client.close()
        finally:
            transport.close()

    run(main())


def test_udp_port_unreachable_is_reported_as_connection_refused() -> None:
    async def main() -> None:
        port = free_udp_port()
        client = await TurnClient.connect("127.0.0.1", port, timeout_s=5.0)
        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await client.binding()
        assert "refused" in str(caught.value)
        assert time.monotonic() - started < 2.0  # the ICMP error, not the timeout
        await client.close()

    run(main())


def _challenge_then(success_key: bytes) -> Callable[[Message], bytes | None]:
    """A fake TURN server: 401 with REALM/NONCE, then a success signed with ``success_key``."""

    def answer(request: Message) -> bytes | None:
        if request.msg_class != MessageClass.REQUEST:
            return None
        if Attr.MESSAGE_INTEGRITY not in request:
            reply = Message(request.method, MessageClass.ERROR, request.transaction_id)
            reply.add(Attr.ERROR_CODE, (401, "Unauthorized"))
            reply.add(Attr.REALM, "fake.realm")
            reply.add(Attr.NONCE, "fake-nonce-1")
            return encode_message(reply)
        reply = Message(request.method, MessageClass.SUCCESS, request.transaction_id)
        reply.add(Attr.XOR_RELAYED_ADDRESS, ("192.0.2.7", 50000))
        reply.add(Attr.LIFETIME, 600)
        return encode_message(reply, key=success_key)

    return answer


def test_success_with_bad_integrity_is_discarded() -> None:
    async def main() -> None:
        transport, recorder, port = await fake_udp_server(_challenge_then(b"\x00" * 16))
        try:
            client = await TurnClient.connect("127.0.0.1", port, username="u", password="p",
                                              timeout_s=0.6, initial_rto_s=0.2)
            with pytest.raises(TransactionTimeout):
                await client.allocate()
            assert client.relayed_address is None
            assert client.stats.responses_discarded >= 1
            await client.close(deallocate=False)
        finally:
            transport.close()

    run(main())


def test_success_with_good_integrity_is_accepted() -> None:
    async def main() -> None:
        key = long_term_key("u", "fake.realm", "p")
        transport, recorder, port = await fake_udp_server(_challenge_then(key))
        try:
            client = await TurnClient.connect("127.0.0.1", port, username="u", password="p",
                                              timeout_s=2.0)
            assert await client.allocate() == ("192.0.2.7", 50000)
            signed = decode_message(recorder.received[-1][1])
            assert signed.get(Attr.USERNAME) == "u"
            assert signed.get(Attr.REALM) == "fake.realm"
            assert signed.get(Attr.NONCE) == "fake-nonce-1"
            assert client.stats.responses_discarded == 0
            await client.close(deallocate=False)
        finally:
            transport.close()

    run(main())


# ---------------------------------------------------------------------- stream framing


async def fake_stream_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
                             ) -> tuple[asyncio.base_events.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_tcp_responses_and_padded_channel_data_arrive_byte_by_byte() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = StreamFramer()
        frames: list[bytes] = []
        for _ in range(100):
            chunk = await reader.read(4096)
            if not chunk:
                return
            frames.extend(framer.feed(chunk))
            if frames:
                break
        request = decode_message(frames[0])
        reply = Message(Method.BINDING, MessageClass.SUCCESS, request.transaction_id)
        reply.add(Attr.XOR_MAPPED_ADDRESS, ("198.51.100.1", 4242))
        # A Data indication and padded ChannelData follow, all dribbled one byte at a time.
        data = Message(Method.DATA, MessageClass.INDICATION)
        data.add(Attr.XOR_PEER_ADDRESS, ("203.0.113.5", 7000))
        data.add(Attr.DATA, b"abc")
        stream = encode_message(reply) + encode_message(data) + encode_channel_data(0x4000, b"xyz", pad=True)
        for i in range(len(stream)):
            writer.write(stream[i:i + 1])
            await writer.drain()
        await asyncio.sleep(1.0)
        writer.close()

    async def main() -> None:
        server, port = await fake_stream_server(handler)
        try:
            client = await TurnClient.connect("127.0.0.1", port, transport="tcp", timeout_s=3.0)
            assert await client.binding() == ("198.51.100.1", 4242)
            assert await client.receive(2) == (("203.0.113.5", 7000), b"abc")
            # Channel 0x4000 is not bound on this client: its data is dropped, not delivered.
            with pytest.raises(TransactionTimeout):
                await client.receive(0.3)
            assert client.stats.data_dropped == 1
            await client.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_tcp_server_closing_fails_the_waiting_request_at_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(20)
        writer.close()

    async def main() -> None:
        server, port = await fake_stream_server(handler)
        try:
            client = await TurnClient.connect("127.0.0.1", port, transport="tcp", timeout_s=5.0)
            started = time.monotonic()
            with pytest.raises(TransportError):
                await client.binding()
            assert time.monotonic() - started < 2.0
            await client.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_tcp_connection_refused() -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound but not listening: connect is refused
            with pytest.raises(TransportError) as caught:
                await TurnClient.connect("127.0.0.1", port, transport="tcp", timeout_s=2.0)
        assert str(caught.value) == "connection refused"
        assert isinstance(caught.value.cause, ConnectionRefusedError)

    run(main())


def test_bad_options_are_refused() -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await TurnClient.connect("127.0.0.1", 9, transport="sctp")
        with pytest.raises(ValueError):
            await TurnClient.connect("127.0.0.1", 9, integrity="md5")

    run(main())
