"""PeerPolicy.check: default refusals in every embedded form, operator CIDRs, own addresses, NAT mapping."""

import ipaddress
import random
from collections.abc import Callable

import pytest

from turnserver.policy import PeerDecision, PeerPolicy, PolicyConfigError

M32 = 0xFFFF_FFFF
PUBLIC_V4 = "8.8.8.8"

# Representatives of every default-refused IPv4 range, with the reason expected.
REFUSED_V4 = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("169.254.0.1", "link_local"),
    ("169.254.169.254", "link_local"),  # cloud metadata service
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("254.255.255.255", "reserved"),
    ("192.0.0.1", "reserved"),
    ("192.0.0.9", "reserved"),
    ("198.18.0.1", "reserved"),
    ("198.19.255.254", "reserved"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
]

# Just outside each refused range, and some well-known public addresses.
PUBLIC_V4_SAMPLE = [
    "8.8.8.8",
    "1.1.1.1",
    "9.255.255.255",
    "11.0.0.1",
    "126.255.255.255",
    "128.0.0.1",
    "172.15.255.255",
    "172.32.0.1",
    "192.167.255.255",
    "192.169.0.1",
    "100.63.255.255",
    "100.128.0.1",
    "169.253.255.255",
    "169.255.0.1",
    "192.0.1.255",
    "192.0.3.1",
    "198.17.255.255",
    "198.20.0.1",
    "198.51.99.255",
    "203.0.114.1",
    "223.255.255.255",
]

REFUSED_V6 = [
    ("::", "unspecified"),
    ("0:0:0:0:0:0:0:0", "unspecified"),
    ("::1", "loopback"),
    ("0000:0000:0000:0000:0000:0000:0000:0001", "loopback"),
    ("fe80::1", "link_local"),
    ("FE80::ABCD:1", "link_local"),
    ("febf:ffff::1", "link_local"),
    ("fec0::1", "site_local"),
    ("FeFf::1", "site_local"),
    ("fc00::1", "ula"),
    ("fd12:3456:789a::1", "ula"),
    ("FDFF:FFFF::1", "ula"),
    ("ff02::1", "multicast"),
    ("FF0E::1:3", "multicast"),
    ("100::1", "reserved"),
    ("0100:0000:0000:0000:ffff:ffff:ffff:ffff", "reserved"),
    ("2001:db8::1", "documentation"),
    ("2001:0DB8:0000:0000:0000:0000:0000:0001", "documentation"),
    ("3fff::1", "documentation"),
    ("3FFF:0FFF:FFFF::1", "documentation"),
    ("2001:2::1", "reserved"),  # benchmarking, inside 2001::/23
    ("2001:10::1", "reserved"),  # ORCHID
    ("2001:1ff:ffff::1", "reserved"),
    ("4000::1", "reserved"),  # outside 2000::/3
    ("::2:0:0", "reserved"),
    ("64:ff9b:2::1", "reserved"),
]

PUBLIC_V6_SAMPLE = [
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "2A00:1450:4001:0830:0000:0000:0000:200E",
    "2001:200::1",  # first address after 2001::/23
    "2001:db7:ffff::1",
    "2001:db9::1",
    "3ffe::1",
    "3fff:1000::1",
]


def v4int(v4: str) -> int:
    return int(ipaddress.IPv4Address(v4))


def v6(x: int) -> str:
    return str(ipaddress.IPv6Address(x))


def teredo(server: str, client: str, *, flags: int = 0x8000, port: int = 40000) -> int:
    # RFC 4380 §4: 2001:0000:<server>:<flags>:<~port>:<~client>
    return (
        (0x2001_0000 << 96)
        | (v4int(server) << 64)
        | (flags << 48)
        | ((~port & 0xFFFF) << 32)
        | (~v4int(client) & M32)
    )


NAT64_LOCAL = 0x64_FF9B_0001 << 80

