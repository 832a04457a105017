"""Real workloads and a real tracer for the kernel tests."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from typing import Iterator, Optional
import time
from dataclasses import dataclass, field

from closewait_trace import knobs
from closewait_trace.sockets import capabilities, procfs
from closewait_trace.output import schema

TRACER = [sys.executable, "-m", "closewait_trace"]

# Every wait and timing bound in the kernel tests is multiplied by this: an
# emulated guest (the kernel matrix, QEMU without KVM) runs ~50x slower, and
# slowness must never pass for a failure. 1 on real hardware.
STRETCH_ENV = "CLOSEWAIT_TEST_STRETCH"


def stretch_factor() -> float:
    try:
        return max(1.0, float(os.environ.get(STRETCH_ENV, "1")))
    except ValueError:
        return 1.0


def stretch(seconds: float) -> float:
    return seconds * stretch_factor()


# Debian's kernels (kernel.perf_event_paranoid 3; Ubuntu's from 4) let only
# CAP_SYS_ADMIN attach to a tracepoint: the capability tests expect that there.
PERF_RESTRICTED = (capabilities.perf_event_paranoid() or 0) >= 3


# The tracers these tests start get the same factor for the symbolizer's
# wall-clock budgets (closewait_trace/knobs.py): on an emulated guest a
# budget sized for real hardware would measure the emulator, not the code.
if stretch_factor() > 1:
    os.environ.setdefault(knobs.TIME_SCALE_ENV, f"{stretch_factor():g}")


def free_port(family=socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tracer:
    """closewait-trace --json in a subprocess; records collected as they come."""

    args: list
    # The tool as run; None: the module's TRACER at start() (a test may
    # swap that for a prefixed one, e.g. setpriv, around start()).
    command: Optional[list] = None
    proc: subprocess.Popen = None
    records: list = field(default_factory=list)
    stderr: str = ""
    start_timeout: float = 30.0        # for its start record, in `with Tracer(...)`
    env: Optional[dict] = None         # variables set for the tracer only
    _q: queue.Queue = field(default_factory=queue.Queue)

    def start(self, timeout=30.0) -> "Tracer":
        timeout = stretch(timeout)
        command = self.command if self.command is not None else TRACER
        self.proc = subprocess.Popen(command + ["--json"] + list(self.args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True,
                                     env=None if self.env is None else {**os.environ, **self.env})
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.wait_for(lambda r: r["type"] == "start", timeout=timeout)
        except BaseException as failure:       # not left running: nobody would end it
            _end_on_failure(self.proc, failure)
            raise
        return self

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(json.loads(line))
        self._q.put(None)

    def _pump(self, timeout):
        try:
            rec = self._q.get(timeout=timeout)
        except queue.Empty:
            return False
        if rec is None:
            raise AssertionError(f"tracer exited early: {self.proc.wait()} {self.proc.stderr.read()}")
        self._keep(rec)
        return True

    def _keep(self, rec: dict) -> None:
        # Every record a live tracer prints is checked against the schema.
        problem = schema.problem(rec)
        assert problem is None, f"record does not match the schema: {problem}: {rec}"
        self.records.append(rec)

    def wait_for(self, predicate, count=1, timeout=20.0) -> list:
        deadline = time.monotonic() + stretch(timeout)
        while True:
            found = [r for r in self.records if predicate(r)]
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {count} records; have {self.records}")
            self._pump(min(left, 0.2))

    def settle(self, seconds: float) -> None:
        end = time.monotonic() + stretch(seconds)
        while time.monotonic() < end:
            self._pump(max(0.01, end - time.monotonic()))

    def stop(self, sig=signal.SIGINT, timeout=10.0) -> dict:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=stretch(timeout))
        while True:
            try:
                rec = self._q.get(timeout=stretch(5))
            except queue.Empty:
                break
            if rec is None:
                break
            self._keep(rec)
        self.stderr = self.proc.stderr.read()
        assert rc == 0, (rc, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
        summaries = self.of("summary")
        assert len(summaries) == 1, self.records
        return summaries[0]

    def of(self, kind: str) -> list:
        return [r for r in self.records if r["type"] == kind]

    def kill(self):
        if self.proc is not None:
            end_tree(self.proc)

    # `with Tracer(args) as tracer:` starts it, and ends it (with its
    # children) at the block's end if the block did not; on a failure, the
    # tracer's stderr so far goes with the error.
    def __enter__(self) -> "Tracer":
        if self.proc is None:
            self.start(timeout=self.start_timeout)
        return self

    def __exit__(self, kind, failure, tb) -> None:
        if failure is not None:
            _end_on_failure(self.proc, failure)
        self.kill()


class Tmux:
    """A command in a real terminal (a tmux server of its own), for the
    block: `with Tmux(tmp_path, command) as term`. The server and all that
    runs in it end with the block; on a failure the screen as it was goes
    with the error."""

    def __init__(self, tmp_path, command: Optional[list] = None):
        self.sock = f"cwtop-{os.getpid()}"
        self.tmp = tmp_path
        self.command = command

    def __enter__(self) -> "Tmux":
        if self.command is not None:
            try:
                self.start(self.command)
            except BaseException:
                self.kill()
                raise
        return self

    def __exit__(self, kind, failure, tb) -> None:
        if failure is not None:
            try:
                failure.add_note("the terminal's screen:\n" + self.screen())
            except (OSError, subprocess.SubprocessError):
                pass
        self.kill()

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.sock] + list(args), capture_output=True,
                              text=True, timeout=stretch(30)).stdout

    def start(self, command: list) -> None:
        done = self.tmp / "exit"
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(done))}; sleep 600"
        subprocess.run(["tmux", "-L", self.sock, "new-session", "-d", "-x", "100", "-y", "30",
                        shell], check=True, timeout=stretch(30))

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_for(self, predicate, what: str) -> str:
        return wait_until(lambda: (lambda s: s if predicate(s) else None)(self.screen()),
                          timeout=60, what=what)

    def exit_code(self):
        done = self.tmp / "exit"
        return int(done.read_text()) if done.exists() and done.read_text().strip() else None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def end_tree(proc: subprocess.Popen) -> None:
    """Kills proc and every descendant it still has (stopped ones too), and
    reaps proc. Nothing happens to a process that already ended."""
    if proc.poll() is not None:
        return
    pids, i = [proc.pid], 0
    while i < len(pids):                 # the tree before any of it goes
        pids += children_of(pids[i])
        i += 1
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    proc.wait()


def _end_on_failure(proc: Optional[subprocess.Popen], failure: BaseException) -> None:
    """Kills proc's tree, and adds what proc wrote to stderr (when it is a
    pipe nobody read to its end) to the failure's report."""
    if proc is None:
        return
    end_tree(proc)
    err = proc.stderr
    if err is not None and not err.closed:
        try:
            os.set_blocking(err.fileno(), False)
            text = err.read() or ""
        except (OSError, ValueError, TypeError):     # nothing more to read without waiting
            text = ""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text:
            failure.add_note(f"tracer's stderr (exit {proc.returncode}):\n{text[-4000:]}")


