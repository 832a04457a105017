"""Why has a lingering socket not been closed? A one-line cause with evidence.

Reads /proc only (never attaches to, signals or pauses a process). The pure
decision, `diagnose`, takes the evidence as values so it is tested without
root; `gather` collects that evidence from /proc defensively: a process that
exits mid-inspection leaves a partial diagnosis, never an error.
"""

from __future__ import annotations

import errno
import os
import platform
from dataclasses import dataclass, field
from typing import Optional, Sequence

from closewait_trace.sockets import identity, procfs
from closewait_trace.sockets.owners import (OWNER_ACCEPT_QUEUE, OWNER_AMBIGUOUS, OWNER_DENIED,
                                            OWNER_FDS_NOT_READ, OWNER_GONE, OWNER_NONE,
                                            OWNER_UNREADABLE, Ownership)

STOPPED = "stopped"
TRACED = "traced"
NEVER_ACCEPTED = "never_accepted"
LEAKED = "leaked"
BLOCKED_ELSEWHERE = "blocked_elsewhere"
NEVER_READ = "never_read"
IGNORING_EOF = "ignoring_eof"
EXITING = "exiting"
GONE = "gone"
UNKNOWN = "unknown"

# A holder process whose evidence the gathering worker did not deliver.
NOT_GATHERED = "not read: not gathered"
NOT_READ_NO_FDS = "not read: out of file descriptors"


# System calls in which a thread waits for readiness of some fd: a holder
# parked there is alive and polling, yet has not closed this socket.
_POLLING_SYSCALLS = {
    "x86_64": {7: "poll", 23: "select", 232: "epoll_wait", 270: "pselect6",
               271: "ppoll", 281: "epoll_pwait", 441: "epoll_pwait2"},
    "aarch64": {72: "pselect6", 73: "ppoll", 22: "epoll_pwait", 441: "epoll_pwait2"},
}
_READ_SYSCALLS = {
    "x86_64": {0: "read", 45: "recvfrom", 47: "recvmsg", 299: "recvmmsg", 19: "readv"},
    "aarch64": {63: "read", 207: "recvfrom", 212: "recvmsg", 243: "recvmmsg", 65: "readv"},
}
_ACCEPT_SYSCALLS = {
    "x86_64": {43: "accept", 288: "accept4"},
    "aarch64": {202: "accept", 242: "accept4"},
}
_OTHER_SYSCALLS = {
    "x86_64": {34: "pause", 35: "nanosleep", 202: "futex", 61: "wait4",
               230: "clock_nanosleep",
               130: "rt_sigsuspend", 128: "rt_sigtimedwait", 1: "write",
               42: "connect", 247: "waitid",
               # A process that stopped itself (os.kill(getpid(), SIGSTOP),
               # raise(SIGSTOP)) is seen in the call that sent the signal.
               62: "kill", 200: "tkill", 234: "tgkill"},
    "aarch64": {101: "nanosleep", 98: "futex", 260: "wait4", 115: "clock_nanosleep",
                133: "rt_sigsuspend",
                64: "write", 203: "connect", 95: "waitid",
                129: "kill", 130: "tkill", 131: "tgkill"},
}


def syscall_name(number: int, machine: Optional[str] = None) -> str:
    machine = machine or platform.machine()
    for table in (_POLLING_SYSCALLS, _READ_SYSCALLS, _ACCEPT_SYSCALLS, _OTHER_SYSCALLS):
        name = table.get(machine, {}).get(number)
        if name:
            return name
    return f"syscall_{number}"


@dataclass(slots=True)
class ThreadEvidence:
    tid: int
    state: str
    wchan: str = ""
    syscall: Optional[int] = None        # None: running in user space or unknown
    syscall_name: str = ""
    syscall_fd: Optional[int] = None      # first argument, when it is an fd
    syscall_fd_target: str = ""           # what that fd is: socket:[N], pipe:[N], a path
    stack: list = field(default_factory=list)   # symbolize.Frame, innermost first
    python: list = field(default_factory=list)  # pyframes.PyFrame, innermost first
    _serving: Optional[bool] = None
    # Decided once too, as serving: where it waits, and whether that is in
    # the program's own Python code (per socket, they cost the diagnosis of
    # 100,000 sockets of one process 0.6 s).
    _location: Optional[str] = None
    _own_python: Optional[bool] = None

    def serving(self, machine: str) -> bool:
        # Threads are shared by all sockets of a process: decide once.
        if self._serving is None:
            self._serving = _is_serving(self, machine)
        return self._serving

    def in_own_python(self) -> bool:
        """Its innermost Python frame is in the program's own code."""
        if self._own_python is None:
            self._own_python = bool(self.python and self.python[0].own_code)
        return self._own_python

    def as_dict(self) -> dict:
        out = {"tid": self.tid, "state": self.state, "wchan": self.wchan,
                "syscall": self.syscall_name or None, "syscall_fd": self.syscall_fd,
                "syscall_fd_target": self.syscall_fd_target or None,
                "stack": [f.as_dict() for f in self.stack]}
        if self.python:
            out["python"] = [f.as_dict() for f in self.python]
        return out

    def user_location(self) -> str:
        """Where the program itself is waiting: its innermost Python frame
        for a CPython program (the C frames are the interpreter's), else the
        innermost frame outside the module the syscall was made in (usually
        libc)."""
        if self._location is None:
            self._location = self._user_location()
        return self._location

    def _user_location(self) -> str:
        if self.python:
            from closewait_trace.evidence import pyframes
            return pyframes.own_frame(self.python).describe()
        if not self.stack:
            return ""
        inner = self.stack[0].module
        for frame in self.stack[1:]:
            if frame.module != inner and frame.function:
                return frame.describe()
        return self.stack[0].describe()


