"""The audit usage log's hash chain: how a line is made and how a set of files is verified.

Sans-IO apart from reading the files to verify. Each line of the log is one JSON object with

* ``seq``: its number in the chain, counting from 0 at the first anchor ever written;
* ``prev``: the SHA-256 (hex) of the previous line's bytes, without its newline;
* ``event``: ``anchor`` (the first line of every file), ``created``, ``refreshed``,
  ``permission``, ``channel``, ``connection`` (an RFC 6062 peer connection bound to its data
  connection) or ``ended``, and what the event says.

A file's anchor names the previous file's last line in ``prev`` (64 zeros for the very first
file), so the files of a rotation form one chain. Changing a line breaks the ``prev`` of the
line after it; removing one leaves a gap in ``seq``; inserting one repeats or skips a ``seq``;
cutting the end (a crash, or truncation) leaves a last line that is incomplete, or a chain that
stops early, which :func:`verify` reports as such.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

GENESIS = "0" * 64


def digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class Chain:
    """Makes the lines: one per event, each carrying the hash of the one before."""

    def __init__(self, prev: str = GENESIS, seq: int = 0) -> None:
        self.prev = prev
        self.seq = seq

    def line(self, record: dict[str, Any]) -> bytes:
        entry = {"seq": self.seq, "prev": self.prev, **record}
        data = json.dumps(entry, separators=(",", ":"), sort_keys=False, default=str).encode()
        self.prev = digest(data)
        self.seq += 1
        return data + b"\n"


@dataclass
class Finding:
    path: str
    line: int  # 1-based; 0 for the file as a whole
    problem: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.problem}"


@dataclass
class Verdict:
    lines: int = 0
    files: int = 0
    findings: list[Finding] = field(default_factory=list)
    truncated: Finding | None = None
    # A cut the server itself recorded when it started again (``after_cut`` in the next
    # anchor): what a crash costs, not a break in the chain.
    notes: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and self.truncated is None


def verify(paths: Iterable[str], head: dict[str, Any] | None = None) -> Verdict:
    """Check the chain through ``paths``, in the order given (the oldest file first). Stops
    at the first break: a line after it cannot be trusted to say anything more. A file cut
    short by a crash is reported (``truncated``) and the chain is followed into the next file,
    whose anchor names the last whole line. ``head`` (the writer's ``.head`` record: the seq
    and hash of the last line it wrote) also catches a change to the very last line."""
    verdict = Verdict()
    prev: str | None = None
    seq: int | None = None
    paths = list(paths)
    for index, path in enumerate(paths):
        verdict.files += 1
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            verdict.findings.append(Finding(path, 0, "empty: no anchor line"))
            return verdict
        lines = data.split(b"\n")
        incomplete = lines[-1] != b""
        if not incomplete:
            lines = lines[:-1]
        for number, raw in enumerate(lines, 1):
            last = number == len(lines)
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except ValueError:
                if last and incomplete:
                    verdict.truncated = Finding(path, number, "the last line is incomplete: the "
                                                "file was cut here (a crash loses at most the "
                                                "lines of its last flush interval)")
                    break
                verdict.findings.append(Finding(path, number, "not a JSON line: changed or "
                                                "inserted"))
                return verdict
            if number == 1:
                if entry.get("event") != "anchor":
                    verdict.findings.append(Finding(path, 1, "the first line is not an anchor: "
                                                    "lines were removed from the start"))
                    return verdict
                if prev is not None and entry.get("prev") != prev:
                    verdict.findings.append(Finding(path, 1, "the anchor does not follow the "
                                                    "previous file's last line: a file is "
                                                    "missing, out of order, or was cut short"))
                    return verdict
                if verdict.truncated is not None and entry.get("after_cut"):
                    verdict.notes.append(verdict.truncated)
                    verdict.truncated = None
            elif entry.get("prev") != prev:
                expected_seq = None if seq is None else seq + 1
                if expected_seq is not None and isinstance(entry.get("seq"), int) \
                        and entry["seq"] > expected_seq:
                    problem = (f"{entry['seq'] - expected_seq} line(s) before this one were "
                               "removed")
                elif expected_seq is not None and isinstance(entry.get("seq"), int) \
                        and entry["seq"] < expected_seq:
                    problem = "a line was inserted before this one, or lines were reordered"
                else:
                    problem = "the previous line was changed"
                verdict.findings.append(Finding(path, number, problem))
                return verdict
            elif seq is not None and entry.get("seq") != seq + 1 and number != 1:
                verdict.findings.append(Finding(path, number, "its seq does not follow: the "
                                                "line was changed"))
                return verdict
            prev = digest(raw)
            seq = entry.get("seq") if isinstance(entry.get("seq"), int) else seq
            verdict.lines += 1
        if incomplete and verdict.truncated is None:
            verdict.truncated = Finding(path, len(lines), "the file does not end with a newline: "
                                        "it was cut here")
        if verdict.truncated is not None and index == len(paths) - 1:
            return verdict
    if head is not None and paths and (head.get("seq") != seq or head.get("hash") != prev):
        verdict.findings.append(Finding(paths[-1], verdict.lines and len(lines), "the last line "
                                        "is not the one the server last wrote (its .head file "
                                        "says otherwise): lines at the end were changed or "
                                        "removed"))
    return verdict
