"""canonical_ip: one spelling per IP address, the same for the config, the core, the nonces and
the I/O layer; IPv4-mapped addresses read as IPv4 unless kept for binding; no IP, no answer."""

from __future__ import annotations

import pytest

from turnserver import config
from turnserver.addresses import canonical_ip
from turnserver.turn import core


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", "192.0.2.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("0::0", "::"),
])
def test_ipv4_and_ipv6_get_their_one_spelling(text: str, expected: str) -> None:
    assert canonical_ip(text) == expected
    assert canonical_ip(text, keep_mapped=True) == expected


@pytest.mark.parametrize("text", ["::ffff:192.0.2.1", "::FFFF:C000:0201", "0:0:0:0:0:ffff:c000:201"])
def test_ipv4_mapped_reads_as_the_ipv4_address_unless_kept(text: str) -> None:
    assert canonical_ip(text) == "192.0.2.1"
    # Kept for a relay address: still IPv6, still one spelling.
    assert canonical_ip(text, keep_mapped=True) == canonical_ip("::ffff:c000:201", keep_mapped=True)
    assert ":" in canonical_ip(text, keep_mapped=True)


@pytest.mark.parametrize("text", ["::192.0.2.1", "64:ff9b::192.0.2.1", "2002:c000:201::1"])
def test_other_ipv4_embeddings_stay_ipv6(text: str) -> None:
    assert ":" in canonical_ip(text)


def test_a_scope_is_kept_and_the_address_part_compressed() -> None:
    assert canonical_ip("FE80:0:0::1%eth0") == "fe80::1%eth0"
    assert canonical_ip("fe80::1%2") == "fe80::1%2"
    assert canonical_ip("fe80::1%eth0") != canonical_ip("fe80::1%eth1")


@pytest.mark.parametrize("text", [
    "", "localhost", "turn.example.com", "1.2.3", "256.0.0.1", "192.0.2.1:3478", "[::1]",
    " 192.0.2.1", "::1 ", "192.0.2.1%eth0", "fe80::1%", "::ffff:1.2.3.4.5", "2001:db8::1::2",
])
def test_garbage_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        canonical_ip(text)


def test_the_core_and_the_config_share_the_one_function() -> None:
    assert core.canonical_ip is canonical_ip
    assert config.canonical_ip is canonical_ip