class HolderEvidence:
    """What is known of one holder of a socket: its fd's own facts
    (cloexec, whether the process holds the listener too) and, by
    reference, the owner lookup's holder (pid, comm, fd, state, ppid,
    cmdline, tracer_pid) and its process's evidence (ProcessEvidence:
    threads, identity, exiting, tracer's comm, what was not read). One
    exists per socket of a batch until its record is written: 64 bytes,
    where the same fields copied were 176 (17 MB at the peak of a batch of
    95,000; issue 20, target 2)."""

    __slots__ = ("_holder", "_process", "cloexec", "holds_listener")

    def __init__(self, pid: int, comm: str, fd: int, state: str, ppid: int, cmdline: str,
                 cloexec: Optional[bool] = None, exiting: bool = False, tracer_pid: int = 0,
                 tracer_comm: str = "", holds_listener: bool = False,
                 threads: Optional[list] = None, identity: Optional[dict] = None,
                 threads_total: int = 0, unreadable: str = "", stacks_not_read: str = "",
                 python_not_read: str = "", examined: Optional[list] = None):
        """From each field's value (the tests'); a batch's are made by of()."""
        from closewait_trace.sockets.owners import Holder
        self._holder = Holder(pid, comm, fd, state, ppid, None, cmdline, tracer_pid)
        self._process = ProcessEvidence(
            pid, threads=list(threads or ()), examined=list(examined or ()),
            threads_total=threads_total, identity=identity if identity is not None else {},
            tracer_comm=tracer_comm, exiting=exiting, unreadable=unreadable,
            stacks_not_read=stacks_not_read, python_not_read=python_not_read)
        self.cloexec = cloexec
        self.holds_listener = holds_listener

    @classmethod
    def of(cls, holder, process: "ProcessEvidence", cloexec: Optional[bool],
           holds_listener: bool) -> "HolderEvidence":
        ev = cls.__new__(cls)
        ev._holder, ev._process = holder, process
        ev.cloexec, ev.holds_listener = cloexec, holds_listener
        return ev

    # The holder's, as the owner lookup found it.
    pid = property(lambda self: self._holder.pid)
    comm = property(lambda self: self._holder.comm)
    fd = property(lambda self: self._holder.fd)
    state = property(lambda self: self._holder.state)
    ppid = property(lambda self: self._holder.ppid)
    cmdline = property(lambda self: self._holder.cmdline)
    tracer_pid = property(lambda self: self._holder.tracer_pid)
    # Its process's, read once per batch.
    tracer_comm = property(lambda self: self._process.tracer_comm)
    exiting = property(lambda self: self._process.exiting)
    threads = property(lambda self: self._process.threads)
    identity = property(lambda self: self._process.identity)
    threads_total = property(lambda self: self._process.threads_total)
    # Threads not read: "permission denied", "gone", or why they were not
    # gathered ("not read: timed out", see NOT_GATHERED and gathering.py).
    unreadable = property(lambda self: self._process.unreadable)
    stacks_not_read = property(lambda self: self._process.stacks_not_read)
    # A CPython process whose Python frames were not read: why.
    python_not_read = property(lambda self: self._process.python_not_read)
    examined = property(lambda self: self._process.examined)    # the cause's threads

    FIELDS = ("pid", "comm", "fd", "state", "ppid", "cmdline", "cloexec", "exiting",
              "tracer_pid", "tracer_comm", "holds_listener", "threads", "identity",
              "threads_total", "unreadable", "stacks_not_read", "python_not_read", "examined")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other):
        if type(other) is not HolderEvidence:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None     # compared by value, as the dataclass it was

    def __repr__(self) -> str:
        return "HolderEvidence(" + ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.FIELDS) + ")"

    def fd_facts(self) -> dict:
        """What concerns this socket's fd, beyond the owners entry. What
        concerns the whole process (threads, stacks, identity) is in
        process_dict, written once per process in a `process` record rather
        than once per socket: a process can hold 10,000 sockets."""
        out = {"cloexec": self.cloexec, "exiting": self.exiting}
        if self.tracer_pid:
            out["tracer"] = {"pid": self.tracer_pid, "comm": self.tracer_comm}
        return out

    def process_dict(self) -> dict:
        out = {"pid": self.pid, "comm": self.comm, "state": self.state, "ppid": self.ppid,
               "cmdline": self.cmdline, "exiting": self.exiting,
               "threads": [t.as_dict() for t in self.threads],
               "threads_total": self.threads_total or len(self.threads),
               "identity": self.identity}
        if self.tracer_pid:
            out["tracer"] = {"pid": self.tracer_pid, "comm": self.tracer_comm}
        if self.unreadable:
            out["unreadable"] = self.unreadable
        if self.stacks_not_read:
            out["stacks_not_read"] = self.stacks_not_read
        if self.python_not_read:
            out["python_not_read"] = self.python_not_read
        return out


