"""Where in the code (issue 18): the kernel copies the reader's registers and
stack when a socket in CLOSE_WAIT is read to its end, and the tracer names
the function that read EOF and never closed, although no thread is in it
any more. Real programs: C built the Debian way (-O2, no frame pointers),
Python; a crafted stack; the capture turned off; a socket older than the
trace."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.kernel.harness import (TRACER, Tracer, free_port, python_server, record_row,
                                  ss_close_wait, start_ready, stretch, wait_until)

pytestmark = pytest.mark.kernel
SOURCE = os.path.join(os.path.dirname(__file__), "data", "eof_server.c")
GO_SOURCE = os.path.join(os.path.dirname(__file__), "data", "eof_server.go")
CLIENT = os.path.join(os.path.dirname(__file__), "data", "leaky_client.c")
GO_CLIENT = os.path.join(os.path.dirname(__file__), "data", "leaky_client.go")


def source_line(path, text):
    with open(path) as f:
        return next(i for i, line in enumerate(f, 1) if text in line)


@pytest.fixture(scope="module")
def debug_dir(tmp_path_factory):
    """Where the test's debug files go, by build-id, as a -dbgsym package
    puts them under /usr/lib/debug (CLOSEWAIT_TRACE_DEBUGINFO points here)."""
    return str(tmp_path_factory.mktemp("debug"))


@pytest.fixture(scope="module")
def eof_server(tmp_path_factory, debug_dir):
    """Built as Debian builds C (dpkg-buildflags: -g -O2, no frame pointers
    on amd64), its DWARF then split off into a debug file named by its
    build-id and stripped from the binary, as the package would ship it
    (the symbol table stays: an unstripped build)."""
    out = str(tmp_path_factory.mktemp("eof") / "eof_server")
    subprocess.run(["gcc", "-g", "-O2", "-fomit-frame-pointer", "-fstack-protector-strong",
                    "-o", out, SOURCE], check=True)
    note = subprocess.run(["readelf", "-n", out], capture_output=True, text=True,
                          check=True).stdout
    build_id = note.split("Build ID:", 1)[1].split()[0]
    debug = os.path.join(debug_dir, ".build-id", build_id[:2], build_id[2:] + ".debug")
    os.makedirs(os.path.dirname(debug), exist_ok=True)
    subprocess.run(["objcopy", "--only-keep-debug", "--compress-debug-sections=zlib", out,
                    debug], check=True)
    subprocess.run(["strip", "--strip-debug", out], check=True)
    return out


def go_build(tmp_path_factory, source, name):
    """Built with Debian's golang-go, as `go build` does by default (symbol
    table and DWARF kept; no .eh_frame: Go keeps frame pointers)."""
    if shutil.which("go") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("go is not installed (scripts/setup.sh test installs golang-go)")
        pytest.skip("go is not installed")
    work = tmp_path_factory.mktemp("go")
    out = str(work / name)
    env = dict(os.environ, HOME=str(work), GOCACHE=str(work / "cache"),
               GOPATH=str(work / "gopath"), GOFLAGS="-mod=mod", GO111MODULE="off")
    subprocess.run(["go", "build", "-o", out, source], check=True, env=env,
                   timeout=stretch(300))
    return out


@pytest.fixture(scope="module")
def go_server(tmp_path_factory):
    return go_build(tmp_path_factory, GO_SOURCE, "eof_server")


@pytest.fixture(scope="module")
def go_client(tmp_path_factory):
    return go_build(tmp_path_factory, GO_CLIENT, "leaky_client")


@pytest.fixture(scope="module")
def c_client(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("client") / "leaky_client")
    subprocess.run(["gcc", "-O2", "-fomit-frame-pointer", "-o", out, CLIENT], check=True)
    return out


def started_tracer(procs, *args):
    """The tracer with the tests' 300 ms threshold and these filters."""
    tracer = Tracer([*args, "-t", "300ms"])
    procs.append(tracer)
    tracer.start()
    return tracer


def send_and_close(port, payload=b"request"):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(payload)
    c.close()


def eof_of(rec):
    """The EOF read's part of a record's code."""
    return {k: rec["code"][k] for k in ("eof_read", "eof_read_unknown")}


