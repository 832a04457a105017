"""Text rendering of output records (pure).

The default layout fits 80 columns with the full 15-character command name
and a 7-digit pid in OWNER: addresses get 15 columns each and are shortened
in the middle when longer (the port always kept). --wide widens the address
columns to the longest IPv6 address and cuts nothing.

Every string that comes from outside (process names, command lines,
addresses and everything else read from a recording) goes through textsafe
before it is cut or padded, and every finished line through
textsafe.safe_line, so that nothing reaches the terminal raw.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from closewait_trace.output import changefold, textsafe
from closewait_trace.durations import format_age
from closewait_trace.output.textsafe import escape, pad
from closewait_trace.sockets.filters import describe_filters

COUNTER_TEXT = {
    "events_lost": "events lost: the ring buffer was full",
    "map_full": "sockets not timed: the tracking map was full",
    "evidence_timeouts": ("reads of holders' /proc, memory or files abandoned at "
                          "their deadline"),
    "events_unread": "events not read: in the buffer when the trace ended",
    "transitions_skipped": ("state changes not seen: the kernel skipped the program "
                            "(a BPF program was already running on that CPU)"),
}

LINE = 80                  # the default layout's width
MAX_OWNERS_NAMED = 3       # holder processes named in a summary's still-lingering line
TIME_FORMATS = ("clock", "iso", "epoch", "elapsed", "entered")
# An address cut to fit its column: what marks an IPv4 address seen on an
# IPv6 socket (::ffff:a.b.c.d), shown as IPv4.
MAPPED_MARK = "*"


def banner(threshold_ns: int, filters_text: str = "", at_terminal: bool = True) -> list[str]:
    # "Ctrl-C to end" is for someone at a terminal: a service's journal
    # (systemd stops it) is told only what is traced.
    lines = [f"Tracing TCP sockets lingering in CLOSE_WAIT >= "
             f"{format_age(threshold_ns)}..." + (" Ctrl-C to end." if at_terminal else "")]
    if filters_text:
        lines.append(f"Only: {escape(filters_text)}")
    return lines


# ---------------------------------------------------------------- values

def _number(value) -> Optional[float]:
    """A finite number, or None (a hostile or damaged recording may carry
    anything where a number belongs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _duration(seconds) -> str:
    s = _number(seconds)
    return "?" if s is None else format_age(int(min(s, 1e12) * 1e9))


def age_source(rec: dict, kind: str = "age") -> str:
    """traced | estimated | lower_bound. Records from before ages had a
    source carry only `<kind>_is_lower_bound`: then it is lower_bound or
    traced, as it meant then."""
    return source_of(rec.get(f"{kind}_source"), rec.get(f"{kind}_is_lower_bound"))


def source_of(source, is_lower_bound) -> str:
    """age_source from the two fields' values."""
    if source in ("traced", "estimated", "lower_bound", "range"):
        return source
    return "lower_bound" if is_lower_bound else "traced"


# A range (keepalive) is shown by its upper end, marked "at most": its lower
# end is the probe interval, not the age.
SOURCE_MARK = {"traced": "", "estimated": "~", "lower_bound": ">=", "range": "<="}


def marked_age(seconds, source: str = "traced") -> str:
    """`1.4s` timed by the kernel, `~6.5s` estimated (tcp_info), `>=510ms` a
    lower bound, `<=24.6s` the upper end of a range (pass that end); `?` for
    a value that is not a finite number."""
    return SOURCE_MARK.get(source, "") + _duration(seconds)


def age_text(rec: dict, kind: str = "age") -> str:
    """A record's age (kind "age": linger, snapshot entries) or duration
    ("duration": closed), with the mark of its source."""
    return age_cell(rec.get(f"{kind}_s"), age_source(rec, kind), rec.get(f"{kind}_max_s"))


def age_cell(seconds, source: str, max_seconds) -> str:
    """age_text from the values: how long, its source (age_source), the
    upper end of a range."""
    if source == "range":
        high = _number(max_seconds)
        if high is None:        # a damaged record: its lower end is all there is
            return marked_age(seconds, "lower_bound")
        return marked_age(high, source)
    return marked_age(seconds, source)


def hostport(addr, port, columns: Optional[int] = None) -> str:
    """`127.0.0.1:80`, `[2001:db8::1]:443`, `*127.0.0.1:80` for an
    IPv4-mapped IPv6 address; cut in the middle of the address (never the
    port) to fit `columns`."""
    if type(port) is int and type(addr) is str and ":" not in addr:
        text = f"{addr}:{port}"        # IPv4, the common case
        if (columns is None or len(text) <= columns) and text.isascii() \
                and text.isprintable() and "\\" not in text:
            return text
    a = escape(addr if addr is not None else "?")
    p = escape(port if port is not None else "?")
    if a.lower().startswith("::ffff:") and a.count(".") == 3 and ":" not in a[7:]:
        a, head, tail = a[7:], MAPPED_MARK, ""
    elif ":" in a:
        head, tail = "[", "]"
    else:
        head, tail = "", ""
    if columns is None:
        return f"{head}{a}{tail}:{p}"
    room = columns - len(head) - len(tail) - 1 - textsafe.width_of_escaped(p)
    if textsafe.width_of_escaped(a) > room:
        a = textsafe.cut_middle(a, max(1, room))
    return f"{head}{a}{tail}:{p}"


def is_change(rec: dict) -> bool:
    """Whether a record is a CHANGE: a linger record that is an update (as
    its row's EVENT says)."""
    return rec.get("type") == "linger" and bool(rec.get(EVENT_COLUMN.fields["linger"][0]))


def _owner_entries(rec: dict) -> list:
    """A linger record's owners entries (the dicts among them)."""
    return [o for o in rec.get(OWNER_COLUMN.fields["linger"][0]) or [] if isinstance(o, dict)]


def _change_cause(rec: dict) -> str:
    """A CHANGE record's cause as its fold shows it (escaped; "-": none)."""
    diagnosis = rec.get("diagnosis")
    cause = diagnosis.get("cause") if isinstance(diagnosis, dict) else None
    return "-" if cause is None else escape(cause)


def who(person) -> str:
    """`pid/comm` of an owners entry, task or closed_by (escaped)."""
    if not isinstance(person, dict):
        return "-"
    return who_is(person.get('pid', '?'), person.get('comm', '?'))


def who_is(pid, comm) -> str:
    """who() from the values."""
    return f"{escape(pid)}/{escape(comm)}"


# ---------------------------------------------------------------- time

@dataclass
class Clock:
    """The TIME column. clock: HH:MM:SS local time, and a line with the date
    whenever it changes (a trace or a replay spanning days); iso: ISO 8601
    with the UTC offset; epoch: seconds since 1970; elapsed: seconds since
    the start of the trace (bcc's -t); entered: for a socket's row, the
    local time it entered CLOSE_WAIT (since when, not when it was printed;
    its date with --json or when it is not today's), other rows as clock."""
    style: str = "clock"
    start_ts: Optional[float] = None
    day: Optional[_dt.date] = None
    _second: Optional[int] = None          # the last clock cell, per whole second
    _cell: str = ""

    @property
    def width(self) -> int:
        return {"clock": 8, "iso": 25, "epoch": 14, "elapsed": 10, "entered": 8}[self.style]

    @property
    def label(self) -> str:
        return {"elapsed": "TIME(s)", "entered": "ENTERED"}.get(self.style, "TIME")

    def started(self, ts) -> None:
        t = _number(ts)
        if t is not None:
            self.start_ts = t
            self.day = _local(t).date() if _local(t) else None

    def cell(self, ts) -> tuple[str, list[str]]:
        """(the TIME cell, lines to print before the row: a date line)."""
        t = _number(ts)
        if self.style == "entered":
            when = _local(t) if t is not None else None
            return (f"{when:%H:%M:%S}" if when else "?"), []
        if self.style == "clock" and t is not None and int(t) == self._second:
            return self._cell, []          # same second: same cell, same day
        when = _local(t) if t is not None else None
        if when is None:
            return "?", []
        before = []
        if self.style == "clock":
            self._second, self._cell = int(t), f"{when:%H:%M:%S}"
            if self.day is not None and when.date() != self.day:
                before.append(f"{when:%Y-%m-%d %A}")
            self.day = when.date()
            return f"{when:%H:%M:%S}", before
        if self.style == "iso":
            return when.astimezone().isoformat(timespec="seconds"), before
        if self.style == "epoch":
            return f"{t:.3f}", before
        if self.start_ts is None:
            self.start_ts = t
        return f"{t - self.start_ts:.3f}", before


def _until(start: Optional[_dt.datetime], end_ts: Optional[float]) -> str:
    end = _local(end_ts) if end_ts is not None else None
    if start is None or end is None:
        return ""
    return f" to {end:%H:%M:%S}" if end.date() == start.date() else f" to {end:%Y-%m-%d %H:%M:%S}"


def day_of(ts) -> Optional[tuple]:
    """The local day of a record's time (the clock's date lines change with
    it), None when it is not a time."""
    t = _number(ts)
    if t is None:
        return None
    try:
        return _day_of_second(int(t))
    except (OverflowError, OSError, ValueError):
        return None


@functools.lru_cache(maxsize=64)
def _day_of_second(second: int) -> tuple:
    # The records of a batch share their second: one localtime() for them.
    return time.localtime(second)[:3]


def _local(ts: float) -> Optional[_dt.datetime]:
    try:
        return _dt.datetime.fromtimestamp(ts)
    except (OverflowError, OSError, ValueError):
        return None


# ---------------------------------------------------------------- replay

# Bounds of what the renderer remembers, whatever the records.
MAX_PROCESSES = 4_096       # process records kept for -v (the latest)
MAX_CAPTURES = 1_000        # capture headers remembered by a replay
# What -v shows of a process (evidence_lines), and all that is kept of its
# record: a record is up to 8 MiB of JSON (the reader's line cap), and
# 4,096 whole ones were kept; 30 records of one thread with 200,000 Python
# frames each made -r peak at 1.2 GB, 40 with a 7 MB list under an extra
# identity key at 3.7 GB.
SHOWN_IDENTITY = ("user", "container", "pod_uid", "unit", "claimed", "netns")
SHOWN_THREADS = 16          # the writer's own bound (diagnosis.MAX_THREADS)
SHOWN_FRAMES = 8            # of each thread's stack and Python frames
# And the kept copies' size in all (sys.getsizeof of their strings, dicts
# and lists): even cut so, a process can keep 16 threads of 16 frames of
# 4 KiB strings (the schema's cap), some 4 MB; past this budget the oldest
# are forgotten, as past MAX_PROCESSES. A real holder's copy is a few KiB.
MAX_PROCESS_BYTES = 64 << 20


@dataclass
class ReplaySource:
    """What a replay shows and how: the banner names the file, the capture
    and the filters, and the summary counts what was shown after them."""
    paths: list
    filters: str = ""                       # the replay's own filters, described
    keep_entry: Callable[[dict], bool] = lambda entry: True   # for summary entries
    captures: dict = field(default_factory=dict)   # capture_id -> first header
    recorded: dict = field(default_factory=dict)   # record type -> count in the files
    shown: dict = field(default_factory=dict)      # LINGER/CHANGE/CLOSED... -> count shown
    first_ts: Optional[float] = None
    last_ts: Optional[float] = None
    end_ts: Optional[float] = None       # the recording's last time, when known up front
    summaries: int = 0
    unshowable: int = 0

    def saw(self, rec: dict) -> None:
        """Every record read, shown or not."""
        kind = rec.get("type")
        if kind == "linger" and rec.get("update"):
            kind = "change"
        self.recorded[kind] = self.recorded.get(kind, 0) + 1
        ts = _number(rec.get("ts", rec.get("start_ts")))
        if ts is not None:
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)


