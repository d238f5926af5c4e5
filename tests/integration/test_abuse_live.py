"""The abuse defences against a running ``turnd serve`` on 127.0.0.1: reflection factors and
the per-source answer limit, the stream connection and reply limits, and the peer policy in
the layouts operators run (a media server on the relay host, wildcard listeners).

Every loop is bounded in count and time; all traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable

import aioice.turn
import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, StreamFramer, decode_message, encode_message

from .raw_client import RawTurnClient, code
from .server import RELAY_PORTS, RunningServer
from .test_metrics import scrape
from .test_stream_support import client_tls_context, connect, vm_rss_kib

TIMEOUT_S = 5.0


def bare(method: int, attributes: list[tuple[int, Any]] | None = None) -> tuple[bytes, bytes]:
    msg = Message(method, MessageClass.REQUEST, attributes=attributes or [])
    return encode_message(msg), msg.transaction_id


def udp_socket(ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.settimeout(TIMEOUT_S)
    return sock


def answer_size(server: tuple[str, int], data: bytes, source: str = "127.0.0.1") -> int:
    sock = udp_socket(source)
    try:
        sock.sendto(data, server)
        return len(sock.recv(65536))
    finally:
        sock.close()


# -- reflection -----------------------------------------------------------------------------------


def test_reflection_factors_of_every_unauthenticated_exchange(server_factory: Callable[..., RunningServer]) -> None:
    # The defaults: realm "turnd" and software "turnd" (never in an unauthenticated answer).
    server = server_factory(realm="turnd", software="turnd", listen_udp=["127.0.0.1:0", "[::1]:0"])
    addr = server.address("udp")
    factors = {}
    for name, method in (("allocate", Method.ALLOCATE), ("refresh", Method.REFRESH),
                         ("create_permission", Method.CREATE_PERMISSION),
                         ("channel_bind", Method.CHANNEL_BIND)):
        data, _ = bare(method)
        factors[name] = answer_size(addr, data) / len(data)
    data, _ = bare(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)])
    factors["allocate_with_transport"] = answer_size(addr, data) / len(data)
    data, _ = bare(Method.BINDING)
    factors["binding"] = answer_size(addr, data) / len(data)
    # A sound header with a broken attribute: 400 with no reason phrase.
    broken = bytearray(bare(Method.REFRESH, [(Attr.LIFETIME, 1)])[0])
    broken[22:24] = b"\x00\x08"  # LIFETIME claims 8 bytes, 4 are there
    factors["malformed"] = answer_size(addr, bytes(broken)) / len(broken)
    for name, factor in factors.items():
        limit = 1.6 if name == "binding" else 4.0
        assert factor <= limit, (name, factor, factors)
    # Over IPv6 the mapped address in XOR-MAPPED-ADDRESS is 12 bytes longer: 2.2.
    v6 = next(lst for lst in server.info["listeners"] if lst["transport"] == "udp" and ":" in lst["host"])
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT_S)
    try:
        sock.sendto(bare(Method.BINDING)[0], ("::1", v6["port"]))
        assert len(sock.recv(65536)) / 20 <= 2.2
    finally:
        sock.close()


def test_a_burst_of_2000_bare_allocates_from_one_source_gets_at_most_100_answers(
        server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(metrics_listen="127.0.0.1:0")
    addr = server.address("udp")
    flood = udp_socket()
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    flood.setblocking(False)
    answers = 0
    try:
        started = time.monotonic()
        for i in range(2000):
            flood.sendto(bare(Method.ALLOCATE, [(Attr.REQUESTED_TRANSPORT, 17)])[0], addr)
            if i % 50 == 49:
                time.sleep(0.02)  # 2000 in about 0.8 s, and the server keeps up
            while True:
                try:
                    flood.recv(65536)
                    answers += 1
                except BlockingIOError:
                    break
        spent = time.monotonic() - started
        # Another source is answered at once, while the flood's bucket is empty.
        other = RawTurnClient(addr, *server.credentials("bob"), bind_ip="127.0.0.2")
        try:
            assert code(other.allocate()) == 200
        finally:
            other.close()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                flood.recv(65536)
                answers += 1
            except BlockingIOError:
                time.sleep(0.02)
    finally:
        flood.close()
    assert spent < 1.5, spent
    assert 40 <= answers <= 100, answers
    metrics = asyncio.run(scrape(server))
    withheld = metrics.get("turn_limit_refusals_total", limit="challenge_rate")
    assert withheld is not None and withheld >= 2000 - 100


# -- stream connections ---------------------------------------------------------------------------


def tcp_from(server: RunningServer, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    sock.bind((source, 0))
    try:
        sock.connect(("127.0.0.1", server.port("tcp")))
    except ConnectionResetError:
        pass  # refused so fast that the reset came before connect() returned: binding_works says no
    return sock


def binding_works(sock: socket.socket) -> bool:
    data, tid = bare(Method.BINDING)
    try:
        sock.sendall(data)
        framer = StreamFramer()
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            for frame in framer.feed(chunk):
                if decode_message(frame).transaction_id == tid:
                    return True
    except OSError:
        return False
    return False


def test_connections_per_source_are_capped(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(listen_tcp=["127.0.0.1:0"], max_connections_per_source=4,
                            metrics_listen="127.0.0.1:0")
    socks = [tcp_from(server, "127.0.0.1") for _ in range(6)]
    others = []
    try:
        works = [binding_works(s) for s in socks]
        assert works == [True] * 4 + [False] * 2, works
        others = [tcp_from(server, "127.0.0.3") for _ in range(2)]  # another source
        assert all(binding_works(s) for s in others)
        metrics = asyncio.run(scrape(server))
        assert metrics.get("turn_limit_refusals_total", limit="connections_per_source") == 2
        assert metrics.get("turn_stream_connections_closed_total", reason="source_limit") == 2
        # A slot comes back when a connection closes.
        socks[0].close()
        time.sleep(0.3)
        again = tcp_from(server, "127.0.0.1")
        others.append(again)
        assert binding_works(again)
    finally:
        for s in socks + others:
            s.close()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_pipelining_client_that_never_reads_pins_only_a_small_reply_allowance(
        server_factory: Callable[..., RunningServer], transport: str) -> None:
    server = server_factory(listen_tcp=["127.0.0.1:0"], listen_tls=["127.0.0.1:0"],
                            metrics_listen="127.0.0.1:0", stream_unallocated_write_buffer_bytes=8192)
    sock = connect(server, transport, rcvbuf=4096)
    data, tid = bare(Method.BINDING)
    chunk = data * 3277  # 64 KiB of Bindings per send
    limit = 16 * 1024 * 1024  # far more than the kernel's buffers on both sides can hide
    baseline = vm_rss_kib(server.proc.pid)
    sent = 0
    sock.settimeout(0.5)
    deadline = time.monotonic() + 15.0
    while sent < limit and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except (socket.timeout, *ssl_want_errors()):
            break  # no progress for half a second: the server stopped reading
    grown = vm_rss_kib(server.proc.pid) - baseline
    metrics = asyncio.run(scrape(server))
    assert sent < limit, "the server read 16 MB of requests whose answers nobody read"
    assert metrics.get("turn_stream_read_pauses_total") >= 1
    assert grown < 8 * 1024, grown  # the allowance and one read's worth, not megabytes
    if transport == "tcp":
        # The kernel's send queue toward the client is held small too (it could grow to MBs).
        queued = server_send_queue(server.port("tcp"), sock.getsockname()[1])
        assert queued is not None and queued < 256 * 1024, queued
    # Another client is served meanwhile.
    other = connect(server, "tcp")
    try:
        assert binding_works(other)
    finally:
        other.close()
    # Once it reads, every whole request it sent is answered: pushed back, not dropped.
    sock.settimeout(TIMEOUT_S)
    framer = StreamFramer()
    answered = 0
    expected = sent // len(data)
    deadline = time.monotonic() + 30.0
    while answered < expected and time.monotonic() < deadline:
        got = sock.recv(1 << 20)
        assert got, "closed by the server"
        for frame in framer.feed(got):
            assert decode_message(frame).transaction_id == tid
            answered += 1
    sock.close()
    assert answered == expected and expected > 0


def server_send_queue(server_port: int, client_port: int) -> int | None:
    """Bytes in the kernel's send queue of the server's side of a loopback TCP connection."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(fields[4].split(":")[0], 16)
    return None


