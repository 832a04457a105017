#!/usr/bin/env python3
"""What one rescan after a loss costs (live/tracer.py rescan_dump and
rescan_apply) with many sockets in CLOSE_WAIT: the worker's read of every
namespace's sockets in CLOSE_WAIT (owners.rescan_close_wait, tcp_info
included) and the loop's comparison with what it tracks (Tracker.rescan),
both in this process, CPU and wall time.

    sudo .venv/bin/python bench/rescan.py                       # 1,000 and 10,000
    sudo .venv/bin/python bench/rescan.py --sockets 1000,10000,30000 --runs 7

Run in a private network namespace of its own (made here with unshare -n):
holders of up to 9,000 sockets each (tests/kernel/many_holder.py, one port
each) fill it; the host's own sockets in CLOSE_WAIT are read too (every
namespace is), as the tracer would. Prints one Markdown row per count: the
median and lowest of --runs, in ms and in us a socket. The tracker is made
as the map read leaves it (every socket tracked), so that the comparison
finds each row known: the common case (nothing missed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))
HOLDER = os.path.join(REPO, "tests", "kernel", "many_holder.py")
PER_HOLDER = 9000
BASE_PORT = 23000


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(count: int, runs: int) -> str:
    from closewait_trace.sockets import owners
    from closewait_trace.sockets.tracker import Tracker
    holders = []
    try:
        left, port = count, BASE_PORT
        while left > 0:
            n = min(PER_HOLDER, left)
            h = subprocess.Popen([sys.executable, HOLDER, str(n), str(port)],
                                 stdout=subprocess.PIPE, text=True)
            holders.append(h)
            assert h.stdout.readline().strip() == "ready"
            left -= n
            port += 1
        reads, compares = [], []
        for _ in range(runs):
            (rows, dumped, _tried, _unread), wall, cpu = timed(owners.rescan_close_wait)
            reads.append((wall, cpu))
            mine = [r for r in rows if BASE_PORT <= r.endpoints.lport < port]
            assert len(mine) == count, (len(mine), count)
            tracker = Tracker(threshold_ns=10**9, start_ns=0)
            endpoints = {i + 1: r.endpoints for i, r in enumerate(rows)}
            tracker.sync_entries({k: 1 for k in endpoints}, endpoints.__getitem__, 2)
            (adopted, gone), wall, cpu = timed(
                lambda: tracker.rescan(rows, 3, dumped, 3))
            assert (adopted, gone) == (0, []), (adopted, len(gone))
            compares.append((wall, cpu))
    finally:
        for h in holders:
            h.kill()
            h.wait()

    def cell(samples, i):
        values = sorted(s[i] for s in samples)
        med = statistics.median(values)
        return f"{med * 1e3:.0f} ms ({values[0] * 1e3:.0f}), {med / count * 1e6:.1f} us"
    return (f"| {count:,} | {cell(reads, 0)} | {cell(reads, 1)} | {cell(compares, 0)} "
            f"| {cell(compares, 1)} | {os.getloadavg()[0]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", default="1000,10000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.in_netns:
        os.execvp("unshare", ["unshare", "-n", "sh", "-c",
                              f"ip link set lo up && exec {sys.executable} {__file__} "
                              f"--sockets {args.sockets} --runs {args.runs} --in-netns"])
    print("| sockets | read: wall median (lowest), a socket | read: CPU | compare: wall "
          "| compare: CPU | load |")
    print("|---|---|---|---|---|---|")
    for count in (int(c) for c in args.sockets.split(",")):
        print(measure(count, args.runs), flush=True)


if __name__ == "__main__":
    main()
