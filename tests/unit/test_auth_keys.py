"""Long-term keys (RFC 8489 §9.2.2) and USERHASH (§14.4), checked against RFC 5769 and RFC 8489 vectors."""

import hashlib
import hmac

import pytest

from turnserver.auth import ALGORITHM_MD5, ALGORITHM_SHA256, long_term_key, userhash

USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"  # マトリックス
REALM = "example.org"

# RFC 5769 §2.4: Sample Request with Long-Term Authentication.
RFC5769_2_4 = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e"
    "00060012e3839ee38388e383aae38383e382afe382b90000"
    "0015001c662f2f3439396b39353464364f4c33346f4c394653547679363473"
    "41"
    "0014000b6578616d706c652e6f726700"
    "00080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)


@pytest.mark.parametrize("password", ["TheMatr\u00adIX", "The\u00adM\u00aatr\u2168", "TheMatrIX"])
def test_rfc5769_long_term_key_verifies_the_sample_message_integrity(password: str) -> None:
    key = long_term_key(USERNAME, REALM, password)
    assert key == hashlib.md5(f"{USERNAME}:{REALM}:TheMatrIX".encode()).digest()
    # The key must reproduce the HMAC-SHA1 the RFC printed (length field already covers MI).
    mac = hmac.new(key, RFC5769_2_4[:92], hashlib.sha1).digest()
    assert hmac.compare_digest(mac, RFC5769_2_4[96:116])


def test_md5_is_the_default_algorithm() -> None:
    assert long_term_key("u", "r", "p") == long_term_key("u", "r", "p", ALGORITHM_MD5)
    assert len(long_term_key("u", "r", "p")) == 16


def test_sha256_key() -> None:
    key = long_term_key(USERNAME, REALM, "TheMatr\u00adIX", ALGORITHM_SHA256)
    assert key == hashlib.sha256(f"{USERNAME}:{REALM}:TheMatrIX".encode()).digest()
    assert len(key) == 32
    assert key[:16] != long_term_key(USERNAME, REALM, "TheMatrIX", ALGORITHM_MD5)


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="0x0003"):
        long_term_key("u", "r", "p", 0x0003)


def test_password_refused_by_saslprep_raises() -> None:
    with pytest.raises(ValueError):
        long_term_key("u", "r", "bad\u0007")


def test_userhash_rfc8489_appendix_b1_vector() -> None:
    # RFC 8489 Appendix B.1 USERHASH value for マトリックス / example.org.
    expected = bytes.fromhex("4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704")
    assert userhash(USERNAME, REALM) == expected


def test_userhash_depends_on_realm() -> None:
    assert userhash("alice", "a.example") != userhash("alice", "b.example")