# ---------------------------------------------------------------- columns

@dataclass(frozen=True)
class Column:
    """A column of the text table: its header, and for each record type that
    has a row the fields of the record (output/schema.py) its cell shows.
    The header line and every row are made from COLUMNS, in its order;
    tests/unit/test_columns.py checks that each field is one of the schema's
    and that the cell under each header changes with its fields."""
    label: str
    fields: dict            # record type -> the record's fields the cell shows
    right: bool = False     # aligned right (a number)


ROW_TYPES = ("linger", "closed", "transition")
TIME_COLUMN = Column("TIME", {"linger": ("ts", "entered_at"), "closed": ("ts",),
                              "transition": ("ts",)})
EVENT_COLUMN = Column("EVENT", {"linger": ("update",), "closed": ("how",),
                                "transition": ("oldstate", "newstate")})
LOCAL_COLUMN = Column("LOCAL", {kind: ("laddr", "lport") for kind in ROW_TYPES})
REMOTE_COLUMN = Column("REMOTE", {kind: ("raddr", "rport") for kind in ROW_TYPES})
AGE_COLUMN = Column("AGE", {"linger": ("age_s",), "closed": ("duration_s",),
                            "transition": ("prev_state_s",)}, right=True)
OWNER_COLUMN = Column("OWNER", {"linger": ("owners",), "closed": ("closed_by",),
                                "transition": ("task",)})
COLUMNS = (TIME_COLUMN, EVENT_COLUMN, LOCAL_COLUMN, REMOTE_COLUMN, AGE_COLUMN, OWNER_COLUMN)


def _age_kind(kind: str) -> str:
    """The prefix of a record's age fields (age_s, age_source, age_max_s):
    "age" for a linger record, "duration" for a closed one."""
    return AGE_COLUMN.fields[kind][0].removesuffix("_s")


# ---------------------------------------------------------------- rows

def holder_states(states) -> str:
    """The holders' states, as they lead a diagnosis line: "S", "ST"."""
    return "".join(sorted({escape(state) for state in states}))


def diagnosis_text(states: str, summary) -> str:
    """A diagnosis line's text: the holders' states (holder_states) first,
    [T] stopped, [S] sleeping..., then its summary."""
    return (f"[{states}] " if states else "") + escape(summary)


@functools.lru_cache(maxsize=512)
def _cut_diagnosis(text: str, columns: int, indent: str) -> str:
    """A diagnosis line cut to its columns: the same few texts for thousands
    of sockets of one holder (a snapshot), cut once each."""
    return indent + textsafe.cut(text, columns)


