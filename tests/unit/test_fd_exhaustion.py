"""Out of file descriptors is not "gone".

When the tracer has no descriptor left (the scrape endpoint once let a local
user take them all), every open of /proc and every sock_diag socket fails
with EMFILE. The old code read that as an empty /proc, an empty socket
table and an empty fd table: a socket still lingering was reported "no
longer in CLOSE_WAIT". These tests exhaust descriptors for real (a child
process under a lowered RLIMIT_NOFILE, no root needed) and at the system
call over a fake /proc, and want the error said as such."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from closewait_trace.evidence import diagnosis as d
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets import owners, procfs
from tests.unit.fakeproc import FakeProc

EP = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)


@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE])
def test_out_of_descriptors_is_its_own_error(monkeypatch, tmp_path, err):
    def failing(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "open", failing)
    monkeypatch.setattr(os, "listdir", failing)
    for call in (lambda: procfs.read_bytes(f"{tmp_path}/x"),
                 lambda: procfs.listdir(str(tmp_path)),
                 lambda: list(procfs.pids(str(tmp_path))),
                 lambda: procfs.list_dir(str(tmp_path))):
        with pytest.raises(procfs.ResourceExhausted) as raised:
            call()
        assert raised.value.errno == err
        # Not a kind of "gone" or "denied": callers that catch those do not
        # swallow it by accident.
        assert not isinstance(raised.value, (procfs.NoSuchProcess, procfs.AccessDenied))


def exhausted_at(monkeypatch, paths):
    """EMFILE from os.listdir for these paths, as a tracer with no
    descriptor left gets it (listing a directory opens it)."""
    real = os.listdir

    def listdir(path="."):
        if isinstance(path, str) and path in paths:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real(path)
    monkeypatch.setattr(os, "listdir", listdir)


def held_socket(fake):
    fake.process(10)
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=1)
    fake.fd(10, 5, 900)


@pytest.mark.parametrize("where", ["proc", "fd table"])
def test_exhausted_scan_is_unknown_never_gone_nor_unheld(tmp_path, monkeypatch, where):
    fake = FakeProc(tmp_path)
    held_socket(fake)
    exhausted_at(monkeypatch, {fake.root} if where == "proc" else {f"{fake.root}/10/fd"})
    own = owners.resolve([EP], fake.root)[EP]
    diag = d.gather(own, fake.root, machine="x86_64", cache=d.Batch())
    assert own.kind == owners.OWNER_UNREADABLE, own
    assert diag.cause == d.UNKNOWN
    assert "Too many open files" in diag.summary
    assert "no longer in CLOSE_WAIT" not in diag.summary
    assert "no process holds" not in diag.summary
    # Once descriptors are free again, the same socket resolves as before.
    monkeypatch.undo()
    again = owners.resolve([EP], fake.root)[EP]
    assert again.kind == owners.OWNER_FD and [h.pid for h in again.holders] == [10]


# A socket of this process in CLOSE_WAIT (its peer closed), then every
# descriptor the lowered limit allows taken, then owners.resolve on the real
# /proc and sock_diag: what does it say? Then again with them all freed.
REAL_CHILD = r"""
import json, os, resource, socket, sys
from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets import owners
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.close()                                    # conn is now in CLOSE_WAIT
ep = Endpoints(socket.AF_INET, "127.0.0.1", srv.getsockname()[1], "127.0.0.1",
               conn.getpeername()[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
filler = []
while True:
    try:
        filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
starved = owners.resolve([ep])[ep]
for fd in filler:
    os.close(fd)
fed = owners.resolve([ep])[ep]
print(json.dumps({"starved": starved.kind, "error": starved.error, "fed": fed.kind,
                  "holders": [h.pid for h in fed.holders], "me": os.getpid()}))
"""


def test_a_real_socket_under_a_real_fd_limit_is_unreadable_not_gone():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", REAL_CHILD], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["starved"] == owners.OWNER_UNREADABLE, got
    assert "Too many open files" in got["error"]
    assert got["fed"] == owners.OWNER_FD and got["holders"] == [got["me"]], got


def _open_exhausted_under(monkeypatch, prefix):
    real = os.open

    def fake_open(path, *args, **kwargs):
        if isinstance(path, str) and path.startswith(prefix):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", fake_open)


def test_a_holder_read_out_of_descriptors_is_not_read_never_exited(tmp_path, monkeypatch):
    """The holder's threads, out of descriptors: 'not read', never 'exited
    while inspected' (the class of the owner scan's fix, in the evidence)."""
    from closewait_trace.evidence import diagnosis
    from closewait_trace.sockets import owners
    fake = FakeProc(tmp_path / "proc").process(10, comm="srv", state="S")
    fake.fd(10, 4, 7).tcp(10, socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 5000, 8, 7)
    wanted = Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 5000)
    own = owners.resolve([wanted], fake.root)[wanted]
    _open_exhausted_under(monkeypatch, f"{fake.root}/10")
    found = diagnosis.gather(own, fake.root)
    monkeypatch.undo()
    assert "exited" not in found.summary, found.summary
    assert "not read: out of file descriptors" in found.summary, found.summary


def test_holder_states_out_of_descriptors_fail_never_say_gone(tmp_path, monkeypatch):
    from closewait_trace.evidence import gathering
    fake = FakeProc(tmp_path / "proc").process(10, comm="srv", state="S")
    _open_exhausted_under(monkeypatch, f"{fake.root}/10")
    with pytest.raises(procfs.ResourceExhausted):
        gathering.holder_states([10], fake.root)
