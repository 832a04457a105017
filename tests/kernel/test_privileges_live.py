"""The tracer as uid 0 with a reduced capability set (a service unit with
CAP_BPF and CAP_PERFMON only): what it may not read is said, never turned
into "no process holds it". And a holder that exits in the middle of the
owner scan is a missing row, not a crash."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from closewait_trace.sockets import owners, procfs
from closewait_trace.kernel.events import Endpoints
from tests.kernel.harness import PERF_RESTRICTED, stretch
from tests.kernel.harness import (accepted_connection, closed_connections_in_netns, HOLDING_SERVER, TRACER, Tracer,
                                  free_port, ss_close_wait, wait_until)

pytestmark = pytest.mark.kernel

BPF_ONLY = "-all,+bpf,+perfmon"
# Where perf events are restricted (harness.PERF_RESTRICTED) the smallest set
# that traces at all has CAP_SYS_ADMIN (found in the kernel matrix, on Debian
# 12's own kernels).
TRACE_ONLY = BPF_ONLY + (",+sys_admin" if PERF_RESTRICTED else "")
# Everything the owner lookup and the diagnosis need besides BPF.
OWNERS_TOO = BPF_ONLY + ",+sys_ptrace,+dac_read_search,+sys_admin"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def reduced(caps):
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}",
            f"--ambient-caps={caps}"]


class ReducedTracer(Tracer):
    """The real tracer, run as uid 0 with only the capabilities in caps."""

    def __init__(self, args, caps):
        super().__init__(args, command=reduced(caps) + TRACER)
        self.caps = caps


def holding_server(port, as_nobody):
    # /usr/bin/python3: the worktree's venv may not be readable by nobody.
    cmd = ["/usr/bin/python3", "-c", HOLDING_SERVER, "4", str(port)]
    p = subprocess.Popen((NOBODY if as_nobody else []) + cmd, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("as_nobody", [True, False], ids=["holder-nobody", "holder-root"])
def test_denied_holders_are_unknown_not_unheld(procs, as_nobody):
    port = free_port()
    tracer = ReducedTracer(["-p", str(port), "-t", "300ms"], TRACE_ONLY).start()
    procs.append(tracer)
    server = holding_server(port, as_nobody)
    procs.append(server)
    accepted_connection(port, server).close()
    rec = tracer.wait_for(lambda r: r["type"] == "linger", timeout=20)[0]
    # The socket is held (ss, with every capability, names the holder)...
    assert any(server.pid in pids for _l, _r, pids in ss_close_wait(port))
    # ...but the reduced tracer could not see it: it says so.
    summary = rec["diagnosis"]["summary"]
    assert "no process holds" not in summary
    assert rec["owner_kind"] == "denied" and rec["owners"] == []
    assert rec["diagnosis"]["cause"] == "unknown"
    m = re.fullmatch(r"unknown: permission denied reading (\d+) process(es)?' file descriptors",
                     summary)
    assert m and int(m.group(1)) >= 1, summary
    assert rec["diagnosis"]["evidence"]["denied_processes"] == int(m.group(1))
    tracer.stop()
    warnings = [l for l in tracer.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 1, tracer.stderr
    assert warnings[0].startswith("closewait-trace: warning: missing CAP_SYS_PTRACE: ")
    assert "missing CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE" in warnings[0]


def test_owners_capabilities_are_enough(procs):
    """The minimal set for owners and diagnosis: BPF + PERFMON + SYS_PTRACE +
    DAC_READ_SEARCH (+ SYS_ADMIN for sock_diag in other namespaces): the
    unprivileged holder is named, its thread read, and nothing is warned."""
    port = free_port()
    tracer = ReducedTracer(["-p", str(port), "-t", "300ms"], OWNERS_TOO).start()
    procs.append(tracer)
    server = holding_server(port, as_nobody=True)
    procs.append(server)
    accepted_connection(port, server).close()
    rec = tracer.wait_for(lambda r: r["type"] == "linger", timeout=20)[0]
    assert rec["owner_kind"] == "fd" and [o["pid"] for o in rec["owners"]] == [server.pid]
    assert rec["diagnosis"]["cause"] == "ignoring_eof", rec["diagnosis"]
    # Whatever full root cannot read either (in a sandbox, its init) may
    # still be denied; nothing more.
    denied = rec["diagnosis"]["evidence"].get("denied_processes", 0)
    assert denied <= len(unreadable_even_to_us()), rec["diagnosis"]
    process = [r for r in tracer.records if r["type"] == "process" and r["pid"] == server.pid]
    assert process and process[0]["threads"] and "unreadable" not in process[0]
    # Its stack was read from /proc/PID/mem and unwound: diagnosis with
    # stacks needs nothing more either.
    main = process[0]["threads"][0]
    assert main["syscall"] in ("accept", "accept4") and main["stack"], main
    tracer.stop()
    assert "warning" not in tracer.stderr, tracer.stderr


def unreadable_even_to_us() -> set[int]:
    """Processes whose fds this test, with every capability it has, may not
    read (in a sandbox, an init holding capabilities we lack)."""
    denied = set()
    for pid in procfs.pids():
        try:
            fd_dir, names = owners._fd_table(pid, procfs.PROC)
            for name in names:
                procfs.readlink(f"{fd_dir}/{name}")
        except procfs.AccessDenied:
            denied.add(pid)
        except procfs.ProcError:
            pass
    return denied


FORK_AND_HOLD = r"""
import os, socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(8)
print("ready", flush=True)
conn, _ = srv.accept()
child = os.fork()
if child == 0:
    time.sleep(3600); os._exit(0)
