"""What the benchmark reads about a running process from /proc: resident memory and CPU time.

Both servers are measured the same way from the outside, so neither needs to report on itself
(coturn's packaged build has no metrics endpoint).
"""

from __future__ import annotations

import os

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the whole process (every thread), in seconds.

    /proc/<pid>/stat of a thread-group leader sums all its threads, which matters for coturn:
    it relays on several threads.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = text.rsplit(")", 1)[-1].split()
    try:
        # Fields 14 and 15 of proc(5) (utime, stime); index 0 here is field 3 (state).
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S
    except (IndexError, ValueError):
        return 0.0