class EvidenceWritten(RuntimeError):
    """A diagnosis's evidence asked for after Diagnosis.written()."""


_WRITTEN = object()     # Diagnosis._own once its evidence was let go
# Written diagnoses shared by cause and summary (Diagnosis.written): the
# summaries name holder processes, so a machine has about as many as it
# has holders; past this many the table starts again (holders that left
# are forgotten; what sockets share stays shared).
WRITTEN_SHARED_MAX = 1024
# Longer summaries are not shared (each socket keeps its own, as before):
# with the count above, the two tables hold at most about 1 MB of text,
# whatever names other users give their programs and functions.
SHARED_SUMMARY_MAX_CHARS = 512
_written_shared: dict = {}
_summaries: dict = {}           # summary text -> the one kept (shared_summary)


class Diagnosis:
    """A cause, its one-line summary, and the evidence, built on demand from
    objects shared per process (kept small: one exists per lingering socket,
    and there may be 100,000)."""

    __slots__ = ("cause", "summary", "_own", "_holders", "_listeners", "_server")

    def __init__(self, cause: str, summary: str, server: tuple = ()):
        self.cause = cause
        self.summary = summary
        self._own = None
        self._holders = ()
        self._listeners = ()
        self._server = server       # the accepting process, for an inherited socket

    @property
    def evidence_let_go(self) -> bool:
        """written() was called: the evidence is gone (asked, it raises)."""
        return self._own is _WRITTEN

    def written(self) -> "Diagnosis":
        """The evidence was written (the socket's linger record is out):
        what it rests on is let go. A lingering socket keeps its diagnosis
        for its cause and summary only (the CLOSED line, `top`, the
        summary); its holders' evidence, copied per fd (168 bytes a socket,
        17 MB at 100,000), would be kept for nothing. Asked again, the
        evidence raises rather than say nothing.

        Returns what to keep instead of it: one written diagnosis shared by
        every socket with the same cause and summary (the sockets of one
        holder share their summary's text, and an object of 80 bytes each
        was 8 MB at 100,000), this one when it is the first."""
        self._own, self._holders, self._listeners, self._server = _WRITTEN, (), (), ()
        if len(self.summary) > SHARED_SUMMARY_MAX_CHARS:
            return self
        return _share(_written_shared, (self.cause, self.summary), self)

    @property
    def evidence(self) -> dict:
        """What the cause rests on, by reference: the holders themselves are
        in the record's `owners` (and `listener.owners`), written once."""
        own = self._own
        if own is _WRITTEN:
            raise EvidenceWritten("the evidence of this diagnosis was written and let go")
        if own is None:
            return {}
        out = {"holders": [{"pid": h.pid, "fd": h.fd} for h in self._holders]}
        if own.kind == OWNER_ACCEPT_QUEUE:
            out["listener_holders"] = [{"pid": h.pid, "fd": h.fd} for h in self._listeners]
        if self._server:
            out["accepting_process"] = [{"pid": h.pid, "fd": h.fd} for h in self._server]
        if own.netns_denied:
            out["denied_netns_processes"] = own.netns_denied
        if own.denied_processes:
            # How many fd tables could not be read: the holders above may
            # not be all of them (or, with none, who holds it is unknown).
            out["denied_processes"] = own.denied_processes
        if own.fds_not_read:
            # How many were left unread when the walk's time was up: the same.
            out["fds_not_read_processes"] = own.fds_not_read[0]
        return out

    def holder_facts(self) -> dict:
        """(pid, fd) -> what the diagnosis learnt of each holder beyond its
        owners entry: close-on-exec, exiting, tracer."""
        if self._own is _WRITTEN:
            raise EvidenceWritten("the evidence of this diagnosis was written and let go")
        return {(h.pid, h.fd): h.fd_facts() for h in self._holders}

    def as_dict(self) -> dict:
        return {"cause": self.cause, "summary": self.summary, "evidence": self.evidence}


def denied_summary(processes: int) -> str:
    return (f"unknown: permission denied reading {processes} "
            f"process{'es' if processes != 1 else ''}' file descriptors")


def _processes(n: int, named: Sequence[str], other: str = "") -> str:
    """"N processes (a, b and M more)", "N other processes" with other."""
    more = n - len(named)
    return (f"{n} {other}process{'es' if n != 1 else ''}"
            + (f" ({', '.join(named)}{f' and {more} more' if more > 0 else ''})"
               if named else ""))


