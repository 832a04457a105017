"""Prometheus metrics (`--metrics [ADDR:]PORT`): a sink that turns each tick
into a snapshot, and a collector that serves the latest snapshot.

The tracing loop builds the metric families once per tick (TickView) and
swaps them in with one reference assignment; prometheus-client's HTTP server
thread only reads that reference. A scrape therefore never waits for the
loop, never touches the kernel or /proc, costs at most what one tick built,
and shows the state as of the last tick.

Labels are bounded on purpose: a socket is labelled by the command name of a
process holding it (`comm`), and by the one port that names the service:
`side="server"` and the local port when the local port has a listener,
`side="client"` and the remote port otherwise. Never a pid, an ephemeral port
or an address. At most `max_series` (comm, port, side) series are exported;
the others are added up into one series comm="(other processes)",
port="other", side="other".

A command name is chosen by whoever runs the process, so a label must not
let one pass for another, or for a value the tracer sets: names are shown
through textsafe.escape (the backslash doubled, so that a name containing
the text `\\x1b` and one containing ESC get different labels), and the
tracer's own values are 16 characters or more without a backslash, which no
escaped name can be (a name has at most 15 bytes; only escaping lengthens it,
and an escape has a backslash).

The HTTP side is scrape.py's bounded server, not prometheus-client's (which
keeps a thread and a descriptor per connection, without timeouts): any
local user can connect to 127.0.0.1, and must not be able to use up the
tracer's descriptors. prometheus-client still encodes the exposition.

Command names are what `/proc` hides from other users under hidepid=2:
`--metrics unix:PATH` serves on a socket only root may connect to, and
`--metrics-no-comm` leaves them out of the labels (README, Security).
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import os
import time
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from closewait_trace.errors import EXIT_USAGE, UserError
from closewait_trace.output import scrape
from closewait_trace.output.textsafe import escape
from closewait_trace.sockets.owners import OWNER_DENIED, OWNER_FDS_NOT_READ, OWNER_UNREADABLE
from closewait_trace.sockets.tracker import Lingerer

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 9477        # the port the README, the man page and the unit use
# Series of the two per-socket gauges, before the rest is folded into "other".
MAX_SERIES = 100
# A (comm, port, side) series whose sockets are all gone is exported at 0 for
# this long, so that dashboards see it drop to 0 and alerts resolve, instead
# of the series vanishing; then it is forgotten.
KEEP_ZERO_S = 3600.0
# Diagnosis causes are a fixed set in diagnosis.py; a cap all the same.
MAX_CAUSES = 32
# Histogram buckets: kernel log2 slot i holds durations in [2^(i-1), 2^i)
# microseconds. Slots 0..HIST_TOP_SLOT are exported as `le` bounds (2^42 us
# is about 51 days); a longer stay counts in +Inf only.
HIST_TOP_SLOT = 42
# The tracer's own comm values (see the module's docstring for why they
# cannot be a process's name).
COMM_OTHER = "(other processes)"
COMM_UNRESOLVED = "(not resolved yet)"
COMM_NO_HOLDER = "(no holder found)"
COMM_DENIED = "(permission denied)"
COMM_FDS_NOT_READ = "(fds not read in time)"  # owners.OWNER_FDS_NOT_READ
COMM_EMPTY = "(empty process name)"    # prctl(PR_SET_NAME, "") is allowed
COMM_HIDDEN = "(comm not exported)"    # --metrics-no-comm
COMM_UNREADABLE = "(proc unreadable)"  # /proc could not be read (owners.OWNER_UNREADABLE)
RESERVED_COMMS = (COMM_OTHER, COMM_UNRESOLVED, COMM_NO_HOLDER, COMM_DENIED, COMM_EMPTY,
                  COMM_HIDDEN, COMM_UNREADABLE)
UNIX_PREFIX = "unix:"
OTHER = (COMM_OTHER, "other", "other")
# The snapshot is rebuilt at most this often: nobody scrapes more often than
# once a second. A rebuild costs the sockets that arrived, left or were
# resolved since the last one and the number of series (LiveSeries), not a
# walk of every lingering socket (which took up to a second at 100,000 on a
# loaded 2-core machine, docs/benchmarks.md).
MIN_REFRESH_S = 1.0


def parse_listen(value: str) -> tuple[str, object]:
    """`PORT`, `ADDR:PORT` or `[IPV6]:PORT` -> (address, port). ADDR must be an
    IP address (no name lookup: the tool must not depend on DNS to start).
    `unix:/ABS/PATH` -> ("unix", path): a Unix socket (scrape.listen_unix)."""
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX):]
        if not os.path.isabs(path) or path.endswith("/") or "\0" in path:
            raise ValueError(f"{value!r}: write a Unix socket as unix:/ABSOLUTE/PATH")
        # sun_path holds 108 bytes; the socket is bound through
        # /proc/self/fd/N/NAME, so it is the name that must fit.
        if len(os.fsencode(os.path.basename(path))) > 80:
            raise ValueError(f"{value!r}: the socket's name is too long (80 bytes at most)")
        return ("unix", os.path.normpath(path))
    text = value.strip()
    addr = DEFAULT_ADDR
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1:].startswith(":"):
            raise ValueError(f"{value!r}: write an IPv6 address as [ADDR]:PORT")
        addr, text = text[1:close], text[close + 2:]
    elif ":" in text:
        addr, _, text = text.rpartition(":")
        if ":" in addr:
            raise ValueError(f"{value!r}: write an IPv6 address as [ADDR]:PORT")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{addr!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0, [::1])") from None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return addr, int(text)


@functools.lru_cache(maxsize=4096)      # names repeat across sockets and ticks
def clean_label(text: str) -> str:
    """A label value from a string a local user controls (a process name):
    escaped as on the terminal, so that the exposition stays valid UTF-8
    and one line per sample, and two different names never share a label."""
    label = escape(text) or COMM_EMPTY
    if not text:
        return label
    if label in RESERVED_COMMS:
        # Not a name the kernel allows (over 15 bytes), but this function
        # does not rely on that: "(" written as an escape, which escape()
        # never produces for it, keeps the two apart.
        label = "\\x28" + label[1:]
    return label


# The label names, each defined once and named after the record field whose
# value it carries (output/schema.py): `comm` a holder's (Holder.comm), `port`
# the local or the remote port (Endpoint.lport, Endpoint.rport; `side` says
# which: server or client, the report's word), `cause` the diagnosis's
# (Diagnosis.cause). tests/unit/test_columns.py checks the fields are the
# schema's and that the values under each label come from them.
SOCKET_LABELS = ("comm", "port", "side")
CAUSE_LABEL = "cause"
LABEL_FIELDS = {"comm": ("Holder", "comm"), "port": ("Endpoint", "lport", "rport"),
                "cause": ("Diagnosis", "cause")}


def socket_labels(lingerer: Lingerer, no_comm: bool = False) -> tuple[str, str, str]:
    """The SOCKET_LABELS values (comm, port, side) of a lingering socket;
    with no_comm, no holder's command name (only the tracer's own values)."""
    own = lingerer.ownership
    if own is None:
        return (COMM_UNRESOLVED, "unknown", "unknown")
    holders = own.holders or own.listener_holders
    kind = own.kind
    if holders:
        comm = COMM_HIDDEN if no_comm else clean_label(holders[0].comm)
    elif kind == OWNER_DENIED:
        comm = COMM_DENIED
    elif kind == OWNER_FDS_NOT_READ:
        comm = COMM_FDS_NOT_READ
    elif kind == OWNER_UNREADABLE:
        comm = COMM_UNREADABLE
    else:
        comm = COMM_NO_HOLDER
    ep = lingerer.endpoints
    if own.listener is not None:
        return (comm, str(ep.lport), "server")
    return (comm, str(ep.rport), "client")


def histogram_buckets(slots: list) -> list[tuple[str, float]]:
    """Kernel log2 microsecond slots -> cumulative (le, count), +Inf last."""
    out, total = [], 0
    for i in range(HIST_TOP_SLOT + 1):
        total += int(slots[i]) if i < len(slots) else 0
        out.append((floatToGoString((1 << i) / 1e6), total))
    out.append(("+Inf", sum(int(s) for s in slots)))
    return out


class MetricsState:
    """What must survive between ticks: the series seen recently (kept at 0
    for a while) and the count of sockets that lingered, by cause."""

    def __init__(self, max_series: int = MAX_SERIES, keep_zero_s: float = KEEP_ZERO_S,
                 no_comm: bool = False):
        self.max_series = max_series
        self.no_comm = no_comm
        self.keep_zero_s = keep_zero_s
        self.last_seen: dict[tuple, float] = {}
        self.lingered: dict[str, int] = {}
        # id(lingerer) -> (its ownership when labelled, labels): a socket's
        # labels change only when it is resolved again, so a tick with
        # 100,000 lingering sockets does not recompute them.
        self._labels: dict[int, tuple] = {}
        # Kept as sockets arrive and leave, once the tracer attaches it
        # (MetricsSink.attach_lingering); until then each snapshot walks.
        self.live: Optional[LiveSeries] = None

    def count_lingered(self, cause: str) -> None:
        cause = clean_label(cause)
        if cause not in self.lingered and len(self.lingered) >= MAX_CAUSES:
            cause = "other"
        self.lingered[cause] = self.lingered.get(cause, 0) + 1

    def per_series(self, lingering: Iterable, now_ns: int, wall_ts: float) -> dict:
        """{(comm, port, side): [count, oldest_age_s]}, capped."""
        # key -> [count, the socket that entered CLOSE_WAIT first]: one
        # comparison per socket; ages are computed once per series.
        groups: dict[tuple, list] = {}
        cache, labels = self._labels, {}
        for l in lingering:
            ident = id(l)
            cached = cache.get(ident)
            if cached is not None and cached[0] is l.ownership:
                key = cached[1]
            else:
                key = socket_labels(l, self.no_comm)
            labels[ident] = (l.ownership, key)
            slot = groups.get(key)
            if slot is None:
                groups[key] = [1, l]
            else:
                slot[0] += 1
                if l.earliest_enter_ns < slot[1].earliest_enter_ns:
                    slot[1] = l
        self._labels = labels
        current = {key: [count, first.age_bound_ns(now_ns) / 1e9]
                   for key, (count, first) in groups.items()}
        return self.rank(current, wall_ts)

    def rank(self, current: dict, wall_ts: float) -> dict:
        """{(comm, port, side): [count, oldest_age_s]} of the series with
        sockets now -> the exported series, capped (cost: the series, not
        the sockets)."""
        for key in current:
            self.last_seen[key] = wall_ts
        for key in [k for k, ts in self.last_seen.items()
                    if wall_ts - ts > self.keep_zero_s and k not in current]:
            del self.last_seen[key]
        # Most sockets first, then oldest, then most recently seen; a fixed
        # order for ties so that the exported set does not flap.
        ranked = sorted(self.last_seen, key=lambda k: (
            -current.get(k, (0, 0.0))[0], -current.get(k, (0, 0.0))[1],
            -self.last_seen[k], k))
        kept = ranked[:self.max_series]
        out = {k: list(current.get(k, (0, 0.0))) for k in kept}
        folded = [current[k] for k in ranked[self.max_series:] if k in current]
        if len(ranked) > self.max_series:
            out[OTHER] = [sum(c for c, _ in folded), max((a for _, a in folded), default=0.0)]
        # Forget zero series beyond the cap: the map cannot grow without bound.
        for key in ranked[self.max_series:]:
            if key not in current:
                del self.last_seen[key]
        return out


class LiveSeries:
    """The (comm, port, side) series kept as sockets arrive and leave, so
    that a snapshot costs the changes since the last one and the number of
    series, not a walk of every lingering socket (issue 20).

    The tracker tells it (Tracker.observers) when a socket starts being
    tracked (added), stops (removed), and when its owners, its report or
    its being hidden changed (changed). A socket is in a series when it is
    tracked, at least the threshold old (its age bound: the same test as
    LiveTracer.lingering) and, with a holder filter, reported and not
    hidden: exactly the sockets the walk counted.

    Sockets not yet the threshold old wait in a heap by the time they may
    have entered CLOSE_WAIT, and join their series when the clock passes
    it. Each series keeps its count and a heap by the same time for its
    oldest; a socket that left or moved is dropped from a heap lazily, when
    it comes to the top, and a heap grown to twice its live entries plus a
    margin is rebuilt (amortized, each entry is pushed and popped once).

    Per socket: one entry in `tracked` (the socket itself, hashed by
    identity, and where it is) and one heap entry (its time and itself:
    sockets compare by identity, Lingerer.__lt__, when two times are the
    same); a series' key is one tuple for all its sockets. About 100 bytes
    a socket in all: with its id as key, a list per socket and the id in
    every heap entry it was 213 (21 MB at 100,000, the peak over 200 MB
    with --metrics; tests/bounds/test_per_socket_memory.py).
    """

    def __init__(self, threshold_ns: int, filter_active: bool, no_comm: bool = False):
        self.threshold_ns = threshold_ns
        self.filter_active = filter_active
        self.no_comm = no_comm
        # Lingerer -> where it is: WAITING, FILTERED (old enough, but hidden
        # by the holder filter) or its series' key.
        self.tracked: dict = {}
        self.waiting: list = []                   # heap (earliest_enter_ns, Lingerer)
        self.counts: dict[tuple, int] = {}        # key -> sockets in that series
        self.oldest: dict[tuple, list] = {}       # key -> heap (earliest_enter_ns, Lingerer)
        self.keys: dict[tuple, tuple] = {}        # one tuple per key
        self.n_waiting = 0

    # ------------------------------------------------ the tracker's calls

    def added(self, l) -> None:
        self.tracked[l] = WAITING
        self.n_waiting += 1
        heapq.heappush(self.waiting, (l.earliest_enter_ns, l))
        if len(self.waiting) > 2 * self.n_waiting + 64:
            self.waiting = [(w.earliest_enter_ns, w) for w, where in self.tracked.items()
                            if where is WAITING]
            heapq.heapify(self.waiting)

    def removed(self, l) -> None:
        where = self.tracked.pop(l, None)
        if where is None:
            return
        if where is WAITING:
            self.n_waiting -= 1
        else:
            self._unplace(where)

    def changed(self, l) -> None:
        where = self.tracked.get(l)
        if where is not None and where is not WAITING:
            self._unplace(where)
            self._place(l)

    # ----------------------------------------------------------- series

    def _place(self, l) -> None:
        if self.filter_active and (l.hidden or not l.reported):
            self.tracked[l] = FILTERED
            return
        key = socket_labels(l, self.no_comm)
        key = self.keys.setdefault(key, key)
        self.tracked[l] = key
        count = self.counts.get(key)
        if count is None:
            self.counts[key] = 1
            heap = self.oldest[key] = []
        else:
            self.counts[key] = count + 1
            heap = self.oldest[key]
        heapq.heappush(heap, (l.earliest_enter_ns, l))
        if len(heap) > 2 * self.counts[key] + 16:
            self.oldest[key] = self._live(key, heap)

    def _live(self, key: tuple, heap: list) -> list:
        """The heap's entries still in the series, once each."""
        tracked, seen, out = self.tracked, set(), []
        for entry in heap:
            l = entry[1]
            if tracked.get(l) is key and l not in seen:
                seen.add(l)
                out.append(entry)
        heapq.heapify(out)
        return out

    def _unplace(self, key) -> None:
        """One socket fewer in the series key (or none: FILTERED); the
        caller says where the socket is now."""
        if key is FILTERED:
            return
        count = self.counts[key] - 1
        if count:
            self.counts[key] = count
            # Those that left it (a flood's sockets move from "unresolved"
            # to their holder's series as they are reported) are dropped
            # here too, not only at a push: a series that only loses
            # sockets kept all their entries until it was empty.
            heap = self.oldest[key]
            if len(heap) > 2 * count + 16:
                self.oldest[key] = self._live(key, heap)
        else:
            del self.counts[key]
            del self.oldest[key]
            del self.keys[key]

    def ripen(self, now_ns: int) -> None:
        """Sockets that became the threshold old join their series."""
        waiting, threshold, tracked = self.waiting, self.threshold_ns, self.tracked
        while waiting and max(0, now_ns - waiting[0][0]) >= threshold:
            _e, l = heapq.heappop(waiting)
            if tracked.get(l) is WAITING:
                self.n_waiting -= 1
                self._place(l)

    def current(self, now_ns: int) -> dict:
        """{key: [count, oldest age s]} of the series with sockets now."""
        self.ripen(now_ns)
        tracked = self.tracked
        out = {}
        for key, count in self.counts.items():
            heap = self.oldest[key]
            while tracked.get(heap[0][1]) is not key:
                heapq.heappop(heap)
            out[key] = [count, max(0, now_ns - heap[0][0]) / 1e9]
        return out


