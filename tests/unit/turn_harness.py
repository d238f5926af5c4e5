"""Drive the sans-IO TurnCore without sockets: a fake relay-port pool and a small client.

Time starts at 0.0 and only moves when a test says so; the wall clock is fixed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from turnserver.auth import ALGORITHM_MD5, ALGORITHM_SHA256, CredentialStore, NonceManager, long_term_key
from turnserver.auth.rest import rest_password
from turnserver.policy import PeerPolicy
from turnserver.stun import Attr, Message, MessageClass, Method, decode_message, encode_message
from turnserver.turn.core import CoreConfig, TurnCore

WALL_NOW = 1_800_000_000.0
SECRET = b"unit-secret"
REALM = "unit.test"
CLIENT: tuple[str, tuple[str, int], tuple[str, int]] = ("udp", ("198.51.100.7", 40000), ("192.0.2.1", 3478))
PEER = ("203.0.113.50", 6000)  # documentation range: the tests allow it explicitly


class FakeRelay:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address

    def __repr__(self) -> str:
        return f"FakeRelay({self.address})"


class FakeRelayPorts:
    def __init__(self, ipv4: str | None = "192.0.2.1", ipv6: str | None = None,
                 ports: range = range(50000, 50100), dont_fragment: bool = True) -> None:
        self.ips = {1: ipv4, 2: ipv6}
        self.free = {1: list(ports), 2: list(ports)}
        self.released: list[FakeRelay] = []
        self.open: set[FakeRelay] = set()
        self.df = dont_fragment
        self.df_requests: list[bool] = []
        self.tcp_requests: list[bool] = []

    def families(self) -> set[int]:
        return {f for f, ip in self.ips.items() if ip}

    def supports_dont_fragment(self) -> bool:
        return self.df

    def allocate(self, family: int, *, even_port: bool = False, reserve_next: bool = False,
                 dont_fragment: bool = False, tcp: bool = False) -> tuple[FakeRelay, FakeRelay | None] | None:
        ip = self.ips.get(family)
        if not ip:
            return None
        self.df_requests.append(dont_fragment)
        self.tcp_requests.append(tcp)
        for port in list(self.free[family]):
            if even_port and port % 2:
                continue
            if reserve_next and port + 1 not in self.free[family]:
                continue
            self.free[family].remove(port)
            relay = FakeRelay((ip, port))
            self.open.add(relay)
            reserved = None
            if reserve_next:
                self.free[family].remove(port + 1)
                reserved = FakeRelay((ip, port + 1))
                self.open.add(reserved)
            return relay, reserved
        return None

    def release(self, endpoint: FakeRelay) -> None:
        self.released.append(endpoint)
        self.open.discard(endpoint)
        family = 2 if ":" in endpoint.address[0] else 1
        self.free[family].append(endpoint.address[1])


@dataclass
class Harness:
    core: TurnCore
    ports: FakeRelayPorts
    ended: list[tuple[Any, str, float]] = field(default_factory=list)
    wall: list[float] = field(default_factory=lambda: [WALL_NOW])


def make_core(*, allow: tuple[str, ...] = ("203.0.113.0/24", "2001:db8::/32"),
              ports: FakeRelayPorts | None = None, static_users: dict | None = None,
              relay_addresses: tuple[str, ...] = ("192.0.2.1",), **config: Any) -> Harness:
    ports = ports or FakeRelayPorts()
    wall = [WALL_NOW]
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        return bytes((next(counter) + i) % 256 for i in range(n))

    harness_ended: list[tuple[Any, str, float]] = []
    core = TurnCore(
        config=CoreConfig(**{"realm": REALM, "software": "", **config}),
        credentials=CredentialStore(realm=REALM, secrets=[SECRET], static_users=static_users or {},
                                    wall_clock=lambda: wall[0]),
        nonces=NonceManager(key=b"k" * 32, lifetime_s=600, wall_clock=lambda: wall[0]),
        policy=PeerPolicy(allow=allow, relay_addresses=relay_addresses,
                          external_addresses={e: b for b, e in config.get("external_addresses", {}).items()},
                          relay_port_range=(50000, 50099), listening=[("192.0.2.1", 3478)]),
        relay_ports=ports,
        random_bytes=random_bytes,
        on_allocation_end=lambda a, reason, now: harness_ended.append((a, reason, now)),
    )
    return Harness(core, ports, harness_ended, wall)


def rest_user(user: str = "alice", expires: float = WALL_NOW + 3600) -> tuple[str, str]:
    username = f"{int(expires)}:{user}"
    return username, rest_password(SECRET, username)


class Client:
    """Builds requests like a real client: first unauthenticated, then with the nonce."""

    def __init__(self, h: Harness, five_tuple=CLIENT, username: str | None = None,
                 password: str | None = None, algorithm: int | None = None) -> None:
        self.h = h
        self.five_tuple = five_tuple
        if username is None:
            username, password = rest_user()
        self.username = username
        self.password = password or ""
        self.algorithm = algorithm  # None: classic MD5 without PASSWORD-ALGORITHM
        self.nonce: str | None = None

    @property
    def key(self) -> bytes:
        return long_term_key(self.username, REALM, self.password, self.algorithm or ALGORITHM_MD5)

    def send(self, msg: Message, now: float = 0.0, *, auth: bool = True, sink: Any = "sink",
             integrity: str | None = None) -> Message:
        reply = self.send_raw(msg, now, auth=auth, sink=sink, integrity=integrity)
        assert isinstance(reply, bytes), reply
        return decode_message(reply)

    def send_raw(self, msg: Message, now: float = 0.0, *, auth: bool = True, sink: Any = "sink",
                 integrity: str | None = None) -> Any:
        """What the core returns for ``msg``, undecoded: bytes, None, or a core object."""
        if auth and self.nonce is None:
            challenge = self.raw(Message(msg.method, MessageClass.REQUEST, attributes=list(msg.attributes)), now)
            assert challenge.msg_class == MessageClass.ERROR
            assert challenge.get(Attr.ERROR_CODE)[0] == 401
            self.nonce = challenge.get(Attr.NONCE)
        if auth:
            msg.add(Attr.USERNAME, self.username).add(Attr.REALM, REALM).add(Attr.NONCE, self.nonce)
            if self.algorithm is not None:
                msg.add(Attr.PASSWORD_ALGORITHMS, [(ALGORITHM_MD5, b""), (ALGORITHM_SHA256, b"")])
                msg.add(Attr.PASSWORD_ALGORITHM, (self.algorithm, b""))
            kind = integrity or ("sha256" if self.algorithm == ALGORITHM_SHA256 else "sha1")
            data = encode_message(msg, key=self.key, integrity=kind)
        else:
            data = encode_message(msg)
        return self.h.core.handle_stun(data, self.five_tuple, now, sink)

    def raw(self, msg: Message, now: float = 0.0) -> Message:
        reply = self.h.core.handle_stun(encode_message(msg), self.five_tuple, now, "sink")
        assert isinstance(reply, bytes)
        return decode_message(reply)

    def allocate(self, now: float = 0.0, **attrs: Any) -> Message:
        msg = request(Method.ALLOCATE, REQUESTED_TRANSPORT=17, **attrs)
        return self.send(msg, now)

    def refresh(self, now: float, lifetime: int | None = None, **attrs: Any) -> Message:
        if lifetime is not None:
            attrs["LIFETIME"] = lifetime
        return self.send(request(Method.REFRESH, **attrs), now)

    def permit(self, now: float, *peers: tuple[str, int]) -> Message:
        msg = request(Method.CREATE_PERMISSION)
        for peer in peers:
            msg.add(Attr.XOR_PEER_ADDRESS, peer)
        return self.send(msg, now)

    def bind(self, now: float, number: int, peer: tuple[str, int]) -> Message:
        return self.send(request(Method.CHANNEL_BIND, CHANNEL_NUMBER=number, XOR_PEER_ADDRESS=peer), now)


def request(method: int, **attrs: Any) -> Message:
    msg = Message(method, MessageClass.REQUEST)
    for name, value in attrs.items():
        msg.add(Attr[name], value)
    return msg


def code(msg: Message) -> int:
    """200 for a success response, else the error code."""
    if msg.msg_class == MessageClass.SUCCESS:
        return 200
    return msg.get(Attr.ERROR_CODE)[0]
