#!/usr/bin/env python3
"""Start-up cost of finding the running CPython processes (the scan of
/proc/*/exe before "ready", pyframes.python_processes) with N of them.

    sudo .venv/bin/python bench/python_scan.py                 # N = 0, 200, 2000
    sudo .venv/bin/python bench/python_scan.py --counts 0,2000 --rounds 5

For each N: one /usr/bin/python3.11 parent forks N-1 children that sleep
(each a CPython process of its own, /proc/PID/exe python3.11; forked, so
they cost little memory); then, --rounds times each,
- `closewait-trace --json -p PORT` is started and the time until its
  "start" record is read (what a user waits for "ready"), and
- the scan alone is timed in this process (gathering.python_processes, the
  same call the worker makes, to its end), with how many processes it found.
Prints a Markdown table (medians; the one in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))
TRACER = [sys.executable, "-m", "closewait_trace"]
PYTHON = "/usr/bin/python3.11"

FORKER = """\
import os, signal, sys
n = int(sys.argv[1])
for _ in range(n):
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
print("ready", flush=True)
signal.pause()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pythons(n: int):
    if n == 0:
        return None
    p = subprocess.Popen([PYTHON, "-c", FORKER, str(n - 1)], stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def stop_pythons(p) -> None:
    if p is None:
        return
    os.killpg(p.pid, 9)
    p.wait()
    time.sleep(1)               # the children reaped by init


def time_to_start(port: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    started = time.monotonic()
    t = subprocess.Popen(TRACER + ["--json", "-p", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in t.stdout:
            if json.loads(line).get("type") == "start":
                return time.monotonic() - started
        raise RuntimeError(f"no start record: {t.stderr.read()[-2000:]}")
    finally:
        t.terminate()
        t.wait(30)


def scan_alone() -> tuple[float, int]:
    from closewait_trace.evidence import elfindex, gathering
    elfindex._NAMED_CACHE.clear()       # a fresh tracer's worker has none
    started = time.monotonic()
    found = gathering.python_processes()
    if not isinstance(found, dict):         # streamed (the dict: before 2026-12)
        found = [item for item in found if item[0] == "walk"]
    return time.monotonic() - started, len(found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="0,200,2000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        p = start_pythons(n)
        try:
            starts, scans, found = [], [], []
            for _ in range(args.rounds):
                starts.append(time_to_start(free_port()))
                s, k = scan_alone()
                scans.append(s)
                found.append(k)
            rows.append((n, statistics.median(starts), max(starts),
                         statistics.median(scans), max(scans), min(found)))
        finally:
            stop_pythons(p)
    print("| CPython processes | start -> \"start\" record, median (max) | "
          "scan alone, median (max) | found by the scan (min) |")
    print("|---:|---:|---:|---:|")
    for n, sm, sx, cm, cx, k in rows:
        print(f"| {n:,} | {sm:.2f} s ({sx:.2f}) | {cm * 1000:.0f} ms ({cx * 1000:.0f}) | {k:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
