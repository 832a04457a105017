"""Python frames of a CPython holder's threads (issue 18 §2): a real Python
3.11 program whose worker thread is stuck while its connection lingers is
named by the worker's function and file:line, in the diagnosis, the process
record, `-v`, the recording and its replay; a holder that corrupts its own
interpreter structures (a frame chain of 100,000 frames, a loop of thread
states, names that are not strings) is read within bounds, and the tracer
goes on reporting."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.kernel.harness import (TRACER, Tracer, free_port, record_row, ss_close_wait,
                                  stretch)

pytestmark = pytest.mark.kernel

# The holder: accepts one connection, hands it to a worker thread that gets
# stuck in process_batch (a lock nobody releases) without reading; the main
# thread waits for the worker. What the test then breaks, if anything, runs
# in the worker just before it blocks (CORRUPT).
WORKER = """\
import ctypes, socket, sys, threading

stuck = threading.Lock()
stuck.acquire()


def process_batch(conn):
    corrupt()
    stuck.acquire()                       # STUCK HERE


def corrupt():
    pass
{corrupt}

l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", {port}))
l.listen(16)
print("ready", flush=True)
conn, _ = l.accept()
worker = threading.Thread(target=process_batch, args=(conn,), name="worker")
worker.start()
worker.join()
"""

# Ways a holder can break what the tracer reads (offsets: CPython 3.11).
CORRUPTIONS = {
    # The frame's caller is a chain of 100,000 fake frames, each naming a real
    # code object: the walk stops at its bound.
    "endless_frame_chain": """
def corrupt():
    f = sys._getframe(1)                                  # process_batch's frame object
    me = ctypes.c_void_p.from_address(id(f) + 24).value   # its _PyInterpreterFrame
    n = 100_000
    global chain
    chain = (ctypes.c_char * (72 * n))()
    base = ctypes.addressof(chain)
    code = id(process_batch.__code__)
    for i in range(n):
        at = base + 72 * i
        ctypes.c_void_p.from_address(at + 32).value = code
        ctypes.c_void_p.from_address(at + 48).value = at + 72 if i + 1 < n else None
        ctypes.c_void_p.from_address(at + 56).value = code + 184
    ctypes.c_void_p.from_address(me + 48).value = base
""",
    # The worker's thread state lists itself as the next one.
    "thread_state_loop": """
def corrupt():
    ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
    me = ctypes.pythonapi.PyThreadState_Get()
    ctypes.c_void_p.from_address(me + 8).value = me
""",
    # process_batch's name and file are an int and a pointer into nowhere.
    "names_not_strings": """
def corrupt():
    code = id(process_batch.__code__)
    ctypes.c_void_p.from_address(code + 128).value = id(12345)
    ctypes.c_void_p.from_address(code + 112).value = 0x4141414141
""",
}


def start_holder(procs, tmp_path, port, corrupt=""):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(port=port, corrupt=textwrap.dedent(corrupt)))
    holder = subprocess.Popen(["/usr/bin/python3.11", str(script)], stdout=subprocess.PIPE,
                              text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    return holder, str(script)


def line_of(path, marker):
    with open(path) as f:
        return next(i for i, line in enumerate(f, 1) if marker in line)


def linger_of(tracer, port, timeout=30):
    return tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port,
                           timeout=timeout)[0]


def close_one(port):
    c = socket.create_connection(("127.0.0.1", port))
    c.close()


def test_a_stuck_python_worker_is_named_by_its_function_and_line(procs, tmp_path):
    port = free_port()
    holder, script = start_holder(procs, tmp_path, port)
    recording = str(tmp_path / "rec.jsonl")
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-w", recording])
    procs.append(tracer)
    tracer.start()
    close_one(port)
    rec = linger_of(tracer, port)
    assert {record_row(rec)} == ss_close_wait(port)
    stuck = line_of(script, "# STUCK HERE")
    d = rec["diagnosis"]
    # Both threads wait in futex; the worker, stuck in its own code, is named
    # (the main thread waits inside threading.py's join).
    assert d["cause"] == "blocked_elsewhere", d
    assert f"blocked in futex at process_batch (worker.py:{stuck})" in d["summary"], d
    process = [r for r in tracer.of("process") if r["pid"] == holder.pid][0]
    by_tid = {t["tid"]: t for t in process["threads"]}
    worker_tid = next(t for t in by_tid if t != holder.pid)
    assert by_tid[worker_tid]["python"][0] == {"function": "process_batch", "file": script,
                                               "line": stuck}
    assert [f["function"] for f in by_tid[worker_tid]["python"][1:]] == [
        "Thread.run", "Thread._bootstrap_inner", "Thread._bootstrap"]
    main = [f["function"] for f in by_tid[holder.pid]["python"]]
    assert main[-1] == "<module>" and "Thread.join" in main, main
    assert "python_not_read" not in process
    tracer.stop()
    # The recording keeps them; replay -v shows them, one line each, in 80 columns.
    replay = subprocess.run(TRACER + ["-r", recording, "-v"], capture_output=True, text=True,
                            timeout=stretch(60))
    assert replay.returncode == 0, replay.stderr
    shown = [l.strip() for l in replay.stdout.splitlines() if l.lstrip().startswith("py ")]
    # The file's path is cut from the left to fit 80 columns, never its line.
    assert any(l.startswith("py process_batch (") and l.endswith(f"/worker.py:{stuck})")
               for l in shown), replay.stdout
    assert all(len(l) <= 80 for l in replay.stdout.splitlines() if "py " in l), shown
    assert f"at process_batch (worker.py:{stuck})" in replay.stdout


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_holder_that_corrupts_its_interpreter_is_read_within_bounds(procs, tmp_path,
                                                                     corruption):
    port = free_port()
    holder, script = start_holder(procs, tmp_path, port, CORRUPTIONS[corruption])
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    close_one(port)
    started = time.monotonic()
    rec = linger_of(tracer, port)
    assert holder.poll() is None, "the holder itself died of its corruption"
    process = [r for r in tracer.of("process") if r["pid"] == holder.pid][0]
    frames = {t["tid"]: t.get("python") or [] for t in process["threads"]}
    worker = next(t for t in frames if t != holder.pid)
    if corruption == "endless_frame_chain":
        assert len(frames[worker]) == 32, frames[worker][:3]         # MAX_FRAMES
        assert all(f["function"] == "process_batch" for f in frames[worker])
    elif corruption == "thread_state_loop":
        # The worker's state is the list's head and loops on itself: the
        # main thread's state, behind it, is never reached.
        assert frames[worker][0]["function"] == "process_batch"
        assert frames[holder.pid] == []
    else:
        assert frames[worker] == [], frames[worker]                   # not believed
    assert rec["diagnosis"]["cause"] == "blocked_elsewhere"
    # And the tracer goes on: a second socket (left in the accept queue) is
    # reported as well, and the run ends cleanly (stop() checks exit 0, no
    # traceback).
    second = socket.create_connection(("127.0.0.1", port))
    rport = second.getsockname()[1]
    second.close()
    tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == rport, timeout=30)
    assert time.monotonic() - started < stretch(20)
    tracer.stop()
