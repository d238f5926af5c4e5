"""Running coturn's turnutils_uclient and judging it by its summary lines: it exits 0 even at
100 % loss, so the exit code alone says nothing about relaying."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

needs_coturn = [
    pytest.mark.coturn,
    pytest.mark.skipif(shutil.which("turnutils_uclient") is None, reason="coturn's turnutils_* tools are not installed"),
]


def uclient(secret: str, port: int, *args: str, messages: int = 20, user: str = "coturnclient") -> dict[str, int]:
    cmd = ["turnutils_uclient", "-n", str(messages), "-l", "120", "-W", secret, "-u", user,
           "-p", str(port), *args, "127.0.0.1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", out)
    lost = re.search(r"Total lost packets (\d+)", out)
    assert totals and lost, f"no summary (exit {result.returncode}):\n{out[-2000:]}"
    sent, received = (int(x) for x in totals[-1])
    return {"sent": sent, "received": received, "lost": int(lost.group(1)), "exit": result.returncode}


def assert_clean(summary: dict[str, int]) -> None:
    assert summary["exit"] == 0, summary
    assert summary["sent"] > 0 and summary["sent"] == summary["received"], summary
    assert summary["lost"] == 0, summary
