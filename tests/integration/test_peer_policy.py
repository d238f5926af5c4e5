"""The peer policy through the running server: every refused range, in its IPv4, IPv6 and
embedded-IPv6 forms, is refused with 403 on CreatePermission and ChannelBind; Send indications
toward refused peers are dropped; an allowed CIDR lets a refused range through.

Only responses are observed for non-loopback ranges: no test data is ever sent toward them.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from .raw_client import RawTurnClient, code

REFUSED_V4 = {
    "loopback": "127.0.0.5",
    "loopback_top": "127.255.255.254",
    "unspecified": "0.0.0.0",
    "this_network": "0.1.2.3",
    "private_10": "10.1.2.3",
    "private_172": "172.16.5.4",
    "private_192": "192.168.1.1",
    "cgnat": "100.64.0.1",
    "link_local": "169.254.1.1",
    "metadata": "169.254.169.254",
    "multicast": "224.0.0.1",
    "multicast_ssdp": "239.255.255.250",
    "broadcast": "255.255.255.255",
    "reserved": "240.0.0.1",
    "ietf_protocol": "192.0.0.8",
    "benchmarking": "198.18.0.1",
    "doc_1": "192.0.2.10",
    "doc_2": "198.51.100.10",
    "doc_3": "203.0.113.10",
}
REFUSED_V6 = {
    "v6_loopback": "::1",
    "v6_unspecified": "::",
    "ula_fc": "fc00::1",
    "ula_fd": "fd12:3456::1",
    "v6_link_local": "fe80::1",
    "v6_multicast": "ff02::1",
    "v6_documentation": "2001:db8::1",
    "site_local": "fec0::1",
    "discard": "100::1",
}


def embedded_forms(v4: str) -> dict[str, str]:
    """The same IPv4 address written in every IPv6 form that carries it."""
    n = int(ipaddress.IPv4Address(v4))
    hi, lo = n >> 16, n & 0xFFFF
    teredo_client = n ^ 0xFFFFFFFF
    return {
        "mapped": f"::ffff:{v4}",
        "mapped_hex": f"::FFFF:{hi:X}:{lo:X}",
        "mapped_exploded": ipaddress.IPv6Address(f"::ffff:{v4}").exploded,
        "compatible": f"::{hi:x}:{lo:x}" if n > 1 else None,
        "translated": f"::ffff:0:{v4}",
        "nat64": f"64:ff9b::{v4}",
        "nat64_local": f"64:ff9b:1::{v4}",
        "6to4": f"2002:{hi:x}:{lo:x}::1",
        "teredo_client": f"2001:0:4136:e378:8000:63bf:{teredo_client >> 16:x}:{teredo_client & 0xFFFF:x}",
        "teredo_server": f"2001:0:{hi:x}:{lo:x}:8000:63bf:3fff:fdd2",
    }


def all_cases() -> list[tuple[str, str]]:
    cases = [(name, ip) for name, ip in REFUSED_V4.items()]
    cases += [(name, ip) for name, ip in REFUSED_V6.items()]
    for name, ip in REFUSED_V4.items():
        for form, text in embedded_forms(ip).items():
            if text is not None and not (form == "compatible" and ip == "0.0.0.0"):
                cases.append((f"{name}-{form}", text))
    return cases


CASES = all_cases()


@pytest.fixture(scope="module")
def dual_server(tmp_path_factory):
    from .server import start_server

    server = start_server(tmp_path_factory.mktemp("policy"), relay_addresses=["127.0.0.1", "::1"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dual_client(dual_server):
    client = RawTurnClient(dual_server.address(), *dual_server.credentials("policy"))
    reply = client.allocate(ADDITIONAL_ADDRESS_FAMILY=2)
    assert code(reply) == 200 and len(reply.get_all(0x0016)) == 2
    yield client
    client.close()


@pytest.mark.parametrize("name,ip", CASES, ids=[c[0] for c in CASES])
def test_refused_on_create_permission_and_channel_bind(dual_client, name: str, ip: str) -> None:
    if ip != "::1":
        assert code(dual_client.permit((ip, 5000))) == 403, ip
    # ::1 is this server's own IPv6 relay address: a permission to it is allowed (two clients
    # of one server must reach each other), but never to a port outside the relay range.
    assert code(dual_client.bind(0x4321, (ip, 5000))) == 403, ip


def test_a_refused_peer_spoils_a_multi_address_create_permission(dual_client) -> None:
    assert code(dual_client.permit(("8.8.8.8", 1), ("10.0.0.1", 1))) == 403


def test_public_addresses_are_allowed(dual_client) -> None:
    # Only the response is observed; nothing is sent to these addresses.
    assert code(dual_client.permit(("8.8.8.8", 53), ("2606:4700:4700::1111", 53))) == 200
    assert code(dual_client.bind(0x4100, ("1.1.1.1", 53))) == 200


def test_allowed_cidr_lets_a_refused_range_through_in_every_form(server_factory) -> None:
    server = server_factory(relay_addresses=["127.0.0.1", "::1"], allowed_peers=["10.0.0.0/8", "fd00::/8"])
    client = RawTurnClient(server.address(), *server.credentials("ops"))
    try:
        assert code(client.allocate(ADDITIONAL_ADDRESS_FAMILY=2)) == 200
        for ip in ["10.1.2.3", "fd12::5", *[t for t in embedded_forms("10.1.2.3").values() if t and "2002" not in t and "2001:0" not in t]]:
            assert code(client.permit((ip, 5000))) == 200, ip
        assert code(client.permit(("192.168.1.1", 5000))) == 403
    finally:
        client.close()


def listener(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.settimeout(0.5)
    return sock


def received(sock: socket.socket) -> bytes | None:
    try:
        return sock.recvfrom(2048)[0]
    except (socket.timeout, TimeoutError):
        return None


def test_send_indications_toward_refused_loopback_peers_are_dropped(server_factory) -> None:
    server = server_factory()
    sink = listener("127.0.0.2")
    client = RawTurnClient(server.address(), *server.credentials("sender"))
    try:
        assert code(client.allocate()) == 200
        target = sink.getsockname()
        assert code(client.permit(target)) == 403
        for form in (target[0], f"::ffff:{target[0]}", f"64:ff9b::{target[0]}"):
            client.send_indication((form, target[1]), b"must not arrive")
        # The server's own listening port is never a relay target, whatever the policy.
        client.send_indication(server.address(), b"loop")
        assert received(sink) is None
    finally:
        client.close()
        sink.close()


def test_allowed_loopback_peer_receives_send_indications(server_factory) -> None:
    server = server_factory(allowed_peers=["127.0.0.2/32"])
    sink = listener("127.0.0.2")
    client = RawTurnClient(server.address(), *server.credentials("sender"))
    try:
        assert code(client.allocate()) == 200
        target = sink.getsockname()
        assert code(client.permit(target)) == 200
        client.send_indication(target, b"hello peer")
        assert received(sink) == b"hello peer"
        # Still never into our own listener, even under an allow rule that covers it.
        assert code(client.bind(0x4000, server.address())) == 403
    finally:
        client.close()
        sink.close()
