"""Run tests many times over and count every failure: the check that no test is flaky.

    python tests/repeat.py --runs 30                  # the timing-sensitive tests, 30 times
    python tests/repeat.py --runs 10 --all            # the whole suite, 10 times
    python tests/repeat.py --runs 30 --busy 1         # ... while another process keeps a core busy
    python tests/repeat.py --runs 5 -- -k torchrun    # extra pytest arguments after --

"Timing-sensitive" are the tests marked ``timing`` (``pytestmark = pytest.mark.timing``):
real ``torchrun`` launches, signals, subprocesses, time-based checks. Every run is a fresh
``pytest`` process; the failing test ids of each run are collected from its summary, and the
script prints, per run, the time and the outcome, then every test that ever failed and how
often. The exit code is 1 when any run failed. A failure is a bug in the product or in the
test: fix the race, never retry or loosen (DEVELOPERS.md).

``BNSCOPE_TEST_REPEATS`` (default 2) is how often each case of
``tests/cli/test_distributed_failures.py`` runs within one suite run; the script leaves it alone
unless ``--repeats`` is given.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
SUMMARY = re.compile(r"^(?:=+ )?(\d+ (?:passed|failed|error).*?) in [\d.]+s", re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="how many pytest runs (30)")
    parser.add_argument("--all", action="store_true", help="the whole suite, not -m timing")
    parser.add_argument("--busy", type=int, default=0, help="processes that keep a core busy")
    parser.add_argument("--repeats", type=int, help="BNSCOPE_TEST_REPEATS for each run")
    parser.add_argument("--log", type=Path, help="append each failing run's output here")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if not args.all:
        cmd += ["-m", "timing"]
    cmd += args.pytest_args
    env = dict(os.environ)
    if args.repeats is not None:
        env["BNSCOPE_TEST_REPEATS"] = str(args.repeats)

    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
    ]
    failures: collections.Counter[str] = collections.Counter()
    bad_runs = 0
    try:
        for run in range(1, args.runs + 1):
            t0 = time.monotonic()
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.monotonic() - t0
            summary = SUMMARY.findall(res.stdout)
            failed = FAILED.findall(res.stdout)
            failures.update(failed)
            if res.returncode != 0:
                bad_runs += 1
                if args.log is not None:
                    with args.log.open("a", encoding="utf-8") as log:
                        log.write(f"===== run {run}\n{res.stdout}\n{res.stderr}\n")
            outcome = summary[-1] if summary else f"pytest exited {res.returncode}"
            print(f"run {run:3d}/{args.runs}: {seconds:7.1f} s  {outcome}", flush=True)
    finally:
        for proc in burners:
            proc.kill()
    print(f"\n{args.runs - bad_runs} of {args.runs} runs passed")
    for test, count in failures.most_common():
        print(f"  failed {count}x: {test}")
    return 1 if bad_runs else 0


if __name__ == "__main__":
    sys.exit(main())
