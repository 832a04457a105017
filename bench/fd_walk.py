"""A user who holds many fds, and the owner lookup of root's socket in
CLOSE_WAIT: how long does the lookup take, and does it name the holder?

    bench/fd_walk.py [FDS ...] [--runs N]     # as root

For each FDS (default 0, 200,000 and 1,000,000), uid 54321 starts processes
that dup() /dev/null FDS times in all (RLIMIT_NOFILE's hard limit in each,
tests/root/test_fd_walk_budget.py's hog) and one of them holds a socket in
CLOSE_WAIT too; then owners.resolve of root's socket and theirs is timed
with the real clock, N runs. Prints the lookup's seconds (median, range),
whether root's holder was named, how many processes were not read in time
(owners.FD_WALK_BUDGET_S), and what the hog's socket was said to be.
Run the code before with PYTHONPATH=<its src> (docs/benchmarks.md, "A
user's fds and the owner lookup").
"""
import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from closewait_trace.kernel.events import Endpoints  # noqa: E402
from closewait_trace.sockets import owners  # noqa: E402
from tests.root.test_fd_walk_budget import (HOG, HOG_UID, HOG_USER,  # noqa: E402
                                            close_wait_of_mine)


def run(fds: int, runs: int) -> None:
    server, port, mine = close_wait_of_mine()
    wanted = [Endpoints(socket.AF_INET, "127.0.0.1", mine.getsockname()[1], "127.0.0.1", port)]
    hog = None
    if fds:
        per = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64
        procs = -(-fds // per)
        hog = subprocess.Popen([*HOG_USER, "/usr/bin/python3", "-c", HOG, str(procs),
                                str(fds // procs), str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(procs):
            hog.stdout.readline()
        theirs, (_addr, their_port) = server.accept()
        theirs.close()
        wanted.append(Endpoints(socket.AF_INET, "127.0.0.1", their_port, "127.0.0.1", port))
    time.sleep(0.5)
    try:
        took = []
        for _ in range(runs):
            started = time.monotonic()
            got = owners.resolve(wanted)
            took.append(time.monotonic() - started)
        mine_own = got[wanted[0]]
        named = os.getpid() in {h.pid for h in mine_own.holders}
        not_read = getattr(mine_own, "fds_not_read", None)
        theirs_kind = got[wanted[1]].kind if fds else "-"
        print(f"{fds:>9,} fds: lookup {statistics.median(took):.3f} s "
              f"({min(took):.3f}-{max(took):.3f}), root's holder named: {named}, "
              f"not read: {not_read[0] if not_read else 0}, theirs: {theirs_kind}", flush=True)
    finally:
        if hog is not None:
            subprocess.run(["pkill", "-KILL", "-u", HOG_UID], check=False)
            hog.wait()
            # Gone before the next size is measured: dying, they still count.
            while subprocess.run(["pgrep", "-u", HOG_UID], stdout=subprocess.DEVNULL).returncode == 0:
                time.sleep(0.1)
        for s in (mine, server):
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fds", nargs="*", type=int, default=[0, 200_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for fds in args.fds:
        run(fds, args.runs)


if __name__ == "__main__":
    main()
