"""The cap on holder processes read per batch (gathering.
MAX_PROCESSES_PER_BATCH) against another user's many processes, with real
processes of nobody: its listener shared by 300 forks, one of its accepted
sockets older than root's, must not leave root's holder unread (the
review's F2: root's socket was "unknown ... (its threads not read: not
gathered)" in the live tracer and in `snapshot -v`, its process record
without identity). resolver.gather_processes reads every socket's own
holders before any listener's, the users in turns."""

import json
import subprocess
import time

import pytest

from tests.kernel.harness import (TRACER, Tracer, connect_and_close, free_port, ss_close_wait,
                                  start_holding_server, start_ready, stretch, wait_until)

pytestmark = pytest.mark.kernel

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
KIDS = 300          # with its parent and root's server: 302 holders, 46 over the cap

# As nobody: a listener on 127.0.0.1:PORT that KIDS forks hold and wait in
# pause() with; the parent accepts every connection and keeps it.
HOG = r"""
import os, signal, socket, sys
port, kids = int(sys.argv[1]), int(sys.argv[2])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(64)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for _ in range(kids):
    if os.fork() == 0:
        while True:
            signal.pause()
print("ready", flush=True)
held = []
while True:
    held.append(l.accept()[0])
"""


def root_diagnosis(records: list, port: int) -> dict:
    (rec,) = [r for r in records if r["type"] == "linger" and r["lport"] == port
              and not r.get("update")]
    return rec


def test_another_users_listener_forks_leave_roots_holder_read(procs):
    hog_port, root_port = free_port(), free_port()
    hog = start_ready(procs, NOBODY + ["/usr/bin/python3", "-c", HOG, str(hog_port), str(KIDS)])
    server = start_holding_server(root_port)
    procs.append(server)
    # nobody's socket first (the older: its holders come first in a batch
    # read oldest socket first), then root's.
    connect_and_close(hog_port, 1)
    wait_until(lambda: any(hog.pid in pids for *_a, pids in ss_close_wait(hog_port)),
               what="nobody's socket accepted, in CLOSE-WAIT")
    time.sleep(0.2)
    connect_and_close(root_port, 1)
    wait_until(lambda: any(server.pid in pids for *_a, pids in ss_close_wait(root_port)),
               what="root's socket accepted, in CLOSE-WAIT")
    ports = f"{hog_port},{root_port}"

    # snapshot -v: one batch of both, stacks read.
    out = subprocess.run(TRACER + ["snapshot", "-v", "--json", "-p", ports],
                         capture_output=True, text=True, timeout=stretch(60))
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    rec = root_diagnosis(recs, root_port)
    assert rec["diagnosis"]["cause"] == "ignoring_eof", rec["diagnosis"]["summary"]
    assert "not read" not in rec["diagnosis"]["summary"]
    (proc_rec,) = [r for r in recs if r["type"] == "process" and r["pid"] == server.pid]
    assert "unreadable" not in proc_rec and proc_rec["identity"], proc_rec

    # The live tracer: both sockets older than its threshold at its start,
    # reported in its first batch.
    time.sleep(max(0.0, 1.2 - 0.2))
    tracer = Tracer(["-p", ports, "-t", "1s"]).start()
    procs.append(tracer)
    tracer.wait_for(lambda r: r["type"] == "linger", count=2, timeout=20)
    summary = tracer.stop()
    rec = root_diagnosis(tracer.records, root_port)
    assert rec["diagnosis"]["cause"] == "ignoring_eof", rec["diagnosis"]["summary"]
    assert "not read" not in rec["diagnosis"]["summary"]
    (proc_rec,) = [r for r in tracer.records if r["type"] == "process" and r["pid"] == server.pid]
    assert "unreadable" not in proc_rec and proc_rec["identity"], proc_rec
    # nobody's listener-only forks are what the cap left, each batch once.
    assert summary["evidence"]["processes_skipped"] >= KIDS + 2 - 256, summary["evidence"]