# Where a tracked socket is in LiveSeries besides a series' key.
WAITING = object()      # not yet the threshold old
FILTERED = object()     # old enough, not shown (holder filter); or between series


def build_families(view, state: MetricsState) -> tuple:
    """All metric families for one TickView."""
    labels = list(SOCKET_LABELS)
    sockets = GaugeMetricFamily(
        "closewait_lingering_sockets",
        "TCP sockets in CLOSE_WAIT for at least the threshold, by holder command "
        "and service port", labels=labels)
    oldest = GaugeMetricFamily(
        "closewait_oldest_lingering_seconds",
        "Age of the oldest of them (estimated and lower-bound ages included; "
        "a keepalive range by its upper end)",
        labels=labels)
    if state.live is not None:
        series = state.rank(state.live.current(view.now_ns), view.wall_ts)
    else:
        series = state.per_series(view.lingering(), view.now_ns, view.wall_ts)
    for key, (count, age) in sorted(series.items()):
        sockets.add_metric(list(key), count)
        oldest.add_metric(list(key), round(age, 3))

    counters = view.counters or {}
    entered = CounterMetricFamily(
        "closewait_entered", "Sockets that entered CLOSE_WAIT while tracing (kernel count)",
        value=counters.get("cw_enter", 0))
    lost = CounterMetricFamily(
        "closewait_events_lost", "Kernel events dropped because the buffer was full",
        value=counters.get("events_lost", 0))
    skipped = CounterMetricFamily(
        "closewait_transitions_skipped",
        "State changes the kernel never ran the program for (a BPF program "
        "was already running on that CPU)",
        value=counters.get("transitions_skipped", 0))
    full = CounterMetricFamily(
        "closewait_map_full",
        "Sockets not tracked because the kernel map was full (--max-tracked)",
        value=counters.get("map_full", 0))
    found = CounterMetricFamily(
        "closewait_found_unseen",
        "Sockets a rescan found in CLOSE_WAIT that the kernel's map "
        "never had (reported, ages estimated)",
        value=counters.get("found_unseen", 0))
    left = CounterMetricFamily(
        "closewait_left_unseen",
        "Sockets a rescan found gone whose leaving CLOSE_WAIT was "
        "never seen (no CLOSED line)",
        value=counters.get("left_unseen", 0))
    lingered = CounterMetricFamily(
        "closewait_lingered", "Sockets reported as lingering, by diagnosed cause",
        labels=[CAUSE_LABEL])
    for cause, n in sorted(state.lingered.items()):
        lingered.add_metric([cause], n)

    duration = duration_family(view.histogram, view.histogram_sum_ns)
    threshold = GaugeMetricFamily("closewait_threshold_seconds",
                                  "The tracer's threshold (-t)", value=view.threshold_ns / 1e9)
    last_tick = GaugeMetricFamily(
        "closewait_last_tick_timestamp_seconds",
        "Unix time of the tick these metrics show", value=round(view.wall_ts, 3))
    return (sockets, oldest, duration, entered, lost, skipped, full, found, left, lingered,
            threshold, last_tick)


