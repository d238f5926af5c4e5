"""Logging set-up: plain text for a terminal, JSON lines for log shippers.

Both formats keep one record on one line, whatever a message or an ``extra`` value holds, so
a line-oriented shipper (journald, Vector, Promtail) never splits or merges records. Fields
passed with ``extra=`` (the usage record, the trouble summary) become JSON keys, or
``key=value`` pairs in text, nested dicts as dotted keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Callable, TextIO

# Attributes every LogRecord has: anything else on a record came in through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}
# The JSON keys this formatter writes itself; an ``extra`` field may not overwrite them.
_BASE_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")
# Characters that some line splitters (Python's str.splitlines, JavaScript) treat as line
# breaks although JSON allows them raw inside strings.
_LINE_BREAKERS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_")
    }


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # bad %-args must not cost the record
        return f"{record.msg!s} {record.args!r}"


def _timestamp(record: logging.LogRecord) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra`` fields (such as ``usage``) are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in _extras(record).items():
            entry[f"extra_{key}" if key in _BASE_KEYS else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            line = json.dumps(entry, default=str, ensure_ascii=False)
        except (ValueError, TypeError, RecursionError):
            # A circular or otherwise unencodable extra: keep the record, lose the structure.
            entry = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v))
                     for k, v in entry.items()}
            line = json.dumps(entry, default=str, ensure_ascii=False)
        for char, escaped in _LINE_BREAKERS.items():
            if char in line:
                line = line.replace(char, escaped)
        return line


class TextFormatter(logging.Formatter):
    """Human-readable lines; ``extra`` dicts are appended as key=value pairs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A client-supplied string in a message must not forge a second log line.
        record.message = _one_line(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs: list[str] = []
        for key, value in _extras(record).items():
            _flatten(key, value, pairs, top=True)
        if not pairs:
            return line
        # Tracebacks stay multi-line in text mode (they are for people); the pairs go on the
        # first line so they stay with the message.
        head, sep, rest = line.partition("\n")
        return f"{head} {' '.join(pairs)}{sep}{rest}"


def _flatten(key: str, value: Any, out: list[str], *, top: bool = False) -> None:
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            # The top-level name of a dict extra ("usage", "trouble") adds nothing to a line.
            _flatten(str(sub_key) if top else f"{key}.{sub_key}", sub_value, out)
        return
    out.append(f"{key}={_text(value)}")


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=True)
    return text


def _one_line(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class BurstLimit(logging.Filter):
    """Rate-limits warnings and errors per call site: ``burst`` records per ``interval_s``.

    A bug hit by every packet of a flood, or a warning a client can trigger at will, would
    otherwise write one line per packet. Records beyond the burst are dropped and counted; the
    next record let through from the same site carries ``suppressed=N``. Info and debug records
    (the usage records among them) are never held back.
    """

    MAX_SITES = 1024

    def __init__(self, burst: int = 5, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        # call site -> [window start, records let through in it, records suppressed]
        self._sites: dict[tuple[str, int, str, int], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.pathname, record.lineno)
        now = self.clock()
        site = self._sites.get(key)
        if site is None:
            if len(self._sites) >= self.MAX_SITES:
                self._sites.clear()  # a bound, not a policy: sites are few in practice
            site = self._sites[key] = [now, 0, 0]
        elif now - site[0] >= self.interval_s:
            site[0], site[1] = now, 0
        if site[1] >= self.burst:
            site[2] += 1
            return False
        site[1] += 1
        if site[2]:
            record.suppressed = int(site[2])
            site[2] = 0
        return True


# The worker process id put on every record of a worker (``worker=N``); None in a single
# process and in the parent.
_worker: int | None = None


class WorkerTag(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None,
                  *, worker: int | None = None) -> None:
    """(Re)configure the root logger; called at start-up and on reload. ``worker`` tags every
    record of a worker process (kept across later calls)."""
    global _worker
    if worker is not None:
        _worker = worker
    root = logging.getLogger()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if _worker is not None:
        handler.addFilter(WorkerTag(_worker))
    handler.addFilter(BurstLimit())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
