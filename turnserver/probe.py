"""``turnd probe``: check a running server from the outside, the way a client would.

Per transport (UDP, TCP, TLS to the server; the relay is always UDP):

1. a STUN Binding request (RFC 8489 §3), which needs no credentials;
2. an Allocate with REST credentials the probe mints itself from the shared secret;
3. a second allocation, so the two can relay to each other and no outside peer is needed:
   the first binds a channel to the second's relayed address (RFC 8656 §12.1), the second
   installs a permission for the first's (§10.1);
4. data both ways: ChannelData out and a Data indication in on one side, a Send indication
   out and ChannelData in on the other (§11, §12), timed as one relay round trip;
5. Refresh with LIFETIME 0 on both (§8.1), so the probe leaves nothing behind.

Exit status: 0 when every transport passed, 1 when any failed, 2 for usage errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Iterable
from typing import Any

import click

from .client import (
    TRANSPORTS,
    Address,
    ErrorResponse,
    TransactionTimeout,
    TransportError,
    TurnClient,
    TurnClientError,
    client_tls_context,
    method_name,
)
from .config import SECRETS_ENV, Config, ConfigError, format_hostport, load_config, load_secrets, parse_hostport
from .credentials import mint_credentials

__all__ = ["ProbeResult", "explain_failure", "probe_transport", "run_probe", "probe"]

DEFAULT_PORTS = {"udp": 3478, "tcp": 3478, "tls": 5349}
# Long enough to outlast the probe and modest clock skew; the credentials are thrown away.
CREDENTIAL_TTL_S = 600
# UDP may drop a datagram; the data exchange is tried this many times before it fails.
DATA_ATTEMPTS = 3
# Relayed address families the probe can ask for (RFC 8656 REQUESTED-ADDRESS-FAMILY).
FAMILIES = {"ipv4": 1, "ipv6": 2}


@dataclass
class ProbeResult:
    transport: str
    host: str
    port: int
    ok: bool = False
    step: str = "connect"  # the step that failed, or "done"
    error: str | None = None
    mapped: str | None = None
    relayed: list[str] = field(default_factory=list)
    binding_rtt_ms: float | None = None
    allocate_ms: float | None = None  # the 401 challenge and the authenticated retry together
    relay_rtt_ms: float | None = None
    alpn: str | None = None  # over TLS: the ALPN protocol agreed (RFC 7443 "stun.turn")
    family: str = "ipv4"  # the relayed address family asked for (REQUESTED-ADDRESS-FAMILY)


def _fmt(address: Address | None) -> str | None:
    if address is None:
        return None
    return format_hostport(*address)


def explain_failure(exc: BaseException, step: str) -> str:
    """What went wrong, worded for the operator, with the likely cause where there is one."""
    if isinstance(exc, ErrorResponse):
        what = f"{exc.code} {exc.reason}"
        if exc.code == 401:
            if "expired" in exc.reason.lower():
                return f"{what}: is this machine's clock right?"
            return f"{what}: wrong secret?"
        if exc.code == 438:
            return f"{what}: the server keeps calling the nonce stale; are the clocks far apart?"
        if exc.code == 300:
            alternate = _fmt(exc.alternate_server)
            return f"{what}: the server is draining" + (f" and sends clients to {alternate}" if alternate else "")
        if exc.code == 508 and "drain" in exc.reason.lower():
            return f"{what}: it refuses new allocations while it shuts down"
        if exc.code == 508:
            return f"{what}: no relay port free or max_allocations reached"
        if exc.code == 486:
            return (f"{what}: user_quota reached for the probe's user part (its allocations "
                    "elsewhere count too; try another --user)")
        if exc.code == 440:
            return f"{what}: the server has no relay address of this family"
        if exc.code == 403:
            return f"{what} on {method_name(exc.method)}: the peer policy refused the other allocation's relayed address"
        return f"{what} on {method_name(exc.method)}"
    if isinstance(exc, TransactionTimeout):
        hint = " (server down, or a firewall dropping the packets?)" if step in ("connect", "binding") else ""
        return f"timeout: {exc}{hint}"
    if isinstance(exc, TransportError):
        text = str(exc)
        if "certificate verify failed" in text:
            if "mismatch" in text:
                return (f"{text} (--server-name names the certificate's name when HOST is an "
                        "address or another name)")
            return (f"{text} (--ca-file trusts your own CA; --insecure skips verification, e.g. "
                    "for a self-signed certificate)")
        return text
    return f"{type(exc).__name__}: {exc}"


async def _exchange(a: TurnClient, b: TurnClient, a_relayed: Address, b_relayed: Address,
                    timeout_s: float) -> float:
    """One relay round trip: A -> B (ChannelData in, Data indication out) and B -> A (Send
    indication in, ChannelData out). Returns the seconds it took."""
    wait_s = max(timeout_s / DATA_ATTEMPTS, 0.05)
    last: BaseException | None = None
    for attempt in range(DATA_ATTEMPTS):
        token = os.urandom(8).hex().encode()
        started = time.monotonic()
        a.send_to(b_relayed, b"ping " + token)
        try:
            await _expect(b, a_relayed, b"ping " + token, wait_s, "from the first allocation to the second")
            b.send_to(a_relayed, b"pong " + token)
            await _expect(a, b_relayed, b"pong " + token, wait_s, "from the second allocation to the first")
        except TransactionTimeout as exc:
            last = exc
            continue
        return time.monotonic() - started
    assert last is not None
    raise last


async def _expect(client: TurnClient, peer: Address, payload: bytes, wait_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    # Bounded: leftovers from an earlier attempt are skipped, at most a handful.
    for _ in range(16):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            got_peer, data = await client.receive(remaining)
        except TransactionTimeout:
            break
        if data == payload:
            if got_peer != peer:
                raise TurnClientError(f"relayed data arrived from {_fmt(got_peer)}, expected {_fmt(peer)}")
            return
    raise TransactionTimeout(f"relayed data did not arrive {what} within {wait_s:g} s")


async def probe_transport(
    host: str,
    port: int,
    transport: str,
    *,
    username: str,
    password: str,
    peer_username: str | None = None,
    peer_password: str | None = None,
    timeout_s: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
    family: str = "ipv4",
) -> ProbeResult:
    """Run every step over one transport; never raises for a server-side failure.

    The second allocation uses ``peer_username`` when given: a user part of its own, so that
    a ``user_quota`` of 1 does not fail the probe.
    """
    result = ProbeResult(transport, host, port, family=family)
    clients: list[TurnClient] = []
    options: dict[str, Any] = {
        "transport": transport, "username": username, "password": password,
        "timeout_s": timeout_s, "ssl_context": ssl_context, "software": "turnd probe",
        "server_hostname": server_name,
    }
    peer_options = dict(options, username=peer_username or username,
                        password=peer_password or password)
    requested = FAMILIES[family]
    try:
        a = await TurnClient.connect(host, port, **options)
        clients.append(a)
        result.alpn = a.alpn_protocol
        result.step = "binding"
        started = time.monotonic()
        result.mapped = _fmt(await a.binding())
        result.binding_rtt_ms = round((time.monotonic() - started) * 1000, 3)
        result.step = "allocate"
        started = time.monotonic()
        a_relayed = await a.allocate(family=requested)
        result.allocate_ms = round((time.monotonic() - started) * 1000, 3)
        result.step = "connect"
        b = await TurnClient.connect(host, port, **peer_options)
        clients.append(b)
        result.step = "allocate"
        b_relayed = await b.allocate(family=requested)
        result.relayed = [r for r in (_fmt(a_relayed), _fmt(b_relayed)) if r]
        result.step = "channel_bind"
        await a.channel_bind(b_relayed)
        result.step = "create_permission"
        await b.create_permission(a_relayed)
        result.step = "data"
        rtt = await _exchange(a, b, a_relayed, b_relayed, timeout_s)
        result.relay_rtt_ms = round(rtt * 1000, 3)
        result.step = "done"
        result.ok = True
    except TurnClientError as exc:
        result.error = explain_failure(exc, result.step)
    finally:
        for client in clients:
            await client.close()
    return result


async def run_probe(
    host: str,
    targets: list[tuple[str, int]],
    *,
    secret: bytes | str,
    user: str = "probe",
    timeout_s: float = 5.0,
    insecure: bool = False,
    ca_file: str | None = None,
    server_name: str | None = None,
    families: tuple[str, ...] = ("ipv4",),
) -> list[ProbeResult]:
    """Probe each (transport, port) and relayed family in turn with freshly minted
    credentials: ``user`` for the first allocation, ``user-peer`` for the second."""
    creds = mint_credentials(secret, user, CREDENTIAL_TTL_S)
    peer = mint_credentials(secret, f"{user}-peer", CREDENTIAL_TTL_S)
    results = []
    for transport, port in targets:
        context = (client_tls_context(verify=not insecure, ca_file=ca_file)
                   if transport == "tls" else None)
        for family in families:
            results.append(await probe_transport(
                host, port, transport, username=creds.username, password=creds.password,
                peer_username=peer.username, peer_password=peer.password,
                timeout_s=timeout_s, ssl_context=context, server_name=server_name, family=family,
            ))
    return results


def format_result(result: ProbeResult) -> str:
    where = _fmt((result.host, result.port))
    if result.family != "ipv4":
        where += f" ({result.family} relay)"
    if result.ok:
        return (f"{result.transport:<4} {where}  PASS  binding {result.binding_rtt_ms:.1f} ms, "
                f"allocate {result.allocate_ms:.1f} ms, relay round trip {result.relay_rtt_ms:.1f} ms "
                f"(mapped {result.mapped}, relayed {', '.join(result.relayed)}"
                + (f", ALPN {result.alpn})" if result.alpn else ")"))
    return f"{result.transport:<4} {where}  FAIL  {result.step}: {result.error}"


def _parse_choices(text: str, allowed: Iterable[str], hint: str) -> list[str]:
    """A comma-separated subset of ``allowed``, each once, in the order given."""
    allowed = tuple(allowed)
    chosen: list[str] = []
    for item in text.split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in allowed:
            raise click.BadParameter(f"{name!r} is not one of {', '.join(allowed)}", param_hint=hint)
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise click.BadParameter(f"name at least one of {', '.join(allowed)}", param_hint=hint)
    return chosen


def _configured_ports(config: Config) -> dict[str, int | None]:
    """The first fixed port of each transport's listeners in ``config`` (None for none)."""
    out: dict[str, int | None] = {}
    for transport, specs in (("udp", config.listen_udp), ("tcp", config.listen_tcp),
                             ("tls", config.listen_tls)):
        out[transport] = None
        for spec in specs:
            try:
                _, port = parse_hostport(spec, f"listen_{transport}")
            except ValueError:
                continue
            if port:
                out[transport] = port
                break
    return out


