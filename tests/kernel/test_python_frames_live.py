"""Python frames of a CPython holder's threads (issue 18 §2): a real Python
3.11 program whose worker thread is stuck while its connection lingers is
named by the worker's function and file:line, in the diagnosis, the process
record, `-v`, the recording and its replay; a holder that corrupts its own
interpreter structures (a frame chain of 100,000 frames, a loop of thread
states, names that are not strings) is read within bounds, and the tracer
goes on reporting."""

import socket
import subprocess
import textwrap
import time

import pytest

from tests.kernel import bpfmaps
from tests.kernel.harness import (TRACER, Tracer, free_port, python_server, record_row,
                                  ss_close_wait, start_ready, stretch)

pytestmark = pytest.mark.kernel
PYTHON = "/usr/bin/python3.11"       # the version whose frame layout the tracer knows

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
    holder = python_server(procs, port, WORKER.format(corrupt=textwrap.dedent(corrupt)),
                           python=PYTHON, script=script)
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


# A server whose handler reads the request to its end and returns to the
# accept loop without closing: by the time anyone looks, no thread is in
# handle_request any more. Only the kernel, at the read, sees its frames.
EOF_SERVER = """\
kept = []


class Api:
    def handle_request(self, conn):
        while conn.recv(100):             # READS EOF
            pass
        kept.append(conn)                 # and never closes it


api = Api()
while True:
    conn, _ = l.accept()
    api.handle_request(conn)
"""


def start_eof_server(procs, tmp_path, port):
    script = tmp_path / "server.py"
    server = python_server(procs, port, EOF_SERVER, python=PYTHON, script=script)
    return server, str(script)


def send_and_close(port):
    """The client's port, after it sent a request and closed."""
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"request")
    mine = c.getsockname()[1]
    c.close()
    return mine


def test_a_python_handler_that_read_eof_and_returned_is_named(procs, tmp_path):
    """The server runs before the trace: found at start, its first EOF read
    carries its Python frames, copied by the kernel at the read."""
    port = free_port()
    server, script = start_eof_server(procs, tmp_path, port)
    recording = str(tmp_path / "rec.jsonl")
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-w", recording])
    procs.append(tracer)
    tracer.start()
    send_and_close(port)
    rec = linger_of(tracer, port)
    assert {record_row(rec)} == ss_close_wait(port)
    line = line_of(script, "# READS EOF")
    read = rec["code"]["eof_read"]
    assert read["pid"] == server.pid
    assert read.get("python") == [
        {"function": "Api.handle_request", "file": script, "line": line},
        {"function": "<module>", "file": script, "line": line_of(script, "api.handle_request(")}], \
        {k: v for k, v in read.items() if k != "stack"}
    assert (read["place"]["function"], read["place"]["line"]) == ("Api.handle_request", line)
    d = rec["diagnosis"]
    assert d["cause"] == "ignoring_eof"
    assert f"read EOF in Api.handle_request (server.py:{line}) and never closed" in d["summary"]
    # The server is back in accept(): no thread is in handle_request now.
    process = [r for r in tracer.of("process") if r["pid"] == server.pid][0]
    now = [f["function"] for t in process["threads"] for f in t.get("python", [])]
    assert "Api.handle_request" not in now and "<module>" in now, now
    tracer.stop()
    replay = subprocess.run(TRACER + ["-r", recording, "-v"], capture_output=True, text=True,
                            timeout=stretch(60))
    assert replay.returncode == 0, replay.stderr
    assert f"read EOF in Api.handle_request (server.py:{line})" in replay.stdout
    assert any(l.strip().startswith("py Api.handle_request (") for l in
               replay.stdout.splitlines()), replay.stdout
    report = subprocess.run(TRACER + ["report", "--by", "code", recording], capture_output=True,
                            text=True, timeout=stretch(60))
    assert report.returncode == 0, report.stderr
    table = report.stdout.split("By code location", 1)[1].split("\n\n", 1)[0]
    rows = [l for l in table.splitlines()
            if l.startswith(f"  Api.handle_request (server.py:{line})")]
    assert len(rows) == 1 and "ignoring_eof" in rows[0], report.stdout


def named_at_its_read(tracer, rport: int, script: str) -> dict:
    """The linger record of the client port's socket, its EOF read named by
    EOF_SERVER's handler and line."""
    rec = tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == rport,
                          timeout=30)[0]
    read = rec["code"]["eof_read"]
    assert read["python"][0]["function"] == "Api.handle_request", read
    assert read["python"][0]["line"] == line_of(script, "# READS EOF")
    return rec


