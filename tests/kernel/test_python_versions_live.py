"""Python frames of CPython 3.12 and 3.13 holders (issue 18 §2), real
interpreters run in the chroots setup builds (tests/pychroots.py): a worker
thread stuck while its connection lingers is named by its function and
file:line (the diagnosis, -v, JSON); a server whose handler read EOF and
returned is named at the read, from the frames the kernel copied then;
a 3.13 holder that writes garbage into its own _Py_DebugOffsets gets no
frames and a reason, within bounds, and the tracer goes on."""

import socket
import subprocess
import time

import pytest

from tests.kernel.harness import TRACER, Tracer, free_port, record_row, ss_close_wait, stretch
from tests.kernel.test_python_frames_live import LEAKY_CLIENT, registered
from tests.pychroots import Script, popen

pytestmark = pytest.mark.kernel

VERSIONS = [(3, 12), (3, 13)]
IDS = ["3.12", "3.13"]

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

# 3.13: the interpreter never reads its own _Py_DebugOffsets (they are for
# out-of-process readers), so a holder can write anything there and run on.
GARBAGE_DEBUG_OFFSETS = """
def corrupt():
    at = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    import struct
    # thread_state (size, prev, next, interp, current_frame, thread_id,
    # native_thread_id, ...): the frame and the thread's id far outside it.
    ctypes.memmove(at + 8 + 8 * 18, struct.pack("<9Q", 800, 0, 8, 16, 1 << 33, 40,
                                                  1 << 40, 56, 64), 72)
"""

EOF_SERVER = """\
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", {port}))
l.listen(16)
print("ready", flush=True)
kept = []


class Handler:
    def handle(self, conn):
        while conn.recv(100):             # READS EOF
            pass
        kept.append(conn)                 # and never closes it


handler = Handler()
while True:
    conn, _ = l.accept()
    handler.handle(conn)
"""


@pytest.fixture
def scripts():
    made = []
    yield made
    for s in made:
        s.remove()


def start(procs, scripts, version, name, text):
    script = Script(version, name, text)
    scripts.append(script)
    proc = popen(script, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout.readline().strip() == "ready"
    return proc, script


def line_of(script, marker):
    with open(script.host) as f:
        return next(i for i, line in enumerate(f, 1) if marker in line)


def linger_of(tracer, port, timeout=30):
    return tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port,
                           timeout=timeout)[0]


def replay(recording, *args):
    out = subprocess.run(TRACER + ["-r", recording, *args], capture_output=True, text=True,
                         timeout=stretch(60))
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_a_stuck_worker_is_named_by_its_function_and_line(procs, scripts, tmp_path, version):
    port = free_port()
    holder, script = start(procs, scripts, version, "worker.py",
                           WORKER.format(port=port, corrupt=""))
    recording = str(tmp_path / "rec.jsonl")
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-w", recording])
    procs.append(tracer)
    tracer.start()
    socket.create_connection(("127.0.0.1", port)).close()
    rec = linger_of(tracer, port)
    assert {record_row(rec)} == ss_close_wait(port)
    stuck = line_of(script, "# STUCK HERE")
    d = rec["diagnosis"]
    assert d["cause"] == "blocked_elsewhere", d
    assert f"blocked in futex at process_batch (worker.py:{stuck})" in d["summary"], d
    process = [r for r in tracer.of("process") if r["pid"] == holder.pid][0]
    assert "python_not_read" not in process, process.get("python_not_read")
    by_tid = {t["tid"]: t for t in process["threads"]}
    worker = next(t for t in by_tid if t != holder.pid)
    assert by_tid[worker]["python"][0] == {"function": "process_batch", "file": script.path,
                                           "line": stuck}
    assert [f["function"] for f in by_tid[worker]["python"][1:]] == [
        "Thread.run", "Thread._bootstrap_inner", "Thread._bootstrap"]
    tracer.stop()
    # The live line's words, and -v's frame lines, from the recording.
    assert f"at process_batch (worker.py:{stuck})" in replay(recording)
    shown = [l.strip() for l in replay(recording, "-v").splitlines()
             if l.lstrip().startswith("py ")]
    assert any(l.startswith("py process_batch (") and l.endswith(f"/worker.py:{stuck})")
               for l in shown), shown


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_a_handler_that_read_eof_and_returned_is_named(procs, scripts, tmp_path, version):
    """Found at the trace's start (registered by the scan), the server's EOF
    read carries the Python frames the kernel copied at the read."""
    port = free_port()
    server, script = start(procs, scripts, version, "server.py", EOF_SERVER.format(port=port))
    recording = str(tmp_path / "rec.jsonl")
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-w", recording])
    procs.append(tracer)
    tracer.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"request")
    c.close()
    rec = linger_of(tracer, port)
    line = line_of(script, "# READS EOF")
    read = rec["code"]["eof_read"]
    assert read["pid"] == server.pid
    assert read.get("python") == [
        {"function": "Handler.handle", "file": script.path, "line": line},
        {"function": "<module>", "file": script.path,
         "line": line_of(script, "handler.handle(conn)")}], \
        {k: v for k, v in read.items() if k != "stack"}
    d = rec["diagnosis"]
    assert d["cause"] == "ignoring_eof", d
    assert f"read EOF in Handler.handle (server.py:{line}) and never closed" in d["summary"]
    tracer.stop()
    assert f"read EOF in Handler.handle (server.py:{line})" in replay(recording)
    assert any(l.strip().startswith("py Handler.handle (")
               for l in replay(recording, "-v").splitlines())