# Every way of writing an IPv4 address inside IPv6 that the policy must see through.
EMBEDDINGS: dict[str, Callable[[str], int]] = {
    "mapped": lambda a: (0xFFFF << 32) | v4int(a),
    "compatible": lambda a: v4int(a),
    "translated": lambda a: (0xFFFF << 48) | v4int(a),
    "nat64": lambda a: (0x64_FF9B << 96) | v4int(a),
    "nat64_local_96": lambda a: NAT64_LOCAL | v4int(a),
    "nat64_local_64": lambda a: NAT64_LOCAL | (v4int(a) << 24),
    "nat64_local_56": lambda a: NAT64_LOCAL | ((v4int(a) >> 24) << 64) | ((v4int(a) & 0xFF_FFFF) << 32),
    "nat64_local_48": lambda a: NAT64_LOCAL | ((v4int(a) >> 16) << 64) | ((v4int(a) & 0xFFFF) << 40),
    "6to4": lambda a: (0x2002 << 112) | (v4int(a) << 80) | 1,
    "teredo_client": lambda a: teredo(PUBLIC_V4, a),
    "teredo_server": lambda a: teredo(a, PUBLIC_V4),
}


def spellings(x: int) -> list[str]:
    """Compressed, expanded, upper-case and mixed-case spellings of one IPv6 address."""
    addr = ipaddress.IPv6Address(x)
    compressed, exploded = addr.compressed, addr.exploded
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(exploded))
    out = [compressed, exploded, exploded.upper(), compressed.upper(), mixed]
    if x >> 32 in (0xFFFF, 0xFFFF_0000, 0x64_FF9B << 64):
        # Dotted-quad tail: "::ffff:127.0.0.1", "0:0:0:0:0:ffff:127.0.0.1".
        head = ":".join(exploded.split(":")[:6])
        out += [f"{head}:{ipaddress.IPv4Address(x & M32)}", f"{head.upper()}:{ipaddress.IPv4Address(x & M32)}"]
    return out


@pytest.fixture
def policy() -> PeerPolicy:
    return PeerPolicy()


# --- defaults -----------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "reason"), REFUSED_V4)
def test_default_refuses_ipv4_range(policy: PeerPolicy, ip: str, reason: str) -> None:
    assert policy.check(ip) == PeerDecision(False, reason, None)
    assert policy.check(ip, 50000) == PeerDecision(False, reason, None)


@pytest.mark.parametrize(("ip", "reason"), REFUSED_V6)
def test_default_refuses_ipv6_range(policy: PeerPolicy, ip: str, reason: str) -> None:
    assert policy.check(ip, 3478) == PeerDecision(False, reason, None)


@pytest.mark.parametrize("form", sorted(EMBEDDINGS))
@pytest.mark.parametrize(("ip", "reason"), REFUSED_V4)
def test_default_refuses_ipv4_in_every_embedded_form(policy: PeerPolicy, form: str, ip: str, reason: str) -> None:
    x = EMBEDDINGS[form](ip)
    for spelling in spellings(x):
        decision = policy.check(spelling, 50000)
        assert not decision.allowed, (form, spelling)
        assert decision.ip is None
        if form == "compatible" and ip == "0.0.0.1":
            continue  # that spelling is ::1
        assert decision.reason == reason, (form, spelling)


@pytest.mark.parametrize("ip", PUBLIC_V4_SAMPLE)
def test_public_ipv4_allowed(policy: PeerPolicy, ip: str) -> None:
    assert policy.check(ip, 50000) == PeerDecision(True, "ok", ip)
    assert policy.check(ip) == PeerDecision(True, "ok", ip)


@pytest.mark.parametrize("ip", PUBLIC_V6_SAMPLE)
def test_public_ipv6_allowed(policy: PeerPolicy, ip: str) -> None:
    normalized = str(ipaddress.IPv6Address(ip))
    assert policy.check(ip, 50000) == PeerDecision(True, "ok", normalized)


