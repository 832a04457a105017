"""The live tracer: drives the kernel probe, the tracker, owner resolution
and diagnosis, and hands output records to the sinks.

Start-up order matters so that a socket changing state while we attach is
neither missed nor reported twice: attach first, then snapshot the sockets
already in CLOSE_WAIT, then read the kernel's map; a socket in both the
snapshot and the map entered CLOSE_WAIT after the attach and is tracked.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from closewait_trace import diagnosis, owners, procfs, records
from closewait_trace.events import KIND_TRANSITION, KernelEvent
from closewait_trace.filters import SocketFilter
from closewait_trace.probe import KernelProbe, ProbeConfig
from closewait_trace.tracker import Lingerer, Tracker

# Events taken per poll before returning to the main loop (ticks, Ctrl-C).
POLL_BATCH = 4096
# At exit, how long to keep draining the buffer: what is there is written
# out, yet a flood (--all) cannot hold the exit past a second.
FINAL_DRAIN_S = 0.3

# A socket whose addresses cannot be found in any namespace's TCP table
# (e.g. its namespace has no process left to read it through) is reported
# without owners after this many attempts.
MAX_RESOLVE_ATTEMPTS = 3


def kernel_clock_ns(boot_clock: bool) -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME if boot_clock else time.CLOCK_MONOTONIC)


@dataclass
class LiveTracer:
    config: ProbeConfig
    socket_filter: SocketFilter
    emit: Callable[[dict], None]
    tick_s: float = 1.0
    headers: str = ""
    proc: str = "/proc"
    probe: Optional[KernelProbe] = None
    stopping: bool = False
    pending: list[KernelEvent] = field(default_factory=list)
    linger_lines: int = 0
    closed_lines: int = 0
    last_counters: dict = field(default_factory=dict)
    resolve_attempts: dict = field(default_factory=dict)
    # Reported sockets by holder pid, with the state each holder had: a
    # diagnosis is redone only when a holder's state changes (or it exits).
    watched: dict = field(default_factory=dict)       # pid -> {id(l): l}
    watched_state: dict = field(default_factory=dict)  # pid -> (state, tracer pid)
    change_lines: int = 0
    flush: Callable[[], None] = lambda: None   # end of a pass: push output out
    recorder: object = None            # recording.Recorder, with -w
    snapshot_s: float = 60.0
    _map_version: tuple = ()
    _final_drain: bool = False
    tick_stats: dict = field(default_factory=lambda: {
        "ticks": 0, "idle_ticks": 0, "idle_max_ms": 0.0, "idle_total_ms": 0.0,
        "map_reads": 0, "map_read_max_ms": 0.0, "resolve_max_ms": 0.0})

    def _on_event(self, ev: KernelEvent) -> bool:
        self.pending.append(ev)
        return len(self.pending) >= POLL_BATCH or (self.stopping and not self._final_drain)

    def clock_offset_ns(self) -> int:
        return time.time_ns() - kernel_clock_ns(self.probe.boot_clock)

    def request_stop(self, *_args) -> None:
        self.stopping = True

    def start(self) -> None:
        self.probe = KernelProbe(self.config)
        self.probe.start(self._on_event)
        self.start_ns = kernel_clock_ns(self.probe.boot_clock)
        self.started_ts = time.time()
        snapshot = [row.endpoints for _ns, row in owners.snapshot_close_wait(self.proc)
                    if self.socket_filter.matches(row.endpoints)]
        self.tracker = Tracker(self.config.threshold_ns, self.start_ns)
        pre = self.tracker.seed(snapshot, self.probe.tracked())
        # Before the start record: whoever sees it may signal us at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.emit(records.start(self.started_ts, self.config.threshold_ns,
                                self.socket_filter.as_dict(), pre, self.headers,
                                self.probe.transport, self.config.all_transitions))
        self.flush()        # the banner says "ready": it must not wait in a buffer

    def run(self) -> None:
        next_tick = time.monotonic()
        next_snapshot = next_tick + self.snapshot_s
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_tick:
                    self.tick()
                    next_tick = now + self.tick_s
                if self.recorder is not None:
                    if now >= next_snapshot:
                        self.recorder.write(self.snapshot())
                        next_snapshot = now + self.snapshot_s
                    self.recorder.poll()
                wait_ms = int(max(0.0, min(0.1, next_tick - time.monotonic())) * 1000)
                self.probe.poll(wait_ms)
                self.drain()
                self.flush()
            self._final_drain = True
            deadline = time.monotonic() + FINAL_DRAIN_S
            while True:
                self.probe.poll(0)
                more = len(self.pending) >= POLL_BATCH
                self.drain()
                if not more or time.monotonic() > deadline:
                    break
            self.tick(resolve=False)
            self.emit(self.summary())
            self.flush()
        finally:
            self.probe.close()
            if self.recorder is not None:
                self.recorder.close()

    def drain(self) -> None:
        events, self.pending[:] = list(self.pending), []
        offset = self.clock_offset_ns() if events else 0
        for ev in events:
            if ev.kind == KIND_TRANSITION:
                self.emit(records.transition(ev, (ev.ts_ns + offset) / 1e9))
                continue
            closed = self.tracker.on_event(ev)
            if closed is None:
                continue
            if closed.lingerer is not None:
                self.unwatch(closed.lingerer)
            self.closed_lines += 1
            self.emit(records.closed(closed, (closed.ts_ns + offset) / 1e9))

    def tick(self, resolve: bool = True) -> None:
        started = time.monotonic()
        counters = self.check_counters()
        now_ns = kernel_clock_ns(self.probe.boot_clock)
        # The map changes only when the kernel counts an entry or an exit:
        # when neither moved, the sockets that mature are already known.
        version = (counters.get("cw_enter"), counters.get("cw_exit"),
                   counters.get("exit_untracked"))
        stats = self.tick_stats
        read_map = version != self._map_version
        if read_map:
            self._map_version = version
            entries, endpoints_of = self.probe.tracked_entries()
            due = self.tracker.sync_entries(entries, endpoints_of, now_ns)
            stats["map_reads"] += 1
            stats["map_read_max_ms"] = max(stats["map_read_max_ms"],
                                           (time.monotonic() - started) * 1000)
        else:
            due = self.tracker.due(now_ns)
        if resolve and self.watched:
            self.recheck_owners(now_ns)
        if resolve and due:
            resolving = time.monotonic()
            self.report(due, now_ns)
            self.tick_stats["resolve_max_ms"] = max(self.tick_stats["resolve_max_ms"],
                                                    (time.monotonic() - resolving) * 1000)
        elapsed = (time.monotonic() - started) * 1000
        stats["ticks"] += 1
        if not due and not read_map:    # nothing changed: the steady-state cost
            stats["idle_ticks"] += 1
            stats["idle_total_ms"] += elapsed
            stats["idle_max_ms"] = max(stats["idle_max_ms"], elapsed)

    def report(self, due: list[Lingerer], now_ns: int) -> None:
        resolved = owners.resolve([l.endpoints for l in due], self.proc)
        evidence_cache: dict = {}      # per process, for this batch only
        ready: list[Lingerer] = []
        for l in sorted(due, key=lambda l: l.enter_ns):
            own = resolved.get(l.endpoints)
            key = (l.skaddr, l.endpoints)
            if own is None or own.kind == owners.OWNER_GONE:
                attempts = self.resolve_attempts.get(key, 0) + 1
                self.resolve_attempts[key] = attempts
                if l.pre_existing:
                    self.tracker.forget_pre_existing(l.endpoints)
                    continue
                if attempts < MAX_RESOLVE_ATTEMPTS:
                    continue
            self.resolve_attempts.pop(key, None)
            l.ownership = own
            l.diagnosis = diagnosis.gather(own, self.proc, cache=evidence_cache) if own else None
            self.tracker.mark_reported(l)
            self.watch(l)
            ready.append(l)
        self.emit_processes(evidence_cache)
        for l in ready:
            self.linger_lines += 1
            self.emit(records.linger(l, time.time(), l.age_ns(now_ns)))

    def emit_processes(self, evidence_cache: dict) -> None:
        now = time.time()
        for evidence in diagnosis.process_evidence(evidence_cache):
            self.emit(records.process(now, evidence))

    def watch(self, l: Lingerer) -> None:
        own = l.ownership
        if own is None:
            return
        for h in list(own.holders) + list(own.listener_holders):
            self.watched.setdefault(h.pid, {})[id(l)] = l
            self.watched_state.setdefault(h.pid, (h.state, h.tracer_pid))

    def unwatch(self, l: Lingerer) -> None:
        own = l.ownership
        if own is None:
            return
        for h in list(own.holders) + list(own.listener_holders):
            sockets = self.watched.get(h.pid)
            if sockets is not None:
                sockets.pop(id(l), None)

    def recheck_owners(self, now_ns: int) -> None:
        """Redo the diagnosis of lingering sockets whose holders changed state
        (stopped, continued, traced, exited): one /proc read per holder
        process per tick, whatever the number of sockets it holds."""
        changed: dict = {}
        for pid, sockets in list(self.watched.items()):
            if not sockets:
                del self.watched[pid]
                self.watched_state.pop(pid, None)
                continue
            info = procfs.process_info(pid, self.proc)
            now = (info.state, info.tracer_pid) if info else ("gone", 0)
            if now != self.watched_state.get(pid):
                self.watched_state[pid] = now
                changed.update(sockets)
        affected = [l for l in changed.values() if self.tracker.is_lingering(l)]
        if not affected:
            return
        resolved = owners.resolve([l.endpoints for l in affected], self.proc)
        evidence_cache: dict = {}
        updated: list[Lingerer] = []
        for l in sorted(affected, key=lambda l: l.enter_ns):
            own = resolved.get(l.endpoints)
            if own is None or own.kind == owners.OWNER_GONE:
                continue            # it is leaving CLOSE_WAIT: CLOSED follows
            before = l.diagnosis.summary if l.diagnosis else None
            self.unwatch(l)             # its holders may have changed too
            l.ownership = own
            l.diagnosis = diagnosis.gather(own, self.proc, cache=evidence_cache)
            self.watch(l)
            if l.diagnosis.summary != before:
                updated.append(l)
        if updated:
            self.emit_processes(evidence_cache)
        for l in updated:
            self.change_lines += 1
            self.emit(records.linger(l, time.time(), l.age_ns(now_ns), update=True))

    def check_counters(self) -> dict:
        counters = self.probe.counters()
        for name in ("events_lost", "map_full"):
            delta = counters.get(name, 0) - self.last_counters.get(name, 0)
            if delta > 0:
                self.emit(records.lost(time.time(), name, delta, counters[name]))
        self.last_counters = counters
        return counters

    def still_lingering(self) -> list[dict]:
        now_ns = kernel_clock_ns(self.probe.boot_clock)
        return [records.lingering_entry(l, l.age_ns(now_ns))
                for l in sorted(self.tracker.lingering(), key=lambda l: l.enter_ns)
                if l.age_ns(now_ns) >= self.config.threshold_ns]

    def snapshot(self) -> dict:
        """The state right now, so a reader of a recording need not replay
        from the start (written at each rotation and every snapshot_s)."""
        return records.snapshot(time.time(), self.still_lingering(), self.probe.counters(),
                                self.probe.histogram())

    def summary(self) -> dict:
        stats = dict(self.tick_stats)
        stats["idle_mean_ms"] = stats.pop("idle_total_ms") / max(1, stats["idle_ticks"])
        extra = {"tracer_cost": {k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in stats.items()}}
        if self.recorder is not None:
            self.recorder.flush()
            extra["write_errors"] = self.recorder.write_errors
        extra["changes_reported"] = self.change_lines
        return records.summary(time.time(), self.started_ts, self.probe.counters(),
                               self.probe.histogram(), self.still_lingering(),
                               self.linger_lines, self.closed_lines, extra)
