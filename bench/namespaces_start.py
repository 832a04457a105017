#!/usr/bin/env python3
"""How long do the live tracer's start-up and `snapshot` take while an
unprivileged user holds many network namespaces?

    .venv/bin/python bench/namespaces_start.py --namespaces 0,1000 --runs 3
    PYTHONPATH=<other code>/src .venv/bin/python bench/namespaces_start.py ...

Both read the sockets already in CLOSE_WAIT in every network namespace that
has a process in it (one sock_diag dump each, 3-5 ms): nobody makes N of
them (user+net namespaces, `sleep` in each, so that the start-up's CPython
scan does not count them too). Prints one Markdown row per N: the wall
time from starting `closewait-trace --json` to its start record (ready),
and of `closewait-trace snapshot` (text, to /dev/null), median and range
of --runs runs each, and how many namespaces each said it did not read.

Runs itself in a private network namespace (unshare -n): only the
namespaces made here are read, besides the host's, which the tracer's
private one is not.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from rescan_namespaces import in_private_netns  # noqa: E402  (bench/, the same re-run)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
TRACER = [sys.executable, "-m", "closewait_trace"]

# Nobody's namespaces: each child unshares a user and a network namespace
# and becomes `sleep`.
BOMB = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        if libc.unshare(0x10000000 | 0x40000000) != 0:
            os._exit(1)
        os.execvp("sleep", ["sleep", "3600"])
print("ready", flush=True)
os.wait()
"""

NOT_READ = re.compile(r"(\d+) network namespaces? not read")


def not_read(stderr: str) -> int:
    found = NOT_READ.search(stderr)
    return int(found.group(1)) if found else 0


def start_up() -> tuple[float, int]:
    """Seconds from spawn to the start record; namespaces it left."""
    began = time.monotonic()
    tracer = subprocess.Popen(TRACER + ["--json", "-t", "1s"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in tracer.stdout:
            if '"type": "start"' in line or '"type":"start"' in line:
                break
        took = time.monotonic() - began
    finally:
        tracer.send_signal(2)
        _out, err = tracer.communicate(timeout=60)
    return took, not_read(err)


def snapshot() -> tuple[float, int]:
    began = time.monotonic()
    done = subprocess.run(TRACER + ["snapshot"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    return time.monotonic() - began, not_read(done.stderr)


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")


def run(namespaces: int, runs: int) -> str:
    bomb = None
    try:
        if namespaces:
            bomb = subprocess.Popen(NOBODY + [sys.executable, "-c", BOMB, str(namespaces)],
                                    stdout=subprocess.PIPE, text=True, start_new_session=True)
            assert bomb.stdout.readline().strip() == "ready"
            time.sleep(1)
        load = os.getloadavg()[0]
        starts, snaps = [], []
        for _ in range(runs):
            starts.append(start_up())
            snaps.append(snapshot())
        return (f"| {namespaces:,} | {load:.2f} | {spread([s for s, _ in starts])} | "
                f"{max(n for _, n in starts)} | {spread([s for s, _ in snaps])} | "
                f"{max(n for _, n in snaps)} |")
    finally:
        if bomb is not None:
            os.killpg(bomb.pid, 9)          # its children too
            bomb.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", default="0,1000",
                        help="comma-separated counts of nobody's namespaces")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    in_private_netns()
    print("| nobody's namespaces | load | start-up to ready, s | not read at start "
          "| `snapshot`, s | not read by it |")
    print("|---|---|---|---|---|---|")
    for n in (int(v) for v in args.namespaces.split(",")):
        print(run(n, args.runs), flush=True)


if __name__ == "__main__":
    main()
