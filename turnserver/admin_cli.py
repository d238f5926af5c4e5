"""``turnd admin``: live control of a running server through its admin socket.

Each command sends one request to ``admin_socket`` (turnserver/io/admin.py) and prints the
answer as a table for people, or as JSON with ``--json``. Exit status: 0 on success, 1 when
the server refused or failed the request, 2 when the socket cannot be reached.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any, Callable, NoReturn

import click

from .config import load_config

CONNECT_TIMEOUT_S = 10.0


def _socket_path(socket_path: str | None, config_path: str | None) -> str:
    if socket_path:
        return socket_path
    try:
        config = load_config(config_path, env=None)
    except Exception as exc:  # a bad file: say so, naming it
        _fail(f"cannot read the configuration for admin_socket: {exc}", 2)
    if not config.admin_socket:
        _fail("admin_socket is \"\" in the configuration: the admin socket is turned off", 2)
    return config.admin_socket


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"turnd admin: {message}", err=True)
    sys.exit(code)


def request(path: str, payload: dict[str, Any], timeout_s: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """One request to the admin socket at ``path``; its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            _fail(f"admin_socket {path}: {exc.strerror or exc} (is turnd running, and may this "
                  "user use it? root, the server's user and group turnd may)", 2)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        _fail(f"admin_socket {path}: {exc.strerror or exc}", 2)
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        _fail(f"admin_socket {path}: no answer", 2)
    if not isinstance(answer, dict):
        _fail(f"admin_socket {path}: an answer that is not an object", 2)
    return answer