def duration_family(slots: list, sum_ns: Optional[int]) -> Metric:
    doc = "Time sockets spent in CLOSE_WAIT, for every stay that ended while tracing"
    buckets = histogram_buckets(slots)
    if sum_ns is not None:
        family = HistogramMetricFamily("closewait_duration_seconds", doc)
        family.add_metric([], buckets, sum_ns / 1e9)
        return family
    # No exact sum from the kernel (older program): buckets and count only;
    # a made-up _sum would be a false statement.
    family = Metric("closewait_duration_seconds", doc, "histogram")
    for le, count in buckets:
        family.add_sample("closewait_duration_seconds_bucket", {"le": le}, count)
    family.add_sample("closewait_duration_seconds_count", {}, buckets[-1][1])
    return family


class SnapshotCollector:
    """Serves the families of the last tick; the HTTP thread only reads."""

    def __init__(self):
        self.families: tuple = ()

    def collect(self):
        return iter(self.families)

    def describe(self):
        return []      # names are fixed; nothing to check at registration


class ServerCollector:
    """The scrape server's own counters: refused and dropped connections
    say that someone holds or floods the endpoint."""

    def __init__(self):
        self.server: Optional[scrape.ScrapeServer] = None

    def collect(self):
        if self.server is None:
            return iter(())
        stats = self.server.stats
        refused = CounterMetricFamily(
            "closewait_metrics_connections_refused",
            f"Connections to this endpoint closed at once: {self.server.max_connections} "
            "were open already, and its user's others were no better to close",
            value=stats.refused)
        dropped = CounterMetricFamily(
            "closewait_metrics_connections_dropped",
            "Connections to this endpoint closed without an answer, or with an error, "
            "by reason (evicted: for a newer one, its user holding the most places)",
            labels=["reason"])
        for reason in scrape.DROP_REASONS:
            dropped.add_metric([reason], stats.dropped[reason])
        return iter((refused, dropped))

    def describe(self):
        return []


