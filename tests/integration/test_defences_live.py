"""Defences of a real ``turnd serve`` seen from outside: the own-port rule on Send
indications under a permission, and Send/Data traffic in usage records and metrics.

All traffic stays on 127.0.0.0/8; every wait is bounded; each test stops only the servers it
started (through ``server_factory``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from turnserver.client import TurnClient
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message

from .raw_client import RawTurnClient, code
from .server import RELAY_PORTS, RunningServer
from .test_metrics import Scrape, scrape, wait_for
from .test_usage_log import usage_entries

QUIET_S = 1.0  # how long "nothing arrives" is watched for
PEER_IP = "127.0.0.5"


def metrics(server: RunningServer) -> Scrape:
    return asyncio.run(asyncio.wait_for(scrape(server), 10))


def counter(now: Scrape, name: str, **labels: str) -> float:
    value = now.get(name, **labels)
    return 0.0 if value is None else value


def udp_socket(ip: str, *, outside: tuple[int, int] | None = None) -> socket.socket:
    """A UDP socket on ``ip``, port 0; with ``outside``, re-bound until its port is outside
    that range (bounded)."""
    for _ in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, 0))
        sock.settimeout(QUIET_S)
        port = sock.getsockname()[1]
        if outside is None or not outside[0] <= port <= outside[1]:
            return sock
        sock.close()
    raise AssertionError(f"no port outside {outside} after 50 tries")


def received(sock: socket.socket) -> bytes | None:
    try:
        return sock.recvfrom(65536)[0]
    except (socket.timeout, TimeoutError):
        return None


def binding_request() -> bytes:
    return encode_message(Message(Method.BINDING, MessageClass.REQUEST))


def test_send_to_the_servers_own_listening_port_is_refused_under_a_permission(server_factory: Any) -> None:
    """With every loopback peer allowed and a permission for 127.0.0.1 installed, a Send
    toward the server's own listening port is still refused, by the port rule alone.

    The payload is a Binding request: relayed, it would reach the listener from the relay
    address, the answer would come back to the relay from 127.0.0.1 (permitted) and reach
    the client as a Data indication. So "nothing arrives at the client" is observable.
    """
    server = server_factory(metrics_listen="127.0.0.1:0", allowed_peers=["127.0.0.0/8"])
    client = RawTurnClient(server.address(), *server.credentials("own-port"))
    peer = udp_socket(PEER_IP)
    try:
        assert code(client.allocate()) == 200
        assert code(client.permit(("127.0.0.1", 0), peer.getsockname())) == 200
        probe = binding_request()
        before = metrics(server)
        client.send_indication(server.address(), probe)
        assert client.recv(QUIET_S) is None  # no Data indication: nothing went round
        after = metrics(server)
        assert counter(after, "turn_peer_policy_refusals_total", reason="own_port") == \
            counter(before, "turn_peer_policy_refusals_total", reason="own_port") + 1
        assert counter(after, "turn_dropped_packets_total", reason="policy") == \
            counter(before, "turn_dropped_packets_total", reason="policy") + 1
        assert counter(after, "turn_relayed_packets_total", direction="client_to_peer", transport="udp") == 0
        # Control: a permitted loopback peer that is not the server gets the same kind of Send.
        client.send_indication(peer.getsockname(), probe)
        assert received(peer) == probe
        final = metrics(server)
        assert counter(final, "turn_relayed_packets_total", direction="client_to_peer", transport="udp") == 1
        assert counter(final, "turn_dropped_packets_total", reason="policy") == \
            counter(after, "turn_dropped_packets_total", reason="policy")
    finally:
        client.close()
        peer.close()


def test_send_to_the_relay_address_outside_the_relay_range_is_refused_under_a_permission(
        server_factory: Any) -> None:
    """The relay address may be a peer (two clients of one server), but only on its relay
    ports: a permission for it does not carry a Send to one of its other ports."""
    server = server_factory(metrics_listen="127.0.0.1:0")  # default policy; 127.0.0.1 is the relay address
    client = RawTurnClient(server.address(), *server.credentials("sender"))
    other = RawTurnClient(server.address(), *server.credentials("receiver"))
    target = udp_socket("127.0.0.1", outside=RELAY_PORTS)
    try:
        assert code(client.allocate()) == 200
        reply = other.allocate()
        assert code(reply) == 200
        other_relay = other.relayed(reply)
        assert code(client.permit(("127.0.0.1", 0))) == 200
        assert code(other.permit(("127.0.0.1", 0))) == 200
        before = metrics(server)
        client.send_indication(target.getsockname(), b"must not arrive")
        assert received(target) is None
        after = metrics(server)
        assert counter(after, "turn_peer_policy_refusals_total", reason="own_port") == \
            counter(before, "turn_peer_policy_refusals_total", reason="own_port") + 1
        assert counter(after, "turn_dropped_packets_total", reason="policy") == \
            counter(before, "turn_dropped_packets_total", reason="policy") + 1
        # Control: the same permission carries a Send to the other client's relayed address.
        client.send_indication(other_relay, b"hello neighbour")
        data = other.recv(5.0)
        assert data is not None
        indication = decode_message(data)
        assert indication.method == Method.DATA and indication.get(Attr.DATA) == b"hello neighbour"
        assert counter(metrics(server), "turn_dropped_packets_total", reason="policy") == \
            counter(after, "turn_dropped_packets_total", reason="policy")
    finally:
        client.close()
        other.close()
        target.close()


class PeerProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.append((data, (addr[0], addr[1])))


def test_send_and_data_indications_are_in_the_usage_record_and_the_relayed_counters(
        server_factory: Any) -> None:
    """A client that never binds a channel: everything goes as Send and Data indications, and
    the usage record and the relayed bytes/packets metrics count exactly what was carried."""
    server = server_factory(log_format="json", metrics_listen="127.0.0.1:0", allowed_peers=[f"{PEER_IP}/32"])
    username, password = server.credentials("indications")
    up = [1 + 97 * i for i in range(12)]  # client -> peer
    down = [3 + 151 * i for i in range(9)]  # peer -> client

    async def scenario() -> tuple[Scrape, Scrape, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        peer_transport, peer = await loop.create_datagram_endpoint(PeerProtocol, local_addr=(PEER_IP, 0))
        peer_addr = peer_transport.get_extra_info("sockname")[:2]
        client = await TurnClient.connect("127.0.0.1", server.port("udp"), username=username, password=password)
        try:
            relayed = await client.allocate()
            await client.create_permission(peer_addr)
            for i, size in enumerate(up):
                client.send_indication(peer_addr, bytes([i]) * size)
                assert await wait_for(lambda: len(peer.datagrams) == i + 1), f"Send {i} never arrived"
            assert [len(d) for d, _ in peer.datagrams] == up
            assert {src for _, src in peer.datagrams} == {tuple(relayed)}
            for i, size in enumerate(down):
                peer_transport.sendto(bytes([i]) * size, relayed)
                source, data = await client.receive(5.0)
                assert (source, data) == (tuple(peer_addr), bytes([i]) * size)
            assert client.channels == {}  # no channel: every datagram was an indication
            live = await scrape(server)
        finally:
            await client.close()
            peer_transport.close()
        assert await wait_for(lambda: len(usage_entries(server)) == 1)
        return live, await scrape(server), tuple(relayed)

    live, ended, relayed = asyncio.run(asyncio.wait_for(scenario(), 60))
    (record,) = usage_entries(server)
    assert record["user"] == username and record["reason"] == "deleted"
    assert record["relayed"] == [f"{relayed[0]}:{relayed[1]}"]
    assert (record["bytes_to_peer"], record["packets_to_peer"]) == (sum(up), len(up))
    assert (record["bytes_to_client"], record["packets_to_client"]) == (sum(down), len(down))
    assert record["peers"] == 1
    # While the allocation lived, and after it ended, the counters are exactly the same.
    for now in (live, ended):
        assert now.get("turn_relayed_bytes_total", direction="client_to_peer", transport="udp") == sum(up)
        assert now.get("turn_relayed_packets_total", direction="client_to_peer", transport="udp") == len(up)
        assert now.get("turn_relayed_bytes_total", direction="peer_to_client", transport="udp") == sum(down)
        assert now.get("turn_relayed_packets_total", direction="peer_to_client", transport="udp") == len(down)
    assert live.get("turn_allocations", transport="udp", family="ipv4") == 1
    assert ended.get("turn_allocations", transport="udp", family="ipv4") == 0