class TextRenderer:
    def __init__(self, wide: bool = False, verbose: bool = False,
                 time_format: str = "clock", replay: Optional[ReplaySource] = None):
        self.wide = wide
        self.verbose = verbose
        self.clock = Clock(time_format)
        self.replay = replay
        self.all_transitions = False
        self.processes: dict = {}  # pid -> what -v shows of its latest process record
        self._process_cost: dict = {}   # pid -> _size of it
        self._process_bytes = 0         # their sum
        # Durations of sockets that left CLOSE_WAIT, by how they were
        # obtained: the kernel's histogram holds only the timed ones.
        self.closed_by_source: dict = {"traced": 0, "estimated": 0, "lower_bound": 0,
                                       "range": 0}
        self.estimated_us: list[int] = [0] * 64

    # Column widths. Default: 80 columns with OWNER = 7-digit pid, '/',
    # 15-character command. --all's OLD>NEW event takes 3 more columns:
    # there the addresses give up one each and OWNER one.
    @property
    def event_width(self) -> int:
        return 9 if self.all_transitions else 6

    @property
    def addr_width(self) -> int:
        if self.wide:
            return 47          # [ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535
        return 14 if self.all_transitions else 15

    AGE_WIDTH = 8              # ">=12m03s"

    @property
    def owner_width(self) -> Optional[int]:
        if self.wide:
            return None        # cut nothing
        used = (8 + 1 + self.event_width + 1 + 2 * (self.addr_width + 1)
                + self.AGE_WIDTH + 1)
        return LINE - used

    def widths(self) -> dict:
        """Each column's width by its label (None: the last, as long as it is)."""
        w = self.addr_width
        return {TIME_COLUMN.label: self.clock.width, EVENT_COLUMN.label: self.event_width,
                LOCAL_COLUMN.label: w, REMOTE_COLUMN.label: w,
                AGE_COLUMN.label: self.AGE_WIDTH, OWNER_COLUMN.label: None}

    def header(self) -> str:
        # TIME says which time (the clock's label), OWNER that --all's rows
        # name the task a transition ran on.
        shown = {TIME_COLUMN.label: self.clock.label,
                 OWNER_COLUMN.label: "OWNER/TASK" if self.all_transitions else "OWNER"}
        widths = self.widths()
        cells = []
        for column in COLUMNS:
            text, width = shown.get(column.label, column.label), widths[column.label]
            cells.append(text if width is None else
                         f"{text:>{width}}" if column.right else f"{text:<{width}}")
        return " ".join(cells)

    def _row(self, rec: dict, event: str, age: str, owner: str) -> list[str]:
        """A row of COLUMNS for a record of ROW_TYPES: event, age and owner
        are its EVENT, AGE and OWNER cells (owner escaped already); the rest
        is taken from the record and escaped here."""
        kind = rec.get("type")
        time_field = TIME_COLUMN.fields.get(kind, ("ts",))[0]
        endpoint = [rec.get(f) for column in (LOCAL_COLUMN, REMOTE_COLUMN)
                    for f in column.fields.get(kind, column.fields["linger"])]
        return self.row(rec.get(time_field), rec.get("entered_at"),
                        rec.get("age_s", rec.get("duration_s")), *endpoint,
                        rec.get("peer_known"), event, age, owner)

    def row(self, when, entered_at, held, laddr, lport, raddr, rport, peer_known,
            event: str, age: str, owner: str) -> list[str]:
        """_row from the record's values: when (its TIME field), since when
        (entered_at, or when less held: its age or duration), its endpoints;
        the lines before it (a date line), then the row. A row made from a
        socket (lingerlines.LingerText) is made here too."""
        widths = self.widths()
        if self.clock.style == "entered":
            # Since when: the entry time of a socket's row (LINGER, CHANGE,
            # CLOSED), from the record's own age or duration.
            entered = _number(entered_at)
            held = _number(held)
            ts = _number(when)
            if entered is None and held is not None and ts is not None:
                entered = ts - held
            if entered is not None:
                when = entered
        cell, before = self.clock.cell(when)
        local = hostport(laddr, lport, None if self.wide else widths[LOCAL_COLUMN.label])
        remote = hostport(raddr, rport, None if self.wide else widths[REMOTE_COLUMN.label])
        if peer_known is False:
            remote = PEER_NOT_GIVEN         # not 0.0.0.0:0 as if that were the peer
        tw, ew, aw = widths[TIME_COLUMN.label], widths[EVENT_COLUMN.label], widths[AGE_COLUMN.label]
        lw, rw = widths[LOCAL_COLUMN.label], widths[REMOTE_COLUMN.label]
        if None not in (tw, ew, lw, rw, aw) and f"{cell}{local}{remote}{age}".isascii():
            # The common row: escaped ASCII cells, a column per character,
            # so format's padding is pad's (the loop below, for the others).
            return before + [f"{cell:<{tw}} {event:<{ew}} {local:<{lw}} {remote:<{rw}} "
                             f"{age:>{aw}} {owner}"]
        cells = {TIME_COLUMN.label: cell, EVENT_COLUMN.label: event,
                 LOCAL_COLUMN.label: local, REMOTE_COLUMN.label: remote,
                 AGE_COLUMN.label: age, OWNER_COLUMN.label: owner}
        line = []
        for column in COLUMNS:
            text, width = cells[column.label], widths[column.label]
            if width is None:
                line.append(text)
            elif column is EVENT_COLUMN:    # padded by characters, as it always was
                line.append(f"{text:<{width}}")
            else:
                line.append(pad(text, width, right=column.right))
        return before + [" ".join(line)]

    def _owner(self, first: str, more: int = 0) -> str:
        """OWNER: `pid/comm`, ` +N` when N more processes hold it. When both
        do not fit (7-digit pid, 15-character command and +N), the command
        is cut: the diagnosis line names every holder."""
        limit = self.owner_width
        tail = f" +{more}" if more else ""
        text = first + tail
        if limit is None or textsafe.width_of_escaped(text) <= limit:
            return text
        return textsafe.cut(first, limit - len(tail)) + tail

    def render(self, rec: dict) -> list[str]:
        if self.replay is None:
            lines = self._render(rec)
        else:
            try:
                lines = self._render(rec)
            except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                # A recording from elsewhere may hold anything: a record we
                # cannot show is counted (and said at the end), never fatal.
                self.replay.unshowable += 1
                return []
        return self.finished(lines)

    def finished(self, lines: list[str]) -> list[str]:
        """A record's lines as they are written: checked (safe_line), and
        fitted to 80 columns (bcc's checklist), whatever a record holds:
        --wide keeps rows whole on purpose; everything else is fitted here,
        once, rather than line by line wherever a line is made."""
        lines = [textsafe.safe_line(line) for line in lines]
        return lines if self.wide else fit_lines(lines)

    def _render(self, rec: dict) -> list[str]:
        kind = rec.get("type")
        if kind == "header":
            return self._replay_header(rec) if self.replay is not None else []
        if kind == "start":
            return self._start(rec)
        if kind == "linger":
            return self._linger(rec)
        if kind == "closed":
            return self._closed(rec)
        if kind == "process":
            if self.verbose and isinstance(rec.get("pid"), int):
                # Shown through the linger lines (-v), and only there: without
                # -v nothing is kept. The latest MAX_PROCESSES are kept (the
                # oldest forgotten), each as the little -v shows of it, within
                # MAX_PROCESS_BYTES in all: a replay of a recording of many
                # processes, or a long trace, does not grow without end.
                self._keep_process(rec["pid"], shown_process(rec))
            return []
        if kind == "transition":
            return self._transition(rec)
        if kind == "lost":
            what = COUNTER_TEXT.get(rec.get("counter"), escape(rec.get("counter")))
            return [f"WARNING: {escape(rec.get('count'))} {what} (total {escape(rec.get('total'))})"]
        if kind == "summary":
            return self._summary(rec)
        return []

    def _keep_process(self, pid: int, kept: dict) -> None:
        cost = _size(kept)
        old = self.processes.pop(pid, None)
        if old is not None:
            self._process_bytes -= self._process_cost.pop(pid)
        while self.processes and (len(self.processes) >= MAX_PROCESSES
                                  or self._process_bytes + cost > MAX_PROCESS_BYTES):
            oldest = next(iter(self.processes))
            del self.processes[oldest]
            self._process_bytes -= self._process_cost.pop(oldest)
        self.processes[pid] = kept
        self._process_cost[pid] = cost
        self._process_bytes += cost

    def _start(self, rec: dict) -> list[str]:
        self.all_transitions = bool(rec.get("all_transitions"))
        self.clock.started(rec.get("ts"))
        threshold = _number(rec.get("threshold_s"))
        threshold_ns = int(threshold * 1e9) if threshold is not None else 0
        filters = rec.get("filters")
        try:
            described = describe_filters(filters) if filters else ""
        except (TypeError, ValueError, KeyError, AttributeError):
            described = escape(filters)
        if self.replay is not None:
            lines = [f"Recorded: sockets in CLOSE_WAIT >= {format_age(threshold_ns)}"
                     + (f"; {escape(described)}" if described else "; no capture filters")
                     + (", every transition (--all)" if self.all_transitions else "")]
        else:
            lines = banner(threshold_ns, described)
        if self.verbose and rec.get("headers"):
            compiled = _number(rec.get("compile_s"))
            lines.append(f"kernel headers: {escape(rec['headers'])}; {escape(rec.get('transport', '?'))}"
                         + (f"; compiled in {compiled:.2f}s" if compiled is not None else ""))
        return lines + [self.header()]

    def _replay_header(self, rec: dict) -> list[str]:
        """A recording's header: a banner for each capture the replay meets
        (a rotated part of the same capture adds nothing)."""
        capture = str(rec.get("capture_id"))
        if capture in self.replay.captures:
            return []
        if len(self.replay.captures) < MAX_CAPTURES:     # bounded; each new one still says so
            self.replay.captures[capture] = rec
        start = _number(rec.get("start_ts"))
        when = _local(start) if start is not None else None
        files = ", ".join(escape(p) for p in self.replay.paths)
        first = f"Replay of {files} (a recording, not a live trace)"
        if len(self.replay.captures) > 1:
            lines = ["Replay: the next capture"]
        elif textsafe.width_of_escaped(first) <= LINE:
            lines = [first]
        else:           # the files on a line of their own, not wrapped word by word
            lines = ["Replay of a recording (not a live trace):", f"  {files}"]
        lines.append(f"Captured on {escape(rec.get('hostname', '?'))}"
                     f" (kernel {escape(rec.get('kernel_release', '?'))})"
                     + (f" from {when:%Y-%m-%d %H:%M:%S}" if when else "")
                     + _until(when, self.replay.end_ts if len(self.replay.captures) == 1 else None)
                     + f", capture {escape(capture)}")
        lines.append("Shown: " + (f"only {escape(self.replay.filters)}"
                                  if self.replay.filters else "everything (no replay filters)"))
        self.clock.started(rec.get("start_ts"))
        return lines

    def _count(self, event: str) -> None:
        if self.replay is not None:
            self.replay.shown[event] = self.replay.shown.get(event, 0) + 1

    def _linger_owners(self, rec: dict) -> tuple[list, str]:
        """A linger record's owners entries, and its OWNER cell."""
        owners = _owner_entries(rec)
        return owners, self.linger_owner(who(owners[0]) if owners else None,
                                         [o.get("pid") for o in owners], rec.get("owner_kind"))

    def _linger(self, rec: dict) -> list[str]:
        owners, owner = self._linger_owners(rec)
        event = "CHANGE" if rec.get(EVENT_COLUMN.fields["linger"][0]) else "LINGER"
        self._count(event)
        lines = self._row(rec, event, age_text(rec, _age_kind("linger")), owner)
        diagnosis = rec.get("diagnosis")
        if isinstance(diagnosis, dict):
            text = diagnosis_text(holder_states(o.get("state", "?") for o in owners),
                                  diagnosis.get("summary", ""))
            lines.extend(self.diagnosis_lines(text))
        else:
            text = ""
        lines.extend(code_lines(rec, self.verbose, shown=text))
        if self.verbose:
            lines.extend(evidence_lines(rec, self.processes))
        return lines

    def change_key(self, rec: dict) -> Optional[bytes]:
        """A CHANGE record's group in the text's fold (output/changefold.py):
        None where its fields make none (a record read from elsewhere): it
        is shown whole, as render() shows it."""
        try:
            owners = _owner_entries(rec)
            return changefold.group_key(
                escape(rec.get("owner_kind")), _change_cause(rec),
                escape(owners[0].get("comm", "?")) if owners else "",
                {escape(o.get("state", "?")) for o in owners},
                [escape(o.get("pid")) for o in owners])
        except (TypeError, ValueError, AttributeError):
            return None

    def change_description(self, rec: dict) -> tuple:
        """What a CHANGE record's group line shows: its OWNER cell, states
        and cause as its row and diagnosis line show them."""
        owners, owner = self._linger_owners(rec)
        return owner, holder_states(o.get("state", "?") for o in owners), _change_cause(rec)

    def count_folded(self) -> None:
        """A CHANGE the fold counts instead of showing its rows: counted as
        shown in a replay's summary (its group's line says it)."""
        self._count("CHANGE")

    def linger_owner(self, first: Optional[str], pids: list, owner_kind) -> str:
        """A linger row's OWNER: its first holder (who(); None: no holder)
        and how many more processes hold it (pids: every holder's, a process
        on two fds counted once); with none, what its owner kind says."""
        if first is not None:
            return self._owner(first, len({str(pid) for pid in pids}) - 1)
        if owner_kind == "accept_queue":
            return "(not accepted)"
        if owner_kind == "ambiguous":
            return "(ambiguous)"     # several namespaces, its own unknown
        return "-"

    def diagnosis_lines(self, text: str) -> list[str]:
        """A linger row's diagnosis (diagnosis_text) under it."""
        indent = " " * 9
        if self.wide:
            return [indent + text]
        if self.verbose:
            # All of it, wrapped to 80 columns (-v is read, not grepped).
            return [indent + l for l in prose(text, LINE - len(indent))]
        return [_cut_diagnosis(text, LINE - len(indent), indent)]

    def _transition(self, rec: dict) -> list[str]:
        prev = rec.get(AGE_COLUMN.fields["transition"][0])
        age = "?" if prev is None else _duration(prev)
        task = rec.get(OWNER_COLUMN.fields["transition"][0])
        owner = self._owner(who(task)) if isinstance(task, dict) else "-"
        old, new = (rec.get(f) for f in EVENT_COLUMN.fields["transition"])
        change = (f"{_SHORT.get(old, escape(old))}>{_SHORT.get(new, escape(new))}")
        change = textsafe.cut(change, self.event_width)
        self._count("TRANSITION")
        return self._row(rec, change, age, owner)

    def _closed(self, rec: dict) -> list[str]:
        source = age_source(rec, "duration")
        self.closed_by_source[source] += 1
        if source == "estimated":
            seconds = _number(rec.get("duration_s"))
            if seconds is not None:
                self.estimated_us[_log2_slot(seconds)] += 1
        by = rec.get(OWNER_COLUMN.fields["closed"][0])
        how = rec.get(EVENT_COLUMN.fields["closed"][0])
        event = {"close": "CLOSED", "abort": "ABORT", "reset": "RESET"}.get(how, "GONE")
        self._count(event)
        owner = self._owner(who(by)) if isinstance(by, dict) else "-"
        return self._row(rec, event, age_text(rec, _age_kind("closed")), owner)

    def _summary(self, rec: dict) -> list[str]:
        lines = summary_lines(rec, self)
        if self.replay is None:
            return lines
        self.replay.summaries += 1
        return ["", "Recorded at the end of the capture (every socket, before the replay's "
                "filters):"] + lines[1:]

    def replay_end(self) -> list[str]:
        """The replay's own summary: what was shown, after which filters."""
        r = self.replay
        if r is None:
            return []
        shown = ", ".join(f"{r.shown.get(e, 0)} {e}" for e in ("LINGER", "CHANGE", "CLOSED")
                          ) + "".join(f", {r.shown[e]} {e}" for e in ("ABORT", "RESET", "GONE",
                                                                     "TRANSITION") if r.shown.get(e))
        recorded = (f"{r.recorded.get('linger', 0)} linger, {r.recorded.get('change', 0)} "
                    f"change, {r.recorded.get('closed', 0)} closed records")
        span = ""
        if r.first_ts is not None and r.last_ts is not None:
            a, b = _local(r.first_ts), _local(r.last_ts)
            if a and b:
                span = (f", {a:%Y-%m-%d %H:%M:%S} -> {b:%Y-%m-%d %H:%M:%S}"
                        if a.date() != b.date() else
                        f", {a:%Y-%m-%d %H:%M:%S} -> {b:%H:%M:%S}")
        lines = ["", f"Replay summary (counts what was shown, "
                     f"{'after the filters: ' + escape(r.filters) if r.filters else 'no filters'}):",
                 f"  shown: {shown}",
                 f"  in the recording: {recorded}{span}"]
        if not r.summaries:
            lines.append("  The recording has no summary: its capture ended without one "
                         "(killed, or still running).")
        if r.unshowable:
            lines.append(f"  {r.unshowable} record(s) could not be shown (unexpected values).")
        return fit_lines([textsafe.safe_line(line) for line in lines])


