"""Certificates and secrets as an operator meets them on a running server: an expired
certificate warns but stops nothing, a refused TLS reload is counted (and the alert on it
fires on the real numbers), and a reload that removes every secret revokes them."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from turnserver.client import ErrorResponse, TurnClient, client_tls_context
from turnserver.credentials import mint_credentials

from .server import start_server
from .test_metrics import scrape
from .test_reload import OLD_SECRET, reload, rewrite_config, write_secrets


def alert_fires(alert: str, series: str, values: list[float], tmp_path: Path) -> bool:
    """Whether promtool, given the documented alert rules and ``series`` with ``values`` a
    minute apart, finds ``alert`` firing at the last one."""
    from tests.unit.test_metrics_docs import rules_yaml

    (tmp_path / "turnd-rules.yml").write_text(rules_yaml())
    name, _, labels = series.partition("{")
    labelled = f'{name}{{job="turnd", instance="a:9641", {labels}' if labels else f'{name}{{job="turnd", instance="a:9641"}}'
    test = tmp_path / "alert.test.yml"
    test.write_text(
        "rule_files: [turnd-rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n"
        f"    input_series:\n      - series: '{labelled}'\n"
        f"        values: '{' '.join(str(int(v)) for v in values)}'\n"
        f"    alert_rule_test:\n      - eval_time: {len(values) - 1}m\n"
        f"        alertname: {alert}\n        exp_alerts: []\n")
    result = subprocess.run(["promtool", "test", "rules", test.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return False
    assert alert in output, output  # failed because the alert fired, not for another reason
    return True


def make_cert(directory: Path, name: str, days_from: int, days_to: int) -> tuple[Path, Path]:
    """A self-signed certificate valid from ``days_from`` to ``days_to`` days from now."""
    from tests.unit.test_config_check import make_cert as make

    cert, key = make(directory, name, days_from=days_from, days_to=days_to)
    Path(key).chmod(0o600)
    return Path(cert), Path(key)


def test_an_expired_certificate_warns_but_every_listener_serves(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "expired", -60, -1)
    server = start_server(tmp_path / "turnd", listen_tcp=["127.0.0.1:0"], listen_tls=["127.0.0.1:0"],
                          tls_cert_file=str(cert), tls_key_file=str(key), metrics_listen="127.0.0.1:0")
    try:
        assert "expired on" in server.log_text() and "UDP and TCP are unaffected" in server.log_text()
        kinds = {lst["transport"] for lst in server.info["listeners"]}
        assert {"udp", "tcp", "tls"} <= kinds

        async def allocate(transport: str, port: int) -> None:
            creds = mint_credentials(server.secret, "alice", 600)
            context = client_tls_context(verify=False) if transport == "tls" else None
            async with await TurnClient.connect("127.0.0.1", port, transport=transport,
                                                username=creds.username, password=creds.password,
                                                ssl_context=context, timeout_s=3.0) as client:
                assert (await client.allocate())[1] > 0

        for transport in ("udp", "tcp", "tls"):  # TLS keeps serving the expired certificate
            asyncio.run(asyncio.wait_for(allocate(transport, server.port(transport)), 15))
        # An unrelated reload (a new secret) is applied, not refused for the certificate.
        write_secrets(server, "rotated-secret-0123456789abcdef")
        asyncio.run(reload(server, "reload applied"))
        metrics = asyncio.run(scrape(server))
        assert metrics.get("turn_tls_certificate_not_after_timestamp_seconds") < time.time()
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_a_refused_tls_reload_is_counted_and_its_alert_fires(tmp_path: Path) -> None:
    good_cert, good_key = make_cert(tmp_path, "good", -1, 30)
    other_cert, other_key = make_cert(tmp_path, "other", -1, 30)
    server = start_server(tmp_path / "turnd", secrets=[OLD_SECRET], listen_tls=["127.0.0.1:0"],
                          tls_cert_file=str(good_cert), tls_key_file=str(good_key),
                          metrics_listen="127.0.0.1:0")
    try:
        before = asyncio.run(scrape(server)).get("turn_tls_reloads_total", result="failed")
        # A key that does not match the certificate: refused by the configuration check.
        rewrite_config(server, tls_key_file=str(other_key))
        asyncio.run(reload(server, "reload refused"))
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate\n")
        rewrite_config(server, tls_cert_file=str(garbage), tls_key_file=str(good_key))
        asyncio.run(reload(server, "reload refused"))
        after = asyncio.run(scrape(server)).get("turn_tls_reloads_total", result="failed")
        assert (before, after) == (0, 2)
        # The documented alert, evaluated by promtool on what the server really exported.
        assert alert_fires("TurnTlsReloadFailed", 'turn_tls_reloads_total{result="failed"}',
                           [before, before, after, after], tmp_path)
        assert not alert_fires("TurnTlsReloadFailed", 'turn_tls_reloads_total{result="failed"}',
                               [before] * 4, tmp_path)
    finally:
        server.stop()
        _ = other_cert


def test_a_reload_that_removes_every_secret_revokes_them(tmp_path: Path) -> None:
    server = start_server(tmp_path / "turnd", secrets=[OLD_SECRET])

    async def attempt() -> None:
        creds = mint_credentials(OLD_SECRET, "alice", 600)
        async with await TurnClient.connect("127.0.0.1", server.port("udp"), username=creds.username,
                                            password=creds.password, timeout_s=3.0) as client:
            await client.allocate()

    try:
        asyncio.run(attempt())
        # The operator revokes a leaked secret by emptying the secrets file.
        write_secrets(server)
        asyncio.run(reload(server, "every credential is revoked"))
        with pytest.raises(ErrorResponse) as refused:
            asyncio.run(attempt())
        assert refused.value.code == 401
        assert "reload applied" in server.log_text()
        # ... or by removing the secrets_file option: the same.
        write_secrets(server, OLD_SECRET)
        asyncio.run(reload(server, "reload applied"))
        asyncio.run(attempt())
        server.options.pop("secrets_file")
        rewrite_config(server)
        asyncio.run(reload(server, "every credential is revoked"))
        with pytest.raises(ErrorResponse):
            asyncio.run(attempt())
    finally:
        server.stop()


def test_a_server_started_with_an_empty_secrets_file_refuses_everyone(tmp_path: Path) -> None:
    # An empty secrets_file is configured credentials: no one-run secret is made for it.
    server = start_server(tmp_path / "turnd", secrets=[""])
    try:
        assert "generated a shared secret" not in server.log_text()
        assert "holds no secrets" in server.log_text()

        async def attempt() -> None:
            creds = mint_credentials(OLD_SECRET, "alice", 600)
            async with await TurnClient.connect("127.0.0.1", server.port("udp"), username=creds.username,
                                                password=creds.password, timeout_s=3.0) as client:
                await client.allocate()

        with pytest.raises(ErrorResponse) as refused:
            asyncio.run(attempt())
        assert refused.value.code == 401
    finally:
        server.stop()
