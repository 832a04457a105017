"""The scrape server under idle connections: descriptors and scrape latency.

Runs a MetricsSink (the real one, with a snapshot of 100 series) in a child
process, opens N idle connections from another process (never a byte
sent), then times scrapes by a new client: each retried until served (the
16 slots may be full of idle ones until their read timeout). Prints the
child's descriptors before/during, and scrape latencies (served ones only)
and how long a new client waited for a slot.

    PYTHONPATH=src python3 bench/metrics_idle.py [N]
"""

import os
import socket
import statistics
import subprocess
import sys
import time

CHILD = r"""
import socket, sys, time
from closewait_trace.output import metrics
from closewait_trace.kernel.events import Endpoints
from closewait_trace.output.sinks import TickView
from closewait_trace.sockets.tracker import Lingerer
from closewait_trace.sockets.owners import Holder, Ownership, OWNER_FD
sink = metrics.MetricsSink("127.0.0.1", int(sys.argv[1]))
ls = []
for i in range(2000):
    ep = Endpoints(socket.AF_INET, "10.0.0.1", 8000 + i % 150, "10.0.0.2", 40000 + i)
    l = Lingerer(endpoints=ep, enter_ns=i, skaddr=i)
    l.ownership = Ownership(kind=OWNER_FD, listener=object(), holders=[
        Holder(pid=i, comm=f"srv{i % 150}", fd=3, state="S", ppid=1, uid=0, cmdline="x")])
    ls.append(l)
sink.tick(TickView(wall_ts=time.time(), now_ns=10**12, threshold_ns=10**9, counters={},
                   histogram=[1] * 64, histogram_sum_ns=10, lingering=lambda: ls))
sink.serve()
print("ready", flush=True)
time.sleep(3600)
"""

FLOOD = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
        for _ in range(int(sys.argv[2]))]
print("held", len(held), flush=True)
time.sleep(3600)
"""


def scrape(port):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        reply = b""
        try:
            while chunk := c.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "ready"
    fds = lambda: len(os.listdir(f"/proc/{child.pid}/fd"))
    before = fds()
    quiet = []
    for _ in range(20):
        t = time.perf_counter()
        body = scrape(port)
        quiet.append((time.perf_counter() - t) * 1000)
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(n)],
                             stdout=subprocess.PIPE, text=True)
    print(flood.stdout.readline().strip())
    served, waits, refused = [], [], 0
    peak = 0
    for _ in range(20):
        start = time.perf_counter()
        while True:
            t = time.perf_counter()
            reply = scrape(port)
            peak = max(peak, fds())
            if reply.startswith(b"HTTP/1.1 200"):
                served.append((time.perf_counter() - t) * 1000)
                waits.append((time.perf_counter() - start) * 1000)
                break
            refused += 1
            time.sleep(0.05)
    print(f"body {len(body)} bytes; child fds before {before}, peak under {n} idle: {peak}")
    print(f"scrape ms, no load: median {statistics.median(quiet):.2f} max {max(quiet):.2f}")
    print(f"scrape ms, {n} idle: median {statistics.median(served):.2f} max {max(served):.2f}; "
          f"refused tries {refused}; wait for a slot ms: median "
          f"{statistics.median(waits):.1f} max {max(waits):.1f}")
    flood.kill()
    child.kill()


if __name__ == "__main__":
    main()
