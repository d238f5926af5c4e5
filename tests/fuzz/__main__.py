"""Run the fuzz targets under atheris/libFuzzer, or replay the corpus without it.

    python3 -m tests.fuzz --target all --runs 10000000 --max-time 3600
    python3 -m tests.fuzz --replay          # seeds and regressions, no atheris needed
    python3 -m tests.fuzz --write-seeds     # rebuild tests/fuzz/corpus/ from targets.seed_inputs

Each target runs in its own process, one after the other: libFuzzer exits on the first crash,
and the instrumentation must be in place before ``turnserver`` is imported. New corpus entries
go to ``--work-dir`` (kept between runs, outside the tree); the seed corpus and the regression
inputs are read, never written. A crash input is written to ``--artifacts`` (by default
``tests/fuzz/regressions/<target>/``), where the replay in the normal test suite picks it up.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"
TARGET_NAMES = ("stun_decode", "stream_framer", "turn_core")
MAX_LEN = {"stun_decode": 4096, "stream_framer": 4096, "turn_core": 2048}

_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/\S+)?.*?(?:exec/s: (\d+))?")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")


@dataclass
class Summary:
    target: str
    returncode: int = 0
    runs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    exec_s: int = 0
    seconds: float = 0.0
    artifacts: list[str] = field(default_factory=list)
    crash_text: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "no crash" if self.returncode == 0 and not self.artifacts else (
            f"CRASH (exit {self.returncode}): " + ", ".join(self.artifacts))
        return (f"{self.target}: {self.runs} inputs in {self.seconds:.0f} s, {self.exec_s} exec/s, "
                f"cov: {self.cov} ft: {self.ft}, corpus {self.corpus} entries, {verdict}")


def _worker(target: str, libfuzzer_args: list[str]) -> None:
    """Inside the child: instrument turnserver, then hand over to libFuzzer (never returns)."""
    import atheris

    with atheris.instrument_imports(include=["turnserver"]):
        from tests.fuzz import targets
    atheris.Setup([sys.argv[0], *libfuzzer_args], targets.TARGETS[target])
    atheris.Fuzz()


def run_target(target: str, *, runs: int, max_time: int, work_dir: Path, artifacts: Path,
               extra: list[str], echo: bool = True) -> Summary:
    """Fuzz one target in a child process; parse libFuzzer's status lines into a Summary."""
    corpus = work_dir / target
    corpus.mkdir(parents=True, exist_ok=True)
    out_dir = artifacts / target
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [f"-runs={runs}", f"-max_len={MAX_LEN[target]}", "-timeout=20", "-print_final_stats=1",
            f"-artifact_prefix={out_dir}{os.sep}", *extra, str(corpus)]
    if max_time:
        args.insert(1, f"-max_total_time={max_time}")
    for seeds in (CORPUS / target, REGRESSIONS / target):
        if seeds.is_dir() and any(seeds.iterdir()):
            args.append(str(seeds))
    cmd = [sys.executable, "-m", "tests.fuzz", "--worker", target, "--", *args]
    summary = Summary(target)
    log_path = work_dir / f"{target}.log"
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace") as child:
        assert child.stdout is not None
        in_crash = False
        for line in child.stdout:
            log.write(line)
            match = _STATUS.match(line)
            if match:
                summary.runs = int(match[1])
                summary.cov, summary.ft = int(match[3]), int(match[4])
                if match[5]:
                    summary.corpus = int(match[5])
                if match[6]:
                    summary.exec_s = int(match[6])
                if echo and match[2] in ("INITED", "pulse", "DONE"):
                    print(f"[{target}] {line.rstrip()}", flush=True)
                continue
            stat = _STAT.match(line)
            if stat:
                if stat[1] == "number_of_executed_units":
                    summary.runs = int(stat[2])
                elif stat[1] == "average_exec_per_sec":
                    summary.exec_s = int(stat[2])
                continue
            artifact = _ARTIFACT.search(line)
            if artifact:
                summary.artifacts.append(artifact[1])
            if "Uncaught Python exception" in line or "ERROR: libFuzzer" in line or "==ERROR" in line:
                in_crash = True
            if in_crash or artifact:
                summary.crash_text.append(line.rstrip())
                if echo:
                    print(f"[{target}] {line.rstrip()}", flush=True)
        summary.returncode = child.wait()
    summary.seconds = time.monotonic() - started
    return summary


def replay() -> int:
    """Run every seed and regression input through its target; no atheris needed."""
    sys.path.insert(0, str(ROOT))
    from tests.fuzz.targets import TARGETS

    failed = 0
    for base in (CORPUS, REGRESSIONS):
        for target in TARGET_NAMES:
            folder = base / target
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
                if folder.is_dir() else []
            for path in files:
                try:
                    TARGETS[target](path.read_bytes())
                except Exception as exc:  # report each failing input, then go on
                    failed += 1
                    print(f"FAIL {path.relative_to(ROOT)}: {type(exc).__name__}: {exc}")
            print(f"{folder.relative_to(ROOT)}: {len(files)} inputs replayed")
    return 1 if failed else 0


def write_seeds() -> None:
    sys.path.insert(0, str(ROOT))
    from tests.fuzz.targets import seed_inputs

    for target, seeds in seed_inputs().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{folder.relative_to(ROOT)}: {len(seeds)} seeds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0  # not reached: libFuzzer exits the process
    parser = argparse.ArgumentParser(prog="python3 -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", choices=(*TARGET_NAMES, "all"),
                        help="target to fuzz (repeatable; default all)")
    parser.add_argument("--runs", type=int, default=10_000_000, help="inputs per target (default 10000000)")
    parser.add_argument("--max-time", type=int, default=0, help="seconds per target, 0 for no limit")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "turnserver-fuzz",
                        help="where the growing corpus and the logs go (default %(default)s)")
    parser.add_argument("--artifacts", type=Path, default=REGRESSIONS,
                        help="where crash inputs go, one folder per target (default tests/fuzz/regressions)")
    parser.add_argument("--quiet", action="store_true", help="print only the summaries")
    parser.add_argument("--replay", action="store_true", help="replay seeds and regressions, then exit")
    parser.add_argument("--write-seeds", action="store_true", help="rebuild the seed corpus, then exit")
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --")
    args = parser.parse_args(argv)
    if args.replay:
        return replay()
    if args.write_seeds:
        write_seeds()
        return 0
    chosen = args.target or ["all"]
    names = list(TARGET_NAMES) if "all" in chosen else list(dict.fromkeys(chosen))
    summaries = []
    for name in names:
        summary = run_target(name, runs=args.runs, max_time=args.max_time, work_dir=args.work_dir,
                             artifacts=args.artifacts, extra=args.libfuzzer, echo=not args.quiet)
        print(summary.line(), flush=True)
        summaries.append(summary)
    print("\nsummary (log and corpus in %s):" % args.work_dir)
    for summary in summaries:
        print("  " + summary.line())
    return 0 if all(s.returncode == 0 and not s.artifacts for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