@pytest.mark.parametrize("form", ["mapped", "compatible", "translated", "nat64", "nat64_local_96", "6to4"])
def test_public_ipv4_in_embedded_form_allowed_target_stays_original(policy: PeerPolicy, form: str) -> None:
    x = EMBEDDINGS[form]("1.1.1.1")
    for spelling in spellings(x):
        assert policy.check(spelling, 50000) == PeerDecision(True, "ok", v6(x)), spelling


def test_teredo_with_public_server_and_client_allowed(policy: PeerPolicy) -> None:
    x = teredo("1.1.1.1", "9.9.9.9")
    assert policy.check(v6(x), 50000) == PeerDecision(True, "ok", v6(x))


def test_non_global_addresses_per_ipaddress_are_always_refused(policy: PeerPolicy) -> None:
    """Safety net against a missing table row: whatever ipaddress calls non-global is refused."""
    rnd = random.Random(8656)
    embedded_prefixes = [
        ipaddress.ip_network(n)
        for n in ("::ffff:0:0/96", "::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32")
    ]
    checked = 0
    for _ in range(20_000):
        a4 = ipaddress.IPv4Address(rnd.getrandbits(32))
        if not a4.is_global:
            checked += 1
            assert not policy.check(str(a4)).allowed, a4
        top = rnd.choice([0x0000, 0x0100, 0x2001, 0x2001, 0x3FFF, 0xFC00, 0xFD00, 0xFE80, 0xFEC0, 0xFF02, 0x4000])
        a6 = ipaddress.IPv6Address((top << 112) | rnd.getrandbits(112) >> rnd.choice([0, 16, 100]))
        if any(a6 in n for n in embedded_prefixes):
            continue
        if not a6.is_global:
            checked += 1
            assert not policy.check(str(a6)).allowed, a6
    assert checked > 5_000


@pytest.mark.parametrize("ip", ["not-an-ip", "", "1.2.3", "1.2.3.4.5", "010.0.0.1", "2130706433", "::g", "fe80::1%eth0", " 8.8.8.8"])
def test_malformed_address_refused(policy: PeerPolicy, ip: str) -> None:
    assert policy.check(ip, 50000) == PeerDecision(False, "invalid", None)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_invalid_port_refused(policy: PeerPolicy, port: int) -> None:
    assert policy.check(PUBLIC_V4, port) == PeerDecision(False, "invalid_port", None)


# --- operator CIDRs -----------------------------------------------------------------------


def test_allow_cidr_lets_a_refused_range_through() -> None:
    policy = PeerPolicy(allow=["10.0.0.0/8", "fd00::/8"])
    assert policy.check("10.1.2.3", 50000) == PeerDecision(True, "ok", "10.1.2.3")
    assert policy.check("fd00::1", 50000).allowed
    assert policy.check("fc00::1", 50000).reason == "ula"
    assert policy.check("192.168.0.1", 50000).reason == "private"


@pytest.mark.parametrize("form", sorted(set(EMBEDDINGS) - {"nat64_local_48", "nat64_local_56"}))
def test_ipv4_allow_cidr_matches_embedded_forms(form: str) -> None:
    policy = PeerPolicy(allow=["127.0.0.0/8", PUBLIC_V4 + "/32"])
    x = EMBEDDINGS[form]("127.0.0.1")
    assert policy.check(v6(x), 50000) == PeerDecision(True, "ok", v6(x))
    still_refused = EMBEDDINGS[form]("10.0.0.1")
    assert policy.check(v6(still_refused), 50000).reason == "private"


def test_local_use_nat64_short_layouts_need_every_reading_acceptable() -> None:
    # 64:ff9b:1:7f00:0:100:: is 127.0.0.1 under a /48 translator but 0.0.1.0 under a /56 one;
    # the prefix length is not visible, so both readings must pass.
    x = EMBEDDINGS["nat64_local_48"]("127.0.0.1")
    assert PeerPolicy(allow=["127.0.0.0/8"]).check(v6(x)).reason == "unspecified"
    assert PeerPolicy(allow=["127.0.0.0/8", "0.0.0.0/8"]).check(v6(x)).allowed
    # Allowing the translator's IPv6 prefix is the operator's way in.
    assert PeerPolicy(allow=["64:ff9b:1::/48"]).check(v6(x)).allowed