def _run(ctx: click.Context, payload: dict[str, Any], show: Callable[[dict[str, Any]], None]) -> None:
    options = ctx.obj
    answer = request(_socket_path(options["socket"], options["config"]), payload)
    if options["json"]:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
    if not answer.get("ok"):
        if not options["json"]:
            click.echo(f"turnd admin: {answer.get('error', 'refused')}", err=True)
        sys.exit(1)
    if not options["json"]:
        show(answer)
    missing = answer.get("workers_missing") or []
    if missing:
        click.echo(f"turnd admin: no answer within a second from worker(s) "
                   f"{', '.join(map(str, missing))}: their allocations are not included", err=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.group()
@click.option("--socket", "socket_path", default=None, help="The admin socket (default: admin_socket "
              "from the configuration, /run/turnd/admin.sock).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="The server's configuration file, for admin_socket.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@click.pass_context
def admin(ctx: click.Context, socket_path: str | None, config_path: str | None, as_json: bool) -> None:
    """Control a running server: status, sessions, disconnect, reload, drain, log level."""
    ctx.obj = {"socket": socket_path, "config": config_path, "json": as_json}


@admin.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Version, uptime, workers, allocations, relayed bit rate, drain state, reloads applied."""
    def show(a: dict[str, Any]) -> None:
        rows = [["version", a["version"]], ["uptime", f"{a['uptime_s']:.0f} s"],
                ["workers", f"{a['workers_answering']} of {a['workers']} answering"],
                ["allocations", a["allocations"]],
                ["relayed", f"{a['relayed_bit_rate'] / 1e6:.2f} Mbit/s since the last status"],
                ["draining", "yes" if a["draining"] else "no"],
                ["configuration generation", a["generation"]]]
        click.echo(_table([[str(k), str(v)] for k, v in rows], ["", ""]).lstrip())
    _run(ctx, {"command": "status"}, show)


def _relayed(session: dict[str, Any]) -> str:
    """The relayed addresses; a TCP allocation's (RFC 6062) with its peer connections."""
    text = " ".join(session["relayed"])
    if session.get("relay_transport") == "tcp":
        count = session.get("tcp_connections", 0)
        text += f" (tcp, {count} connection{'' if count == 1 else 's'})"
    return text


@admin.command()
@click.option("--user", default=None, help="Only this user (the whole REST username or its user part).")
@click.option("--client", default=None, help="Only clients in this CIDR (or IP address).")
@click.pass_context
def sessions(ctx: click.Context, user: str | None, client: str | None) -> None:
    """One row per allocation: user, client, relayed addresses, age, expiry, traffic, worker."""
    def show(a: dict[str, Any]) -> None:
        rows = [[s["id"], s["user"], f"{s['transport']} {s['client']}", _relayed(s),
                 f"{s['age_s']:.0f}s", f"{s['expires_in_s']:.0f}s", str(s["permissions"]),
                 str(s["channels"]), f"{s['bytes_to_peer']}/{s['packets_to_peer']}",
                 f"{s['bytes_to_client']}/{s['packets_to_client']}", str(s.get("worker", "-"))]
                for s in a["sessions"]]
        click.echo(_table(rows, ["ID", "USER", "CLIENT", "RELAYED", "AGE", "EXPIRES", "PERMS",
                                 "CHANNELS", "TO PEER B/PKT", "TO CLIENT B/PKT", "WORKER"]))
        click.echo(f"{len(rows)} allocation{'' if len(rows) == 1 else 's'}")
    payload: dict[str, Any] = {"command": "sessions"}
    if user:
        payload["user"] = user
    if client:
        payload["client"] = client
    _run(ctx, payload, show)


@admin.command()
@click.option("--user", default=None, help="Every allocation of this user: how a leaked "
              "credential is cut off (REST credentials cannot be revoked one by one).")
@click.option("--allocation", default=None, help="One allocation, by the ID sessions shows.")
@click.option("--client", default=None, help="Every allocation of clients in this CIDR.")
@click.pass_context
def disconnect(ctx: click.Context, user: str | None, allocation: str | None, client: str | None) -> None:
    """End allocations now (usage record reason "disconnected"); their next Refresh gets 437."""
    if not (user or allocation or client):
        _fail("disconnect needs --user, --allocation or --client", 2)
    payload: dict[str, Any] = {"command": "disconnect"}
    for key, value in (("user", user), ("allocation", allocation), ("client", client)):
        if value:
            payload[key] = value
    _run(ctx, payload, lambda a: click.echo(
        f"disconnected {a['disconnected']} allocation{'' if a['disconnected'] == 1 else 's'}"))


@admin.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read and apply the configuration, as SIGHUP does."""
    _run(ctx, {"command": "reload"}, lambda a: click.echo(
        f"reload {'applied' if a['applied'] else 'refused (see the server log)'}; generation "
        f"{a['generation']}"))
    # A refused reload is reported, not failed: the server keeps its configuration.


@admin.command()
@click.pass_context
def drain(ctx: click.Context) -> None:
    """Refuse new allocations and exit once the last one ends, as SIGTERM does."""
    _run(ctx, {"command": "drain"}, lambda a: click.echo("draining"))


@admin.command()
@click.argument("level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def loglevel(ctx: click.Context, level: str) -> None:
    """Set the log level of every process until the next reload."""
    _run(ctx, {"command": "loglevel", "level": level}, lambda a: click.echo(f"log level {a['level']}"))


@click.command("verify-usage-log")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def verify_usage_log(files: tuple[str, ...]) -> None:
    """Check the hash chain of usage_log_file's files, oldest first: exit 0 when intact, 1 at
    the first line changed, removed or inserted (or a cut not recorded), 2 when unreadable.

    Give the rotated files and the current one in order, e.g. `turnd verify-usage-log
    /var/log/turnd/usage.log.* /var/log/turnd/usage.log` (the names sort by time). The
    current file's FILE.head, when present, also covers its last line.
    """
    from .usage_chain import verify

    head = None
    head_path = f"{files[-1]}.head"
    try:
        with open(head_path, encoding="ascii") as f:
            head = json.load(f)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        _fail(f"{head_path}: {exc}", 2)
    try:
        verdict = verify(files, head)
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}", 2)
    for note in verdict.notes:
        click.echo(f"note: {note} (recorded by the server when it started again)")
    if verdict.ok:
        click.echo(f"intact: {verdict.lines} lines in {verdict.files} file(s)"
                   + ("" if head is not None else f" ({head_path} not found: the last line "
                      "is not covered)"))
        return
    for finding in verdict.findings:
        click.echo(f"BROKEN: {finding}")
    if verdict.truncated is not None:
        click.echo(f"CUT: {verdict.truncated}")
    click.echo(f"{verdict.lines} lines verified before that")
    sys.exit(1)
