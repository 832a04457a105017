"""The live tracer: drives a kernel probe, the tracker, owner resolution
and diagnosis, and hands output records to the sinks.

Everything outside is passed in: the probe (anything with the `Probe`
interface: the real KernelProbe, or a fake that replays scripted kernel
events and map contents), the resolver (owners and diagnosis read from a
/proc tree), and the sinks. So the loop is tested without root.

Start-up order matters so that a socket changing state while we attach is
neither missed nor reported twice: attach first, then snapshot the sockets
already in CLOSE_WAIT, then read the kernel's map; a socket in both the
snapshot and the map entered CLOSE_WAIT after the attach and is tracked.
"""

from __future__ import annotations

import gc
import operator
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, NamedTuple, Optional, Protocol

from closewait_trace import knobs
from closewait_trace.evidence import diagnosis, place
from closewait_trace.sockets import owners, procfs, subids
from closewait_trace.output import records, render
from closewait_trace.kernel.events import KIND_TRANSITION, R_KIND, R_TS, KernelEvent, event_of_row
from closewait_trace.sockets.filters import HolderFilter, SocketFilter, record_people
from closewait_trace.kernel.probe import ProbeConfig
from closewait_trace.output.sinks import Sink, TickView
from closewait_trace.output.lingerlines import LingerReport
from closewait_trace.sockets.owners import RescanRead
from closewait_trace.sockets.tracker import Lingerer, Tracker, lowest_keys
from closewait_trace.evidence import worker
from closewait_trace.evidence.resolver import ProcResolver
from closewait_trace.evidence.worker import GatherFailed
from closewait_trace.live.gcpolicy import GcPolicy

_ROWS_ONLY = {tuple}
_TRANSITIONS_ONLY = {KIND_TRANSITION}
_kind_of = operator.itemgetter(R_KIND)

# Events taken per poll before returning to the main loop (ticks, Ctrl-C).
POLL_BATCH = 4096
# Events held while the gathering worker reads (about 100 bytes each).
MAX_PENDING = 16 * POLL_BATCH
# At exit, how long to keep draining the buffer: what is there is written
# out, yet a flood (--all) cannot hold the exit; what is left is counted
# (events_unread). Drained in small batches, and a batch being written
# stops at the deadline, so the deadline holds within a few milliseconds.
# Only a buffer that cannot be emptied meets it (a saturating --all): 30 ms,
# not 50, keeps SIGINT -> exit under 0.2 s there (issue 20, target 5), and
# what those 20 ms would have written is counted as unread instead.
FINAL_DRAIN_S = 0.03
FINAL_LOOK_S = 0.01
FINAL_BATCH = 256
# The nice value of the stopping thread (_hurry): above a saturating workload
# for the exit's last 0.1 s, which is bounded by the deadlines above.
STOP_NICE = -10
# Events written between two looks at the clock and the stop flag.
DRAIN_CHUNK = 256
# Records emitted, or sockets watched, between two looks at the ring buffer
# (sip): a burst's CLOSED lines took up to 300 us each at load 3, and a
# re-diagnosis in the departures' tick 0.4 s in the loop (100,000 sockets).
# Wall time is what counts: 10 holders exiting at once keep both CPUs, and
# the loop gets a fraction of one while the kernel fills the ring (every 64
# records still lost 2,928 of 100,000). A look costs ~0.3 us.
SIP_EVERY = 8
# --all: after a pass that took fewer events than this, wait this long
# before the next (events gather in the buffer, written in one batch).
COALESCE_BELOW = 256
COALESCE_S = 0.005

# Network namespaces other than the tracer's own, whose sockets a tick's
# owner lookup resolves: each costs entering and dumping it (3-5 ms; 140 ms
# for one with a 16M-bucket TCP hash, even empty), and any user can make
# them by the thousand. Their tables are read for at most this long, after
# the tracer's own namespace and at least one other, the users who own
# them taking turns, each user's oldest first (owners.resolve). The
# sockets of those left (owners.OWNER_NOT_READ) are looked up again at a
# later tick, with no attempt counted. Before: at most 64 namespaces a
# tick, oldest first, each read whole: 1,500 of a user's delayed another
# namespace's report by N/64 ticks, and 20 slow ones held a batch 3-4 s.
OWNERS_OTHERS_BUDGET_S = 0.2
# After a tick that left some (Tracer.owners_left), the next comes this
# soon rather than a whole tick later: 20 slow namespaces were named over
# 10 s at two a tick. The loop still drains the ring buffer in between.
OWNERS_LEFT_RETRY_S = 0.2
# A batch at least this large has the owners of the sockets due after it
# looked up while its records are written (Tracer._look_ahead): a flood.
AHEAD_BATCH = 1000
# Namespaces whose last owner lookup is remembered (Tracer.owner_memory),
# beyond those of the last batch: a few bytes each.
OWNER_READS_KEPT = 4096

# A socket whose addresses cannot be found in any namespace's TCP table
# (e.g. its namespace has no process left to read it through) is reported
# without owners after this many attempts.
MAX_RESOLVE_ATTEMPTS = 3
# A socket diagnosed while the batch's cap on holder processes read left one
# of its holders unread is diagnosed again at most this many times
# (Tracer._rediagnose_over_cap).
MAX_EVIDENCE_RETRIES = 2


# A holder's state (gathering.holder_states) once it exits: in its exit
# (closing its descriptors: 10,000 take a while), gone from /proc, a zombie,
# or dead.
# The kernel's counts of what it could not give us, each a "lost" record
# when it grows: events the buffer had no room for, sockets its map had no
# room for, state changes it never ran the program for.
LOSS_COUNTERS = ("events_lost", "map_full", "transitions_skipped")

# A socket's listener's holders kept once its record is written, and watched
# for a change of state: the first, those its diagnosis names (a never
# accepted socket's names this many, with their states; an inherited one's
# the first other than its holder). Every owner lookup answers with its own
# tuple of the listener's holders (a Holder and a ProcessSnapshot each), and
# a socket kept its lookup's, and was watched under every pid in it, for as
# long as it lingered: one socket a tick accepted from a listener 1,000 of
# nobody's forks hold grew the tracer 1.6 MB/s, 52 to 298 MB in 150 s
# (review F3, 2026-12-07). The record has them all (records.listener_part).
LISTENER_HOLDERS_WATCHED = diagnosis.MAX_NAMED
# The kept ones are copies without their command line and process snapshot
# (read by nothing once the record is out), one tuple of them shared by the
# sockets whose kept holders are the same, through a table of this many
# (cleared when full: only sharing is lost).
LISTENER_KEPT_SHARED = 1024
# After any of those grows, the sockets in CLOSE_WAIT are read again from
# sock_diag (Tracer.rescan): those the map missed are adopted, those whose
# leaving was missed forgotten. At most once in this long: under a churn
# that makes the kernel skip the program every tick, a rescan costs one
# read of the sockets in CLOSE_WAIT every 5 s (bench/rescan.py: 6.7-8.5 us
# a socket to read, 1.5-2.6 us to compare; 18 ms for 1,000).
RESCAN_EVERY_S = 5.0
# ...and without any counted loss when a census finds the need: the
# kernel's hook can fail to hand the program a state change and count
# nothing (seen on 6.18: docs/how-it-works.md, "The raw tracepoint is not
# lossless either"). A socket whose entry into CLOSE_WAIT went so was never
# reported, and one whose exit went so was reported lingering for as long
# as the tracer ran. Once in this long the worker reads the sockets in
# CLOSE_WAIT as 8-byte keys (owners.close_wait_census), and the loop
# compares them with what it knows (Tracker.census_diff): a rescan follows
# when the same difference is there at the next census too, which then
# comes RESCAN_EVERY_S after (a socket on its way in or out while the
# census ran differs only once). A rescan's rows held about 75 MB more with
# 100,000 sockets lingering; their keys are 800 KB.
# CLOSEWAIT_TRACE_RECONCILE_S (knobs.py) shortens it for the tests.
RECONCILE_EVERY_S = 60.0
# ...or this many times as long as the last census took, if longer: a
# check that nothing asked for should cost the loop about 1% of its time.
CENSUS_GAP_FACTOR = 100
# A census that comes due while sockets wait to be reported is made after
# them, at most this long past its time (with sockets due at every tick it
# must still come): at 100,000 sockets it costs about a second of the loop
# waiting for the worker, which was a second more before the first reports
# of a flood, and its keys were held at the reports' peak (with the period
# at 4 s: the first report 6.75-8.51 s after the close against 2.82-4.00
# without a census; peak RSS 204.9-211.4 MB against 188.8-199.3).
CENSUS_AFTER_REPORTS_MAX_S = 30.0
# CPython processes started after the trace (register_new_pythons): the
# processes that exec()ed are looked at a tick after, once their exec is
# EXEC_SETTLE_NS old (a shell that runs `exec python3` exec()s twice within
# a few ms); at most PY_SCAN_PIDS a scan, PY_SCAN_FOUND of them read as
# CPython (0.3 ms each in the worker, 0.2 ms each to register in the
# loop), for PY_SCAN_S at most; EXECS_WAITING wait their turn, at most.
EXEC_SETTLE_NS = 50_000_000
PY_SCAN_PIDS = 256
PY_SCAN_FOUND = 16
PY_SCAN_S = 0.25
EXECS_WAITING = 4096
# How long the holders' states may wait for the worker's begun call (a
# census's read, a scan of new CPython processes) before a tick waits for
# it. In seconds, not ticks: a census reads 100,000 sockets in 0.6-0.8 s
# (up to about 1.5 s under load), and two ticks of the bench's 0.5 s were
# shorter than that, so one idle tick in three censuses waited 80-114 ms.
RECHECK_PUT_OFF_S = 5.0
# How long a census may take, its read and its comparison between ticks,
# before the rest is done at once in a tick (the loop busy: no time
# between ticks, a slice a tick at most).
CENSUS_FINISH_S = 30.0
# How long the loop compares a census at once (Tracker.census_diff_steps,
# about 0.5 ms a step of 256 sockets): between ticks, with a look at the
# ring buffer between slices (LiveTracer.census_between_ticks).
CENSUS_SLICE_S = 0.002
# At most this many differences are kept from one census to the next (the
# lowest keys): a user who makes namespaces, fills them with sockets
# passing through CLOSE_WAIT and drops them must not grow what the loop
# keeps. A miss of the hook is one socket in 100,000 (docs/how-it-works.md).
CENSUS_KEPT = 4096
# The turn given to a namespace a census found a difference in: before
# every other, those never read (-1) too.
CENSUS_FIRST = -2
# ...or this many times as long as the last one took, if longer: with
# 100,000 sockets lingering a rescan reads them all (about a second of the
# worker's and the loop's time, extrapolated from 30,000), and a loss at
# every tick must not make the loop spend more than about 5% of its time
# rescanning.
RESCAN_GAP_FACTOR = 20
# A rescan reads the tracer's own namespace whole, one other namespace
# whole, then others for at most this long; the rest wait for the next
# rescans, in turns by the user who owns them (owners.fair_order). Any
# user can make a thousand namespaces (4-5 ms each to read): read all at
# once, they held the loop 2.7-5.5 s while other users' sockets waited to
# be reported, and set the gap to the next rescan for everyone.
RESCAN_OTHERS_BUDGET_S = 0.2
# The start-up's read of the sockets already in CLOSE_WAIT is bounded the
# same way, before "ready": the namespaces it leaves are read by the rescans
# that follow (RESCAN_EVERY_S apart, without a loss), and what they find
# there was in CLOSE_WAIT before the start unless the kernel missed
# something since (Tracker.rescan). 1,000 of a user's namespaces held the
# start 4 s (0.6 s without them).
START_OTHERS_BUDGET_S = RESCAN_OTHERS_BUDGET_S
EXITED_STATES = frozenset({"exiting", "gone", "Z", "X"})
# Ticks a holder's state change waits, at most, while the holder closes its
# sockets (recheck_owners): 10 holders of 10,000 each, closing them at load
# 2, take a few ticks; a holder that changed state and closes a socket now
# and then still gets its CHANGE line at most this many ticks late.
LEAVING_TICKS = 4


# Signals that end the trace the normal way (summary, recording closed):
# Ctrl-C, kill, and the terminal going away (ssh dropped).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def kernel_clock_ns(boot_clock: bool) -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME if boot_clock else time.CLOCK_MONOTONIC)


def tracer_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


