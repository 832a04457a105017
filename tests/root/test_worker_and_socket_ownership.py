"""Root, no kernel: what needs uid 0 itself, or a file another user owns
(which only root can make), from the worker and the metrics socket's
checks. The rest of both is in tests/unit (no root)."""

import os

import pytest

from closewait_trace.output import scrape

pytestmark = pytest.mark.root


def test_the_worker_keeps_the_tracers_capabilities_under_noroot():
    """The unit runs the tracer with SecureBits=noroot-locked: uid 0 gains
    nothing at exec, so a worker started plainly would have no capability
    and could not read other users' processes. It must hold the ones the
    tracer has (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN)."""
    import subprocess
    import sys
    code = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(28, 1, 0, 0, 0) == 0          # PR_SET_SECUREBITS: SECBIT_NOROOT
from closewait_trace.evidence.worker import GatherWorker
g = GatherWorker()
g.call("holder_states", [1], deadline_s=30)
with open(f"/proc/{g._proc.pid}/status") as f:
    print([l.split()[1] for l in f if l.startswith("CapEff:")][0])
g.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    eff = int(out.stdout.strip(), 16)
    for cap in (2, 19, 21):                  # DAC_READ_SEARCH, SYS_PTRACE, SYS_ADMIN
        assert eff >> cap & 1, (hex(eff), cap)


def test_unix_socket_refuses_a_directory_another_user_owns(tmp_path):
    """A directory of another user's (here nobody's, made by root) could
    have its socket swapped: refused like a shared one."""
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(scrape.UnsafePath):
        scrape.listen_unix(str(other / "m.sock"))


# Run as nobody: a file opened 60 directories of 200 characters deep (its
# path, 12,000 characters, is longer than a page: /proc/PID/fd/N cannot be
# read, ENAMETOOLONG), and a socket in CLOSE_WAIT held beside it.
DEEP_HOLDER = r"""
import os, socket, sys, time
os.chdir(sys.argv[1])
for i in range(60):
    name = "d%d" % i + "x" * 198
    os.mkdir(name)
    os.chdir(name)
deep = open("f", "w")
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
client = socket.create_connection(listener.getsockname())
held, _ = listener.accept()
peer = client.getsockname()[1]
client.close()
print(listener.getsockname()[1], peer, flush=True)
time.sleep(120)
"""


def test_a_file_path_too_long_to_read_does_not_hide_a_holder():
    """Review of 2026-12-05: a process with one fd on such a path had none of
    its sockets attributed ("no process holds a file descriptor on it"
    where every process is readable). Named as ss names it."""
    import re
    import socket
    import subprocess
    import time
    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets import owners
    import shutil
    import tempfile
    home = tempfile.mkdtemp(prefix="closewait-deep-")    # pytest's tmp_path: root's only
    os.chown(home, 65534, 65534)
    holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "/usr/bin/python3", "-c", DEEP_HOLDER, home],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().split()
        assert len(line) == 2, holder.wait()
        port, peer = (int(p) for p in line)
        fds = os.listdir(f"/proc/{holder.pid}/fd")
        too_long = 0
        for fd in fds:
            try:
                os.readlink(f"/proc/{holder.pid}/fd/{fd}")
            except OSError as e:
                too_long += e.errno == __import__("errno").ENAMETOOLONG
        assert too_long == 1, fds
        wanted = Endpoints(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", peer,
                           os.stat("/proc/thread-self/ns/net").st_ino)
        deadline = time.monotonic() + 10
        while True:
            got = owners.resolve([wanted])[wanted]
            if got.kind != owners.OWNER_GONE or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got.kind == owners.OWNER_FD, got
        assert [(h.pid, h.uid) for h in got.holders] == [(holder.pid, 65534)]
        ss = subprocess.run(["ss", "-Htnp", "state", "close-wait", f"( sport = :{port} )"],
                            capture_output=True, text=True, check=True).stdout
        assert re.findall(r"pid=(\d+)", ss) == [str(holder.pid)], ss
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(home)


@pytest.mark.parametrize("args, code", [(["snapshot", "--help"], 0), (["snapshot"], 8)])
def test_snapshot_without_a_process_to_spare_is_help_or_one_line(args, code):
    """The entry point starts snapshot's worker before anything else
    (entry.py): when no process can be had (a user at their process limit),
    `--help` is still the help, and the snapshot itself one line, never a
    traceback (a review's finding: BlockingIOError from the entry point)."""
    import resource
    import subprocess
    import sys

    def one_process():
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))

    # nobody (no other process of theirs here), at a limit of one process:
    # the interpreter itself.
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-m", "closewait_trace"] + args,
                         capture_output=True, text=True, timeout=60, preexec_fn=one_process)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == code, out.stderr
    if code == 0:
        assert "Usage: closewait-trace snapshot" in out.stdout
    else:
        [line] = out.stderr.splitlines()
        assert line.startswith("closewait-trace: the sockets and their owners could not be "
                               "read: no worker could be started ("), line
        assert "ulimit -u" in line
