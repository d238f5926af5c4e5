"""The audit usage log (``usage_log_file``): one JSON line per allocation event, hash-chained.

Events come from the core (``created``, ``refreshed``, ``permission``, ``channel``) and from
the end of an allocation (``ended``, with its totals). Each becomes a line at once in memory
(turnserver/usage_chain.py makes it); every ``usage_log_flush_s`` the lines gathered are
handed to one writer thread, so the relay never waits on the disk. A crash (SIGKILL) loses
at most the lines of the last interval.

The file is rotated when it passes ``usage_log_max_bytes`` or ``usage_log_rotate_s``: renamed
to ``FILE.YYYYmmddTHHMMSS.mmmZ`` (in the writer thread, between two batches, so no line is lost)
and a new file begun with an anchor that names the previous file's last line. Beside the log,
``FILE.head`` holds the seq and hash of the last line written, rewritten at each flush, so
that ``turnd verify-usage-log`` also notices a change at the very end. At start-up an existing
file is continued; one whose last line was cut (a crash) is rotated away and the new anchor
records the cut (``after_cut``).

Nothing secret is written: users, addresses, ids, times and counts only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..usage_chain import Chain, digest

log = logging.getLogger("turnd")


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def rotated_name(path: str, now: float) -> str:
    """FILE.YYYYmmddTHHMMSS.mmmZ, and -0002, -0003... after it within the same millisecond:
    the names sort in the order the files were written."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    base = f"{path}.{stamp}"
    name, n = base, 1
    while os.path.exists(name):
        n += 1
        name = f"{base}-{n:04d}"
    return name


_ROTATE = None  # in a batch: close the file, rename it, open a new one


class UsageLog:
    def __init__(self, path: str, *, max_bytes: int, rotate_s: float, flush_s: float,
                 worker: int | None = None, wall_clock: Any = time.time) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.rotate_s = rotate_s
        self.flush_s = flush_s
        self.worker = worker
        self.wall_clock = wall_clock
        self.chain = Chain()
        # Lines (and _ROTATE marks) made on the event loop, not yet handed to the writer.
        self._pending: list[bytes | None] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage-log")
        self._file: Any = None
        self._size = 0  # of the current file, counting what is pending (decided on the loop)
        self._opened_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.lines_written = 0

    # -- start and stop -----------------------------------------------------------------

    def open(self) -> None:
        """Continue the file at ``path``, or begin it (blocking; at start-up)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        cut = None
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                data = f.read()
            lines = data.split(b"\n")
            whole = lines[:-1]
            if whole:
                last = whole[-1]
                self.chain = Chain(digest(last), int(json.loads(last).get("seq", -1)) + 1)
            if lines[-1] != b"":  # cut by a crash: kept as it is, under its own name
                rotated = rotated_name(self.path, self.wall_clock())
                os.replace(self.path, rotated)
                cut = {"file": os.path.basename(rotated), "lines": len(whole)}
            elif whole:
                self._file = open(self.path, "ab")
                self._size = len(data)
                self._opened_at = os.path.getmtime(self.path)
                return
        self._file = open(self.path, "ab")
        os.chmod(self.path, 0o640)
        self._opened_at = self.wall_clock()
        self._pending.append(self._anchor({"after_cut": cut} if cut else {}))
        self._write(self._take())

    def _anchor(self, extra: dict[str, Any]) -> bytes:
        anchor: dict[str, Any] = {"event": "anchor", "ts": _utc(self.wall_clock()), "pid": os.getpid()}
        if self.worker is not None:
            anchor["worker"] = self.worker
        anchor.update(extra)
        line = self.chain.line(anchor)
        self._size = len(line)
        return line

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._flusher())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, self._take())
        self._executor.shutdown(wait=True)
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- records (on the event loop) -----------------------------------------------------

    def record(self, event: str, allocation: Any, details: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "event": event, "ts": _utc(self.wall_clock()), "allocation": allocation.id,
            "user": allocation.username, "transport": allocation.five_tuple[0],
            "client": _host(allocation.five_tuple[1]),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        entry.update(details)
        if self._size >= self.max_bytes or self.wall_clock() - self._opened_at >= self.rotate_s:
            # Rotation is decided here, in chain order: the new file's anchor follows the last
            # line of the old one, and this line follows the anchor.
            self._pending.append(_ROTATE)
            self._opened_at = self.wall_clock()
            self._pending.append(self._anchor({"rotated": True}))
        line = self.chain.line(entry)
        self._size += len(line)
        self._pending.append(line)

    def _take(self) -> tuple[list[bytes | None], int, str]:
        batch, self._pending = self._pending, []
        return batch, self.chain.seq - 1, self.chain.prev

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_s)
            if not self._pending:
                continue
            try:
                await loop.run_in_executor(self._executor, self._write, self._take())
            except Exception:
                log.exception("usage_log_file %s: writing failed", self.path)

    # -- the writer thread ---------------------------------------------------------------

    def _write(self, work: tuple[list[bytes | None], int, str]) -> None:
        batch, last_seq, last_hash = work
        if self._file is None or not batch:
            return
        for item in batch:
            if item is _ROTATE:
                self._file.close()
                os.replace(self.path, rotated_name(self.path, self.wall_clock()))
                self._file = open(self.path, "ab")
                os.chmod(self.path, 0o640)
                continue
            self._file.write(item)
            self.lines_written += 1
        self._file.flush()
        head = f"{self.path}.head"
        with open(f"{head}.tmp", "w", encoding="ascii") as f:
            json.dump({"seq": last_seq, "hash": last_hash}, f)
        os.replace(f"{head}.tmp", head)


def _host(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