def registered(pid: int, map_name: str = "cw_py") -> None:
    """Waits until the tracer's kernel map holds pid."""
    deadline = time.monotonic() + stretch(15)
    while pid not in bpfmaps.u32_keys(map_name):
        assert time.monotonic() < deadline, f"{pid} never in {map_name}"
        time.sleep(0.05)


def test_a_python_server_started_after_the_trace_is_named_from_its_first_socket(
        procs, tmp_path):
    """A CPython program exec()ed after the trace is looked at within a tick
    of its exec (the kernel's cw_exec_new) and registered: its first EOF
    read already carries its Python frames. (Before, only the reads after
    its first lingering socket was diagnosed did.) The test waits for the
    registration in the kernel's own map, not for a time."""
    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-i", "100ms"])
    procs.append(tracer)
    tracer.start()
    server, script = start_eof_server(procs, tmp_path, port)
    registered(server.pid)
    rec = named_at_its_read(tracer, send_and_close(port), script)
    assert rec["diagnosis"]["summary"].startswith(
        f"read EOF in Api.handle_request (server.py:{line_of(script, '# READS EOF')})"), \
        rec["diagnosis"]["summary"]
    tracer.stop()


# The same server, its accept loop in a child it forks when told (as a
# pre-fork server's master forks its workers).
FORKING_EOF_SERVER = """\
sys.stdin.readline()
child = os.fork()
if child:
    print(child, flush=True)
    os.wait()
    raise SystemExit
""" + EOF_SERVER


def test_a_python_worker_forked_by_a_registered_server_is_named_from_its_first_socket(
        procs, tmp_path):
    """A fork runs the same program at the same addresses: the kernel gives
    the child its parent's entry (cw_py_forked) at the fork, and the
    child's first EOF read carries its frames. (Before, a pre-fork server's
    workers were known only once their first lingering socket was
    diagnosed.)"""
    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-i", "100ms"])
    procs.append(tracer)
    tracer.start()
    script = tmp_path / "server.py"
    server = python_server(procs, port, FORKING_EOF_SERVER, python=PYTHON, script=script,
                           stdin=subprocess.PIPE)
    registered(server.pid)
    server.stdin.write("fork\n")
    server.stdin.flush()
    child = int(server.stdout.readline())
    registered(child, "cw_py_forked")
    rec = named_at_its_read(tracer, send_and_close(port), str(script))
    assert rec["code"]["eof_read"]["pid"] == child
    tracer.stop()


# A program embedding the interpreter (libpython3.11.so), not named
# python3.X: not looked at when it exec()s, known to be CPython once its
# first lingering socket is diagnosed (its libpython mapping).
EMBEDDER = """\
#include <Python.h>
int main(int argc, char **argv) { return Py_BytesMain(argc, argv); }
"""


def test_an_embedded_interpreter_is_named_from_its_second_socket(procs, tmp_path):
    """Not known to be CPython at its first EOF read: the record says why
    it has no Python frames; once reported, the process is known (its
    libpython mapping), and its next socket is named."""
    source = tmp_path / "embed.c"
    source.write_text(EMBEDDER)
    binary = tmp_path / "embedded_server"
    subprocess.run(["gcc", "-I/usr/include/python3.11", "-o", str(binary), str(source),
                    "-lpython3.11"], check=True)
    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    script = tmp_path / "server.py"
    python_server(procs, port, EOF_SERVER, python=str(binary), script=script)
    first = send_and_close(port)
    rec = tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == first,
                          timeout=30)[0]
    read = rec["code"]["eof_read"]
    assert "python" not in read and read["place"]["method"] != "python", read["place"]
    assert read["python_not_read"].startswith("not copied: the process was not yet known")
    named_at_its_read(tracer, send_and_close(port), str(script))
    tracer.stop()


# A server whose handler corrupts what the kernel copies at its EOF read,
# and survives it: the fake caller chain is put back before it returns.
CORRUPT_READER = """\
import ctypes
kept = []
chain = None


def handle_request(conn):
    me = ctypes.c_void_p.from_address(id(sys._getframe()) + 24).value
    saved = ctypes.c_void_p.from_address(me + 48).value
    {corrupt}
    while conn.recv(100):
        pass
    ctypes.c_void_p.from_address(me + 48).value = saved
    kept.append(conn)


while True:
    conn, _ = l.accept()
    handle_request(conn)
"""
READER_CORRUPTIONS = {
    # handle_request's caller becomes a chain of 100,000 fake frames, each
    # naming handle_request's own code.
    "endless_frame_chain": """global chain
    n, code = 100_000, id(handle_request.__code__)
    chain = (ctypes.c_char * (72 * n))()
    base = ctypes.addressof(chain)
    for i in range(n):
        at = base + 72 * i
        ctypes.c_void_p.from_address(at + 32).value = code
        ctypes.c_void_p.from_address(at + 48).value = at + 72 if i + 1 < n else None
        ctypes.c_void_p.from_address(at + 56).value = code + 184
    ctypes.c_void_p.from_address(me + 48).value = base""",
    # Its code object's name and file stop being strings (for good).
    "names_not_strings": """code = id(handle_request.__code__)
    ctypes.c_void_p.from_address(code + 128).value = id(12345)
    ctypes.c_void_p.from_address(code + 112).value = 0x4141414141""",
}