class RescanFirst(NamedTuple):
    """For one rescan: the namespaces it read that the start-up's read had
    left, whether the kernel had missed anything since the start, and every
    namespace a process was in when it read (empty: not known, as when the
    tables were not sock_diag's)."""
    netns: set
    kernel_missed: bool
    listed: frozenset = frozenset()
    read_at: dict = {}          # RescanRead.read_at, in the kernel's clock
    # A rescan that looked only where two censuses found a difference:
    # namespace -> census keys (the dump's rows are those alone).
    only: Optional[dict] = None


class Probe(Protocol):
    """What the loop needs from the kernel side (probe.KernelProbe)."""

    boot_clock: bool
    transport: str

    # Events: raw rows (events.EventLayout) or KernelEvents, one at a time
    # to on_event, or a list at a time to on_batch when the probe can.
    def start(self, on_event: Callable, on_batch: Optional[Callable] = None) -> None: ...
    # At most `limit` events to on_batch per poll.
    def poll(self, timeout_ms: int, limit: int = POLL_BATCH) -> None: ...
    def counters(self) -> dict: ...
    def histogram(self) -> list: ...
    def histogram_sum_ns(self) -> Optional[int]: ...
    def unread(self) -> int: ...
    def tracked(self) -> list: ...
    def tracked_entries(self) -> tuple: ...
    def close(self) -> None: ...


def turns_after(last: dict, read, done: int) -> dict:
    """A reader's turns among the namespaces (namespace -> the number of
    its read that last read it whole) after its read number done (a
    RescanRead or a Census): those read whole get done; those left keep
    their last turn (never stamped, one not read whole goes first again
    among its user's); the others, gone, are dropped."""
    return {**{netns: last[netns] for netns in read.left if netns in last},
            **{netns: done for netns in read.tried if netns in read.dumped}}


# No generated repr: the tracer holds every socket, holder and record in
# flight, and anything that printed it (an error message, a debugger) would
# walk all of that (see start(): signal.signal did, at every exit).
@dataclass(eq=False)
class CensusWork:
    """A census begun (LiveTracer.census): the worker's read, then its
    comparison with what is known (Tracker.census_diff_steps), a slice at
    a time."""
    began_ns: int                       # the kernel's clock when it was begun
    started: float                      # monotonic, the same moment
    pending: object = None              # worker.Pending of the read, until taken
    read: object = None                 # owners.Census, once taken
    steps: Optional[Generator] = None   # the comparison, once begun
    slice_s: Optional[float] = None     # how long a slice may take (CENSUS_SLICE_S)
    read_s: float = 0.0                 # the read's time in the worker
    compared_s: float = 0.0             # the loop's time comparing, in all
    sliced_between: bool = False        # a slice ran between the last two ticks

    def __post_init__(self):
        if self.slice_s is None:
            self.slice_s = CENSUS_SLICE_S


def _start_time(cache: diagnosis.Batch, pid) -> Optional[int]:
    """The start time of the process a batch's process record is of (its
    first holder's, as the owner lookup read it), None if not known."""
    per_process = cache.processes.get(pid)
    snap = getattr(getattr(per_process, "first", None), "process", None)
    start = getattr(snap, "start_time", None)
    return start if type(start) is int else None