def linger_of(tracer, port, timeout=20):
    return tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port,
                           timeout=timeout)[0]


def test_c_server_that_returned_without_closing_is_named(procs, eof_server, debug_dir,
                                                         tmp_path, monkeypatch):
    port = free_port()
    server = start_ready(procs, [eof_server, str(port)])
    recording = str(tmp_path / "rec.jsonl")
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-w", recording])
    procs.append(tracer)
    monkeypatch.setenv("CLOSEWAIT_TRACE_DEBUGINFO", debug_dir)
    tracer.start()
    send_and_close(port)
    rec = linger_of(tracer, port)
    assert {record_row(rec)} == ss_close_wait(port)
    read = rec["code"]["eof_read"]
    assert read is not None, rec["code"]
    assert read["pid"] == server.pid and read["tid"] == server.pid
    assert read["place"]["function"].startswith("handle_client"), read["stack"]
    assert read["place"]["module"].endswith("eof_server")
    # File and line from the debug file (compressed DWARF 5), by build-id.
    assert (read["place"]["file"], read["place"]["line"]) == \
        ("eof_server.c", source_line(SOURCE, "while ((n = read(fd, buf")), read["place"]
    functions = [f["function"] or "" for f in read["stack"]]
    # Unwound by CFI through code without frame pointers: read, its caller,
    # main, and the C library's start-up below main.
    assert functions[0] == "read" or functions[0].startswith("__libc_read"), functions
    assert "main" in functions and read["stack"][1]["method"] == "cfi", read["stack"]
    d = rec["diagnosis"]
    assert d["cause"] == "ignoring_eof"
    assert "read EOF in handle_client (eof_server.c:" in d["summary"]
    assert f"never closed: {server.pid}/eof_server" in d["summary"]
    # No thread is in handle_client any more: it waits in accept.
    process = [r for r in tracer.of("process") if r["pid"] == server.pid][0]
    stacks = [f.get("function") or "" for t in process["threads"] for f in t["stack"]]
    assert not any(s.startswith("handle_client") for s in stacks), stacks
    tracer.stop()
    # The recording replays to the same line, and the text says it.
    replay = subprocess.run(TRACER + ["-r", recording, "-v"], capture_output=True, text=True,
                            timeout=stretch(60))
    assert replay.returncode == 0, replay.stderr
    assert "read EOF in handle_client (eof_server.c:" in replay.stdout, replay.stdout
    assert "[cfi]" in replay.stdout
    # The report's table of code locations: the call site, one row.
    report = subprocess.run(TRACER + ["report", "--by", "code", recording], capture_output=True,
                            text=True, timeout=stretch(60))
    assert report.returncode == 0, report.stderr
    assert "By code location" in report.stdout, report.stdout
    table = report.stdout.split("By code location", 1)[1].split("\n\n", 1)[0]
    rows = [l for l in table.splitlines() if l.startswith("  handle_client (eof_server.c:")]
    assert len(rows) == 1 and "ignoring_eof" in rows[0], report.stdout
    mine = [l for l in replay.stdout.splitlines()
            if "read EOF in" in l or "bytes of" in l or "[cfi]" in l]
    assert len(mine) >= 4 and all(len(l) <= 80 for l in mine), mine


def test_go_handler_that_returned_without_closing_is_named(procs, go_server):
    """Go: the goroutine's stack at the read, by its frame pointers, from
    the system call up through net.(*conn).Read to the handler."""
    port = free_port()
    server = start_ready(procs, [go_server, str(port)])
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    rec = linger_of(tracer, port)
    assert {record_row(rec)} == ss_close_wait(port)
    read = rec["code"]["eof_read"]
    assert read is not None and read["pid"] == server.pid, rec["code"]
    assert read["place"]["function"] == "main.handle", read["stack"]
    # Go binaries carry their DWARF (compressed): the line of the Read.
    assert read["place"]["file"].endswith("eof_server.go")
    assert read["place"]["line"] == source_line(GO_SOURCE, "c.Read(buf)"), read["place"]
    functions = [f["function"] for f in read["stack"]]
    assert "net.(*conn).Read" in functions, functions
    assert {f["method"] for f in read["stack"][1:]} == {"fp"}, read["stack"]
    assert rec["diagnosis"]["cause"] == "ignoring_eof"
    assert "read EOF in main.handle (eof_server.go:" in rec["diagnosis"]["summary"]


