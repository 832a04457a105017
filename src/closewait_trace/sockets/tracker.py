"""Which sockets are lingering, which are due to be reported, and what a
socket leaving CLOSE_WAIT means (pure: no I/O, no clock of its own).

Inputs are the kernel's tracking map as read each tick and the events from the
ring buffer; outputs are Lingerer objects for the caller to resolve and the
CLOSED facts. All times are kernel (boot-clock) nanoseconds.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass, field
from itertools import islice
from typing import (Callable, Collection, Generator, Iterable, Iterator, Mapping, Optional,
                    Protocol)

from closewait_trace.sockets import ages
from closewait_trace.sockets.owners import Ownership
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import (KIND_CLOSED, KIND_UNTRACKED_EXIT, Endpoints,
                                    KernelEvent, TrackedSocket)
from closewait_trace.sockets.tcprow import (CENSUS_ARRAY, KEEPALIVE_TIMER, TcpRow,
                                           census_key, same_socket)

# How long a reported socket that vanished from the map is remembered, waiting
# for its CLOSED event (submitted just before the kernel deletes the entry).
DEPARTED_GRACE_NS = 5_000_000_000
# Departed sockets forgotten per call once their grace is over (about 0.5 ms
# of freeing at rest), and how many may wait past it before more go at once
# (their memory stays bounded whatever the rate of departures).
EXPIRE_PER_TICK = 500
MAX_DEPARTED = 100_000
# sync_entries calls its `between` after each this many sockets (the live
# loop looks at its ring buffer then: 256 take 3-6 ms under load, more in wall
# time when the exiting holders keep both CPUs).
BETWEEN_EVERY = 256
# tcp_info's times are whole jiffies (1-10 ms, by the kernel's HZ): an age
# taken from them is widened by one, so that its bounds hold.
JIFFY_NS = 10_000_000
# Sockets looked up in the map per between() call when finding those gone
# (a membership test each: ~0.2 ms a block at rest).
GONE_BLOCK = 4096
# Sockets compared with a census between two yields of census_diff_steps
# (about 2 us each: the loop looks at its clock that often).
CENSUS_STEP = 256


class Verdict(Protocol):
    """What a socket's diagnosis says, as far as the layers below evidence/
    read it: evidence/diagnosis.Diagnosis is one (set by the live loop and
    `snapshot`, which sit above evidence/)."""
    cause: str
    summary: str


@dataclass(slots=True, eq=False)
class Lingerer:
    endpoints: Endpoints
    enter_ns: int               # pre-existing: estimated from tcp_info, else when tracing began
    skaddr: Optional[int]       # None for pre-existing sockets (unknown)
    pre_existing: bool = False
    reported: bool = False
    ownership: Optional[Ownership] = None   # once resolved
    diagnosis: Optional[Verdict] = None     # once resolved (diagnosis.Diagnosis)
    left_ns: Optional[int] = None
    # How the age is known (ages.py): traced by the kernel program,
    # estimated from tcp_info, or a lower bound counted from the trace's start.
    age_source: str = ages.TRACED
    enter_max_ns: Optional[int] = None  # estimated, range: the earliest it can have entered
    # Failed owner lookups so far: kept on the socket, so the count is
    # forgotten with it (a count kept apart outlived sockets that left).
    resolve_attempts: int = 0
    # Diagnoses made again because the batch's cap on processes read left
    # a holder of it unread (Tracer._rediagnose_over_cap): bounded, on the
    # socket for the same reason.
    evidence_retries: int = 0
    hidden: bool = False        # resolved, but its holders fail the holder filter
    # Where in the holder's code (records.code_*): set when first reported.
    code: Optional[dict] = None
    # Untracked like a pre-existing socket, but it entered CLOSE_WAIT while
    # the trace ran and the kernel's map never had it (the kernel skipped
    # the program, or the map was full): found by a rescan, not at start.
    found_late: bool = False
    # Found late in a namespace the start did not read, after the kernel
    # missed something: from before the start, or entered unseen since;
    # its age does not say which (Tracker._adopt).
    entry_unknown: bool = False
    # Which socket it is (untracked: as the table showed it; tracked: once
    # reported): sock_diag's cookie and the inode (tcprow.same_socket; 0:
    # not known; the inode is 0 in a listener's accept queue). Addresses
    # alone do not name a socket for long: anyone can close one and open
    # the next on the same addresses, which must not inherit the first
    # one's age or place here.
    cookie: int = 0
    inode: int = 0

    def is_socket(self, cookie: int, inode: int) -> bool:
        """Whether a socket seen on its addresses may be this one (not
        known to be another)."""
        return same_socket(self.cookie, self.inode, cookie, inode) is not False

    @property
    def before_start(self) -> bool:
        """In CLOSE_WAIT before the trace began (what records call
        pre_existing); a socket found late is untracked but not that."""
        return self.pre_existing and not self.found_late

    def age_ns(self, now_ns: int) -> int:
        return max(0, now_ns - self.enter_ns)

    # Compared and hashed by identity (eq=False): one object is one socket
    # seen once, and dicts and sets keyed by it need no id() int beside it
    # (32 bytes a socket each). Ordered by identity too, only so that heaps
    # of (time, Lingerer) need no tie-breaking id when two times are equal
    # (metrics.LiveSeries): the order means nothing else.
    def __lt__(self, other: "Lingerer") -> bool:
        return id(self) < id(other)

    @property
    def earliest_enter_ns(self) -> int:
        """When it may have entered CLOSE_WAIT at the earliest, for what
        orders sockets and compares them with a threshold: a range's lower
        end (keepalive) says nothing of the age, its upper end what it may
        be; any other age is its best value."""
        if self.age_source == ages.RANGE and self.enter_max_ns is not None:
            return min(self.enter_ns, self.enter_max_ns)
        return self.enter_ns

    def age_bound_ns(self, now_ns: int) -> int:
        return max(0, now_ns - self.earliest_enter_ns)

    def age_max_ns(self, now_ns: int) -> Optional[int]:
        """The upper bound of an estimated age (None otherwise)."""
        if self.enter_max_ns is None:
            return None
        return max(0, now_ns - self.enter_max_ns)

    @property
    def holder_pids(self) -> set[int]:
        return self.ownership.pids if self.ownership is not None else set()


@dataclass
class Closed:
    endpoints: Endpoints
    ts_ns: int
    duration_ns: int
    duration_is_lower_bound: bool   # duration_source == lower_bound
    how: str                      # close | abort | reset | unknown
    closer: Optional[tuple[int, str]]   # (pid, comm) when attributable
    cpu_task: tuple[int, str]     # whatever task the tracepoint ran on
    newstate: int
    pre_existing: bool
    reported: bool
    lingerer: Optional[Lingerer] = None
    duration_source: str = ages.TRACED   # as Lingerer.age_source
    duration_max_ns: Optional[int] = None   # estimated: the upper bound


def _in_blocks(items: Iterable, size: int,
               between: Optional[Callable[[], None]]) -> Iterator[list]:
    """items as lists of up to size, with between() called after each block
    is dealt with: a walk over every watched socket looks at the ring buffer
    as it goes (a burst of departures fills it meanwhile)."""
    it = iter(items)
    while block := list(islice(it, size)):
        yield block
        if between is not None:
            between()


def _by_address(endpoints: Iterable[Endpoints]) -> dict[tuple, set[int]]:
    """address key -> the namespaces sockets with those addresses are in."""
    out: dict[tuple, set[int]] = {}
    for ep in endpoints:
        out.setdefault(ep.address_key, set()).add(ep.netns)
    return out


def _tracked(row: TcpRow, tracked_netns: dict[tuple, set[int]]) -> bool:
    """Whether row's socket is tracked (tracked_netns: _by_address of the
    tracked ones): by namespace when both know it, by address when either
    does not."""
    endpoints = row.endpoints
    seen = tracked_netns.get(endpoints.address_key)
    return bool(seen) and (not endpoints.netns or 0 in seen or endpoints.netns in seen)


def lowest_keys(differences: Collection[tuple[int, int]], limit: int
                ) -> Collection[tuple[int, int]]:
    """Census differences ((namespace, key)), at most limit of them: all
    (the same collection) when there are no more, else those of the lowest
    keys, the same from one census to the next whatever their order."""
    if len(differences) <= limit:
        return differences
    return set(heapq.nsmallest(limit, differences, key=lambda item: item[1]))


def attribute_close(newstate: int, pid: int, holder_pids: set[int]) -> str:
    """How a socket left CLOSE_WAIT.

    CLOSE_WAIT -> LAST_ACK happens only inside close() or shutdown() of the
    process holding it, so the task is the closer. CLOSE_WAIT -> CLOSE is an
    abort when the holder closed with unread data (or SO_LINGER 0), and a
    reset or timeout otherwise, which runs in softirq on top of an unrelated
    task: attribute it only when that task is a known holder.
    """
    if newstate == tcpstates.LAST_ACK:
        return "close"
    if newstate == tcpstates.CLOSE:
        if pid in holder_pids:
            return "abort"
        return "reset" if holder_pids else "unknown"
    return "unknown"


@dataclass
class Tracker:
    threshold_ns: int
    start_ns: int
    by_skaddr: dict[int, Lingerer] = field(default_factory=dict)
    pre_existing: dict[Endpoints, Lingerer] = field(default_factory=dict)
    departed: dict[int, Lingerer] = field(default_factory=dict)
    # Not yet reported, by identity: what a tick must look at, so that a
    # tick costs nothing per socket already reported.
    pending: dict[int, Lingerer] = field(default_factory=dict)
    # pre_existing by addresses alone: the same addresses may be in several
    # namespaces, and an event may not know its namespace (no BTF).
    pre_by_address: dict[tuple, set[Endpoints]] = field(default_factory=dict)
    # Reported sockets that stopped lingering since the caller last took
    # them (took_left): what the caller watches is dropped by these, not by
    # asking of every watched socket at every tick whether it still lingers.
    left: list[Lingerer] = field(default_factory=list)
    # Told of every socket that starts (added) and stops (removed) being
    # tracked, and of a reported one's new owners (changed): what the
    # metrics keep up to date without walking every socket (metrics.LiveSeries).
    observers: list = field(default_factory=list)
    # Set by the caller while events it has not taken yet wait (a burst's
    # backlog): the departed sockets' CLOSED events are among them, however
    # long after the grace they come, so none is forgotten meanwhile.
    hold_departed: bool = False
    # Untracked sockets (found at start or by a rescan) kept at most: the
    # kernel's map bounds the tracked ones, this the others (the live loop
    # sets it to --max-tracked). A user holding a million sockets in
    # CLOSE_WAIT would otherwise cost a million entries here. Those not
    # kept at the last look (the start, or the last rescan) are counted:
    # not a running total, which each rescan would count again.
    max_untracked: int = 1 << 62
    untracked_over: int = 0
    # The most not kept at any one look: whoever fills the room and then
    # lets go leaves the last look at 0, and the summary said nothing of
    # the time sockets went unfollowed.
    untracked_over_most: int = 0
    # Whether some sockets from before the start may be in CLOSE_WAIT
    # unknown here: the start's read failed (the caller says so) or kept
    # fewer than it found (max_untracked). A socket a rescan finds is then
    # from before the start or entered unseen since, and its age estimated
    # from tcp_info says which (as in a namespace the start left unread):
    # taken as entered unseen, each such socket was reported with its age
    # cut to the rescan and "its entry not seen".
    seed_incomplete: bool = False

    def _stopped(self, l: Optional[Lingerer]) -> None:
        if l is not None:
            if l.reported:
                self.left.append(l)
            for o in self.observers:
                o.removed(l)

    def _added(self, l: Lingerer) -> None:
        for o in self.observers:
            o.added(l)

    def relabel(self, l: Lingerer) -> None:
        """Its owners, its being reported or hidden changed."""
        for o in self.observers:
            o.changed(l)

    def take_left(self) -> list[Lingerer]:
        out, self.left = self.left, []
        return out

    def seed(self, already_in_close_wait: Iterable[TcpRow],
             tracked: Iterable[TrackedSocket], observed_ns: Optional[int] = None,
             read_at: Mapping[int, tuple[int, int]] = {}) -> int:
        """Sockets found in CLOSE_WAIT at start-up (rows of the sock_diag dump
        with their tcp_info times, read at observed_ns, default start_ns, or
        in their namespace's read_at: _adopt),
        minus those the kernel program saw enter it (they raced the attach
        and are tracked already), so none is missed and none is reported
        twice. Each gets an age estimated from tcp_info (ages.py): those
        already past the threshold are due at the first tick."""
        observed_ns = self.start_ns if observed_ns is None else observed_ns
        self.count_untracked_over(self._adopt(
            already_in_close_wait, _by_address(t.endpoints for t in tracked),
            min(observed_ns, self.start_ns), observed_ns, found_late=False, read_at=read_at))
        if self.untracked_over:
            self.seed_incomplete = True
        return len(self.pre_existing)

    def count_untracked_over(self, over: int) -> None:
        """How many were not kept at this look (untracked_over), and the
        most at any look."""
        self.untracked_over = over
        self.untracked_over_most = max(self.untracked_over_most, over)

    def rescan(self, in_close_wait: Iterable[TcpRow], dumped_netns: set[int],
               dump_began_ns: int, between: Optional[Callable[[], None]] = None,
               only: Optional[Mapping[int, Collection[int]]] = None, secret: bytes = b""
               ) -> tuple[list[TcpRow], list[Lingerer]]:
        """Compare the view with a sock_diag dump of every socket in
        CLOSE_WAIT, taken when the kernel said it missed some state changes
        (it skipped the program, dropped an event, or its map was full) and
        after the map was read again and the events before it taken.
        Returns (found, gone), for the caller to check each with the kernel
        before acting on it: nothing here is changed.

        - found: the rows of sockets nothing here knows (not tracked, and
          not the socket known untracked on those addresses: another one).
          One that entered CLOSE_WAIT unseen is among them, but so is one
          that left between the dump and the map read (its entry gone from
          the map, it is in the dump): adopt_found takes only those the
          kernel says are there still, the same socket, after the map read.
        - gone: sockets known here, in a namespace the dump read, that
          entered CLOSE_WAIT before the dump began and are not in it (an
          untracked one: not that very socket): its exit was never run (its
          map entry would be gone) or its event lost. For the caller to
          drop (drop_unseen) once the kernel says so of each alone.

        A socket in a namespace the dump did not read (or whose namespace
        is not known) is never judged gone. between: called after every
        BETWEEN_EVERY sockets (2 us each: 0.2 s of comparing at 100,000
        with no look at the ring otherwise). only: namespace -> census keys
        (census_key with secret): the dump has the rows of those sockets
        alone (owners.rescan_close_wait's only), and only a socket known
        here with one of those keys can be judged gone."""
        rows = list(in_close_wait)
        dumped: dict[tuple, list[TcpRow]] = {}
        for row in rows:
            dumped.setdefault(row.endpoints.address_key, []).append(row)
        gone = []
        known = list(self.by_skaddr.values()) + list(self.pre_existing.values())
        for block in _in_blocks(known, BETWEEN_EVERY * 4, between):
            for l in block:
                ep = l.endpoints
                if not ep.netns or ep.netns not in dumped_netns:
                    continue
                if l.skaddr is not None and l.enter_ns >= dump_began_ns:
                    continue            # entered while the dump ran: may be after it
                if only is not None and census_key(ep, secret) not in only.get(ep.netns, ()):
                    continue            # not looked for: the dump has no row for it
                if not any((not row.endpoints.netns or row.endpoints.netns == ep.netns)
                           and l.is_socket(row.cookie, row.inode)
                           for row in dumped.get(ep.address_key, ())):
                    gone.append(l)
        tracked = _by_address(l.endpoints for l in self.by_skaddr.values())
        found = []
        for block in _in_blocks(rows, BETWEEN_EVERY * 4, between):
            found.extend(row for row in block if not self._known(row, tracked))
        return found, gone

    def census_diff(self, keys: Mapping[int, bytes], dumped: set[int], dump_began_ns: int,
                    between: Optional[Callable[[], None]] = None,
                    secret: bytes = b"") -> set[tuple[int, int]]:
        """Where a census (owners.close_wait_census: each namespace's
        sockets in CLOSE_WAIT as census keys) and what is known here differ,
        as (namespace, key), only in the namespaces the census read whole:

        - a socket in CLOSE_WAIT that nothing here knows, tracked, followed
          without the map or departed within its grace (an entry the hook
          missed; or one whose event is still to come). No more than there
          is room to follow (max_untracked), the lowest keys: those beyond
          could not be followed, and would differ at every census (a miss
          among them is not looked for);
        - a socket known here, in a namespace read whole, that entered
          before the census began and is not in it (an exit the hook
          missed), also where no socket is left in CLOSE_WAIT (no keys).

        By addresses: a census says only that a rescan is worth its cost
        (which checks each socket by the kernel's cookie before acting on
        it), and only when the same difference is there at the next census
        too (the caller's), so that a socket on its way in or out while the
        census ran does not set one off. A known socket whose exit was
        missed while another on its addresses lingers in its namespace
        does not differ (addresses only). secret: census_key's."""
        steps = self.census_diff_steps(keys, dumped, dump_began_ns, secret)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            if between is not None:
                between()

    def census_diff_steps(self, keys: Mapping[int, bytes], dumped: set[int],
                          dump_began_ns: int, secret: bytes = b""
                          ) -> Generator[None, None, set[tuple[int, int]]]:
        """census_diff in steps of about CENSUS_STEP sockets, yielding
        between them; its answer is the generator's return value. The loop
        takes a few steps a tick (Tracer.census): at 100,000 sockets the
        whole comparison was one tick of 0.1-0.4 s. What changes here
        between two steps is what changes while a census is read: a socket
        that leaves after the census was read was in it; one that enters
        after it began is not judged (enter_ns); one that leaves is kept
        departed for its grace, and counts as known."""
        # Keys as ints, each made once and kept in an array beside the
        # sockets (8 bytes each) rather than with each socket or in a set:
        # with 100,000 sockets lingering this runs while they are reported,
        # and each list, tuple or set more is megabytes at the peak.
        every = [*self.by_skaddr.values(), *self.pre_existing.values()]
        yield                               # about 1 ms at 100,000
        # Every namespace read whole: one with no socket left in CLOSE_WAIT
        # has no keys, and every socket known there is gone.
        seen: dict[int, set[int]] = {}
        for netns in dumped:
            read = array(CENSUS_ARRAY, keys.get(netns, b""))
            here = seen[netns] = set()
            for at in range(0, len(read), CENSUS_STEP * 16):
                here.update(read[at:at + CENSUS_STEP * 16])
                yield
            del read
        diff: set[tuple[int, int]] = set()
        known = array(CENSUS_ARRAY)
        for at in range(0, len(every), CENSUS_STEP):
            for l in every[at:at + CENSUS_STEP]:
                ep = l.endpoints
                key = census_key(ep, secret)
                known.append(key)
                here = seen.get(ep.netns)
                if (here is not None and (l.skaddr is None or l.enter_ns < dump_began_ns)
                        and key not in here):
                    diff.add((ep.netns, key))
            yield
        room = self.max_untracked - len(self.pre_existing)
        if room <= 0:
            return diff
        # What is left of the census once every key known here is taken
        # out of it, in place: a second set of every known key was 7 MB
        # more at 100,000 sockets, at the peak of their reporting.
        anywhere: set[int] = set()             # known, namespace not known

        def taken_out(netns: int, key: int) -> None:
            if not netns:
                anywhere.add(key)
            elif (here := seen.get(netns)) is not None:
                here.discard(key)
        for at in range(0, len(every), CENSUS_STEP * 4):
            for l, key in zip(every[at:at + CENSUS_STEP * 4], known[at:at + CENSUS_STEP * 4]):
                taken_out(l.endpoints.netns, key)
            yield
        del every, known
        departed = list(self.departed.values())
        for at in range(0, len(departed), CENSUS_STEP):
            for l in departed[at:at + CENSUS_STEP]:
                taken_out(l.endpoints.netns, census_key(l.endpoints, secret))
            yield
        unknown = [(netns, key) for netns, here in seen.items() for key in here
                   if key not in anywhere]
        # No more than could be followed; the same ones at each census, so
        # that two in a row agree.
        diff.update(lowest_keys(unknown, room))
        return diff

    def outside(self, namespaces: frozenset) -> list[Lingerer]:
        """Sockets known here, their namespace and inode known, whose
        namespace is not among these."""
        return [l for l in self.lingering()
                if l.inode and l.endpoints.netns and l.endpoints.netns not in namespaces]

    def adopt_found(self, found: Iterable[TcpRow], observed_ns: int,
                    before_start_netns: frozenset = frozenset(),
                    kernel_missed: bool = True,
                    read_at: Mapping[int, tuple[int, int]] = {}) -> int:
        """Adopt what a rescan found (rows the kernel says are in CLOSE_WAIT
        after the map read, read at observed_ns) as untracked, `found_late`,
        their age estimated from tcp_info as the start-up's are (never
        older than observed_ns when tcp_info says nothing).

        In a namespace the start-up's read left unread (before_start_netns,
        read now for the first time), one is from before the start, as the
        seed's are: the kernel runs its program for every socket that
        enters CLOSE_WAIT while it traces, so unless it missed some
        (kernel_missed), it would be known. If it did, tcp_info says which,
        only if the last data came after the start (the FIN comes after it):
        else it may be from before the start, taken as such; and so anywhere
        when the start's read may have left some (seed_incomplete). Returns
        how many were adopted."""
        rows = list(found)
        before = len(self.pre_existing)
        tracked = _by_address(l.endpoints for l in self.by_skaddr.values())
        early = [row for row in rows if row.endpoints.netns in before_start_netns]
        over = 0
        if early:
            rows = [row for row in rows if row.endpoints.netns not in before_start_netns]
            over += self._adopt(early, tracked, min(observed_ns, self.start_ns), observed_ns,
                                found_late=kernel_missed, late_from_ns=self.start_ns,
                                read_at=read_at)
        if self.seed_incomplete:
            latest_ns, late_from_ns = min(observed_ns, self.start_ns), self.start_ns
        else:
            latest_ns, late_from_ns = observed_ns, None
        over += self._adopt(rows, tracked, latest_ns, observed_ns, found_late=True,
                            late_from_ns=late_from_ns, read_at=read_at)
        self.count_untracked_over(over)
        return len(self.pre_existing) - before

    def _known(self, row: TcpRow, tracked_netns: dict[tuple, set[int]]) -> bool:
        """Whether row is a socket known here: tracked (by namespace when
        both know it, by address when either does not), or the untracked
        one on those endpoints (not known to be another socket)."""
        known = self.pre_existing.get(row.endpoints)
        if known is not None and known.is_socket(row.cookie, row.inode):
            return True
        return _tracked(row, tracked_netns)

    def _adopt(self, rows: Iterable[TcpRow], tracked_netns: dict[tuple, set[int]],
               latest_ns: int, observed_ns: int, found_late: bool,
               late_from_ns: Optional[int] = None,
               read_at: Mapping[int, tuple[int, int]] = {}) -> int:
        """rows not known here, as untracked sockets; tracked_netns: the
        namespaces of the tracked sockets by address (_by_address). Returns
        how many were not kept (max_untracked). found_late with
        late_from_ns: only those whose estimated entry is at or after it
        (the others were in CLOSE_WAIT before it). read_at: namespace ->
        when its dump began and ended (kernel clock): its rows' tcp_info
        times were taken in between, each to a whole jiffy (JIFFY_NS);
        else at observed_ns."""
        over = 0
        for row in rows:
            endpoints = row.endpoints
            # Another socket known on these endpoints (not found gone yet)
            # keeps its place: this one waits for the next look.
            if endpoints in self.pre_existing or _tracked(row, tracked_netns):
                continue
            if len(self.pre_existing) >= self.max_untracked:
                over += 1
                continue
            window = read_at.get(endpoints.netns)
            seen_from, seen_to = ((window[0] - JIFFY_NS, window[1] + JIFFY_NS)
                                  if window is not None else (None, observed_ns))
            est = ages.estimate_entry(row.last_ack_recv_ms, row.last_data_recv_ms, seen_to,
                                      keepalive=row.timer == KEEPALIVE_TIMER,
                                      observed_from_ns=seen_from)
            # Without tcp_info all we know is that it was there when found
            # (at start: since the start).
            late, either = found_late, False
            if found_late and late_from_ns is not None:
                # Before late_from_ns where its latest possible entry is (the
                # FIN came before the last ACK; without one, before it was
                # found), after it where its earliest is (the last data came
                # before the FIN); else either, and said so. The ACK reading
                # is only a lower bound of the age, which a holder keeps
                # young by sending (each byte's ACK renews it): taken as the
                # entry, a socket from before the start was said to have
                # entered unseen since.
                before = est.enter_ns < late_from_ns
                late = est.enter_max_ns is not None and est.enter_max_ns >= late_from_ns
                either = not before and not late
            enter_ns = min(est.enter_ns, observed_ns if late or either else latest_ns)
            l = Lingerer(endpoints=endpoints, enter_ns=enter_ns, skaddr=None,
                         pre_existing=True, age_source=est.source,
                         enter_max_ns=est.enter_max_ns, found_late=late or either,
                         entry_unknown=either, cookie=row.cookie, inode=row.inode)
            self._add_pre_existing(l)
        return over

    def drop_unseen(self, l: Lingerer) -> bool:
        """Forget a socket that left CLOSE_WAIT unseen (rescan); False if
        it is no longer known here (its event came meanwhile)."""
        if l.pre_existing:
            if self.pre_existing.get(l.endpoints) is not l:
                return False
            self._pop_pre_existing(l.endpoints)
            return True
        if self.by_skaddr.get(l.skaddr) is not l:
            return False
        del self.by_skaddr[l.skaddr]
        self.pending.pop(id(l), None)
        self._stopped(l)
        return True

    def _add_pre_existing(self, l: Lingerer) -> None:
        self.pre_existing[l.endpoints] = l
        self.pre_by_address.setdefault(l.endpoints.address_key, set()).add(l.endpoints)
        self.pending[id(l)] = l
        self._added(l)

    def _pop_pre_existing(self, endpoints: Endpoints) -> Optional[Lingerer]:
        l = self.pre_existing.pop(endpoints, None)
        self._stopped(l)
        if l is not None:
            same = self.pre_by_address.get(endpoints.address_key)
            if same is not None:
                same.discard(endpoints)
                if not same:
                    del self.pre_by_address[endpoints.address_key]
            self.pending.pop(id(l), None)
        return l

    def _pre_existing_left(self, endpoints: Endpoints) -> Optional[Lingerer]:
        """The pre-existing socket an untracked exit is about. Exact when
        both know the namespace; else by address, if only one socket has
        those addresses. With several, which one left cannot be told: each
        is put back as unreported, so that it is looked up again (the one
        gone is then found gone, the others reported afresh), and None."""
        l = self._pop_pre_existing(endpoints)
        if l is not None:
            return l
        candidates = [ep for ep in self.pre_by_address.get(endpoints.address_key, ())
                      if ep.same_socket_as(endpoints)]
        if len(candidates) == 1:
            return self._pop_pre_existing(candidates[0])
        for ep in candidates:
            old = self._pop_pre_existing(ep)
            self._add_pre_existing(Lingerer(
                endpoints=ep, enter_ns=old.enter_ns, skaddr=None, pre_existing=True,
                age_source=old.age_source, enter_max_ns=old.enter_max_ns,
                found_late=old.found_late, entry_unknown=old.entry_unknown,
                cookie=old.cookie, inode=old.inode))
        return None

    def sync(self, tracked: Iterable[TrackedSocket], now_ns: int) -> list[Lingerer]:
        """sync_entries for decoded map entries (tests, small maps)."""
        by_key = {t.skaddr: t for t in tracked}
        return self.sync_entries({k: t.enter_ns for k, t in by_key.items()},
                                 lambda k: by_key[k].endpoints, now_ns)

    def sync_entries(self, entries: Mapping[int, int], endpoints_of: Callable[[int], Endpoints],
                     now_ns: int, between: Optional[Callable[[], None]] = None) -> list[Lingerer]:
        """Bring the view in line with the kernel's map (socket address ->
        CLOSE_WAIT entry time); endpoints are decoded for new sockets only.
        Returns the sockets that just crossed the threshold. between: called
        after every BETWEEN_EVERY sockets (100,000 leaving at once take
        1-2.5 s here, while their CLOSED events fill the ring buffer)."""
        for block in _in_blocks(entries.items(), BETWEEN_EVERY, between):
            for skaddr, enter_ns in block:
                known = self.by_skaddr.get(skaddr)
                if known is None or known.enter_ns != enter_ns:
                    if known is not None:
                        self.pending.pop(id(known), None)
                        self._stopped(known)        # its address now another socket's
                    l = Lingerer(endpoints=endpoints_of(skaddr), enter_ns=enter_ns,
                                 skaddr=skaddr)
                    self.by_skaddr[skaddr] = l
                    self.pending[id(l)] = l
                    if self.observers:
                        self._added(l)
        if len(entries) != len(self.by_skaddr):
            # Looked for a block at a time, between() after each: at
            # 100,000 the whole comprehension was most of a 288 ms stretch
            # without a look at the ring in a burst of departures (the loop
            # getting a fraction of a CPU).
            gone_all = []
            for block in _in_blocks(list(self.by_skaddr), GONE_BLOCK, between):
                gone_all.extend(s for s in block if s not in entries)
            for block in _in_blocks(gone_all, BETWEEN_EVERY, between):
                for skaddr in block:
                    gone = self.by_skaddr.pop(skaddr)
                    self.pending.pop(id(gone), None)
                    self._stopped(gone)
                    if gone.reported:
                        gone.left_ns = now_ns
                        self.departed.pop(skaddr, None)     # kept in departure order
                        self.departed[skaddr] = gone
        return self.due(now_ns)

    def due(self, now_ns: int) -> list[Lingerer]:
        """Unreported sockets old enough to report; no map read needed when
        the kernel says nothing entered or left CLOSE_WAIT since the last one."""
        if self.departed:
            self._expire_departed(now_ns)
        return self.matured(now_ns)

    def matured(self, now_ns: int) -> list[Lingerer]:
        """Unreported sockets old enough to report (due, without its
        expiry of departed sockets)."""
        return [l for l in self.pending.values()
                if l.age_bound_ns(now_ns) >= self.threshold_ns]

    def matures_by(self, at_ns: int) -> bool:
        """Whether an unreported socket is old enough to report at at_ns
        (matured, stopping at the first)."""
        threshold = self.threshold_ns
        return any(l.age_bound_ns(at_ns) >= threshold for l in self.pending.values())

    def _expire_departed(self, now_ns: int) -> None:
        """Forget departed sockets after the grace, map read or not. They are
        in departure order, so this stops at the first one still waiting
        (a tick costs nothing per departed socket). At most
        EXPIRE_PER_TICK a call (more only past MAX_DEPARTED): forgetting a
        socket frees its state (~10 objects), and 85,885 at once, whose
        CLOSED events were lost, took 363 ms of an idle tick at 100,000."""
        over = len(self.departed) - MAX_DEPARTED
        if self.hold_departed:
            # Their CLOSED events still wait to be taken: only those over
            # MAX_DEPARTED go (oldest first), so that the memory stays
            # bounded however long the wait.
            expired = list(islice(self.departed, max(0, over)))
        else:
            budget = max(EXPIRE_PER_TICK, over)
            expired = []
            for skaddr, l in self.departed.items():
                if len(expired) >= budget or now_ns - (l.left_ns or now_ns) <= DEPARTED_GRACE_NS:
                    break
                expired.append(skaddr)
        for skaddr in expired:
            del self.departed[skaddr]

    def is_lingering(self, l: Lingerer) -> bool:
        if l.pre_existing:
            return self.pre_existing.get(l.endpoints) is l
        return self.by_skaddr.get(l.skaddr) is l

    def mark_reported(self, l: Lingerer) -> None:
        l.reported = True
        self.pending.pop(id(l), None)
        if self.observers:
            self.relabel(l)

    def lingering(self) -> list[Lingerer]:
        return list(self.pre_existing.values()) + list(self.by_skaddr.values())

    def forget_pre_existing(self, endpoints: Endpoints) -> None:
        """A pre-existing socket found gone when resolved (left unseen)."""
        self._pop_pre_existing(endpoints)

    def on_event(self, ev: KernelEvent) -> Optional[Closed]:
        if ev.kind == KIND_CLOSED:
            still = self.by_skaddr.pop(ev.skaddr, None)
            self._stopped(still)
            l = still or self.departed.pop(ev.skaddr, None)
            if l is not None:
                self.pending.pop(id(l), None)
                if l.endpoints != ev.endpoints:
                    l = None
            return self._closed(ev, l, ev.duration_ns)
        if ev.kind == KIND_UNTRACKED_EXIT:
            l = self._pre_existing_left(ev.endpoints)
            if l is None:
                return None      # counted by the kernel as exit_untracked
            # Its age at start (estimated, or the time since start as a
            # lower bound) plus the time traced since.
            duration = l.age_ns(ev.ts_ns)
            if not l.reported and duration < self.threshold_ns:
                return None
            return self._closed(ev, l, duration, l.age_source, l.age_max_ns(ev.ts_ns))
        return None

    def _closed(self, ev: KernelEvent, l: Optional[Lingerer], duration_ns: int,
                source: str = ages.TRACED, duration_max_ns: Optional[int] = None) -> Closed:
        holders = l.holder_pids if l else set()
        how = attribute_close(ev.newstate, ev.pid, holders)
        closer = (ev.pid, ev.comm) if how in ("close", "abort") else None
        return Closed(endpoints=ev.endpoints, ts_ns=ev.ts_ns, duration_ns=duration_ns,
                      duration_is_lower_bound=source == ages.LOWER_BOUND, how=how,
                      closer=closer, cpu_task=(ev.pid, ev.comm), newstate=ev.newstate,
                      pre_existing=bool(l and l.before_start),
                      reported=bool(l and l.reported), lingerer=l,
                      duration_source=source, duration_max_ns=duration_max_ns)