@click.command()
@click.argument("host", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              envvar="TURND_CONFIG", help="The server's TOML configuration: its secrets_file, "
              "listener ports and public_host (the HOST when none is given).")
@click.option("--udp-port", type=click.IntRange(1, 65535), default=None,
              help=f"Default: from --config, else {DEFAULT_PORTS['udp']}.")
@click.option("--tcp-port", type=click.IntRange(1, 65535), default=None,
              help=f"Default: from --config, else {DEFAULT_PORTS['tcp']}.")
@click.option("--tls-port", type=click.IntRange(1, 65535), default=None,
              help=f"Default: from --config, else {DEFAULT_PORTS['tls']}.")
@click.option("--transports", default="udp,tcp,tls", show_default=True,
              help="Comma-separated transports to check.")
@click.option("--families", default="ipv4", show_default=True,
              help="Comma-separated relayed address families to ask for: ipv4, ipv6.")
@click.option("--secrets-file", type=click.Path(dir_okay=False), default=None,
              help=f"File of shared secrets (the first mints). Or set {SECRETS_ENV}.")
@click.option("--user", default="probe", show_default=True,
              help="User part of the minted usernames: USER for the first allocation, USER-peer "
              "for the second (they appear in the server's usage log).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for each answer.")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Verify the TLS certificate against the CA certificates in this PEM file "
              "instead of the system's (one's own CA).")
