"""Where output records go: the one interface every sink implements (the
terminal, the recording, a metrics endpoint), and the recording's sink.

The live loop knows sinks only through `Sink`: it hands each of them every
output record in order (emit), a `TickView` once after each tick (tick), a
nudge at the end of each pass of the loop (flush), and close() at exit,
after the summary. A sink that needs a timer (the recording's snapshots, a
metrics endpoint's refresh) keeps it itself and looks at the clock in tick().

A sink may also offer `summary_fields() -> dict`: fields it adds to the
summary record (the recording's write errors). The loop asks every sink that
has it, just before it builds the summary. A sink with
`emit_linger(report)` is handed each linger record as a
lingerlines.LingerReport instead of a dict (it builds its line from the
socket, or asks report.record(): the dict, made once for all sinks); the
others get that dict through emit. Likewise `emit_transitions` for
--all's raw rows (output/transitions.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from closewait_trace.output import lingerlines, records, textsafe, transitions


@dataclass
class TickView:
    """What a sink may look at once per tick."""

    wall_ts: float            # time.time() of the tick
    now_ns: int               # kernel clock (for Lingerer.age_ns)
    threshold_ns: int
    counters: dict            # probe.counters(): cw_enter, cw_exit, events_lost, ...
    histogram: list           # probe.histogram(): log2 microsecond slots
    histogram_sum_ns: Optional[int]    # probe.histogram_sum_ns(), None if unknown
    lingering: Callable[[], list]      # Lingerers in CLOSE_WAIT >= threshold (lazy)


class Sink(Protocol):
    def emit(self, rec: dict) -> None: ...        # every output record, in order
    def tick(self, view: TickView) -> None: ...   # once after each tick
    def flush(self) -> None: ...                  # end of each pass of the loop
    def close(self) -> None: ...                  # at exit, after the summary


def lingering_entries(view: TickView) -> list[dict]:
    """The view's lingering sockets as snapshot/summary entries."""
    return [records.lingering_entry(l, l.age_ns(view.now_ns)) for l in view.lingering()]


# What RecordingSink keeps of the holders' process records, to open each
# rotated part with those of its sockets' holders.
KEPT_PROCESS_BYTES = 4 << 20


def snapshot_record(view: TickView) -> dict:
    """The state at a tick, so a reader of a recording need not replay it
    from the start (written at each rotation and every snapshot interval)."""
    return records.snapshot(view.wall_ts, lingering_entries(view), view.counters,
                            view.histogram)


