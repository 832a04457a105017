"""What the gathering worker runs (worker.py): every read of other people's
/proc entries, memory and files that the tracer and `snapshot` need, each a
plain function of picklable arguments. They run in the tracer's process too
when no worker is given (unit tests on a fake /proc).

Each is bounded on its own (symbolize's budget, capped reads); the
worker's deadline is the backstop for a read that blocks in the kernel.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Iterator, NamedTuple, Optional

from closewait_trace.evidence import diagnosis
from closewait_trace.kernel import tcpstates
from closewait_trace.sockets import identity, owners, procfs, procnet
from closewait_trace.sockets.filters import SocketFilter
from closewait_trace.sockets.tracker import Tracker

# Imported by the worker as it starts (worker._calls), not at the first
# call that needs them: the start-up's scan of CPython processes.
PRELOAD = ("closewait_trace.evidence.pyframes",)

# Holder processes read per batch, at most: one socket shared by 3,001
# forks must not cost 3,001 process reads (nor list them all). Which are
# read is resolver.gather_processes's choice (socket holders first, users
# in turns), made before it asks; process_evidence's own cut is a
# backstop for any other caller.
MAX_PROCESSES_PER_BATCH = 256


def holder_states(pids: list[int], proc: str = procfs.PROC) -> dict[int, tuple]:
    """pid -> (state, tracer pid), ("gone", 0) for a process that is not,
    state "exiting" for one in its exit (PF_EXITING: closing its
    descriptors, whatever its run state). Out of file descriptors, the call
    fails (ResourceExhausted): "gone" would be a claim about a process we
    could not read."""
    out = {}
    for pid in pids:
        try:
            snap = procfs.read_process(pid, proc)
        except procfs.ResourceExhausted:
            raise
        except procfs.ProcError:
            out[pid] = ("gone", 0)
            continue
        out[pid] = ("exiting" if snap.exiting else snap.state, snap.tracer_pid)
    return out


def process_evidence(holders: list, proc: str = procfs.PROC, machine: Optional[str] = None,
                     stacks: bool = True) -> Iterator[tuple]:
    """("process", ProcessEvidence) for each distinct holder process, in
    the order given (the oldest socket's first), then ("problems", the
    symbolizer's counts) and ("skipped", how many processes were over
    MAX_PROCESSES_PER_BATCH). Streamed: what was read before a deadline is
    kept even if a later read blocks."""
    machine = machine or platform.machine()
    cache = diagnosis.Batch(stacks=stacks)
    seen: set[int] = set()
    skipped = 0
    try:
        for holder in holders:
            if holder.pid in seen:
                continue
            if len(seen) >= MAX_PROCESSES_PER_BATCH:
                skipped += 1
                continue
            seen.add(holder.pid)
            ev = diagnosis._process_evidence(holder, proc, machine, cache)
            yield ("process", ev)
    finally:
        cache.close()
    if stacks:
        from closewait_trace.evidence import symbolize
        yield ("problems", symbolize.problems())
    yield ("skipped", skipped)


def captured_stacks(captures: list, proc: str = procfs.PROC,
                    machine: Optional[str] = None):
    """Streams what the kernel program copied at each (key, pid, ip, sp, bp,
    stack bytes[, (python status, pairs)]) (an EOF read's, a connect()'s),
    unwound against each process's mappings, under one symbolizer budget:
    ("reading", key) before a capture's process is read, ("python", key,
    (PyFrame dicts, why not)) for the Python frames copied with it,
    resolved, ("frames", key, frame dicts) once its places have lines; then
    ("problems", the symbolizer's counts). Streamed, so that a read that
    blocks (a page of the process turned into a never-answering FUSE
    server's) costs the caller only that capture (resolver.captured_stacks
    goes on without it)."""
    from closewait_trace.evidence import pyframes, symbolize
    budget = symbolize.Budget()
    unwound = []
    try:
        # Every stack and its symbols first, then lines for the places with
        # what is left of the budget: a slow line table (a crafted one) can
        # cost a place its line, never another stack its symbols.
        for key, pid, ip, sp, bp, stack, *py in captures[:MAX_PROCESSES_PER_BATCH]:
            yield ("reading", key)
            frames = symbolize.captured_stack(pid, ip, sp, bp, stack, proc, machine, budget,
                                              lines=False)
            unwound.append((key, pid, frames))
            if py:
                yield ("python", key, pyframes.resolve_capture(budget.image(pid, proc),
                                                              budget.deadline, *py[0]))
        for key, pid, frames in unwound:
            yield ("reading", key)
            symbolize.add_place_line(pid, frames, proc, budget)
            yield ("frames", key, [f.as_dict() for f in frames])
            procfs.note_progress()
    finally:
        budget.close()
    yield ("problems", symbolize.problems())


def python_processes(proc: str = procfs.PROC, skip_uids=(), skip_pids=(),
                     seconds: float = 2.0, limit: int = 4096, only_pids=None):
    """Streams ("reading", pid, uid) and ("walk", pid, what the kernel needs
    to copy its Python frames at its events) for each running CPython
    process (pyframes.scan_python_processes), those of skip_uids and
    skip_pids left out; only_pids: of these alone."""
    from closewait_trace.evidence import pyframes
    yield from pyframes.scan_python_processes(proc, time.monotonic() + seconds, limit,
                                              skip_uids, skip_pids, only_pids)


def now_ns() -> int:
    # The clock tcp_info's times are measured against does not matter (they
    # are durations); CLOCK_BOOTTIME starts at boot, which ages.py uses to
    # tell whether the kernel's u32 ms counters can have wrapped.
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# How long a snapshot reads namespaces other than its own (owners.
# read_by_turns): any user can make namespaces by the thousand (3-5 ms each
# to read, 96,368 allowed per user by default), and a snapshot taken in an
# incident must not wait minutes for them. About 200-300 namespaces here,
# every user's in turn; those not read are counted and said.
SNAPSHOT_OTHERS_BUDGET_S = 1.0


class SnapshotRead(NamedTuple):
    """What snapshot_candidates found."""
    due: list                   # Lingerers at least min_age_ns old
    resolved: dict              # their owners, by endpoints
    taken_ns: int               # kernel clock of the read
    # Namespaces not read within SNAPSHOT_OTHERS_BUDGET_S: real uid of the
    # process in each (-1: not read) -> how many.
    unread_by_uid: dict = {}


def snapshot_candidates(socket_filter: SocketFilter, min_age_ns: int,
                        proc: str = procfs.PROC, fd_flags: bool = True,
                        budget_s: float = SNAPSHOT_OTHERS_BUDGET_S) -> SnapshotRead:
    """Read the sockets in CLOSE_WAIT (one sock_diag dump per network
    namespace, with tcp_info; the others than ours for budget_s, by turns),
    estimate their ages, keep those at least min_age_ns old, and find their
    owners. Runs in the gathering worker; `snapshot` (live/snapshot.py)
    resolves, diagnoses and shows them. fd_flags: as owners.resolve's
    (False: close-on-exec only where it can decide the diagnosis)."""
    unread: dict[int, int] = {}
    with procnet.one_read_per_namespace():
        # One dump per namespace, with the listeners that owners.resolve
        # needs next, so that it asks the kernel nothing more.
        states = [tcpstates.CLOSE_WAIT, tcpstates.LISTEN]
        if procnet.is_procfs(proc):
            read = owners.read_by_turns(states, proc, budget_s=budget_s)
            whole = {}
            for row in read.rows:
                if row.endpoints.netns in read.dumped:
                    whole.setdefault(row.endpoints.netns, []).append(row)
            for netns in read.dumped:
                procnet.remember_rows(proc, netns, states, whole.get(netns, []))
            # A namespace cut short is not listed in part: counted unread.
            # (One whose read failed through each of its processes, most
            # likely gone with them, is not counted.)
            for netns in read.not_read:
                uid = read.uid_of.get(netns, -1)
                unread[uid] = unread.get(uid, 0) + 1
            found = [row for rows in whole.values() for row in rows]
        else:
            found = [row for _netns, pid in procnet.network_namespaces(proc).items()
                     for row in procnet.tcp_rows(pid, proc, states=states)]
        rows = [row for row in found
                if row.state == tcpstates.CLOSE_WAIT and socket_filter.matches(row.endpoints)]
        taken = now_ns()
        tracker = Tracker(threshold_ns=min_age_ns, start_ns=taken)
        tracker.seed(rows, [], observed_ns=taken)
        # A socket without tcp_info is "at least 0 s" old: it is shown only
        # when no minimum age was asked for.
        due = tracker.due(taken)
        resolved = owners.resolve([l.endpoints for l in due], proc, fd_flags=fd_flags)
    return SnapshotRead(due, resolved, taken, unread)


# The tracer's tracepoint fds this worker holds (adopt_fds): open until it
# ends.
_ADOPTED: list = []
_SYS_PIDFD_GETFD = 438          # the same number on every architecture


def adopt_fds(pid: int, fds: list) -> int:
    """Duplicate process pid's fds into this one (pidfd_getfd: the tracer
    is our parent, we are root) and keep them open until this process ends;
    returns how many were taken. At its exit the tracer hands over the
    tracepoints that make no events (the captures', the exec tracking's):
    closing the last fd of a tracepoint waits for the kernel's RCU grace
    periods, one tracepoint at a time, and then it is this worker's exit
    that waits for them (it is killed next), not the tracer's."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):    # not allowed, or no pidfds (before 5.6)
        return 0
    taken = 0
    try:
        for fd in fds:
            got = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if got < 0:
                break
            _ADOPTED.append(got)
            taken += 1
    finally:
        os.close(pidfd)
    return taken


