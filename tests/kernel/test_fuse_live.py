"""A user's FUSE server that never answers READ (issue 17 §1): a holder,
running as nobody, maps a file from that mount executable and keeps
pointers into the mapping on its stack while it holds a socket in
CLOSE_WAIT. Reading those pages (the stack scan's look at the code before
a pointer, the symbolizer's open of the file) would wait for the server
forever, in a sleep not even SIGKILL ends. The tracer must not read them
(the mapping's filesystem is fuse), must keep reporting other sockets on
time, and must end within a second of SIGINT; `snapshot -v` must answer."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.kernel.fuse_never_reads import NeverReads
from tests.kernel.harness import TRACER, Tracer, free_port, stretch

pytestmark = pytest.mark.kernel

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def public_dir():
    """A directory nobody can reach (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="closewait-fuse-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fuse(public_dir):
    server = NeverReads(os.path.join(public_dir, "mnt")).start()
    yield server
    server.stop()


@pytest.fixture
def holder_binary(public_dir):
    binary = os.path.join(public_dir, "fuse_holder")
    # No unwind tables: the unwinder steps out of libc's pause() into main
    # and, finding no CFI there, scans the stack, where the pointers are.
    subprocess.run(["gcc", "-O1", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
                    "-o", binary, os.path.join(HERE, "data", "fuse_holder.c")], check=True)
    return binary


def lingering_holder(binary: str, fuse_file: str, procs) -> tuple[int, int]:
    """The holder as nobody, its connection closed by the peer: (pid, port)."""
    port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    holder = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               binary, fuse_file, str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    conn, _ = listener.accept()
    conn.close()                       # the holder's side is now in CLOSE_WAIT
    listener.close()
    return holder.pid, port


def test_snapshot_does_not_read_a_fuse_mapping(fuse, holder_binary, procs):
    pid, port = lingering_holder(holder_binary, fuse.path, procs)
    started = time.monotonic()
    done = subprocess.run(TRACER + ["snapshot", "-v", "--json", "-P", str(port)],
                          capture_output=True, text=True, timeout=stretch(60))
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    recs = [json.loads(l) for l in done.stdout.splitlines()]
    lingers = [r for r in recs if r["type"] == "linger"]
    assert [r["owners"][0]["pid"] for r in lingers] == [pid]
    process = next(r for r in recs if r["type"] == "process" and r["pid"] == pid)
    assert process["threads"][0]["stack"], process       # the stack was read...
    assert fuse.reads == 0                 # nothing ever asked the server for a page
    assert took < stretch(15), took


def test_live_tracer_reports_others_and_stops_promptly(fuse, holder_binary, procs):
    with Tracer(["-t", "1s", "-v"]) as tracer:
        pid, port = lingering_holder(holder_binary, fuse.path, procs)
        # Another user's ordinary socket, after the hostile one.
        other = free_port()
        listener = socket.socket()
        listener.bind(("127.0.0.1", other))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", other))
        conn, _ = listener.accept()
        client.close()                 # conn lingers in CLOSE_WAIT, held by this test
        started = time.monotonic()
        tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == other, timeout=20)
        tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == port, timeout=20)
        took = time.monotonic() - started
        assert took < stretch(10), took
        assert fuse.reads == 0
        sent = time.monotonic()
        summary = tracer.stop(signal.SIGINT, timeout=10)
        assert time.monotonic() - sent < stretch(1.0)
        # The scan met the pointers into the FUSE mapping and left them unread.
        assert summary["symbolizer_problems"].get("not read: on a fuse filesystem"), summary
        conn.close()
        listener.close()


def test_a_command_line_on_fuse_does_not_block_the_owner_scan(fuse, public_dir, procs):
    """A variant: the holder replaces the pages of its own command line with
    a mapping of the FUSE file, so that reading /proc/PID/cmdline (which
    the owner scan does for every holder) would fault them in from the
    server. The kernel reads a command line only from anonymous memory
    (FOLL_ANON): the read stops short, the owner scan answers at once and
    names the holder, and the server sees no READ."""
    binary = os.path.join(public_dir, "fuse_argv_holder")
    subprocess.run(["gcc", "-O1", "-o", binary, os.path.join(HERE, "data", "fuse_argv_holder.c")],
                   check=True)
    port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    holder = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               binary, fuse.path, str(port), "x" * 20000],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    conn, _ = listener.accept()
    conn.close()
    listener.close()
    deadline = time.monotonic() + stretch(10)
    while "code.bin" not in open(f"/proc/{holder.pid}/maps").read():
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    done = subprocess.run(TRACER + ["snapshot", "-v", "--json", "-P", str(port)],
                          capture_output=True, text=True, timeout=stretch(60))
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    lingers = [r for r in map(json.loads, done.stdout.splitlines()) if r["type"] == "linger"]
    assert [h["pid"] for r in lingers for h in r["owners"]] == [holder.pid]
    assert took < stretch(15), took
    assert fuse.reads == 0
