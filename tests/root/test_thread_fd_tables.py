"""Sockets held in a thread's own fd table. A thread that calls
unshare(CLONE_FILES) gets a table of its own (a copy): what it opens or
keeps there is not in /proc/PID/fd, which shows the leader's table. The
owner lookup read only that one, so a socket whose leader's copy was closed
was "held by no process" (or, where some process could not be read,
"unknown"), while `ss -p` would not name its holder either. Real processes,
threads, sockets and /proc; the logic on crafted trees is in
tests/unit/test_owners.py."""

import socket
import subprocess
import sys
import time

import pytest

from closewait_trace.sockets import owners

pytestmark = pytest.mark.root

# A process whose second thread unshares its fd table, then: the leader
# closes its copy of the accepted socket "private" (only the thread's table
# holds it), keeps "both" in both tables, and "leader" only in its own
# (the thread closes its copy). Several more threads share the leader's
# table. It prints the fds once the tables are so.
HOLDER = r"""
import ctypes, os, socket, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(8)
os.write(1, f"{server.getsockname()[1]}\n".encode())
conns = {name: server.accept()[0] for name in ("private", "both", "leader")}
fds = {name: c.fileno() for name, c in conns.items()}
unshared, closed = threading.Event(), threading.Event()
def private_table():
    if libc.unshare(0x400) != 0:                    # CLONE_FILES
        os._exit(3)
    os.close(fds["leader"])                          # this table's copy
    unshared.set()
    closed.wait()
    threading.Event().wait()
def shared_table():
    threading.Event().wait()
for target in [private_table] + [shared_table] * 3:
    threading.Thread(target=target, daemon=True).start()
unshared.wait()
conns["private"].detach()
os.close(fds["private"])                             # the leader's copy
closed.set()
os.write(1, (" ".join(f"{n}={fd}" for n, fd in fds.items()) + "\n").encode())
sys.stdin.read()
"""


@pytest.fixture
def holder():
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        endpoints = [c.getsockname()[1] for c in clients]
        fds = dict(kv.split("=") for kv in proc.stdout.readline().split())
        for c in clients:
            c.close()                 # the peer: each server side to CLOSE_WAIT
        yield proc, port, dict(zip(("private", "both", "leader"), endpoints)), \
            {k: int(v) for k, v in fds.items()}
    finally:
        proc.kill()
        proc.wait()


def _rows(port: int, timeout_s: float = 5.0) -> dict:
    """client port -> the server side's row in CLOSE_WAIT."""
    end = time.monotonic() + timeout_s
    while True:
        rows = {row.endpoints.rport: row for _inode, row in owners.snapshot_close_wait()
                if row.endpoints.lport == port}
        if len(rows) == 3 or time.monotonic() > end:
            return rows
        time.sleep(0.05)


def test_a_socket_in_a_threads_own_table_has_its_process_as_holder(holder):
    proc, port, client_port, fds = holder
    rows = _rows(port)
    assert sorted(rows) == sorted(client_port.values())
    inodes = {name: rows[p].inode for name, p in client_port.items()}
    found = owners.find_holders(list(inodes.values()))
    for name in ("private", "both", "leader"):
        held = found.get(inodes[name])
        assert held, f"{name}: no holder found"
        # Once each: the thread's copy of a socket also in the leader's
        # table is the same process's, not a second holder.
        assert [(h.pid, h.fd) for h in held] == [(proc.pid, fds[name])], name
    assert owners.held_now([inodes["private"]]) == [True]
    # The whole lookup, as the tracer asks it.
    answer = owners.resolve([rows[client_port["private"]].endpoints])
    own = answer[rows[client_port["private"]].endpoints]
    assert own.kind == owners.OWNER_FD
    assert [(h.pid, h.fd) for h in own.holders] == [(proc.pid, fds["private"])]
    # Its close-on-exec flag read from the thread's table, not the leader's
    # (socket.accept() sets it; the leader's fd of that number is closed).
    assert own.holders[0].cloexec is True


def test_the_leaders_table_is_still_read_first(holder):
    """The socket only the leader's table holds keeps the leader's fd."""
    proc, port, client_port, fds = holder
    rows = _rows(port)
    inode = rows[client_port["leader"]].inode
    assert [(h.pid, h.fd) for h in owners.find_holders([inode])[inode]] == \
        [(proc.pid, fds["leader"])]