def test_a_process_that_never_read_has_none_seen(procs, eof_server):
    port = free_port()
    python_server(procs, port, """
        c, _ = l.accept()
        time.sleep(600)
        """)
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    rec = linger_of(tracer, port)
    assert eof_of(rec) == {"eof_read": None, "eof_read_unknown": None}
    assert rec["diagnosis"]["cause"] != "ignoring_eof" or "EOF unread" in \
        rec["diagnosis"]["summary"]


def test_python_reader_that_sleeps_is_ignoring_eof_not_blocked_elsewhere(procs):
    """The same leak must not get a cause that depends on the call the
    program idles in: a Python worker that read EOF and then sleeps."""
    port = free_port()
    holder = python_server(procs, port, """
        c, _ = l.accept()
        while c.recv(100):
            pass
        while True:
            time.sleep(1)
        """)
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    rec = linger_of(tracer, port)
    read = rec["code"]["eof_read"]
    assert read is not None and read["pid"] == holder.pid
    # The interpreter's C function that read, not the C library's wrapper
    # (Python's own frames are not in the copied stack).
    assert read["stack"] and not read["place"]["module"].endswith("libc.so.6"), read
    assert rec["diagnosis"]["cause"] == "ignoring_eof", rec["diagnosis"]


def test_a_crafted_stack_is_unwound_within_bounds(procs, eof_server):
    """RBP points at itself and every stack word points back into the
    stack: the unwinder stops, the tracer goes on, the reader is named."""
    port = free_port()
    server = start_ready(procs, [eof_server, str(port), "hostile"])
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    rec = linger_of(tracer, port)
    read = rec["code"]["eof_read"]
    assert read["pid"] == server.pid
    assert 1 <= len(read["stack"]) <= 16
    assert read["stack"][0]["function"].startswith("read_on_crafted_stack")
    # A second connection is still traced: nothing stalled.
    send_and_close(port)
    tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port, count=2)
    tracer.stop()


def test_capture_off_and_sockets_older_than_the_trace_say_why(procs, eof_server):
    port = free_port()
    start_ready(procs, [eof_server, str(port)])
    send_and_close(port)            # lingers before the tracer starts
    wait_until(lambda: len(ss_close_wait(port)) == 1, what="CLOSE_WAIT")
    tracer = started_tracer(procs, "-p", str(port))
    old = linger_of(tracer, port)
    assert old["pre_existing"]
    assert eof_of(old) == {"eof_read": None,
                           "eof_read_unknown": "in CLOSE_WAIT before the trace began"}
    tracer.stop()

    off = Tracer(["-p", str(port), "-t", "300ms", "--no-eof-stacks"])
    procs.append(off)
    off.start()
    send_and_close(port)
    new = off.wait_for(lambda r: r["type"] == "linger" and not r["pre_existing"])[0]
    assert new["code"]["opened_unknown"] == "not captured (--no-eof-stacks)"
    assert eof_of(new) == {"eof_read": None,
                           "eof_read_unknown": "not captured (--no-eof-stacks)"}
    off.stop()


def test_an_eof_read_after_the_report_gives_a_change_with_the_place(procs):
    """Read to its end only after it was reported: the capture is taken on
    a later tick (it would hold a slot of the kernel's map while the socket
    lingers) and the new diagnosis names the place in a CHANGE."""
    port = free_port()
    holder = python_server(procs, port, """
        c, _ = l.accept()
        sys.stdin.readline()        # the test says when to read
        while c.recv(100):
            pass
        time.sleep(600)
        """, stdin=subprocess.PIPE)
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    first = linger_of(tracer, port)
    assert eof_of(first) == {"eof_read": None, "eof_read_unknown": None}
    holder.stdin.write("read\n")
    holder.stdin.flush()
    change = tracer.wait_for(lambda r: r["type"] == "linger" and r["update"]
                             and r["code"]["eof_read"] is not None)[0]
    assert change["code"]["eof_read"]["pid"] == holder.pid
    assert change["diagnosis"]["cause"] == "ignoring_eof"
    assert "read EOF in" in change["diagnosis"]["summary"]
    tracer.stop()