def unread_summary(own: Ownership) -> str:
    """Why no holder is named when no process read holds it, and some were
    not read: permission denied, or the fd walk's time up (or both)."""
    said = []
    if own.denied_processes or not own.fds_not_read:
        said.append(denied_summary(own.denied_processes))
    if own.fds_not_read:
        n, named = own.fds_not_read
        said.append(("" if said else "unknown: no holder among the processes read; ")
                    + f"the file descriptors of {_processes(n, named)} were not read in "
                      f"time")
    return "; ".join(said)


def _lives_on(h: HolderEvidence) -> bool:
    """Whether a thread of h other than its leader was seen alive: a leader
    that called pthread_exit() is a zombie (its stat says Z, its flags
    PF_EXITING) while the process goes on in its other threads."""
    return any(t.tid != h.pid and t.state not in ("Z", "X")
               for t in h.examined or h.threads)


def _who(h: HolderEvidence) -> str:
    return f"{h.pid}/{h.comm}"


# A summary names at most this many processes: one socket shared by 3,001
# forks made a 60 KB summary, in every record and line about it; the
# evidence (holders, with pid and fd) keeps the whole list.
MAX_NAMED = 8


def _listed(items: list[str], unlisted: int = 0) -> str:
    """'a, b, c' or, past MAX_NAMED, 'a, ..., h and 2993 more'; unlisted:
    how many more there are than items (holders not listed)."""
    if len(items) <= MAX_NAMED and not unlisted:
        return ", ".join(items)
    more = max(0, len(items) - MAX_NAMED) + unlisted
    return ", ".join(items[:MAX_NAMED]) + f" and {more} more"


def _unlisted(own: Ownership) -> tuple[int, int]:
    """fds of its holders not listed (owners.FDS_LISTED_PER_PROCESS): (on
    the socket, on its listener)."""
    return own.holders_cut or (0, 0)


@dataclass(frozen=True)
class EofReader:
    """Who read the socket to its end, and where (the kernel saw it)."""
    pid: int
    place: str          # 'handle_client+0x1f (srv)'; "" when not unwound


@dataclass(frozen=True)
class Opener:
    """Who connect()ed the socket, and where (the kernel saw it); and
    whether the kernel watched its reads since the peer closed and saw none
    (a live trace with EOF reads located, the socket traced since then)."""
    pid: int
    place: str
    none_read: bool


def diagnose(own: Ownership, holders: list[HolderEvidence],
             listener_holders: list[HolderEvidence],
             machine: Optional[str] = None, eof: Optional[EofReader] = None,
             opener: Optional[Opener] = None) -> Diagnosis:
    """The most specific cause the evidence supports; UNKNOWN otherwise."""
    found = _decide(own, holders, listener_holders, machine, eof, opener)
    found._own, found._holders, found._listeners = own, holders, listener_holders
    # A tracer attached to a process that is not stopped (strace -p) is worth
    # saying whatever the cause: it slows the process and may be why.
    traced = [h for h in holders if h.tracer_pid and h.state != "t"]
    if traced and found.cause != TRACED:
        found.summary += "; " + _listed([
            f"{_who(h)} traced by {h.tracer_pid}/{h.tracer_comm or '?'}" for h in traced])
    # Holders were found, but other processes could not be read: the list,
    # and a cause drawn from it (one holder or several), may be incomplete.
    if holders and own.denied_processes:
        found.summary += (f"; holders may be missing: permission denied reading "
                          f"{_processes(own.denied_processes, own.denied_named, 'other ')}")
    if holders and own.fds_not_read:
        n, named = own.fds_not_read
        found.summary += (f"; holders may be missing: the file descriptors of "
                          f"{_processes(n, named, 'other ')} were not read in time")
    found.summary = shared_summary(found.summary)
    return found


def shared_summary(text: str) -> str:
    """One string for equal summaries: the sockets of one holder mostly
    read the same (about 300 bytes of every socket's state otherwise). From
    a table of at most WRITTEN_SHARED_MAX texts of at most
    SHARED_SUMMARY_MAX_CHARS each, started again when full. Not
    sys.intern: on CPython 3.12.0-3.12.4 (Ubuntu 24.04's) and on
    free-threaded builds interned strings are immortal, and summaries name
    other users' processes and fds: each distinct one would have stayed
    for the tracer's whole life (a review)."""
    if len(text) > SHARED_SUMMARY_MAX_CHARS:
        return text
    return _share(_summaries, text, text)


def _share(table: dict, key, value):
    """The value kept in table under key, or value, kept from now on; a
    full table (WRITTEN_SHARED_MAX) starts again: what sockets share stays
    shared with them."""
    shared = table.get(key)
    if shared is not None:
        return shared
    if len(table) >= WRITTEN_SHARED_MAX:
        table.clear()
    table[key] = value
    return value


