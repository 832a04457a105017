"""Why has a lingering socket not been closed? A one-line cause with evidence.

Reads /proc only (never attaches to, signals or pauses a process). The pure
decision, `diagnose`, takes the evidence as values so it is tested without
root; `gather` collects that evidence from /proc defensively: a process that
exits mid-inspection leaves a partial diagnosis, never an error.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Optional

from closewait_trace import identity, procfs, symbolize
from closewait_trace.owners import OWNER_ACCEPT_QUEUE, OWNER_GONE, OWNER_NONE, Ownership

STOPPED = "stopped"
TRACED = "traced"
NEVER_ACCEPTED = "never_accepted"
LEAKED = "leaked"
BLOCKED_ELSEWHERE = "blocked_elsewhere"
IGNORING_EOF = "ignoring_eof"
EXITING = "exiting"
GONE = "gone"
UNKNOWN = "unknown"

O_CLOEXEC = 0o2000000
PF_EXITING = 0x4

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
               42: "connect", 247: "waitid"},
    "aarch64": {101: "nanosleep", 98: "futex", 260: "wait4", 115: "clock_nanosleep",
                133: "rt_sigsuspend",
                64: "write", 203: "connect", 95: "waitid"},
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
    _serving: Optional[bool] = None

    def serving(self, machine: str) -> bool:
        # Threads are shared by all sockets of a process: decide once.
        if self._serving is None:
            self._serving = _is_serving(self, machine)
        return self._serving

    def as_dict(self) -> dict:
        return {"tid": self.tid, "state": self.state, "wchan": self.wchan,
                "syscall": self.syscall_name or None, "syscall_fd": self.syscall_fd,
                "syscall_fd_target": self.syscall_fd_target or None,
                "stack": [f.as_dict() for f in self.stack]}

    def user_location(self) -> str:
        """The innermost frame outside the module the syscall was made in
        (usually libc): where the program itself is waiting."""
        if not self.stack:
            return ""
        inner = self.stack[0].module
        for frame in self.stack[1:]:
            if frame.module != inner and frame.function:
                return frame.describe()
        return self.stack[0].describe()


@dataclass(slots=True)
class HolderEvidence:
    pid: int
    comm: str
    fd: int
    state: str
    ppid: int
    cmdline: str
    cloexec: Optional[bool] = None
    exiting: bool = False
    tracer_pid: int = 0
    tracer_comm: str = ""
    holds_listener: bool = False
    threads: list[ThreadEvidence] = field(default_factory=list)
    identity: dict = field(default_factory=dict)
    threads_total: int = 0

    def as_dict(self, light: bool = False) -> dict:
        """What concerns this socket's fd. What concerns the whole process
        (threads, stacks, identity) is in process_dict, written once per
        process in a `process` record rather than once per socket: a process
        can hold 10,000 sockets."""
        out = {"pid": self.pid, "comm": self.comm, "fd": self.fd,
               "state": self.state, "ppid": self.ppid, "cmdline": self.cmdline,
               "cloexec": self.cloexec, "exiting": self.exiting}
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
        return out


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
    def evidence(self) -> dict:
        own = self._own
        if own is None:
            return {}
        out = {"holders": [h.as_dict() for h in self._holders],
               "unread_bytes": own.unread_bytes, "eof_read": own.eof_read}
        if own.kind == OWNER_ACCEPT_QUEUE:
            listener = own.listener
            out["listener"] = None if listener is None else {
                "local": listener.endpoints.local,
                "accept_queue": listener.rx_queue,
                "backlog": listener.tx_queue,
                "holders": [h.as_dict(light=True) for h in self._listeners]}
        if self._server:
            out["accepting_process"] = [h.as_dict(light=True) for h in self._server]
        return out

    def as_dict(self) -> dict:
        return {"cause": self.cause, "summary": self.summary, "evidence": self.evidence}


def _who(h: HolderEvidence) -> str:
    return f"{h.pid}/{h.comm}"


def diagnose(own: Ownership, holders: list[HolderEvidence],
             listener_holders: list[HolderEvidence],
             machine: Optional[str] = None) -> Diagnosis:
    """The most specific cause the evidence supports; UNKNOWN otherwise."""
    found = _decide(own, holders, listener_holders, machine)
    found._own, found._holders, found._listeners = own, holders, listener_holders
    # A tracer attached to a process that is not stopped (strace -p) is worth
    # saying whatever the cause: it slows the process and may be why.
    traced = [h for h in holders if h.tracer_pid and h.state != "t"]
    if traced and found.cause != TRACED:
        found.summary += "; " + ", ".join(
            f"{_who(h)} traced by {h.tracer_pid}/{h.tracer_comm or '?'}" for h in traced)
    return found


def _decide(own: Ownership, holders: list[HolderEvidence],
            listener_holders: list[HolderEvidence],
            machine: Optional[str] = None) -> Diagnosis:
    machine = machine or platform.machine()
    listener = own.listener

    if own.kind == OWNER_GONE:
        return Diagnosis(GONE, "no longer in CLOSE_WAIT when inspected")

    if own.kind == OWNER_ACCEPT_QUEUE:
        if listener is None:
            return Diagnosis(NEVER_ACCEPTED,
                             "in a listener's accept queue; listener not found")
        who = ", ".join(f"{_who(h)} [{h.state}]" for h in listener_holders) or "no process"
        return Diagnosis(
            NEVER_ACCEPTED,
            f"never accepted: queue {listener.rx_queue}/{listener.tx_queue} on "
            f"{listener.endpoints.local}, held by {who}")

    if own.kind == OWNER_NONE or not holders:
        return Diagnosis(UNKNOWN, "no process holds a file descriptor on it")

    dying = [h for h in holders if h.state in ("Z", "X") or h.exiting]
    if dying:
        return Diagnosis(EXITING, "holder exiting: " + ", ".join(
            f"{_who(h)} [{h.state}]" for h in dying))

    traced = [h for h in holders if h.state == "t"]
    if traced:
        return Diagnosis(TRACED, "stopped under a tracer: " + ", ".join(
            f"{_who(h)} by {h.tracer_pid}/{h.tracer_comm or '?'}" for h in traced))

    stopped = [h for h in holders if h.state == "T"]
    if stopped:
        return Diagnosis(STOPPED, "stopped by a signal: " + ", ".join(
            _who(h) for h in stopped))

    pids = {h.pid for h in holders}
    if len(pids) > 1:
        return Diagnosis(LEAKED, f"held by {len(pids)} processes: " + ", ".join(
            f"{_who(h)} fd {h.fd}" for h in holders))

    only = holders[0]
    others = [h for h in listener_holders if h.pid != only.pid]
    if others and not only.holds_listener and only.cloexec is False:
        return Diagnosis(
            LEAKED, f"inherited by {_who(only)} fd {only.fd} (no close-on-exec); "
            f"the server is {_who(others[0])}", server=tuple(others))

    serving = [t for t in only.threads if t.serving(machine)]
    running = [t for t in only.threads if t.state == "R"]
    if serving or running:
        what = serving[0].syscall_name if serving else "running"
        unread = (f", {own.unread_bytes} unread bytes" if own.unread_bytes
                  else ", EOF read" if own.eof_read else ", EOF unread")
        return Diagnosis(IGNORING_EOF,
                         f"alive ({what}) but never closes: {_who(only)} fd {only.fd}{unread}")

    asleep = [t for t in only.threads if t.state in ("S", "D") and t.syscall is not None]
    if asleep:
        t = asleep[0]
        on = f" on fd {t.syscall_fd} ({t.syscall_fd_target})" if t.syscall_fd_target else ""
        at = t.user_location()
        where = f" at {at}" if at else f" (wchan {t.wchan or '?'})"
        return Diagnosis(BLOCKED_ELSEWHERE,
                         f"blocked in {t.syscall_name}{on}{where}: {_who(only)}")

    return Diagnosis(UNKNOWN, f"held by {_who(only)} fd {only.fd} [{only.state}]")


def _is_serving(t: ThreadEvidence, machine: str) -> bool:
    """Waiting for network work (readiness, a new connection, bytes on a
    socket): the process is alive and serving, just not closing this one."""
    if t.syscall in _POLLING_SYSCALLS.get(machine, {}) or t.syscall in _ACCEPT_SYSCALLS.get(machine, {}):
        return True
    return (t.syscall in _READ_SYSCALLS.get(machine, {})
            and t.syscall_fd_target.startswith("socket:"))


# ----------------------------------------------------------------- evidence

def _fd_cloexec(pid: int, fd: int, proc: str) -> Optional[bool]:
    text = procfs.read_text(f"{proc}/{pid}/fdinfo/{fd}")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("flags:"):
            try:
                return bool(int(line.split()[1], 8) & O_CLOEXEC)
            except (IndexError, ValueError):
                return None
    return None


def _exiting(pid: int, proc: str) -> bool:
    stat = procfs.read_text(f"{proc}/{pid}/stat")
    if not stat:
        return False
    try:
        flags = int(stat[stat.rindex(")") + 2:].split()[6])
    except (ValueError, IndexError):
        return False
    return bool(flags & PF_EXITING)


def parse_syscall(text: str) -> tuple[Optional[int], Optional[int]]:
    """/proc/TID/syscall: 'running', '-1 ...' (not in a syscall) or 'NR arg0 ...'."""
    parts = text.split()
    if not parts or parts[0] in ("running", "-1"):
        return None, None
    try:
        number = int(parts[0])
    except ValueError:
        return None, None
    try:
        arg0 = int(parts[1], 16) if len(parts) > 1 else None
    except ValueError:
        arg0 = None
    return number, arg0


# Stacks are unwound for this many threads of a holder at most, and this
# many threads are listed: the cost and size of a diagnosis must stay small
# even for a process with hundreds of threads.
MAX_STACKS = 4
MAX_THREADS = 16


def _threads(pid: int, proc: str, machine: str, stacks_wanted: bool = True) -> list[ThreadEvidence]:
    out = []
    stacks = 0
    names = [n for n in procfs.list_dir(f"{proc}/{pid}/task") if n.isdigit()]
    for name in sorted(names, key=int)[:MAX_THREADS]:
        base = f"{proc}/{pid}/task/{name}"
        stat = procfs.read_text(f"{base}/stat")
        parsed = procfs.parse_stat(stat) if stat else None
        if not parsed:
            continue
        thread = ThreadEvidence(tid=int(name), state=parsed[1],
                                wchan=(procfs.read_text(f"{base}/wchan") or "").strip())
        if thread.wchan == "0":
            thread.wchan = ""
        text = procfs.read_text(f"{base}/syscall")
        if text:
            number, arg0 = parse_syscall(text)
            thread.syscall = number
            if number is not None:
                thread.syscall_name = syscall_name(number, machine)
                takes_fd = (number in _READ_SYSCALLS.get(machine, {})
                            or number in _ACCEPT_SYSCALLS.get(machine, {}))
                thread.syscall_fd = arg0 if takes_fd and arg0 is not None and arg0 < 1 << 20 else None
                if thread.syscall_fd is not None:
                    thread.syscall_fd_target = procfs.read_link(
                        f"{proc}/{pid}/fd/{thread.syscall_fd}") or ""
                if (stacks_wanted and thread.state in ("S", "D") and stacks < MAX_STACKS
                        and machine == "x86_64"):
                    stacks += 1
                    thread.stack = symbolize.user_stack(pid, thread.tid, proc)
        out.append(thread)
    return out


def holder_evidence(holder, proc: str, machine: str,
                    listener_pids: frozenset = frozenset(), cache: Optional[dict] = None,
                    fd_flags: bool = True, stacks: bool = True) -> HolderEvidence:
    """Evidence for one holder. What is about the process, not the fd
    (threads, stacks, identity), is read once per batch through cache."""
    per_process = cache.get(holder.pid) if cache is not None else None
    if per_process is None:
        tracer_comm = ""
        if holder.tracer_pid:
            tracer = procfs.process_info(holder.tracer_pid, proc)
            tracer_comm = tracer.comm if tracer else ""
        per_process = {"exiting": _exiting(holder.pid, proc),
                       "tracer_comm": tracer_comm,
                       "threads": _threads(holder.pid, proc, machine, stacks),
                       "threads_total": len([n for n in procfs.list_dir(
                           f"{proc}/{holder.pid}/task") if n.isdigit()]),
                       "identity": identity.of_process(holder.pid, holder.uid, proc),
                       "first": None}
        if cache is not None:
            cache[holder.pid] = per_process
    ev = HolderEvidence(
        pid=holder.pid, comm=holder.comm, fd=holder.fd, state=holder.state,
        ppid=holder.ppid, cmdline=holder.cmdline, tracer_pid=holder.tracer_pid,
        tracer_comm=per_process["tracer_comm"], holds_listener=holder.pid in listener_pids,
        cloexec=_fd_cloexec(holder.pid, holder.fd, proc) if fd_flags else None,
        exiting=per_process["exiting"],
        threads=per_process["threads"], identity=per_process["identity"],
        threads_total=per_process["threads_total"])
    if per_process["first"] is None:
        per_process["first"] = ev
    return ev


def process_evidence(cache: dict) -> list[dict]:
    """The process-wide evidence of every process a batch looked at (what
    each `process` record carries), in pid order."""
    firsts = [v["first"] for k, v in cache.items()
              if isinstance(k, int) and v.get("first") is not None]
    return [ev.process_dict() for ev in sorted(firsts, key=lambda ev: ev.pid)]


def gather(own: Ownership, proc: str = procfs.PROC, machine: Optional[str] = None,
           cache: Optional[dict] = None, stacks: bool = True) -> Diagnosis:
    """Collect the evidence for one socket's owners from /proc, then decide.
    Pass the same cache for every socket of one batch. stacks=False skips
    the user stacks (symbolizing costs seconds per binary on first use)."""
    machine = machine or platform.machine()
    listener_pids = frozenset(h.pid for h in own.listener_holders)
    holders = [holder_evidence(h, proc, machine, listener_pids, cache, stacks=stacks)
               for h in own.holders]
    # The listener's holders are named with their state; the flags of their
    # fd on the listener do not matter here, so one object per process serves
    # every socket queued on or accepted from that listener.
    listeners = []
    for h in own.listener_holders:
        key = ("listener", h.pid, h.fd)
        ev = cache.get(key) if cache is not None else None
        if ev is None:
            ev = holder_evidence(h, proc, machine, cache=cache, fd_flags=False, stacks=stacks)
            if cache is not None:
                cache[key] = ev
        listeners.append(ev)
    return diagnose(own, holders, listeners, machine)