def _log2_slot(seconds: float) -> int:
    us = int(max(0.0, seconds) * 1e6)
    return min(63, us.bit_length())


# --all, kernels before 6.15: the accepted socket's first transition comes
# without the peer's address (the README's --all section explains it).
PEER_NOT_GIVEN = "(no peer <6.15)"


def _claim(claim) -> str:
    """A container, pod or unit named where anyone could name it (a user's
    delegated cgroup): said as a claim with where it was made, never as
    the holder's container."""
    if not isinstance(claim, dict):
        return ""
    c = claim.get("container") if isinstance(claim.get("container"), dict) else None
    named = " ".join(x for x in (
        f"{escape(c.get('runtime'))} {escape(str(c.get('id'))[:12])}" if c else "",
        f"pod {escape(claim['pod_uid'])}" if claim.get("pod_uid") else "",
        escape(claim["unit"]) if claim.get("unit") else "") if x)
    return (f"claims {named} (named under {escape(claim.get('under') or '?')}, not trusted)"
            if named else "")


# A C function's compiler clones (handle_client.isra.0, f.part.1, f.cold):
# the name in the source is the part before the suffix.
_CLONE_SUFFIX = re.compile(r"(\.(isra|part|constprop|cold|lto_priv|clone|localalias)(\.\d+)*)+$")


