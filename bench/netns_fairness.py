"""One user makes N network namespaces, each with a socket in CLOSE_WAIT;
then another user's socket lingers in the tracer's own namespace: how long
from its peer's close to its report (threshold 1 s)? Also the exit time
after SIGINT and a snapshot of all. Usage (root): bench/netns_fairness.py N
(docs/benchmarks.md, issue 17)."""
import os, socket, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.kernel.harness import Tracer, free_port
N = int(sys.argv[1])
# Each namespace: a nobody process in its own user+net namespace, with a
# loopback connection whose peer closed (CLOSE_WAIT), then sleeping.
HOLD = r'''
import socket, time, os
l = socket.socket(); l.bind(("127.0.0.1", 7000)); l.listen()
c = socket.create_connection(("127.0.0.1", 7000)); a, _ = l.accept(); a.close()
os.write(1, b"r"); time.sleep(3600)
'''
procs = []
t0 = time.monotonic()
for i in range(N):
    p = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "unshare", "-Urn", "sh", "-c", "ip link set lo up; exec python3 -c '%s'" % HOLD.replace("'", "'\\''")],
                         stdout=subprocess.PIPE)
    procs.append(p)
for p in procs:
    assert p.stdout.read(1) == b"r"
print(f"{N} namespaces ready in {time.monotonic()-t0:.1f}s", flush=True)
tr = Tracer(["-t", "1s"]).start(timeout=120)
time.sleep(3)   # let the tracer settle on the N pre-existing sockets
port = free_port()
l = socket.socket(); l.bind(("127.0.0.1", port)); l.listen()
c = socket.create_connection(("127.0.0.1", port)); a, _ = l.accept()
c.close()
t = time.monotonic()
tr.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port, timeout=120)
print(f"N={N}: victim reported {time.monotonic()-t:.2f}s after its peer closed (threshold 1s)", flush=True)
s = time.monotonic(); tr.stop(timeout=30); print(f"exit after SIGINT {time.monotonic()-s:.2f}s")
t = time.monotonic()
out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "--json"], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
print(f"snapshot of all: {time.monotonic()-t:.2f}s, {out.stdout.count(chr(10))} lines, rc={out.returncode}")
for p in procs: p.kill()
for p in procs: p.wait()