def ssl_want_errors() -> tuple[type[BaseException], ...]:
    import ssl

    return (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError)


# -- the peer policy in real layouts ---------------------------------------------------------------


def low_port_peer(ip: str = "127.0.0.1") -> socket.socket:
    """An echo peer on a port below the relay range, as a media server on the host has."""
    for port in range(20000, 20200):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.close()
            continue
        sock.settimeout(TIMEOUT_S)
        return sock
    raise RuntimeError("no free low port for the echo peer")


class Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def aioice_to_peer(server: RunningServer, transport: str, peer: socket.socket) -> list[bytes]:
    username, password = server.credentials("alice")
    if transport == "udp":
        addr, kind, context = server.address("udp"), "udp", None
    else:
        addr, kind, context = ("127.0.0.1", server.port("tls")), "tcp", client_tls_context(["stun.turn"])
    t, proto = await aioice.turn.create_turn_endpoint(Collect, addr, username, password, lifetime=600,
                                                      transport=kind, ssl=context)
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    try:
        target = peer.getsockname()
        for i in range(5):
            t.sendto(b"ping-%d" % i, target)
            data, relayed = await loop.run_in_executor(None, peer.recvfrom, 2048)
            peer.sendto(b"echo-" + data, relayed)
            got.append(await asyncio.wait_for(proto.queue.get(), TIMEOUT_S))
    finally:
        t.close()
        await asyncio.sleep(0.1)
    return got


