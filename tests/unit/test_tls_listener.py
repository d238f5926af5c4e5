"""A live TLS listener of an in-process TurnServer on 127.0.0.1, under asyncio and uvloop:
certificate reload (new handshakes get the new certificate, established connections keep
working), ALPN offered but not required (RFC 7443), any SNI accepted, old protocols and
non-ECDHE suites refused, handshake failures counted, accept paused when out of descriptors."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import warnings
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from turnserver.config import load_config
from turnserver.io.server import TurnServer
from turnserver.io.stream import TlsAcceptor
from turnserver.io.tls import TlsError, make_self_signed
from turnserver.stun import Message, MessageClass, Method, decode_message, encode_message

LOOPS = ["asyncio", "uvloop"]


def run(loop_kind: str, scenario: Callable[[], Awaitable[Any]]) -> Any:
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(scenario(), 20))


def write_pair(directory: Path, name: str) -> tuple[str, str, bytes]:
    cert_pem, key_pem = make_self_signed(["127.0.0.1", "localhost"])
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return str(cert_path), str(key_path), der


def server_config(**overrides: Any) -> Any:
    options = {
        "listen_udp": [], "listen_tcp": [], "listen_tls": ["127.0.0.1:0"],
        "relay_addresses": ["127.0.0.1"], "relay_port_min": 50000, "relay_port_max": 50999,
        "metrics_listen": "", "realm": "test.turnd",
    }
    options.update(overrides)
    return load_config(None, env={}, overrides=options)


def client_context(*, alpn: list[str] | None = None, maximum: ssl.TLSVersion | None = None,
                   ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1, on purpose
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


class TlsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> TlsClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname), 5)
        return cls(reader, writer)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self.writer.get_extra_info("ssl_object")

    def peer_certificate(self) -> bytes:
        return self.ssl_object.getpeercert(binary_form=True)

    async def binding(self) -> Message:
        request = Message(Method.BINDING, MessageClass.REQUEST)
        self.writer.write(encode_message(request))
        header = await asyncio.wait_for(self.reader.readexactly(20), 5)
        body = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(header[2:4], "big")), 5)
        reply = decode_message(header + body)
        assert reply.transaction_id == request.transaction_id
        return reply

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass


async def started(config: Any) -> tuple[TurnServer, int]:
    server = TurnServer(config, secrets=[b"unit-test-secret"])
    await server.start()
    port = next(lst.address[1] for lst in server.state.listeners if lst.transport == "tls")
    return server, port


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_reload_serves_the_new_certificate_to_new_handshakes_only(tmp_path: Path, loop_kind: str) -> None:
    a_cert, a_key, a_der = write_pair(tmp_path, "a")
    b_cert, b_key, b_der = write_pair(tmp_path, "b")
    assert a_der != b_der

    async def scenario() -> None:
        config = server_config(tls_cert_file=a_cert, tls_key_file=a_key)
        server, port = await started(config)
        try:
            old = await TlsClient.connect(port, client_context())
            assert old.peer_certificate() == a_der
            assert (await old.binding()).msg_class == MessageClass.SUCCESS
            server.reload_tls(server_config(tls_cert_file=b_cert, tls_key_file=b_key))
            new = await TlsClient.connect(port, client_context())
            assert new.peer_certificate() == b_der
            # The established connection keeps its session and is still served.
            assert (await old.binding()).msg_class == MessageClass.SUCCESS
            assert old.peer_certificate() == a_der
            b_not_after = x509.load_der_x509_certificate(b_der).not_valid_after_utc.timestamp()
            assert server.tls_not_after == b_not_after
            # A broken pair is refused and the certificate in service stays.
            with pytest.raises(TlsError):
                server.reload_tls(server_config(tls_cert_file=a_cert, tls_key_file=b_key))
            third = await TlsClient.connect(port, client_context())
            assert third.peer_certificate() == b_der
            assert server.tls_not_after == b_not_after
            for client in (old, new, third):
                assert (await client.binding()).msg_class == MessageClass.SUCCESS
                await client.close()
        finally:
            await server.stop()

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_alpn_is_offered_not_required_and_any_sni_is_accepted(loop_kind: str) -> None:
    async def scenario() -> None:
        server, port = await started(server_config())
        try:
            cases = [
                (client_context(alpn=["stun.turn"]), "localhost", "stun.turn"),
                (client_context(alpn=["h2", "stun.turn"]), "localhost", "stun.turn"),
                (client_context(alpn=["h2"]), "localhost", None),  # no overlap: no ALPN, no failure
                (client_context(), "localhost", None),  # browsers send none
                (client_context(), "unknown.example.net", None),  # a name the certificate lacks
            ]
            for ctx, name, expected in cases:
                client = await TlsClient.connect(port, ctx, server_hostname=name)
                assert client.ssl_object.selected_alpn_protocol() == expected
                assert (await client.binding()).msg_class == MessageClass.SUCCESS
                await client.close()
        finally:
            await server.stop()

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_old_protocols_and_non_ecdhe_suites_are_refused_and_counted(loop_kind: str) -> None:
    async def scenario() -> None:
        server, port = await started(server_config())
        try:
            refused = [
                # SECLEVEL 0, or the client's OpenSSL would not even offer TLS 1.1.
                client_context(maximum=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0"),
                # TLS 1.2 with only static-RSA / CBC suites to offer.
                client_context(maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256:AES256-SHA"),
            ]
            for ctx in refused:
                with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                    await TlsClient.connect(port, ctx)
            ok = await TlsClient.connect(port, client_context(
                maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305"))
            assert ok.ssl_object.version() == "TLSv1.2"
            assert ok.ssl_object.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
            await ok.close()
            assert server.streams is not None
            stats = server.streams.stats
            for _ in range(100):
                if stats.closed["handshake"] >= 2:
                    break
                await asyncio.sleep(0.02)
            assert stats.closed["handshake"] == 2
            assert stats.accepted["tls"] == 3
        finally:
            await server.stop()

    run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_stop_closes_open_connections_and_balances_the_counters(loop_kind: str) -> None:
    async def scenario() -> None:
        server, port = await started(server_config(listen_tcp=["127.0.0.1:0"]))
        tcp_port = next(lst.address[1] for lst in server.state.listeners if lst.transport == "tcp")
        tls_client = await TlsClient.connect(port, client_context())
        assert (await tls_client.binding()).msg_class == MessageClass.SUCCESS
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        assert server.streams is not None
        stats = server.streams.stats
        for _ in range(100):
            if stats.open["tcp"] == 1:
                break
            await asyncio.sleep(0.02)
        assert stats.open == {"tcp": 1, "tls": 1}
        await server.stop()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        for _ in range(100):
            if not server.streams.connections:
                break
            await asyncio.sleep(0.02)
        assert stats.open == {"tcp": 0, "tls": 0}
        assert stats.closed["shutdown"] == 2
        assert sum(stats.accepted.values()) == sum(stats.open.values()) + sum(stats.closed.values())
        writer.close()
        await tls_client.close()

    run(loop_kind, scenario)


class FlakyListener:
    """A listening socket whose first accept() fails as if the process had no descriptor left."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_out_of_descriptors_pauses_the_tls_listener_instead_of_spinning(loop_kind: str) -> None:
    async def scenario() -> None:
        server, port = await started(server_config())
        try:
            assert server.streams is not None
            acceptor = server.streams.servers[0]
            assert isinstance(acceptor, TlsAcceptor)
            flaky = FlakyListener(acceptor.sock)
            acceptor.sock = flaky  # type: ignore[assignment]
            loop = asyncio.get_running_loop()
            started_at = loop.time()
            client_task = asyncio.ensure_future(TlsClient.connect(port, client_context()))
            await asyncio.sleep(0.5)
            # One failed accept, then quiet: a readable listener is not polled in a loop.
            assert flaky.calls == 1 and not client_task.done()
            client = await asyncio.wait_for(client_task, 5)
            assert loop.time() - started_at >= 0.9  # served after the pause, not before
            assert (await client.binding()).msg_class == MessageClass.SUCCESS
            await client.close()
        finally:
            await server.stop()

    run(loop_kind, scenario)