def test_local_use_nat64_96_layout_of_a_public_address_allowed(policy: PeerPolicy) -> None:
    assert policy.check("64:ff9b:1::8.8.8.8", 50000).allowed
    # A /64-layout address is also judged by its /96 reading: 64:ff9b:1:0:8:808:800:0 -> 8.0.0.0 and 8.8.8.8.
    assert policy.check(v6(EMBEDDINGS["nat64_local_64"]("8.8.8.8")), 50000).allowed
    # ...and is refused when either reading is: here the /96 reading is 10.0.0.0.
    assert policy.check(v6(EMBEDDINGS["nat64_local_64"]("8.8.8.10")), 50000).reason == "private"


def test_teredo_needs_both_embedded_addresses_acceptable() -> None:
    policy = PeerPolicy(allow=["10.0.0.0/8"])
    assert not policy.check(v6(teredo("127.0.0.1", "10.0.0.1"))).allowed
    assert not policy.check(v6(teredo("10.0.0.1", "127.0.0.1"))).allowed
    assert policy.check(v6(teredo("10.0.0.1", "10.0.0.2"))).allowed


def test_ipv6_allow_cidr_over_an_embedding_prefix() -> None:
    policy = PeerPolicy(allow=["64:ff9b::/96"])
    assert policy.check("64:ff9b::10.0.0.1", 50000).allowed
    assert policy.check("::ffff:10.0.0.1", 50000).reason == "private"


def test_deny_cidr_refuses_a_public_address_in_every_form() -> None:
    policy = PeerPolicy(deny=["8.8.8.0/24", "2606:4700::/32"])
    assert policy.check("8.8.8.8", 50000) == PeerDecision(False, "denied_cidr", None)
    for form in ("mapped", "compatible", "translated", "nat64", "6to4", "teredo_server"):
        assert policy.check(v6(EMBEDDINGS[form]("8.8.8.8")), 50000).reason == "denied_cidr", form
    assert policy.check("2606:4700:4700::1111", 50000).reason == "denied_cidr"
    assert policy.check("8.8.4.4", 50000).allowed
    assert policy.check("2001:4860:4860::8888", 50000).allowed


def test_deny_cidr_on_an_embedding_prefix() -> None:
    policy = PeerPolicy(deny=["64:ff9b::/96"])
    assert policy.check("64:ff9b::1.1.1.1", 50000).reason == "denied_cidr"
    assert policy.check("::ffff:1.1.1.1", 50000).allowed


def test_allow_wins_over_deny() -> None:
    policy = PeerPolicy(allow=["8.8.8.8/32", "10.1.0.0/16"], deny=["8.8.8.0/24", "10.0.0.0/8"])
    assert policy.check("8.8.8.8", 50000).allowed
    assert policy.check("::ffff:8.8.8.8", 50000).allowed
    assert policy.check("8.8.8.9", 50000).reason == "denied_cidr"
    assert policy.check("10.1.2.3", 50000).allowed
    assert policy.check("10.2.0.1", 50000).reason == "denied_cidr"


def test_cidr_with_host_bits_is_accepted_as_its_network() -> None:
    policy = PeerPolicy(allow=["10.9.9.9/8"])
    assert policy.check("10.200.0.1").allowed


