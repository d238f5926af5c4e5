"""A minimal client for systemd's service notification protocol (sd_notify(3)).

systemd hands a ``Type=notify`` service the address of a datagram socket in
``NOTIFY_SOCKET``; the service reports its state there as newline-separated
``KEY=VALUE`` assignments, one datagram per report. This module speaks that
protocol with the standard library only, so the daemon needs neither
libsystemd nor a Python binding for it, and it is a silent no-op when the
daemon runs outside systemd.

Every method returns ``False`` instead of raising: a relay that is carrying
calls must never fall over because its supervisor went away or its notify
socket is congested.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["SystemdNotifier"]


def _monotonic_us() -> int:
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading, so
    # it must be that exact clock, not whatever time.monotonic() maps to.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment early and let the rest of the
    # text be read as further assignments (e.g. a stray "READY=1").
    return " ".join(text.splitlines())


def _parse_uint(value: str | None) -> int | None:
    # Plain ASCII digits only, as systemd writes them: int() alone would also
    # take "+5", " 5" and "1_000".
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def _socket_address(value: str) -> str | bytes | None:
    """Turn ``NOTIFY_SOCKET`` into an address for ``sendto``.

    systemd passes either an absolute filesystem path or, with a leading
    ``@``, a name in Linux's abstract socket namespace (sd_notify(3)).
    Anything else (relative paths, the ``vsock:`` form of newer systemd)
    is not supported and yields ``None``.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract names start with a NUL byte instead of the "@".
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return None


class SystemdNotifier:
    """Report service state to systemd through ``NOTIFY_SOCKET``.

    ``env`` defaults to ``os.environ``; tests pass a plain dict. The
    environment is read once, at construction: the daemon builds one
    notifier at start-up, before anything could alter its environment.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        monotonic_us: Callable[[], int] = _monotonic_us,
    ) -> None:
        source: Mapping[str, str] = os.environ if env is None else env
        self._socket_value: str = source.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(self._socket_value)
        self._watchdog_usec: str | None = source.get("WATCHDOG_USEC")
        self._watchdog_pid: str | None = source.get("WATCHDOG_PID")
        self._monotonic_us = monotonic_us
        self.enabled: bool = bool(self._socket_value)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram, joined by newlines.

        Each field must be a single ``KEY=VALUE`` line. Returns ``True`` only
        if the kernel accepted the whole datagram. Never blocks: a full
        socket queue means the report is dropped, not that the caller waits.
        """
        if self._address is None or not fields:
            return False
        for field in fields:
            if "=" not in field or "\n" in field:
                return False
        try:
            payload = "\n".join(fields).encode("utf-8", "surrogateescape")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sent = sock.sendto(payload, self._address)
        except (OSError, ValueError):
            # OSError: socket gone, permission denied, queue full (EAGAIN).
            # ValueError: an address containing a NUL byte, or text that
            # cannot be encoded (UnicodeEncodeError is a ValueError).
            return False
        return sent == len(payload)

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (or a reload) has finished."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def reloading(self) -> bool:
        """Tell systemd a reload has begun; follow it with :meth:`ready`.

        systemd 253 and later expect ``MONOTONIC_USEC`` with ``RELOADING=1``
        (``Type=notify-reload``) to tell this reload apart from an older one;
        earlier versions ignore the extra field.
        """
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_us()}")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the service is shutting down (drain has begun)."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", "STATUS=" + _one_line(status))

    def status(self, text: str) -> bool:
        """Set the free-form line shown by ``systemctl status``."""
        return self.notify("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """Reset systemd's watchdog timer (``WatchdogSec=``)."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to call :meth:`watchdog`, or ``None`` if not wanted.

        sd_watchdog_enabled(3): the watchdog applies to this process when
        ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID`` is
        either unset or this process's PID (a child that inherited the
        environment must not ping on its parent's behalf). Pinging at half
        the timeout is the interval that man page recommends.
        """
        usec = _parse_uint(self._watchdog_usec)
        if usec is None or usec == 0:
            return None
        if self._watchdog_pid is not None and _parse_uint(self._watchdog_pid) != os.getpid():
            return None
        return usec / 2 / 1_000_000
