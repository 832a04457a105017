"""The owner lookup's walk of every process's fd links, against a real
unprivileged user who holds hundreds of thousands of fds (dup() of
/dev/null, as RLIMIT_NOFILE allows in each process): the users with the
fewest fds are walked first, and what the walk's time leaves is counted,
never taken for "no holder". Real processes, sockets and /proc; the walk's
clock counts the links read (4 us each, this machine's cost), so that the
test says the same on a fast machine, a slow one, or under load. The logic
on crafted trees: tests/unit/test_owners.py."""

import os
import resource
import socket
import subprocess
import time

import pytest

from closewait_trace.evidence import diagnosis
from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets import owners, procfs, subids

pytestmark = pytest.mark.root

# A user of its own (no other test's processes are theirs).
HOG_UID = "54321"
HOG_USER = ["setpriv", f"--reuid={HOG_UID}", f"--regid={HOG_UID}", "--clear-groups"]
HOG_FDS = 300_000
PER_PROCESS = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64
HOG_PROCESSES = -(-HOG_FDS // PER_PROCESS)

# HOG_PROCESSES processes of that user, each about PER_PROCESS dup()s of
# /dev/null (RLIMIT_NOFILE's hard limit); the last forked, with the most
# (walked last), non-dumpable (its /proc/PID then belongs to root: its user
# must come from its status) and holding a socket it connected, whose peer
# then closes.
HOG = r"""
import ctypes, os, resource, socket, sys
procs, per, port = (int(a) for a in sys.argv[1:])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
me = 0
for i in range(1, procs):
    if os.fork() == 0:
        me = i
        break
role = "plain"
if me == procs - 1:
    role = "holder"
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)          # PR_SET_DUMPABLE
    c = socket.create_connection(("127.0.0.1", port))
base = os.open("/dev/null", os.O_RDONLY)
dups = [os.dup(base) for _ in range(per if role == "holder" else per - 100)]
os.write(1, f"{role} {os.getpid()}\n".encode())   # one write: no interleaving
sys.stdin.read()
"""


def _close_wait(port: int, timeout_s: float = 5.0) -> list[str]:
    end = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["ss", "-tanpH", "state", "close-wait"], capture_output=True,
                             text=True, check=True).stdout
        lines = [l for l in out.splitlines() if f":{port} " in l]
        if len(lines) >= 2 or time.monotonic() > end:
            return lines
        time.sleep(0.05)


