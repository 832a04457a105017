"""`closewait-trace snapshot` over the machine's real /proc, as root: the
notice that no process matches a holder filter, which, run by another
user, says "no process visible to you" instead (their processes hidden).
The pure parts and the crafted trees are in tests/unit/test_snapshot.py."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root


def test_a_holder_filter_no_process_matches_is_said_in_one_line():
    # A typo (--unit ngnix) or a service that is not running would give an
    # empty list that reads as good news; real processes here.
    me = str(os.getpid())
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot",
                          "--unit", "no-such-unit-here", "--pid", me, "--comm", "no\x1bsuch"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    notice = [l for l in out.stderr.splitlines() if "no process matches" in l]
    assert notice == ["closewait-trace: notice: no process matches --comm no\\x1bsuch, "
                      "--unit no-such-unit-here now; no socket this snapshot shows is theirs"]
    mine = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "--pid", me],
                          capture_output=True, text=True, timeout=60)
    assert mine.returncode == 0 and "no process matches" not in mine.stderr, mine.stderr


def test_the_notice_compares_names_as_the_owners_are_read(tmp_path):
    # The name of a holder comes from /proc/PID/stat; a name ending in a
    # newline must not be matched by the same name without it, or the other
    # way round (the notice would then be false).
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, time; libc = ctypes.CDLL(None); "
        "libc.prctl(15, b'cwnotice\\n', 0, 0, 0); "
        f"open({str(ready)!r}, 'w').close(); time.sleep(60)")])
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.05)
        def notice(*args):
            return subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", *args],
                                  capture_output=True, text=True, timeout=60).stderr
        # --comm is a prefix: the name with its newline matches, and the
        # notice shows the name as read (escaped), so nobody is misled.
        said = notice("--comm", "cwnotice")
        assert "no process matches" not in said
        assert "--comm cwnotice matches cwnotice\\n now" in said, said
        assert "no process matches" not in notice("--comm", "cwnotice\n")
        assert "no process matches --comm cwnoticeX" in notice("--comm", "cwnoticeX")
    finally:
        child.kill()
        child.wait()


def snapshot_linger_line(port: int) -> str:
    """The one linger line of `snapshot --json -p PORT`."""
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "--json",
                          "-p", str(port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [line] = [l for l in out.stdout.splitlines() if l.startswith('{"type": "linger"')]
    return line


DUP_LISTENER = r"""
import os, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(16)
dups = [os.dup(l.fileno()) for _ in range(3000)]
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
extra = [os.dup(c.fileno()) for _ in range(9)]
print("accepted", flush=True)
time.sleep(120)
"""


def test_a_listener_duped_3000_times_is_listed_in_part_and_counted():
    """A real process dup()s its listener 3,000 times and the accepted
    socket 9 times, and keeps the socket in CLOSE_WAIT: the snapshot's
    record lists 4 of each (the lowest fds) and counts the rest, instead
    of 3,001 listener entries in every record of every such socket."""
    holder = subprocess.Popen([sys.executable, "-c", DUP_LISTENER], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(holder.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port))
        assert holder.stdout.readline().strip() == "accepted"
        client.close()
        for _ in range(100):
            ss = subprocess.run(["ss", "-tanH", "state", "close-wait", f"sport = :{port}"],
                                capture_output=True, text=True).stdout
            if ss.strip():
                break
            time.sleep(0.05)
        assert len(ss.strip().splitlines()) == 1, ss
        line = snapshot_linger_line(port)
        rec = json.loads(line)
        assert [o["pid"] for o in rec["owners"]] == [holder.pid] * 4
        assert rec["owners_not_listed"] == 10 - 4
        assert [o["pid"] for o in rec["listener"]["owners"]] == [holder.pid] * 4
        assert rec["listener"]["owners_not_listed"] == 3001 - 4
        assert len(line) < 10_000
        assert rec["diagnosis"]["cause"] != "leaked"
    finally:
        holder.kill()
        holder.wait()


SERVER_CLOSES_ITS_LISTENER = r"""
import os, socket, sys, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0))
l.listen(8)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
os.set_inheritable(c.fileno(), True)    # as C's accept() gives it
l.close()                               # draining before a restart
print("holding", flush=True)
time.sleep(120)
"""

SQUAT = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
time.sleep(120)
"""


def test_another_users_listener_on_a_closed_servers_port_is_not_its_source():
    """root's server accepted a connection (no close-on-exec) and closed its
    listener; nobody then listens on the freed port, on the wildcard. The
    socket was said "inherited by <root's server> ... from <nobody's
    process>", a false cause naming another user's process. An accepted
    socket has its listener's uid (sock_diag's): nobody's is not its own."""
    server = subprocess.Popen([sys.executable, "-c", SERVER_CLOSES_ITS_LISTENER],
                              stdout=subprocess.PIPE, text=True)
    squat = None
    try:
        port = int(server.stdout.readline())
        client = socket.create_connection(("127.0.0.1", port))
        assert server.stdout.readline().strip() == "holding"
        client.close()
        squat = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534",
                                  "--clear-groups", "/usr/bin/python3", "-c", SQUAT,
                                  str(port)], stdout=subprocess.PIPE, text=True)
        assert squat.stdout.readline().strip() == "listening"
        ss = subprocess.run(["ss", "-tanH", "state", "listening", f"sport = :{port}"],
                            capture_output=True, text=True).stdout
        assert len(ss.strip().splitlines()) == 1, ss
        line = snapshot_linger_line(port)
        rec = json.loads(line)
        assert [o["pid"] for o in rec["owners"]] == [server.pid]
        assert rec["listener"] is None, rec["listener"]
        assert "inherited" not in rec["diagnosis"]["summary"], rec["diagnosis"]
        assert str(squat.pid) not in rec["diagnosis"]["summary"]
    finally:
        for p in (squat, server):
            if p is not None:
                p.kill()
                p.wait()
