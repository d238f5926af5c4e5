"""The audit usage log: the hash chain catches an edit, a deletion, a reordering, an insertion
and a truncation; rotation under load loses no line; a crash's cut is recorded and reported."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from turnserver.io.usage_log import UsageLog
from turnserver.usage_chain import verify


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


def allocation(n: int) -> SimpleNamespace:
    return SimpleNamespace(id=f"{n:x}", username=f"1750000000:user{n % 7}",
                           five_tuple=("udp", ("198.51.100.7", 40000 + n % 1000), ("192.0.2.1", 3478)))


def write_log(path: Path, events: int, *, max_bytes: int = 1 << 30, rotate_s: float = 1e9,
              clock: Clock | None = None, step_s: float = 0.0) -> UsageLog:
    clock = clock or Clock()

    async def main() -> UsageLog:
        log = UsageLog(str(path), max_bytes=max_bytes, rotate_s=rotate_s, flush_s=0.05,
                       wall_clock=clock)
        log.open()
        log.start(asyncio.get_running_loop())
        for n in range(events):
            log.record("created" if n % 2 == 0 else "ended", allocation(n), {"n": n})
            clock.now += step_s
            if n % 500 == 0:
                await asyncio.sleep(0.06)  # let flushes happen in the middle of it
        await log.close()
        return log
    return asyncio.run(main())


def files_of(path: Path) -> list[str]:
    rotated = sorted(str(p) for p in path.parent.glob(path.name + ".*")
                     if not p.name.endswith((".head", ".tmp")))
    return rotated + [str(path)]


def head_of(path: Path) -> dict:
    return json.loads(Path(f"{path}.head").read_text())


def events_in(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        for line in Path(p).read_bytes().splitlines():
            entry = json.loads(line)
            if entry["event"] != "anchor":
                out.append(entry)
    return out


def test_an_intact_log_verifies_and_holds_every_event(tmp_path: Path) -> None:
    path = tmp_path / "usage.log"
    write_log(path, 1000)
    verdict = verify(files_of(path), head_of(path))
    assert verdict.ok and verdict.lines == 1001  # the anchor and 1,000 events
    assert [e["n"] for e in events_in(files_of(path))] == list(range(1000))


def test_rotation_under_load_by_size_and_by_time_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "usage.log"
    write_log(path, 5000, max_bytes=20_000)
    files = files_of(path)
    assert len(files) > 10
    verdict = verify(files, head_of(path))
    assert verdict.ok, [str(f) for f in verdict.findings]
    assert [e["n"] for e in events_in(files)] == list(range(5000))
    # Every file starts with an anchor naming the previous file's last line.
    assert all(json.loads(Path(f).read_bytes().splitlines()[0])["event"] == "anchor" for f in files)

    timed = tmp_path / "timed" / "usage.log"
    write_log(timed, 300, rotate_s=10.0, step_s=1.0)
    files = files_of(timed)
    assert len(files) >= 29
    assert verify(files, head_of(timed)).ok
    assert len(events_in(files)) == 300


@pytest.mark.parametrize("damage", ["edit", "delete", "reorder", "insert", "edit_last", "drop_file"])
def test_verification_finds_the_first_damaged_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "usage.log"
    write_log(path, 3000, max_bytes=40_000)
    files = files_of(path)
    assert len(files) >= 3
    target = Path(files[1])
    lines = target.read_bytes().splitlines(keepends=True)
    if damage == "edit":
        lines[5] = lines[5].replace(b'"user', b'"usEr', 1)
        expect = (target.name, 7, "changed")
    elif damage == "delete":
        del lines[5]
        expect = (target.name, 6, "removed")
    elif damage == "reorder":
        lines[5], lines[6] = lines[6], lines[5]
        expect = (target.name, 6, "")
    elif damage == "insert":
        lines.insert(5, lines[3])
        expect = (target.name, 6, "")
    elif damage == "edit_last":
        target = Path(files[-1])
        lines = target.read_bytes().splitlines(keepends=True)
        lines[-1] = lines[-1].replace(b'"n":', b'"n": ', 1)
        expect = (target.name, None, "last line")
    if damage == "drop_file":
        files = [files[0]] + files[2:]
        verdict = verify(files, head_of(path))
        assert not verdict.ok and verdict.findings[0].line == 1
        assert "missing" in verdict.findings[0].problem
        return
    target.write_bytes(b"".join(lines))
    verdict = verify(files, head_of(path))
    assert not verdict.ok
    finding = verdict.findings[0]
    assert Path(finding.path).name == expect[0]
    if expect[1] is not None:
        assert finding.line == expect[1], str(finding)
    assert expect[2] in finding.problem


def test_a_cut_is_reported_and_a_restart_records_it(tmp_path: Path) -> None:
    path = tmp_path / "usage.log"
    write_log(path, 200)
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # a crash in the middle of the last line
    verdict = verify(files_of(path))
    assert not verdict.ok and verdict.truncated is not None and "cut" in verdict.truncated.problem
    # The server starts again on the same file: the cut file is put aside, the chain goes on
    # from its last whole line, and the new anchor records the cut.
    write_log(path, 10)
    files = files_of(path)
    assert len(files) == 2
    verdict = verify(files, head_of(path))
    assert verdict.ok and len(verdict.notes) == 1 and "cut" in verdict.notes[0].problem
    events = events_in([files[0]][:0] + [files[1]])
    assert [e["n"] for e in events] == list(range(10))


def test_the_command_exits_0_1_or_2(tmp_path: Path) -> None:
    path = tmp_path / "usage.log"
    write_log(path, 100)

    def run(*files: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "turnserver", "verify-usage-log", *files],
                              capture_output=True, text=True, timeout=30)

    ok = run(str(path))
    assert ok.returncode == 0 and "intact: 101 lines" in ok.stdout
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[40]
    path.write_bytes(b"".join(lines))
    broken = run(str(path))
    assert broken.returncode == 1 and "BROKEN" in broken.stdout and ":41:" in broken.stdout
    missing = run(str(tmp_path / "nope.log"))
    assert missing.returncode == 2