@contextmanager
def tracer_process(args, command: Optional[list] = None, **popen) -> Iterator[subprocess.Popen]:
    """The tracer (TRACER + args, or command) run for the block, for tests
    that read its text output themselves (Tracer reads --json). stdout and
    stderr are pipes unless popen says otherwise. At the block's end the
    tracer, if still running, is killed with its children; on a failure
    (an assertion, a timeout, Ctrl-C) also, and its stderr is reported."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen((TRACER if command is None else command) + list(args), **popen)
    try:
        yield proc
    except BaseException as failure:
        _end_on_failure(proc, failure)
        raise
    finally:
        end_tree(proc)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


def ss_close_wait(port: int, side: str = "sport") -> set[tuple]:
    """(local, remote, pids) of sockets in CLOSE-WAIT on local port (side
    "dport": on remote port), from ss."""
    out = subprocess.run(["ss", "-Htanp", "state", "close-wait", f"( {side} = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    rows = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        pids = tuple(sorted(int(p) for p in re.findall(r"pid=(\d+)", line)))
        rows.add((parts[2], parts[3], pids))
    return rows


def record_row(rec: dict) -> tuple:
    def hp(a, p):
        return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"
    pids = tuple(sorted({o["pid"] for o in rec["owners"]}))
    return (hp(rec["laddr"], rec["lport"]), hp(rec["raddr"], rec["rport"]), pids)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2]


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + stretch(timeout)
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_ready(procs, argv, **popen) -> subprocess.Popen:
    """argv started (and added to procs, which ends it after the test) once
    it has printed "ready" on its stdout (a pipe, text, unless popen says)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("text", True)
    proc = subprocess.Popen(argv, **popen)
    procs.append(proc)
    said = proc.stdout.readline().strip()
    assert said in ("ready", b"ready"), f"{argv} said {said!r}, not ready (exit {proc.poll()})"
    return proc


# A Python server's first lines: listening on 127.0.0.1:{port} as `l`, says
# "ready"; python_server runs the rest of its script after them.
LISTEN = """\
import os, resource, socket, sys, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", {port})); l.listen(1024)
print("ready", flush=True)
"""


