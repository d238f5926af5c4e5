"""mint_credentials: the helper application backends use to hand out TURN REST credentials."""

import json

import pytest

from turnserver.auth import CredentialStore, long_term_key, rest_expiry, rest_password
from turnserver.credentials import Credentials, build_urls, mint_credentials

SECRET = b"shared-secret-for-tests"
NOW = 1_700_000_000.75


def test_password_verifies_with_rest_password() -> None:
    creds = mint_credentials(SECRET, "alice", 3600, now=NOW)
    assert creds.password == rest_password(SECRET, creds.username)


def test_str_secret_is_utf8_encoded() -> None:
    creds = mint_credentials("s\u00e9cret", "alice", now=NOW)
    assert creds.password == rest_password("s\u00e9cret".encode(), creds.username)
    assert creds.password != rest_password(b"secret", creds.username)


def test_expiry_arithmetic_with_fixed_now() -> None:
    creds = mint_credentials(SECRET, "alice", 3600, now=NOW)
    assert creds.expires_at == 1_700_003_600  # int(now) + ttl
    assert creds.username == "1700003600:alice"
    assert creds.ttl_s == 3600
    assert rest_expiry(creds.username) == creds.expires_at


def test_default_ttl_is_one_day() -> None:
    creds = mint_credentials(SECRET, "alice", now=0)
    assert creds.ttl_s == 86400
    assert creds.expires_at == 86400


def test_default_now_is_the_current_time() -> None:
    import time

    before = int(time.time())
    creds = mint_credentials(SECRET, "alice", 60)
    after = int(time.time())
    assert before + 60 <= creds.expires_at <= after + 60


def test_minted_credentials_authenticate_against_the_server_store() -> None:
    creds = mint_credentials(SECRET, "alice", 60, now=NOW)
    store = CredentialStore(realm="turn.example", secrets=[SECRET], wall_clock=lambda: NOW)
    client_key = long_term_key(creds.username, "turn.example", creds.password)
    assert client_key in store.lookup(creds.username, 1)
    assert not store.is_expired(creds.username)
    later = CredentialStore(realm="turn.example", secrets=[SECRET], wall_clock=lambda: NOW + 61)
    assert later.is_expired(creds.username)


def test_urls_for_a_hostname() -> None:
    creds = mint_credentials(SECRET, "alice", now=NOW, host="turn.example.com")
    assert creds.urls == [
        "stun:turn.example.com:3478",
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349?transport=tcp",
    ]


def test_urls_for_ipv4_and_custom_ports_without_tcp() -> None:
    urls = build_urls("192.0.2.1", udp_port=3479, tcp_port=None, tls_port=443)
    assert urls == [
        "stun:192.0.2.1:3479",
        "turn:192.0.2.1:3479?transport=udp",
        "turns:192.0.2.1:443?transport=tcp",
    ]


def test_urls_without_tls() -> None:
    assert build_urls("turn.example.com", tls_port=None) == [
        "stun:turn.example.com:3478",
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3478?transport=tcp",
    ]


def test_urls_without_udp_have_no_stun_or_udp_turn_url() -> None:
    assert build_urls("turn.example.com", udp_port=None) == [
        "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349?transport=tcp",
    ]
    creds = mint_credentials(SECRET, "alice", now=NOW, host="turn.example.com", udp_port=None,
                             tcp_port=None)
    assert creds.urls == ["turns:turn.example.com:5349?transport=tcp"]
    assert creds.ice_servers()["iceServers"] == [
        {"urls": creds.urls, "username": creds.username, "credential": creds.password}
    ]


@pytest.mark.parametrize("host", ["2001:db8::1", "[2001:db8::1]", "2001:DB8:0:0:0:0:0:1"])
def test_urls_for_ipv6_are_bracketed(host: str) -> None:
    assert build_urls(host, tcp_port=None, tls_port=None) == [
        "stun:[2001:db8::1]:3478",
        "turn:[2001:db8::1]:3478?transport=udp",
    ]


def test_no_host_no_urls() -> None:
    creds = mint_credentials(SECRET, "alice", now=NOW)
    assert creds.urls == []
    assert creds.ice_servers() == {"iceServers": []}


def test_ice_servers_shape() -> None:
    creds = mint_credentials(SECRET, "alice", 600, now=NOW, host="turn.example.com")
    assert creds.ice_servers() == {
        "iceServers": [
            {
                "urls": [
                    "turn:turn.example.com:3478?transport=udp",
                    "turn:turn.example.com:3478?transport=tcp",
                    "turns:turn.example.com:5349?transport=tcp",
                ],
                "username": creds.username,
                "credential": creds.password,
            },
            {"urls": ["stun:turn.example.com:3478"]},
        ]
    }
    json.dumps(creds.ice_servers())  # must be JSON-serialisable as it is


def test_to_json_is_the_rest_api_response() -> None:
    creds = mint_credentials(SECRET, "alice", 600, now=NOW, host="turn.example.com")
    body = json.loads(creds.to_json())
    assert body == {
        "username": "1700000600:alice",
        "password": rest_password(SECRET, "1700000600:alice"),
        "ttl": 600,
        "uris": creds.urls,
    }


def test_password_not_in_repr() -> None:
    creds = mint_credentials(SECRET, "alice", now=NOW)
    assert creds.password not in repr(creds)
    assert creds.username in repr(creds)


def test_credentials_are_frozen() -> None:
    creds = mint_credentials(SECRET, "alice", now=NOW)
    with pytest.raises(AttributeError):
        creds.username = "x"  # type: ignore[misc]
    assert isinstance(creds, Credentials)


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((SECRET, "al:ice"), {}, "':'"),
        ((SECRET, ""), {}, "user"),
        ((SECRET, "alice", 0), {}, "ttl_s"),
        ((SECRET, "alice", -5), {}, "ttl_s"),
        ((SECRET, "alice", 1.5), {}, "ttl_s"),
        ((b"", "alice"), {}, "secret"),
        (("", "alice"), {}, "secret"),
        ((SECRET, "alice"), {"host": "turn example.com"}, "host"),
        ((SECRET, "alice"), {"host": ""}, "host"),
        ((SECRET, "alice"), {"host": "a/b"}, "host"),
        ((SECRET, "alice"), {"host": "[turn.example.com]"}, "host"),
        ((SECRET, "alice"), {"host": "fe80::1%eth0"}, "host"),
        ((SECRET, "alice"), {"host": "h", "udp_port": 0}, "udp_port"),
        ((SECRET, "alice"), {"host": "h", "tcp_port": 65536}, "tcp_port"),
        ((SECRET, "alice"), {"host": "h", "tls_port": True}, "tls_port"),
    ],
)
def test_errors(args: tuple, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        mint_credentials(*args, now=NOW, **kwargs)
    assert fragment in str(info.value)


def test_several_ports_per_transport_are_all_listed_443_first() -> None:
    from turnserver.credentials import build_urls

    assert build_urls("turn.example.com", udp_port=[3478, 3479], tcp_port=None,
                      tls_port=(5349, 443, 5349)) == [
        "stun:turn.example.com:3478",
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3479?transport=udp",
        "turns:turn.example.com:443?transport=tcp",
        "turns:turn.example.com:5349?transport=tcp",
    ]
    with pytest.raises(ValueError):
        build_urls("turn.example.com", tls_port=[443, 0])