def _decide(own: Ownership, holders: list[HolderEvidence],
            listener_holders: list[HolderEvidence],
            machine: Optional[str] = None, eof: Optional[EofReader] = None,
            opener: Optional[Opener] = None) -> Diagnosis:
    machine = machine or platform.machine()
    listener = own.listener

    if own.kind == OWNER_GONE:
        return Diagnosis(GONE, "no longer in CLOSE_WAIT when inspected")

    if own.kind == OWNER_UNREADABLE:        # out of file descriptors: not "gone"
        return Diagnosis(UNKNOWN, f"unknown: could not read the socket tables or /proc: "
                                  f"{own.error or 'out of file descriptors'}")

    if own.kind == OWNER_ACCEPT_QUEUE:
        if listener is None:
            return Diagnosis(NEVER_ACCEPTED,
                             "in a listener's accept queue; listener not found")
        # Each process once (the listener's other fds add no process).
        first = {h.pid: h for h in reversed(listener_holders)}
        who = _listed([f"{_who(first[pid])} [{first[pid].state}]"
                       for pid in dict.fromkeys(h.pid for h in listener_holders)]) or (
            # Not "no process" while some were not read.
            "none of the processes read" if own.denied_processes or own.fds_not_read
            else "no process")
        return Diagnosis(
            NEVER_ACCEPTED,
            f"never accepted: queue {listener.rx_queue}/{listener.tx_queue} on "
            f"{listener.endpoints.local}, held by {who}")

    if own.kind == OWNER_AMBIGUOUS:
        return Diagnosis(UNKNOWN, f"ambiguous: {len(own.other_netns)} network namespaces have "
                                  f"these addresses in CLOSE_WAIT and this socket's is not known "
                                  f"(no kernel BTF); no holder named")

    if own.kind == OWNER_DENIED and own.netns_denied:
        n = own.netns_denied
        return Diagnosis(UNKNOWN, f"unknown: not found in the network namespaces we may read; "
                                  f"permission denied reading {n} process{'es' if n != 1 else ''}' "
                                  f"namespaces")
    if own.kind in (OWNER_DENIED, OWNER_FDS_NOT_READ) or (
            not holders and (own.denied_processes or own.fds_not_read)):
        return Diagnosis(UNKNOWN, unread_summary(own))

    if own.kind == OWNER_NONE or not holders:
        return Diagnosis(UNKNOWN, "no process holds a file descriptor on it")

    dying = [h for h in holders if (h.state in ("Z", "X") or h.exiting)
             and not _lives_on(h)]
    if dying:
        return Diagnosis(EXITING, "holder exiting: " + _listed([
            f"{_who(h)} [{h.state}]" for h in dying]))

    traced = [h for h in holders if h.state == "t"]
    if traced:
        return Diagnosis(TRACED, "stopped under a tracer: " + _listed([
            f"{_who(h)} by {h.tracer_pid}/{h.tracer_comm or '?'}" for h in traced]))

    stopped = [h for h in holders if h.state == "T"]
    if stopped:
        return Diagnosis(STOPPED, "stopped by a signal: " + _listed([
            _who(h) for h in stopped]))

    fds_of: dict[int, list[HolderEvidence]] = {}
    for h in holders:
        fds_of.setdefault(h.pid, []).append(h)
    if len(fds_of) > 1:
        # One name a process, with its fds: a process that dup()ed the
        # socket took one name per fd, and pushed the others out of the
        # MAX_NAMED; "and N more" counts processes, the fds its record
        # does not list are said apart.
        cut = _unlisted(own)[0]
        return Diagnosis(LEAKED, f"held by {len(fds_of)} processes: " + _listed([
            f"{_who(fds[0])} fd {','.join(str(h.fd) for h in fds)}"
            for fds in fds_of.values()]) + (f" ({cut} more fds not listed)" if cut else ""))

    only = holders[0]
    others = [h for h in listener_holders if h.pid != only.pid]
    # Not one the kernel saw connect()ed: a client's socket was never
    # accepted from a listener, whoever listens on its port.
    if others and not only.holds_listener and only.cloexec is False and opener is None:
        # Short enough that the server (where the fix goes: close-on-exec)
        # fits the one-line text's 80 columns with pids of 5 digits.
        return Diagnosis(
            LEAKED, f"inherited by {_who(only)} fd {only.fd} (no close-on-exec) "
            f"from {_who(others[0])}", server=tuple(others))

    if eof is not None and eof.pid == only.pid and not own.unread_bytes:
        # The kernel saw this process read the end of the stream, and it
        # holds the socket still: it ignored the EOF, whatever system call
        # its threads now idle in (a sleep loop is no more "blocked" than
        # an epoll loop).
        where = f" in {eof.place}" if eof.place else ""
        return Diagnosis(IGNORING_EOF, f"read EOF{where} and never closed: "
                                       f"{_who(only)} fd {only.fd}")

    if opener is not None and opener.pid == only.pid and opener.none_read:
        # A connection this process opened, and has not read since the peer
        # closed it: a client that leaks it (from a pool, a helper). The
        # system call its threads idle in (a sleep loop, a select loop) is
        # not evidence of anything about this socket (issue 18 §3).
        where = f"; opened by {opener.place}" if opener.place else ""
        unread = f", {own.unread_bytes} unread bytes" if own.unread_bytes else ""
        return Diagnosis(NEVER_READ, f"never read since the peer closed{where}: "
                                     f"{_who(only)} fd {only.fd}{unread}")

    threads = only.examined or only.threads
    serving = [t for t in threads if t.serving(machine)]
    running = [t for t in threads if t.state == "R"]
    if serving or running:
        what = serving[0].syscall_name if serving else "running"
        unread = (f", {own.unread_bytes} unread bytes" if own.unread_bytes
                  else ", EOF read" if own.eof_read else ", EOF unread")
        return Diagnosis(IGNORING_EOF,
                         f"alive ({what}) but never closes: {_who(only)} fd {only.fd}{unread}")

    asleep = [t for t in threads if t.state in ("S", "D") and t.syscall is not None]
    if asleep:
        # A Python thread that waits in its own code (a worker stuck in
        # process_batch) says more than one waiting inside the library (the
        # main thread in Thread.join): named first.
        t = next((t for t in asleep if t.in_own_python()), asleep[0])
        on = f" on fd {t.syscall_fd} ({t.syscall_fd_target})" if t.syscall_fd_target else ""
        at = t.user_location()
        where = f" at {at}" if at else f" (wchan {t.wchan or '?'})"
        # "Blocked elsewhere" says no thread serves: true only of those seen.
        unseen = (f"; only {len(threads)} of its {only.threads_total} threads examined"
                  if only.threads_total > len(threads) else "")
        return Diagnosis(BLOCKED_ELSEWHERE,
                         f"blocked in {t.syscall_name}{on}{where}: {_who(only)}{unseen}")

    why = {"permission denied": " (permission denied reading its threads)",
           "gone": " (exited while inspected)"}.get(only.unreadable,
                                                    f" (its threads {only.unreadable})"
                                                    if only.unreadable else "")
    return Diagnosis(UNKNOWN, f"held by {_who(only)} fd {only.fd} [{only.state}]{why}")