def test_a_313_holder_with_garbage_debug_offsets_is_refused_within_bounds(procs, scripts):
    port = free_port()
    holder, script = start(procs, scripts, (3, 13), "worker.py",
                           WORKER.format(port=port, corrupt=GARBAGE_DEBUG_OFFSETS))
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    started = time.monotonic()
    socket.create_connection(("127.0.0.1", port)).close()
    rec = linger_of(tracer, port)
    assert holder.poll() is None, "the holder itself died of its corruption"
    process = [r for r in tracer.of("process") if r["pid"] == holder.pid][0]
    assert all(not t.get("python") for t in process["threads"]), process["threads"]
    why = process.get("python_not_read", "")
    assert "layout is not known: its debug offsets do not check out" in why, process
    assert rec["diagnosis"]["cause"] == "blocked_elsewhere"
    # The tracer goes on: a second socket is reported, the run ends cleanly.
    second = socket.create_connection(("127.0.0.1", port))
    rport = second.getsockname()[1]
    second.close()
    tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == rport, timeout=30)
    assert time.monotonic() - started < stretch(20)
    tracer.stop()


@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_a_server_started_after_the_trace_is_named_from_its_first_socket(
        procs, scripts, version):
    """Started after the trace (`chroot DIR python3.X`: two exec()s): looked
    at a tick after its exec, its layout checked and registered; its first
    socket's read is named. (Before, it was registered at its first
    diagnosis, and only its next socket's read was named: that path is
    tests/kernel/test_python_frames_live.py's embedded interpreter.)"""
    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-i", "100ms"])
    procs.append(tracer)
    tracer.start()
    server, script = start(procs, scripts, version, "server.py", EOF_SERVER.format(port=port))
    registered(server.pid)
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"request")
    first = c.getsockname()[1]
    c.close()
    rec = tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == first,
                          timeout=30)[0]
    read = rec["code"]["eof_read"]
    assert read["python"][0] == {"function": "Handler.handle", "file": script.path,
                                 "line": line_of(script, "# READS EOF")}, read.get("python")
    tracer.stop()


# 3.13: debug offsets that pass every structure's own bounds but put the
# code object's co_filename past co_code_adaptive (its size raised to make
# room), where the reader stops reading a code object.
FORGED_CODE_OFFSETS = """
def corrupt():
    at = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    import struct
    # code_object.size, code_object.filename (fields 33 and 34).
    ctypes.memmove(at + 8 + 8 * 33, struct.pack("<2Q", 2048, 1024), 16)
"""


def test_an_unprivileged_313_holder_forging_its_code_object_layout_gets_a_reason(
        procs, scripts):
    """nobody's 3.13 holder forges where a code object's fields are: its
    frames are refused with what did not check out, not "Python frames not
    read (error)" from a struct.error in every frame's read (the tracer's
    problem counted for what a user wrote into its own memory)."""
    port = free_port()
    script = Script((3, 13), "worker.py", WORKER.format(port=port, corrupt=FORGED_CODE_OFFSETS))
    scripts.append(script)
    holder = subprocess.Popen(["chroot", "--userspec=65534:65534"] + script.argv[1:],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    with open(f"/proc/{holder.pid}/status") as f:
        assert next(l for l in f if l.startswith("Uid:")).split()[1] == "65534"
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    socket.create_connection(("127.0.0.1", port)).close()
    rec = linger_of(tracer, port)
    assert holder.poll() is None
    process = [r for r in tracer.of("process") if r["pid"] == holder.pid][0]
    assert all(not t.get("python") for t in process["threads"]), process["threads"]
    why = process.get("python_not_read", "")
    assert "code_object.filename at 1024, outside the code object's first" in why, why
    assert rec["diagnosis"]["cause"] == "blocked_elsewhere"
    tracer.stop()



@pytest.mark.parametrize("version", VERSIONS, ids=IDS)
def test_a_client_that_leaks_is_named_by_the_call_that_opened_it(procs, scripts, version):
    """The connect() side of the kernel's copy (issue 18 §1, "who opened
    it") for 3.12 and 3.13: the frames copied at the connect name the
    program's own function and line, and the cause is never_read."""
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    script = Script(version, "client.py", LEAKY_CLIENT)
    scripts.append(script)
    client = subprocess.Popen(script.argv + [str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    procs.append(client)
    assert client.stdout.readline().strip() == "ready"
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
    assert opened["python"][0]["function"] == "create_connection", opened   # socket.py
    assert (opened["place"]["function"], opened["place"]["line"]) == ("fetch_user", line)
    d = rec["diagnosis"]
    assert d["cause"] == "never_read", d
    comm = f"python{version[0]}.{version[1]}"
    assert d["summary"].startswith(f"never read since the peer closed; opened by "
                                   f"fetch_user (client.py:{line}): {client.pid}/{comm} fd "), d
    listener.close()
    tracer.stop()