def describe_place(frame: dict) -> str:
    """A stack frame as its source names it, in a few words: the function
    without the compiler's clone suffix and the module ('handle_client
    (srv)', 'main.handle (api)'), the pc and module when unsymbolized. The
    exact symbol and offset are in the frame itself (-v, JSON). Not
    escaped: the caller escapes what it prints."""
    module = str(frame.get("module") or "?").replace(" (deleted)", "").rsplit("/", 1)[-1]
    function = frame.get("function")
    where = _CLONE_SUFFIX.sub("", str(function)) if function else str(frame.get("pc") or "?")
    line, source = frame.get("line"), frame.get("file")
    if source and type(line) is int:
        return f"{where} ({str(source).rsplit('/', 1)[-1]}:{line})"
    return f"{where} ({module})"


# A CPython interpreter's own file: its executable or its shared library.
_INTERPRETER = re.compile(r"^(python\d(\.\d+)?[a-z]*|libpython\d\.\d+[a-z]*\.so(\.[\d.]+)?)$")


def describe_found(found: dict) -> str:
    """The place of a capture (an EOF read, a connect()) in a few words, ''
    when it has none. A CPython process whose Python frames were not read
    (one started after the trace, at its first reads) has its place in the
    interpreter's own C code: an address there says nothing to the
    program's owner and reads like a bug in Python, so the line says what
    it is; the C stack and why the frames were not read are under -v. Not
    escaped."""
    where = found.get("place") if isinstance(found.get("place"), dict) else None
    if where is None:
        return ""
    module = str(where.get("module") or "").replace(" (deleted)", "").rsplit("/", 1)[-1]
    if not found.get("python") and found.get("python_not_read") and _INTERPRETER.match(module):
        return f"{module} (Python frames not read)"
    return describe_place(where)


def frame_line(f: dict) -> str:
    offset = f.get("offset")
    name = (f"{escape(f['function'])}+{offset:#x}"
            if f.get("function") and isinstance(offset, int) else escape(f.get("pc")))
    module = escape(str(f.get("module") or "?").rsplit("/", 1)[-1])
    note = f" ({escape(f['note'])})" if f.get("note") else ""
    if f.get("file") and type(f.get("line")) is int:
        module += f", {escape(str(f['file']).rsplit('/', 1)[-1])}:{f['line']}"
    return f"{name} ({module}) [{escape(f.get('method'))}]{note}"


