"""CredentialStore: REST secrets with rotation, static users, expiry, USERHASH, file loaders."""

import hashlib
from pathlib import Path

import pytest

from turnserver.auth import (
    ALGORITHM_MD5,
    ALGORITHM_SHA256,
    CredentialStore,
    long_term_key,
    rest_password,
    userhash,
)

REALM = "turn.example"
OLD = b"old-secret-0123456789"
NEW = b"new-secret-9876543210"
NOW = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def client_key(secret: bytes, username: str, algorithm: int = ALGORITHM_MD5) -> bytes:
    """What a client holding a minted credential derives, computed independently of the store."""
    return long_term_key(username, REALM, rest_password(secret, username), algorithm)


def make_store(**kwargs: object) -> CredentialStore:
    args: dict = {"realm": REALM, "wall_clock": FakeClock(NOW)}
    args.update(kwargs)
    return CredentialStore(**args)


def test_rest_username_is_accepted_under_every_rotated_secret() -> None:
    store = make_store(secrets=[NEW, OLD])
    username = f"{int(NOW) + 3600}:alice"
    keys = store.lookup(username, ALGORITHM_MD5)
    assert len(keys) == 2
    assert client_key(NEW, username) in keys
    assert client_key(OLD, username) in keys


def test_rest_key_from_a_retired_secret_is_not_offered() -> None:
    store = make_store(secrets=[NEW])
    username = f"{int(NOW) + 3600}:alice"
    assert client_key(OLD, username) not in store.lookup(username, ALGORITHM_MD5)


def test_rest_sha256_keys() -> None:
    store = make_store(secrets=[NEW])
    username = f"{int(NOW) + 60}:bob"
    assert store.lookup(username, ALGORITHM_SHA256) == [client_key(NEW, username, ALGORITHM_SHA256)]


def test_unknown_users_get_no_keys() -> None:
    store = make_store(secrets=[NEW], static_users={"carol": "pw"})
    assert store.lookup("mallory", ALGORITHM_MD5) == []
    assert store.lookup("", ALGORITHM_MD5) == []


def test_rest_username_without_secrets_gets_no_keys() -> None:
    store = make_store(static_users={"carol": "pw"})
    assert store.lookup(f"{int(NOW) + 60}:alice", ALGORITHM_MD5) == []


def test_unknown_algorithm_gets_no_keys() -> None:
    store = make_store(secrets=[NEW], static_users={"carol": "pw"})
    assert store.lookup(f"{int(NOW) + 60}:alice", 0x0009) == []
    assert store.lookup("carol", 0x0009) == []


def test_static_user_with_password() -> None:
    store = make_store(static_users={"carol": "Pass\u00adword"})
    assert store.lookup("carol", ALGORITHM_MD5) == [
        hashlib.md5(f"carol:{REALM}:Password".encode()).digest()
    ]
    assert store.lookup("carol", ALGORITHM_SHA256) == [
        hashlib.sha256(f"carol:{REALM}:Password".encode()).digest()
    ]


def test_static_user_with_precomputed_md5_key() -> None:
    key = hashlib.md5(f"dave:{REALM}:hunter2".encode()).digest()
    store = make_store(static_users={"dave": key})
    assert store.lookup("dave", ALGORITHM_MD5) == [key]
    # The SHA-256 key cannot be derived from an MD5 key.
    assert store.lookup("dave", ALGORITHM_SHA256) == []


def test_precomputed_key_of_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        make_store(static_users={"dave": b"\x00" * 20})


def test_static_password_refused_by_saslprep_names_user_not_password() -> None:
    with pytest.raises(ValueError) as info:
        make_store(static_users={"erin": "topsecret\u0007"})
    assert "erin" in str(info.value)
    assert "topsecret" not in str(info.value)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        make_store(secrets=[b""])


def test_expiry_follows_the_wall_clock() -> None:
    clock = FakeClock(NOW)
    store = make_store(secrets=[NEW], wall_clock=clock)
    username = f"{int(NOW) + 10}:alice"
    assert not store.is_expired(username)
    clock.now = NOW + 9.999
    assert not store.is_expired(username)
    clock.now = NOW + 10  # timestamp <= now: expired
    assert store.is_expired(username)
    assert store.is_expired(f"{int(NOW) - 1}:alice")
    assert store.is_expired(f"{int(NOW) - 1}")  # timestamp-only form