@click.option("--server-name", default=None,
              help="The name the TLS certificate must carry (and the SNI sent); default HOST.")
@click.option("--insecure", is_flag=True, help="Do not verify the TLS certificate.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on standard output.")
def probe(host: str | None, config_path: str | None, udp_port: int | None, tcp_port: int | None,
          tls_port: int | None, transports: str, families: str, secrets_file: str | None,
          user: str, timeout_s: float, ca_file: str | None, server_name: str | None,
          insecure: bool, as_json: bool) -> None:
    """Check a running server from outside: Binding, Allocate and relayed data per transport.

    Two allocations relay to each other, so no outside peer is needed. The credentials are
    minted here from the shared secret, which never comes from the command line.
    Exit status 0 when every transport passes, 1 when any fails, 2 on usage errors.
    """
    chosen = _parse_choices(transports, TRANSPORTS, "--transports")
    chosen_families = tuple(_parse_choices(families, FAMILIES, "--families"))
    config = Config()
    if config_path is not None:
        try:
            config = load_config(config_path, env={})
        except ConfigError as exc:
            raise click.UsageError(f"--config: {exc}") from None
    if secrets_file is not None:
        config = replace(config, secrets_file=secrets_file)
    if host is None:
        host = config.public_host
        if host is None:
            raise click.UsageError("name the HOST, or give a --config with public_host")
    configured = _configured_ports(config) if config_path is not None else {}
    given = {"udp": udp_port, "tcp": tcp_port, "tls": tls_port}
    ports = {t: given[t] or configured.get(t) or DEFAULT_PORTS[t] for t in TRANSPORTS}
    try:
        secrets = load_secrets(config, os.environ)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if not secrets:
        raise click.UsageError(f"no shared secret: use --secrets-file, --config or set {SECRETS_ENV}")
    if ":" in user:
        raise click.BadParameter("must not contain ':'", param_hint="--user")
    results = asyncio.run(run_probe(
        host, [(t, ports[t]) for t in chosen], secret=secrets[0], user=user,
        timeout_s=timeout_s, insecure=insecure, ca_file=ca_file, server_name=server_name,
        families=chosen_families,
    ))
    ok = all(r.ok for r in results)
    if as_json:
        click.echo(json.dumps({"host": host, "ok": ok, "results": [asdict(r) for r in results]}))
    else:
        for result in results:
            click.echo(format_result(result))
        passed = sum(r.ok for r in results)
        click.echo(f"{passed} of {len(results)} checks passed")
    sys.exit(0 if ok else 1)