@dataclass
class RecordingSink:
    """-w: records go to a recording.Recorder. Owns the snapshot timer; the
    snapshot opening each rotated part is built from the latest tick."""

    recorder: object                    # recording.Recorder, already open
    snapshot_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _view: Optional[TickView] = None
    _next_snapshot: Optional[float] = None
    _lines: Optional[object] = None     # transitions.JsonLines, made at the first use
    _linger_lines: Optional[object] = None  # lingerlines.LingerJson, likewise
    # pid -> (its latest process record's line, the process's start time
    # or None), the oldest first, at most KEPT_PROCESS_BYTES of lines in
    # all: written again before the snapshot opening a rotated part, for
    # the holders of its sockets that are still the process the record is
    # of (the same pid and start time).
    _processes: dict = field(default_factory=dict)
    _process_bytes: int = 0

    def __post_init__(self) -> None:
        self.recorder.snapshot_source = self._rotation_snapshot
        self.recorder.snapshot_lines = self._holders_of

    def _rotation_snapshot(self) -> dict:
        if self._view is None:      # no tick yet (the loop ticks first): nothing known
            return records.snapshot(time.time(), [], {}, [])
        return snapshot_record(self._view)

    def _holders_of(self, snapshot: dict) -> list[str]:
        """The kept process records of the holders (and listeners' holders)
        of the snapshot's sockets: a part read on its own, or after its
        predecessors were rotated away, named the programs of its oldest
        sockets "program unknown" and folded no forks (a newcomer's
        report)."""
        started = self._holders_started()
        lines: dict = {}
        for entry in snapshot.get("lingering") or ():
            for side in (entry, entry.get("listener") or {}):
                for owner in side.get("owners") or ():
                    pid = owner.get("pid")
                    kept = self._processes.get(pid)
                    # A pid is only a name until its process ends: the
                    # record goes with the holder it was written for, not
                    # with another process given its pid since (one whose
                    # record was not written again: a batch that changed
                    # no summary writes none). Names, command lines and
                    # parents are the process's to choose; its start time
                    # is not (a review's F6).
                    if (kept is not None and pid not in lines and kept[1] is not None
                            and kept[1] in started.get(pid, ())):
                        lines[pid] = kept[0]
        return list(lines.values())

    def _holders_started(self) -> dict:
        """pid -> the start times of the processes with that pid that hold
        (or listen for) the last tick's lingering sockets, as their owner
        lookups read them."""
        started: dict = {}
        if self._view is None:
            return started
        for l in self._view.lingering():
            own = l.ownership
            if own is None:
                continue
            for holders in (own.holders, own.listener_holders):
                for h in holders:
                    snap = getattr(h, "process", None)
                    if snap is not None:
                        started.setdefault(h.pid, set()).add(snap.start_time)
        return started

    def emit(self, rec: dict) -> None:
        if rec.get("type") == "process" and isinstance(rec.get("pid"), int):
            self.emit_process(rec, None)
            return
        self.recorder.write(rec)

    def emit_process(self, rec: dict, start_time: Optional[int]) -> None:
        """A process record, and the start time of the process it is of
        (None: not known; then it is never written again for a rotation)."""
        line = textsafe.json_dumps(rec, separators=(",", ":")) + "\n"
        self.recorder.write_line(line, "process")
        self._keep_process(rec["pid"], line, start_time)

    def _keep_process(self, pid: int, line: str, start_time: Optional[int]) -> None:
        old = self._processes.pop(pid, None)
        if old is not None:
            self._process_bytes -= len(old[0])
        if len(line) > KEPT_PROCESS_BYTES // 64:
            return                  # one with huge stacks: not kept for the next parts
        self._processes[pid] = (line, start_time)
        self._process_bytes += len(line)
        while self._process_bytes > KEPT_PROCESS_BYTES:
            self._process_bytes -= len(self._processes.pop(next(iter(self._processes)))[0])

    def emit_linger(self, report: lingerlines.LingerReport) -> None:
        """The line write(report.record()) would make, without the dict."""
        if self._linger_lines is None:
            self._linger_lines = lingerlines.LingerJson(compact=True)
        self.recorder.write_line(self._linger_lines.line(report) + "\n", "linger")

    def emit_transitions(self, rows, offset_ns: int) -> None:
        """--all's transitions as raw rows (events.EventLayout): the lines
        write(records.transition(...)) would make, built from templates
        (output/transitions.py), a batch at a time."""
        if self._lines is None:
            self._lines = transitions.JsonLines(compact=True)
        self.recorder.write_lines(self._lines.line_list(rows, offset_ns))

    def tick(self, view: TickView) -> None:
        self._view = view
        now = self.clock()
        if self._next_snapshot is None:
            self._next_snapshot = now + self.snapshot_s
        elif now >= self._next_snapshot:
            self.recorder.write(snapshot_record(view))
            self._next_snapshot = now + self.snapshot_s

    def flush(self) -> None:
        # The recorder batches for up to half a second (one write per batch);
        # this only keeps its "on disk within a second" promise.
        self.recorder.poll()

    def summary_fields(self) -> dict:
        self.recorder.flush()           # so that a failing write is counted
        return {"write_errors": self.recorder.write_errors}

    def close(self) -> None:
        self.recorder.close()


@dataclass
class ListSink:
    """Keeps everything it is given (tests, and callers that want records)."""

    records: list = field(default_factory=list)
    views: list = field(default_factory=list)
    flushes: int = 0
    closed: bool = False

    def emit(self, rec: dict) -> None:
        self.records.append(rec)

    def tick(self, view: TickView) -> None:
        self.views.append(view)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True