@pytest.mark.parametrize("corruption", sorted(READER_CORRUPTIONS))
def test_a_python_reader_that_corrupts_its_frames_is_copied_within_bounds(procs, tmp_path,
                                                                         corruption):
    """What the kernel copies at the read is the process's own memory: a
    fake chain of 100,000 frames is cut at 16 in the kernel; code objects
    that are not (names that are not strings) are not believed in user
    space, and the record says so."""
    port = free_port()
    server = python_server(procs, port,
                           CORRUPT_READER.format(corrupt=READER_CORRUPTIONS[corruption]),
                           python=PYTHON, script=tmp_path / "server.py")
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    send_and_close(port)
    read = linger_of(tracer, port)["code"]["eof_read"]
    assert server.poll() is None
    if corruption == "endless_frame_chain":
        names = [f["function"] for f in read["python"]]
        assert names == ["handle_request"] * 16, names          # PY_MAX_FRAMES
    else:
        assert "python" not in read and read["place"]["method"] != "python"
        assert read["python_not_read"].startswith("its frames do not check out"), read
    tracer.stop()


LEAKY_CLIENT = """\
import socket, sys, time
port = int(sys.argv[1])
pool = []


def fetch_user(uid):
    conn = socket.create_connection(("127.0.0.1", port))    # OPENS
    conn.sendall(b"GET /user/%d" % uid)
    pool.append(conn)                                       # never closed


print("ready", flush=True)
sys.stdin.readline()
fetch_user(7)
print("fetched", flush=True)
time.sleep(600)
"""


def test_a_python_client_that_leaks_is_named_by_the_call_that_opened_it(procs, tmp_path):
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    script = tmp_path / "client.py"
    script.write_text(LEAKY_CLIENT)
    client = start_ready(procs, [PYTHON, str(script), str(port)], stdin=subprocess.PIPE)
    tracer = Tracer(["-P", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    client.stdin.write("go\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "fetched"
    served, _ = listener.accept()
    served.recv(100)                    # read: closing with unread bytes would reset
    served.close()                      # the server closes; the client never does
    rec = tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == port,
                          timeout=30)[0]
    opened = rec["code"]["opened"]
    assert opened["pid"] == client.pid
    line = line_of(script, "# OPENS")
    assert opened["python"][0]["function"] == "create_connection"       # socket.py
    assert (opened["place"]["function"], opened["place"]["line"]) == ("fetch_user", line)
    # Not "blocked in clock_nanosleep at main (client.py:16)": the client
    # sleeps in its own loop, and the socket it opened was never read.
    d = rec["diagnosis"]
    assert d["cause"] == "never_read", d
    assert d["summary"].startswith(f"never read since the peer closed; opened by "
                                   f"fetch_user (client.py:{line}): {client.pid}/python3.11 fd ")
    listener.close()
    tracer.stop()


def test_a_python_server_in_its_own_pid_namespace_is_named(procs, tmp_path):
    """A container's process: its interpreter knows its threads by their ids
    in its own pid namespace (the main thread is 1), not by the ids the
    kernel and /proc give the tracer. Both the kernel's copy at the EOF read
    and the worker's read of each thread match them there; before, the read
    said "its thread state was not among the interpreter's first 64" (it
    was the first) and no thread had frames."""
    port = free_port()
    wrapper = python_server(procs, port, EOF_SERVER, python=PYTHON,
                            script=tmp_path / "server.py",
                            prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    with open(f"/proc/{wrapper.pid}/task/{wrapper.pid}/children") as f:
        server = int(f.read().split()[0])
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    send_and_close(port)
    rec = linger_of(tracer, port)
    read = rec["code"]["eof_read"]
    assert read["pid"] == server
    assert [f["function"] for f in read.get("python", [])] == [
        "Api.handle_request", "<module>"], {k: v for k, v in read.items() if k != "stack"}
    assert rec["diagnosis"]["cause"] == "ignoring_eof"
    process = [r for r in tracer.of("process") if r["pid"] == server][0]
    now = [f["function"] for t in process["threads"] for f in t.get("python", [])]
    assert "<module>" in now, process["threads"]
    tracer.stop()
