"""Evidence gathering in a process the tracer can abandon.

Every read of other people's /proc entries, memory and files (owners,
threads, stacks, maps, namespaces, identities) can block inside the kernel
for as long as another user wishes: a page of a FUSE mapping whose server
never answers, a process's mmap lock held by such a fault, an NSS lookup
that waits for the network. A Python signal handler only runs when the read
returns, so a tracer that did those reads itself could be frozen, Ctrl-C
included. Here they run in a child process; the tracer sends it a call and
waits for the answer on a pipe with select(), never longer than the call's
deadline, and stops waiting at once when asked to stop (a stop signal).

A worker that misses a deadline is killed (SIGKILL) and abandoned, never
waited for: a task blocked on a FUSE request that its server has already
read cannot even be killed until the server answers. The next call starts a
fresh worker. Abandoned workers still alive are counted, and bound how
many more may be left behind: with MAX_STUCK_WORKERS alive, calls that read
other processes' memory (stacks) are suspended, while the calls that read
only /proc's own files (owners, states, identities, threads) go on until
MAX_STUCK_WORKERS_ANY; a suspended call fails at once, said as such. So
whoever blocks memory reads can cost everyone their stacks, never their
owners. Each abandoned worker can carry a tag (the user whose process it
was reading), so that the resolver stops reading that user's memory while
the worker stays blocked.

The protocol: length-prefixed pickles over the child's stdin and stdout,
each frame written whole (wholewrite.write_all). Both ends are this package
running as the same user (root); the child imports only this package and
the standard library, and runs only the functions named in CALLS. But its
answers carry text other users chose, so the tracer unpickles them naming
only this package's classes (_AnswerUnpickler), and a frame that is not a
(kind, payload) pair fails the call and ends that worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import operator
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from closewait_trace import knobs
from closewait_trace.evidence import spawn
from closewait_trace.sockets import owners
from closewait_trace.wholewrite import write_all

_HEADER = struct.Struct("!I")
# One answer at most: a batch of 100,000 owners pickles to about 60 MB.
MAX_FRAME = 512 << 20
# A request is written in pieces of this size, the caller's while_waiting
# between them (a pipe takes 64 KiB at a time by default).
WRITE_PIECE = 256 << 10
# Abandoned workers still alive (blocked in the kernel) before calls are
# suspended: each is a process left until what blocks it answers. Memory
# reads (stacks) go first: they are what a user's filesystem can block.
MAX_STUCK_WORKERS = 3
MAX_STUCK_WORKERS_ANY = 8
SUSPENDED = "suspended"
# How long the start waits for the worker to take the tracer's fds (adopt).
ADOPT_S = 2.0
TIMED_OUT = "timed out"
STOPPED = "stopped"
NO_WORKER = "no worker could be started"
UNREADABLE = "worker answer unreadable"


class GatherFailed(Exception):
    """A call gave no (complete) answer: why is one of TIMED_OUT, STOPPED,
    or a short reason; partial holds what the call streamed before."""

    def __init__(self, why: str, partial: Optional[list] = None):
        super().__init__(why)
        self.why = why
        self.partial = partial or []


# ------------------------------------------------------------------ child

DEFAULT_CALLS = spawn.DEFAULT_CALLS


def _calls(module: str, preload: bool = True) -> tuple[dict, frozenset]:
    # Imported in the child only: what the worker may be asked to run (the
    # module's CALLS; another module only in tests, to stand for reads
    # that block), and which of them run with the cyclic collector paused
    # (its WITHOUT_COLLECTOR).
    import importlib
    calls = importlib.import_module(module)
    # What its calls import on first use, imported now, before "ready":
    # the worker starts while the tracer's program compiles, and its first
    # calls (the start-up scans) then do not pay for them on the way to
    # the tracer's "ready". Not for a caller that never makes those calls
    # (snapshot): there the imports (pyelftools, 25-40 ms) would be on the
    # way to its first answer, for nothing.
    if preload:
        for name in getattr(calls, "PRELOAD", ()):
            importlib.import_module(name)
    return calls.CALLS, frozenset(getattr(calls, "WITHOUT_COLLECTOR", ()))


def _die_with_parent(parent: int) -> None:
    """The worker must not outlive the tracer (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:          # the parent died before the prctl
        os._exit(0)


_send_lock = threading.Lock()
# How often the worker says that its reads move on (a "progress" frame,
# sent only when procfs.progress changed since the last one).
PROGRESS_EVERY_S = 0.25


_by_init: dict = {}


def _init_fields(cls) -> Optional[tuple]:
    """(number of fields, a getter of their values as a tuple) for a
    dataclass of this package that its __init__ rebuilds whole from them in
    order (every field a positional init argument, no __post_init__), else
    None."""
    try:
        return _by_init[cls]
    except KeyError:
        pass
    found = None
    if (dataclasses.is_dataclass(cls) and cls.__module__.startswith("closewait_trace.")
            and not hasattr(cls, "__post_init__")):
        fields = dataclasses.fields(cls)
        # Keyword-only fields cannot be passed in order: the default way.
        if fields and all(f.init and not f.kw_only for f in fields):
            names = [f.name for f in fields]
            # attrgetter of several names gives a tuple, of one the value.
            found = (len(names), operator.attrgetter(*names) if len(names) > 1
                     else lambda obj, name=names[0]: (getattr(obj, name),))
    _by_init[cls] = found
    return found


class _Pickler(pickle.Pickler):
    """Pickles the answers' dataclasses as their constructor and field
    values: unpickled by one __init__ call instead of the default's
    field-by-field __setstate__ in Python, and half the bytes. A snapshot's
    answer holds four such objects per socket (its endpoints, ownership,
    holder and the socket), and pickling them the default way cost more
    than reading /proc for them."""

    def reducer_override(self, obj):
        cls = type(obj)
        if cls is owners.Holder:
            return self._holder(obj)
        found = _by_init[cls] if cls in _by_init else _init_fields(cls)
        if found is None:
            return NotImplemented
        # An attribute set outside the fields would be lost: the default way.
        state = getattr(obj, "__dict__", None)
        if state is not None and len(state) != found[0]:
            return NotImplemented
        return cls, found[1](obj)

    def _holder(self, holder):
        # A holder's process-wide fields as one tuple per process and
        # answer, pickled once and then referenced by the memo: unpickled,
        # the holders of one process share its pid and ppid ints instead of
        # two new ones per socket (11 MB at 100,000 sockets, kept while
        # they linger), and the answer is smaller. Keyed by the values
        # themselves (the snapshot by identity: it has no hash), so two
        # holders share a part only when every shared field is the same.
        part = holder.process_part()
        key = part[:-1] + (id(part[-1]),)
        shared = self._parts.get(key)
        if shared is None:
            shared = self._parts[key] = part
        return owners.holder_of_process, (shared, holder.fd, holder.cloexec)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts: dict = {}      # (process part, snapshot's id) -> the part pickled


# What a frame's kind may be (serve's _send): anything else is not a frame.
_KINDS = frozenset(("ready", "progress", "item", "done", "error"))


# Every global the worker's answers name when pickled: the classes and the
# one function (owners.holder_of_process) their values are rebuilt by, and
# the address families. What each call in gathering.CALLS returns was
# walked for them, and find_class logged over every test suite (kernel
# ones included) asked for these and no other. An answer that comes to
# name another (a new type in one) fails as unreadable: add it here.
ANSWER_GLOBALS = frozenset({
    ("closewait_trace.evidence.diagnosis", "ProcessEvidence"),
    ("closewait_trace.evidence.diagnosis", "ThreadEvidence"),
    ("closewait_trace.evidence.gathering", "SnapshotRead"),
    ("closewait_trace.evidence.pyframes", "PyFrame"),
    ("closewait_trace.evidence.symbolize", "Frame"),
    ("closewait_trace.kernel.events", "Endpoints"),
    ("closewait_trace.sockets.owners", "Census"),
    ("closewait_trace.sockets.owners", "Ownership"),
    ("closewait_trace.sockets.owners", "RescanRead"),
    ("closewait_trace.sockets.owners", "holder_of_process"),
    ("closewait_trace.sockets.procfs", "ProcessSnapshot"),
    ("closewait_trace.sockets.tcprow", "TcpRow"),
    ("closewait_trace.sockets.tracker", "Lingerer"),
    ("socket", "AF_INET"),
    ("socket", "AF_INET6"),
})


class _AnswerUnpickler(pickle.Unpickler):
    """The worker's answers carry text other users chose (process names,
    paths, their programs' function names). Should a frame's bounds ever
    slip, the tracer would unpickle from inside such text, and a pickle
    calls whatever it names: here it can name only ANSWER_GLOBALS, checked
    before anything is imported. (Any function of this package was too
    many: one creates a root-owned file at the path it is given, another
    writes to any of the tracer's fds.)"""

    def find_class(self, module, name):
        if (module, name) in ANSWER_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not the worker's to send")


class _ViewReader:
    """A frame's bytes as the file an Unpickler reads, without the copy of
    the whole that io.BytesIO would make (a 60 MB answer): the unpickler
    reads it a pickle frame (64 KB) at a time."""

    def __init__(self, view: memoryview):
        self._view = view
        self._at = 0

    def read(self, n: int = -1) -> bytes:
        start = self._at
        end = len(self._view) if n is None or n < 0 else min(len(self._view), start + n)
        self._at = end
        return bytes(self._view[start:end])

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def peek(self, n: int = 0) -> bytes:
        # What the unpickler reads ahead by when a pickle has no frames
        # (only a forged one): without it, one read() call per opcode.
        return bytes(self._view[self._at:self._at + max(n, 1)])

    def readline(self) -> bytes:
        # Only the text opcodes of protocol 0 read lines: no answer has one.
        raise pickle.UnpicklingError("a text opcode: not the worker's")


def dumps(value) -> bytes:
    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except RecursionError:
        # An object reachable from its own fields: a constructor call needs
        # them first, and only the default way (object, then its state)
        # can rebuild that.
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


def _send(out: int, kind: str, payload) -> None:
    """One frame to the fd out (the worker's stdout), written whole: under
    PYTHONUNBUFFERED=1 sys.stdout.buffer's write() dropped what a write(2)
    stopped and continued mid-way did not take (wholewrite.py), and the
    tracer died unpickling the rest. Its header and its pickle apart: no
    copy of a 60 MB answer to join them."""
    data = dumps((kind, payload))
    with _send_lock:
        write_all(out, _HEADER.pack(len(data)))
        write_all(out, data)


def _report_progress(out: int) -> None:
    """A thread of the worker: while reads complete, says so. A read that
    blocks stops the count, so the tracer's progress deadline tells a long
    batch from a stall."""
    from closewait_trace.sockets import procfs
    seen = procfs.progress
    while True:
        time.sleep(PROGRESS_EVERY_S)
        now = procfs.progress
        if now != seen:
            seen = now
            try:
                _send(out, "progress", None)
            except (OSError, ValueError):
                return


def serve(parent: int, calls_module: str = DEFAULT_CALLS, preload: bool = True,
          collect: bool = True) -> None:
    """The child's loop: read a call, run it, answer; until stdin closes.
    preload: import the calls module's PRELOAD before saying "ready".
    collect: False turns Python's cyclic collector off for good."""
    import gc
    _die_with_parent(parent)
    if not collect:
        gc.disable()
    # Terminal signals are the tracer's to handle, not ours.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGPIPE else signal.SIG_IGN)
    calls, without_collector = _calls(calls_module, preload)
    inp, out = sys.stdin.buffer, sys.stdout.fileno()
    sys.stdout = sys.stderr        # a stray print must not corrupt the protocol
    # Started: the interpreter and its imports took what they took (seconds
    # on a loaded or emulated machine); a call's stall time counts from here.
    _send(out, "ready", None)
    threading.Thread(target=_report_progress, args=(out,), daemon=True).start()
    while True:
        head = inp.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return
        (size,) = _HEADER.unpack(head)
        name, args, kwargs = pickle.loads(inp.read(size))
        # Paused for the whole call, its answer's pickling included (a
        # streamed answer is made as it is sent), then on again: what the
        # call left in a cycle goes at the next collection.
        paused = collect and name in without_collector
        if paused:
            gc.disable()
        try:
            result = calls[name](*args, **kwargs)
            if isinstance(result, Iterator):
                for item in result:
                    _send(out, "item", item)
                result = None
            _send(out, "done", result)
        except Exception as e:          # evidence, never a reason to stop serving
            _send(out, "error", f"{type(e).__name__}: {e}"[:300])
        finally:
            if paused:
                gc.enable()


# ----------------------------------------------------------------- parent

@dataclass(eq=False)
class Pending:
    """A call begun (GatherWorker.begin), its answer taken by result()."""

    worker: "GatherWorker"
    deadline_at: float
    progress_s: Optional[float]
    stream: bool
    proc: Optional[subprocess.Popen] = None
    items: list = field(default_factory=list)
    progress_at: float = 0.0
    done: bool = False
    value: object = None
    error: Optional[GatherFailed] = None

    def result(self):
        """The answer (waiting for it as call does), or its GatherFailed."""
        if not self.done:
            self.worker._wait(self)
        if self.error is not None:
            raise self.error
        return self.value

    def poll(self) -> bool:
        """Whether result() would return without waiting: its answer (or its
        failure: a deadline passed, the worker gone) is in. Takes what the
        worker has written so far, never waits: a loop that begun a call
        looks at it once a tick."""
        return self.done or self.worker._wait(self, poll=True)


@dataclass
class GatherWorker:
    """The tracer's side: one child at a time, calls with deadlines.

    abort: asked while waiting; True gives up the call at once (the loop
    sets it when a stop signal came). while_waiting: called between waits of
    at most 0.1 s (the loop drains the kernel's ring buffer there)."""

    abort: Callable[[], bool] = lambda: False
    calls_module: str = DEFAULT_CALLS
    # Import the calls' PRELOAD at start (the live tracer's start-up scans
    # use them); False for a caller that never calls those (snapshot).
    preload: bool = True
    # The cyclic collector on in the worker. Off for a worker that answers
    # a call or two and is ended (snapshot): it only walked the objects of
    # the answer, kept until pickled, finding nothing (4-8% of the CPU of
    # reading and pickling 10,000 sockets).
    collect: bool = True
    while_waiting: Optional[Callable[[], None]] = None
    timeouts: int = 0                     # calls that missed their deadline
    failures: int = 0                     # calls that failed otherwise
    _proc: Optional[subprocess.Popen] = None
    _ready: bool = False                  # the worker said "ready" (imports done)
    _buf: bytearray = field(default_factory=bytearray)
    _abandoned: list = field(default_factory=list)   # [Popen, tag] of killed workers
    _last_abandoned: Optional[list] = None
    _pending: Optional["Pending"] = None  # a call begun, its answer not yet taken

    def _check_suspended(self, reads_memory: bool) -> None:
        stuck = self.stuck_workers()
        limit = MAX_STUCK_WORKERS if reads_memory else MAX_STUCK_WORKERS_ANY
        if stuck >= limit:
            raise GatherFailed(f"{SUSPENDED}: {stuck} earlier reads still blocked "
                               "in the kernel")

    def _start(self) -> subprocess.Popen:
        # The one the command's entry point started for this very use
        # (spawn.prestart), else a new one.
        self._proc = (spawn.take_early(self.calls_module, self.preload, self.collect)
                      or spawn.start_process(self.calls_module, self.preload, self.collect))
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._buf = bytearray()
        self._ready = False
        return self._proc

    def start(self) -> None:
        """Starts the worker now rather than at the first call: its start-up
        (an interpreter, its imports) then runs while the caller does
        its own (snapshot). Without a call it only waits on its stdin."""
        if self._proc is None or self._proc.poll() is not None:
            try:
                self._start()
            except OSError:
                pass            # the first call tries again, and says why it failed

    def _reap(self) -> None:
        self._abandoned = [entry for entry in self._abandoned if entry[0].poll() is None]

    def stuck_workers(self) -> int:
        """Abandoned workers not yet dead (blocked in the kernel)."""
        self._reap()
        return len(self._abandoned)

    def stuck_tags(self) -> set:
        """The tags of abandoned workers not yet dead."""
        self._reap()
        return {tag for _, tag in self._abandoned if tag is not None}

    def tag_last_abandoned(self, tag) -> None:
        """Names what the last abandoned worker was blocked on (a user)."""
        if self._last_abandoned is not None:
            self._last_abandoned[1] = tag

    def _abandon(self) -> None:
        # A call begun whose answer was not taken gets none.
        pending, self._pending = self._pending, None
        self._buf = bytearray()         # that worker's, up to MAX_FRAME: let go now
        if pending is not None and not pending.done:
            pending.done, pending.error = True, GatherFailed(STOPPED, pending.items)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
        except OSError:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._last_abandoned = [proc, None]
        self._abandoned.append(self._last_abandoned)

    def close(self) -> None:
        """Ends the worker without waiting for it."""
        self._abandon()

    def adopt(self, fds: list, deadline_s: float = ADOPT_S) -> Optional[Callable[[], bool]]:
        """Hand fds over to the running worker (gathering.adopt_fds): it
        keeps a copy of each until it ends. Returns a check, true while
        that worker still runs (its copies then open), or None when it did
        not take them all. Only a worker that is up is asked (never one
        started for this); a stop requested meanwhile does not abort it."""
        proc = self._proc
        if not fds or proc is None or proc.poll() is not None:
            return None
        if self._pending is not None and not self._pending.done:
            return None         # busy with a call begun: not waited for at exit
        abort, self.abort = self.abort, (lambda: False)
        waiting, self.while_waiting = self.while_waiting, None
        try:
            if self.call("adopt_fds", os.getpid(), list(fds),
                         deadline_s=deadline_s) != len(fds):
                return None
        except GatherFailed:
            return None
        finally:
            self.abort, self.while_waiting = abort, waiting
        return lambda: self._proc is proc and proc.poll() is None

    def call(self, name: str, *args, deadline_s: Optional[float] = None,
             deadline_at: Optional[float] = None, progress_s: Optional[float] = None,
             stream: bool = False, reads_memory: bool = False, **kwargs):
        """Run name(*args, **kwargs) in the worker and return its result
        (stream: the list of what it yielded), or raise GatherFailed after
        deadline_s seconds (scaled by CLOSEWAIT_TRACE_TIME_SCALE) or at the
        monotonic time deadline_at, after progress_s seconds (scaled) with
        nothing streamed, when aborted, or when the worker failed; at once
        when too many abandoned workers are still blocked (reads_memory: the
        call reads other processes' memory, suspended first)."""
        return self.begin(name, *args, deadline_s=deadline_s, deadline_at=deadline_at,
                          progress_s=progress_s, stream=stream, reads_memory=reads_memory,
                          **kwargs).result()

    def begin(self, name: str, *args, deadline_s: Optional[float] = None,
              deadline_at: Optional[float] = None, progress_s: Optional[float] = None,
              stream: bool = False, reads_memory: bool = False, **kwargs) -> "Pending":
        """call's first half: the call sent, its answer left to
        Pending.result(), which waits for it as call does, under the same
        deadlines, counted from now. Meanwhile the worker works and the
        caller does its own (the loop writes a batch's records while the
        next batch's owners are looked up). A call made before that result
        is taken waits for it first (one call at a time in the worker) and
        keeps it for result(). A failure to send raises GatherFailed here."""
        scale = knobs.time_scale()
        if deadline_at is None:
            deadline_at = time.monotonic() + (deadline_s or 0.0) * scale
        if self._pending is not None and not self._pending.done:
            # Its answer read first, within this call's deadline too: past
            # it, that worker is abandoned (the begun call gets none) and
            # this call has a new one.
            self._wait(self._pending, cap=deadline_at)
        pending = Pending(self, deadline_at, progress_s, stream)
        try:
            self._check_suspended(reads_memory)
            if self._proc is not None and self._proc.poll() is None:
                proc = self._proc
            else:
                try:
                    proc = self._start()
                except OSError as e:
                    # No process to be had (a process or task limit, no
                    # memory): this call fails, as any read that could not
                    # be made; the next starts one again.
                    self.failures += 1
                    raise GatherFailed(f"{NO_WORKER} ({e.strerror})") from None
            # The fast pickler: a batch of 100,000 sockets' Endpoints took
            # 0.3-0.5 s to pickle field by field (dataclasses' __getstate__).
            self._waiting()
            data = dumps((name, args, kwargs))
            try:
                # In pieces, with a look at what the caller waits on between
                # them (while_waiting): a large request (100,000 sockets'
                # endpoints) is written as fast as the worker reads it, and
                # with 10 processes exiting on 2 CPUs the loop waited here
                # with its ring buffer filling.
                with memoryview(_HEADER.pack(len(data)) + data) as frame:
                    for start in range(0, len(frame), WRITE_PIECE):
                        proc.stdin.write(frame[start:start + WRITE_PIECE])
                        proc.stdin.flush()
                        self._waiting()
            except OSError as e:
                self._abandon()
                raise GatherFailed(f"worker gone ({e.strerror})") from None
        except GatherFailed:
            pending.done = True
            raise
        pending.proc, pending.progress_at = proc, time.monotonic()
        self._pending = pending
        return pending

    def _wait(self, p: "Pending", cap: Optional[float] = None, poll: bool = False) -> bool:
        """Waits for p's answer (call's second half) and keeps it in p: its
        value, or the GatherFailed that ends the wait; no later than cap
        (monotonic), when given. The stall time counts from the wait's
        start: while the caller did its own work nothing read the worker's
        frames (its answer may be whole in the pipe by now).
        poll: no waiting: what the worker has written so far is taken, and
        False returned (p not done) when its answer is not all there."""
        scale = knobs.time_scale()
        proc, items = p.proc, p.items
        if not poll:
            p.progress_at = max(p.progress_at, time.monotonic())
        # (Not when polled: polled every tick, a stalled read's clock was
        # set back each time, and it was abandoned only at its overall
        # deadline, 30 s, instead of its stall time, 2 s: a review.)
        finished = True
        try:
            while True:
                for kind, payload in self._frames():
                    if kind in ("progress", "ready"):
                        self._ready = self._ready or kind == "ready"
                        p.progress_at = time.monotonic()
                    elif kind == "item":
                        items.append(payload)
                        p.progress_at = time.monotonic()
                    elif kind == "done":
                        p.value = items if p.stream else payload
                        return True
                    else:                   # "error" (_frames lets no other through)
                        self.failures += 1
                        raise GatherFailed(str(payload), items)
                if self.abort():
                    self._abandon()
                    raise GatherFailed(STOPPED, items)
                deadline = p.deadline_at if cap is None else min(p.deadline_at, cap)
                # The stall time is for reads: a worker still starting (a new
                # interpreter importing the package: seconds under load, as
                # was seen under QEMU's emulation, where the tracer's first
                # call, the start's snapshot of the sockets already in
                # CLOSE_WAIT, was abandoned and they were never reported) has
                # only the call's overall deadline.
                if p.progress_s is not None and self._ready:
                    deadline = min(deadline, p.progress_at + p.progress_s * scale)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timeouts += 1
                    self._abandon()
                    raise GatherFailed(TIMED_OUT, items)
                if self.while_waiting is not None and not poll:
                    self.while_waiting()
                    if self.abort():
                        continue
                try:
                    ready, _, _ = select.select([proc.stdout], [], [],
                                                0 if poll else min(0.1, left))
                except InterruptedError:
                    continue
                if poll and not ready:
                    finished = False
                    return False
                if ready and not self._read(proc):
                    self._abandon()
                    self.failures += 1
                    raise GatherFailed("worker exited", items)
        except GatherFailed as e:
            if not e.partial:
                e.partial = items
            p.error = e
        finally:
            if finished:
                p.done = True
                if self._pending is p:
                    self._pending = None
        return True

    def idle(self) -> bool:
        """Whether a call sent now would be the worker's next: no call begun
        whose answer is still to come (begin would wait for it first)."""
        return self._pending is None or self._pending.done

    def _waiting(self) -> None:
        if self.while_waiting is not None:
            self.while_waiting()

    def _read(self, proc) -> bool:
        try:
            chunk = os.read(proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _frames(self):
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                self.failures += 1
                self._abandon()
                raise GatherFailed("worker answer too large")
            if len(self._buf) < _HEADER.size + size:
                return
            # Unpickled from the buffer itself: a copy first would double
            # the tracer's peak for a large answer (100,000 owners: 60 MB).
            try:
                with memoryview(self._buf) as view, \
                        view[_HEADER.size:_HEADER.size + size] as data:
                    value = _AnswerUnpickler(_ViewReader(data)).load()
                why = None if (type(value) is tuple and len(value) == 2
                               and value[0] in _KINDS) else "not a frame"
            except Exception as e:
                why = type(e).__name__
            except BaseException:
                # Interrupted (KeyboardInterrupt): that frame is not taken,
                # so neither may the rest of that worker's stream be.
                self.failures += 1
                self._abandon()
                raise
            if why is not None:
                # Not what the worker sent (bytes lost on the way, or a
                # bug): that worker's stream cannot be trusted past here.
                # The call fails, as any read that could not be made; the
                # loop goes on (it crashed on this with "internal error").
                # A frame of another shape that unpickled is as bad: taken
                # for an answer, the call's own would have been the next's.
                self.failures += 1
                self._abandon()
                raise GatherFailed(f"{UNREADABLE} ({why})")
            del self._buf[:_HEADER.size + size]
            yield value