def python_server(procs, port, then, python: str = sys.executable, script=None,
                  prefix=(), **popen) -> subprocess.Popen:
    """A Python server listening on the port, once ready, running `then`
    (dedented) after LISTEN. With script (a path) the code is written there
    and run from the file (Python frames then name it and its lines);
    prefix goes before the interpreter (setpriv, unshare)."""
    code = LISTEN.format(port=port) + textwrap.dedent(then)
    if script is None:
        argv = [python, "-c", code]
    else:
        with open(script, "w") as f:
            f.write(code)
        argv = [python, str(script)]
    return start_ready(procs, list(prefix) + argv, **popen)


# A server that accepts connections, keeps them open and never reads or
# closes: it ignores EOF. Prints 'ready PORT' once listening.
HOLDING_SERVER = r"""
import socket, sys, time, os
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, int(sys.argv[2])))
srv.listen(1024)
print("ready", flush=True)
held = []
mode = sys.argv[3] if len(sys.argv) > 3 else "hold"
while True:
    conn, _ = srv.accept()
    held.append(conn)
    if mode == "fork":
        if os.fork() == 0:
            time.sleep(3600)
            os._exit(0)
"""


def start_holding_server(port: int, family: str = "4", mode: str = "hold") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDING_SERVER, family, str(port), mode],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def connect_and_close(port: int, count: int, family=socket.AF_INET, payload: bytes = b"") -> list[float]:
    """Open count connections, optionally send payload, close each; return
    the close times (the moment the server's socket enters CLOSE_WAIT)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    times = []
    for _ in range(count):
        c = socket.create_connection((host, port))
        if payload:
            c.sendall(payload)
        c.close()
        times.append(time.monotonic())
    return times


def start_seed_scenario(port, procs, as_user=()) -> tuple:
    """../shared/seed-closewait.txt, exactly: a forking socat listener whose
    children STOP themselves, and five clients that give up after 1 second
    (as_user: a command prefix such as setpriv's, for the listener). Returns
    the listener and when each client's socket entered CLOSE_WAIT."""
    server = subprocess.Popen(list(as_user) + ["socat", f"tcp4-listen:{port},reuseaddr,fork",
                                               "system:kill -STOP $SOCAT_PID"])
    procs.append(server)
    wait_until(lambda: f":{port} " in subprocess.run(
        ["ss", "-Htln"], capture_output=True, text=True).stdout, what="socat listening")
    entered = []
    for _ in range(5):
        subprocess.run(["socat", "-T", "1", "-u", f"tcp4:127.0.0.1:{port}", "-"],
                       check=True, timeout=stretch(10))
        entered.append(time.monotonic())
    return server, entered


def closed_connections_in_netns(ns: str, port: int, procs, count: int = 1) -> subprocess.Popen:
    """A holding server inside network namespace ns (made by the caller),
    and count connections to it that the client closes: count sockets in
    CLOSE_WAIT that only that namespace's table shows."""
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                               HOLDING_SERVER, "4", str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(server)
    assert server.stdout.readline().strip() == "ready"
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                    "import socket, sys\n"
                    "for _ in range(int(sys.argv[2])):\n"
                    "    socket.create_connection(('127.0.0.1', int(sys.argv[1]))).close()",
                    str(port), str(count)], check=True)
    return server


def accepted_connection(port: int, server) -> socket.socket:
    """A connection the server has accepted (so it is not in the queue)."""
    client = socket.create_connection(("127.0.0.1", port))
    wait_until(lambda: "pid=%d" % server.pid in subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True).stdout, what="accepted")
    return client


# Root makes the namespaces (no reliance on unprivileged user namespaces,
# which some distributions turn off), then each child is nobody's.
NAMESPACE_BOMB = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        if libc.unshare(0x40000000) != 0:       # CLONE_NEWNET
            os._exit(1)
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        time.sleep(3600)
        os._exit(0)
print("ready", flush=True)
os.wait()
"""


def namespace_bomb(procs, count: int) -> Iterator[set[int]]:
    """Yields the inodes of count new network namespaces of nobody's, each
    with a sleeping process (NAMESPACE_BOMB), all killed after."""
    maker = subprocess.Popen([sys.executable, "-c", NAMESPACE_BOMB, str(count)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    procs.append(maker)
    assert maker.stdout.readline().strip() == "ready"
    children = [int(p) for p in open(f"/proc/{maker.pid}/task/{maker.pid}/children")
                .read().split()]
    wait_until(lambda: all(procfs.parse_status(procfs.read_text(f"/proc/{pid}/status") or "")
                           .get("Uid", "").startswith("65534") for pid in children),
               what="the namespace bomb's children to be nobody's")
    spaces = {os.stat(f"/proc/{pid}/ns/net").st_ino for pid in children}
    assert len(spaces) == count
    yield spaces
    os.killpg(maker.pid, 9)
