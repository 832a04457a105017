#!/usr/bin/env python3
"""How long `closewait-trace snapshot` takes with many sockets in CLOSE_WAIT.

    .venv/bin/python bench/snapshot.py                       # 10,000 sockets, 4 holders
    .venv/bin/python bench/snapshot.py --sockets 10000 --holders 4 --runs 5
    .venv/bin/python bench/snapshot.py --holder c            # holders are small C programs

Also timed: bench/snapshot_floor.py, the reads and one Python line per
socket and nothing else (the interpreter's share of the gap to ss).

Starts the holders (each listens, is connected to by a client that then
closes, and keeps every accepted socket without reading: CLOSE_WAIT), waits
until ss counts them all, runs ss and the snapshot (text and --json, each in a fresh
process as a user would) in turn, a few rounds, and prints the wall and
CPU times and each wall median's ratio to ss's, ss being the yardstick for
the same sockets. Root is not needed for the sockets, but without it the
holders are hidden unless they are yours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TRACER = [sys.executable, "-m", "closewait_trace"]
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snapshot_floor.py")

PY_HOLDER = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
count = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4096)
port = srv.getsockname()[1]
held = []
for _ in range(count):
    c = socket.create_connection(("127.0.0.1", port))
    held.append(srv.accept()[0])
    c.close()
print(port, flush=True)
sys.stdin.read()
"""

# The same, in C: what a holder costs the diagnosis depends on its binaries
# (a Python holder's stack is symbolized through libpython, a big ELF file).
C_HOLDER = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int count = atoi(argv[1]);
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    int srv = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(srv, (void *)&a, sizeof a) || listen(srv, 4096)) return 1;
    getsockname(srv, (void *)&a, &len);
    for (int i = 0; i < count; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (void *)&a, sizeof a)) return 2;
        if (accept(srv, NULL, NULL) < 0) return 3;
        close(c);
    }
    printf("%d\n", ntohs(a.sin_port)); fflush(stdout);
    char buf[1]; while (read(0, buf, 1) > 0) {}
    return 0;
}
"""


def start_holders(total: int, holders: int, kind: str) -> list:
    cmd_base = [sys.executable, "-c", PY_HOLDER]
    if kind == "c":
        exe = os.path.join(tempfile.gettempdir(), f"closewait-bench-holder-{os.getuid()}")
        src = exe + ".c"
        with open(src, "w") as f:
            f.write(C_HOLDER)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        cmd_base = [exe]
    sizes = [total // holders + (1 if i < total % holders else 0) for i in range(holders)]
    procs = []
    for n in sizes:
        p = subprocess.Popen(cmd_base + [str(n)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
    ports = [int(p.stdout.readline()) for p in procs]
    return list(zip(procs, ports))


def ss_count(ports) -> int:
    filt = " or ".join(f"sport = :{p}" for p in ports)
    out = subprocess.run(["ss", "-Htn", "state", "close-wait", f"( {filt} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def become_subreaper() -> None:
    """The snapshot kills its gathering worker and never waits for it (a
    worker may be blocked in the kernel): orphaned, it would be reaped by
    init and its CPU time counted nowhere. As a subreaper, this script
    inherits and reaps it, so that the CPU figures hold both processes."""
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children() -> set[int]:
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def reap_orphans(keep: set[int], timeout: float = 5.0) -> bool:
    """Waits for every child not in keep (the holders) to end and reaps it:
    a worker the command left behind, inherited as its subreaper (a command
    that reaped its own worker leaves none). False if one outlived timeout."""
    deadline = time.monotonic() + timeout
    while True:
        orphans = children() - keep
        # A zombie is still listed as a child until it is waited for.
        for pid in orphans:
            if os.waitpid(pid, os.WNOHANG)[0]:
                orphans = orphans - {pid}
        if not orphans:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def timed(cmd, keep: set[int] = frozenset()) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of one run. On a
    shared machine the CPU time is what the command costs; the wall time is
    that plus waiting for a CPU. keep: this script's own children (the
    holders); any other is what the command left behind to die (the
    snapshot's worker), reaped and counted in the CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - started
    if not reap_orphans(keep):
        print(f"WARNING: {' '.join(cmd[-3:])}: a process it left is still alive; "
              "CPU time without it")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=10_000)
    ap.add_argument("--holders", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--holder", choices=["python", "c"], default="python")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    become_subreaper()
    held = start_holders(args.sockets, args.holders, args.holder)
    ports = [port for _p, port in held]
    try:
        deadline = time.monotonic() + 60
        while ss_count(ports) < args.sockets and time.monotonic() < deadline:
            time.sleep(0.2)
        found = ss_count(ports)
        print(f"{found} sockets in CLOSE_WAIT held by {args.holders} {args.holder} processes")
        lport_filter = ["-p", ",".join(map(str, ports))]
        commands = {
            "ss -tanp state close-wait": ["ss", "-tanp", "state", "close-wait"],
            "snapshot (text)": TRACER + ["snapshot"] + lport_filter,
            "snapshot --json": TRACER + ["snapshot", "--json"] + lport_filter,
            # The reads and a line per socket in Python, nothing more: what
            # the interpreter's share of the gap to ss is (target 3).
            "python floor": [sys.executable, FLOOR]}
        holder_pids = {p.pid for p, _port in held}
        results = {name: [] for name in commands}
        cpu_results = {name: [] for name in commands}
        load_before = os.getloadavg()[0]
        # Interleaved, one round of every command after another: a change of
        # load on a shared machine weighs on ss and the snapshot alike.
        for _ in range(args.runs):
            for name, cmd in commands.items():
                seconds, cpu_seconds, out = timed(cmd, holder_pids)
                results[name].append(seconds)
                cpu_results[name].append(cpu_seconds)
                if "--json" in cmd:
                    lingers = [json.loads(line) for line in out.splitlines()]
                    lingers = [r for r in lingers if r["type"] == "linger"]
                    if len(lingers) != found:
                        now = ss_count(ports)
                        print(f"WARNING: snapshot listed {len(lingers)} sockets, ss {found} "
                              f"before and {now} now")
                    assert all(r["owners"] for r in lingers), "a socket without its holder"
                if cmd[-1] == FLOOR and len(out.splitlines()) < found:
                    print(f"WARNING: the floor listed {len(out.splitlines())} sockets, "
                          f"ss {found}")
        print(f"load average before: {load_before:.1f}, after: {os.getloadavg()[0]:.1f}")
        print(f"{'command':<28} {'wall min':>8} {'median':>7} {'max':>7} "
              f"{'cpu min':>8} {'median':>7} {'/ ss':>6}  (seconds, {args.runs} runs)")
        yardstick = statistics.median(results["ss -tanp state close-wait"])
        for name, times in results.items():
            cpu = cpu_results[name]
            print(f"{name:<28} {min(times):8.2f} {statistics.median(times):7.2f} "
                  f"{max(times):7.2f} {min(cpu):8.2f} {statistics.median(cpu):7.2f} "
                  f"{statistics.median(times) / yardstick:6.1f}")
        print(json.dumps({"sockets": found, "holders": args.holders, "holder": args.holder,
                          "nofile": [soft, hard], "wall_s": results, "cpu_s": cpu_results}))
    finally:
        for p, _port in held:
            p.kill()
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
