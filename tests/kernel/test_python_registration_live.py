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

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pytest

from closewait_trace.evidence.resolver import ProcResolver
from closewait_trace.evidence.worker import GatherWorker
from closewait_trace.kernel import kernel_headers
from closewait_trace.kernel.probe import KernelProbe, ProbeConfig, detect_features
from closewait_trace.sockets import procfs
from closewait_trace.sockets.filters import SocketFilter
from closewait_trace.live.tracer import LiveTracer
from tests.kernel.fuse_never_reads import NeverReads
from tests.kernel.harness import free_port, start_ready, stretch

pytestmark = pytest.mark.kernel

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DAEMON = ["setpriv", "--reuid=1", "--regid=1", "--clear-groups"]
BIN = ["setpriv", "--reuid=2", "--regid=2", "--clear-groups"]
PYTHON = "/usr/bin/python3.11"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


@contextlib.contextmanager
def in_process_tracer(resolver, **config) -> Iterator[LiveTracer]:
    """The live loop in this process (to see its map and resolver), for the
    block: its probe closed, its signal handlers put back and its
    resolver's worker ended, however the block ends. start() is the
    test's: the start-up scan is what these tests look at."""
    kernel_headers.apply(kernel_headers.choose_headers())
    features = detect_features(environ={})
    probe = KernelProbe(ProbeConfig(features=features, threshold_ns=10**9, **config))
    tracer = LiveTracer(probe.config, SocketFilter(lports=(free_port(),)), probe,
                        resolver=resolver)
    try:
        yield tracer
    finally:
        tracer.probe.close()
        for sig, handler in tracer._previous_handlers.items():
            signal.signal(sig, handler)
        if getattr(resolver, "worker", None) is not None:
            resolver.worker.close()


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
    holder = start_ready(procs, NOBODY + [PYTHON, "-c", EXECS_ON_REQUEST], stdin=subprocess.PIPE)
    resolver = ExecAfterScan(holder)
    with in_process_tracer(resolver) as tracer:
        tracer.start()
        assert holder.pid in resolver.found        # it was CPython when read
        assert holder.pid not in tracer.probe.python_registered()


def test_one_users_many_pythons_do_not_keep_another_users_out(procs):
    many = start_ready(procs, NOBODY + [PYTHON, "-c", FORKS, "40"], start_new_session=True)
    other = start_ready(procs, DAEMON + [PYTHON, "-c", FORKS, "1"])
    # A third user's, which exits once registered, as any process on the
    # machine may: the checks below are about those still running
    # (procfs.real_uid is None for one gone; they stat()ed every registered
    # pid, and failed on one that had exited).
    leaving = start_ready(procs, BIN + [PYTHON, "-c", FORKS, "1"])
    with in_process_tracer(ProcResolver(), max_py_procs=16) as tracer:
        tracer.start()
        registered = tracer.probe.python_registered()
        assert leaving.pid in registered
        leaving.kill()
        leaving.wait()
        assert len(registered) == 16
        assert other.pid in registered
        nobody = [p for p in registered if procfs.real_uid(p) == 65534]
        assert 0 < len(nobody) < 16
        # And a registration of nobody's later (a diagnosis) takes no other
        # user's place: nobody already holds the most.
        before = set(registered)
        walk = dict(tracer.resolver.python_processes()[many.pid])
        tracer.register_pythons({many.pid: walk}, tracer.now_ns())
        after = tracer.probe.python_registered()
        assert other.pid in after
        assert {p for p in before if procfs.real_uid(p) not in (65534, None)} <= after
    os.killpg(many.pid, 9)