@pytest.mark.parametrize(
    ("kwargs", "option", "value"),
    [
        ({"allow": ["10.0.0.0/33"]}, "allowed_peers", "10.0.0.0/33"),
        ({"allow": ["10.0.0.0/8", "bogus"]}, "allowed_peers", "bogus"),
        ({"deny": ["fd00::/129"]}, "denied_peers", "fd00::/129"),
        ({"deny": ["300.1.1.1/32"]}, "denied_peers", "300.1.1.1/32"),
        ({"allow": "10.0.0.0/8"}, "allowed_peers", "10.0.0.0/8"),
        ({"relay_addresses": ["10.0.0.256"]}, "relay_addresses", "10.0.0.256"),
        ({"external_addresses": {"1.2.3": "10.0.0.5"}}, "external_addresses", "1.2.3"),
        ({"external_addresses": {"1.2.3.4": "ten"}}, "external_addresses", "ten"),
        ({"relay_port_range": (0, 100)}, "relay_port_range", "(0, 100)"),
        ({"relay_port_range": (5000, 4000)}, "relay_port_range", "(5000, 4000)"),
        ({"relay_port_range": (1, 70000)}, "relay_port_range", "(1, 70000)"),
        ({"listening": [("localhost", 3478)]}, "listening", "localhost"),
    ],
)
def test_malformed_configuration_names_the_option_and_value(kwargs: dict, option: str, value: str) -> None:
    with pytest.raises(PolicyConfigError) as info:
        PeerPolicy(**kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(option + ":")
    assert value in str(info.value)


# --- own addresses ------------------------------------------------------------------------


def own_policy(**kwargs: object) -> PeerPolicy:
    args: dict = {
        "relay_addresses": ["10.0.0.5", "fd00::5"],
        "relay_port_range": (49152, 65535),
        "listening": [("0.0.0.0", 3478), ("::", 3478), ("10.0.0.5", 5349)],
    }
    args.update(kwargs)
    return PeerPolicy(**args)


@pytest.mark.parametrize("port", [49152, 50000, 65535])
def test_own_relay_address_allowed_inside_relay_range(port: int) -> None:
    policy = own_policy()
    assert policy.check("10.0.0.5", port) == PeerDecision(True, "ok", "10.0.0.5")
    assert policy.check("fd00::5", port) == PeerDecision(True, "ok", "fd00::5")
    assert policy.check("FD00:0:0:0:0:0:0:5", port) == PeerDecision(True, "ok", "fd00::5")


def test_own_relay_address_allowed_without_port() -> None:
    # CreatePermission checks the IP only.
    assert own_policy().check("10.0.0.5") == PeerDecision(True, "ok", "10.0.0.5")


@pytest.mark.parametrize("port", [1, 22, 3478, 5349, 8080, 49151])
def test_own_relay_address_refused_outside_range_and_on_listening_ports(port: int) -> None:
    policy = own_policy()
    assert policy.check("10.0.0.5", port) == PeerDecision(False, "own_port", None)
    assert policy.check("fd00::5", port) == PeerDecision(False, "own_port", None)


def test_other_addresses_in_the_relay_subnet_stay_refused() -> None:
    assert own_policy().check("10.0.0.6", 50000).reason == "private"


def test_listening_port_inside_the_relay_range_is_refused() -> None:
    policy = own_policy(listening=[("0.0.0.0", 50000)])
    assert policy.check("10.0.0.5", 50000) == PeerDecision(False, "own_port", None)
    assert policy.check("10.0.0.5", 50001).allowed


def test_wildcard_ipv6_listener_guards_ipv4_relay_addresses_too() -> None:
    policy = own_policy(listening=[("::", 50000)])
    assert policy.check("10.0.0.5", 50000).reason == "own_port"
    assert policy.check("fd00::5", 50000).reason == "own_port"


def test_specific_listener_guards_only_its_own_address() -> None:
    policy = own_policy(listening=[("10.0.0.5", 50000)])
    assert policy.check("10.0.0.5", 50000).reason == "own_port"
    assert policy.check("fd00::5", 50000).allowed


def test_own_address_in_embedded_form() -> None:
    policy = own_policy()
    assert policy.check("::ffff:10.0.0.5", 22) == PeerDecision(False, "own_port", None)
    assert policy.check("::ffff:10.0.0.5", 50000) == PeerDecision(True, "ok", "::ffff:a00:5")
    assert policy.check("64:ff9b::10.0.0.5", 3478).reason == "own_port"


def test_allow_cidr_never_opens_own_listeners() -> None:
    policy = own_policy(allow=["10.0.0.0/8", "0.0.0.0/0", "::/0"])
    assert policy.check("10.0.0.5", 3478) == PeerDecision(False, "own_port", None)
    assert policy.check("::ffff:10.0.0.5", 5349).reason == "own_port"
    assert policy.check("10.0.0.6", 3478).allowed  # not ours


def test_allow_cidr_wins_over_the_own_address_rule_off_the_listening_ports() -> None:
    # An SFU on the relay host (a videobridge on :10000): allowed by name, reached.
    policy = own_policy(allow=["10.0.0.5/32"], port_held=lambda ip, port: False)
    assert policy.check("10.0.0.5", 10000) == PeerDecision(True, "ok", "10.0.0.5")
    assert policy.check("10.0.0.5", 50000).allowed  # not held, but allowed by name
    assert policy.check("10.0.0.5", 3478).reason == "own_port"  # wildcard listener
    assert policy.check("10.0.0.5", 5349).reason == "own_port"  # exact listener
    without = own_policy(port_held=lambda ip, port: False)
    assert without.check("10.0.0.5", 10000).reason == "own_port"


def test_own_relay_address_only_on_ports_the_server_holds() -> None:
    held = {("10.0.0.5", 50000)}
    policy = own_policy(port_held=lambda ip, port: (ip, port) in held)
    assert policy.check("10.0.0.5", 50000) == PeerDecision(True, "ok", "10.0.0.5")
    assert policy.check("10.0.0.5", 51820) == PeerDecision(False, "own_port", None)  # WireGuard
    assert policy.check("::ffff:10.0.0.5", 51820).reason == "own_port"
    held.add(("10.0.0.5", 51820))
    assert policy.check("10.0.0.5", 51820).allowed  # asked at check time, not cached
    held.clear()
    assert policy.check("10.0.0.5", 50000).reason == "own_port"
    assert policy.port_held("10.0.0.5", 50000) is False
    assert policy.check("10.0.0.5").allowed  # a permission is by IP; ports are checked on use


def test_host_addresses_are_guarded_on_wildcard_listening_ports() -> None:
    # Wildcard listeners receive on every address of the host: a second NIC, all of 127/8.
    policy = PeerPolicy(
        allow=["127.0.0.0/8", "198.51.100.0/24"],
        relay_addresses=["203.0.113.9"],
        listening=[("0.0.0.0", 3478), ("127.0.0.1", 9641)],
        host_addresses=["198.51.100.20", "2001:db8::20"],
        port_held=lambda ip, port: False,
    )
    for ip in ("127.0.0.1", "127.0.0.2", "198.51.100.20", "0.0.0.0", "::ffff:127.0.0.1"):
        assert policy.check(ip, 3478).reason == "own_port", ip
    assert policy.check("127.0.0.1", 9641).reason == "own_port"  # the metrics port
    assert policy.check("127.0.0.2", 9641).allowed  # metrics listens on 127.0.0.1 only
    assert policy.check("198.51.100.20", 10000).allowed  # allowed by name
    assert policy.check("198.51.100.21", 3478).allowed  # not this host
    assert policy.is_host_address("198.51.100.20") and policy.is_host_address("127.9.9.9")
    assert not policy.is_host_address("198.51.100.21")


def test_a_host_address_that_is_not_a_relay_address_is_refused_unless_allowed() -> None:
    policy = PeerPolicy(relay_addresses=["203.0.113.9"], host_addresses=["8.8.4.4"],
                        listening=[("0.0.0.0", 3478)])
    assert policy.check("8.8.4.4", 50000) == PeerDecision(False, "own_address", None)
    assert policy.check("8.8.4.4") == PeerDecision(False, "own_address", None)
    assert policy.check("127.0.0.1", 50000).reason == "loopback"  # the default reason first
    allowed = PeerPolicy(relay_addresses=["203.0.113.9"], host_addresses=["8.8.4.4"],
                         listening=[("0.0.0.0", 3478)], allow=["8.8.4.4/32"])
    assert allowed.check("8.8.4.4", 50000).allowed
    assert allowed.check("8.8.4.4", 3478).reason == "own_port"


def test_listening_address_that_is_not_a_relay_address_is_guarded() -> None:
    policy = PeerPolicy(listening=[("1.1.1.1", 3478)], relay_port_range=(49152, 65535))
    assert policy.check("1.1.1.1", 3478).reason == "own_port"
    # Any other port of this host's address is refused too, by IP alone as well.
    assert policy.check("1.1.1.1", 22).reason == "own_address"
    assert policy.check("1.1.1.1", 50000).reason == "own_address"
    assert policy.check("1.1.1.1").reason == "own_address"


def test_loopback_test_setup() -> None:
    policy = PeerPolicy(
        allow=["127.0.0.0/8"],
        relay_addresses=["127.0.0.1"],
        listening=[("127.0.0.1", 3478)],
        relay_port_range=(40000, 40100),
    )
    assert policy.check("127.0.0.1", 40050) == PeerDecision(True, "ok", "127.0.0.1")
    assert policy.check("127.0.0.1", 3478).reason == "own_port"
    # allowed_peers covers 127.0.0.1: echo peers on low ports are reachable.
    assert policy.check("127.0.0.1", 40101).allowed
    assert policy.check("127.0.0.1", 1024).allowed


# --- 1:1 NAT ------------------------------------------------------------------------------


def test_external_address_maps_to_the_bound_relay_address() -> None:
    policy = own_policy(external_addresses={"198.51.100.7": "10.0.0.5", "2001:db8::7": "fd00::5"})
    assert policy.check("198.51.100.7", 50000) == PeerDecision(True, "ok", "10.0.0.5")
    assert policy.check("2001:DB8:0::7", 50000) == PeerDecision(True, "ok", "fd00::5")
    # CreatePermission gives no port: the mapping applies all the same.
    assert policy.check("198.51.100.7") == PeerDecision(True, "ok", "10.0.0.5")
    assert policy.check("2001:db8:0:0::7") == PeerDecision(True, "ok", "fd00::5")
    assert policy.check("198.51.100.7", 3478) == PeerDecision(False, "own_port", None)
    assert policy.check("198.51.100.7", 1000) == PeerDecision(False, "own_port", None)
    # Neighbours of the external address are still documentation space.
    assert policy.check("198.51.100.8", 50000).reason == "documentation"


def test_external_bound_address_counts_as_own_even_if_not_listed() -> None:
    policy = PeerPolicy(external_addresses={"198.51.100.7": "10.0.0.9"})
    assert policy.check("10.0.0.9", 50000) == PeerDecision(True, "ok", "10.0.0.9")
    assert policy.check("198.51.100.7", 50000) == PeerDecision(True, "ok", "10.0.0.9")


def test_embedded_external_address_is_guarded() -> None:
    policy = PeerPolicy(external_addresses={"198.51.100.7": "10.0.0.9"}, listening=[("0.0.0.0", 3478)])
    assert policy.check("::ffff:198.51.100.7", 3478).reason == "own_port"


# --- cache --------------------------------------------------------------------------------


def test_decisions_are_cached_and_the_cache_is_bounded() -> None:
    policy = PeerPolicy(cache_size=16)
    first = policy.check("8.8.8.8", 50000)
    assert policy.check("8.8.8.8", 50000) is first
    for port in range(1000, 1100):
        policy.check("8.8.8.8", port)
    info = policy.cache_info()
    assert info.currsize <= 16
    assert info.hits >= 1


def test_relay_port_range_property() -> None:
    assert PeerPolicy(relay_port_range=(50000, 50010)).relay_port_range == (50000, 50010)