def test_a_burst_of_eof_reads_is_sampled_and_the_rest_said_not_kept(procs):
    """400 sockets read to their end within a fraction of a second: the
    kernel keeps at most its per-CPU rate of captures; every other socket
    says its place was not kept (never "none seen"), and the counts add up."""
    port = free_port()
    count = 400
    holder = python_server(procs, port, f"""
        held = []
        for _ in range({count}):
            c, _ = l.accept()
            held.append(c)
        for c in held:
            while c.recv(100):
                pass
        print("read", flush=True)
        time.sleep(600)
        """)
    tracer = started_tracer(procs, "-p", str(port))
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    for c in clients:
        c.close()
    assert holder.stdout.readline().strip() == "read"
    lingers = tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port,
                              count=count, timeout=60)
    assert {record_row(r) for r in lingers} == ss_close_wait(port)
    kept = [r for r in lingers if r["code"]["eof_read"] is not None]
    not_kept = [r for r in lingers if r["code"]["eof_read"] is None]
    assert all(r["code"]["eof_read_unknown"].startswith("read to its end, but the place was "
                                                        "not kept") for r in not_kept)
    assert 1 <= len(kept) < count and not_kept, (len(kept), len(not_kept))
    assert all(r["code"]["eof_read"]["pid"] == holder.pid for r in kept)
    summary = tracer.stop()
    c = summary["counters"]
    assert c["eof_captured"] == len(kept) and c["eof_map_full"] == 0
    assert c["eof_rate_limited"] == len(not_kept)