def test_lookup_does_not_check_expiry() -> None:
    store = make_store(secrets=[NEW])
    username = f"{int(NOW) - 100}:alice"
    assert store.is_expired(username)
    assert store.lookup(username, ALGORITHM_MD5) == [client_key(NEW, username)]


def test_static_users_never_expire_even_with_a_timestamp_like_name() -> None:
    store = make_store(secrets=[NEW], static_users={"carol": "pw", "100:svc": "pw2"})
    assert not store.is_expired("carol")
    assert not store.is_expired("100:svc")
    assert not store.is_rest_username("100:svc")
    # A static name shadows the REST reading: only the static key is offered.
    assert store.lookup("100:svc", ALGORITHM_MD5) == [long_term_key("100:svc", REALM, "pw2")]


def test_is_rest_username() -> None:
    store = make_store(secrets=[NEW], static_users={"carol": "pw"})
    assert store.is_rest_username("1700000000:alice")
    assert store.is_rest_username("1700000000")
    assert not store.is_rest_username("carol")
    assert not store.is_rest_username("alice")


def test_lookup_userhash_static_user() -> None:
    store = make_store(static_users={"carol": "pw"}, secrets=[NEW])
    found = store.lookup_userhash(userhash("carol", REALM), ALGORITHM_SHA256)
    assert found == ("carol", [long_term_key("carol", REALM, "pw", ALGORITHM_SHA256)])


def test_lookup_userhash_unknown_and_rest() -> None:
    store = make_store(static_users={"carol": "pw"}, secrets=[NEW])
    assert store.lookup_userhash(userhash("mallory", REALM), ALGORITHM_MD5) is None
    assert store.lookup_userhash(userhash("carol", "other.realm"), ALGORITHM_MD5) is None
    assert store.lookup_userhash(userhash("1700000000:alice", REALM), ALGORITHM_MD5) is None
    assert store.lookup_userhash(b"", ALGORITHM_MD5) is None


def test_load_secrets() -> None:
    text = "# rotated 2024-01\n  new-secret  \n\nold-secret\n   # indented comment\n"
    assert CredentialStore.load_secrets(text) == [b"new-secret", b"old-secret"]
    assert CredentialStore.load_secrets("") == []


def test_load_static_users(tmp_path: Path) -> None:
    key_hex = hashlib.md5(f"dave:{REALM}:hunter2".encode()).hexdigest()
    path = tmp_path / "users"
    path.write_text(
        "# users\n\ncarol:pa:ss word\n  dave:0x" + key_hex + "  \nerin:0X" + key_hex.upper() + "\n",
        encoding="utf-8",
    )
    users = CredentialStore.load_static_users(str(path))
    assert users == {
        "carol": "pa:ss word",  # everything after the first ':'
        "dave": bytes.fromhex(key_hex),
        "erin": bytes.fromhex(key_hex),
    }
    store = make_store(static_users=users)
    assert store.lookup("dave", ALGORITHM_MD5) == [long_term_key("dave", REALM, "hunter2")]


@pytest.mark.parametrize(
    ("lines", "bad_line", "fragment"),
    [
        (["carol:ok", "nocolonhunter2"], 2, "expected"),
        (["# c", "", ":hunter2"], 3, "empty user"),
        (["carol:"], 1, "empty password"),
        (["carol:hunter2", "carol:hunter2"], 2, "duplicate"),
        (["dave:0xhunter2"], 1, "32-hex-digit"),
        (["dave:0x" + "a" * 31], 1, "32-hex-digit"),
        (["erin:hunter2\u0007"], 1, "SASLprep"),
    ],
)
def test_load_static_users_errors_name_the_line_not_the_password(
    tmp_path: Path, lines: list[str], bad_line: int, fragment: str
) -> None:
    path = tmp_path / "users"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        CredentialStore.load_static_users(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{bad_line}: ")
    assert fragment in message
    assert "hunter2" not in message


def test_load_static_users_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"carol:\xff\xfe\n")
    with pytest.raises(ValueError, match="UTF-8"):
        CredentialStore.load_static_users(str(path))