print(child, conn.fileno(), flush=True)
time.sleep(3600)
"""


def test_holder_exiting_between_fd_scan_and_stat_read_is_a_missing_row(procs, monkeypatch):
    """Real processes, real /proc: the socket is held by a parent and its
    forked child; the child is killed (and reaped by the kernel's init path)
    right after the scan reads its fd link. The resolve names the parent
    only, and does not crash."""
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(parent)
    assert parent.stdout.readline().strip() == "ready"
    client = socket.create_connection(("127.0.0.1", port))
    child, fd = map(int, parent.stdout.readline().split())
    client.close()
    wait_until(lambda: ss_close_wait(port), what="close-wait")
    ((local, remote, pids),) = ss_close_wait(port)
    assert set(pids) == {parent.pid, child}
    wanted = Endpoints(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", int(remote.rsplit(":", 1)[1]))

    real = os.readlink
    killed = []

    def read_as_path(path, dir_fd=None):
        # The scan reads each link relative to the open fd directory.
        if dir_fd is None:
            return path
        return f"{real(f'/proc/self/fd/{dir_fd}')}/{path}"

    def racing(path, *args, **kwargs):
        value = real(path, *args, **kwargs)
        if read_as_path(path, kwargs.get("dir_fd")) == f"/proc/{child}/fd/{fd}" and not killed:
            killed.append(True)
            os.kill(child, signal.SIGKILL)
            # Gone from /proc as a process that can hold fds: a zombie has
            # none, and its parent reaps nothing (it sleeps) -- wait for that.
            wait_until(lambda: not os.path.exists(f"/proc/{child}/fd/{fd}"),
                       what="child's fd gone")
        return value

    monkeypatch.setattr(os, "readlink", racing)
    got = owners.resolve([wanted])[wanted]
    assert killed, "the scan never read the child's fd"
    assert got.kind == owners.OWNER_FD
    assert [h.pid for h in got.holders] == [parent.pid]


@pytest.mark.parametrize("caps", [OWNERS_TOO, OWNERS_TOO.replace(",+sys_admin", ""), BPF_ONLY],
                         ids=["owners-caps", "no-sys-admin", "bpf-only"])
def test_other_network_namespace_with_reduced_capabilities(procs, caps):
    """Without CAP_SYS_ADMIN another namespace is still read (from
    /proc/PID/net/tcp); without CAP_SYS_PTRACE it cannot even be found, and
    the socket is unknown, not gone."""
    ns = f"cwt-priv-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        port = free_port()
        if PERF_RESTRICTED and "+sys_admin" not in caps:
            # This kernel does not let it attach: one line that says why and
            # what to do, exit 3, before anything is traced.
            out = subprocess.run(reduced(caps) + TRACER + ["-p", str(port), "-t", "300ms"],
                                 capture_output=True, text=True, timeout=stretch(600))
            assert out.returncode == 3, out.stderr
            assert "Traceback" not in out.stderr
            [line] = [l for l in out.stderr.splitlines() if "warning" not in l]
            assert "kernel.perf_event_paranoid=" in line and "needs CAP_SYS_ADMIN" in line, line
            return
        tracer = ReducedTracer(["-p", str(port), "-t", "300ms"], caps).start()
        procs.append(tracer)
        server = closed_connections_in_netns(ns, port, procs)
        rec = tracer.wait_for(lambda r: r["type"] == "linger", timeout=20)[0]
        ns_ino = os.stat(f"/run/netns/{ns}").st_ino
        summary = rec["diagnosis"]["summary"]
        if caps == BPF_ONLY:
            assert rec["owner_kind"] == "denied" and rec["diagnosis"]["cause"] == "unknown"
            assert "no longer in CLOSE_WAIT" not in summary
            assert re.fullmatch(r"unknown: not found in the network namespaces we may read; "
                                r"permission denied reading \d+ process(es)?' namespaces",
                                summary), summary
        else:
            assert rec["netns"] == ns_ino
            assert rec["owner_kind"] == "fd" and [o["pid"] for o in rec["owners"]] == [server.pid]
            assert rec["diagnosis"]["cause"] == "ignoring_eof", summary
        tracer.stop()
        warning = [l for l in tracer.stderr.splitlines() if "warning" in l]
        if caps == OWNERS_TOO:
            assert warning == [], tracer.stderr
        else:
            assert len(warning) == 1 and "missing CAP_SYS_ADMIN" in warning[0], tracer.stderr
            assert ("CAP_SYS_PTRACE" in warning[0]) == (caps == BPF_ONLY)
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_without_bpf_capabilities_it_says_which_before_loading():
    """Root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN: one line naming
    them, exit 3, before any kernel program is loaded (it used to blame the
    kernel or root: 'could not open bpf map ... check that you are root')."""
    import subprocess
    import sys
    res = subprocess.run(["setpriv", "--bounding-set=-bpf,-perfmon,-sys_admin",
                          "--inh-caps=-bpf,-perfmon,-sys_admin",
                          sys.executable, "-m", "closewait_trace", "-p", "1"],
                         capture_output=True, text=True, timeout=stretch(60))
    assert res.returncode == 3, res
    assert res.stderr.count("\n") == 1 and "CAP_BPF and CAP_PERFMON" in res.stderr, res.stderr