def close_wait_of_mine() -> tuple[socket.socket, int, socket.socket]:
    """(a listener, its port, a socket of this process's connected to it
    and in CLOSE_WAIT): the listener accepts the hog's connection next."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    mine = socket.create_connection(("127.0.0.1", port))
    peer, _ = server.accept()
    peer.close()
    return server, port, mine


def clock_of_links(monkeypatch) -> list:
    """The walk's clock counts the links it reads, 4 us each (this
    machine's cost), so that a budget says the same here, on a fast
    machine, or under load. Returns the count, [n]."""
    links = [0]
    readlink = procfs.readlink

    def counted(*args, **kw):
        links[0] += 1
        return readlink(*args, **kw)

    monkeypatch.setattr(procfs, "readlink", counted)
    monkeypatch.setattr(owners, "_clock", lambda: links[0] * 4e-6)
    return links


def test_a_users_fds_are_walked_last_and_what_the_time_left_is_counted(monkeypatch):
    # Root's socket in CLOSE_WAIT, held by this process.
    server, port, mine = close_wait_of_mine()
    hog = subprocess.Popen([*HOG_USER, "/usr/bin/python3", "-c", HOG, str(HOG_PROCESSES),
                            str(PER_PROCESS), str(port)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        said = [hog.stdout.readline().split() for _ in range(HOG_PROCESSES)]
        hogs = {int(pid) for _role, pid in said}
        [holder] = [int(pid) for role, pid in said if role == "holder"]
        theirs, (_addr, their_port) = server.accept()
        theirs.close()
        lines = _close_wait(port)
        # ss sees both in CLOSE_WAIT, and who holds each.
        assert len(lines) == 2, lines
        assert any(f"pid={os.getpid()}," in l for l in lines), lines
        assert any(f"pid={holder}," in l for l in lines), lines
        mine_ep = Endpoints(socket.AF_INET, "127.0.0.1", mine.getsockname()[1],
                            "127.0.0.1", port)
        theirs_ep = Endpoints(socket.AF_INET, "127.0.0.1", their_port, "127.0.0.1", port)
        # Every link read costs 4 us of the walk's clock, and the walk has
        # time for 100,000: everyone else's, not all of the hog's 300,000.
        links = clock_of_links(monkeypatch)
        monkeypatch.setattr(owners, "FD_WALK_BUDGET_S", 0.4)
        order, counts = owners.walk_order("/proc")
        # The hog's fds are the most: walked last, the holder's last of all.
        pids = order[-HOG_PROCESSES:]
        assert set(pids) == hogs and pids[-1] == holder
        assert all(counts[pid] >= PER_PROCESS - 100 for pid in pids)
        assert sum(counts[pid] for pid in order[:-HOG_PROCESSES]) < 50_000
        got = owners.resolve([mine_ep, theirs_ep])
        assert links[0] < 120_000
        assert got[mine_ep].kind == owners.OWNER_FD
        assert [h.pid for h in got[mine_ep].holders] == [os.getpid()]
        n, named = got[mine_ep].fds_not_read
        # Those the 100,000 links had no room for after the rest of the
        # machine's, counted (one either way: the clock is looked at every
        # 1,024 links).
        used, room = sum(counts[pid] for pid in order[:-HOG_PROCESSES]), 0
        for pid in pids:
            if used + counts[pid] > 100_000:
                break
            used, room = used + counts[pid], room + 1
        assert room - 1 <= HOG_PROCESSES - n <= room + 1, (n, room)
        assert named == [f"{pid}/python3" for pid in pids[-n:][:3]]
        # Unknown, not "no holder" (denied where some other process's table
        # may not be read: a sandbox's pid 1, say).
        assert got[theirs_ep].kind == (owners.OWNER_DENIED if got[theirs_ep].denied_processes
                                       else owners.OWNER_FDS_NOT_READ)
        said = diagnosis.gather(got[theirs_ep], machine="x86_64")
        assert said.cause == diagnosis.UNKNOWN
        assert said.summary.endswith(f"the file descriptors of {n} processes ({named[0]}, "
                                     f"{named[1]}, {named[2]} and {n - 3} more) were not read "
                                     f"in time"), said.summary
        assert owners.held_now([got[mine_ep].inode, got[theirs_ep].inode]) == [True, None]
        # Given the time, the walk finds nobody's socket where ss does.
        monkeypatch.setattr(owners, "FD_WALK_BUDGET_S", float("inf"))
        got = owners.resolve([theirs_ep])
        assert [h.pid for h in got[theirs_ep].holders] == [holder]
        assert got[theirs_ep].fds_not_read is None
    finally:
        subprocess.run(["pkill", "-KILL", "-u", HOG_UID], check=False)
        hog.wait()
        for s in (mine, server):
            s.close()


# A process of HOG_UID whose main thread calls pthread_exit() (a zombie
# leader: its own fd directory empty, size 0) while another thread keeps
# its fds.
ZOMBIE_LEADER = r"""
import ctypes, os, resource, sys, threading, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
base = os.open("/dev/null", os.O_RDONLY)
dups = [os.dup(base) for _ in range(int(sys.argv[1]))]
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0))).start()
os.write(1, f"{os.getpid()}\n".encode())
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_zombie_leaders_fds_are_counted_through_its_live_thread():
    """Linux gives an fd directory's size as its count (6.2 on), and a
    zombie leader's is 0 while its live thread holds every fd: such a user
    was counted as holding nothing and walked first, spending the walk's
    time before root's holder (a review, 2026-12-07)."""
    hog = subprocess.Popen([*HOG_USER, "/usr/bin/python3", "-c", ZOMBIE_LEADER,
                            str(PER_PROCESS)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(hog.stdout.readline())
        end = time.monotonic() + 10
        while procfs.read_process(pid, "/proc").state != "Z" and time.monotonic() < end:
            time.sleep(0.05)
        assert procfs.read_process(pid, "/proc").state == "Z"
        assert os.stat(f"/proc/{pid}/fd").st_size == 0
        assert owners._fd_count(pid, "/proc", sized=True) >= PER_PROCESS
    finally:
        subprocess.run(["pkill", "-KILL", "-u", HOG_UID], check=False)
        hog.wait()


# Containers of one user (rootless: each under a subordinate uid of its
# own) and another user's server, each a process holding dup()s of
# /dev/null; the server also a socket it connected, whose peer closes.
SPREAD = r"""
import os, resource, socket, sys
fds, port = int(sys.argv[1]), int(sys.argv[2])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = socket.create_connection(("127.0.0.1", port)) if port else None
base = os.open("/dev/null", os.O_RDONLY)
dups = [os.dup(base) for _ in range(fds)]
os.write(1, f"{os.getpid()}\n".encode())
sys.stdin.read()
"""
LENT_TO = 54400                 # the containers' user (by uid in /etc/subuid)
FIRST_LENT = 300000             # its subordinate uids: 300000-300999
SERVER_UID = 54401
CONTAINERS, CONTAINER_FDS, SERVER_FDS = 20, 2000, 5000


def _as(uid: int, fds: int, port: int = 0) -> subprocess.Popen:
    return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                             "/usr/bin/python3", "-c", SPREAD, str(fds), str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("lent", [True, False])
def test_a_users_containers_under_subordinate_uids_are_walked_as_that_user(
        lent, tmp_path, monkeypatch):
    """20 containers of one user, each under a subordinate uid of its own
    with 2,000 fds, and another user's server with 5,000 holding a socket
    in CLOSE_WAIT. Counted a user each, the containers were walked first,
    and the walk's time ran out before the server's socket (said unknown):
    as /etc/subuid lends those uids to one user (sockets/subids.py), they
    are 40,000 fds of one user, walked after the server, whose holder is
    named. lent=False: the same processes with no /etc/subuid, as before."""
    (tmp_path / "subuid").write_text(f"{LENT_TO}:{FIRST_LENT}:1000\n" if lent else "")
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    monkeypatch.setattr(subids, "SUBUID", str(tmp_path / "subuid"))
    monkeypatch.setattr(subids, "PASSWD", str(tmp_path / "passwd"))
    server, port, mine = close_wait_of_mine()
    started = []
    try:
        started = [_as(FIRST_LENT + i, CONTAINER_FDS) for i in range(CONTAINERS)]
        holder = _as(SERVER_UID, SERVER_FDS, port)
        started.append(holder)
        pids = [int(p.stdout.readline()) for p in started]
        theirs, (_addr, their_port) = server.accept()
        theirs.close()
        lines = _close_wait(port)
        assert any(f"pid={pids[-1]}," in l for l in lines), lines
        theirs_ep = Endpoints(socket.AF_INET, "127.0.0.1", their_port, "127.0.0.1", port)
        clock_of_links(monkeypatch)
        monkeypatch.setattr(owners, "FDS_IN_ANY_ORDER", 1000)
        order, counts = owners.walk_order("/proc")
        # Time for everyone else's fds, the server's and 10,000 more: not
        # for the containers' 40,000 and the server's.
        others = sum(n for pid, n in counts.items() if pid not in pids)
        monkeypatch.setattr(owners, "FD_WALK_BUDGET_S", (others + SERVER_FDS + 10_000) * 4e-6)
        got = owners.resolve([theirs_ep])[theirs_ep]
        if lent:
            assert order.index(pids[-1]) < min(order.index(p) for p in pids[:-1])
            assert [h.pid for h in got.holders] == [pids[-1]]
        else:
            assert order.index(pids[-1]) > max(order.index(p) for p in pids[:-1])
            assert got.holders == () and got.fds_not_read is not None
    finally:
        for uid in [SERVER_UID] + [FIRST_LENT + i for i in range(CONTAINERS)]:
            subprocess.run(["pkill", "-KILL", "-u", str(uid)], check=False)
        for p in started:
            p.wait()
        for s in (mine, server):
            s.close()