@pytest.mark.parametrize("transport", ["udp", "tls"])
def test_an_echo_peer_on_a_low_port_of_the_relay_address_is_reachable_when_allowed(
        server_factory: Callable[..., RunningServer], transport: str) -> None:
    # An SFU on the relay host: relay on 127.0.0.1, allowed_peers covers it, peer on a low port.
    server = server_factory(listen_tls=["127.0.0.1:0"], allowed_peers=["127.0.0.0/8"])
    peer = low_port_peer()
    try:
        got = asyncio.run(asyncio.wait_for(aioice_to_peer(server, transport, peer), 30))
    finally:
        peer.close()
    assert got == [b"echo-ping-%d" % i for i in range(5)]


def test_own_address_only_on_held_relay_ports_and_never_on_listening_ports(
        server_factory: Callable[..., RunningServer]) -> None:
    # Default policy (no allow CIDR): the relay address 127.0.0.1 is reachable only on ports
    # that turnd holds. A service inside the relay range (WireGuard on 51820, say) is not.
    server = server_factory(metrics_listen="127.0.0.1:0")
    addr = server.address("udp")
    other_service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(RELAY_PORTS[1], RELAY_PORTS[0], -1):
        try:
            other_service.bind(("127.0.0.1", port))
            break
        except OSError:
            continue
    a = RawTurnClient(addr, *server.credentials("alice"))
    b = RawTurnClient(addr, *server.credentials("bob"))
    try:
        assert code(a.allocate()) == 200
        relayed_b = b.relayed(b.allocate())
        assert code(a.bind(0x4000, relayed_b)) == 200  # held by turnd: another client
        assert code(a.bind(0x4001, other_service.getsockname())) == 403
        assert code(a.bind(0x4002, ("127.0.0.1", server.port("udp")))) == 403
        assert code(a.bind(0x4003, ("127.0.0.1", server.port("metrics")))) == 403
        assert code(a.bind(0x4004, ("127.0.0.1", 22))) == 403
    finally:
        a.close()
        b.close()
        other_service.close()
    metrics = asyncio.run(scrape(server))
    assert metrics.get("turn_peer_policy_refusals_total", reason="own_port") >= 4


def test_wildcard_listeners_guard_every_address_of_the_host(server_factory: Callable[..., RunningServer]) -> None:
    # listen on 0.0.0.0: 127.0.0.2:<port> and the host's other addresses reach the listener.
    server = server_factory(listen_udp=["0.0.0.0:0"], allowed_peers=["0.0.0.0/0"],
                            metrics_listen="127.0.0.1:0")
    port = server.port("udp")
    from turnserver.io.interfaces import host_addresses

    addresses = [ip for ip in host_addresses() if ":" not in ip] + ["127.0.0.2", "127.9.9.9", "0.0.0.0"]
    client = RawTurnClient(("127.0.0.1", port), *server.credentials("alice"))
    try:
        assert code(client.allocate()) == 200
        for i, ip in enumerate(addresses):
            assert code(client.bind(0x4000 + i, (ip, port))) == 403, ip
        peer = low_port_peer("127.0.0.2")  # allowed, not a listening port: reachable
        try:
            assert code(client.bind(0x4100, peer.getsockname())) == 200
            frame = struct.pack("!HH", 0x4100, 5) + b"hello" + b"\x00" * 3
            client.send_raw(frame)
            assert peer.recvfrom(100)[0] == b"hello"
        finally:
            peer.close()
    finally:
        client.close()