class MetricsSink:
    """The Sink (sinks.py) behind --metrics."""

    def __init__(self, addr: str = DEFAULT_ADDR, port=DEFAULT_PORT,
                 max_series: int = MAX_SERIES, no_comm: bool = False,
                 server_options: Optional[dict] = None):
        # addr "unix" (from parse_listen): port is the socket's path.
        self.addr, self.port = addr, port
        self.state = MetricsState(max_series, no_comm=no_comm)
        self._built_at = float("-inf")
        self.collector = SnapshotCollector()
        self.server_collector = ServerCollector()
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.registry.register(self.server_collector)
        # process_resident_memory_bytes, process_open_fds, ...: read from
        # /proc/self by the HTTP thread at scrape time.
        ProcessCollector(registry=self.registry)
        self.server: Optional[scrape.ScrapeServer] = None
        self.server_options = server_options or {}
        self._socket_inode: Optional[int] = None
        # content type -> (families it was built from, monotonic time, body)
        self._rendered: dict = {}

    def where(self) -> str:
        if self.addr == "unix":
            return f"unix:{self.port}"
        return f"[{self.addr}]:{self.port}" if ":" in self.addr else f"{self.addr}:{self.port}"

    def serve(self) -> None:
        """Listen now (before the kernel program loads: a port in use fails fast)."""
        try:
            if self.addr == "unix":
                listener = scrape.listen_unix(self.port)
                self._socket_inode = os.stat(self.port).st_ino
            else:
                listener = scrape.listen_tcp(self.addr, self.port)
        except scrape.UnsafePath as exc:
            raise UserError(f"cannot serve metrics on {self.where()}: {exc}", EXIT_USAGE,
                            "use a directory only root can write, such as "
                            "/run/closewait-trace/") from None
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {self.where()}: {exc.strerror or exc}",
                            EXIT_USAGE, "choose another: --metrics [ADDR:]PORT or "
                                        "unix:PATH") from None
        self.server = scrape.ScrapeServer(listener, self.render, **self.server_options)
        self.server_collector.server = self.server
        self.server.start()

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for a scrape, in the format the Accept header asks
        for. Built again only when the tick's families changed or a second
        passed (the process_* values): a client that scrapes in a loop costs
        a copy, not an encoding."""
        encoder, content_type = choose_encoder(accept)
        families = self.collector.families
        cached = self._rendered.get(content_type)
        now = time.monotonic()
        if cached is not None and cached[0] is families and now - cached[1] < MIN_REFRESH_S:
            return cached[2], content_type
        body = encoder(self.registry)
        self._rendered[content_type] = (families, now, body)
        return body, content_type

    def attach_lingering(self, tracker, threshold_ns: int, filter_active: bool) -> None:
        """Keep the series as the tracker's sockets arrive and leave
        (LiveSeries) instead of walking them all at each snapshot; the
        sockets tracked already are taken once, now."""
        live = LiveSeries(threshold_ns, filter_active, self.state.no_comm)
        for l in tracker.lingering():
            live.added(l)
        tracker.observers.append(live)
        self.state.live = live

    def emit(self, rec: dict) -> None:
        if rec.get("type") == "linger" and not rec.get("update"):
            diag = rec.get("diagnosis") or {}
            self._count_lingered(diag.get(LABEL_FIELDS[CAUSE_LABEL][1]))

    def emit_linger(self, report) -> None:
        """A linger record (lingerlines.LingerReport) counted from its
        socket's diagnosis, without the record's dict: the field is the
        Diagnosis's attribute of that name (as_dict copies it), read
        without as_dict's evidence."""
        if not report.update:
            self._count_lingered(getattr(report.lingerer.diagnosis,
                                         LABEL_FIELDS[CAUSE_LABEL][1], None))

    def _count_lingered(self, cause) -> None:
        self.state.count_lingered(str(cause or "unknown"))

    def tick(self, view) -> None:
        if self.state.live is not None:
            # At every tick, not only when the snapshot is rebuilt: sockets
            # that crossed the threshold join their series in the tick that
            # reported them, not in a later one that had nothing to do.
            self.state.live.ripen(view.now_ns)
        if view.wall_ts - self._built_at < MIN_REFRESH_S:
            return
        self._built_at = view.wall_ts
        self.collector.families = build_families(view, self.state)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            if self.addr == "unix":
                scrape.remove_unix(self.port, self._socket_inode)