@pytest.mark.parametrize("language", ["c", "go"])
def test_a_leaking_client_names_the_call_that_opened_it(procs, c_client, go_client, language):
    """The server closes first; the client never reads or closes: its socket
    lingers, and the call that connect()ed it is named, in the holder's own
    language (Go's Dial happens in the dialling goroutine)."""
    port = free_port()
    python_server(procs, port, """
        c, _ = l.accept()
        c.close()
        time.sleep(600)
        """)
    tracer = started_tracer(procs, "-P", str(port))
    client = subprocess.Popen([c_client if language == "c" else go_client, str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(client)
    assert client.stdout.readline().strip() == "connected"
    rec = tracer.wait_for(lambda r: r["type"] == "linger" and r["rport"] == port)[0]
    assert {record_row(rec)} == ss_close_wait(port, side="dport")
    opened = rec["code"]["opened"]
    assert opened is not None and opened["pid"] == client.pid, rec["code"]
    if language == "c":
        assert opened["place"]["function"].startswith("fetch_user"), opened["stack"]
    else:
        assert opened["place"]["function"] == "main.fetchUser", opened["stack"]
        assert opened["place"]["file"].endswith("leaky_client.go")
        assert opened["place"]["line"] == source_line(GO_CLIENT, "net.Dial("), opened["place"]
    assert rec["code"]["eof_read"] is None and rec["code"]["eof_read_unknown"] is None
    # The cause is the leak, whatever the client idles in (pause here): a
    # connection it opened and has not read since the peer closed.
    d = rec["diagnosis"]
    assert d["cause"] == "never_read", d
    assert d["summary"].startswith("never read since the peer closed; opened by "
                                   + ("fetch_user" if language == "c" else "main.fetchUser"))
    summary = tracer.stop()
    assert summary["counters"]["open_captured"] >= 1


def test_a_reader_that_no_longer_holds_the_socket_is_not_unwound(procs):
    """A child reads EOF and exits; its parent keeps the socket. The child's
    pid may belong to anyone by the time the socket is reported: its place
    is not read from whatever process has that pid now, and the record
    says why (a crafted reuse of the pid made the place someone else's)."""
    port = free_port()
    holder = python_server(procs, port, """
        c, _ = l.accept()
        child = os.fork()
        if child == 0:
            while c.recv(100):
                pass
            os._exit(0)
        os.waitpid(child, 0)
        print(child, flush=True)
        time.sleep(600)
        """)
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    child = int(holder.stdout.readline())
    rec = linger_of(tracer, port)
    read = rec["code"]["eof_read"]
    assert read is not None and read["pid"] == child, rec["code"]
    assert [o["pid"] for o in rec["owners"]] == [holder.pid]
    assert read["place"] is None and read["stack"] == [] and not read["unwound"], read
    assert "does not hold the socket" in read["not_unwound"]
    assert "read EOF in" not in rec["diagnosis"]["summary"]
    # Nor does the text say the reader never closed it (it exited).
    from closewait_trace.output import render
    text = render.code_lines(rec, verbose=True)
    assert text[0].strip().startswith("read EOF") and "which no longer holds it" in text[0], text
    assert "never closed" not in " ".join(text), text


def test_a_reader_that_ran_another_program_since_is_not_unwound(procs):
    """The reader reads EOF, then exec()s another program keeping the fd:
    its pid still holds the socket, but its memory is another program's
    (a user could exec someone else's binary to have the place named in
    it). The kernel remembers the exec; the place is not read, and said."""
    port = free_port()
    sleep = shutil.which("sleep")
    holder = python_server(procs, port, f"""
        c, _ = l.accept()
        while c.recv(100):
            pass
        os.set_inheritable(c.fileno(), True)
        os.execv({sleep!r}, ["sleep", "600"])
        """)
    tracer = started_tracer(procs, "-p", str(port))
    send_and_close(port)
    rec = linger_of(tracer, port)
    assert [o["pid"] for o in rec["owners"]] == [holder.pid]
    read = rec["code"]["eof_read"]
    assert read is not None and read["pid"] == holder.pid, rec["code"]
    assert read["place"] is None and not read["unwound"], read
    assert "has run another program since" in read["not_unwound"]


NOISY = """\
import socket, sys, threading
port = int(sys.argv[1])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port)); l.listen(1024)
stop = threading.Event()

def serve():
    while not stop.is_set():
        c, _ = l.accept()
        while c.recv(100):          # reads EOF: a capture, if the budget allows
            pass
        c.close()                   # and closes at once: never lingers

threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
while sys.stdin.readline().strip() != "stop":
    pass
"""


def test_a_busy_process_closing_promptly_cannot_spend_the_leakers_captures(procs):
    """Captures are budgeted per process: another service that reads EOF on
    thousands of connections a second (and closes them at once) used to
    spend the per-CPU budget, and the leaker's sockets lingered without a
    place (seen on a shared host)."""
    busy_port, port = free_port(), free_port()
    busy = subprocess.Popen([sys.executable, "-c", NOISY, str(busy_port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(busy)
    assert busy.stdout.readline().strip() == "ready"
    count = 20
    holder = python_server(procs, port, f"""
        held = []
        for _ in range({count}):
            c, _ = l.accept()
            held.append(c)
        for c in held:
            while c.recv(100):
                pass
        print("read", flush=True)
        time.sleep(600)
        """)
    tracer = started_tracer(procs, "-p", f"{busy_port},{port}")
    # The busy service churns (a client thread here, the reads there) ...
    churn_stop = threading.Event()

    def churn():
        while not churn_stop.is_set():
            s = socket.create_connection(("127.0.0.1", busy_port))
            s.close()
    churners = [threading.Thread(target=churn) for _ in range(2)]
    for t in churners:
        t.start()
    try:
        time.sleep(stretch(0.3))
        # ... while the leaker reads its 20 to EOF (well within the threshold).
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for c in clients:
            c.close()
        assert holder.stdout.readline().strip() == "read"
        time.sleep(stretch(0.2))
    finally:
        churn_stop.set()
        for t in churners:
            t.join()
    lingers = tracer.wait_for(lambda r: r["type"] == "linger" and r["lport"] == port,
                              count=count, timeout=60)
    summary = tracer.stop()
    assert summary["counters"]["eof_rate_limited"] > 0        # the busy one was limited
    kept = [r for r in lingers if r["code"]["eof_read"] is not None]
    assert len(kept) == count, [r["code"].get("eof_read_unknown") for r in lingers
                                if r["code"]["eof_read"] is None][:3]
    busy.stdin.write("stop\n")
    busy.stdin.flush()