def python_frame_line(f: dict, width: int = LINE) -> str:
    """A Python frame as a traceback names it, function (file:line), in at
    most width columns: a long file path is cut from the left (its end names
    the file; two holders' app.py stay apart), never the line."""
    line = f":{f['line']}" if type(f.get("line")) is int else ""
    function = textsafe.cut(escape(f.get("function") or "?"), max(8, width // 2))
    room = max(8, width - textsafe.width_of_escaped(function) - len(line) - 3)
    path = textsafe.cut_left(escape(f.get("file") or "?"), room)
    return f"{function} ({path}{line})"


def _place_text(found: dict) -> str:
    if isinstance(found.get("place"), dict):
        return escape(describe_found(found))
    if found.get("not_unwound"):
        return f"(not unwound: {escape(found['not_unwound'])})"
    return "(stack not unwound)"


def _stack_lines(found: dict, indent: str) -> list[str]:
    """-v: a capture's Python frames (a CPython program's), then its stack."""
    room = LINE - len(indent) - 4
    out = [f"{indent}    py {python_frame_line(f, room - 3)}"
           for f in (found.get("python") or [])[:16] if isinstance(f, dict)]
    if found.get("python_not_read"):
        out.extend(f"{indent}    {l}" for l in prose(
            f"Python frames: {escape(found['python_not_read'])}", room))
    return out + [f"{indent}    " + textsafe.cut(frame_line(f), room)
                  for f in (found.get("stack") or [])[:32] if isinstance(f, dict)]


# Linux's default ip_local_port_range: where a client's own port comes from
# (a recording from another host does not say what that host's range was).
EPHEMERAL_PORTS = (32768, 60999)
def side_of(r: dict) -> str:
    """'server' when the local port is a service's (it had a listener, or
    only the remote port looks ephemeral), 'client' when the local port is
    the ephemeral one of a connection this host made."""
    if isinstance(r.get("listener"), dict):
        return "server"
    def ephemeral(port):
        return type(port) is int and EPHEMERAL_PORTS[0] <= port <= EPHEMERAL_PORTS[1]
    if ephemeral(r.get("lport")) and not ephemeral(r.get("rport")):
        return "client"
    return "server"


def code_places(code) -> tuple:
    """(the EOF read, the connect()) a record's `code` holds, None for a
    place it does not: code_lines writes a line for each it holds, with or
    without -v."""
    if not isinstance(code, dict):
        return None, None
    read, opened = code.get("eof_read"), code.get("opened")
    return (read if isinstance(read, dict) else None,
            opened if isinstance(opened, dict) else None)


def code_lines(rec: dict, verbose: bool, shown: str = "") -> list[str]:
    """Where the socket was read to its end and where it was connect()ed:
    a line each (unless the diagnosis line just shown says it already), and
    with -v the stacks, or why a place is not known."""
    code = rec.get("code") if isinstance(rec.get("code"), dict) else {}
    read, opened = code_places(code)
    indent = " " * 9
    out: list[str] = []

    def say(text: str, always: bool) -> None:
        if verbose:
            out.extend(indent + l for l in prose(text, LINE - len(indent)))
        elif always:
            out.append(indent + textsafe.cut(text, LINE - len(indent)))

    if read is None:
        if verbose:             # said only with -v (not worth building otherwise)
            why = code.get("eof_read_unknown")
            say(f"EOF read: place not known: {escape(why)}" if why
                else "EOF read: none seen since the peer closed", False)
    else:
        place_text = _place_text(read)
        ago, at = _number(rec.get("ts")), _number(read.get("ts"))
        when = (f" {_duration(max(0.0, ago - at))} ago" if ago is not None and at is not None
                else "")
        holders = [o.get("pid") for o in rec.get("owners") or [] if isinstance(o, dict)]
        if holders and read.get("pid") not in holders:
            # The reader let go of its copy (closed it, or exited) and the
            # socket stays open in the processes that hold it now (a child
            # that inherited it): "never closed" would send the reader's
            # owner looking for a close() that is there. Its place is not
            # read then (its pid may be another process's by now).
            who = f"{escape(read.get('pid'))}/{escape(read.get('comm'))}"
            at_place = f" in {place_text}" if isinstance(read.get("place"), dict) else ""
            say(f"read EOF{at_place}{when} by {who}, which no longer holds it", True)
            if verbose and read.get("not_unwound"):
                out.extend(f"{indent}  {l}" for l in prose(
                    f"place not read: {escape(read['not_unwound'])}", LINE - len(indent) - 2))
        else:
            say(f"read EOF in {place_text}{when}, never closed",
                f"read EOF in {place_text}" not in shown)
        if verbose:
            out.extend(f"{indent}  {l}" for l in prose(
                f"by {escape(read.get('pid'))}/{escape(read.get('comm'))} thread "
                f"{escape(read.get('tid'))}, {_duration(read.get('after_s'))} after the peer "
                f"closed; {escape(read.get('stack_bytes'))} bytes of stack copied",
                LINE - len(indent) - 2))
            out.extend(_stack_lines(read, indent))
    if opened is not None:
        say(f"opened by {_place_text(opened)} (connect by {escape(opened.get('pid'))}/"
            f"{escape(opened.get('comm'))})", True)
        if verbose:
            out.extend(_stack_lines(opened, indent))
    elif verbose and code.get("opened_unknown") and side_of(rec) == "client":
        # (A server's accepted socket was never connect()ed here: nothing
        # to say of it.)
        say(f"connect(): place not known: {escape(code['opened_unknown'])}", False)
    return out


# The fields frame_line and python_frame_line read: a record's dicts may
# carry extra keys (tolerated, never capped), which are not kept.
_FRAME_SHOWN = ("pc", "function", "offset", "module", "method", "note", "file", "line")
_PY_FRAME_SHOWN = ("function", "file", "line")


def _only(value, keys):
    return {k: value[k] for k in keys if k in value} if isinstance(value, dict) else value


def _shown_frames(frames, keys) -> list:
    return ([_only(f, keys) for f in frames[:SHOWN_FRAMES]] if isinstance(frames, list)
            else frames)


def _shown_container(container):
    if isinstance(container, dict) and isinstance(container.get("id"), str):
        # -v shows the runtime and the id's first 12 characters.
        return {"runtime": container.get("runtime"), "id": container["id"][:12]}
    return container


def shown_process(rec: dict) -> dict:
    """What evidence_lines reads of a process record, and nothing more: its
    identity's shown keys, the threads' shown fields with the frames -v
    lists (SHOWN_FRAMES of each), the reasons stacks or Python frames were
    not read. evidence_lines shows the same from this as from the record."""
    out = {k: rec[k] for k in ("stacks_not_read", "python_not_read") if k in rec}
    ident = rec.get("identity")
    if isinstance(ident, dict):
        kept = out["identity"] = {k: ident[k] for k in SHOWN_IDENTITY if k in ident}
        if "container" in kept:
            kept["container"] = _shown_container(kept["container"])
        claim = kept.get("claimed")
        if isinstance(claim, dict):
            kept["claimed"] = _only(claim, ("container", "pod_uid", "unit", "under"))
            if "container" in kept["claimed"]:
                kept["claimed"]["container"] = _shown_container(claim["container"])
    elif "identity" in rec:
        out["identity"] = ident
    threads = rec.get("threads")
    if isinstance(threads, list):
        out["threads"] = [
            {k: t[k] for k in ("tid", "state", "syscall", "wchan") if k in t}
            | {k: _shown_frames(t[k], keys) for k, keys in
               (("python", _PY_FRAME_SHOWN), ("stack", _FRAME_SHOWN)) if k in t}
            if isinstance(t, dict) else t for t in threads[:SHOWN_THREADS]]
    elif "threads" in rec:
        out["threads"] = threads
    return out


def _size(value, depth: int = 0) -> int:
    """Bytes a kept process copy holds (its strings, dicts and lists; numbers
    are small or shared): bounded work, the copy being a few levels deep."""
    size = sys.getsizeof(value)
    if depth < 6:
        if isinstance(value, dict):
            size += sum(_size(v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            size += sum(_size(v, depth + 1) for v in value)
    return size


def evidence_lines(rec: dict, processes: dict) -> list[str]:
    """-v: who holds it, where they live, and where each thread waits (the
    last two from the holder's `process` record)."""
    out = []
    if age_source(rec, "age") == "estimated":
        # Why "~": the estimate and its bound (issue 9; tcp_info's clocks).
        high = _number(rec.get("age_max_s"))
        out.append(f"         age estimated: {_duration(rec.get('age_s'))} since the last ACK "
                   f"received" + (f", at most {_duration(high)} (since the last data received)"
                                  if high is not None else ""))
    elif age_source(rec, "age") == "range":
        out.extend("         " + l for l in prose(
            f"age: at least {_duration(rec.get('age_s'))}, at most "
            f"{_duration(rec.get('age_max_s'))} (keepalive: each probe's ACK renews the "
            f"ACK clock; the upper end is the last data received)", LINE - 9))
    for h in rec.get("owners") or []:      # the evidence refers to these by pid/fd
        if not isinstance(h, dict):
            continue
        process = processes.get(h.get("pid")) or {}
        ident = process.get("identity") or {}
        container = ident.get("container") if isinstance(ident.get("container"), dict) else None
        where = ", ".join(x for x in (
            f"user {escape(ident['user'])}" if ident.get("user") else "",
            f"{escape(container.get('runtime'))} {escape(str(container.get('id'))[:12])}"
            if container else "",
            f"pod {escape(ident['pod_uid'])}" if ident.get("pod_uid") else "",
            escape(ident.get("unit") or ""),
            _claim(ident.get("claimed")),
            f"netns {escape(ident['netns'])}" if ident.get("netns") else "") if x)
        cloexec = {True: " cloexec", False: " no-cloexec"}.get(h.get("cloexec"), "")
        out.append(f"         holder {who(h)} fd {escape(h.get('fd'))}{cloexec} "
                   f"[{escape(h.get('state'))}] ppid {escape(h.get('ppid'))}: "
                   f"{escape(h.get('cmdline') or h.get('comm'))}")
        if where:
            out.append(f"           {where}")
        for t in process.get("threads") or []:
            call = t.get("syscall") or ("running" if t.get("state") == "R" else "-")
            out.append(f"           thread {escape(t.get('tid'))} [{escape(t.get('state'))}] "
                       f"{escape(call)} wchan {escape(t.get('wchan') or '-')}")
            for f in (t.get("python") or [])[:8]:
                if isinstance(f, dict):
                    out.append(f"             py {python_frame_line(f, LINE - 16)}")
            for f in (t.get("stack") or [])[:8]:
                out.append(f"             {frame_line(f)}")
        if process.get("stacks_not_read") and process.get("threads"):
            out.append(f"           stacks not read: {escape(process['stacks_not_read'])}")
        if process.get("python_not_read"):
            out.append(f"           {escape(process['python_not_read'])}")
    if fds_not_listed(rec):
        out.append(f"         and {fds_not_listed(rec)} more fds on it, not listed")
    listener = rec.get("listener")
    if isinstance(listener, dict) and rec.get("owner_kind") == "accept_queue":
        unlisted = (f", {fds_not_listed(listener)} of its fds not listed"
                    if fds_not_listed(listener) else "")
        out.append(f"         listener {escape(listener.get('local'))} queue "
                   f"{escape(listener.get('accept_queue'))}/{escape(listener.get('backlog'))}"
                   f"{unlisted}")
    return out


# --all: short state names so that OLD>NEW stays narrow.
_SHORT = {"ESTABLISHED": "EST", "SYN_SENT": "SYNS", "SYN_RECV": "SYNR", "FIN_WAIT1": "FW1",
          "FIN_WAIT2": "FW2", "TIME_WAIT": "TW", "CLOSE": "CLO", "CLOSE_WAIT": "CW",
          "LAST_ACK": "LA", "LISTEN": "LIS", "CLOSING": "CLG", "NEW_SYN_RECV": "NSR"}


def histogram_lines(buckets: list[dict], width: int = 30,
                    empty: str = "(no socket left CLOSE_WAIT while tracing)") -> list[str]:
    rows = [b for b in buckets or [] if isinstance(b, dict)
            and all(isinstance(b.get(k), int) for k in ("from_us", "to_us", "count"))]
    if not rows:
        return [f"  {empty}"]
    peak = max(1, max(b["count"] for b in rows))
    lines = [f"  {'usecs':>21} : {'count':<8} distribution"]
    for b in rows:
        bar = "*" * max(1, round(b["count"] * width / peak))
        lines.append(f"  {b['from_us']:>10} -> {b['to_us'] - 1:<8} : {b['count']:<8} |{bar:<{width}}|")
    return lines


def slots_to_buckets(slots: list[int]) -> list[dict]:
    out = []
    for i, count in enumerate(slots):
        if count:
            low = 0 if i == 0 else 1 << (i - 1)
            out.append({"from_us": low, "to_us": 1 << i if i else 1, "count": count})
    return out


SUMMARY_COLUMNS = 80


def fit_lines(lines: list[str], columns: int = LINE) -> list[str]:
    """Lines (escaped) that fit `columns`: one wider is wrapped at spaces
    under its own indentation (a sentence), and what still does not fit
    (one word wider than the line: a long path) is cut with an ellipsis."""
    out = []
    for line in lines:
        if textsafe.width_of_escaped(line) <= columns:
            out.append(line)
            continue
        body = line.lstrip(" ")
        indent = " " * min(len(line) - len(body), columns // 2)
        for part in prose(body, columns - len(indent)):
            # A single word wider than the line (a path): both ends kept.
            out.append(indent + textsafe.cut_middle(part, columns - len(indent)))
    return out


def prose(text: str, columns: int = SUMMARY_COLUMNS) -> list[str]:
    """An already escaped sentence wrapped to `columns` terminal columns at
    spaces (counted as the terminal counts them: a wide character takes two),
    the lines after the first indented. An escape has no space in it, so a
    wrap never splits one; a single word wider than a line stays whole."""
    lines, line, used = [], "", 0
    for word in text.split(" "):
        w = textsafe.width_of_escaped(word)
        if line and used + 1 + w > columns:
            lines.append(line)
            line, used = "  " + word, 2 + w
        elif line:
            line, used = f"{line} {word}", used + 1 + w
        else:
            line, used = word, w
    lines.append(line)
    return [l.rstrip(" ") for l in lines]


def _oldest_first(entry: dict) -> tuple:
    age = entry.get("age_s")
    age = age if isinstance(age, (int, float)) and not isinstance(age, bool) else 0.0
    port = entry.get("lport"), entry.get("rport")
    return (-age, tuple(p if isinstance(p, int) else -1 for p in port))


def fds_not_listed(entry: dict) -> int:
    """How many fds on the socket of a record or lingering entry its owners
    leave out (owners_not_listed; 0 when absent, or not a count: a
    recording from elsewhere may carry anything there)."""
    unlisted = entry.get("owners_not_listed")
    return unlisted if type(unlisted) is int and unlisted > 0 else 0


def first_of_each_process(owners: list, limit: int) -> tuple[list[int], int]:
    """The indexes in owners of the first entry of each of its first
    `limit` processes, and how many processes are past them. An entry is
    one fd of one process: a process that dup()ed the socket is one holder
    however many fds it has, and its other fds must not push another
    process out. An entry without a pid is a holder of its own. (The
    summary's still-lingering lines and report's holders both name
    processes this way.)"""
    first, seen, past = [], set(), 0
    for i, o in enumerate(owners):
        pid = o.get("pid")
        who = pid if isinstance(pid, int) else ("entry", i)
        if who in seen:
            continue
        seen.add(who)
        if len(first) < limit:
            first.append(i)
        else:
            past += 1
    return first, past


def _more_holders(processes: int, fds: int) -> str:
    """' and N more ...' after the holders named (one fd of each process
    named): the processes not named, and the fds not named (theirs, the
    other fds of those named, and those the record did not list), each in
    its own unit; "" when nothing is left out."""
    def n(count: int, noun: str, plural: str) -> str:
        return f"{count} more {noun if count == 1 else plural}"
    if not fds:
        return ""
    if processes == fds:            # one fd each of the processes not named
        return " and " + n(processes, "process", "processes")
    if not processes:
        return " and " + n(fds, "fd", "fds")
    return f" and {n(processes, 'process', 'processes')}, {n(fds, 'fd', 'fds')} in all"


def summary_lines(rec: dict, renderer: Optional[TextRenderer] = None) -> list[str]:
    c = rec.get("counters") if isinstance(rec.get("counters"), dict) else {}
    n = {k: v if isinstance(v, int) else 0 for k, v in c.items()}
    lines = [""]
    lines += prose(
        f"Summary after {_duration(rec.get('traced_s'))}: "
        f"{n.get('cw_enter', 0)} entered CLOSE_WAIT, {n.get('cw_exit', 0)} left it "
        f"(timed), {escape(rec.get('linger_reported', 0))} reported lingering, "
        f"{escape(rec.get('closed_reported', 0))} closed after lingering.")
    problems = []
    if n.get("events_lost"):
        problems.append(f"{n['events_lost']} events lost (ring buffer full)")
    if n.get("map_full"):
        problems.append(f"{n['map_full']} sockets not timed (tracking map full)")
    if n.get("events_unread"):
        problems.append(f"{n['events_unread']} events not read (still in the buffer "
                        f"when the trace ended)")
    if n.get("transitions_skipped"):
        problems.append(f"{n['transitions_skipped']} state changes not seen (the kernel "
                        f"skipped the program: a BPF program was already running on that CPU)")
    if n.get("found_unseen"):
        problems.append(f"{n['found_unseen']} sockets found in CLOSE_WAIT by a rescan "
                        f"(their entry not seen; ages estimated)")
    over, most = n.get("untracked_over", 0), n.get("untracked_over_most", 0)
    if most > over:
        # Some went unfollowed earlier: said, even when none is now.
        problems.append(f"{over} sockets in CLOSE_WAIT not followed at the last look, "
                        f"{most} at most at one look (beyond --max-tracked untracked ones)")
    elif over:
        problems.append(f"{over} sockets in CLOSE_WAIT not followed "
                        f"(beyond --max-tracked untracked ones, at the last look)")
    if n.get("left_unseen"):
        problems.append(f"{n['left_unseen']} sockets found gone by a rescan "
                        f"(their leaving not seen: no CLOSED line)")
    if n.get("eof_map_full"):
        problems.append(f"{n['eof_map_full']} EOF reads not located (their map was full)")
    if n.get("eof_rate_limited"):
        problems.append(f"{n['eof_rate_limited']} EOF reads not located (over the capture "
                        f"rate: a sample was kept)")
    if n.get("open_map_full"):
        problems.append(f"{n['open_map_full']} connect()s not located (their map was full)")
    if n.get("open_rate_limited"):
        problems.append(f"{n['open_rate_limited']} connect()s not located (over the capture "
                        f"rate: a sample was kept)")
    if n.get("exec_new_full"):
        problems.append(f"{n['exec_new_full']} exec()s not looked at for CPython (their map "
                        f"was full): Python frames from those processes' second lingering "
                        f"socket on")
    if rec.get("write_errors"):
        problems.append(f"{escape(rec['write_errors'])} records could not be written")
    lines += prose("Losses: " + ("; ".join(problems) if problems else "none."))
    if n.get("exit_untracked"):
        # Not a loss: the kernel saw them leave, but not enter (they were in
        # CLOSE_WAIT before the trace began, or the map was full, said above).
        # The ones reported at the start and seen closing are listed again
        # below with their ages (estimate_lines): said here, so that the
        # two counts are not added up.
        aged = 0
        if renderer is not None:
            by = renderer.closed_by_source
            aged = min(n["exit_untracked"],
                       by.get("estimated", 0) + by.get("lower_bound", 0) + by.get("range", 0))
        again = f"; {aged} of them are counted again below, not timed" if aged else ""
        lines += prose(f"Untimed: {n['exit_untracked']} sockets left CLOSE_WAIT that were "
                       f"in it before tracing began (or not tracked){again}.")
    if isinstance(rec.get("symbolizer_problems"), dict) and rec["symbolizer_problems"]:
        # The counts are of lookups (a frame, or a module's first use), not
        # of processes: say the reason first and the count after it.
        lines += prose("Stack frames or modules left without symbols, by reason: " + "; ".join(
            f"{escape(reason)} ({escape(n)} time{'' if n == 1 else 's'})"
            for reason, n in sorted(rec["symbolizer_problems"].items())))
    lines.append("Time in CLOSE_WAIT, timed by the kernel (log2 histogram):")
    lines.extend(histogram_lines(rec.get("histogram_us")))
    if renderer is not None:
        lines.extend(estimate_lines(renderer.closed_by_source, renderer.estimated_us,
                                    shown_only=renderer.replay is not None))
    still = [s for s in rec.get("still_lingering") or [] if isinstance(s, dict)]
    hidden = 0
    if renderer is not None and renderer.replay is not None:
        kept = [s for s in still if renderer.replay.keep_entry(s)]
        hidden, still = len(still) - len(kept), kept
    lines += prose(f"Still lingering at exit: {len(still)}"
                   + (f" shown ({hidden} more not matching the replay's filters)" if hidden else ""))
    # Oldest first, as snapshot lists them: the 50 shown are the oldest,
    # not the first 50 of a table's order (top's exit listed them shuffled).
    still.sort(key=_oldest_first)
    for s in still[:50]:
        listed = [o for o in s.get("owners") or [] if isinstance(o, dict)]
        # A few holders by name, the rest counted: a socket shared by
        # thousands of forks is one line, not 100 KB of one. Processes are
        # named, one fd each: a process's dup()s are not other holders.
        first, past = first_of_each_process(listed, MAX_OWNERS_NAMED)
        owners = ", ".join(f"{who(o)} fd {escape(o.get('fd'))} [{escape(o.get('state'))}]"
                           for o in (listed[i] for i in first)) or (
            "(not accepted)" if s.get("owner_kind") == "accept_queue" else "-")
        # The fds not named: those listed, and those not listed.
        owners += _more_holders(past, len(listed) - len(first) + fds_not_listed(s))
        lines.append(f"  {hostport(s.get('laddr'), s.get('lport'))} <- "
                     f"{hostport(s.get('raddr'), s.get('rport'))} {age_text(s, 'age')} {owners}")
    if len(still) > 50:
        lines.append(f"  ... and {len(still) - 50} more (see --json)")
    return lines


def estimate_lines(by_source: dict, estimated_slots: list[int],
                   shown_only: bool = False) -> list[str]:
    """Durations the kernel did not time (sockets already in CLOSE_WAIT when
    tracing began), kept apart from the histogram of timed ones; counted
    from the CLOSED lines (in a replay: those shown)."""
    est, low = by_source.get("estimated", 0), by_source.get("lower_bound", 0)
    ranged = by_source.get("range", 0)
    lines = []
    shown = " shown" if shown_only else ""
    if est:
        lines += [f"Estimated, not timed: {est} socket(s){shown} closed, already in CLOSE_WAIT",
                  "  at start (age from tcp_info), after:"]
        lines.extend(histogram_lines(slots_to_buckets(estimated_slots)))
    if low:
        lines += [f"Lower bounds only: {low} socket(s){shown} closed, already in CLOSE_WAIT at",
                  "  start with no estimate; not in any histogram."]
    if ranged:
        lines += [f"Ranges only: {ranged} socket(s){shown} closed, already in CLOSE_WAIT at",
                  "  start with keepalive on (age between two bounds); not in any histogram."]
    return lines
