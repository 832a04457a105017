"""Which processes the kernel copies Python frames for (cw_py), against
other users (issue 18 §2, security review): the map is shared by every
user, and its entries are written by user space some time after the
process was read.

- A process that runs another program between the tracer's read of it and
  the registration must not stay registered: the kernel forgets a process
  at exec only once it is in the map, and would otherwise walk the new
  program's memory with the old one's addresses (and the record would say
  "the interpreter's state could not be read" of a program that is none).
- One user's many CPython processes must not keep another user's out of
  the map (here a map of 16 and 40 processes of nobody's, all running
  before the one of another user)."""

import os
import signal
import subprocess
import time

import pytest

from closewait_trace.evidence.resolver import ProcResolver
from closewait_trace.kernel import kernel_headers
from closewait_trace.kernel.probe import KernelProbe, ProbeConfig, detect_features
from closewait_trace.live.filters import SocketFilter
from closewait_trace.live.tracer import LiveTracer
from tests.kernel.harness import free_port, stretch

pytestmark = pytest.mark.kernel

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DAEMON = ["setpriv", "--reuid=1", "--regid=1", "--clear-groups"]
PYTHON = "/usr/bin/python3.11"

# Sleeps until told to exec; then runs sleep(1), another program.
EXECS_ON_REQUEST = """\
import os, sys
print("ready", flush=True)
sys.stdin.readline()
os.execv("/bin/sleep", ["sleep", "600"])
"""

FORKS = """\
import os, signal, sys
for _ in range(int(sys.argv[1]) - 1):
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
print("ready", flush=True)
signal.pause()
"""


def make_tracer(resolver, **config) -> LiveTracer:
    kernel_headers.apply(kernel_headers.choose_headers())
    features = detect_features(environ={})
    probe = KernelProbe(ProbeConfig(features=features, threshold_ns=10**9, **config))
    tracer = LiveTracer(probe.config, SocketFilter(lports=(free_port(),)), probe,
                        resolver=resolver)
    return tracer


def close(tracer: LiveTracer) -> None:
    tracer.probe.close()
    for sig, handler in tracer._previous_handlers.items():
        signal.signal(sig, handler)


def wait_exe(pid: int, name: str) -> None:
    deadline = time.monotonic() + stretch(10)
    while time.monotonic() < deadline:
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/exe")) == name:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{pid} never ran {name}")


class ExecAfterScan(ProcResolver):
    """The scan as the worker makes it; then, before the tracer registers
    what it found, the process runs another program (what a holder can do
    at any time; here at the worst one, deterministically)."""

    def __init__(self, holder):
        super().__init__()
        self.holder = holder
        self.found = {}

    def python_processes(self):
        self.found = super().python_processes()
        self.holder.stdin.write("exec\n")
        self.holder.stdin.flush()
        wait_exe(self.holder.pid, "sleep")
        return self.found


def test_a_process_that_execs_before_it_is_registered_is_not(procs):
    holder = subprocess.Popen(NOBODY + [PYTHON, "-c", EXECS_ON_REQUEST], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    resolver = ExecAfterScan(holder)
    tracer = make_tracer(resolver)
    try:
        tracer.start()
        assert holder.pid in resolver.found        # it was CPython when read
        assert holder.pid not in tracer.probe.python_registered()
    finally:
        close(tracer)


def test_one_users_many_pythons_do_not_keep_another_users_out(procs):
    many = subprocess.Popen(NOBODY + [PYTHON, "-c", FORKS, "40"], text=True,
                            stdout=subprocess.PIPE, start_new_session=True)
    procs.append(many)
    assert many.stdout.readline().strip() == "ready"
    other = subprocess.Popen(DAEMON + [PYTHON, "-c", FORKS, "1"], text=True,
                             stdout=subprocess.PIPE)
    procs.append(other)
    assert other.stdout.readline().strip() == "ready"
    tracer = make_tracer(ProcResolver(), max_py_procs=16)
    try:
        tracer.start()
        registered = tracer.probe.python_registered()
        assert len(registered) == 16
        assert other.pid in registered
        nobody = [p for p in registered if os.stat(f"/proc/{p}").st_uid == 65534]
        assert 0 < len(nobody) < 16
        # And a registration of nobody's later (a diagnosis) takes no other
        # user's place: nobody already holds the most.
        before = set(registered)
        walk = dict(tracer.resolver.python_processes()[many.pid])
        tracer.register_pythons({many.pid: walk}, tracer.now_ns())
        assert other.pid in tracer.probe.python_registered()
        assert {p for p in before if os.stat(f"/proc/{p}").st_uid != 65534} <= \
            tracer.probe.python_registered()
    finally:
        close(tracer)
        os.killpg(many.pid, 9)
