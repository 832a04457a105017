"""One real process per cause; the diagnosis and its evidence are checked."""

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.kernel.harness import stretch
from tests.kernel.harness import (accepted_connection, Tracer, connect_and_close, free_port,
                                  record_row, ss_close_wait, start_holding_server,
                                  state_of, wait_until)

pytestmark = pytest.mark.kernel
SOURCE = os.path.join(os.path.dirname(__file__), "data", "hold_socket.c")


def one_linger(port, procs, workload, threshold="300ms", env=None, extra=(),
               ss_sees_owner=True):
    tracer = Tracer(["-p", str(port), "-t", threshold, *extra], env=env).start()
    procs.append(tracer)
    workload()
    rec = tracer.wait_for(lambda r: r["type"] == "linger", timeout=15)[0]
    if ss_sees_owner:
        assert {record_row(rec)} == ss_close_wait(port)
    else:
        # Same socket, but ss names no process: it reads only /proc/PID/fd.
        assert {record_row(rec)[:2] + ((),)} == ss_close_wait(port)
    # Process-wide evidence comes in `process` records, before the lingers.
    rec["_processes"] = {r["pid"]: r for r in tracer.records
                         if r["type"] == "process" and r["ts"] <= rec["ts"]}
    for holder in rec["owners"]:
        assert holder["pid"] in rec["_processes"]
    return rec


def evidence_holders(rec):
    """The holders the diagnosis names, looked up in `owners` where each is
    written (the evidence refers to them by pid and fd)."""
    by_ref = {(o["pid"], o["fd"]): o for o in rec["owners"]}
    refs = rec["diagnosis"]["evidence"]["holders"]
    assert all((r["pid"], r["fd"]) in by_ref for r in refs), (refs, rec["owners"])
    return [by_ref[(r["pid"], r["fd"])] for r in refs]


def stopped_server_with_connection(port, procs):
    """A server that accepted a connection and was then stopped by SIGSTOP."""
    server = start_holding_server(port)
    procs.append(server)
    client = accepted_connection(port, server)
    os.kill(server.pid, signal.SIGSTOP)
    wait_until(lambda: state_of(server.pid) == "T", what="stopped")
    return server, client


def test_stopped_by_signal(procs):
    port = free_port()
    server, client = stopped_server_with_connection(port, procs)
    rec = one_linger(port, procs, client.close)
    d = rec["diagnosis"]
    assert d["cause"] == "stopped" and f"{server.pid}/python" in d["summary"]
    assert evidence_holders(rec)[0]["state"] == "T"


