"""Process runner: event loop choice (uvloop), signals, reload, drain, systemd notify, the ready file.

Signals (the contract systemd/turnd.service and docs/deploy.md describe):

* SIGHUP re-reads the configuration the way start-up read it and applies what can be applied
  without dropping an allocation (TurnServer.reload). A configuration with problems is
  logged, problem by problem, and the running one stays.
* SIGTERM starts a drain: new Allocates are refused (300 to ``alternate_server`` or 508) while
  existing allocations keep relaying, until none is left or ``drain_timeout_s`` passes.
* A second SIGTERM, or SIGINT at any time, stops at once. Every path exits 0 after a clean close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..config import (
    Config,
    format_hostport,
    ConfigError,
    Problem,
    config_warnings,
    credentials_configured,
    load_and_check,
    load_secrets,
    weak_secret_warnings,
)
from .. import __version__
from .admin import AdminServer, LocalAdmin
from .sdnotify import SystemdNotifier
from .server import TurnServer, write_ready_file

log = logging.getLogger("turnd")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        log.warning("uvloop is not available; using the stdlib event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# How often systemd's STATUS= line is brought up to date (when it changed).
STATUS_INTERVAL_S = 5.0
# How often a drain looks at what is left. Allocations end on the core's own timers and on
# client Refresh(0); this only decides when to notice.
DRAIN_POLL_S = 0.2


@dataclass
class Settings:
    """What serving needs from the configuration sources, as loaded at start-up or on reload."""

    config: Config
    secrets: list[bytes]
    static_users: dict[str, str | bytes]
    # Whether any credential source is configured, empty ones included (credentials_configured).
    credentials_configured: bool = True


SettingsLoader = Callable[[], Settings]


def settings_loader(config_path: str | None, overrides: Mapping[str, object], *,
                    env: Mapping[str, str] | None = None) -> SettingsLoader:
    """A loader that reads the configuration exactly as start-up did (same file, same flags,
    same environment); it raises ConfigError listing every problem found."""
    environ: Mapping[str, str] = os.environ if env is None else env
    fixed_overrides = dict(overrides)

    def load() -> Settings:
        config, problems = load_and_check(config_path, env=environ, overrides=fixed_overrides)
        if problems:
            raise ConfigError(problems)
        secrets = load_secrets(config, environ)
        static_users: dict[str, str | bytes] = {}
        if config.static_users_file:
            from ..auth import CredentialStore

            try:
                static_users = CredentialStore.load_static_users(config.static_users_file)
            except (OSError, ValueError) as exc:
                raise ConfigError([Problem("static_users_file", str(exc))]) from None
        return Settings(config, secrets, static_users,
                        credentials_configured=credentials_configured(config, environ))

    return load


def _allocations(count: int) -> str:
    return f"{count} allocation" + ("" if count == 1 else "s")


class Daemon:
    """Runs one started TurnServer until it is told to stop: signals, reload, drain, notify."""

    def __init__(self, server: TurnServer, *, reload_settings: SettingsLoader | None = None,
                 notifier: SystemdNotifier | None = None, ready_file: str | None = None,
                 generated_secret: bool = False, handle_hup: bool = True) -> None:
        self.server = server
        self.handle_hup = handle_hup  # a worker process leaves SIGHUP to its parent
        self.generation = 0  # reloads applied so far (turnd admin status)
        # The running secret was made at start-up because none was configured.
        self.generated_secret = generated_secret
        self.reload_settings = reload_settings
        self.notifier = notifier or SystemdNotifier()
        self.ready_file = ready_file
        self.draining = False
        self._stop = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._drain_task: asyncio.Task[None] | None = None
        self._last_status: str | None = None

    # ------------------------------------------------------------------ status

    def allocation_count(self) -> int:
        core = self.server.core
        return len(core.allocations) if core is not None else 0

    def status_text(self) -> str:
        count = self.allocation_count()
        if self.draining:
            return f"draining, {_allocations(count)} left"
        return _allocations(count)

    def _update_status(self) -> None:
        text = self.status_text()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    # ------------------------------------------------------------------ running

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGHUP: self.request_reload,
            signal.SIGTERM: self.request_drain,
            signal.SIGINT: self.request_stop,
        }
        if not self.handle_hup:
            del handlers[signal.SIGHUP]
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        housekeeping: asyncio.Task[None] | None = None
        try:
            if self.ready_file:
                write_ready_file(self.ready_file, self.server.ready_info())
            self._last_status = self.status_text()
            # sd_notify(3): READY=1 only now that every listener is bound.
            self.notifier.ready(self._last_status)
            if self.notifier.enabled:
                housekeeping = loop.create_task(self._housekeeping())
            await self._stop.wait()
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
            for task in (housekeeping, self._drain_task, self._reload_task):
                if task is not None and not task.done():
                    task.cancel()
            left = self.allocation_count()
            if left:
                log.info("stopping: ending %s", _allocations(left))
            else:
                log.info("stopping")
            await self.server.stop()
        return 0

    async def _housekeeping(self) -> None:
        """WATCHDOG=1 pings and STATUS= updates, from the event loop itself, so a wedged loop
        stops the pings and systemd restarts the service."""
        watchdog_s = self.notifier.watchdog_interval_s()
        interval = STATUS_INTERVAL_S if watchdog_s is None else min(STATUS_INTERVAL_S, watchdog_s)
        while True:
            await asyncio.sleep(interval)
            if watchdog_s is not None:
                self.notifier.watchdog()
            self._update_status()

    # ------------------------------------------------------------------ stop and drain

    def request_stop(self) -> None:
        """SIGINT, or a second SIGTERM: stop now."""
        if self._stop.is_set():
            return
        if self.draining and self.allocation_count():
            log.warning("stopping at once, ending the drain with %s left",
                        _allocations(self.allocation_count()))
        self.notifier.stopping("stopping")
        self._stop.set()

    def request_drain(self) -> None:
        """SIGTERM: the first one drains, a second one stops at once."""
        if self.draining:
            self.request_stop()
            return
        self.draining = True
        core = self.server.core
        if core is not None:
            core.draining = True
        timeout_s = self.server.config.drain_timeout_s
        count = self.allocation_count()
        where = self.server.config.alternate_server
        log.info("SIGTERM: draining: new allocations are refused (%s); waiting up to %g s for %s "
                 "to end; send SIGTERM again to stop at once",
                 f"300 Try Alternate to {where}" if where else "508 Server is draining",
                 timeout_s, _allocations(count))
        self._last_status = self.status_text()
        self.notifier.stopping(self._last_status)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout_s))

    async def _drain(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout_s
        while True:
            count = self.allocation_count()
            if count == 0:
                log.info("drain complete after %.1f s: no allocations left", loop.time() - started)
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("drain_timeout_s (%g s) passed with %s left; ending them",
                            timeout_s, _allocations(count))
                break
            self._update_status()
            await asyncio.sleep(min(DRAIN_POLL_S, remaining))
        self.drained()

    def drained(self) -> None:
        """The drain is over here: stop. A worker overrides it to tell its parent and go on
        answering (508) until every worker is done."""
        self._stop.set()

    # ------------------------------------------------------------------ reload

    def request_reload(self) -> None:
        """SIGHUP. Reloads never overlap: one arriving mid-reload runs again right after.
        Ignored while draining: systemd was told STOPPING=1 and must not hear READY=1 again."""
        if self.draining:
            log.warning("SIGHUP while draining: not reloading")
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload()
            except Exception:  # a reload must never take the relay down
                log.exception("reload failed; still running on the previous configuration")
            if not self._reload_again:
                return

    async def reload(self) -> bool:
        """Re-read and apply the configuration; True when applied. Tells systemd
        RELOADING=1 first and READY=1 after, whatever the outcome (systemd waits for it)."""
        self.notifier.reloading()
        try:
            return await self._apply_reload()
        finally:
            self._last_status = self.status_text()
            self.notifier.ready(self._last_status)

    async def _apply_reload(self) -> bool:
        if self.reload_settings is None:
            log.warning("SIGHUP: this server was not started from a configuration; nothing to reload")
            return False
        log.info("SIGHUP: reloading the configuration")
        started = time.monotonic()
        try:
            settings = self.reload_settings()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: %s", problem)
            log.error("reload refused: %d problem(s) in the new configuration; still running on "
                      "the previous one", len(exc.problems))
            streams = self.server.streams
            if streams is not None and streams.tls is not None and any(
                    p.option in ("tls_cert_file", "tls_key_file") for p in exc.problems):
                # The certificate was refused before the TLS loader saw it: a failed TLS
                # reload all the same (turn_tls_reloads_total{result="failed"}).
                streams.tls.reloads_failed += 1
            return False
        server = self.server
        secrets, static_users = reload_credentials(settings, server.secrets, server.static_users,
                                                   self.generated_secret)
        report = server.reload(settings.config, secrets, static_users)
        new = server.config
        # Counts only: the log never holds a secret, password or key.
        log.info("reload applied in %.0f ms: %s; %d shared secret(s), %d static user(s); "
                 "%s kept",
                 (time.monotonic() - started) * 1000,
                 ("changed " + ", ".join(report.applied)) if report.applied else "no option changed",
                 len(secrets), len(static_users), _allocations(self.allocation_count()))
        if report.needs_restart:
            log.warning("reload: %s changed but needs a restart; the running value%s stay%s in "
                        "force until then", ", ".join(report.needs_restart),
                        "s" if len(report.needs_restart) > 1 else "",
                        "" if len(report.needs_restart) > 1 else "s")
        self.generation += 1
        # Last, so this reload's own report still reaches the old destination and level; also
        # when unchanged, so a level set with turnd admin loglevel lasts until the next reload.
        from ..logs import setup_logging

        setup_logging(new.log_level, new.log_format)
        return True


async def start_admin(path: str, handler: Any) -> AdminServer | None:
    """The admin socket, when configured; a warning (and no socket) when it cannot be made,
    e.g. /run/turnd missing outside systemd: serving media does not depend on it."""
    if not path:
        return None
    admin = AdminServer(path, handler)
    try:
        await admin.start()
    except OSError as exc:
        log.warning("%s; turnd admin is not available (set admin_socket, or \"\" to turn it off)",
                    exc.strerror or exc)
        return None
    return admin


def reload_credentials(settings: Settings, current_secrets: list[bytes],
                       current_users: dict[str, Any], generated_secret: bool,
                       ) -> tuple[list[bytes], dict[str, Any]]:
    """The credentials a reload puts in force, with its warnings logged: the new ones, or the
    secret generated for this run when still none is configured."""
    for problem in config_warnings(settings.config):
        log.warning("reload: %s", problem)
    secrets, static_users = settings.secrets, settings.static_users
    if not secrets and not static_users:
        if generated_secret and not settings.credentials_configured:
            # Still no credentials configured, as at start-up: the secret made for this run
            # is the one clients were given, so it stays.
            log.info("reload: no secrets and no static users configured; keeping the secret "
                     "generated for this run")
            return list(current_secrets), dict(current_users)
        # The operator removed every secret and user: that is a revocation (of a leaked
        # secret, say), never something to undo silently by keeping the old ones.
        log.error("reload: no shared secret and no static user is configured any more: "
                  "every credential is revoked, and new requests are refused until one "
                  "is configured")
    else:
        for warning in weak_secret_warnings(secrets):
            log.warning("reload: %s", warning)
    return secrets, static_users


async def serve(config: Config, *, secrets: list[bytes], static_users: dict[str, Any],
                ready_file: str | None, reload_settings: SettingsLoader | None = None,
                notifier: SystemdNotifier | None = None, generated_secret: bool = False,
                config_path: str | None = None) -> int:
    server = TurnServer(config, secrets=secrets, static_users=static_users)
    notifier = notifier or SystemdNotifier()
    try:
        await server.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)  # names the socket: "udp 0.0.0.0:3478: Address ..."
        log.error("cannot start: %s", reason)
        notifier.status(f"cannot start: {reason}")
        return 1
    log.info("turnd %s started: configuration %s; %d worker; listening %s; relaying on %s",
             __version__, config_path or "none (built-in defaults, environment and flags)", 1,
             ", ".join(f"{lst.transport} {format_hostport(*lst.address)}"
                       for lst in server.state.listeners) or "nowhere",
             ", ".join(server.state.relay_addresses))
    daemon = Daemon(server, reload_settings=reload_settings, notifier=notifier, ready_file=ready_file,
                    generated_secret=generated_secret)
    admin = await start_admin(config.admin_socket, LocalAdmin(server, daemon).handle)
    try:
        return await daemon.run()
    finally:
        if admin is not None:
            await admin.stop()


def run_server(config: Config, *, secrets: list[bytes], static_users: dict[str, Any],
               ready_file: str | None = None, reload_settings: SettingsLoader | None = None,
               generated_secret: bool = False, config_path: str | None = None) -> int:
    """Serve until stopped: one process, or a parent and its workers (io/supervisor.py)."""
    from .supervisor import resolve_workers, run_supervisor

    workers = resolve_workers(config)
    if workers > 1:
        return run_supervisor(config, secrets=secrets, static_users=static_users, workers=workers,
                              ready_file=ready_file, reload_settings=reload_settings,
                              generated_secret=generated_secret, config_path=config_path)
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(
            serve(config, secrets=secrets, static_users=static_users, ready_file=ready_file,
                  reload_settings=reload_settings, generated_secret=generated_secret,
                  config_path=config_path)
        )
    finally:
        loop.close()
