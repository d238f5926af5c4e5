"""TURN REST API credentials: username "<expiry>:<user>", password base64(HMAC-SHA1(secret, username))."""

import base64
import hashlib
import hmac

import pytest

from turnserver.auth import rest_expiry, rest_password, rest_username


def test_rest_password_matches_an_independent_hmac() -> None:
    secret = b"north-wind-shared-secret"
    username = "1700000000:alice"
    expected = base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()
    assert rest_password(secret, username) == expected
    assert len(expected) == 28  # 20-byte SHA-1 MAC in base64


def test_rest_password_known_value() -> None:
    # HMAC-SHA1 test case 2 of RFC 2202: key "Jefe", data "what do ya want for nothing?".
    mac = bytes.fromhex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
    assert rest_password(b"Jefe", "what do ya want for nothing?") == base64.b64encode(mac).decode()


def test_rest_password_differs_per_secret_and_username() -> None:
    assert rest_password(b"a", "1:u") != rest_password(b"b", "1:u")
    assert rest_password(b"a", "1:u") != rest_password(b"a", "2:u")


def test_rest_username() -> None:
    assert rest_username(1700000000, "alice") == "1700000000:alice"


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("1700000000:alice", 1700000000),
        ("1700000000", 1700000000),  # coturn's timestamp-only form
        ("1700000000:", 1700000000),
        ("1700000000:a:b", 1700000000),  # only the part before the first ':'
        ("alice", None),
        ("alice:1700000000", None),
        (":1700000000", None),
        ("", None),
        ("17e9:alice", None),
        ("-5:alice", None),
        ("+5:alice", None),
        (" 5:alice", None),
        ("\u0661\u0662:alice", None),  # Arabic-Indic digits are not a timestamp
        ("9" * 12 + ":alice", 999_999_999_999),  # "practically never": up to twelve digits
        ("9" * 13 + ":alice", None),  # absurdly long
    ],
)
def test_rest_expiry(username: str, expected: int | None) -> None:
    assert rest_expiry(username) == expected