def _is_serving(t: ThreadEvidence, machine: str) -> bool:
    """Waiting for network work (readiness, a new connection, bytes on a
    socket): the process is alive and serving, just not closing this one."""
    if t.syscall in _POLLING_SYSCALLS.get(machine, {}) or t.syscall in _ACCEPT_SYSCALLS.get(machine, {}):
        return True
    return (t.syscall in _READ_SYSCALLS.get(machine, {})
            and t.syscall_fd_target.startswith("socket:"))


# ----------------------------------------------------------------- evidence
#
# Each process is read once per batch (one entry per pid in the cache the
# caller passes for a batch): stat, status and cmdline come with the holder
# from the owner scan (owners.Holder.process), threads, their system calls,
# cgroup and namespace are read here, all through one handle on /proc/PID
# after checking that the pid still names the process the scan found.

# Stacks are unwound for this many threads of a holder at most, and this
# many threads are listed: the cost and size of a diagnosis must stay small
# even for a process with hundreds of threads.
MAX_STACKS = 4
MAX_THREADS = 16
# The cause is decided over this many threads (their state and system call,
# three small reads each): a server's serving thread may be its 200th, and a
# diagnosis made over the first 16 would be stated as a fact it is not.
# Beyond it, the summary says how many were examined.
MAX_EXAMINED = 1024


@dataclass(slots=True)
class ProcessEvidence:
    """What is about a whole process, not one of its fds."""
    pid: int
    threads: list[ThreadEvidence] = field(default_factory=list)   # listed (16)
    examined: list[ThreadEvidence] = field(default_factory=list)  # decided over
    threads_total: int = 0
    identity: dict = field(default_factory=dict)
    tracer_comm: str = ""
    exiting: bool = False
    # Set when the process could not be read past the owner scan: "gone"
    # (it exited, or the pid was reused) or "permission denied".
    unreadable: str = ""
    # Set when its threads were read without their stacks, and why (a
    # read of its memory timed out before, is suspended...: resolver.py).
    stacks_not_read: str = ""
    python_not_read: str = ""      # see HolderEvidence
    # A CPython process: what the kernel needs to copy its frames at later
    # EOF reads and connect()s (pyframes.Runtime.kernel_walk), else None.
    python_walk: Optional[dict] = None
    first: Optional[object] = None      # the holder its one process record names


def _thread(tid: int, dfd: int, machine: str, stat: Optional[procfs.Stat] = None
            ) -> tuple[Optional[ThreadEvidence], procfs.SyscallLine]:
    """One thread, from task/TID/{stat,wchan,syscall}, each read once (stat
    is passed in when already read); the syscall line also carries the
    registers the unwinder starts from."""
    line = procfs.NOT_IN_SYSCALL
    if stat is None:
        try:
            stat = procfs.parse_stat(procfs.decode(
                procfs.read_bytes(f"task/{tid}/stat", dir_fd=dfd)))
        except procfs.ProcError:
            return None, line                        # the thread exited
    if stat is None:
        return None, line
    thread = ThreadEvidence(tid=tid, state=stat.state)
    try:
        wchan = procfs.decode(procfs.read_bytes(f"task/{tid}/wchan", 256, dir_fd=dfd)).strip()
        thread.wchan = "" if wchan == "0" else wchan[:256]
    except procfs.ProcError:
        pass
    try:
        line = procfs.parse_syscall(procfs.decode(
            procfs.read_bytes(f"task/{tid}/syscall", 512, dir_fd=dfd)))
    except procfs.ProcError:
        return thread, line                          # denied or gone: syscall unknown
    number = line.number
    thread.syscall = number
    if number is None:
        return thread, line
    thread.syscall_name = syscall_name(number, machine)
    takes_fd = (number in _READ_SYSCALLS.get(machine, {})
                or number in _ACCEPT_SYSCALLS.get(machine, {}))
    arg0 = line.arg0
    thread.syscall_fd = arg0 if takes_fd and arg0 is not None and arg0 < 1 << 20 else None
    if thread.syscall_fd is not None:
        try:
            # The thread's own table: one that called unshare(CLONE_FILES)
            # has its fd N elsewhere than the leader's (a pipe read at fd 5
            # was said to be the socket at the leader's fd 5).
            thread.syscall_fd_target = procfs.readlink(f"task/{tid}/fd/{thread.syscall_fd}",
                                                       dir_fd=dfd)
        except procfs.ProcError:
            thread.syscall_fd_target = ""
    return thread, line


