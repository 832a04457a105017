"""A user's network namespaces whose TCP tables are slow to read, and another
user's socket that lingers at the same moment: how long from its peer's
close to its report (threshold 1 s)?

    bench/slow_namespaces.py N [BUCKETS] [other]   # as root; N namespaces

nobody makes N namespaces (unshare -Urn), sets tcp_child_ehash_entries
(BUCKETS, default 16M) in each and makes a second namespace inside it, which
gets a hash table that big (about 130 MB of kernel memory each): its
sock_diag dump takes about 140 ms, even empty, in one reply. Each holds a
loopback connection. The tracer starts; then every holder closes its
client (its accepted socket enters CLOSE_WAIT) and, at the same moment, a
socket of root's in the tracer's own namespace lingers too, so that all of
them cross the threshold in the same tick and are looked up together
(docs/benchmarks.md, "Slow namespaces in one owner lookup"). With
`other`, that socket is in a namespace of its own (as in a container),
held by a process of uid 65533.
"""
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.kernel.harness import Tracer, free_port  # noqa: E402

N = int(sys.argv[1])
BUCKETS = int(sys.argv[2]) if len(sys.argv) > 2 else 16 * 1024 * 1024
OTHER = sys.argv[3:] == ["other"]
HOLD = r'''
import os, socket, sys, time
port = int(sys.argv[1]) if len(sys.argv) > 1 else 7000
l = socket.socket(); l.bind(("127.0.0.1", port)); l.listen()
c = socket.create_connection(("127.0.0.1", port)); a, _ = l.accept()
os.write(1, b"r"); sys.stdin.buffer.read(1); c.close(); os.write(1, b"c"); time.sleep(3600)
'''
INNER = "ip link set lo up; exec /usr/bin/python3 -c '%s'" % HOLD.replace("'", "'\\''")
OUTER = (f"echo {BUCKETS} > /proc/sys/net/ipv4/tcp_child_ehash_entries && "
         f"exec unshare -n sh -c \"{INNER.replace(chr(34), chr(92) + chr(34))}\"")

procs = []
holder = tr = None
victim_ns = f"cwt-victim-{os.getpid()}"
try:
    t0 = time.monotonic()
    for _ in range(N):
        procs.append(subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "unshare", "-Urn", "sh", "-c", OUTER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    for p in procs:
        assert p.stdout.read(1) == b"r", "a holder did not start"
    print(f"{N} namespaces of {BUCKETS} buckets ready in {time.monotonic() - t0:.1f}s", flush=True)

    tr = Tracer(["-t", "1s"]).start(timeout=120)
    time.sleep(2)
    if OTHER:
        subprocess.run(["ip", "netns", "add", victim_ns], check=True)
        subprocess.run(["ip", "-n", victim_ns, "link", "set", "lo", "up"], check=True)
        port = 7001
        holder = subprocess.Popen(["ip", "netns", "exec", victim_ns, "setpriv",
                                   "--reuid=65533", "--regid=65533", "--clear-groups",
                                   "/usr/bin/python3", "-c", HOLD, str(port)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert holder.stdout.read(1) == b"r"
    else:
        port = free_port()
        listener = socket.socket()
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
    for p in procs:
        p.stdin.write(b"x")
        p.stdin.flush()
    if OTHER:
        holder.stdin.write(b"x")
        holder.stdin.flush()
    else:
        client.close()
    closed = time.monotonic()
    for p in procs + ([holder] if OTHER else []):
        assert p.stdout.read(1) == b"c"
    tr.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port, timeout=120)
    victim = time.monotonic() - closed
    tr.wait_for(lambda r: r["type"] == "linger" and r["lport"] == 7000, count=N, timeout=300)
    others = time.monotonic() - closed
    lingers = [r for r in tr.records if r["type"] == "linger" and r["lport"] == 7000]
    kinds = sorted({r["owner_kind"] for r in lingers})
    print(f"N={N}: {'uid 65533' if OTHER else 'root'}'s socket reported {victim:.2f}s "
          f"after its peer closed (threshold 1s); "
          f"the {len(lingers)} in nobody's namespaces by {others:.2f}s, owner kinds {kinds}",
          flush=True)
    tr.stop(timeout=30)
finally:
    # Whatever failed: nothing of the bench's left running.
    if tr is not None and tr.proc.poll() is None:
        tr.proc.kill()
    for p in procs + ([holder] if holder else []):
        p.kill()
    for p in procs + ([holder] if holder else []):
        p.wait()
    if OTHER:
        subprocess.run(["ip", "netns", "del", victim_ns], stderr=subprocess.DEVNULL)
