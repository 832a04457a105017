#!/usr/bin/env python3
"""How late are root's sockets reported while an unprivileged user makes
the loop rescan among a thousand namespaces of theirs?

    sudo .venv/bin/python bench/rescan_namespaces.py --namespaces 1000
    sudo .venv/bin/python bench/rescan_namespaces.py --namespaces 0    # no bomb

The attack (found by a review, docs/security.md): nobody makes N network
namespaces (user+net, a sleeping process in each), and fills the tracer's
map (--max-tracked 1024) with 1,100 sockets in CLOSE_WAIT of theirs, one
more each second, so that `map_full` keeps growing and the loop keeps
rescanning. Meanwhile root's victims each hold one socket in CLOSE_WAIT,
one every 4 s; each must be reported 3 s (the threshold) after its peer
closed. Prints, per victim, how much later than that its `linger` record
came, then the tracer's rescans and their longest (tracer_cost), as one
Markdown row.

Run in a private network namespace (made here with unshare -n), so that
only these sockets are traced.
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
sys.path.insert(0, REPO)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
THRESHOLD_S = 3
ATTACK_PORT = 7200
VICTIM_PORT = 7300

# Nobody's namespaces: each child its own user and network namespace.
BOMB = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        if libc.unshare(0x10000000 | 0x40000000) != 0:
            os._exit(1)
        time.sleep(3600)
        os._exit(0)
print("ready", flush=True)
os.wait()
"""

# Nobody's sockets: 1,100 in CLOSE_WAIT, then one more a second, the oldest
# extra ones closed (the map stays full and map_full keeps growing).
ATTACKER = r"""
import resource, socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
srv = socket.socket(); srv.bind(("127.0.0.1", port)); srv.listen(4096)
keep, clients = [], []
def one():
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = srv.accept()
    c.shutdown(socket.SHUT_WR)       # kept open: no time-wait port reused
    keep.append(s); clients.append(c)
for _ in range(n):
    one()
print("ready", flush=True)
while True:
    one()
    if len(keep) > n + 200:
        keep.pop(n).close(); clients.pop(n).close()
    time.sleep(1)
"""

VICTIM = r"""
import socket, sys, time
port = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", port)); srv.listen(1)
c = socket.create_connection(("127.0.0.1", port))
s, _ = srv.accept()
c.close()
print(time.time(), flush=True)
time.sleep(3600)
"""


def run(namespaces: int, victims: int) -> str:
    from tests.kernel.harness import Tracer
    procs, bomb = [], None
    try:
        if namespaces:
            bomb = subprocess.Popen(NOBODY + [sys.executable, "-c", BOMB, str(namespaces)],
                                    stdout=subprocess.PIPE, text=True, start_new_session=True)
            procs.append(bomb)
            assert bomb.stdout.readline().strip() == "ready"
            time.sleep(2)
        tracer = Tracer(["-t", f"{THRESHOLD_S}s", "--max-tracked", "1024"]).start(timeout=120)
        procs.append(tracer.proc)
        attacker = subprocess.Popen(NOBODY + [sys.executable, "-c", ATTACKER, "1100",
                                              str(ATTACK_PORT)],
                                    stdout=subprocess.PIPE, text=True)
        procs.append(attacker)
        assert attacker.stdout.readline().strip() == "ready"
        tracer.settle(4)
        held = {}
        for i in range(victims):
            port = VICTIM_PORT + i
            victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(port)],
                                      stdout=subprocess.PIPE, text=True)
            procs.append(victim)
            held[port] = float(victim.stdout.readline())
            tracer.settle(4)
        tracer.settle(THRESHOLD_S + 10)
        summary = tracer.stop()
        late = {}
        for rec in tracer.records:
            if rec["type"] == "linger" and rec.get("lport") in held and rec["lport"] not in late:
                late[rec["lport"]] = rec["ts"] - held[rec["lport"]] - THRESHOLD_S
        cost = summary.get("tracer_cost", {})
        counters = summary.get("counters", {})
        values = sorted(late.values())
        spread = (f"{values[0]:.2f}-{values[-1]:.2f} s (median "
                  f"{statistics.median(values):.2f})" if values else "-")
        return (f"| {namespaces:,} | {len(late)} of {victims} | {spread} | "
                f"{cost.get('rescans', 0)} | {cost.get('rescan_max_ms', 0):.0f} ms | "
                f"{counters.get('map_full', 0)} |")
    finally:
        if bomb is not None:
            os.killpg(bomb.pid, 9)          # its children too
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
            p.wait()


def in_private_netns() -> None:
    """Runs this script again in a network namespace of its own (unshare
    -n), loopback up, unless it is that run: only what it makes is traced."""
    if os.environ.get("CWT_BENCH_NETNS") != "1":
        os.execvp("unshare", ["unshare", "-n", "env", "CWT_BENCH_NETNS=1",
                              sys.executable] + sys.argv)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=1000)
    parser.add_argument("--victims", type=int, default=10)
    args = parser.parse_args()
    in_private_netns()
    print("| nobody's namespaces | root's sockets reported | late by | rescans "
          "| longest rescan | map_full |")
    print("|---|---|---|---|---|---|")
    print(run(args.namespaces, args.victims), flush=True)


if __name__ == "__main__":
    main()
