"""The tracer's and `snapshot`'s one way to read other people's /proc,
memory and files: owners, holder states, identities and the evidence of
holder processes. With a GatherWorker (the tool's wiring) every read happens
in the worker process under a deadline (worker.py); without one (unit tests
on a fake /proc) in this process. The diagnosis itself (diagnosis.gather,
pure once the processes are read) runs here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from closewait_trace import knobs
from closewait_trace.evidence import diagnosis, gathering
from closewait_trace.evidence.worker import SUSPENDED, TIMED_OUT, GatherFailed, GatherWorker
from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets import owners, procfs, subids
from closewait_trace.sockets.owners import Census, LookupMemory, RescanRead

# Deadlines of the gathering worker's calls (seconds, scaled by the testing
# knob CLOSEWAIT_TRACE_TIME_SCALE). A call is abandoned when no read of it
# has completed for its STALL time (a read blocked in the kernel), or at
# its overall cap; then the loop stops waiting, kills the worker and says
# what was not read. The caps are for work that really is that large (owners
# of 100,000 sockets take seconds): the loop drains the kernel's events and
# answers stop signals while it waits.
STALL_S = 2.0
OWNERS_CAP_S = 120.0
STATE_CAP_S = 30.0
# Start-up scans of CPython processes abandoned for a read that blocked,
# each costing STALL_S, before the tracer is ready without the rest.
MAX_BLOCKED_SCANS = 3
# snapshot's one read of every namespace's sockets and their owners.
SNAPSHOT_STALL_S = 5.0
SNAPSHOT_CAP_S = 300.0
# The evidence of a batch of holder processes: a process that streams
# nothing for PROCESS_DEADLINE_S (symbolize's 2 s budget and some) is
# abandoned and the others are read in a new worker, until EVIDENCE_DEADLINE_S.
EVIDENCE_DEADLINE_S = 10.0
PROCESS_DEADLINE_S = 2.5


# Why a holder process was not read: the batch's cap was reached by those
# read before it (gather_processes says which come first).
NOT_READ_OVER_CAP = (f"not read: {gathering.MAX_PROCESSES_PER_BATCH} other processes "
                     f"read first")


def holder_order(owns: list) -> list:
    """The distinct holder processes of owns (Ownerships, the oldest
    socket's first), in the order their evidence is read: every socket's
    own holders, then those of listeners that are not also a socket's;
    in each tier the users (real uid) take turns (owners.user_turns: each
    user's first, then each user's second...), each user's as their
    sockets come, a turn's users as their first socket comes."""
    tiers: tuple[dict, dict] = ({}, {})         # pid -> Holder, first seen first
    for own in owns:
        for h in own.holders:
            tiers[0].setdefault(h.pid, h)
    for own in owns:
        for h in own.listener_holders:
            if h.pid not in tiers[0]:
                tiers[1].setdefault(h.pid, h)
    out = []
    for tier in tiers:
        rank = {pid: i for i, pid in enumerate(tier)}
        # A uid not read (None) is a user of its own, as namespace_users's -1.
        uid_of = {}
        for pid, h in tier.items():
            uid = getattr(h, "uid", None)
            uid_of[pid] = -1 if uid is None else uid
        turns = owners.user_turns(uid_of, rank.__getitem__,
                                  lambda _uid, pid: rank[pid])
        out.extend(tier[pid] for pid in turns)
    return out


def _user(uid):
    """Whose a worker stuck in a process's memory is said to be (its tag)
    and whose reads are then left out: the process's real uid, or the user
    a subordinate uid is lent to (sockets/subids.py), so that one user's
    containers, each under a uid of its own, cannot each spend one of the
    MAX_STUCK_WORKERS the tracer allows."""
    return subids.shares().user_of(uid)


@dataclass
class ProcResolver:
    """Owners and diagnosis of sockets, read from a /proc tree (a fake one
    in tests). Every /proc read of the loop goes through here, and with a
    worker (the tool's own wiring) it happens in the gathering worker,
    under a deadline the loop never waits past (evidence/worker.py).
    Without one (unit tests), the reads happen in this process."""

    proc: str = procfs.PROC
    worker: Optional[GatherWorker] = None
    stacks: bool = True
    # Symbolizer problems counted by the worker (it symbolizes, not us).
    problems: dict = field(default_factory=dict)
    # Holder processes the last batches could not read in time, by
    # (pid, start time): read without stacks next, then not at all, so one
    # holder whose memory blocks cannot stall every later batch.
    slow: dict = field(default_factory=dict)
    skipped_processes: int = 0

    def _run(self, name: str, *args, stream: bool = False, reads_memory: bool = False,
             **deadlines):
        if self.worker is None:
            result = gathering.CALLS[name](*args)
            return list(result) if stream else result
        return self.worker.call(name, *args, stream=stream, reads_memory=reads_memory,
                                **deadlines)

    def snapshot_close_wait(self) -> list:
        """(netns, TcpRow) of every socket in CLOSE_WAIT now."""
        return self._run("snapshot_close_wait", self.proc, deadline_s=OWNERS_CAP_S,
                         progress_s=STALL_S)

    def start_close_wait(self, budget_s: float) -> RescanRead:
        """The start-up's read of the sockets already in CLOSE_WAIT: a
        rescan's (owners.rescan_close_wait), other namespaces than ours
        for budget_s, in the worker under its deadlines."""
        return self._run("rescan_close_wait", self.proc, {}, budget_s,
                         deadline_s=OWNERS_CAP_S, progress_s=STALL_S)

    def rescan_close_wait(self, last_read: dict, budget_s: float,
                          only: Optional[dict] = None, secret: bytes = b"") -> RescanRead:
        """owners.rescan_close_wait, in the worker under its deadlines."""
        return self._run("rescan_close_wait", self.proc, dict(last_read), budget_s, True,
                         only, secret, deadline_s=OWNERS_CAP_S, progress_s=STALL_S)

    def close_wait_census(self, last_read: dict, budget_s: float,
                          socket_filter, secret: bytes = b"") -> Census:
        """owners.close_wait_census, in the worker under its deadlines."""
        return self._run("close_wait_census", self.proc, dict(last_read), budget_s,
                         socket_filter, secret, deadline_s=OWNERS_CAP_S, progress_s=STALL_S)

    def worker_idle(self) -> Optional[bool]:
        """Whether a call made now would be the worker's next (none begun
        still out: GatherWorker.idle); None without a worker, or with one
        that answers every call in place and begins none."""
        return None if self.worker is None else self.worker.idle()

    def close_wait_census_begin(self, last_read: dict, budget_s: float,
                                socket_filter, secret: bytes = b""):
        """close_wait_census, begun in the worker: its worker.Pending,
        whose result() is the Census. Only with a worker."""
        return self.worker.begin("close_wait_census", self.proc, dict(last_read), budget_s,
                                 socket_filter, secret, deadline_s=OWNERS_CAP_S,
                                 progress_s=STALL_S)

    def in_close_wait_now(self, endpoints: list[Endpoints],
                          which: Optional[list[tuple[int, int]]] = None) -> list:
        """owners.in_close_wait_now, in the worker under its deadlines."""
        return self._run("in_close_wait_now", list(endpoints), self.proc, which,
                         deadline_s=OWNERS_CAP_S, progress_s=STALL_S)

    def held_now(self, inodes: list[int]) -> list:
        """owners.held_now, in the worker under its deadlines."""
        return self._run("held_now", list(inodes), self.proc,
                         deadline_s=OWNERS_CAP_S, progress_s=STALL_S)

    def owners(self, endpoints: list[Endpoints], others_budget_s: float = float("inf"),
               memory: Optional[LookupMemory] = None) -> dict:
        """owners.resolve of endpoints (in this order: the caller's oldest
        first), the namespaces other than ours for others_budget_s."""
        wanted = list(endpoints)
        chunks = self._run("owners_in_order", wanted, self.proc, others_budget_s,
                           memory or LookupMemory(),
                           deadline_s=OWNERS_CAP_S,
                           progress_s=STALL_S, stream=True)
        return _owners_of(wanted, chunks)

    def owners_begin(self, endpoints: list[Endpoints], others_budget_s: float = float("inf"),
                     memory: Optional[LookupMemory] = None) -> "OwnersAhead":
        """owners, begun in the worker and left to run while the caller does
        its own; OwnersAhead.result() takes the answer (GatherFailed as
        owners raises it). Only with a worker."""
        wanted = list(endpoints)
        pending = self.worker.begin("owners_in_order", wanted, self.proc, others_budget_s,
                                    memory or LookupMemory(), deadline_s=OWNERS_CAP_S,
                                    progress_s=STALL_S, stream=True)
        return OwnersAhead(wanted, pending)

    def gather_processes(self, owns: list, cache: diagnosis.Batch) -> set:
        """Reads the holder processes of owns into cache (in the worker,
        when there is one), at most gathering.MAX_PROCESSES_PER_BATCH of
        them; those not read by the deadline are said so. Returns the pids
        left unread for that cap (marked NOT_READ_OVER_CAP, counted in
        skipped_processes), for the caller to diagnose their sockets again.

        Which are read first (holder_order): every socket's own holders
        before any listener's, each tier in turns of their users (real
        uid). A listener's holders matter to a few causes only, and 300
        forks sharing one user's listener put 301 processes in every batch
        of that listener's sockets: read oldest socket first, they pushed
        another user's one holder past the cap ("unknown ... not
        gathered"). In turns, one user's many processes put off another
        user's by one a turn, never by all of them.

        Stacks are what reads a holder's memory, the one read a user can
        block (evidence/worker.py): a process whose read timed out before
        is read without them, then not at all; the processes of a user
        whose process left a worker blocked are read without them while it
        stays blocked; and when reads of memory are suspended, everyone's
        are read without them. Each says why its stacks are missing."""
        if self.worker is None:
            return set()            # read lazily, in gather(), in this process
        cache.offline = True
        holders, to_read = holder_order(owns), []
        for h in holders:
            key = (h.pid, getattr(h.process, "start_time", None))
            if self.slow.get(key, 0) >= 2:
                # Not read (nor counted against the cap: it costs nothing).
                cache.processes[h.pid] = diagnosis.ProcessEvidence(
                    pid=h.pid, unreadable=f"not read: {TIMED_OUT} before")
            else:
                to_read.append(h)
        cap = gathering.MAX_PROCESSES_PER_BATCH
        over = to_read[cap:]
        for h in over:
            cache.processes[h.pid] = diagnosis.ProcessEvidence(
                pid=h.pid, unreadable=NOT_READ_OVER_CAP)
        self.skipped_processes += len(over)
        holders = to_read[:cap]
        # Workers stuck in a user's memory are tagged with the user (a
        # subordinate uid as its user's: sockets/subids.py, _user).
        blocked_users = self.worker.stuck_tags()
        user_of = subids.shares().user_of       # the table looked up once, not per holder
        with_stacks, without = [], {}          # without: why -> holders
        for h in holders:
            misses = self.slow.get((h.pid, getattr(h.process, "start_time", None)), 0)
            if misses:
                without.setdefault(f"{TIMED_OUT} before", []).append(h)
            elif user_of(getattr(h, "uid", None)) in blocked_users:
                without.setdefault("a read of its user's memory is still blocked",
                                   []).append(h)
            elif not (self.stacks and cache.stacks):
                without.setdefault("", []).append(h)
            else:
                with_stacks.append(h)
        end = time.monotonic() + EVIDENCE_DEADLINE_S * knobs.time_scale()
        suspended = self._read_processes(with_stacks, True, cache, end)
        if suspended:
            without.setdefault(suspended, []).extend(
                h for h in with_stacks if h.pid not in cache.processes)
        for why, group in without.items():
            self._read_processes(group, False, cache, end, stacks_not_read=why)
        return {h.pid for h in over}

    def _read_processes(self, group: list, stacks: bool, cache: diagnosis.Batch,
                        end: float, stacks_not_read: str = "") -> str:
        """Streams the group's processes into cache. A process that gives
        nothing for PROCESS_DEADLINE_S is abandoned with its worker, marked,
        and the rest of the group goes on in a new worker, until end.
        Returns why, when reads of memory were refused (suspended) for
        those left, which the caller reads again without stacks."""
        why = ""
        while group:
            try:
                items = self._run("process_evidence", group, self.proc, None, stacks,
                                  deadline_at=end, progress_s=PROCESS_DEADLINE_S,
                                  stream=True, reads_memory=stacks)
                why = ""
            except GatherFailed as e:
                items, why = e.partial, e.why
            for kind, payload in items:
                if kind == "process":
                    if stacks_not_read and not payload.unreadable:
                        payload.stacks_not_read = stacks_not_read
                    cache.processes[payload.pid] = payload
                elif kind == "problems":
                    self.problems = payload
                elif kind == "skipped":
                    self.skipped_processes += payload
            rest = [h for h in group if h.pid not in cache.processes]
            if not why or not rest:
                return ""
            if why.startswith(SUSPENDED) and stacks:
                return why
            # The worker reads in order: the first not read is the one that
            # did not answer.
            culprit, group = rest[0], rest[1:]
            cache.processes[culprit.pid] = diagnosis.ProcessEvidence(
                pid=culprit.pid, unreadable=f"not read: {why}")
            if why == TIMED_OUT:
                key = (culprit.pid, getattr(culprit.process, "start_time", None))
                self.slow[key] = self.slow.get(key, 0) + 1
                while len(self.slow) > 4096:        # bounded
                    self.slow.pop(next(iter(self.slow)))
                # If its worker stays blocked, its user's memory is not
                # read again until it is not (gather_processes).
                self.worker.tag_last_abandoned(_user(getattr(culprit, "uid", None)))
            if why != TIMED_OUT or time.monotonic() >= end:
                break
        for h in group:
            cache.processes.setdefault(h.pid, diagnosis.ProcessEvidence(
                pid=h.pid, unreadable=f"not read: {why}"))
        return ""

    def diagnose(self, own, cache: diagnosis.Batch,
                 eof: Optional[diagnosis.EofReader] = None,
                 opener: Optional[diagnosis.Opener] = None):
        return diagnosis.gather(own, self.proc, cache=cache, eof=eof, opener=opener)

    def process_records(self, cache: diagnosis.Batch) -> list[dict]:
        return diagnosis.process_evidence(cache)

    def holder_states(self, pids: list[int]) -> dict:
        return self._run("holder_states", pids, self.proc, deadline_s=STATE_CAP_S,
                         progress_s=STALL_S)

    def identity(self, pid: int, uid) -> dict:
        return self._run("identity", pid, uid, self.proc, deadline_s=STATE_CAP_S,
                         progress_s=STALL_S)

    def captured_stacks(self, captures: list, uids: Optional[dict] = None) -> dict:
        """key -> frames of stacks the kernel copied (gathering.captured_stacks),
        "python" -> {key: (Python frames, why not)}; a key missing when its
        capture was not read in time (the caller says the place is unknown).

        A capture whose read blocks is abandoned with its worker (after
        PROCESS_DEADLINE_S without progress) and the others are read again
        in a new one, at most MAX_BLOCKED_SCANS times, until
        EVIDENCE_DEADLINE_S: one process's memory costs the batch a stall,
        not every other socket's place. uids (pid -> uid of the process):
        the abandoned worker is tagged with its user's, whose captures are
        then not read while it stays blocked (as gather_processes does for
        their evidence), so that one user cannot spend every stuck worker
        the tracer allows (MAX_STUCK_WORKERS) batch after batch."""
        uids = uids or {}
        out: dict = {"python": {}}
        blocked = self.worker.stuck_tags() if self.worker is not None else set()
        user_of = subids.shares().user_of
        pending = [c for c in captures if uids.get(c[1]) is None
                   or user_of(uids.get(c[1])) not in blocked]
        end = time.monotonic() + EVIDENCE_DEADLINE_S * knobs.time_scale()
        for _attempt in range(MAX_BLOCKED_SCANS + 1):
            if not pending:
                break
            why = ""
            try:
                items = self._run("captured_stacks", pending, self.proc, deadline_at=end,
                                  progress_s=PROCESS_DEADLINE_S, stream=True,
                                  reads_memory=True)
            except GatherFailed as e:
                items, why = e.partial or [], e.why
            reading = None
            for item in items:
                if item[0] == "reading":
                    reading = item[1]
                elif item[0] == "python":
                    out["python"][item[1]] = item[2]
                elif item[0] == "frames":
                    out[item[1]] = item[2]
                elif item[0] == "problems" and self.worker is not None:
                    self.problems = item[1]
            if why != TIMED_OUT or reading is None or time.monotonic() >= end:
                break
            # The capture being read did not answer: the others go on.
            pid = next((c[1] for c in pending if c[0] == reading), None)
            self.worker.tag_last_abandoned(_user(uids.get(pid)))
            pending = [c for c in pending if c[0] != reading and c[0] not in out]
        return out

    def python_processes(self) -> dict:
        """pid -> kernel walk of the running CPython processes (those not
        read in time are found when they first hold a socket).

        The scan reads their memory: a read that blocks (a FUSE page put
        where the scan found the process's own) is abandoned after STALL_S
        like any other, what came before it is kept, and the scan goes on
        in a new worker without that user's processes (its worker tagged
        with the uid, as gather_processes does), at most
        MAX_BLOCKED_SCANS times: one user costs the others a stall, never
        their registration."""
        found: dict = {}
        skip_uids = set(self.worker.stuck_tags()) if self.worker is not None else set()
        end = time.monotonic() + STATE_CAP_S * knobs.time_scale()
        for _attempt in range(MAX_BLOCKED_SCANS + 1):
            why = ""
            try:
                items = self._run("python_processes", self.proc, sorted(skip_uids),
                                  sorted(found), deadline_at=end, progress_s=STALL_S,
                                  stream=True, reads_memory=True)
            except GatherFailed as e:
                items, why = e.partial or [], e.why
            walks, reading, _left = _scanned(items)
            found.update(walks)
            if why != TIMED_OUT or reading is None or time.monotonic() >= end:
                break
            skip_uids.add(_user(reading))
            self.worker.tag_last_abandoned(_user(reading))
        return found

    def new_pythons(self, pids: list[int], limit: int, seconds: float):
        """python_processes of these processes alone (they exec()ed since
        the tracer last looked), at most limit of them read, for seconds:
        begun in the worker (its worker.Pending, for new_pythons_taken), or
        without a worker read now (what new_pythons_taken takes too). The
        users whose reads are stuck in the kernel are left out, as above."""
        skip_uids = sorted(self.worker.stuck_tags()) if self.worker is not None else []
        args = ("python_processes", self.proc, skip_uids, [], seconds, limit, list(pids))
        if self.worker is None:
            return list(gathering.CALLS[args[0]](*args[1:]))
        return self.worker.begin(*args, deadline_s=STATE_CAP_S, progress_s=STALL_S,
                                 stream=True, reads_memory=True)

    def new_pythons_taken(self, begun) -> tuple[dict, list]:
        """What new_pythons read: (pid -> kernel walk of the CPython ones,
        the pids it did not get to). A read that blocked leaves its
        worker tagged with the user whose process it read (that user's
        are left out of the next scans while it stays stuck)."""
        why = ""
        if isinstance(begun, list):
            items = begun
        else:
            try:
                items = begun.result()
            except GatherFailed as e:
                items, why = e.partial or [], e.why
        walks, reading, left = _scanned(items)
        if why == TIMED_OUT and reading is not None and self.worker is not None:
            self.worker.tag_last_abandoned(_user(reading))
        return walks, left

    def snapshot_candidates(self, socket_filter, min_age_ns: int, fd_flags: bool = True):
        return self._run("snapshot_candidates", socket_filter, min_age_ns, self.proc, fd_flags,
                         deadline_s=SNAPSHOT_CAP_S, progress_s=SNAPSHOT_STALL_S)

    def symbolizer_problems(self) -> dict:
        if self.worker is not None:
            return self.problems
        from closewait_trace.evidence import symbolize
        return symbolize.problems()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _scanned(items: list) -> tuple[dict, Optional[int], list]:
    """A CPython scan's stream (gathering.python_processes): pid -> walk of
    those found, the uid of the process it was reading when it ended (None
    when it ended between processes), and the pids it said it left."""
    found: dict = {}
    reading = None
    left: list = []
    for kind, pid, payload in items:
        if kind == "walk":
            found[pid] = payload
            reading = None
        elif kind == "left":
            left = payload
        else:
            reading = payload           # the uid of the process being read
    return found, reading, left


def _owners_of(wanted: list, chunks: list) -> dict:
    found = [own for chunk in chunks for own in chunk]
    if len(found) != len(wanted):
        # Not a partial answer taken for a whole one: asked again.
        raise GatherFailed(f"owners: {len(found)} answers for {len(wanted)} sockets")
    return dict(zip(wanted, found))


@dataclass
class OwnersAhead:
    """An owner lookup begun (ProcResolver.owners_begin)."""
    wanted: list
    pending: object             # worker.Pending
    _answer: Optional[dict] = None
    _failed: Optional[GatherFailed] = None

    def wait(self) -> None:
        """Takes the answer now (or its failure), for result()."""
        if self._answer is None and self._failed is None:
            try:
                self._answer = _owners_of(self.wanted, self.pending.result())
            except GatherFailed as e:
                self._failed = e

    def result(self) -> dict:
        """endpoints -> Ownership, as ProcResolver.owners; or its GatherFailed."""
        self.wait()
        if self._failed is not None:
            raise self._failed
        return self._answer
