"""Exact counts at a scale where the owner lookup answers in more than one
chunk (gathering.OWNERS_CHUNK, 8,192): every one of 9,000 sockets in
CLOSE_WAIT held by one process is reported once, with that process and the
fd that really holds that socket."""

import os
import subprocess
import sys
import time

from closewait_trace.evidence import gathering
from tests.kernel.harness import Tracer, free_port, stretch

MANY = 9000
MANY_HOLDER = os.path.join(os.path.dirname(__file__), "many_holder.py")


def test_9000_sockets_of_one_holder_each_reported_once_with_its_own_fd(procs):
    assert MANY > gathering.OWNERS_CHUNK        # two chunks at least
    port = free_port()
    tracer = Tracer(["-t", "1s", "-i", "200ms", "-p", str(port)]).start()
    procs.append(tracer)
    holder = subprocess.Popen([sys.executable, MANY_HOLDER, str(MANY), str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    lingers = []
    seen = 0
    deadline = time.monotonic() + stretch(60)
    while len(lingers) < MANY and time.monotonic() < deadline:
        tracer._pump(0.2)
        new, seen = tracer.records[seen:], len(tracer.records)
        lingers += [r for r in new if r["type"] == "linger" and r["lport"] == port]
    tracer.settle(1.5)                            # nothing more may come
    lingers += [r for r in tracer.records[seen:] if r["type"] == "linger"
                and r["lport"] == port]
    assert len(lingers) == MANY, len(lingers)
    assert len({r["rport"] for r in lingers}) == MANY          # each socket once
    assert len({r["inode"] for r in lingers}) == MANY
    # Its own holder and fd: the fd named holds the inode named, now.
    links = {}
    for r in lingers:
        assert r["owner_kind"] == "fd" and not r["update"], r
        (owner,) = r["owners"]
        assert owner["pid"] == holder.pid, owner
        links[owner["fd"]] = r["inode"]
    assert len(links) == MANY                   # a different fd for each
    for fd, inode in links.items():
        assert os.readlink(f"/proc/{holder.pid}/fd/{fd}") == f"socket:[{inode}]"