# A CPython process (a copy of python3.11, so that only a read of this
# process opens its file) that waits for someone to open its binary, as the
# tracer's scan does to find _PyRuntime, and then maps a page of a FUSE file
# whose server never answers over the page holding Py_Version: the very
# page the scan reads next, which was the binary's own (on a local
# filesystem) when it parsed the maps.
SWAPS_ON_OPEN = """\
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fuse_file = sys.argv[1]
version = ctypes.addressof(ctypes.c_uint.in_dll(ctypes.pythonapi, "Py_Version"))
page = version & ~4095
fd = libc.inotify_init1(0)
assert libc.inotify_add_watch(fd, os.readlink("/proc/self/exe").encode(), 0x20) >= 0


def swap():
    os.read(fd, 4096)                                   # IN_OPEN
    f = os.open(fuse_file, os.O_RDONLY)
    got = libc.mmap(page, 4096, 1, 0x02 | 0x10, f, 0)   # PROT_READ, MAP_PRIVATE|MAP_FIXED
    assert got == page, ctypes.get_errno()


threading.Thread(target=swap, daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def public_dir():
    path = tempfile.mkdtemp(prefix="closewait-py-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_process_whose_memory_blocks_the_scan_costs_only_its_own_user(procs, public_dir):
    """The start-up scan reads each CPython process's memory (its
    Py_Version). One whose page turns into a FUSE file's between the scan's
    read of its maps and of its memory blocks that read for good: the
    processes read before it and those of other users after it are still
    registered, and the tracer is ready soon after the stall.

    Another tracer's scan (other tests on this machine) may open the binary
    first and set the swap off before ours: then ours did not block and the
    attempt is made again with a new copy, three times at most."""
    fuse = NeverReads(os.path.join(public_dir, "mnt")).start()
    try:
        for attempt in range(3):
            own_python = os.path.join(public_dir, str(attempt), "python3.11")
            os.makedirs(os.path.dirname(own_python), mode=0o755)
            shutil.copy(PYTHON, own_python)
            # uid 1 (daemon) is read before uid 65534 (nobody): the blocking
            # process comes first.
            attacker = start_ready(procs, DAEMON + [own_python, "-c", SWAPS_ON_OPEN, fuse.path])
            victim = start_ready(procs, NOBODY + [PYTHON, "-c", FORKS, "1"])
            with in_process_tracer(ProcResolver(worker=GatherWorker())) as tracer:
                started, reads = time.monotonic(), fuse.reads
                tracer.start()
                took = time.monotonic() - started
                registered = tracer.probe.python_registered()
                # Its page was read through FUSE while ours ran, and the
                # attacker was not found: our read blocked there.
                blocked = fuse.reads > reads and attacker.pid not in registered
            if blocked:
                break
        assert blocked, "the scan never blocked on the attacker's page"
        assert victim.pid in registered
        assert took < stretch(15), took
    finally:
        fuse.stop()


# Reads the holder's maps, says so, and reads its interpreter when told.
FIND_RUNTIME = """\
import sys, time
from closewait_trace.evidence import pyframes
from closewait_trace.evidence.procimage import ProcessImage
image = ProcessImage(int(sys.argv[1]))
print("parsed", flush=True)
sys.stdin.readline()
runtime, why = pyframes.find_runtime(image, time.monotonic() + 5)
print("found" if runtime else "not found", why, flush=True)
"""

# Sleeps; told to, makes its binary's first page writable (a copy of its
# own): the mapping splits in two, and the range the reader parsed has no
# map_files entry any more (what a process doing it in a loop gets half
# the time).
SPLITS = """\
import ctypes, sys, time
print("ready", flush=True)
sys.stdin.readline()
assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(0x400000), 4096, 3) == 0
print("split", flush=True)
time.sleep(600)
"""
CAPS = "-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search"     # the service without sys_admin


def reader_of(pid: int, caps: str = "") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src"))
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"] if caps else []
    reader = subprocess.Popen(prefix + [sys.executable, "-c", FIND_RUNTIME, str(pid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    assert reader.stdout.readline().strip() == "parsed", reader.stderr.read()
    return reader


def answer(reader: subprocess.Popen) -> str:
    """The reader's answer, or AssertionError if it is blocked."""
    reader.stdin.write("go\n")
    reader.stdin.flush()
    deadline = time.monotonic() + stretch(10)
    while reader.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.poll() is not None, "the read of the interpreter blocked"
    assert reader.returncode == 0, reader.stderr.read()
    return reader.stdout.read()


