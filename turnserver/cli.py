"""The ``turnd`` command: serve, mint credentials, check configuration, and more.

The command is called ``turnd`` so it never shadows coturn's ``turnserver``/``turnutils_*``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as _secrets
import sys
from typing import Any, NoReturn

import click

from . import __version__
from .config import (
    SECRETS_ENV,
    Config,
    ConfigError,
    click_options,
    config_warnings,
    load_and_check,
    load_config,
    load_secrets,
    weak_secret_warnings,
    overrides_from_click,
    parse_hostport,
)
from .credentials import mint_credentials

log = logging.getLogger("turnd")


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"turnd: {message}", err=True)
    sys.exit(code)


def _load(config_path: str | None, kwargs: dict[str, Any]) -> Config:
    """Load and check the configuration; every problem at once, then exit 2."""
    config, problems = load_and_check(config_path, env=os.environ,
                                      overrides=overrides_from_click(kwargs))
    if problems:
        _fail("configuration has problems:\n" + "\n".join(str(p) for p in problems))
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="turnd")
def main() -> None:
    """turnd: a TURN/STUN relay server (RFC 8489, RFC 8656)."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              envvar="TURND_CONFIG", help="TOML configuration file (default /etc/turnd/turnd.toml if present).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write the bound listeners as JSON to this file once serving (for tests and scripts).")
@click_options
def serve(config_path: str | None, ready_file: str | None, **kwargs: Any) -> None:
    """Run the relay server."""
    config = _load(config_path, kwargs)
    from .logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    secrets = load_secrets(config, os.environ)
    static_users: dict[str, str | bytes] = {}
    if config.static_users_file:
        from .auth import CredentialStore

        static_users = CredentialStore.load_static_users(config.static_users_file)
    for problem in config_warnings(config):
        logging.getLogger("turnd").warning("%s", problem)
    generated = not secrets and not static_users
    if generated:
        secrets = [_generated_secret().encode()]
    else:
        for warning in weak_secret_warnings(secrets):
            logging.getLogger("turnd").warning("%s", warning)
    from .io.run import run_server, settings_loader

    # SIGHUP re-reads the same file with the same flags and environment as this start-up.
    reload_settings = settings_loader(config_path, overrides_from_click(kwargs), env=os.environ)
    sys.exit(run_server(config, secrets=secrets, static_users=static_users, ready_file=ready_file,
                        reload_settings=reload_settings, generated_secret=generated))


@main.command()
@click.option("--user", required=True, help="User id placed after the expiry in the username (no ':').")
@click.option("--ttl", type=click.IntRange(min=1), default=86400, show_default=True,
              help="Seconds the credentials stay valid.")
@click.option("--host", default=None, help="Public host name or IP of the server for the URLs "
              "(default: public_host from the configuration).")