# Sockets per item of owners_in_order's answer.
OWNERS_CHUNK = 8192


def owners_in_order(wanted: list, proc: str = procfs.PROC,
                    others_budget_s: float = float("inf"),
                    memory: owners.LookupMemory = owners.LookupMemory(),
                    chunk: int = OWNERS_CHUNK) -> Iterator[list]:
    """owners.resolve's answer as lists in the order of wanted, chunk
    sockets each. In order: the caller has the Endpoints already, and
    pickling 100,000 of them back as the answer's keys (and unpickling them
    in the loop) cost more than a second at 100,000 sockets. Streamed: the
    loop unpickles one chunk while this worker pickles the next (one 60 MB
    answer was pickled whole, then unpickled whole). others_budget_s and
    memory: owners.resolve's (the sockets of namespaces it left are
    OWNER_NOT_READ)."""
    resolved = owners.resolve(wanted, proc, others_budget_s=others_budget_s, memory=memory)
    for start in range(0, len(wanted), chunk):
        yield [resolved[ep] for ep in wanted[start:start + chunk]]


# Run with Python's cyclic collector paused (worker.serve). The owner
# lookups make about ten objects a socket (rows, holders, ownerships) and
# keep them until the answer is pickled; none is in a cycle, and the
# collector's passes over them were a quarter of a lookup's CPU (100,000
# sockets: 2.5-2.8 s with them, 1.8 s without; docs/benchmarks.md, "the
# cyclic collector paused"). Not the reads of processes and their binaries:
# pyelftools' objects do make cycles, and a long read would keep them all.
WITHOUT_COLLECTOR = frozenset({"snapshot_close_wait", "rescan_close_wait", "close_wait_census",
                               "in_close_wait_now", "held_now", "owners", "owners_in_order"})

CALLS = {
    "adopt_fds": adopt_fds,
    "snapshot_close_wait": owners.snapshot_close_wait,
    "rescan_close_wait": owners.rescan_close_wait,
    "close_wait_census": owners.close_wait_census,
    "in_close_wait_now": owners.in_close_wait_now,
    "held_now": owners.held_now,
    "owners": owners.resolve,
    "owners_in_order": owners_in_order,
    "holder_states": holder_states,
    "identity": identity.of_process,
    "process_evidence": process_evidence,
    "snapshot_candidates": snapshot_candidates,
    "captured_stacks": captured_stacks,
    "python_processes": python_processes,
}