def test_stopped_under_gdb_names_the_debugger(procs):
    port = free_port()
    server = start_holding_server(port)
    procs.append(server)
    client = accepted_connection(port, server)
    gdb = subprocess.Popen(["gdb", "-q", "-batch", "-p", str(server.pid), "-ex", f"shell sleep {int(stretch(30))}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(gdb)
    wait_until(lambda: state_of(server.pid) == "t", timeout=20, what="traced stop")
    rec = one_linger(port, procs, client.close)
    d = rec["diagnosis"]
    assert d["cause"] == "traced"
    assert f"by {gdb.pid}/gdb" in d["summary"]
    assert evidence_holders(rec)[0]["tracer"] == {"pid": gdb.pid, "comm": "gdb"}


def test_running_under_strace_is_said(procs):
    port = free_port()
    server = start_holding_server(port)
    procs.append(server)
    strace = subprocess.Popen(["strace", "-f", "-o", "/dev/null", "-p", str(server.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(strace)
    wait_until(lambda: f"TracerPid:\t{strace.pid}" in open(f"/proc/{server.pid}/status").read(),
               what="strace attached")
    rec = one_linger(port, procs, lambda: connect_and_close(port, 1, payload=b"x"))
    d = rec["diagnosis"]
    assert d["cause"] == "ignoring_eof"
    assert f"traced by {strace.pid}/strace" in d["summary"]


LEAKING_SERVER = r"""
import os, socket, subprocess, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(8)
print("ready", flush=True)
conn, _ = srv.accept()
# The bug being reproduced: the connection is handed to a helper through
# fork+exec without close-on-exec, and only the server closes its copy.
child = subprocess.Popen(["sleep", "300"], pass_fds=[conn.fileno()])
conn.close()
print(child.pid, flush=True)
child.wait()
"""


def test_leaked_into_a_child_through_exec(procs):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", LEAKING_SERVER, str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(server)
    assert server.stdout.readline().strip() == "ready"
    client = socket.create_connection(("127.0.0.1", port))
    sleep_pid = int(server.stdout.readline())
    rec = one_linger(port, procs, client.close)
    assert [o["pid"] for o in rec["owners"]] == [sleep_pid]
    d = rec["diagnosis"]
    assert d["cause"] == "leaked"
    assert f"{sleep_pid}/sleep" in d["summary"] and f"{server.pid}/python" in d["summary"]
    holder = evidence_holders(rec)[0]
    assert holder["cloexec"] is False and holder["ppid"] == server.pid
    os.kill(sleep_pid, signal.SIGKILL)


def build(tmp_path, name, *flags):
    binary = tmp_path / name
    subprocess.run(["gcc", *flags, "-o", str(binary), SOURCE], check=True)
    return binary


def start_c(binary, port, procs):
    p = subprocess.Popen([str(binary), str(port)], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    return p


def assert_blocked_in_pause(rec, pid, binary_name):
    d = rec["diagnosis"]
    assert d["cause"] == "blocked_elsewhere", d
    assert "pause" in d["summary"] and "hold_socket_forever" in d["summary"], d["summary"]
    thread = rec["_processes"][pid]["threads"][0]
    stack = thread["stack"]
    assert stack[0]["function"] == "pause" and stack[0]["method"] == "pc"
    names = [f["function"] for f in stack]
    assert "hold_socket_forever" in names and "main" in names, stack
    frame = stack[names.index("hold_socket_forever")]
    assert frame["module"].endswith(binary_name)
    assert frame["build_id"]
    return stack


@pytest.mark.parametrize("flags,unwound_by", [
    (("-O2", "-fomit-frame-pointer"), "cfi"),
    (("-O0", "-fno-omit-frame-pointer"), "cfi"),
])
def test_c_program_blocked_in_pause_is_symbolized_and_unwound(tmp_path, procs, flags, unwound_by):
    port = free_port()
    binary = build(tmp_path, "holder", *flags)
    p = start_c(binary, port, procs)
    rec = one_linger(port, procs, lambda: connect_and_close(port, 1))
    stack = assert_blocked_in_pause(rec, p.pid, "holder")
    # The frame above pause comes from .eh_frame, not from guessing.
    assert stack[1]["function"] == "hold_socket_forever" and stack[1]["method"] == unwound_by


def test_stripped_binary_symbolized_through_its_debug_file(tmp_path, procs):
    port = free_port()
    binary = build(tmp_path, "holder", "-O2", "-fomit-frame-pointer")
    debug = tmp_path / "holder.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    out = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True).stdout
    build_id = out.split("Build ID:")[1].split()[0]
    root = tmp_path / "debugroot"
    (root / ".build-id" / build_id[:2]).mkdir(parents=True)
    shutil.copy(debug, root / ".build-id" / build_id[:2] / (build_id[2:] + ".debug"))
    assert "hold_socket_forever" not in subprocess.run(
        ["nm", "-D", str(binary)], capture_output=True, text=True).stdout
    p = start_c(binary, port, procs)
    rec = one_linger(port, procs, lambda: connect_and_close(port, 1),
                     env={"CLOSEWAIT_TRACE_DEBUGINFO": str(root)})
    stack = assert_blocked_in_pause(rec, p.pid, "holder")
    frame = stack[[f["function"] for f in stack].index("hold_socket_forever")]
    assert frame["symbols"] == "debug-file" and frame["build_id"] == build_id


def test_stripped_binary_without_debug_file_shows_module_offsets(tmp_path, procs):
    port = free_port()
    binary = build(tmp_path, "holder", "-O2", "-fomit-frame-pointer")
    subprocess.run(["strip", "--strip-all", str(binary)], check=True)
    start_c(binary, port, procs)
    rec = one_linger(port, procs, lambda: connect_and_close(port, 1))
    d = rec["diagnosis"]
    assert d["cause"] == "blocked_elsewhere" and "pause" in d["summary"]
    stack = rec["_processes"][rec["owners"][0]["pid"]]["threads"][0]["stack"]
    ours = [f for f in stack if f["module"].endswith("/holder")]
    assert ours and all(f["function"] in (None, "_start", "main") or f["symbols"] == "dynsym"
                        for f in ours)


def test_deleted_binary_is_still_symbolized(tmp_path, procs):
    port = free_port()
    binary = build(tmp_path, "holder", "-O2", "-fomit-frame-pointer")
    p = start_c(binary, port, procs)
    os.unlink(binary)
    rec = one_linger(port, procs, lambda: connect_and_close(port, 1))
    assert_blocked_in_pause(rec, p.pid, "holder (deleted)")


def test_diagnosis_is_redone_when_the_holder_changes_state(procs):
    """Reported as stopped; SIGCONT; reported again (CHANGE) as alive."""
    port = free_port()
    server, client = stopped_server_with_connection(port, procs)
    first = one_linger(port, procs, client.close)
    assert first["diagnosis"]["cause"] == "stopped" and first["update"] is False
    tracer = procs[-1]
    os.kill(server.pid, signal.SIGCONT)
    update = tracer.wait_for(lambda r: r["type"] == "linger" and r["update"], timeout=10)[0]
    assert (update["raddr"], update["rport"]) == (first["raddr"], first["rport"])
    assert update["diagnosis"]["cause"] == "ignoring_eof"
    assert update["owners"][0]["state"] == "S"
    summary = tracer.stop()
    assert summary["linger_reported"] == 1 and summary["changes_reported"] == 1


def test_holder_whose_main_thread_exited(tmp_path, procs):
    """The leader is a zombie (Z, PF_EXITING), a worker thread still holds
    the socket; found through the worker's fd table. Not "exiting" (it was
    until 2026-12-07: a review found it said of a process that lives on
    for good): diagnosed by the thread that lives, blocked in pause()."""
    port = free_port()
    binary = tmp_path / "zombie_leader"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(binary),
                    os.path.join(os.path.dirname(__file__), "data", "zombie_leader.c")], check=True)
    p = start_c(binary, port, procs)
    wait_until(lambda: state_of(p.pid) == "Z", what="zombie leader")
    rec = one_linger(port, procs, lambda: connect_and_close(port, 1), ss_sees_owner=False)
    assert [o["pid"] for o in rec["owners"]] == [p.pid]
    d = rec["diagnosis"]
    assert rec["owners"][0]["state"] == "Z"
    assert d["cause"] == "blocked_elsewhere" and "pause" in d["summary"], d
    threads = rec["_processes"][p.pid]["threads"]
    assert any(t["syscall"] == "pause" for t in threads)