def _read_process_evidence(snap: procfs.ProcessSnapshot, proc: str, machine: str,
                           budget) -> ProcessEvidence:
    """budget None: no user stacks."""
    ev = ProcessEvidence(pid=snap.pid, exiting=snap.exiting)
    if snap.tracer_pid:
        try:
            ev.tracer_comm = procfs.read_process(snap.tracer_pid, proc).comm
        except procfs.ProcError:
            pass
    try:
        dfd = os.open(f"{proc}/{snap.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        ev.unreadable = ("permission denied" if e.errno in (errno.EACCES, errno.EPERM)
                         # out of descriptors: not read, never "gone"
                         else NOT_READ_NO_FDS if e.errno in procfs.EXHAUSTED_ERRNOS
                         else "gone")
        return ev
    try:
        # The leader's stat is read for its thread state anyway: its start
        # time also proves the pid still names the process the owner scan
        # saw. Every later read goes through this handle, which fails
        # (ESRCH) rather than follow the pid to a new process.
        try:
            names = procfs.listdir_at("task", dfd)
            leader = procfs.parse_stat(procfs.decode(
                procfs.read_bytes(f"task/{snap.pid}/stat", dir_fd=dfd)))
        except procfs.AccessDenied:
            ev.unreadable = "permission denied"
            return ev
        except procfs.ResourceExhausted:
            ev.unreadable = NOT_READ_NO_FDS
            return ev
        except procfs.ProcError:
            ev.unreadable = "gone"
            return ev
        if leader is None or leader.start_time != snap.start_time:
            ev.unreadable = "gone"
            return ev
        tids = sorted(int(n) for n in names if n.isdigit() and n != str(snap.pid))
        ev.threads_total = len(tids) + 1
        stacks = 0
        for tid in [snap.pid] + tids[:MAX_EXAMINED - 1]:
            thread, line = _thread(tid, dfd, machine, leader if tid == snap.pid else None)
            if thread is None:
                continue
            ev.examined.append(thread)
            if len(ev.threads) >= MAX_THREADS:
                continue            # decided over, not listed (nor unwound)
            # Sleeping, blocked, stopped or traced: the registers in
            # task/TID/syscall are those of the call it waits in.
            if (budget is not None and thread.state in ("S", "D", "T", "t")
                    and thread.syscall is not None and stacks < MAX_STACKS):
                stacks += 1
                # The unwinder starts from the registers of the syscall
                # line read above, not from a reread; it is chosen (or
                # none) by the machine's architecture.
                from closewait_trace.evidence import symbolize
                thread.stack = symbolize.user_stack(snap.pid, line.pc, line.sp, proc,
                                                    machine, budget)
            ev.threads.append(thread)
        if budget is not None and stacks:
            _add_python_frames(ev, snap, proc, budget)
        ev.identity = identity.of_process(snap.pid, snap.uid, dir_fd=dfd)
    finally:
        os.close(dfd)
    return ev


def _add_python_frames(ev: ProcessEvidence, snap: procfs.ProcessSnapshot, proc: str,
                       budget) -> None:
    """The Python frames of the threads whose stacks were read (waiting,
    not running: a running thread's frames change under the reader), for a
    CPython process; or why they could not be read. The kernel's walk, if
    any, says whose process it is and which (uid, start time): the tracer
    registers it only while the pid still names that process."""
    from closewait_trace.evidence import pyframes
    waiting = {t.tid: t for t in ev.threads if t.state in ("S", "D", "T", "t")}
    if not waiting or budget.spent():
        return
    frames, why, walk = pyframes.read_process(budget.image(snap.pid, proc),
                                              budget.deadline, set(waiting))
    if walk is not None and snap.uid is not None:
        ev.python_walk = {**walk, "uid": snap.uid, "start_time": snap.start_time}
    for tid, found in frames.items():
        waiting[tid].python = found
    ev.python_not_read = why


