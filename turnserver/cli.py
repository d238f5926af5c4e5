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
    credentials_configured,
    load_and_check,
    load_config,
    load_secrets,
    weak_secret_warnings,
    overrides_from_click,
    parse_hostport,
)
from .credentials import mint_credentials

log = logging.getLogger("turnd")

# The options of `turnd serve` that `turnd mint` takes as well: what the URLs are made of.
MINT_OPTIONS = ("listen_udp", "listen_tcp", "listen_tls", "public_host")


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
    # A secret is made only when no credential source is configured at all; an empty
    # secrets_file is a revocation, served as one (every credential refused).
    generated = not secrets and not static_users and not credentials_configured(config, os.environ)
    if generated:
        secrets = [_generated_secret(config, config_path).encode()]
    else:
        for warning in weak_secret_warnings(secrets):
            logging.getLogger("turnd").warning("%s", warning)
    from .config_commands import config_file_used
    from .io.run import run_server, settings_loader

    # SIGHUP re-reads the same file with the same flags and environment as this start-up.
    reload_settings = settings_loader(config_path, overrides_from_click(kwargs), env=os.environ)
    sys.exit(run_server(config, secrets=secrets, static_users=static_users, ready_file=ready_file,
                        reload_settings=reload_settings, generated_secret=generated,
                        config_path=config_file_used(config_path)))


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
              envvar="TURND_CONFIG", help="TOML configuration file, for secrets_file, ports and "
              "public_host (default /etc/turnd/turnd.toml if present).")
@click.option("--secrets-file", default=None, type=click.Path(dir_okay=False),
              help=f"File of shared secrets (the first mints). Or set {SECRETS_ENV}.")
@click_options(only=MINT_OPTIONS)
def mint(user: str, ttl: int, host: str | None, fmt: str, config_path: str | None,
         secrets_file: str | None, **flags: Any) -> None:
    """Mint time-limited TURN REST credentials (the secret never comes from argv).

    The URLs name every port the server listens on, read like `turnd serve` reads them: the
    configuration file, TURND_* variables and the same --listen-* flags (443 first).
    """
    overrides: dict[str, Any] = overrides_from_click(flags)
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
        creds = mint_credentials(secrets[0], user, ttl, host=host, **ports)  # type: ignore[arg-type]
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


def _mint_hint_flags(config: Config, config_path: str | None) -> str:
    """The flags that make `turnd mint` describe this server: its configuration file and
    every listener that is not the default (from a flag or the environment, say)."""
    import shlex

    parts: list[str] = []
    if config_path:
        parts += ["--config", config_path]
    defaults = Config()
    for name in ("listen_udp", "listen_tcp", "listen_tls"):
        value = getattr(config, name)
        if value != getattr(defaults, name):
            flag = "--" + name.replace("_", "-")
            parts += [item for spec in (value or ("",)) for item in (flag, spec)]
    return "".join(" " + shlex.quote(part) for part in parts)


def _detected_host() -> str:
    """This machine's primary address (what the relay defaults to), for a hint."""
    from .io.relay import detect_relay_addresses

    address = detect_relay_addresses()[0]
    return f"[{address}]" if ":" in address else address


def _generated_secret(config: Config, config_path: str | None = None) -> str:
    """Embedded defaults: a fresh shared secret for this run, shown once.

    On a terminal it is printed (not logged). Anywhere else (systemd, a container) stderr ends
    up in a log, so the secret goes to a file readable only by this user and only its path is
    printed. The file is this instance's (see _generated_secret_path).
    """
    generated = _secrets.token_urlsafe(32)
    host = config.public_host or _detected_host()
    how = ("Mint browser credentials for it with (a command to paste as it is; name the host "
           "clients use with --host):\n"
           f"  {SECRETS_ENV}=\"$(cat FILE)\" turnd mint --user alice --host {host}"
           f"{_mint_hint_flags(config, config_path)}\n"
           "Set secrets_file (one secret per line) to keep a secret across restarts.")
    if sys.stderr.isatty():
        click.echo("turnd: no secrets_file configured; generated a shared secret for this run:\n"
                   f"  {generated}\n" + how.replace('"$(cat FILE)"', f"'{generated}'"), err=True)
        return generated
    # systemd's StateDirectory= sets STATE_DIRECTORY (the shipped unit's user has no home).
    directory = os.environ.get("STATE_DIRECTORY") or os.path.expanduser("~")
    path = _generated_secret_path(directory.split(":")[0], config)
    try:
        _write_private(path, generated + "\n")
        _hold(path)
    except OSError as exc:
        _fail(f"no secrets_file configured, and the shared secret generated for this run cannot "
              f"be written to {path}: {exc.strerror or exc}. Set secrets_file (one secret per "
              f"line) or {SECRETS_ENV}.")
    click.echo(f"turnd: no secrets_file configured; generated a shared secret for this run in {path}\n"
               + how.replace("FILE", path), err=True)
    return generated


# The generated secret's file stays locked while the instance that wrote it runs.
_held: list[int] = []


def _generated_secret_path(directory: str, config: Config) -> str:
    """This instance's file: "turnd-generated-secret" for the default listeners, else keyed
    by the listeners, so that two instances (one per relay address, as docs/deploy.md has
    them) never overwrite each other's secret. A file that a running instance holds (a
    lock) is never reused: the next free name is taken instead."""
    import fcntl
    import hashlib

    base = os.path.join(directory, "turnd-generated-secret")
    defaults = Config()
    listeners = (config.listen_udp, config.listen_tcp, config.listen_tls)
    if listeners != (defaults.listen_udp, defaults.listen_tcp, defaults.listen_tls):
        base += "-" + hashlib.sha256(json.dumps(listeners).encode()).hexdigest()[:8]
    for attempt in range(100):
        path = base if attempt == 0 else f"{base}.{attempt + 1}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return path  # absent (or not ours to read): free
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running instance holds it
        finally:
            os.close(fd)
        return path
    _fail(f"no free file for a generated secret next to {base}: set secrets_file")


def _hold(path: str) -> None:
    """Lock ``path`` for as long as this process runs (the lock goes with the process)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fd)


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


def _public_ports(config: Config) -> dict[str, list[int] | None]:
    """Per transport, every fixed port it listens on (each once; None for none).

    Port 0 (a port the kernel picks) cannot be put in a URL, so such listeners are skipped.
    A malformed listener is a configuration error (exit 2).
    """
    ports: dict[str, list[int] | None] = {}
    problems: list[str] = []
    for key, option, specs in (("udp_port", "listen_udp", config.listen_udp),
                               ("tcp_port", "listen_tcp", config.listen_tcp),
                               ("tls_port", "listen_tls", config.listen_tls)):
        found: list[int] = []
        for spec in specs:
            try:
                _, port = parse_hostport(spec, option)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if port and port not in found:
                found.append(port)
        ports[key] = found or None
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

    from .admin_cli import admin, verify_usage_log

    main.add_command(admin)
    main.add_command(verify_usage_log)


_register_optional_commands()


def _whole_first_lines() -> None:
    """`turnd --help` lists each command with its whole first sentence, not click's cut one."""
    for command in main.commands.values():
        if command.help and not command.short_help:
            first = command.help.strip().split("\n\n", 1)[0]
            command.short_help = " ".join(first.split())


_whole_first_lines()


if __name__ == "__main__":  # pragma: no cover
    main()
