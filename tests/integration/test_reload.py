"""SIGHUP reload on a real turnd: secrets, peer policy and bad configurations, under load.

Two allocations relay to each other continuously while the configuration changes under them;
not one round trip may fail and no allocation may end.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from turnserver.client import Address, ErrorResponse, TransactionTimeout, TurnClient, client_tls_context
from turnserver.config import toml_literal
from turnserver.credentials import mint_credentials

from .server import RunningServer, start_server

OLD_SECRET = "reload-old-secret"
NEW_SECRET = "reload-new-secret"
LOG_WAIT_S = 10.0


def rewrite_config(server: RunningServer, **changes: Any) -> None:
    """Write the server's TOML again with ``changes`` on top of what it started with."""
    server.options.update(changes)
    server.config_path.write_text("".join(f"{k} = {toml_literal(v)}\n" for k, v in server.options.items()))


def write_secrets(server: RunningServer, *secrets: str) -> None:
    (server.workdir / "secrets").write_text("\n".join(secrets) + "\n")


async def wait_for_log(server: RunningServer, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        if server.log_text().count(text) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear {count} time(s) in the log:\n{server.log_text()}")


async def reload(server: RunningServer, outcome: str) -> None:
    """SIGHUP, then wait for the next log line saying ``outcome``."""
    seen = server.log_text().count(outcome)
    server.signal(signal.SIGHUP)
    await wait_for_log(server, outcome, seen + 1)


async def client(server: RunningServer, secret: str, user: str = "alice") -> TurnClient:
    creds = mint_credentials(secret, user, 600)
    return await TurnClient.connect("127.0.0.1", server.port("udp"), username=creds.username,
                                    password=creds.password, timeout_s=3.0)


async def expect(receiver: TurnClient, peer: Address, payload: bytes, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    for _ in range(64):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        got_peer, data = await receiver.receive(remaining)
        if data == payload:
            assert got_peer == peer
            return
    raise TransactionTimeout(f"{payload!r} did not arrive")


class Pump:
    """A -> B over a channel, B -> A over Send indications, one round trip at a time."""

    def __init__(self, a: TurnClient, b: TurnClient, ra: Address, rb: Address) -> None:
        self.a, self.b, self.ra, self.rb = a, b, ra, rb
        self.ok = 0
        self.failed = 0
        self.stopping = asyncio.Event()

    async def run(self, max_rounds: int = 20000) -> None:
        for i in range(max_rounds):
            if self.stopping.is_set():
                return
            payload = f"round {i}".encode()
            try:
                self.a.send_to(self.rb, payload)
                await expect(self.b, self.ra, payload, 2.0)
                self.b.send_to(self.ra, payload)
                await expect(self.a, self.rb, payload, 2.0)
                self.ok += 1
            except TransactionTimeout:
                self.failed += 1
            await asyncio.sleep(0.002)


async def relay_pair(server: RunningServer, secret: str) -> tuple[TurnClient, TurnClient, Pump]:
    a = await client(server, secret)
    b = await client(server, secret)
    ra = await a.allocate()
    rb = await b.allocate()
    await a.channel_bind(rb)
    await b.create_permission(ra)
    return a, b, Pump(a, b, ra, rb)


def test_reload_under_load_secrets_policy_realm_and_a_bad_config(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd", secrets=[OLD_SECRET])

    async def main() -> None:
        a, b, pump = await relay_pair(server, OLD_SECRET)
        task = asyncio.create_task(pump.run())
        try:
            await asyncio.sleep(0.3)
            # Loopback peers are refused by default (docs/security.md).
            with pytest.raises(ErrorResponse) as refused:
                await a.create_permission(("127.0.0.2", 9))
            assert refused.value.code == 403

            # Reload 1: a new first secret (the old one still accepted), a peer allow-list entry,
            # and a realm change, which needs a restart and so must not take effect.
            write_secrets(server, NEW_SECRET, OLD_SECRET)
            rewrite_config(server, allowed_peers=["127.0.0.2/32"], realm="changed.realm")
            await reload(server, "reload applied")
            assert "allowed_peers" in server.log_text().split("reload applied")[-1].splitlines()[0]
            await wait_for_log(server, "realm changed but needs a restart")
            await a.create_permission(("127.0.0.2", 9))  # the new policy, for an old allocation
            fresh = await client(server, NEW_SECRET, "carol")
            await fresh.allocate()
            assert fresh.realm == "test.turnd"  # the running realm stayed
            await fresh.close()

            # Reload 2: the old secret removed. New allocations with it are refused at once;
            # the allocations made with it keep relaying.
            write_secrets(server, NEW_SECRET)
            await reload(server, "reload applied")
            stale = await client(server, OLD_SECRET, "dave")
            with pytest.raises(ErrorResponse) as unauthorized:
                await stale.allocate()
            assert unauthorized.value.code == 401
            await stale.close()
            current = await client(server, NEW_SECRET, "erin")
            await current.allocate()

            # Reload 3: a broken configuration. Every problem is logged; nothing changes.
            rewrite_config(server, allowed_peers=["not-a-cidr"], default_lifetime_s=7200)
            await reload(server, "reload refused")
            log = server.log_text()
            assert "reload: allowed_peers:" in log
            assert "reload: default_lifetime_s:" in log
            await current.create_permission(("127.0.0.2", 9))  # reload 1's policy still holds
            assert await current.refresh(900) == 900
            await current.close()

            await asyncio.sleep(0.3)
        finally:
            pump.stopping.set()
            await asyncio.wait_for(task, 10)
        assert pump.failed == 0
        assert pump.ok >= 20
        # Nothing ended while the configuration changed: no usage record yet for a or b.
        assert "reason=expired" not in server.log_text()
        assert server.log_text().count("allocation ended") == 2  # carol's and erin's, deleted
        await a.close()
        await b.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
        assert server.alive()
    finally:
        assert server.stop() == 0


def test_reload_applies_quota_and_lifetime_changes(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd", secrets=[OLD_SECRET])

    async def main() -> None:
        first = await client(server, OLD_SECRET, "quota")
        await first.allocate()
        assert first.lifetime_s == 600
        rewrite_config(server, user_quota=1, default_lifetime_s=900, max_lifetime_s=1800)
        await reload(server, "reload applied")
        second = await client(server, OLD_SECRET, "quota")
        with pytest.raises(ErrorResponse) as caught:
            await second.allocate()
        assert caught.value.code == 486  # the new quota counts the allocation made before it
        other = await client(server, OLD_SECRET, "someone-else")
        await other.allocate()
        assert other.lifetime_s == 900
        assert await first.refresh(3600) == 1800  # the new maximum, on an old allocation
        for c in (first, second, other):
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert server.stop() == 0


def test_reload_log_level_takes_effect(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd", secrets=[OLD_SECRET])

    async def main() -> None:
        rewrite_config(server, log_level="warning")
        await reload(server, "reload applied")
        # At warning level the next reload's info lines are gone; its restart warning is not.
        rewrite_config(server, realm="another.realm")
        before = server.log_text().count("reload applied")
        server.signal(signal.SIGHUP)
        await wait_for_log(server, "realm changed but needs a restart")
        assert server.log_text().count("reload applied") == before

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        assert server.stop() == 0


def test_reload_rereads_the_tls_certificate(tmp_path: Path) -> None:
    import ssl
    import subprocess

    def make_cert(name: str) -> tuple[Path, Path]:
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=30,
        )
        return cert, key

    first_cert, first_key = make_cert("first")
    second_cert, second_key = make_cert("second")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(first_cert.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    server = start_server(tmp_path / "turnd", secrets=[OLD_SECRET], listen_tls=["127.0.0.1:0"],
                          tls_cert_file=str(live_cert), tls_key_file=str(live_key))

    async def served_subject() -> str:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", server.port("tls"), ssl=context), 5)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        pem = ssl.DER_cert_to_PEM_cert(der)
        return pem

    async def tls_client() -> TurnClient:
        creds = mint_credentials(OLD_SECRET, "tls-user", 600)
        return await TurnClient.connect("127.0.0.1", server.port("tls"), transport="tls",
                                        ssl_context=client_tls_context(verify=False),
                                        username=creds.username, password=creds.password, timeout_s=3.0)

    async def main() -> None:
        # A relay between two allocations made over TLS, running while the certificate changes:
        # established TLS connections keep their session and keep relaying.
        a, b = await tls_client(), await tls_client()
        ra, rb = await a.allocate(), await b.allocate()
        await a.channel_bind(rb)
        await b.create_permission(ra)
        pump = Pump(a, b, ra, rb)
        task = asyncio.create_task(pump.run())
        try:
            assert await served_subject() == ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(first_cert.read_text()))
            await asyncio.sleep(0.2)
            live_cert.write_bytes(second_cert.read_bytes())  # a renewal: same path, new content
            live_key.write_bytes(second_key.read_bytes())
            await reload(server, "reload applied")
            assert await served_subject() == ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(second_cert.read_text()))
            await asyncio.sleep(0.2)
        finally:
            pump.stopping.set()
            await asyncio.wait_for(task, 10)
        assert pump.failed == 0 and pump.ok >= 10
        assert await a.refresh(900) == 900  # requests on the old connection still work
        await a.close()
        await b.close()

    try:
        assert "tls" in {lst["transport"] for lst in server.info["listeners"]}, server.info
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.stop()
