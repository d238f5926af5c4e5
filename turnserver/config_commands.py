"""`turnd check` and `turnd convert-coturn`: the configuration commands.

They are plain click commands; turnserver.cli adds them to its group.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import click

import turnserver.config as config_module
from turnserver.config import (
    CONFIG_ENV,
    Config,
    Problem,
    click_options,
    config_warnings,
    load_and_check,
    load_secrets,
    weak_secret_warnings,
    overrides_from_click,
)
from turnserver.coturn_conf import convert

__all__ = ["check", "convert_coturn", "summarize"]

# Exit status for "the configuration is wrong", as click uses for usage errors.
EXIT_BAD_CONFIG = 2


def _fail(problems: list[Problem]) -> NoReturn:
    for problem in problems:
        click.echo(str(problem), err=True)
    raise click.exceptions.Exit(EXIT_BAD_CONFIG)


def summarize(config: Config, secrets_count: int) -> list[str]:
    """A few lines saying what the server would do; no secret material, only a count."""
    def listed(items: tuple[str, ...]) -> str:
        return ", ".join(items) if items else "off"

    tls_source = ("self-signed certificate made at start-up" if config.tls_cert_file is None
                  else f"certificate {config.tls_cert_file}")
    relay = ", ".join(config.relay_addresses) or "primary address (detected at start-up)"
    ports = config.relay_port_max - config.relay_port_min + 1
    lines = [
        f"listeners: udp {listed(config.listen_udp)}; tcp {listed(config.listen_tcp)}; "
        f"tls {listed(config.listen_tls)}",
    ]
    if config.listen_tls:
        lines.append(f"tls: {tls_source}")
    lines.append(f"relay: {relay}, ports {config.relay_port_min}-{config.relay_port_max} "
                 f"({ports} ports)")
    if config.external_addresses:
        lines.append(f"external addresses: {', '.join(config.external_addresses)}")
    if secrets_count or config.static_users_file:
        users = config.static_users_file or "none"
        lines.append(f"auth: realm {config.realm!r}, {secrets_count} shared secret(s), "
                     f"static users: {users}")
    else:
        lines.append(f"auth: realm {config.realm!r}, no shared secrets or static users yet "
                     "(`turnd serve` would make a secret for that run only)")
    lines.append(f"metrics: {config.metrics_listen or 'off'}")
    return lines


def config_file_used(config_path: str | None) -> str | None:
    """The configuration file a command reads: the one named, else the default if present."""
    if config_path is not None:
        return config_path
    # Looked up on the module at call time, the same way load_config does.
    default = config_module.DEFAULT_CONFIG_PATH
    return default if os.path.exists(default) else None


@click.command("check")
@click.option("--config", "config_path", metavar="PATH", envvar=CONFIG_ENV, default=None,
              help="TOML configuration file (default: /etc/turnd/turnd.toml if it exists).")
@click_options
def check(config_path: str | None, **flags: Any) -> None:
    """Load and check the configuration without starting the server.

    Prints "configuration OK" and a summary (exit 0), or every problem as "option: message"
    on stderr (exit 2).
    """
    config, problems = load_and_check(config_path, overrides=overrides_from_click(flags))
    if problems:
        _fail(problems)
    # check_config has just read secrets_file and found no problem with it.
    secrets = load_secrets(config, os.environ)
    secrets_count = len(secrets)
    for warning in weak_secret_warnings(secrets):
        click.echo(f"warning: {warning}", err=True)
    for problem in config_warnings(config):
        click.echo(f"warning: {problem}", err=True)
    click.echo("configuration OK")
    click.echo("  file: " + (config_file_used(config_path) or "none (built-in defaults, "
                                                                "environment and flags)"))
    for line in summarize(config, secrets_count):
        click.echo("  " + line)


@click.command("convert-coturn")
@click.argument("path", metavar="PATH")
@click.option("-o", "--output", "output", metavar="OUT", default=None,
              help="Write the TOML here instead of standard output.")
def convert_coturn(path: str, output: str | None) -> None:
    """Convert a coturn turnserver.conf at PATH into turnd's TOML.

    Options that cannot be carried over are listed as comments at the top of the TOML and on
    stderr. Secrets and passwords are never copied.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        click.echo(f"error: cannot read {path}: {exc.strerror or exc}", err=True)
        raise click.exceptions.Exit(EXIT_BAD_CONFIG) from None
    # coturn files are ASCII in practice; a stray byte must not stop the conversion.
    text = data.decode("utf-8", "replace")
    toml_text, notes = convert(text, base_dir=os.path.dirname(os.path.abspath(path)))
    header = "".join(f"# NOTE {note}\n" for note in notes)
    document = header + ("\n" if header else "") + toml_text
    if output is None:
        click.echo(document, nl=False)
    else:
        try:
            with open(output, "w", encoding="utf-8") as f:
                f.write(document)
        except OSError as exc:
            click.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            raise click.exceptions.Exit(EXIT_BAD_CONFIG) from None
    for note in notes:
        click.echo(f"note: {note}", err=True)