@dataclass(repr=False)
class LiveTracer:
    config: ProbeConfig
    socket_filter: SocketFilter
    probe: Probe
    sinks: list[Sink] = field(default_factory=list)   # fed in order
    holder_filter: HolderFilter = HolderFilter()
    resolver: ProcResolver = field(default_factory=ProcResolver)
    tick_s: float = 1.0
    headers: str = ""
    clock: Optional[Callable[[], int]] = None      # kernel clock; default: the probe's
    stopping: bool = False
    pending: list[KernelEvent] = field(default_factory=list)
    linger_lines: int = 0
    closed_lines: int = 0
    change_lines: int = 0
    last_counters: dict = field(default_factory=dict)
    # Reported sockets by holder pid, with the state each holder had: a
    # diagnosis is redone only when a holder's state changes (or it exits).
    # pid -> {l: l}: keyed by the socket itself (hashed by identity), not
    # id(l), an int of 32 bytes for each of 100,000 sockets.
    watched: dict = field(default_factory=dict)
    watched_state: dict = field(default_factory=dict)  # pid -> (state, tracer pid)
    # Watched pids seen exited at the last tick, their sockets not yet
    # looked at again (recheck_owners).
    holder_exited: set = field(default_factory=set)
    # Watched pids whose state change waits while their sockets leave: pid ->
    # ticks waited so far (recheck_owners).
    holder_leaving: dict = field(default_factory=dict)
    _map_version: tuple = ()
    # The loss counters as of the last rescan's dump, and when one was last
    # tried (monotonic): a rescan follows a loss, at most every RESCAN_EVERY_S.
    _rescan_basis: tuple = (0, 0, 0)
    _rescan_tried: float = float("-inf")
    _rescan_gap: float = RESCAN_EVERY_S
    # The census (census()): when the next is due (monotonic), how often,
    # what the last found different (Tracker.census_diff, with what is
    # carried from namespaces it did not read), and its own turns among the
    # namespaces (as _namespace_read's, by census number).
    _census_next: float = float("inf")
    _census_took_s: float = 0.0          # the last census's cost
    _census_work: Optional["CensusWork"] = None     # one begun, not yet compared whole
    # Processes that exec()ed, not yet looked at (register_new_pythons), in
    # the order of their exec; and the scan begun (its Pending or, without
    # a worker, its answer; the kernel's clock when begun).
    _execs_waiting: dict = field(default_factory=dict)
    _python_scan: Optional[tuple] = None
    # When recheck_owners first put the holders' states off for a busy
    # worker (the tracer's clock), None when it did not at its last tick.
    _recheck_put_off_ns: Optional[int] = None
    _reconcile_every: float = field(
        default_factory=lambda: knobs.reconcile_override() or RECONCILE_EVERY_S)
    _census_diff: set = field(default_factory=set)
    # Differences found by two censuses in a row: what a rescan is wanted
    # for, until one reads their namespace whole or it is gone.
    _census_confirmed: set = field(default_factory=set)
    _census_read: dict = field(default_factory=dict)
    # Whether the last census was the quick second look at a difference.
    _census_rechecking: bool = False
    # The key of the census's hash (tcprow.census_key), this run's own: the
    # addresses are anyone's to choose, and which differences are kept (the
    # lowest keys) must not be.
    _census_secret: bytes = field(default_factory=lambda: os.urandom(16))
    # Namespace -> the number of the rescan that last read it
    # (tick_stats["rescans"]), for the turns; and whether the last rescan
    # left some unread (the next one then comes without a new loss).
    _namespace_read: dict = field(default_factory=dict)
    _rescan_unread: bool = False
    _failed_reads: set = field(default_factory=set)   # namespaces whose last read failed
    # The namespaces the start-up's read did not read whole: what a rescan
    # first finds there may be from before the start (Tracker.rescan); and,
    # for the start's notice, how many it left, by real uid.
    _unread_since_start: set = field(default_factory=set)
    start_unread_namespaces: dict = field(default_factory=dict)
    # Sockets a rescan found in CLOSE_WAIT that the kernel's map never had
    # (once reported), and sockets it found gone whose leaving was never seen.
    found_unseen: int = 0
    left_unseen: int = 0
    _histogram: Optional[tuple] = None   # (cw_exit, slots, sum_ns) of the last read
    _previous_handlers: dict = field(default_factory=dict)   # signal -> handler before start()
    _eof_captured_seen: Optional[int] = None   # the kernel's eof_captured at the last look
    # (why, why_open) -> the one `code` dict of every socket with those reasons
    # (a fixed set of texts): read-only, copied before a place is added.
    _codes_unknown: dict = field(default_factory=dict)
    _keys: Optional[tuple] = None       # _capture_keys() of the batch being resolved
    _final_drain: bool = False
    _until_sip: int = SIP_EVERY     # calls of _sip_now_and_then before the next sip
    _detach_started: bool = False
    _hurried: bool = False
    # The process ends right after run() (cli.py's quick exit): the kernel
    # frees the program and its maps then, and bcc's own cleanup (freeing
    # LLVM's module and every table: 15-20 ms under load) is skipped.
    exit_after_run: bool = False
    unread_at_exit: int = 0     # events the final drain left in the buffer
    # The last tick's owner lookup left sockets whose namespaces it had no
    # time for (owners.OWNER_NOT_READ): the next tick comes sooner.
    owners_left: bool = False
    # Sockets whose new diagnosis that lookup left (Lingerer -> itself): made at
    # the next tick's recheck_owners, whatever their holders' state then.
    rediagnose_next: dict = field(default_factory=dict)
    # What the owner lookups read, by namespace and by user, and how long
    # each namespace took (owners.LookupMemory, from their answers): whose
    # turn it is at the next, and what fits in its budget.
    owner_memory: owners.LookupMemory = field(
        default_factory=lambda: owners.LookupMemory({}, {}, {}))
    owner_lookups: int = 0
    # An owner lookup begun while a large batch is written (_look_ahead):
    # (the sockets, resolver.OwnersAhead), and how many sockets were
    # reported with such an answer.
    _ahead: Optional[tuple] = None
    ahead_taken: int = 0
    python_unregistered: int = 0   # CPython processes the kernel's map had no room for
    # Why the start's read of the sockets already in CLOSE_WAIT failed (None: it did not).
    start_snapshot_failed: Optional[str] = None
    python_owners: dict = field(default_factory=dict)   # pid -> its user (subids), of those registered
    own_netns: int = field(default_factory=tracer_netns)
    tick_stats: dict = field(default_factory=lambda: {
        "ticks": 0, "idle_ticks": 0, "idle_max_ms": 0.0, "idle_total_ms": 0.0,
        "map_reads": 0, "map_read_max_ms": 0.0, "resolve_max_ms": 0.0,
        "rescans": 0, "rescan_max_ms": 0.0, "censuses": 0, "census_max_ms": 0.0,
        "gc_collections": 0, "gc_max_ms": 0.0, "gc_total_ms": 0.0})
    _gc_callback: Optional[Callable] = None
    # Freezes the per-socket state after many were reported (live/gcpolicy.py).
    gc_policy: GcPolicy = field(default_factory=GcPolicy)
    _gc_started: float = 0.0
    # The kept listener holders' fields -> their one tuple (_keep_listener_holders).
    _listener_kept: dict = field(default_factory=dict)

    # ------------------------------------------------------------ plumbing

    def emit(self, rec: dict) -> None:
        for sink in self.sinks:
            sink.emit(rec)
        self._sip_now_and_then()

    def emit_process(self, rec: dict, start_time: Optional[int]) -> None:
        """A process record, with the start time of its process to the
        sinks that keep records for later (emit_process: a recording's
        next part), as a record to the others."""
        for sink in self.sinks:
            keep = getattr(sink, "emit_process", None)
            if keep is not None:
                keep(rec, start_time)
            else:
                sink.emit(rec)
        self._sip_now_and_then()

    def emit_linger(self, lingerer: Lingerer, ts: float, age_ns: int,
                    update: bool = False) -> None:
        """A linger record (records.linger): to the sinks that build its
        line from the socket (emit_linger), and its dict, made once, to
        the others (output/sinks.py)."""
        report = LingerReport(lingerer, ts, age_ns, update)
        for sink in self.sinks:
            emit_linger = getattr(sink, "emit_linger", None)
            if emit_linger is not None:
                emit_linger(report)
            else:
                sink.emit(report.record())
        self._sip_now_and_then()

    def _sip_now_and_then(self) -> None:
        """sip() at every SIP_EVERY-th call: from the steps every long piece
        of work repeats (a record written, a socket watched)."""
        self._until_sip -= 1
        if self._until_sip <= 0:
            self._until_sip = SIP_EVERY
            self.sip()

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def now_ns(self) -> int:
        return self.clock() if self.clock else kernel_clock_ns(self.probe.boot_clock)

    def clock_offset_ns(self) -> int:
        return time.time_ns() - self.now_ns()

    def request_stop(self, *_args) -> None:
        self.stopping = True
        self._stop_kernel()

    def _hurry(self) -> None:
        """From the stop signal to the process's end (exit_after_run only:
        the process ends within the final drain's bounded deadline), this
        thread, and the detach threads it starts, run at STOP_NICE: under a
        workload that takes every CPU the exit's few ms of work otherwise
        wait for a CPU, and SIGINT to exit took 0.10-0.26 s (load average
        6-7, bench/startup.py --load). Without CAP_SYS_NICE, unchanged."""
        if not self.exit_after_run or self._hurried:
            return
        self._hurried = True
        try:
            # Linux: the calling thread's nice value (and its new threads').
            os.setpriority(os.PRIO_PROCESS, 0, STOP_NICE)
        except OSError:
            pass

    def _stop_kernel(self) -> None:
        """Start the kernel's detach now, at the stop signal, not once the
        loop has noticed it (a batch being written under load: 5-30 ms
        measured): the detach waits for RCU grace periods, tens of ms each
        under load, and everything after it (the final counts) waits for
        it. Once per run: from the signal handler or from run()."""
        if self._detach_started:
            return
        self._detach_started = True
        detach = getattr(self.probe, "detach", None)
        if detach is None:
            return
        if self.exit_after_run:
            # Only the tracepoint that makes events, waited for before the
            # final counts; the others go with the process (run()'s end).
            detach(events_only=True)
        else:
            detach()

    def _poll_while_waiting(self) -> None:
        """While the gathering worker reads, the kernel's events keep
        coming: keep them from filling the ring buffer (drained after the
        tick): into the probe's backlog (sip) when it keeps one, else into
        pending, up to MAX_PENDING."""
        if self.stopping or self.sip():
            return
        if len(self.pending) < MAX_PENDING:
            self.probe.poll(0, POLL_BATCH)

    def sip(self) -> bool:
        """Between the steps of long work (the departures' tick, a long
        write): the probe moves what the kernel committed out of its ring
        buffer, when it fills (probe.sip). 100,000 sockets leaving at once
        (their holder exits) fill the default 1 MiB ring (9,362 events) in
        about 0.1 s, and the work their leaving makes takes seconds; their
        CLOSED events were lost (85-90% of them). A step that does not
        return (a write nobody reads) is covered by the probe's own thread
        (ringreader.sip_in_background). True when the probe keeps a
        backlog (probe.sip)."""
        sip = getattr(self.probe, "sip", None)
        return sip is not None and not self.stopping and sip()

    def _on_event(self, ev) -> bool:
        self.pending.append(ev)
        if self._final_drain:
            return len(self.pending) >= FINAL_BATCH
        return len(self.pending) >= POLL_BATCH or self.stopping

    def _on_batch(self, rows: list) -> bool:
        self.pending.extend(rows)
        return True

    def _room(self) -> int:
        """Events the next poll may take: what _on_event would take before
        asking for control back."""
        limit = FINAL_BATCH if self._final_drain else POLL_BATCH
        return max(1, limit - len(self.pending))

    # ------------------------------------------------------------ the run

    def start(self) -> None:
        self.probe.start(self._on_event, self._on_batch)
        # From the banner on, a stop signal must end the trace with its
        # summary (run() gives the handlers back at the end).
        # A plain function, not the bound method: signal.signal() builds
        # the repr of the handler it replaces when that is not a
        # signal.Handlers value, and a bound method's repr is the whole
        # tracer's. With one socket held by 3,001 forks that repr took over
        # a minute at the exit, after Ctrl-C.
        def on_stop_signal(_signum, _frame):
            self.stopping = True
            self._hurry()
            self._stop_kernel()
        self._previous_handlers = {sig: signal.signal(sig, on_stop_signal)
                                   for sig in STOP_SIGNALS}
        # Python's cyclic collector walks every tracked object: with 100,000
        # sockets' state, one pass can take longer than a tick. Timed, so
        # that a slow tick can be told from a slow collection (tracer_cost).
        stats = self.tick_stats

        def on_gc(phase, _info):
            if phase == "start":
                self._gc_started = time.perf_counter()
                return
            took = (time.perf_counter() - self._gc_started) * 1000
            stats["gc_collections"] += 1
            stats["gc_total_ms"] += took
            stats["gc_max_ms"] = max(stats["gc_max_ms"], took)
        self._gc_callback = on_gc
        gc.callbacks.append(on_gc)
        self.start_ns = self.now_ns()
        self.started_ts = time.time()
        gatherer = self.resolver.worker
        if gatherer is not None:
            gatherer.abort = lambda: self.stopping
            gatherer.while_waiting = self._poll_while_waiting
        try:
            read = self.resolver.start_close_wait(START_OTHERS_BUDGET_S)
        except GatherFailed as e:
            # Counted (evidence_timeouts). Sockets that entered CLOSE_WAIT
            # after the attach are in the kernel's map; those from before
            # are in no map and will not be reported: said (live/session.py).
            read = RescanRead([], set(), [], [])
            self.start_snapshot_failed = e.why
        # The namespaces not read whole (left, cut short, or whose read
        # failed) are read by the next rescans, which come without a loss
        # while some are left (rescan_dump); only those read whole count as
        # read. The notice counts those known to be there: left and cut.
        self._namespace_read = {netns: 0 for netns in read.tried if netns in read.dumped}
        self._rescan_unread = self._left_to_read(read)
        self._unread_since_start = set(read.left)
        self._census_next = time.monotonic() + self._reconcile_every
        for netns in read.not_read:
            uid = read.uid_of.get(netns, -1)
            self.start_unread_namespaces[uid] = self.start_unread_namespaces.get(uid, 0) + 1
        snapshot = [row for row in read.rows if self.socket_filter.matches(row.endpoints)]
        self.tracker = Tracker(self.config.threshold_ns, self.start_ns,
                               max_untracked=self.config.max_tracked)
        for sink in self.sinks:
            attach = getattr(sink, "attach_lingering", None)
            if attach is not None:      # keeps its view as sockets arrive and leave
                attach(self.tracker, self.config.threshold_ns, self.holder_filter.active)
        pre = self.tracker.seed(snapshot, self.probe.tracked(), read_at=self._kernel_times(read))
        if self.start_snapshot_failed:
            self.tracker.seed_incomplete = True
        # Before "ready": a CPython process's EOF read from then on carries
        # its Python frames.
        seen_ns = self.now_ns()
        self.register_pythons(self.resolver_python_processes(), seen_ns)
        self._hand_over_quiet()
        filters = {**self.socket_filter.as_dict(), **self.holder_filter.as_dict()}
        self.emit(records.start(self.started_ts, self.config.threshold_ns, filters, pre,
                                self.headers, self.probe.transport,
                                self.config.all_transitions))
        self.flush()        # the banner says "ready": it must not wait in a buffer

    def _hand_over_quiet(self) -> None:
        """When the process ends right after run(): the gathering worker
        takes a copy of the tracepoints that make no events, so that their
        detach (RCU grace periods, one tracepoint after another in the
        kernel: about 40 ms each under load) is waited for by the worker's
        end, not by the tracer's exit (issue 20: SIGINT -> exit <= 0.2 s).
        Done now, with the worker idle, not at the exit, when a loaded
        machine could keep the worker from answering in time."""
        hand = getattr(self.probe, "hand_over_quiet", None)
        gatherer = self.resolver.worker
        if self.exit_after_run and hand is not None and gatherer is not None \
                and not self.stopping:
            hand(gatherer.adopt)

    def resolver_python_processes(self) -> dict:
        """The running CPython processes, when captures can copy their
        frames (a probe without the map, or captures off: none)."""
        if not (getattr(self.probe, "register_python", None) and self.config.eof_capture):
            return {}
        return self.resolver.python_processes()

    def register_new_pythons(self) -> None:
        """The processes that exec()ed since the last tick (the kernel's
        cw_exec_new, probe.take_execs) looked at in the worker, and the
        CPython ones registered (register_pythons): a Python server started
        after the trace gets its Python frames from its first EOF read on,
        not only after its first lingering socket was diagnosed. One scan
        at a time, begun at a tick and taken at a later one (never waited
        for), of at most PY_SCAN_PIDS processes, PY_SCAN_FOUND of them
        read as CPython (each registration and its check, 0.2 ms, are the
        loop's); the rest wait their turn, EXECS_WAITING at most (an exec()
        storm's beyond that are found when first diagnosed, as before)."""
        take = getattr(self.probe, "take_execs", None)
        if (take is None or not self.config.eof_capture
                or not getattr(self.probe, "register_python", None)):
            return
        if self._python_scan is not None:
            self.take_python_scan()
            return
        for pid, _when in take(self.now_ns() - EXEC_SETTLE_NS):
            # The kernel forgot its registration at the exec: another
            # program. One made since (at a diagnosis meanwhile) is taken
            # out too, not left in the map uncounted in the users' shares
            # (a review); the scan below registers it again if CPython.
            if self.python_owners.pop(pid, None) is not None:
                self.probe.unregister_python(pid)
            self._execs_waiting.pop(pid, None)      # its latest exec last
            self._execs_waiting[pid] = None
        while len(self._execs_waiting) > EXECS_WAITING:
            del self._execs_waiting[next(iter(self._execs_waiting))]
        if not self._execs_waiting or self.resolver.worker_idle() is False:
            return
        pids = []
        for pid in list(self._execs_waiting):
            del self._execs_waiting[pid]
            if pid not in self.python_owners:
                pids.append(pid)
                if len(pids) == PY_SCAN_PIDS:
                    break
        if pids:
            self._python_scan = (self.resolver.new_pythons(pids, PY_SCAN_FOUND, PY_SCAN_S),
                                 self.now_ns())

    def take_python_scan(self) -> None:
        """The scan register_new_pythons began, once in (never waited
        for): its CPython processes registered; those it did not get to
        first in line for the next. Also between ticks (run()), so that a
        registration takes a tick, not two."""
        scan = self._python_scan
        if scan is None or (not isinstance(scan[0], list) and not scan[0].poll()):
            return                          # none, or the worker still reads
        self._python_scan = None
        walks, left = self.resolver.new_pythons_taken(scan[0])
        self.register_pythons(walks, scan[1])
        self._execs_waiting = {**dict.fromkeys(left), **self._execs_waiting}

    def register_pythons(self, walks: dict, seen_ns: int) -> None:
        """Tell the kernel program where each CPython process's thread states
        are, so its next EOF read or connect() copies the Python frames.

        walks: pid -> what the worker read at or after seen_ns (kernel
        clock), with the process's uid and start time. Between that read
        and now, the process may have run another program or exited and
        its pid been taken: the kernel forgets a process at its exit or
        exec only once it is in the map, so each entry is checked after it
        is put there (no exec since seen_ns, same start time) and taken
        out if the pid names another program or process now.

        The map holds max_py_procs processes, all users together: when it
        is full, a process of a user holding fewer entries takes the place
        of one of the user holding the most, so that one user's thousands
        of processes cannot keep everyone else's out. A subordinate uid's
        process counts as its user's (sockets/subids.py): python_owners
        holds each process's user so counted."""
        register = getattr(self.probe, "register_python", None)
        if register is None or not self.config.eof_capture:
            return
        user_of = subids.shares().user_of
        pruned = False                  # python_owners checked against the map in this call
        for pid, walk in walks.items():
            if not walk or "uid" not in walk or "start_time" not in walk:
                continue
            uid = user_of(walk["uid"])
            if not register(pid, walk):
                if not pruned:          # the kernel forgot those that exited
                    registered = self.probe.python_registered()
                    self.python_owners = {p: u for p, u in self.python_owners.items()
                                          if p in registered}
                    pruned = True
                if not (self._make_room_for(uid) and register(pid, walk)):
                    self.python_unregistered += 1
                    continue
            if self._same_process(pid, walk, seen_ns):
                self.python_owners[pid] = uid
            else:
                self.probe.unregister_python(pid)
                self.python_owners.pop(pid, None)
        # The kernel forgets those that exit: so does python_owners, at the
        # latest when it holds twice what the map can.
        if len(self.python_owners) > 2 * getattr(self.config, "max_py_procs", 4096):
            registered = self.probe.python_registered()
            self.python_owners = {p: u for p, u in self.python_owners.items()
                                  if p in registered}

    def _same_process(self, pid: int, walk: dict, seen_ns: int) -> bool:
        """Whether pid still names the process (and program) read at
        seen_ns; called with its entry in the kernel's map. When the
        kernel's map of exec()s was full (anyone can fill it with live
        processes), an exec() since is told by the program's path instead:
        registrations must not stop for everyone then."""
        exec_since = getattr(self.probe, "exec_since", None)
        changed = exec_since(pid, seen_ns) if exec_since is not None else None
        proc = getattr(self.resolver, "proc", procfs.PROC)
        if changed is None:
            changed = procfs.read_link(f"{proc}/{pid}/exe") != walk.get("exe")
        if changed:
            return False
        stat = procfs.parse_stat(procfs.read_text(f"{proc}/{pid}/stat") or "")
        return stat is not None and stat.start_time == walk["start_time"]

    def _make_room_for(self, uid: int) -> bool:
        """Take one entry out of the kernel's full map, of the user holding
        the most, if that user holds more than uid would after the insert."""
        counts: dict = {}
        for owner in self.python_owners.values():
            counts[owner] = counts.get(owner, 0) + 1
        if not counts:
            return False
        most = max(counts, key=lambda u: counts[u])
        if counts[most] <= counts.get(uid, 0) + 1:
            return False
        victim = next(p for p, u in self.python_owners.items() if u == most)
        self.probe.unregister_python(victim)
        del self.python_owners[victim]
        return True

    def run(self) -> None:
        next_tick = time.monotonic()
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_tick:
                    self.tick()
                    next_tick = now + self.next_tick_in()
                wait_ms = int(max(0.0, min(0.1, next_tick - time.monotonic())) * 1000)
                if wait_ms and self.census_between_ticks(next_tick):
                    wait_ms = 0             # more of it after a look at the ring
                if wait_ms and not self.stopping:
                    self.take_python_scan()
                if not self.stopping:
                    self.probe.poll(wait_ms, self._room())
                taken = len(self.pending)
                self.drain()
                self.flush()
                if 0 < taken < COALESCE_BELOW and self.config.all_transitions \
                        and not self.stopping:
                    # --all at a moderate rate: the kernel wakes the reader
                    # at almost every event, and each pass costs a poll, a
                    # write and a flush. Letting events gather for a few ms
                    # makes those once per batch (a line is late by at most
                    # that much).
                    time.sleep(COALESCE_S)
            self._hurry()                   # (a stop that came by another way)
            self._final_drain = True
            deadline = time.monotonic() + FINAL_DRAIN_S
            # No new events from here: the drain takes what the buffer holds
            # while the kernel detaches (which takes tens of ms; started by
            # the stop signal already, or here).
            self._stop_kernel()
            self.drain(deadline)            # what the stop interrupted
            self._drain_buffer(deadline)
            # Events made until the detach ended: the buffer emptied above
            # may have taken a few more since (a late retransmission's
            # CLOSE). Looked for once the kernel has stopped, within the
            # deadline or a last 10 ms.
            detached = getattr(self.probe, "wait_detached", None)
            if detached is not None:
                detached()
                self._drain_buffer(max(deadline, time.monotonic() + FINAL_LOOK_S))
            # What the drain's deadline left, in the buffer or taken from it
            # but not written, is not written: the summary counts it (a loss
            # said, not a silent one).
            self.unread_at_exit = self.probe.unread() + len(self.pending)
            self.pending.clear()
            if self.unread_at_exit:
                # In the stream too, where a reader of the lines meets the
                # other losses, not only in the summary.
                self.emit(records.lost(time.time(), "events_unread", self.unread_at_exit,
                                       self.unread_at_exit))
            self.tick(resolve=False)
            self.emit(self.summary())
            self.flush()
        finally:
            release = getattr(self.probe, "release_for_exit", None)
            if self.exit_after_run and release is not None:
                # Before the worker is killed: it holds a copy of the
                # tracepoints that make no events (start()), and its end
                # waits for their detach, not ours.
                release()
                self.resolver.close()
            else:
                self.resolver.close()
                self.probe.close()
            for sink in self.sinks:
                sink.close()
            self.restore_signals()

    def _events_waiting(self) -> bool:
        """Whether events the kernel committed wait to be taken: polled
        (pending), or moved out of the ring by sip (the probe's backlog)."""
        backlog = getattr(self.probe, "backlog_bytes", None)
        return bool(self.pending) or bool(backlog and backlog())

    def _drain_buffer(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.probe.poll(0, self._room())
            if not self.pending:
                break
            self.drain(deadline)

    def restore_signals(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)
        self._gc_callback = None

    def drain(self, deadline: Optional[float] = None) -> None:
        """Write out the pending events. A stop signal, or the deadline (the
        final drain's), ends it early: the rest stay pending.

        Events are raw rows from the probe (events.EventLayout), or
        KernelEvents. --all's transitions go to the sinks that take raw rows
        (emit_transitions: the terminal's, output/transitions.py) a run at
        a time, and as records to the others; with a holder filter, as
        records to all (the filter reads the record)."""
        events, self.pending[:] = list(self.pending), []
        if not events:
            return
        offset = self.clock_offset_ns()
        if self.holder_filter.active:
            fast, slow = [], self.sinks
        else:
            fast = [s for s in self.sinks if hasattr(s, "emit_transitions")]
            slow = [s for s in self.sinks if not hasattr(s, "emit_transitions")]
        n = len(events)
        for start in range(0, n, DRAIN_CHUNK):
            if start and ((self.stopping and not self._final_drain)
                          or (deadline is not None and time.monotonic() >= deadline)):
                self.pending[:0] = events[start:]
                return
            if start:
                # A burst's CLOSED lines take 60-260 us each under load: a
                # chunk of them is 15-70 ms, while the kernel may commit
                # 100,000 events a second.
                self.sip()
            chunk = events[start:start + DRAIN_CHUNK]
            # --all under load: a chunk of transitions only (rows, not
            # KernelEvents), told by two passes in C rather than a Python
            # loop over its events.
            if set(map(type, chunk)) == _ROWS_ONLY and set(map(_kind_of, chunk)) == _TRANSITIONS_ONLY:
                self._transitions(chunk, offset, fast, slow)
                continue
            run_from = None
            for i, ev in enumerate(chunk):
                if type(ev) is tuple and ev[R_KIND] == KIND_TRANSITION:
                    if run_from is None:
                        run_from = i
                    continue
                if run_from is not None:
                    self._transitions(chunk[run_from:i], offset, fast, slow)
                    run_from = None
                if type(ev) is tuple:
                    ev = event_of_row(ev)
                self._event(ev, offset)
            if run_from is not None:
                self._transitions(chunk[run_from:], offset, fast, slow)

    def _transitions(self, rows: list, offset: int, fast: list, slow: list) -> None:
        for sink in fast:
            sink.emit_transitions(rows, offset)
        if not slow:
            return
        check = self.holder_filter.active
        for row in rows:
            rec = records.transition(event_of_row(row), (row[R_TS] + offset) / 1e9)
            # With a holder filter, as in replay: only transitions made by a
            # matching task in its own system call.
            if check and not self.holder_filter.matches(record_people(rec)):
                continue
            for sink in slow:
                sink.emit(rec)

    def _event(self, ev: KernelEvent, offset: int) -> None:
        if ev.kind == KIND_TRANSITION:
            rec = records.transition(ev, (ev.ts_ns + offset) / 1e9)
            if not self.holder_filter.active or self.holder_filter.matches(record_people(rec)):
                self.emit(rec)
            return
        closed = self.tracker.on_event(ev)
        if closed is None:
            return
        if closed.lingerer is not None:
            self.unwatch(closed.lingerer)
        if not self._shows_closed(closed):
            return
        self.closed_lines += 1
        self.emit(records.closed(closed, (closed.ts_ns + offset) / 1e9))

    def _shows_closed(self, closed) -> bool:
        """With a holder filter: the CLOSED line of a socket that was shown,
        or, for one never resolved, of one whose closer matches."""
        if not self.holder_filter.active:
            return True
        l = closed.lingerer
        if l is not None and l.reported:
            return not l.hidden
        if self.holder_filter.needs_identity or closed.closer is None:
            return False            # who held it was never known
        return self.holder_filter.matches([{"pid": closed.closer[0], "comm": closed.closer[1]}])

    def next_tick_in(self) -> float:
        """Seconds from the start of the last tick to the next."""
        return min(self.tick_s, OWNERS_LEFT_RETRY_S) if self.owners_left else self.tick_s

    def tick(self, resolve: bool = True) -> None:
        started = time.monotonic()
        self.owners_left = False
        counters = self.check_counters()
        self.sip()
        # While a burst's events wait to be written (20-60 s for 100,000 at
        # load 3), departed sockets stay past their grace: their CLOSED
        # events are among those (a socket forgotten first was written
        # unattributed, "reported": false; 1,453 of 100,000 in a run).
        self.tracker.hold_departed = self._events_waiting()
        if self._ahead is not None:
            if resolve and not self.stopping:
                # Its answer taken first, with the collector paused as for
                # the batch it is for (~10 objects a socket unpickled): the
                # first call to the worker this tick would wait for it anyway.
                with self.gc_policy.paused():
                    self._ahead[1].wait()
            else:
                # Stopping: not waited for (the worker's next call, if any,
                # reads it within its own deadline; the exit asks nothing
                # of a busy worker).
                self._ahead = None
        rescan = self.rescan_dump(counters) if resolve else None
        now_ns = self.now_ns()
        # The map changes only when the kernel counts an entry or an exit:
        # when neither moved, the sockets that mature are already known.
        version = (counters.get("cw_enter"), counters.get("cw_exit"),
                   counters.get("exit_untracked"))
        stats = self.tick_stats
        read_map = version != self._map_version or rescan is not None
        if read_map:
            self._map_version = version
            entries, endpoints_of = self.probe.tracked_entries()
            # The ring buffer is looked at between the steps of this tick
            # (sip): when many sockets leave at once, their CLOSED events
            # arrive while it brings the tracker in line with the map and
            # unwatches them (1.7-4.2 s for 100,000 under load).
            due = self.tracker.sync_entries(entries, endpoints_of, now_ns, self.sip)
            # Let go before the census and the batch's reports: with 100,000
            # lingering the map's copy is megabytes at the tick's peak.
            del entries, endpoints_of
            stats["map_reads"] += 1
            stats["map_read_max_ms"] = max(stats["map_read_max_ms"],
                                           (time.monotonic() - started) * 1000)
        else:
            due = self.tracker.due(now_ns)
        if rescan is not None:
            due = self.rescan_apply(*rescan, now_ns)
        elif resolve:
            # After the map read: a socket that entered since the last one
            # is known, not a difference.
            self.census(reports_waiting=bool(due))
        rediagnosed = 0
        if resolve and self.watched:
            rediagnosed = self.recheck_owners(now_ns)
        else:
            self.unwatch_left()
            # Nothing to compare: a put-off begun before is over (kept, it
            # made the first busy tick after new sockets wait at once).
            self._recheck_put_off_ns = None
        self.sip()
        if resolve and self.tracker.by_skaddr:
            self.take_late_eof_reads(counters)
        if self._ahead is not None and not (resolve and due):
            self._ahead = None      # nothing due to take its answer: let go
        if resolve and due:
            resolving = time.monotonic()
            # Oldest first: the owner lookup reads other namespaces in
            # this order, users in turn, for its budget.
            self.resolve(sorted(due, key=lambda l: l.earliest_enter_ns), now_ns, update=False)
            stats["resolve_max_ms"] = max(stats["resolve_max_ms"],
                                          (time.monotonic() - resolving) * 1000)
            self.gc_policy.reported(len(due))
        if resolve and not self.stopping:
            # After the reports: a scan begun before them made their first
            # call to the worker wait for it (a review).
            self.register_new_pythons()
        view = self.view(counters, now_ns)
        for sink in self.sinks:
            self.sip()
            sink.tick(view)
        if due or read_map:
            # After the sinks (the metrics keep per-socket series), and
            # never on an idle tick: live/gcpolicy.py.
            # Departed sockets are kept DEPARTED_GRACE_NS more: counted, so
            # that the unfreeze's collection does not walk them too.
            self.gc_policy.after_change(len(self.tracker.by_skaddr)
                                        + len(self.tracker.pre_existing)
                                        + len(self.tracker.departed))
        elapsed = (time.monotonic() - started) * 1000     # the sinks' share included
        stats["ticks"] += 1
        # Idle: nothing changed, the steady-state cost. Not idle: the map
        # changed (sockets entered or left), sockets were due, or holders
        # changed state and their sockets were diagnosed again (docs/
        # benchmarks.md, "What an idle tick is").
        if not due and not read_map and not rediagnosed:
            stats["idle_ticks"] += 1
            stats["idle_total_ms"] += elapsed
            stats["idle_max_ms"] = max(stats["idle_max_ms"], elapsed)

    def view(self, counters: dict, now_ns: int) -> TickView:
        # The histogram moves only when a timed socket leaves CLOSE_WAIT: an
        # idle tick reuses the last read instead of 64 map lookups.
        version = counters.get("cw_exit")
        if self._histogram is None or version != self._histogram[0]:
            sum_ns = getattr(self.probe, "histogram_sum_ns", None)
            self._histogram = (version, self.probe.histogram(), sum_ns() if sum_ns else None)
        _version, slots, total_ns = self._histogram
        return TickView(wall_ts=time.time(), now_ns=now_ns,
                        threshold_ns=self.config.threshold_ns, counters=counters,
                        histogram=list(slots), histogram_sum_ns=total_ns,
                        lingering=lambda: self.lingering(now_ns))

    # ------------------------------------------------- owners and diagnosis

    def resolve(self, batch: list[Lingerer], now_ns: int, update: bool) -> None:
        """Owners, holder filter, diagnosis, watch, emit: one path for the
        first report of sockets that crossed the threshold (update=False)
        and for the new diagnosis of reported ones whose holders changed
        state (update=True, emitted only when the diagnosis changed).

        The reads happen in the gathering worker under deadlines: a socket
        whose owners were not read in time is tried again next tick, and
        after MAX_RESOLVE_ATTEMPTS reported with the reason; holders whose
        threads were not read in time are said so in the diagnosis.

        With the cyclic collector paused (live/gcpolicy.py)."""
        with self.gc_policy.paused():
            self._resolve(batch, now_ns, update)

    def _resolve(self, batch: list[Lingerer], now_ns: int, update: bool) -> None:
        taken = None if update else self._taken_ahead(batch)
        from_ahead = taken is not None
        resolved = None
        if taken is not None:
            if len(taken[0]) < len(batch):
                self.owners_left = True     # the others at a tick 0.2 s on
            batch, resolved = taken
        try:
            if resolved is None:
                resolved = self.resolver.owners([l.endpoints for l in batch],
                                                OWNERS_OTHERS_BUDGET_S, self.owner_memory)
        except GatherFailed as e:
            if e.why == worker.STOPPED:
                return
            if update:
                # Reported already: the new diagnosis at the next tick
                # (recheck_owners has taken the holders' new state, so it
                # would not be seen as a change again).
                self.rediagnose_next.update((l, l) for l in batch)
                return
            for l in batch:
                l.resolve_attempts += 1
                if l.resolve_attempts >= MAX_RESOLVE_ATTEMPTS and not l.pre_existing:
                    self.tracker.mark_reported(l)
                    l.diagnosis = diagnosis.Diagnosis(
                        diagnosis.UNKNOWN, f"unknown: owners not read: {e.why}")
                    self.linger_lines += 1
                    self.emit_linger(l, time.time(), l.age_ns(self.now_ns()))
            return
        self.note_owner_reads(batch, resolved)
        if not update:
            batch = self._still_lingering(batch)
            if batch is None:
                return
        self._keys = None                    # capture maps' keys, read once per batch
        evidence_cache = diagnosis.Batch()   # each process read once in this batch
        identities: dict = {}
        todo: list[tuple[Lingerer, object]] = []
        captures: dict = {}          # (id(lingerer), kind) -> (lingerer, EofCapture)
        for l in sorted(batch, key=lambda l: l.earliest_enter_ns):
            # A look at the ring now and then: this pass over a re-diagnosis
            # of up to 100,000 sockets had none.
            self._sip_now_and_then()
            own = resolved.get(l.endpoints)
            if own is not None and own.kind == owners.OWNER_NOT_READ:
                # Its namespace's turn did not come in this lookup: due
                # again next tick (first report), or its holders compared
                # again (a new diagnosis).
                if update:
                    # Not on its holders' state: another socket of theirs
                    # diagnosed in this tick would set it back (watch).
                    self.rediagnose_next[l] = l
                self.owners_left = True
                continue
            # Known by its cookie or inode (untracked): another socket on its
            # addresses since is not it, and not its age.
            gone = (own is None or own.kind == owners.OWNER_GONE
                    or own.is_another_than(l.cookie, l.inode))
            if update:
                if gone:
                    continue            # it is leaving CLOSE_WAIT: CLOSED follows
            else:
                if gone:
                    # Counted on the socket itself, so the count goes when it goes.
                    l.resolve_attempts += 1
                    if l.pre_existing:
                        self.tracker.forget_pre_existing(l.endpoints)
                        continue
                    if l.resolve_attempts < MAX_RESOLVE_ATTEMPTS:
                        continue
                try:
                    matches = self.holder_filter.matches_ownership(
                        own, self.resolver.identity, identities)
                except GatherFailed as e:
                    if e.why == worker.STOPPED:
                        return
                    continue            # who it is was not read in time: next tick
                self.tracker.mark_reported(l)
                if own is not None and not (l.cookie or l.inode):
                    # Which socket it is, for the rescans (_gone_with_namespace).
                    l.cookie, l.inode = own.cookie, own.inode
                if l.found_late and not l.entry_unknown:
                    self.found_unseen += 1
                # Taken whether shown or not: it frees the captures' slots.
                taken = self.take_captures(l)
                if not matches:
                    l.hidden = True     # not the user's process: never shown
                    self.tracker.relabel(l)
                    continue
                for kind, capture in taken:
                    captures[(id(l), kind)] = (l, capture)
            todo.append((l, own))
        seen_ns = self.now_ns()
        over_cap = self.resolver.gather_processes([own for _l, own in todo if own],
                                                  evidence_cache) or ()
        if over_cap:
            self._rediagnose_over_cap(todo, over_cap)
        self.register_pythons({pid: ev.python_walk for pid, ev in evidence_cache.processes.items()
                               if getattr(ev, "python_walk", None)}, seen_ns)
        self.locate_places(captures, {id(l): own for l, own in todo})
        shown: list[Lingerer] = []
        for l, own in todo:
            if update:
                before = l.diagnosis.summary if l.diagnosis else None
                self.unwatch(l)         # its holders may have changed too
            l.ownership = own
            self.tracker.relabel(l)
            l.diagnosis = (self.resolver.diagnose(own, evidence_cache, self.eof_reader(l),
                                                  self.opener(l))
                           if own else None)
            self.watch(l)
            if not update or l.diagnosis.summary != before:
                shown.append(l)
        evidence_cache.close()
        if from_ahead:
            self.ahead_taken += len(shown)
        if not update and len(shown) >= AHEAD_BATCH:
            self._look_ahead()
        # The batch's records written in blocks (TerminalSink.hold_batch).
        holding = [sink for sink in self.sinks if hasattr(sink, "hold_batch")]
        for sink in holding:
            sink.hold_batch(True)
        try:
            if shown or not update:
                for evidence in self.resolver.process_records(evidence_cache):
                    self.emit_process(records.process(time.time(), evidence),
                                      _start_time(evidence_cache, evidence.get("pid")))
            for l in shown:
                if update:
                    self.change_lines += 1
                else:
                    self.linger_lines += 1
                # Each age as of its own record's ts: 18,000 records took
                # 0.4-1 s to write, and ages taken once for all were that
                # much below the truth at the last ones' ts, past age_max.
                self.emit_linger(l, time.time(), l.age_ns(self.now_ns()), update=update)
                if l.diagnosis is not None:
                    # Written: from here on only its cause and summary are read
                    # (a new diagnosis is made for any later record).
                    l.diagnosis = l.diagnosis.written()
        finally:
            for sink in holding:
                sink.hold_batch(False)
        # Written (or not to be: a new diagnosis the same as before): from
        # here on a socket needs only the first of its listener's holders.
        # The answer gives the sockets of one listener one tuple: kept once
        # for them all (a flood of 100,000 from one server, one step each).
        done: dict = {}             # id(the answer's tuple) -> (it, what is kept)
        for _l, own in todo:
            if own is None or not own.listener_holders:
                continue
            holders = own.listener_holders
            hit = done.get(id(holders))
            if hit is None or hit[0] is not holders:
                hit = done[id(holders)] = (holders, self._keep_listener_holders(holders))
            own.listener_holders = hit[1]

    def _keep_listener_holders(self, holders) -> tuple:
        """What a lingering socket keeps of its listener's holders once its
        record is written (LISTENER_HOLDERS_WATCHED): the pids it is watched
        under (the same first ones, in the same order, as watch() took),
        the first's comm (the metrics' label of a socket never accepted),
        their states, fds and flags; one tuple for every socket with the
        same. At most that many Holders a socket, whoever holds the
        listener and however often the lookups see them change."""
        first = holders[:LISTENER_HOLDERS_WATCHED]
        key = tuple((h.pid, h.comm, h.fd, h.state, h.ppid, h.uid, h.tracer_pid, h.cloexec)
                    for h in first)
        kept = self._listener_kept.get(key)
        if kept is None:
            if len(self._listener_kept) >= LISTENER_KEPT_SHARED:
                self._listener_kept.clear()
            kept = self._listener_kept[key] = tuple(
                owners.Holder(pid, comm, fd, state, ppid, uid, "", tracer_pid, None, cloexec)
                for pid, comm, fd, state, ppid, uid, tracer_pid, cloexec in key)
        return kept

    @staticmethod
    def watched_holders(own: owners.Ownership) -> list:
        """The holders a socket is watched under: its own, and the first of
        its listener's (LISTENER_HOLDERS_WATCHED: the ones its diagnosis
        names, and all it keeps once written); watch, unwatch and
        still_watched take the same."""
        return list(own.holders) + list(own.listener_holders[:LISTENER_HOLDERS_WATCHED])

    def _rediagnose_over_cap(self, todo: list, over_cap) -> None:
        """Sockets one of whose own holders the batch left unread for its
        cap (resolver.gather_processes: "not read: 256 other processes read
        first") are diagnosed again at the next tick (rediagnose_next: the
        re-diagnosis batch of recheck_owners, with only the sockets whose
        holders changed state besides, not the whole flood that filled
        this one); a changed diagnosis is written as an update. Each at
        most MAX_EVIDENCE_RETRIES times in its life, so that a user whose
        own sockets have thousands of holders cannot have the tracer read
        them again at every tick. A listener's holders are not waited for:
        no cause is decided on their threads."""
        for l, own in todo:
            if (own is not None and l.evidence_retries < MAX_EVIDENCE_RETRIES
                    and any(h.pid in over_cap for h in own.holders)):
                l.evidence_retries += 1
                self.rediagnose_next[l] = l

    def _look_ahead(self) -> None:
        """Before a large batch's records are written (the loop's longest
        work in a flood: 1.6 s for 50,000), the owner lookup of the sockets
        due now that it does not hold is begun in the worker, which would
        otherwise wait idle: at 100,000 lingering the two batches' lookups
        (1.6-1.7 s each) and writings (1.6-1.7 s each) ran one after the
        other. The next batch takes the answer (_taken_ahead)."""
        if (self._ahead is not None or getattr(self.resolver, "worker", None) is None
                or self.stopping):
            return
        # Not one whose last lookup found it gone (due again, its next try
        # a tick on): its tries keep their spacing.
        ahead = sorted((l for l in self.tracker.matured(self.now_ns())
                        if not l.hidden and not l.resolve_attempts),
                       key=lambda l: l.earliest_enter_ns)
        if not ahead:
            return
        try:
            lookup = self.resolver.owners_begin([l.endpoints for l in ahead],
                                                OWNERS_OTHERS_BUDGET_S, self.owner_memory)
        except GatherFailed:
            return              # counted; the next batch looks its owners up itself
        self._ahead = (ahead, lookup)

    def _taken_ahead(self, batch: list[Lingerer]) -> Optional[tuple[list, dict]]:
        """The owners looked up ahead (_look_ahead) for the sockets of batch
        that were among them, and those sockets (the rest of batch waits for
        a tick 0.2 s on); None when there is no such answer, or it failed,
        or it has none of batch. Whether each still lingers, and is still
        the socket looked up, is checked after, as for any lookup."""
        if self._ahead is None:
            return None
        ahead, lookup = self._ahead
        self._ahead = None
        try:
            answer = lookup.result()
        except GatherFailed:
            return None
        looked = {id(l) for l in ahead}
        taken = [l for l in batch if id(l) in looked]
        if not taken:
            return None
        return taken, answer

    def _still_lingering(self, batch: list[Lingerer]) -> Optional[list[Lingerer]]:
        """Of sockets about to be first reported, those that still linger
        after their owner lookup. A tracked socket has no identity of its
        own until then (the kernel's map knows it by address): one that
        left after the map read and before the lookup, the next socket on
        its addresses in its place, was reported with that socket's inode
        and holder, after its own CLOSED line (an attack as nobody, without
        any loss). Its exit is in the ring before the lookup reads the
        table (the program runs before the kernel stores the new state):
        the events are taken, and when some still wait (a burst; --all at
        saturation, where they always would: reports waiting for them were
        never made), the kernel's map is asked instead, entry by entry: an
        entry there after the lookup is a socket that had not left. None
        where neither can be told (the next tick tries again)."""
        self._drain_buffer(time.monotonic() + 0.2)
        if self._events_waiting():
            check = getattr(self.probe, "still_tracked", None)
            if check is None:
                self.owners_left = True
                return None
            tracked = [l for l in batch if l.skaddr is not None]
            here = check([(l.skaddr, l.enter_ns) for l in tracked])
            left = {id(l) for l, there in zip(tracked, here) if not there}
            return [l for l in batch if id(l) not in left and self.tracker.is_lingering(l)]
        return [l for l in batch if self.tracker.is_lingering(l)]

    # --------------------------------------------------- where in the code

    def take_captures(self, l: Lingerer) -> list:
        """The kernel's copies of where l was read to its end and where it
        was connect()ed, taken out of their maps: [(kind, capture)], kind
        "eof_read" or "opened"; l.code says what is known either way."""
        why = self.eof_unknown()
        why_open = self.open_unknown()
        if l.entry_unknown:
            why = why_open = records.CODE_ENTRY_UNKNOWN
        elif l.found_late:
            why = why_open = records.CODE_FOUND_LATE
        elif l.pre_existing or l.skaddr is None:
            why = why_open = records.CODE_PRE_EXISTING
        if why is not None and why_open is not None:
            l.code = self._code_unknown(why, why_open)
            return []
        taken = []
        eof_keys, open_keys = self._capture_keys()
        capture = (self.probe.take_eof_capture(l.skaddr)
                   if why is None and (eof_keys is None or l.skaddr in eof_keys) else None)
        if capture is not None:
            taken.append(("eof_read", capture))
        elif why is None and (self.last_counters.get("eof_map_full")
                              or self.last_counters.get("eof_rate_limited")):
            # Only when the kernel left some EOF read without its place.
            kept_not = getattr(self.probe, "eof_read_without_capture", None)
            if kept_not and kept_not(l.skaddr):
                why = records.CODE_NOT_KEPT
        opened = (self.probe.take_open_capture(l.skaddr)
                  if why_open is None and (open_keys is None or l.skaddr in open_keys)
                  else None)
        if opened is not None:
            taken.append(("opened", opened))
        elif why_open is None and (self.last_counters.get("open_rate_limited")
                                   or self.last_counters.get("open_map_full")):
            why_open = records.CODE_OPEN_NOT_KEPT
        l.code = self._code_unknown(why, why_open)
        return taken

    def _code_unknown(self, why, why_open) -> dict:
        """records.code_unknown, one dict shared by the sockets with the same
        reasons (184 bytes a socket otherwise: 18 MB at 100,000)."""
        key = (why, why_open)
        code = self._codes_unknown.get(key)
        if code is None:
            # Shared: never changed (a place found is written into a copy,
            # locate_places), so its JSON may be kept (records.Shared).
            code = self._codes_unknown[key] = records.Shared(records.code_unknown(why, why_open))
        return code

    def _capture_keys(self) -> tuple:
        """(sockets with an EOF-read capture, with a connect() capture), read
        once per batch (at most 1,024 keys each) so that reporting 100,000
        sockets does not cost two map lookups each; None: look each up."""
        if self._keys is None:
            eof = getattr(self.probe, "eof_capture_keys", None)
            opened = getattr(self.probe, "open_capture_keys", None)
            self._keys = (set(eof()) if eof and self.eof_unknown() is None else None,
                          set(opened()) if opened and self.open_unknown() is None else None)
        return self._keys

    def take_late_eof_reads(self, counters: dict) -> None:
        """Sockets read to their end after they were reported: take their
        captures (each holds a slot of the kernel's map while its socket
        lingers) and diagnose them again with the place (a CHANGE line when
        the diagnosis changes). Looked for only when the kernel kept a new
        capture."""
        captured = counters.get("eof_captured")
        if captured is None or captured == self._eof_captured_seen:
            return
        self._eof_captured_seen = captured
        keys = getattr(self.probe, "eof_capture_keys", None)
        late: dict = {}
        for skaddr in keys() if keys else ():
            l = self.tracker.by_skaddr.get(skaddr)
            if l is not None and l.reported:
                capture = self.probe.take_eof_capture(skaddr)
                if capture is not None and not l.hidden:
                    late[(id(l), "eof_read")] = (l, capture)
        if late:
            self.locate_places(late, {key[0]: l.ownership for key, (l, _c) in late.items()})
            # The place changes the diagnosis: a CHANGE line says it.
            self.resolve([l for l, _c in late.values()], self.now_ns(), update=True)

    def eof_unknown(self) -> Optional[str]:
        """Why this run cannot say where sockets were read to their end (None:
        it can)."""
        config = self.config
        if not config.eof_capture:
            return "not captured (--no-eof-stacks)"
        if not hasattr(self.probe, "take_eof_capture"):
            return "not captured by this probe"
        return config.features.eof_capture

    def open_unknown(self) -> Optional[str]:
        """Why this run cannot say where sockets were connect()ed (None: it
        can)."""
        if not hasattr(self.probe, "take_open_capture"):
            return "not captured by this probe"
        return self.config.why_no_open_capture()

    def locate_places(self, captures: dict, owners_of: dict) -> None:
        """Unwind the captured stacks (in the gathering worker: the holder's
        maps and binaries are hostile input) and set each socket's code.
        captures: {(id(lingerer), kind): (lingerer, EofCapture)}; owners_of:
        id(lingerer) -> its Ownership.

        A copy is unwound only against a process that holds the socket now:
        its pid then names the process that read or connected it, not a
        process that took its pid since (a reader that exited, its pid
        reused, would have its place read in someone else's binaries)."""
        if not captures:
            return
        keyed = []
        exec_since = getattr(self.probe, "exec_since", None)
        for key, (l, c) in captures.items():
            own = owners_of.get(key[0])
            holders = {h.pid for h in getattr(own, "holders", ())}
            why = None
            if c.pid not in holders:
                why = (f"{c.pid} does not hold the socket now: its place is not read from "
                       f"whatever process has that pid")
            elif exec_since is not None:
                changed = exec_since(c.pid, c.ts_ns)
                if changed is None:
                    why = (f"whether {c.pid} has run another program since is not known (the "
                           f"kernel's map of exec()s was full)")
                elif changed:
                    why = (f"{c.pid} has run another program since (exec): its place is "
                           f"not read from the new one")
            keyed.append((key, l, c, why))
        # Fair to every process: each one's captures in turn, so that one
        # process's many sockets cannot push another's past the batch's cap.
        order: dict = {}
        for i, (_key, _l, c, why) in enumerate(keyed):
            if why is None:
                order.setdefault(c.pid, []).append(i)
        turns = []
        queues = list(order.values())
        while queues:
            turns.extend(q.pop(0) for q in queues)
            queues = [q for q in queues if q]
        uids = {h.pid: getattr(h, "uid", None) for own in owners_of.values()
                for h in getattr(own, "holders", ())}
        stacks = self.resolver.captured_stacks(
            [(i, keyed[i][2].pid, keyed[i][2].ip, keyed[i][2].sp, keyed[i][2].bp,
              keyed[i][2].stack, (getattr(keyed[i][2], "py_status", 0),
                                  getattr(keyed[i][2], "python", ()))) for i in turns],
            uids)
        python = stacks.get("python") or {}
        # Here, not at import: pyframes brings pyelftools (about 40 ms of
        # the start-up), and the tracer itself needs only its words.
        from closewait_trace.evidence import pyframes
        offset = self.clock_offset_ns()
        for i, ((_id, kind), l, c, why) in enumerate(keyed):
            frames = stacks.get(i) if why is None else None
            py_frames, py_why = python.get(i, ([], ""))
            if py_why == pyframes.NOT_YET_KNOWN and c.pid not in self.python_owners:
                py_why = pyframes.NOT_YET_KNOWN_UNREGISTERED     # no room, or not the same now
            found = records.code_place(c, (c.ts_ns + offset) / 1e9, frames,
                                       place.python_place(py_frames)
                                       or place.place_of(frames or []))
            if py_frames:
                found["python"] = py_frames
            elif py_why and why is None:
                found["python_not_read"] = py_why
            if why is not None:
                found["not_unwound"] = why
            if kind == "eof_read":
                found["after_s"] = round(max(0, c.ts_ns - l.enter_ns) / 1e9, 6)
            code = dict(l.code or records.code_none_seen())
            code[kind] = found
            code[f"{kind}_unknown"] = None
            l.code = code

    @staticmethod
    def eof_reader(l: Lingerer) -> Optional[diagnosis.EofReader]:
        read = (l.code or {}).get("eof_read")
        if not read:
            return None
        return diagnosis.EofReader(pid=read["pid"], place=render.describe_found(read))

    def opener(self, l: Lingerer) -> Optional[diagnosis.Opener]:
        """Who connect()ed the socket, if the kernel kept it, and whether it
        has gone unread since the peer closed: only said when the kernel
        watched for the read (EOF reads located, the socket traced since it
        entered CLOSE_WAIT) and none came."""
        code = l.code or {}
        opened = code.get("opened")
        if not opened:
            return None
        watched = (self.eof_unknown() is None and not l.pre_existing
                   and code.get("eof_read") is None and code.get("eof_read_unknown") is None)
        return diagnosis.Opener(pid=opened["pid"], place=render.describe_found(opened),
                                none_read=watched)

    def unwatch_left(self) -> set:
        """Stop watching the sockets the tracker saw stop lingering (left,
        with or without their CLOSED event, or their address reused): each
        costs one step here, when it goes, not one check at every tick.
        Returns the pids of the processes that held them (their holders,
        not their listeners'): processes whose sockets are leaving."""
        left = self.tracker.take_left()
        leaving: set = set()
        for start in range(0, len(left), DRAIN_CHUNK):
            for l in left[start:start + DRAIN_CHUNK]:
                self.unwatch(l)
                own = l.ownership
                if own is not None:
                    leaving.update(h.pid for h in own.holders)
            self.sip()              # 100,000 left: 0.1-0.9 s under load
        for pid in [pid for pid, sockets in self.watched.items() if not sockets]:
            del self.watched[pid]
            self.watched_state.pop(pid, None)
            self.holder_exited.discard(pid)
            self.holder_leaving.pop(pid, None)
        return leaving

    def watch(self, l: Lingerer) -> None:
        self._sip_now_and_then()
        own = l.ownership
        if own is None:
            return
        for h in self.watched_holders(own):
            self.watched.setdefault(h.pid, {})[l] = l
            self.watched_state.setdefault(h.pid, (h.state, h.tracer_pid))

    def unwatch(self, l: Lingerer) -> None:
        own = l.ownership
        if own is None:
            return
        for h in self.watched_holders(own):
            sockets = self.watched.get(h.pid)
            if sockets is not None:
                sockets.pop(l, None)

    def note_owner_reads(self, batch: list[Lingerer], resolved: dict) -> None:
        """What this lookup read of the namespaces other than ours, and how
        long each took (owner_memory), so that those it left go ahead of
        them at the next, users in turn: with time for one namespace a
        lookup, the batch's first user's was read every time and another
        user's never. Kept to the namespaces of recent batches."""
        self.owner_lookups += 1
        memory = self.owner_memory
        spaces = set()
        for l in batch:
            netns = l.endpoints.netns
            if not netns or netns == self.own_netns:
                continue
            spaces.add(netns)
            own = resolved.get(l.endpoints)
            if own is None:
                continue
            if own.netns_read_s is not None:
                memory.read_s[netns] = own.netns_read_s
            if own.kind != owners.OWNER_NOT_READ:
                memory.last_read[netns] = self.owner_lookups
                if own.netns_uid is not None:
                    memory.served[own.netns_uid] = self.owner_lookups
        for kept in (memory.last_read, memory.read_s):
            if len(kept) > max(OWNER_READS_KEPT, 4 * len(spaces)):
                for netns in [netns for netns in kept if netns not in spaces]:
                    del kept[netns]
        if len(memory.served) > OWNER_READS_KEPT:
            memory.served.clear()       # uids: more than any machine has users

    def still_watched(self, l: Lingerer) -> bool:
        """Whether l is watched under one of its holders still (not gone)."""
        own = l.ownership
        return own is not None and any(
            l in self.watched.get(h.pid, ())
            for h in self.watched_holders(own))

    def recheck_owners(self, now_ns: int) -> int:
        """Redo the diagnosis of lingering sockets whose holders changed state
        (stopped, continued, traced, exited): one /proc read per holder
        process per tick, whatever the number of sockets it holds.

        A holder seen exiting or exited is taken one tick later
        (holder_exited): its exit closes its descriptors before /proc shows
        it gone, so every socket it alone held is leaving CLOSE_WAIT, though
        the map was read before; the next tick's read drops those
        (unwatched), and what it still watches then is held by another
        process too (or a thread that outlived the leader).
        A holder that changed state while its sockets are leaving CLOSE_WAIT
        (some it held left since the last tick: it is closing them) is taken
        when a tick finds none of them left, at most LEAVING_TICKS ticks
        later (holder_leaving): a service stopped after a leak wakes at the
        end of its input (a state change) and closes its sockets before it
        is "exiting", and its 10,000 sockets were diagnosed again as they
        left (up to 98,000 in one tick, 0.7-2.0 s, when 10 such holders
        went at once; the ring buffer filled meanwhile). A holder that
        changed state and closes nothing is taken at once, as before.
        Returns how many sockets were diagnosed again."""
        leaving = self.unwatch_left()
        if self.resolver.worker_idle() is False:
            # The worker reads a census (0.6-0.8 s at 100,000 sockets) or
            # new CPython processes: asked now, this tick would wait for
            # it. Compared at a later tick; once put off RECHECK_PUT_OFF_S,
            # waited for (a user's exec()s, a scan at every tick, must not
            # put holders' changes off for good).
            if self._recheck_put_off_ns is None:
                self._recheck_put_off_ns = now_ns
            if now_ns - self._recheck_put_off_ns < RECHECK_PUT_OFF_S * 1e9:
                return 0
        self._recheck_put_off_ns = None
        # Those a new diagnosis was due for whose namespace the last owner
        # lookup did not read in time (owners.OWNER_NOT_READ), still here.
        changed: dict = {key: l for key, l in self.rediagnose_next.items()
                         if self.still_watched(l)}
        self.rediagnose_next = {}
        try:
            states = self.resolver.holder_states(list(self.watched))
        except GatherFailed:
            return 0                # not read in time: compared next tick
        exited = self.holder_exited
        waited = self.holder_leaving
        for pid, now in states.items():
            sockets = self.watched.get(pid)
            if sockets and now != self.watched_state.get(pid):
                if now[0] in EXITED_STATES and pid not in exited:
                    exited.add(pid)     # taken at the next tick (see above)
                    continue
                if (pid in leaving and pid not in exited       # (exited: waited its tick)
                        and waited.get(pid, 0) < LEAVING_TICKS):
                    waited[pid] = waited.get(pid, 0) + 1    # closing them: see above
                    continue
                exited.discard(pid)
                waited.pop(pid, None)
                self.watched_state[pid] = now
                changed.update(sockets)
            else:
                waited.pop(pid, None)   # no change (any longer) to wait on
        if changed:
            self.resolve(list(changed.values()), now_ns, update=True)
        return len(changed)

    # ------------------------------------------------------ rescan after loss

    def rescan_dump(self, counters: dict) -> Optional[tuple]:
        """When the kernel said it missed something since the last rescan
        (LOSS_COUNTERS grew) and RESCAN_EVERY_S has passed: every socket in
        CLOSE_WAIT, read by the worker, then the events committed before
        the read taken (a socket the read missed because it left has its
        event there, unless that was what was lost). The tick then reads
        the map and calls rescan_apply. None: no rescan this tick (none
        needed, too soon, a backlog of events still waiting, or the read
        failed: tried again later)."""
        basis = tuple(counters.get(name, 0) for name in LOSS_COUNTERS)
        if self.stopping:
            return None
        started = time.monotonic()
        if (basis == self._rescan_basis and not self._rescan_unread
                and not self._census_confirmed):
            return None
        if started - self._rescan_tried < self._rescan_gap:
            return None
        if self._events_waiting():
            return None         # a burst being written: its events first
        self._rescan_tried = started
        began_ns = self.now_ns()
        # The namespaces a census found different in are read first.
        turns = {**self._namespace_read,
                 **{netns: CENSUS_FIRST for netns, _key in self._census_confirmed}}
        # Set off by the censuses alone (no loss counted, no namespace left
        # to read, none the start left unread): the sockets they differ on
        # are all it looks for. A full rescan at 100,000 lingering brought
        # every row into the loop (65 MB more at its peak) to find the one
        # socket the kernel's hook missed. Not while some sockets are not
        # followed, or may not be: a census names no more unknown sockets
        # than there is room for (census_diff), so a rescan for its keys
        # alone would count none beyond the room, and would leave the room
        # a socket found gone frees to the next censuses.
        only = None
        room = self.tracker.max_untracked - len(self.tracker.pre_existing)
        if (basis == self._rescan_basis and not self._rescan_unread
                and not self._unread_since_start and self._census_confirmed
                and not self.tracker.untracked_over
                and len(self._census_confirmed) < min(room, CENSUS_KEPT)):
            only = {}
            for netns, key in self._census_confirmed:
                only.setdefault(netns, set()).add(key)
        try:
            read = self.resolver.rescan_close_wait(turns, RESCAN_OTHERS_BUDGET_S, only,
                                                   self._census_secret)
        except GatherFailed:
            # Counted (evidence_timeouts); the basis stays, and the next try
            # waits as long as after a rescan that took this long (a user's
            # thousands of namespaces must not keep the worker busy).
            self._rescan_gap = max(RESCAN_EVERY_S,
                                   RESCAN_GAP_FACTOR * (time.monotonic() - started))
            return None
        observed_ns = self.now_ns()
        # After the dump: whether the kernel has missed anything since the
        # start (then a socket first seen in a namespace the start left
        # unread may have entered CLOSE_WAIT since; its age says which).
        # A census's difference is a miss nothing counted.
        missed = (bool(self._census_confirmed)
                  or any(self.probe.counters().get(name, 0) for name in LOSS_COUNTERS))
        first_read = self._unread_since_start & set(read.tried)
        self._unread_since_start -= read.dumped
        self._drain_buffer(time.monotonic() + 0.2)
        self._rescan_basis = basis
        # What a census found different in the namespaces this rescan reads
        # whole is this rescan's to put right; what it found elsewhere stays
        # wanted (those namespaces first in the next rescan's turns).
        # Not in a namespace no process is in any more either: none reads it.
        taken = not self._events_waiting()
        looked = set(read.dumped) if taken else set()
        listed = self._listed(read)
        self._census_diff, self._census_confirmed = (
            {(netns, key) for netns, key in kept
             if netns not in looked and (not listed or netns in listed)}
            for kept in (self._census_diff, self._census_confirmed))
        self._census_next = max(self._census_next, started + self._reconcile_every)
        # A census begun before it read what this rescan read again.
        self._census_work = None
        self.tick_stats["rescans"] += 1
        done = self.tick_stats["rescans"]
        # Kept for the namespaces that exist now: as many as have processes.
        # One not read whole (cut short, or its read failed) keeps its last
        # turn: never stamped as read, it goes first again among its user's.
        self._namespace_read = turns_after(self._namespace_read, read, done)
        self._rescan_unread = self._left_to_read(read)
        rows = [row for row in read.rows if self.socket_filter.matches(row.endpoints)]
        return (rows, read.dumped if taken else set(), began_ns, observed_ns,
                RescanFirst(first_read, missed, listed, self._kernel_times(read), only))

    def census(self, reports_waiting: bool = False) -> None:
        """Once in RECONCILE_EVERY_S (or CENSUS_GAP_FACTOR times its last
        cost), without any counted loss: the sockets in CLOSE_WAIT as keys
        (owners.close_wait_census, in the worker), the events committed
        before the read taken, then compared with what is known here
        (Tracker.census_diff). A difference found at two censuses in a row
        (the second RESCAN_EVERY_S after the first) sets off a rescan.
        reports_waiting: sockets are due in this tick. The census waits
        (CENSUS_AFTER_REPORTS_MAX_S at most) for a tick with none due, and
        none crossing the threshold before it would end (its last cost and
        a tick): a flood's sockets enter CLOSE_WAIT together, and a census
        begun just before they cross put all their reports a second later.

        With a worker, no tick waits for it: the read is begun at one tick
        and taken at a later one, once in (Pending.poll), and the comparison
        goes CENSUS_SLICE_S a tick (census_diff_steps). With 100,000 sockets
        lingering the read was 0.6-0.8 s and the comparison 0.1-0.4 s of
        one tick, about once a minute (issue 20: an idle tick within 5 ms)."""
        work = self._census_work
        if work is not None:
            if self.stopping:
                self._census_work = None    # the exit asks nothing of a busy worker
                return
            # Taken on between ticks (census_between_ticks): a tick that
            # also took its read and a slice of it was 5 ms long. But when
            # ticks come back to back (the loop busy: a user's owner
            # lookups, a flood) there is no time between them, and a
            # review's load kept a census from ending for as long as it
            # lasted: then a slice a tick, and after CENSUS_FINISH_S the
            # rest at once, as a census was before.
            if time.monotonic() - work.started >= CENSUS_FINISH_S:
                self._census_go_on(float("inf"), wait=True)
            elif not work.sliced_between:
                self._census_go_on(time.monotonic() + work.slice_s)
            if self._census_work is work:
                work.sliced_between = False
            return
        started = time.monotonic()
        if self.stopping or started < self._census_next or self._events_waiting():
            return
        if started < self._census_next + CENSUS_AFTER_REPORTS_MAX_S and (
                reports_waiting or self.tracker.matures_by(
                    self.now_ns() + int((self._census_took_s + self.tick_s) * 1e9))):
            return
        if started - self._rescan_tried < RESCAN_EVERY_S:
            return          # a rescan just read it all (or its read failed, slowly)
        idle = self.resolver.worker_idle()
        if idle is False:
            return          # a lookup's answer still to come: begun after it, at a later tick
        began_ns = self.now_ns()
        args = (self._census_read, RESCAN_OTHERS_BUDGET_S, self.socket_filter,
                self._census_secret)
        try:
            if idle:
                work = CensusWork(began_ns, started,
                                  pending=self.resolver.close_wait_census_begin(*args))
            else:
                work = CensusWork(began_ns, started, read=self.resolver.close_wait_census(*args),
                                  slice_s=float("inf"))
        except GatherFailed:
            self._census_failed(started)
            return
        self._census_work = work
        if work.pending is None:
            self._census_go_on(time.monotonic() + work.slice_s)     # no worker: all of it now

    def _census_failed(self, started: float) -> None:
        """Counted (evidence_timeouts): tried again after as long as a
        census that took this long."""
        self._census_next = time.monotonic() + max(
            self._reconcile_every, CENSUS_GAP_FACTOR * (time.monotonic() - started))

    def census_between_ticks(self, next_tick: float) -> bool:
        """A slice of the census begun (census()) while the loop waits for
        its next tick (run()): its read taken when in, its comparison for
        CENSUS_SLICE_S, and no further than the tick. Whether there is
        more to do (the loop then looks at its ring buffer without waiting,
        and comes back)."""
        work = self._census_work
        if work is None or self.stopping:
            return False
        if work.steps is None and work.pending is not None and not work.pending.poll():
            return False                    # the worker still reads: the tick looks again
        work.sliced_between = True
        self._census_go_on(min(next_tick, time.monotonic() + work.slice_s))
        return self._census_work is not None

    def _census_go_on(self, until: float, wait: bool = False) -> None:
        """The census begun (census()) taken on until `until` (_census_slice;
        wait: for the worker's read too); compared whole, what it found
        kept. Each slice's time is the loop's cost of the census
        (census_max_ms: the longest)."""
        work = self._census_work
        began = time.monotonic()
        try:
            diff = self._census_slice(work, until, wait)
        finally:
            spent = time.monotonic() - began
            work.compared_s += spent
            stats = self.tick_stats
            stats["census_max_ms"] = max(stats["census_max_ms"], spent * 1000)
        if diff is not None:
            self._census_work = None
            self._census_kept(work.read, diff, work.read_s + work.compared_s)

    def _census_slice(self, work: CensusWork, until: float, wait: bool) -> Optional[set]:
        """One slice: the read taken once the worker has answered (that
        alone, where slices are timed: unpickled, the ring drained), else
        comparing until `until` (at least one step). The difference once
        compared whole, else None (more to do, or the census let go)."""
        if work.steps is None:
            if work.pending is not None:
                if not wait and not work.pending.poll():
                    return None             # the worker still reads
                try:
                    work.read = work.pending.result()
                except GatherFailed:
                    self._census_work = None
                    self._census_failed(work.started)
                    return None
                work.pending = None
            # The worker's own time (the answer may have waited for a tick
            # to be taken; the read itself for calls begun before it).
            work.read_s = getattr(work.read, "took_s", 0.0) or (time.monotonic() - work.started)
            self._drain_buffer(time.monotonic() + 0.2)
            if self._events_waiting():
                # A burst's events still to come: what differs now may be them.
                self._census_work = None
                self._census_next = time.monotonic() + max(
                    min(RESCAN_EVERY_S, self._reconcile_every), CENSUS_GAP_FACTOR * work.read_s)
                return None
            work.steps = self.tracker.census_diff_steps(
                work.read.keys, work.read.dumped, work.began_ns, self._census_secret)
            if until != float("inf"):
                return None
        while True:
            try:
                next(work.steps)
            except StopIteration as done:
                return done.value
            self.sip()
            if time.monotonic() >= until:
                return None

    def _census_kept(self, read, diff: set, took: float) -> None:
        """What a census found (diff, as Tracker.census_diff gives it) kept,
        and the next one's time set. took: its cost, the worker's read and
        the loop's comparison (its distance: CENSUS_GAP_FACTOR)."""
        self._census_took_s = took
        stats = self.tick_stats
        stats["censuses"] += 1
        done = stats["censuses"]
        recheck = min(RESCAN_EVERY_S, self._reconcile_every)
        # Compared where both this census and the one before read: in a
        # namespace this one did not read (more namespaces than its budget
        # reads, in turns), the last difference is carried on, and that
        # namespace read first next time; in one no process is in any more
        # (listed by neither), it goes.
        listed = set(read.dumped) | set(read.tried) | set(read.left)
        self._census_confirmed = {(netns, key) for netns, key in self._census_confirmed
                                  if netns in listed} | (diff & self._census_diff)
        carried = {(netns, key) for netns, key in self._census_diff
                   if netns not in read.dumped and netns in listed}
        self._census_diff = lowest_keys(diff | carried, CENSUS_KEPT)
        self._census_confirmed = lowest_keys(self._census_confirmed, CENSUS_KEPT)
        self._census_read = {**turns_after(self._census_read, read, done),
                             **{netns: CENSUS_FIRST for netns, _key in self._census_diff}}
        # A difference is looked at again RESCAN_EVERY_S on, once, whatever
        # the census cost (at 100,000 lingering, 100 times 0.9 s would put
        # a missed socket's report 95 s later); after that look, the next
        # census keeps its distance: churn makes some difference at almost
        # every census, and then censuses cost at most 2% of the loop.
        quick = bool(self._census_diff) and not self._census_rechecking
        self._census_rechecking = quick
        self._census_next = time.monotonic() + (recheck if quick else max(
            recheck if self._census_diff else self._reconcile_every, CENSUS_GAP_FACTOR * took))

    def _kernel_times(self, read: RescanRead) -> dict:
        """read.read_at (CLOCK_MONOTONIC, the worker's) in the kernel's clock
        (now_ns: boot time where the kernel program uses it)."""
        offset = self.now_ns() - time.monotonic_ns()
        return {netns: (began + offset, ended + offset)
                for netns, (began, ended) in read.read_at.items()}

    def _listed(self, read: RescanRead) -> frozenset:
        """Every namespace a process was in when read listed them: only
        when it read the tracer's own with sock_diag (else not known)."""
        own = tracer_netns()
        if not own or own not in read.dumped:
            return frozenset()
        return frozenset(read.tried) | frozenset(read.unread) | {own}

    def _left_to_read(self, read: RescanRead) -> bool:
        """Whether a rescan must follow without a loss: namespaces left or
        cut short by the budget, or one whose read failed through each of
        its processes for the first time (tried once more; failing again,
        it is most likely gone, or its processes come and go faster than
        they can be entered, and is not worth a rescan every
        RESCAN_EVERY_S: the next rescan for a loss tries it first)."""
        failed = set(read.left) - set(read.not_read)
        retry = failed - self._failed_reads
        self._failed_reads = failed
        return bool(read.not_read) or bool(retry)

    def rescan_apply(self, rows: list, dumped: set, began_ns: int, observed_ns: int,
                     first: "RescanFirst", now_ns: int) -> list[Lingerer]:
        """With the map just read (after the dump): adopt the sockets it
        never had, forget those found gone (a tracked one only if its map
        entry is still the one it was: the kernel never ran its exit; the
        entry is then deleted, or it would fill the map), each only once
        the kernel says so of that socket alone. Returns the sockets due now."""
        found, gone = self.tracker.rescan(rows, dumped, began_ns, self.sip, first.only,
                                          self._census_secret)
        # No more looked up than may be kept (max_untracked): the others are
        # counted as not kept, as adopt_found counts its own.
        room = max(0, self.tracker.max_untracked - len(self.tracker.pre_existing)
                   + sum(1 for l in gone if l.skaddr is None))
        found, beyond = found[:room], len(found) - min(room, len(found))
        # Each asked again alone, after the map read: the dump may have
        # stepped over a socket; and one in the dump but not in the map may
        # have left between the two (its map entry deleted on the way out),
        # the next on its addresses (anyone's to reopen at will) in CLOSE_WAIT
        # now: the same socket (cookie) or nothing. Adopting those made a user's
        # sockets cycled through CLOSE_WAIT in a fraction of a second be
        # reported lingering for seconds.
        asked = [l.endpoints for l in gone] + [row.endpoints for row in found]
        try:
            present = self.resolver.in_close_wait_now(
                asked, [(l.cookie, l.inode) for l in gone] + [(row.cookie, row.inode)
                                                              for row in found])
        except GatherFailed:
            present = [None] * len(asked)
        here, present = present[len(gone):], present[:len(gone)]
        # Adopted before any event is taken: the exit of one that leaves
        # after the lookup is among those not taken yet, and finds it known.
        # Counted when reported (resolve).
        confirmed = [row for row, there in zip(found, here) if there]
        self.tracker.adopt_found(confirmed, observed_ns, before_start_netns=first.netns,
                                 kernel_missed=first.kernel_missed, read_at=first.read_at)
        self.tracker.count_untracked_over(self.tracker.untracked_over + beyond)
        waiting = any((known := self.tracker.pre_existing.get(row.endpoints)) is not None
                      and not known.is_socket(row.cookie, row.inode) for row in confirmed)
        if None in here or waiting:
            # Not told (a namespace not entered, the lookup failed), or
            # waiting for the socket before it on those addresses to be
            # found gone: the next rescan looks again, without a loss.
            self._rescan_unread = True
        gone = [l for l, there in zip(gone, present) if there is False]
        gone += self._gone_with_namespace(first.listed)
        if any(l.skaddr is None for l in gone):
            # One that left after the drain before the dump has its event in
            # the ring (the program runs before the kernel stores the new
            # state, which the lookup saw): taken first, so that its CLOSED
            # line is written and it is not counted as unseen.
            self._drain_buffer(time.monotonic() + 0.2)
            if self._events_waiting():
                gone = [l for l in gone if l.skaddr is not None]
        forget = getattr(self.probe, "forget_entry", None)
        for l in gone:
            if l.skaddr is not None and (forget is None or not forget(l.skaddr, l.enter_ns)):
                continue        # changed meanwhile: the next map read says what
            if self.tracker.drop_unseen(l):
                self.left_unseen += 1
        took = time.monotonic() - self._rescan_tried
        self._rescan_gap = max(RESCAN_EVERY_S, RESCAN_GAP_FACTOR * took)
        stats = self.tick_stats
        stats["rescan_max_ms"] = max(stats["rescan_max_ms"], took * 1000)
        return self.tracker.due(now_ns)

    def _gone_with_namespace(self, listed: frozenset) -> list[Lingerer]:
        """Sockets known here whose namespace no process is in any more
        (none listed it): no rescan can read it, so none would ever be
        judged gone, and one whose leaving was lost (its holders exited,
        their namespace with them, while the ring overflowed) stayed
        reported lingering for as long as the tracer ran. Gone when no
        process holds its inode (known for those followed without the map,
        and for those reported); not when some process could not be read."""
        if not listed:
            return []
        orphans = self.tracker.outside(listed)
        if not orphans:
            return []
        try:
            held = self.resolver.held_now([l.inode for l in orphans])
        except GatherFailed:
            return []
        return [l for l, here in zip(orphans, held) if here is False]

    # ------------------------------------------------------------ counters

    def check_counters(self) -> dict:
        counters = self.probe.counters()
        for name in LOSS_COUNTERS:
            delta = counters.get(name, 0) - self.last_counters.get(name, 0)
            if delta > 0:
                self.emit(records.lost(time.time(), name, delta, counters[name]))
        if self.found_unseen or self.left_unseen:     # the rescans' (metrics)
            counters = dict(counters, found_unseen=self.found_unseen,
                            left_unseen=self.left_unseen)
        gatherer = self.resolver.worker
        if gatherer is not None:
            counters = dict(counters, evidence_timeouts=gatherer.timeouts)
            delta = gatherer.timeouts - self.last_counters.get("evidence_timeouts", 0)
            if delta > 0:
                self.emit(records.lost(time.time(), "evidence_timeouts", delta,
                                       gatherer.timeouts))
        self.last_counters = counters
        return counters

    def lingering(self, now_ns: int) -> list[Lingerer]:
        """Sockets still in CLOSE_WAIT and at least threshold old, oldest
        first; with a holder filter, only those shown."""
        threshold = self.config.threshold_ns
        return [l for l in sorted(self.tracker.lingering(), key=lambda l: l.earliest_enter_ns)
                if l.age_bound_ns(now_ns) >= threshold
                and not (self.holder_filter.active and (l.hidden or not l.reported))]

    def summary(self) -> dict:
        stats = dict(self.tick_stats)
        stats["idle_mean_ms"] = stats.pop("idle_total_ms") / max(1, stats["idle_ticks"])
        stats["gc_freezes"] = self.gc_policy.freezes
        stats["gc_unfreezes"] = self.gc_policy.unfreezes
        # A flood read key by key costs seconds and memory: said, not guessed.
        stats["map_reads_per_key"] = getattr(self.probe, "per_key_reads", 0)
        stats["map_read_failures"] = sum(getattr(self.probe, "batch_read_failures", {}).values())
        # Sockets reported with owners looked up while a batch was written.
        stats["owners_ahead"] = self.ahead_taken
        extra = {"tracer_cost": {k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in stats.items()}}
        for sink in self.sinks:
            fields = getattr(sink, "summary_fields", None)
            if fields is not None:
                extra.update(fields())
        extra["changes_reported"] = self.change_lines
        problems = self.resolver.symbolizer_problems()
        if problems:                    # modules or frames left without symbols, by reason
            extra["symbolizer_problems"] = problems
        gatherer = self.resolver.worker
        if gatherer is not None:
            extra["evidence"] = {"timeouts": gatherer.timeouts,
                                 "failures": gatherer.failures,
                                 "workers_stuck": gatherer.stuck_workers(),
                                 "processes_skipped": self.resolver.skipped_processes}
            if self.python_unregistered:    # CPython processes the kernel's map had no room for
                extra["evidence"]["python_not_registered"] = self.python_unregistered
        now_ns = self.now_ns()
        still = [records.lingering_entry(l, l.age_ns(now_ns)) for l in self.lingering(now_ns)]
        counters = dict(self.probe.counters(), events_unread=self.unread_at_exit)
        if self.found_unseen or self.left_unseen:
            counters.update(found_unseen=self.found_unseen, left_unseen=self.left_unseen)
        if self.tracker.untracked_over_most:
            counters.update(untracked_over=self.tracker.untracked_over,
                            untracked_over_most=self.tracker.untracked_over_most)
        return records.summary(time.time(), self.started_ts, counters,
                               self.probe.histogram(), still,
                               self.linger_lines, self.closed_lines, extra)

    def state_sizes(self) -> dict[str, int]:
        """How much per-socket state the loop and tracker hold (for the leak
        test, and for anyone wondering what a long run keeps)."""
        t = self.tracker
        return {"tracked": len(t.by_skaddr), "pre_existing": len(t.pre_existing),
                "departed": len(t.departed), "pending": len(t.pending),
                "watched_pids": len(self.watched),
                "watched_sockets": sum(len(s) for s in self.watched.values()),
                "watched_state": len(self.watched_state),
                "holder_exited": len(self.holder_exited),
                "holder_leaving": len(self.holder_leaving), "events": len(self.pending)}
