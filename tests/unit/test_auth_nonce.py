"""Stateless nonces (RFC 8489 §9.2) with a fake clock and fixed randomness."""

import base64
import string

import pytest

from turnserver.auth import NONCE_COOKIE_PREFIX, NonceManager

KEY = b"k" * 32
CLIENT = "203.0.113.9"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def manager(clock: FakeClock, *, key: bytes = KEY, lifetime_s: float = 600.0) -> NonceManager:
    return NonceManager(key=key, lifetime_s=lifetime_s, wall_clock=clock)


def test_fresh_nonce_is_ok_for_its_client() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    assert nonces.check(nonces.make(CLIENT), CLIENT) == "ok"


def test_nonce_goes_stale_after_its_lifetime() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock, lifetime_s=600)
    nonce = nonces.make(CLIENT)
    clock.now = 1599.5
    assert nonces.check(nonce, CLIENT) == "ok"
    clock.now = 1600.0
    assert nonces.check(nonce, CLIENT) == "stale"
    clock.now = 10_000.0
    assert nonces.check(nonce, CLIENT) == "stale"


def test_nonce_from_another_client_ip_is_invalid() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    nonce = nonces.make(CLIENT)
    assert nonces.check(nonce, "203.0.113.10") == "invalid"
    assert nonces.check(nonce, "2001:db8::1") == "invalid"


def test_ipv4_mapped_spelling_binds_like_the_ipv4_address() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    assert nonces.check(nonces.make("::ffff:203.0.113.9"), CLIENT) == "ok"
    assert nonces.check(nonces.make("2001:DB8::1"), "2001:db8:0::1") == "ok"


def test_nonce_made_with_another_key_is_invalid() -> None:
    clock = FakeClock(1000.0)
    other = manager(clock, key=b"x" * 32)
    assert manager(clock).check(other.make(CLIENT), CLIENT) == "invalid"


def test_every_single_character_change_is_invalid() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    nonce = nonces.make(CLIENT)
    alphabet = string.ascii_letters + string.digits + "-_+/"
    for i, ch in enumerate(nonce):
        replacement = alphabet[(alphabet.index(ch) + 1) % len(alphabet)] if ch in alphabet else "A"
        tampered = nonce[:i] + replacement + nonce[i + 1 :]
        assert nonces.check(tampered, CLIENT) == "invalid", (i, tampered)


def test_extending_the_expiry_is_invalid_not_stale_or_ok() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock, lifetime_s=10)
    nonce = nonces.make(CLIENT)
    body = nonce[len(NONCE_COOKIE_PREFIX) + 4 :]
    raw = base64.urlsafe_b64decode(body + "=")
    later = (int.from_bytes(raw[:3], "big") + 5000).to_bytes(3, "big") + raw[3:]
    forged = nonce[: len(nonce) - len(body)] + base64.urlsafe_b64encode(later).decode()[:11]
    clock.now = 2000.0
    assert nonces.check(nonce, CLIENT) == "stale"
    assert nonces.check(forged, CLIENT) == "invalid"


def test_a_nonce_does_not_come_back_when_its_24_expiry_bits_wrap() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock, lifetime_s=10)
    nonce = nonces.make(CLIENT)
    clock.now = 1000.0 + 2**24  # the same low 24 bits of the expiry, 194 days later
    assert nonces.check(nonce, CLIENT) == "invalid"
    clock.now = 1000.0 + 2**23 - 100  # far in the past, within the window: stale, not ok
    assert nonces.check(nonce, CLIENT) == "stale"


def test_a_challenge_nonce_is_24_characters() -> None:
    # 13 for the cookie, 11 for expiry and MAC: a 20-byte request gets an 80-byte 401.
    nonces = manager(FakeClock(1000.0))
    assert len(nonces.make(CLIENT)) == 24
    assert len(nonces.make(CLIENT, security_features=False)) == 11