def start_own_python(public_dir: str, procs, script: str) -> tuple[str, subprocess.Popen]:
    own_dir = os.path.join(public_dir, "d")
    os.makedirs(own_dir, mode=0o755)
    own_python = os.path.join(own_dir, "python3.11")
    shutil.copy(PYTHON, own_python)
    holder = start_ready(procs, NOBODY + [own_python, "-c", script], stdin=subprocess.PIPE)
    return own_dir, holder


def test_a_fuse_mount_over_the_interpreters_directory_is_not_walked(procs, public_dir):
    """When map_files has no entry for the range the maps said (the
    mapping changed since: here split by mprotect), the interpreter's file
    is found by its path from the process's root. Its user mounts a FUSE
    server over the directory the binary was run from (fusermount3 lets a
    user mount on a directory of theirs; root mounts it here): the mapping
    is still on the local filesystem, but a walk of that path asks the
    server for the name, which it never answers, and the reader waited for
    good. The walk must not cross that mount (nor follow a symlink): the
    interpreter is then said not read, at once."""
    own_dir, holder = start_own_python(public_dir, procs, SPLITS)
    fuse = NeverReads(own_dir, answer_lookups=False).start()
    reader = None
    try:
        reader = reader_of(holder.pid)
        holder.stdin.write("split\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "split"
        out = answer(reader)
        assert out.startswith("not found interpreter python3.11 not read"), out
        assert fuse.lookups == 0
    finally:
        fuse.stop()
        if reader is not None:
            reader.kill()
            reader.wait()


def test_without_sys_admin_the_interpreter_is_found_by_its_path(procs, public_dir):
    """The service with CAP_SYS_ADMIN taken out of its bounding set (as its
    unit file says one can): /proc/PID/map_files can be listed but not
    followed, and the interpreter is found by its path, walked safely."""
    _own_dir, holder = start_own_python(public_dir, procs, SPLITS)
    reader = reader_of(holder.pid, CAPS)
    try:
        out = answer(reader)
        assert out.strip() == "found", out
    finally:
        reader.kill()
        reader.wait()


# Maps a small ELF file named python3.11 (not needed to run) below its
# binary, where a reader meets it first; told to, maps a FUSE file (whose
# server never answers a READ) over that very range, read-only: the range
# is the same, /proc/PID/map_files has an entry for it, and that entry now
# names the FUSE file.
SWAPS_A_MAPPING = """\
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
MAP_PRIVATE, MAP_FIXED = 0x02, 0x10
at = 0x10000


def map_at(path):
    fd = os.open(path, os.O_RDONLY)
    got = libc.mmap(at, 4096, 1, MAP_PRIVATE | MAP_FIXED, fd, 0)
    os.close(fd)
    assert got == at, ctypes.get_errno()


map_at(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
map_at(sys.argv[2])
print("swapped", flush=True)
time.sleep(600)
"""


def test_a_mapping_swapped_for_a_fuse_file_is_not_opened_through_map_files(procs, public_dir):
    """The reader decides from the maps it parsed that the interpreter's
    mapping is on a local filesystem; its user then maps a FUSE file over
    that very range (as fusermount3 lets any user serve one; root mounts it
    here). map_files' entry for the range now names the FUSE file: it was
    opened and read, and the read waited on the server for good. The file
    behind the entry must be the mapping's own (device and inode, asked
    without a word to the server), else it is not opened."""
    fuse = NeverReads(os.path.join(public_dir, "mnt")).start()
    reader = None
    try:
        decoy = os.path.join(public_dir, "d", "python3.11")
        os.makedirs(os.path.dirname(decoy), mode=0o755)
        shutil.copy("/lib/x86_64-linux-gnu/libdl.so.2", decoy)
        holder = subprocess.Popen(NOBODY + [PYTHON, "-c", SWAPS_A_MAPPING, decoy, fuse.path],
                                  text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(holder)
        assert holder.stdout.readline().strip() == "ready"
        reader = reader_of(holder.pid)                  # its maps parsed: the decoy's file
        holder.stdin.write("swap\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "swapped"
        out = answer(reader)
        assert out.startswith("not found interpreter python3.11 not read"), out
        assert fuse.reads == 0
        assert holder.poll() is None
    finally:
        fuse.stop()
        if reader is not None:
            reader.kill()
            reader.wait()