@click.option("--format", "fmt", type=click.Choice(["json", "plain", "rest"]), default="json", show_default=True,
              help="json: the iceServers a browser's RTCPeerConnection takes; plain: KEY=value lines for "
              "scripts; rest: the TURN REST API response (username, password, ttl, uris).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              envvar="TURND_CONFIG", help="TOML configuration file, for secrets_file, ports and public_host.")
@click.option("--secrets-file", default=None, type=click.Path(dir_okay=False),
              help=f"File of shared secrets (the first mints). Or set {SECRETS_ENV}.")
def mint(user: str, ttl: int, host: str | None, fmt: str, config_path: str | None,
         secrets_file: str | None) -> None:
    """Mint time-limited TURN REST credentials (the secret never comes from argv)."""
    overrides: dict[str, Any] = {}
    if secrets_file:
        overrides["secrets_file"] = secrets_file
    try:
        config = load_config(config_path, env=os.environ, overrides=overrides)
        secrets = load_secrets(config, os.environ)
    except (ConfigError, ValueError, OSError) as exc:
        _fail(str(exc))
    if not secrets:
        _fail(f"no shared secret: set secrets_file (--secrets-file) or the {SECRETS_ENV} environment variable")
    if not host and not config.public_host:
        from .io.relay import detect_relay_addresses

        host = detect_relay_addresses()[0]
        click.echo(f"turnd: no --host or public_host; using this machine's address {host}", err=True)
    host = host or config.public_host
    ports = _public_ports(config)
    try:
        creds = mint_credentials(secrets[0], user, ttl, host=host, **ports)
    except ValueError as exc:
        _fail(f"--user/--ttl: {exc}")
    if fmt == "json":
        click.echo(json.dumps(creds.ice_servers(), indent=2))
    elif fmt == "rest":
        click.echo(creds.to_json())
    else:
        click.echo(f"USERNAME={creds.username}")
        click.echo(f"PASSWORD={creds.password}")
        click.echo(f"EXPIRES_AT={creds.expires_at}")
        for url in creds.urls:
            click.echo(f"URL={url}")


def _generated_secret() -> str:
    """Embedded defaults: a fresh shared secret for this run, shown once.

    On a terminal it is printed (not logged). Anywhere else (systemd, a container) stderr ends
    up in a log, so the secret goes to a file readable only by this user and only its path is
    printed.
    """
    generated = _secrets.token_urlsafe(32)
    how = ("Mint browser credentials for it with:\n"
           f"  {SECRETS_ENV}=\"$(cat FILE)\" turnd mint --user alice --host <this host's address>\n"
           "Set secrets_file (one secret per line) to keep a secret across restarts.")
    if sys.stderr.isatty():
        click.echo("turnd: no secrets_file configured; generated a shared secret for this run:\n"
                   f"  {generated}\n" + how.replace('"$(cat FILE)"', f"'{generated}'"), err=True)
        return generated
    # systemd's StateDirectory= sets STATE_DIRECTORY (the shipped unit's user has no home).
    directory = os.environ.get("STATE_DIRECTORY") or os.path.expanduser("~")
    path = os.path.join(directory.split(":")[0], "turnd-generated-secret")
    try:
        _write_private(path, generated + "\n")
    except OSError as exc:
        _fail(f"no secrets_file configured, and the shared secret generated for this run cannot "
              f"be written to {path}: {exc.strerror or exc}. Set secrets_file (one secret per "
              f"line) or {SECRETS_ENV}.")
    click.echo(f"turnd: no secrets_file configured; generated a shared secret for this run in {path}\n"
               + how.replace("FILE", path), err=True)
    return generated


def _write_private(path: str, text: str) -> None:
    """Write ``text`` to a new file at ``path`` that only this user can read.

    Whatever was at ``path`` is removed first rather than truncated, so neither an old file's
    wider mode nor a symlink planted there carries over; O_EXCL and O_NOFOLLOW refuse anything
    that appears at ``path`` in between.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # exactly 0600, whatever the umask
        handle.write(text)


def _public_ports(config: Config) -> dict[str, int | None]:
    """Per transport, the port of its first listener with a fixed port; None for none.

    Port 0 (a port the kernel picks) cannot be put in a URL, so such listeners are skipped.
    A malformed listener is a configuration error (exit 2).
    """
    ports: dict[str, int | None] = {}
    problems: list[str] = []
    for key, option, specs in (("udp_port", "listen_udp", config.listen_udp),
                               ("tcp_port", "listen_tcp", config.listen_tcp),
                               ("tls_port", "listen_tls", config.listen_tls)):
        ports[key] = None
        for spec in specs:
            try:
                _, port = parse_hostport(spec, option)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if port and ports[key] is None:
                ports[key] = port
    if problems:
        _fail("configuration has problems:\n" + "\n".join(problems))
    if all(port is None for port in ports.values()):
        _fail("configuration has problems:\nlisten_udp: no listener in listen_udp, listen_tcp or "
              "listen_tls has a fixed port to put in the URLs")
    return ports


def _register_optional_commands() -> None:
    """Commands that live in their own modules."""
    from .config_commands import check, convert_coturn

    main.add_command(check)
    main.add_command(convert_coturn)

    from .probe import probe

    main.add_command(probe)


_register_optional_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