def test_stripping_the_cookie_is_invalid() -> None:
    # Bid-down protection (RFC 8489 §9.2): the features are covered by the MAC.
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    nonce = nonces.make(CLIENT)
    assert nonces.check(nonce[len(NONCE_COOKIE_PREFIX) + 4 :], CLIENT) == "invalid"
    downgraded = NONCE_COOKIE_PREFIX + "AAAA" + nonce[len(NONCE_COOKIE_PREFIX) + 4 :]
    assert nonces.check(downgraded, CLIENT) == "invalid"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "x",
        NONCE_COOKIE_PREFIX,
        NONCE_COOKIE_PREFIX + "wAA",
        NONCE_COOKIE_PREFIX + "wAAA",
        "obMatJos2wAAA" + "0" * 32,
        "\u30de" * 40,
        "\x00" * 45,
        "a" * 10_000,
        "00000640AAAAAAAA" + "A" * 16,
        "\ud800" * 45,  # lone surrogates
    ],
)
def test_garbage_is_invalid_and_never_raises(garbage: str) -> None:
    nonces = manager(FakeClock(1000.0))
    assert nonces.check(garbage, CLIENT) == "invalid"


def test_non_string_input_is_invalid() -> None:
    nonces = manager(FakeClock(1000.0))
    assert nonces.check(b"obMatJos2wAAA", CLIENT) == "invalid"  # type: ignore[arg-type]
    assert nonces.check(None, CLIENT) == "invalid"  # type: ignore[arg-type]


def test_garbage_client_ip_does_not_raise() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    nonce = nonces.make("not an ip")
    assert nonces.check(nonce, "not an ip") == "ok"
    assert nonces.check(nonce, "\ud800") == "invalid"


def test_security_feature_cookie_prefix() -> None:
    nonces = manager(FakeClock(1000.0))
    nonce = nonces.make(CLIENT)
    assert nonce.startswith(NONCE_COOKIE_PREFIX)
    features = base64.b64decode(nonce[9:13])
    # Bit 0 (password algorithms) and bit 1 (username anonymity): the two most
    # significant bits of the first byte (RFC 8489 §9.2, §18.1).
    assert features == bytes([0xC0, 0x00, 0x00])
    assert nonce[:13] == "obMatJos2wAAA"
    assert NonceManager.has_password_algorithms_feature(nonce)


def test_nonce_without_security_features() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    nonce = nonces.make(CLIENT, security_features=False)
    assert not nonce.startswith(NONCE_COOKIE_PREFIX)
    assert not NonceManager.has_password_algorithms_feature(nonce)
    assert nonces.check(nonce, CLIENT) == "ok"


@pytest.mark.parametrize(
    ("nonce", "expected"),
    [
        ("obMatJos2gAAArest", True),  # 0x80: password algorithms only
        ("obMatJos2QAAArest", False),  # 0x40: username anonymity only
        ("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA", False),  # RFC 8489 B.1 nonce: bits 0/1 clear
        ("obMatJos2", False),
        ("obMatJos2g!AA", False),
        ("obMatJos2\u30de\u30de\u30de\u30de", False),
        ("gAAAobMatJos2", False),
        ("", False),
    ],
)
def test_has_password_algorithms_feature(nonce: str, expected: bool) -> None:
    assert NonceManager.has_password_algorithms_feature(nonce) is expected


def test_nonces_are_printable_ascii_short_and_differ_by_client_and_time() -> None:
    clock = FakeClock(1000.0)
    nonces = manager(clock)
    made = set()
    for i in range(25):
        made.add(nonces.make(f"198.51.100.{i}"))
        clock.now += 1
        made.add(nonces.make(CLIENT))
    assert len(made) == 50
    for nonce in made:
        assert len(nonce) < 128
        assert nonce.isascii() and nonce.isprintable()
        # NONCE is qdtext (RFC 8489 §14.10): no quote or backslash.
        assert '"' not in nonce and "\\" not in nonce


def test_constructor_rejects_short_key_and_bad_lifetime() -> None:
    clock = FakeClock(0.0)
    with pytest.raises(ValueError):
        NonceManager(key=b"short", wall_clock=clock)
    with pytest.raises(ValueError):
        NonceManager(key=KEY, lifetime_s=0, wall_clock=clock)
    with pytest.raises(ValueError):
        NonceManager(key=KEY, lifetime_s=2**23, wall_clock=clock)