@dataclass
class Batch:
    """What the diagnoses of one batch of sockets share: each holder process
    read once, and one time budget for symbolizing their stacks."""
    processes: dict = field(default_factory=dict)    # pid -> ProcessEvidence
    # id(ownership.listener_holders) -> (that sequence, its evidence tuple)
    listeners: dict = field(default_factory=dict)
    # (pid, fd) -> the evidence of a listener's holder, one for every socket
    # of that listener in the batch. Here, not on the process's evidence:
    # the holder evidence refers to that, and the two would make a cycle
    # that a freeze of the collector kept (a review).
    listener_evidence: dict = field(default_factory=dict)
    # Unwinding user stacks costs seconds per binary on first use: a quick
    # look (snapshot without -v) goes without them, and without even
    # importing the symbolizer (pyelftools: a tenth of a second).
    stacks: bool = True
    # Offline: the processes were read elsewhere (the gathering worker) and
    # put in `processes`; one missing is said as not read, never read here.
    offline: bool = False
    _budget: object = None

    @property
    def budget(self):
        """The batch's symbolize.Budget, started at the first stack."""
        if self._budget is None:
            from closewait_trace.evidence import symbolize
            self._budget = symbolize.Budget()
        return self._budget

    def close(self) -> None:
        """Closes what the stacks opened (each process's memory)."""
        if self._budget is not None:
            self._budget.close()


def _process_evidence(holder, proc: str, machine: str, cache: Optional[Batch]) -> ProcessEvidence:
    if cache is None:
        cache = Batch()
    ev = cache.processes.get(holder.pid)
    if ev is None and cache.offline:
        ev = cache.processes[holder.pid] = ProcessEvidence(pid=holder.pid,
                                                           unreadable=NOT_GATHERED)
    if ev is None:
        snap = holder.process
        unreadable = ""
        if snap is None:                  # a Holder not made by the owner scan
            try:
                snap = procfs.read_process(holder.pid, proc)
            except procfs.AccessDenied:
                unreadable = "permission denied"
            except procfs.ResourceExhausted:
                unreadable = NOT_READ_NO_FDS
            except procfs.ProcError:
                unreadable = "gone"
        ev = (_read_process_evidence(snap, proc, machine,
                                     cache.budget if cache.stacks else None)
              if snap is not None
              else ProcessEvidence(pid=holder.pid, unreadable=unreadable))
        cache.processes[holder.pid] = ev
    return ev


def holder_evidence(holder, proc: str, machine: str,
                    listener_pids: frozenset = frozenset(), cache: Optional[Batch] = None,
                    fd_flags: bool = True) -> HolderEvidence:
    """Evidence for one holder. What is about the process, not the fd
    (threads, stacks, identity), is read once per batch through cache
    (pid -> ProcessEvidence)."""
    per_process = _process_evidence(holder, proc, machine, cache)
    ev = HolderEvidence.of(holder, per_process, holder.cloexec if fd_flags else None,
                           holder.pid in listener_pids)
    if per_process.first is None:
        # The holder, not ev: ev refers to per_process, and the two would
        # make a cycle that stays until a collection (the collector is
        # paused while a batch is reported).
        per_process.first = holder
    return ev


def process_evidence(cache: Batch) -> list[dict]:
    """The process-wide evidence of every process a batch looked at (what
    each `process` record carries), in pid order."""
    firsts = [HolderEvidence.of(ev.first, ev, None, False)
              for ev in cache.processes.values() if ev.first is not None]
    return [ev.process_dict() for ev in sorted(firsts, key=lambda ev: ev.pid)]


def gather(own: Ownership, proc: str = procfs.PROC, machine: Optional[str] = None,
           cache: Optional[Batch] = None, eof: Optional[EofReader] = None,
           opener: Optional[Opener] = None) -> Diagnosis:
    """Collect the evidence for one socket's owners from /proc, then decide.
    Pass the same cache (a new Batch at the start of a batch) for every
    socket of one batch."""
    machine = machine or platform.machine()
    if cache is None:
        cache = Batch()
    listener_pids = frozenset(h.pid for h in own.listener_holders)
    # Tuples, kept by the diagnosis for as long as the socket lingers: a
    # list of one is 84 bytes, a tuple 48 (100,000 sockets: 3.6 MB).
    holders = tuple([holder_evidence(h, proc, machine, listener_pids, cache)
                     for h in own.holders])
    # The listener's holders are named with their state; the flags of their
    # fd on the listener do not matter here, so one object per process and
    # fd serves every socket queued on or accepted from that listener, and
    # one tuple of them every socket whose ownership shares the same
    # listener_holders (the owner lookup gives those sockets one sequence).
    shared = cache.listeners.get(id(own.listener_holders))
    if shared is not None and shared[0] is own.listener_holders:
        listeners = shared[1]
    else:
        found = []
        for h in own.listener_holders:
            ev = cache.listener_evidence.get((h.pid, h.fd))
            if ev is None:
                ev = holder_evidence(h, proc, machine, cache=cache, fd_flags=False)
                cache.listener_evidence[(h.pid, h.fd)] = ev
            found.append(ev)
        listeners = tuple(found)
        # The sequence itself is kept with its id: an id is unique only
        # while its object lives.
        cache.listeners[id(own.listener_holders)] = (own.listener_holders, listeners)
    return diagnose(own, holders, listeners, machine, eof, opener)
