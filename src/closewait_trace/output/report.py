"""Postmortem report over recordings (pure): what to fix. Sockets that
lingered in CLOSE_WAIT grouped by cause, by program (command and executable:
the children of one server fold into one row), by systemd unit, container
and pod where known, by local port, by peer or by pid; the cause in each
row; the duration histograms (timed by the kernel, and estimated, kept
apart); a timeline of lingering sockets; what was still lingering at the
end; and every gap or loss in the capture.

build() consumes records one at a time (any iterable, e.g. a streaming
reader) and keeps per socket only what the groupings need while it
lingers, then folds it into the aggregates when it closes.

Its state is bounded whatever the recording (a crafted file of 400,000
distinct sockets in 15 MB of gzip must not take gigabytes): the MAX_*
figures below cap what is kept, and whatever goes past a cap is counted and
said in the report's losses, never dropped silently. Work per record is
bounded by the record (its strings are capped by schema.cap, its holders
here), so time is linear in the input. README, Security, states the
resulting memory bound and the test that holds it.
"""

from __future__ import annotations

import heapq
import datetime as _dt
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from closewait_trace.output import fold, textsafe
from closewait_trace.output.render import (LINE, age_source, describe_found, fds_not_listed,
                                           first_of_each_process, fit_lines, marked_age,
                                           histogram_lines, hostport, side_of,
                                           slots_to_buckets)
from closewait_trace.output.textsafe import escape
from closewait_trace.sockets import identity

# Bounds of the report's state (see the module docstring).
MAX_LINGERING = 10_000    # sockets followed at once while they linger
MAX_ROWS = 1_000          # rows per table; sockets of later keys fold into one row
MAX_NAMES = 8             # causes / programs named per row; the rest folded
MAX_PIDS = 64             # distinct processes counted per row (past it: "at least")
MAX_PROCESSES = 20_000    # process identities remembered (the oldest forgotten)
MAX_HOLDERS = 4           # holder processes kept per socket (the rest counted)
MAX_STILL = 1_000         # sockets still lingering at the end that are listed
MAX_CAPTURES = 100        # captures listed (one per header of a new capture id)
MAX_LOSS_RECORDS = 100    # lost records listed (all are summed)
MAX_HIST_SLOTS = 128      # histogram slots (a log2 histogram has 64)
MAX_BEFORE = 100_000      # report --since: sockets reported before it remembered
MAX_LABEL = 256           # characters of a name the report keeps (cut, marked)
TIMELINE_SLOTS = 4096     # resolution of the timeline: its span / 2048 or finer
OTHER = "(other)"
CUT = " [...]"

GROUPINGS = ("cause", "program", "code", "unit", "container", "pod", "port", "peer", "pid")
# Without --by: these, code/unit/container/pod only when some socket has one.
DEFAULT_GROUPINGS = ("cause", "program", "code", "unit", "container", "pod", "port", "peer")
_OPTIONAL = ("unit", "container", "pod")
# The groupings whose rows are people's: a holder's row, and the row of a
# socket no holder is known of.
_PERSONAL = {"program": lambda p: p["program_key"], "pid": lambda p: (p["pid"], p["comm"]),
             "unit": lambda p: p["unit"] or "(not known)",
             "container": lambda p: p["container"] or "(not known)",
             "pod": lambda p: p["pod"] or "(not known)"}
_NOBODY = {"program": (("none",), "(unknown)"), "pid": (None, "(unknown)"),
           "unit": "(not known)", "container": "(not known)", "pod": "(not known)"}
# --by code: sockets whose place is not known, in two rows.
NO_EOF_SEEN = "(no EOF read seen)"
PLACE_NOT_KNOWN = "(not known)"

TITLES = {
    "cause": "By cause (why they were not closed)",
    "program": "By program (the holders that never closed; children of one server folded)",
    "code": "By code location (where the holder read EOF and never closed, else where "
            "it opened the connection)",
    "unit": "By systemd unit",
    "container": "By container",
    "pod": "By Kubernetes pod",
    "port": "By local port (a client's ephemeral ports as one row)",
    "peer": "By remote peer (host:port a client used; host:* for a server's clients)",
    "pid": "By process",
}
EPHEMERAL = "(ephemeral)"
MAX_CMDLINE_SHOWN = 120     # characters of a command line in --by pid


def code_key(r: dict) -> str:
    """The function that read the socket's end ('handle_client (app)'),
    else the one that connect()ed it ('opened by fetch_user (app)'), or why
    there is none, from a linger record's `code`."""
    code = r.get("code") if isinstance(r.get("code"), dict) else {}
    read = code.get("eof_read") if isinstance(code.get("eof_read"), dict) else None
    if read is None:
        opened = code.get("opened") if isinstance(code.get("opened"), dict) else None
        if opened is not None and isinstance(opened.get("place"), dict):
            # Never read to its end: where it was opened is the lead.
            return "opened by " + _site(opened)
        return NO_EOF_SEEN if code and code.get("eof_read_unknown") is None else PLACE_NOT_KNOWN
    return _site(read) if isinstance(read.get("place"), dict) else "(stack not unwound)"


def _site(found: dict) -> str:
    """A capture's place with the file that holds it: a function and a
    source line are the program's own words (anyone can name a function
    handle_client and claim srv.c:12); the mapped file's path is not, so
    rows of different programs never merge."""
    module = str(found["place"].get("module") or "?").replace(" (deleted)", "")
    return f"{describe_found(found)} in {module}"


def peer_key(info: dict) -> str:
    """host:port of the remote service for a client's socket; host:* for a
    server's (its clients' ports are ephemeral: one row per host)."""
    host = str(info.get("raddr"))
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{info.get('rport')}" if info.get("side") == "client" else f"{host}:*"


# The columns of each "By ..." table, each a header and the fields of the
# table's rows (the rows of --json's by_<grouping>) its cell shows: the
# text and the JSON are one table. The first column names the row, the last
# gives the other dimension (a cause's programs, any other row's causes).
# tests/unit/test_columns.py checks each field is in every row and that the
# cell under each header changes with its field.
LABELS = {"cause": "CAUSE", "program": "PROGRAM", "code": "CODE LOCATION", "unit": "UNIT", "container": "CONTAINER",
          "pod": "POD", "port": "PORT", "peer": "PEER", "pid": "PID/COMMAND"}
NAME_FIELDS = {"pid": ("pid", "comm", "cmdline"), "program": ("program", "processes")}
COUNT_COLUMN = ("SOCKETS", ("count", "estimated", "lower_bound"))
TOTAL_COLUMN = ("TOTAL", ("total_s",))
LONGEST_COLUMN = ("LONGEST", ("longest_s", "longest_source"))


def table_columns(grouping: str) -> tuple:
    """(header, fields) of each column of a grouping's table, in order."""
    name = (LABELS[grouping], NAME_FIELDS.get(grouping, (grouping,)))
    last = ("PROGRAMS", ("programs",)) if grouping == "cause" else ("CAUSE", ("causes",))
    return (name, COUNT_COLUMN, TOTAL_COLUMN, LONGEST_COLUMN, last)


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _key(rec: dict) -> tuple:
    key = (rec.get("family"), rec.get("laddr"), rec.get("lport"), rec.get("raddr"),
           rec.get("rport"))
    hash(key)          # a list where an address belongs: TypeError, the record is skipped
    return key


def _label(value):
    """A name kept by the report: at most MAX_LABEL characters, cut marked."""
    if isinstance(value, str) and len(value) > MAX_LABEL + len(CUT):
        return value[:MAX_LABEL] + CUT
    return value


def _bump(counter: Counter, name, n: int = 1) -> None:
    """counter[name] += n, with at most MAX_NAMES names and OTHER."""
    if name in counter or len(counter) < MAX_NAMES:
        counter[name] += n
    else:
        counter[OTHER] += n


class _Timeline:
    """Sockets entering and leaving, counted in TIMELINE_SLOTS equal slots
    over a span that doubles whenever a time falls past it: bounded memory,
    whatever the number of sockets. The start of the first capture anchors
    the span; an entry before it (a socket already lingering) is counted as
    lingering from the start."""

    def __init__(self):
        self.lo: Optional[float] = None
        self.width = 0.01
        self.enter = [0] * TIMELINE_SLOTS
        self.leave = [0] * TIMELINE_SLOTS
        self.enter_before = 0
        self.leave_before = 0

    def anchor(self, t: float) -> None:
        if self.lo is None:
            self.lo = t
            return
        while t < self.lo:          # a capture read later that started earlier
            half = TIMELINE_SLOTS // 2
            for arr in (self.enter, self.leave):
                merged = [arr[2 * j] + arr[2 * j + 1] for j in range(half)]
                arr[:] = [0] * half + merged
            self.lo -= self.width * TIMELINE_SLOTS
            self.width *= 2

    def _slot(self, t: float) -> Optional[int]:
        if self.lo is None:
            self.anchor(t)
        if t < self.lo:
            return None
        while t >= self.lo + self.width * TIMELINE_SLOTS:
            for arr in (self.enter, self.leave):
                arr[:] = [arr[2 * j] + arr[2 * j + 1] for j in range(TIMELINE_SLOTS // 2)] \
                    + [0] * (TIMELINE_SLOTS // 2)
            self.width *= 2
        return min(TIMELINE_SLOTS - 1, int((t - self.lo) / self.width))

    def add(self, entered: float, ended: float) -> None:
        i = self._slot(entered)
        if i is None:
            self.enter_before += 1
        else:
            self.enter[i] += 1
        if math.isfinite(ended):
            j = self._slot(ended)
            if j is None:
                self.leave_before += 1
            else:
                self.leave[j] += 1

    def counts_at(self, points: list[float]) -> list[int]:
        """Sockets lingering at each time (entered at or before it, in the
        resolution of a slot, and not yet left)."""
        inside = self.enter_before - self.leave_before
        cumulative = []
        for a, b in zip(self.enter, self.leave):
            inside += a - b
            cumulative.append(inside)
        out = []
        for at in points:
            if self.lo is None or at < self.lo:
                out.append(max(0, self.enter_before - self.leave_before))
                continue
            i = min(TIMELINE_SLOTS - 1, int((at - self.lo) / self.width))
            out.append(max(0, cumulative[i]))
        return out


@dataclass(slots=True)
class Sock:
    """What the report keeps of one socket while it lingers."""
    info: dict                  # slim: addresses, owners, cause, summary, identities
    entered: float              # wall time it entered CLOSE_WAIT (or a bound)
    duration: float = 0.0       # seconds in CLOSE_WAIT (so far, when still open)
    source: str = "traced"      # traced | estimated | lower_bound
    closed: bool = False


@dataclass
class Group:
    count: int = 0
    total_s: float = 0.0
    longest_s: float = 0.0
    longest_source: str = "traced"
    by_source: Counter = field(default_factory=Counter)
    causes: Counter = field(default_factory=Counter)       # at most MAX_NAMES + OTHER
    programs: Counter = field(default_factory=Counter)     # at most MAX_NAMES + OTHER
    pids: set = field(default_factory=set)                 # at most MAX_PIDS
    more_pids: bool = False
    still_held: int = 0                                    # not closed at the end

    def add(self, s: Sock, people: list) -> None:
        """people: the socket's holders that put it in this row (_rows)."""
        self.count += 1
        self.still_held += not s.closed
        self.total_s += s.duration
        if s.duration >= self.longest_s:
            self.longest_s, self.longest_source = s.duration, s.source
        self.by_source[s.source] += 1
        _bump(self.causes, s.info["cause"])
        for name in {p["program"] for p in people}:
            _bump(self.programs, name)
        for pid in {p["pid"] for p in people if p["pid"] is not None}:
            if len(self.pids) < MAX_PIDS:
                self.pids.add(pid)
            elif pid not in self.pids:
                self.more_pids = True

    def as_dict(self) -> dict:
        row = {"count": self.count, "total_s": round(self.total_s, 3),
               "longest_s": round(self.longest_s, 3), "longest_source": self.longest_source,
               "estimated": self.by_source.get("estimated", 0),
               "lower_bound": self.by_source.get("lower_bound", 0),
               "causes": dict(self.causes.most_common()),
               "processes": len(self.pids), "still_held": self.still_held}
        if self.more_pids:
            row["processes_at_least"] = True     # more than MAX_PIDS distinct
        return row


def _hist_slots(hist: list) -> dict:
    out: dict = {}
    for b in hist:
        if isinstance(b, dict) and all(isinstance(b.get(x), int) and not isinstance(b.get(x), bool)
                                       for x in ("from_us", "to_us", "count")):
            slot = (b["from_us"], b["to_us"])
            out[slot] = out.get(slot, 0) + b["count"]
    return out


class _Builder:
    def __init__(self, by: Iterable[str], timeline_buckets: int,
                 since: Optional[float] = None, until: Optional[float] = None):
        self.by = tuple(by)
        # The window (report --since/--until): records outside it are not
        # counted, nor the sockets reported before it; the kernel's
        # histogram is the difference of its nearest states.
        self.since, self.until = since, until
        self.windowed = since is not None or until is not None
        self.before: set = set()                 # keys reported before `since`
        self.hist_before = None                  # the capture's histogram at `since`
        self.hist_span = [None, None]            # the states the difference is between
        self.outside = 0                         # captures wholly outside the window
        self.any_last: Optional[float] = None    # the capture's last record, in or out
        self.timeline_buckets = timeline_buckets
        self.captures: list[dict] = []
        self.lingers: dict[tuple, Sock] = {}
        # Sockets still lingering when a capture ended, kept until the next
        # capture says whether they are the same (a socket reported again as
        # older than the trace, on the same host): one socket counted once,
        # not once per capture (two back-to-back captures doubled the count).
        self.carried: dict[tuple, Sock] = {}
        self.carried_host = None
        self.histogram: dict = {}
        self.estimated_us = [0] * 64
        self.durations = Counter()              # by source, every socket counted
        self.losses: list[dict] = []
        self.current = None
        self.capture_hist = None
        self.last_ts: Optional[float] = None
        self.clean = False
        self.write_errors = 0
        self.sockets = 0
        self.still: list = []                    # heap of (-entered, n, Sock): the oldest kept
        self.still_total = 0
        self.groups = {g: {} for g in GROUPINGS}
        self.identity: dict = {}                 # pid -> (unit, container, pod, exe)
        # By program, the forks of one server are one row: output/fold.py,
        # from the process records' parent, uid and exe (as snapshot and
        # top fold them), never from a name.
        self.fold = fold.Fold(MAX_PROCESSES)
        self.timeline = _Timeline()
        self.unusable = 0
        self.lost_total = {"events_lost": 0, "map_full": 0, "events_unread": 0,
                           "transitions_skipped": 0}
        # Places the kernel did not keep (captures over their rate, or a
        # full map), from each capture's summary: not sockets lost, but
        # sockets the report cannot place (its "(not known)" rows).
        self.places_not_kept = {k: 0 for k in PLACE_COUNTERS}
        self.lost_listed = 0
        # What went past a cap, counted: said in the report's losses.
        self.folded = Counter()
        self.captures_seen = 0

    # -------------------------------------------------- reading

    def feed(self, r: dict) -> None:
        try:
            self._feed(r)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            # A recording validated upstream should not get here; if one does,
            # its odd record is counted, never fatal.
            self.unusable += 1

    def _feed(self, r: dict) -> None:
        kind = r.get("type")
        ts = _number(r.get("ts", r.get("start_ts")))
        if kind == "header":
            if self.current is None or r.get("capture_id") != self.current["id"]:
                self.close_capture()
                if self.carried and self.carried_host != _label(r.get("hostname")):
                    self._settle_carried()          # another host: not the same sockets
                self.clean = False
                start = _number(r.get("start_ts"))
                if start is not None:
                    self.timeline.anchor(start)
                self.current = {"id": _label(r.get("capture_id")), "start": start,
                                "hostname": _label(r.get("hostname"))}
                if self.windowed:
                    self.any_last, self.hist_before = None, None
            return
        if kind == "process":
            self._note_process(r)           # identities are needed whenever they were read
        if self.windowed and ts is not None:
            self.any_last = ts if self.any_last is None else max(self.any_last, ts)
            if self._outside(r, kind, ts):
                return
        if ts is not None:
            self.last_ts = ts
        if kind == "linger":
            self._linger(r, ts)
        elif kind == "closed":
            self._closed(r, ts)
        elif kind == "lost":
            what = _label(str(r.get("counter")))
            count = r.get("count") if isinstance(r.get("count"), int) else 0
            # events_unread is summed from the summary, which repeats it.
            if what in self.lost_total and what != "events_unread":
                self.lost_total[what] += count
            if len(self.losses) < MAX_LOSS_RECORDS:
                self.losses.append({"ts": ts, "what": what, "count": count})
            else:
                self.folded["lost_records"] += 1
        elif kind in ("snapshot", "summary"):
            self._state(r, ts, r.get("still_lingering", r.get("lingering")) or [])
            if kind == "summary":
                self.clean = True
                counters = r.get("counters") if isinstance(r.get("counters"), dict) else {}
                unread = counters.get("events_unread")
                if isinstance(unread, int) and not isinstance(unread, bool) and unread > 0:
                    self.lost_total["events_unread"] += unread
                for name in PLACE_COUNTERS:
                    value = counters.get(name)
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                        self.places_not_kept[name] += value
                we = r.get("write_errors")
                self.write_errors += we if isinstance(we, int) else 0

    def _outside(self, r: dict, kind, ts: float) -> bool:
        """True: the record is outside the window and not counted (what it
        says of the window's edges is noted)."""
        if self.until is not None and ts > self.until:
            if kind == "summary":
                self.clean = True               # the capture did end cleanly, later
            return True
        if self.since is not None and ts < self.since:
            if kind == "linger" and not r.get("update"):
                if len(self.before) < MAX_BEFORE:
                    self.before.add(_key(r))
                else:
                    self.folded["before"] += 1
            elif kind == "closed":
                self.before.discard(_key(r))
            elif kind in ("snapshot", "summary") and isinstance(r.get("histogram_us"), list):
                self.hist_before = r["histogram_us"][:MAX_HIST_SLOTS]
                self.hist_span[0] = ts
            return True
        if kind in ("linger", "closed") and _key(r) in self.before:
            if kind == "closed":
                self.before.discard(_key(r))
            return True                         # it lingered before the window
        if kind == "closed" and _key(r) not in self.lingers and self.since is not None:
            # Its linger record was not seen (a part rotated away): counted
            # only if it entered CLOSE_WAIT within the window.
            return ts - (_number(r.get("duration_s")) or 0.0) < self.since
        return False

    def _before_window(self, e: dict, ts: Optional[float]) -> bool:
        """A state's entry that lingered before the window (not counted)."""
        if not self.windowed or self.since is None:
            return False
        k = _key(e)
        if k in self.before:
            return True
        return k not in self.lingers and (ts or 0.0) - (_number(e.get("age_s")) or 0.0) < self.since

    def _note_process(self, r: dict) -> None:
        pid = r.get("pid")
        if not isinstance(pid, int):
            return
        ident = r.get("identity") if isinstance(r.get("identity"), dict) else {}
        # Decided again from the cgroup path: a recording's own fields may
        # come from a name a user chose (issue 17 §2).
        found = identity.attribution(ident)
        container = found["container"]
        if pid not in self.identity and len(self.identity) >= MAX_PROCESSES:
            # The oldest identity is forgotten (dicts keep insertion order).
            del self.identity[next(iter(self.identity))]
            self.folded["processes"] += 1
        self.identity.pop(pid, None)
        exe = identity.program_label(ident.get("exe"))
        self.identity[pid] = {
            # What the fold needs, taken when the process is a holder
            # (_people): a listener's parent, not holding anything, is not
            # a fork of a server in snapshot's or top's fold either.
            "fold": (r.get("ppid"), ident.get("uid"), exe),
            "unit": _label(found["unit"]),
            "container": (_label(f"{container.get('runtime')} {str(container.get('id'))[:12]}")
                          if container else None),
            "pod": _label(found["pod_uid"]),
            "exe": _label(exe),
            "cmdline": _label(r["cmdline"][:MAX_CMDLINE_SHOWN])
            if isinstance(r.get("cmdline"), str) else None,
            "script": _label(identity.script_of(
                (ident.get("exe") or {}).get("path") if isinstance(ident.get("exe"), dict)
                else None, r.get("cmdline"))),
        }

    def _people(self, r: dict) -> tuple[list[dict], tuple[int, int]]:
        """Who kept it open: its holders, or, never accepted, the listener's
        (the first MAX_HOLDERS processes, one person each), and what was
        left out of them: (processes, fds the record did not list), counted
        when the socket is (_account)."""
        owners = [o for o in r.get("owners") or [] if isinstance(o, dict)]
        listening = False
        unlisted = fds_not_listed(r)
        if not owners and isinstance(r.get("listener"), dict):
            owners = [o for o in r["listener"].get("owners") or [] if isinstance(o, dict)]
            unlisted = fds_not_listed(r["listener"])
            listening = True
        first, past = first_of_each_process(owners, MAX_HOLDERS)
        people = []
        for o in (owners[i] for i in first):
            pid = o.get("pid") if isinstance(o.get("pid"), int) else None
            ident = self.identity.get(pid, {})
            comm = _label(str(o.get("comm", "?")))
            # The program is the executable the kernel names, never argv[0]
            # (which a process sets to anything); none recorded: unknown.
            program = f"{comm} [{ident.get('exe') or 'program unknown'}]"
            if ident.get("script"):
                # An interpreter's services apart: by the script it runs
                # (from its command line, so a label, not an identity).
                program += f" {ident['script']}"
            if listening:
                program += " (listener, not accepting)"
            # The row by program: the fold of the process (its server's
            # forks together, fold.py) and what the label adds (the script,
            # a listener's): never merged by the label alone.
            if pid is not None:
                facts = ident.get("fold")
                own = (o.get("ppid"), o.get("uid"))
                if facts is None or (None not in own and own != facts[:2]):
                    # No process record (more than 256 holders in its
                    # batch), or one of another process that had this pid
                    # (the holder's own parent and uid say otherwise): the
                    # holder's own parent and uid, its comm for the exe.
                    self.fold.add(pid, own[0], own[1], None, o.get("comm"))
                else:
                    self.fold.add(pid, *facts)
            server = self.fold.key(pid) if pid is not None else ("pid", None)
            people.append({"pid": pid, "comm": comm + (" (not accepting)" if listening else ""),
                           "fd": o.get("fd"), "program": program,
                           "program_key": (server, program),
                           "unit": ident.get("unit"), "container": ident.get("container"),
                           "pod": ident.get("pod")})
        return people, (past, unlisted)

    def _slim(self, r: dict) -> dict:
        d = r.get("diagnosis") if isinstance(r.get("diagnosis"), dict) else {}
        cause = d.get("cause") if isinstance(d.get("cause"), str) else None
        if cause is None:
            cause = "unknown"
        owners = [o for o in r.get("owners") or [] if isinstance(o, dict)]
        # Listed: the first fd of each of its first MAX_HOLDERS processes,
        # then, in the slots left, more of their fds; those left out are
        # fds on it not listed, added to the record's own count.
        first, _ = first_of_each_process(owners, MAX_HOLDERS)
        taken = set(first)
        more = (i for i in range(len(owners)) if i not in taken)
        shown = sorted(first + list(itertools.islice(more, MAX_HOLDERS - len(first))))
        unlisted = fds_not_listed(r) + len(owners) - len(shown)
        people, cut = self._people(r)
        return {"family": r.get("family"), "laddr": _label(r.get("laddr")),
                "code": _label(code_key(r)),
                "lport": r.get("lport"), "raddr": _label(r.get("raddr")),
                "rport": r.get("rport"), "side": side_of(r),
                "owner_kind": _label(r.get("owner_kind")), "owners": [
                    {k: _label(o.get(k)) for k in ("pid", "comm", "fd", "state")}
                    for o in (owners[i] for i in shown)],
                **({"owners_not_listed": unlisted} if unlisted else {}),
                "cause": _label(cause),
                "summary": _label(d.get("summary")) if isinstance(d.get("summary"), str) else "",
                "people": people, "cut": cut}

    def _follow(self, key: tuple, sock: Sock) -> None:
        """Follow a lingering socket until it closes, within MAX_LINGERING:
        past it, the socket is counted as folded and known only from its
        close record, if one comes."""
        if key in self.lingers or len(self.lingers) < MAX_LINGERING:
            self.lingers[key] = sock
        else:
            self.folded["lingering"] += 1

    def _linger(self, r: dict, ts: Optional[float]) -> None:
        age = _number(r.get("age_s")) or 0.0
        key = _key(r)
        known = self.lingers.get(key)
        if known is not None and r.get("update"):
            # A CHANGE: the cause that kept it when it crossed the threshold
            # stays, unless nothing was known then.
            if known.info["cause"] in ("unknown", "gone") or not known.info["people"]:
                known.info = self._slim(r)
            known.duration = max(known.duration, age)
            return
        carried = self.carried.pop(key, None) if r.get("pre_existing") else None
        if carried is not None:
            # Still lingering when the last capture ended, and older than this
            # one: the same socket, followed on (its first cause and entry
            # kept, its age the larger).
            carried.duration = max(carried.duration, age)
            self._follow(key, carried)
            return
        if key not in self.lingers and len(self.lingers) >= MAX_LINGERING:
            self.folded["lingering"] += 1         # before any work on it
            return
        self._follow(key, Sock(info=self._slim(r), entered=(ts or 0.0) - age,
                               duration=age, source=_source(r, "age")))

    def _closed(self, r: dict, ts: Optional[float]) -> None:
        duration = _number(r.get("duration_s")) or 0.0
        s = self.lingers.pop(_key(r), None)
        if s is None and r.get("pre_existing"):
            # Lingering when the capture before ended, closed in this one
            # before it was reported again: the same socket.
            s = self.carried.pop(_key(r), None)
            if s is not None:
                duration = max(duration, s.duration)
        if s is None:
            s = Sock(info=self._slim(r), entered=(ts or 0.0) - duration)
            if r.get("closed_by") and isinstance(r["closed_by"], dict) and not s.info["people"]:
                s.info["people"] = self._people({"owners": [r["closed_by"]]})[0]
        s.duration = duration
        s.source = _source(r, "duration")
        s.closed = True
        self._account(s)

    def _state(self, r: dict, ts: Optional[float], entries) -> None:
        hist = r.get("histogram_us")
        if isinstance(hist, list):
            self.capture_hist = hist[:MAX_HIST_SLOTS]
            self.hist_span[1] = ts
        for e in entries:
            if not isinstance(e, dict) or self._before_window(e, ts):
                continue
            k = _key(e)
            age = _number(e.get("age_s"))
            if k in self.lingers:
                if age is not None:
                    self.lingers[k].duration = age
            elif ts is not None and len(self.lingers) < MAX_LINGERING:
                # Known only from the state: its linger record is in a part
                # rotated away, or it was never reported.
                self._follow(k, Sock(info=self._slim(e), entered=ts - (age or 0.0),
                                     duration=age or 0.0, source=_source(e, "age")))
            elif ts is not None:
                self.folded["lingering"] += 1

    def _settle_carried(self) -> None:
        """Count the sockets still lingering at a capture's end that the next
        capture did not follow: lingering at the end, for all we know."""
        for s in self.carried.values():
            self._account(s)
            # The oldest MAX_STILL are listed (a heap on the entry time),
            # the others counted.
            self.still_total += 1
            item = (-s.entered, self.still_total, s)
            if len(self.still) < MAX_STILL:
                heapq.heappush(self.still, item)
            else:
                heapq.heappushpop(self.still, item)
        self.carried = {}

    def close_capture(self) -> None:
        start = self.current["start"] if self.current is not None else None
        if self.windowed and self.current is not None:
            # The capture's part in the window: a socket still lingering at
            # its end lingered at least until then.
            end = self.any_last
            if end is not None and self.until is not None:
                end = min(end, self.until)
            if start is not None and self.since is not None:
                start = max(start, self.since)
            self.last_ts = end
            if end is None or (start is not None and end < start):
                self.outside += 1
                self.lingers.clear()
                self.capture_hist = self.hist_before = None
                self.current = None
                return
        # Those carried from the capture before and not seen again in this
        # one (closed in between, or not reported again): as they were.
        self._settle_carried()
        for s in self.lingers.values():
            if self.last_ts is not None:
                s.duration = max(s.duration, self.last_ts - s.entered)
        self.carried, self.lingers = self.lingers, {}
        self.carried_host = self.current["hostname"] if self.current is not None else None
        if self.current is not None:
            self.captures_seen += 1
            if len(self.captures) < MAX_CAPTURES:
                self.captures.append({"capture_id": self.current["id"],
                                      "hostname": self.current["hostname"],
                                      "start_ts": start,
                                      "end_ts": self.last_ts, "clean_end": self.clean})
            else:
                self.folded["captures"] += 1
                self.folded["unclean_captures"] += not self.clean
            # The kernel's histogram counts from the capture's start: in a
            # window, what it had counted at the window's start is taken off.
            before = _hist_slots(self.hist_before or [])
            for slot, count in _hist_slots(self.capture_hist or []).items():
                count -= before.get(slot, 0)
                if count <= 0:
                    continue
                if slot in self.histogram or len(self.histogram) < MAX_HIST_SLOTS:
                    self.histogram[slot] = self.histogram.get(slot, 0) + count
                else:
                    self.folded["histogram"] += count
        self.capture_hist = None
        self.hist_before = None

    # -------------------------------------------------- aggregating

    def _rows(self, grouping: str, s: Sock) -> dict:
        """The socket's rows in a grouping, each with the people who put it
        there, whose pids and programs the row counts: in a row keyed by a
        person (program, pid, unit, container, pod) only those of the
        people it is keyed by (program A's row counting B's holder as one
        of A's processes, or a unit's row another unit's programs, would
        be false); in any other row every holder of the socket."""
        people = s.info["people"]
        if grouping in _PERSONAL:
            rows: dict = {}
            for p in people:
                rows.setdefault(_PERSONAL[grouping](p), []).append(p)
            return rows or {_NOBODY[grouping]: []}
        if grouping == "cause":
            key = s.info["cause"]
        elif grouping == "port":
            # A client's local port is ephemeral: all of them one row.
            key = EPHEMERAL if s.info.get("side") == "client" else s.info["lport"]
        elif grouping == "peer":
            key = peer_key(s.info)
        elif grouping == "code":
            key = s.info.get("code") or PLACE_NOT_KNOWN
        else:
            raise ValueError(grouping)
        return {key: people}

    def _account(self, s: Sock) -> None:
        self.sockets += 1
        self.durations[s.source] += 1
        if s.source == "estimated":
            self.estimated_us[min(63, int(max(0.0, s.duration) * 1e6).bit_length())] += 1
        # What its holders left out, once per socket counted (a CHANGE
        # that replaces what is known of it is the same socket).
        for kind, n in zip(("holders", "holder_fds"), s.info.get("cut", (0, 0))):
            if n:
                self.folded[kind] += n
        for g in self.by:
            groups = self.groups[g]
            folded = False
            for k, people in self._rows(g, s).items():
                group = groups.get(k)
                if group is None:
                    if len(groups) >= MAX_ROWS:
                        k, folded = OTHER, True
                        group = groups.get(k)
                    if group is None:
                        group = groups[k] = Group()
                group.add(s, people)
            if folded:
                self.folded[f"rows:{g}"] += 1
        self.timeline.add(s.entered, s.entered + s.duration if s.closed else math.inf)

    # -------------------------------------------------- result

    def result(self, source) -> dict:
        self.close_capture()
        self._settle_carried()
        gaps = []
        for a, b in zip(self.captures, self.captures[1:]):
            if a["end_ts"] and b["start_ts"] and b["start_ts"] > a["end_ts"]:
                gaps.append({"from_ts": a["end_ts"], "to_ts": b["start_ts"],
                             "seconds": round(b["start_ts"] - a["end_ts"], 3)})
        rep = {"type": "report", "files": list(getattr(source, "files", []) or []),
               "captures": self.captures, "sockets": self.sockets,
               "groupings": [], "durations": {k: self.durations.get(k, 0)
                                              for k in ("traced", "estimated", "lower_bound")}}
        for g in self.by:
            groups = self.groups[g]
            if (g in _OPTIONAL and g not in self.explicit
                    and set(groups) <= {"(not known)"}):
                continue
            if (g == "code" and g not in self.explicit
                    and set(groups) <= {NO_EOF_SEEN, PLACE_NOT_KNOWN}):
                continue
            rep["groupings"].append(g)
            rep[f"by_{g}"] = _table(g, groups)
            if g == "pid":
                # Which of a program's processes: its command line, as
                # recorded (the process's own words: a label).
                for row in rep["by_pid"]:
                    cmdline = self.identity.get(row["pid"], {}).get("cmdline")
                    if cmdline:
                        row["cmdline"] = cmdline
        rep["histogram_us"] = [{"from_us": k[0], "to_us": k[1], "count": v}
                               for k, v in sorted(self.histogram.items())]
        rep["estimated_histogram_us"] = slots_to_buckets(self.estimated_us)
        rep["timeline"] = self._timeline()
        # Leak rate: sockets that began lingering per minute of capture, by
        # program, so that "which service leaks fastest" is one line. Those
        # already in CLOSE_WAIT when tracing began (estimated, lower bounds)
        # did not leak during the capture: counted, 30 old sockets and 5 new
        # in 79 s read as 26.61/min (a newcomer's report), as top's NEW/MIN
        # leaves them out.
        span_s = sum(max(0.0, (c["end_ts"] or 0.0) - (c["start_ts"] or 0.0))
                     for c in self.captures if c["end_ts"] and c["start_ts"])
        rep["captured_s"] = round(span_s, 3)
        for row in rep.get("by_program", []):
            began = row["count"] - row.get("estimated", 0) - row.get("lower_bound", 0)
            row["per_min"] = round(began * 60 / span_s, 2) if span_s >= 60 else None
        rep["still_lingering"] = [
            dict({k: v for k, v in s.info.items() if k not in ("people", "cut")},
                 diagnosis={"cause": s.info["cause"], "summary": s.info["summary"]},
                 age_s=round(s.duration, 3), age_source=s.source,
                 age_is_lower_bound=s.source == "lower_bound")
            for s in sorted((item[2] for item in self.still), key=lambda s: s.entered)]
        for d in rep["still_lingering"]:
            d.pop("cause", None)
            d.pop("summary", None)
            d.pop("code", None)
        problems = list(getattr(source, "problems", []) or [])
        if self.unusable:
            problems.append(f"{self.unusable} record(s) with unexpected values were not used")
        problems.extend(self._folded_lines())
        rep["still_lingering_total"] = self.still_total
        if self.windowed:
            rep["window"] = {"since_ts": self.since, "until_ts": self.until,
                             "captures_outside": self.outside,
                             "histogram_from_ts": self.hist_span[0],
                             "histogram_to_ts": self.hist_span[1]}
        rep["losses"] = {
            "lost_records": self.losses,
            "events_lost": self.lost_total["events_lost"],
            "map_full": self.lost_total["map_full"],
            "events_unread": self.lost_total["events_unread"],
            "transitions_skipped": self.lost_total["transitions_skipped"],
            "places_not_kept": dict(self.places_not_kept),
            "write_errors": self.write_errors,
            "skipped_lines": getattr(source, "skipped", 0) or 0,
            "unclean_ends": sum(1 for c in self.captures if not c["clean_end"])
            + self.folded["unclean_captures"],
            "folded": {k: v for k, v in sorted(self.folded.items())
                       if k != "unclean_captures"},
            "missing_parts": [{"file": f, "part": p}
                              for f, p in getattr(source, "missing_parts", []) or []],
            "gaps_between_captures": gaps,
            "problems": problems,
        }
        return rep

    def _folded_lines(self) -> list[str]:
        """What went past the report's caps, said (README, Security)."""
        f = self.folded
        lines = []
        if f["lingering"]:
            lines.append(f"{f['lingering']} socket(s) lingered while {MAX_LINGERING} others "
                         f"did: not followed, counted from their close record only, if any")
        for key, n in sorted(f.items()):
            if key.startswith("rows:"):
                lines.append(f"by {key[5:]}: {n} socket(s) past the first {MAX_ROWS} rows "
                             f"counted in the row {OTHER}")
        if f["before"]:
            lines.append(f"{f['before']} socket(s) reported before the window past the first "
                         f"{MAX_BEFORE} not remembered: their close may be counted")
        if f["holders"]:
            lines.append(f"{f['holders']} holder process(es) past the first {MAX_HOLDERS} of a "
                         f"socket: not in its rows by program, pid, unit, container or pod")
        if f["holder_fds"]:
            # A record lists every holding process and some fds of each
            # (owners_not_listed counts the rest): fds, not processes.
            lines.append(f"{f['holder_fds']} fd(s) on sockets that their records did not "
                         f"list (more fds of the processes they list)")
        if f["processes"]:
            lines.append(f"{f['processes']} process identities forgotten (more than "
                         f"{MAX_PROCESSES}): their sockets name no unit, container or pod")
        if f["captures"]:
            lines.append(f"{f['captures']} capture(s) past the first {MAX_CAPTURES} not listed "
                         f"(their sockets are counted)")
        if f["lost_records"]:
            lines.append(f"{f['lost_records']} loss record(s) past the first {MAX_LOSS_RECORDS} "
                         f"not listed (summed above)")
        if f["histogram"]:
            lines.append(f"{f['histogram']} histogram count(s) in slots past the first "
                         f"{MAX_HIST_SLOTS} not shown")
        if self.still_total > len(self.still):
            lines.append(f"{self.still_total} socket(s) still lingering at the end, the "
                         f"{len(self.still)} oldest listed")
        return lines

    def _timeline(self) -> list[dict]:
        starts = [c["start_ts"] for c in self.captures if c["start_ts"]]
        ends = [c["end_ts"] for c in self.captures if c["end_ts"]]
        if not starts or not ends:
            return []
        t0, t1 = min(starts), max(ends)
        if t1 <= t0:
            return []
        step = (t1 - t0) / self.timeline_buckets
        points = [t0 + (i + 0.5) * step for i in range(self.timeline_buckets)]
        return [{"ts": round(at, 3), "lingering": n}
                for at, n in zip(points, self.timeline.counts_at(points))]


def _table(grouping: str, groups: dict) -> list[dict]:
    rows = sorted(groups.items(), key=lambda kv: (-kv[1].total_s, -kv[1].count,
                                                  _order(kv[0])))
    out = []
    columns = table_columns(grouping)
    name_fields, last_field = columns[0][1], columns[-1][1][0]
    for k, g in rows:
        row = g.as_dict()
        if grouping == "pid":       # (pid, comm); the command line is added later
            row = dict(zip(name_fields, k), **row)
        elif grouping == "cause":
            row = dict({name_fields[0]: k, last_field: dict(g.programs.most_common())}, **row)
        elif grouping == "program":
            row = dict({name_fields[0]: k if isinstance(k, str) else k[1]}, **row)
        else:
            row = dict({name_fields[0]: k}, **row)
        out.append(row)
    if grouping == "program":
        # Two rows that would read the same (two servers of one program, or
        # processes whose program was not recorded) say which is which.
        named = Counter(row["program"] for row in out)
        for (k, g), row in zip(rows, out):
            if named[row["program"]] > 1 and not isinstance(k, str):
                server = k[0]
                if len(g.pids) == 1 and not g.more_pids:
                    row["program"] += f" (pid {next(iter(g.pids))})"
                elif server[0] == "server":
                    row["program"] += f" (server {server[1]})"
    return out


def _order(key) -> str:
    """A row's key in the order of its name (a program row's key is its
    fold and its label)."""
    return key[1] if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], tuple) \
        else str(key)


def _source(rec: dict, kind: str) -> str:
    """The report keeps three kinds of age: a range's (keepalive) lower end
    is a lower bound, which is all its tables and histograms can use."""
    source = age_source(rec, kind)
    return "lower_bound" if source == "range" else source


def build(records, source=None, by: Optional[Iterable[str]] = None,
          timeline_buckets: int = 40, since: Optional[float] = None,
          until: Optional[float] = None) -> dict:
    """The report over `records` (an iterable of record dicts, read once).
    source: what read them (files, skipped, problems, missing_parts), read
    after the records are consumed, so a streaming reader can count as it
    goes. A parts.Recording may be passed as `records` alone.
    since, until (epoch seconds): the window; records outside it, and the
    sockets reported before it, are not counted."""
    if source is None and hasattr(records, "records"):
        source, records = records, records.records
    explicit = tuple(by) if by else ()
    for g in explicit:
        if g not in GROUPINGS:
            raise ValueError(f"unknown grouping {g!r}")
    b = _Builder(explicit or DEFAULT_GROUPINGS, timeline_buckets, since, until)
    b.explicit = set(explicit)
    for r in records:
        if isinstance(r, dict):
            b.feed(r)
    return b.result(source)


# ---------------------------------------------------------------- text

def _clock(ts) -> str:
    t = _number(ts)
    if t is None:
        return "?"
    try:
        return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "?"


def _age(seconds, source: str = "traced") -> str:
    s = _number(seconds)
    return "?" if s is None else marked_age(s, source)


def _row_name(grouping: str, row: dict) -> str:
    fields = table_columns(grouping)[0][1]
    if grouping == "pid":
        pid, comm, cmdline = fields
        name = f"{escape(row[pid] if row[pid] is not None else '-')}/{escape(row[comm])}"
        return name + (f" {escape(row[cmdline])}" if row.get(cmdline) else "")
    if grouping == "program":
        program, processes = fields
        n = row[processes]
        more = "+" if row.get("processes_at_least") else ""
        return escape(row[program]) + (f" ({n}{more} processes)" if n > 1 else "")
    return escape(row[fields[0]])      # a peer is host:port already (peer_key)


def _cut_code(text: str, columns: int) -> str:
    """A code location's row name cut to columns: "function (file:line) in
    module" loses its module's middle first, then its function's: the line
    was cut first ("Api.handle_request (api_server.py:1…", a newcomer's
    report)."""
    head, sep, module = text.rpartition(" in ")
    if not sep:
        return textsafe.cut_middle(text, columns)
    room = columns - textsafe.width_of_escaped(head) - len(sep)
    if room < 6:
        return textsafe.cut_middle(head, columns)
    return head + sep + textsafe.cut_middle(module, room)


def _causes_text(row: dict, grouping: str) -> str:
    items = row.get(table_columns(grouping)[-1][1][0], {})
    parts = [escape(k) + (f" {v}" if len(items) > 1 else "") for k, v in items.items()]
    return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def render_text(rep: dict, top: int = 15) -> list[str]:
    lines = []
    caps = rep["captures"]
    d = rep.get("durations", {})
    lines.append(f"closewait-trace report: {_count(rep['sockets'], 'socket')} lingered in "
                 f"CLOSE_WAIT ({_count(len(caps), 'capture')}, "
                 f"{_count(len(rep['files']), 'file')})")
    w = rep.get("window")
    if w:
        lines.append(f"  Window: {_clock(w['since_ts']) if w['since_ts'] is not None else 'start'}"
                     f" -> {_clock(w['until_ts']) if w['until_ts'] is not None else 'end'}: "
                     f"records outside it not counted,")
        lines.append("  nor sockets reported before it"
                     + (f"; {w['captures_outside']} capture(s) wholly outside"
                        if w["captures_outside"] else ""))
    for c in caps:
        end = "" if c["clean_end"] else "  (no clean end: killed or crashed)"
        lines.append(f"  {escape(c['hostname'])}: {_clock(c['start_ts'])} -> "
                     f"{_clock(c['end_ts'])}{end}")
    if d.get("estimated") or d.get("lower_bound"):
        lines.append(f"  Durations: {d.get('traced', 0)} timed by the kernel, "
                     f"{d.get('estimated', 0)} estimated (~, sockets already in CLOSE_WAIT "
                     f"at start), {d.get('lower_bound', 0)} lower bounds (>=)")

    fastest = max((r for r in rep.get("by_program", [])
                   if r.get("per_min") and r.get("still_held")),
                  key=lambda r: r["per_min"], default=None)
    if fastest is not None:
        # One line: the figures, then the program, cut in the middle (both
        # the program and the script at its end say which) to fit.
        lead = (f"  Leaking fastest ({fastest['per_min']:g}/min, "
                f"{fastest['still_held']} still held): ")
        lines.append(lead + textsafe.cut_middle(_row_name("program", fastest),
                                                max(16, LINE - len(lead))))

    for g in rep.get("groupings", []):
        rows = rep[f"by_{g}"]
        lines.append("")
        lines.append(TITLES[g] + ":")
        name, (count_label, (count_f, est_f, low_f)), (total_label, (total_f,)), \
            (longest_label, (longest_f, longest_source_f)), (last_label, _) = table_columns(g)
        counts = []
        for row in rows[:top]:
            est = row.get(est_f, 0) + row.get(low_f, 0)
            counts.append(f"{row[count_f]}" + (f" ({est}~)" if est else ""))
        # As wide as the widest count of the table: "123 (111~)" would push
        # its row's columns right of the others'.
        width = max([7] + [len(c) for c in counts])
        lines.append(f"  {name[0]:<36} {count_label:>{width}} {total_label:>9} "
                     f"{longest_label:>9}  {last_label}")
        if not rows:
            lines.append("  (none)")
        # A program's name is cut in the middle, as in "Leaking fastest": its
        # end is the script (python3.11 [/usr/bin/python3.11] /srv/leaky.py),
        # the one part that tells two programs of one interpreter apart.
        cut_name = (textsafe.cut_middle if g == "program" else _cut_code if g == "code"
                    else textsafe.cut)
        for row, count in zip(rows[:top], counts):
            # A row is cut, not wrapped: its last column (causes, programs)
            # is the one that gives.
            lines.append(textsafe.cut(
                f"  {textsafe.pad(cut_name(_row_name(g, row), 36), 36)} {count:>{width}} "
                f"{_age(row[total_f]):>9} "
                f"{_age(row[longest_f], row.get(longest_source_f, 'traced')):>9}  "
                f"{_causes_text(row, g)}", LINE))
        if len(rows) > top:
            lines.append(f"  ... {len(rows) - top} more (see --json or --top)")
    if any(rep.get(f"by_{g}") and any(r.get("estimated") or r.get("lower_bound")
                                      for r in rep[f"by_{g}"]) for g in rep.get("groupings", [])):
        lines.append("")
        # Two lines within 80 columns: fit_lines would wrap a longer first
        # line into an orphan ("    their durations are") above the second.
        lines.append("  N (M~): M of the N sockets were already in CLOSE_WAIT when tracing "
                     "began:")
        lines.append("  their durations are estimates (~) or lower bounds (>=), not "
                     "kernel-timed.")
    lines.append("")
    lines.append("Time in CLOSE_WAIT, every socket the kernel timed (log2 histogram):")
    if w and not w["histogram_to_ts"]:
        lines.append("  (no state recorded in the window: no histogram)")
    elif w:
        lines.append(f"  (in the window: its counts at {_clock(w['histogram_to_ts'])} less those at "
                     f"{_clock(w['histogram_from_ts']) if w['histogram_from_ts'] else 'the start'},")
        lines.append("  the states recorded nearest the window's ends)")
    lines.extend(histogram_lines(rep["histogram_us"]))
    if rep.get("estimated_histogram_us"):
        n = sum(b["count"] for b in rep["estimated_histogram_us"])
        lines.append(f"Estimated, not timed: {n} socket(s) already in CLOSE_WAIT when tracing "
                     f"began, ages from tcp_info (log2 histogram):")
        lines.extend(histogram_lines(rep["estimated_histogram_us"]))
    lines.append("")
    lines.append("Sockets lingering over time:")
    lines.extend(_timeline_lines(rep["timeline"]))
    lines.append("")
    still = rep["still_lingering"]
    lines.append(f"Still lingering at the end of the {'window' if w else 'capture'}: "
                 f"{rep.get('still_lingering_total', len(still))}")
    for s in still[:top]:
        owners = ", ".join(f"{escape(o.get('pid'))}/{escape(o.get('comm'))} fd {escape(o.get('fd'))}"
                           for o in s.get("owners") or [])
        if not owners and s.get("owner_kind") == "accept_queue":
            owners = "(not accepted)"
        why = (s.get("diagnosis") or {}).get("summary", "")
        lines.append(f"  {hostport(s['laddr'], s['lport'])} <- "
                     f"{hostport(s['raddr'], s['rport'])} "
                     f"{_age(s['age_s'], s.get('age_source', 'traced'))} {owners or '-'}")
        if fds_not_listed(s):
            lines.append(f"      and {fds_not_listed(s)} more fds on it, not listed")
        if why:
            lines.append(f"      {escape(why)}")
    if rep.get("still_lingering_total", len(still)) > min(top, len(still)):
        lines.append(f"  ... {rep.get('still_lingering_total', len(still)) - min(top, len(still))}"
                     f" more (see --json)")
    lines.append("")
    lines.extend(_loss_lines(rep["losses"]))
    return fit_lines([textsafe.safe_line(line) for line in lines])


def _timeline_lines(points: list[dict], height: int = 8) -> list[str]:
    if not points:
        return ["  (no time range)"]
    peak = max(p["lingering"] for p in points)
    if peak == 0:
        return ["  none at any time"]
    rows = []
    for level in range(height, 0, -1):
        threshold = peak * level / height
        bar = "".join("#" if p["lingering"] >= threshold - 1e-9 else " " for p in points)
        label = f"{round(threshold):>6} |" if level in (height, 1) else "       |"
        rows.append(f"  {label}{bar}")
    rows.append("        +" + "-" * len(points))
    a = _dt.datetime.fromtimestamp(points[0]["ts"])
    b = _dt.datetime.fromtimestamp(points[-1]["ts"])
    # A timeline over several days says which.
    fmt = "%H:%M:%S" if a.date() == b.date() else "%m-%d %H:%M"
    first, last = a.strftime(fmt), b.strftime(fmt)
    rows.append(f"         {first}{last:>{max(1, len(points) - len(first))}}")
    return rows


# Summary counters of places not kept, and what each means in the report.
PLACE_COUNTERS = {
    "eof_rate_limited": "EOF reads not located (over the capture rate: a sample was kept)",
    "eof_map_full": "EOF reads not located (their map was full)",
    "open_rate_limited": "connect()s not located (over the capture rate: a sample was kept)",
    "open_map_full": "connect()s not located (their map was full)",
}


def _loss_lines(losses: dict) -> list[str]:
    items = []
    if losses["events_lost"]:
        items.append(f"{losses['events_lost']} kernel events lost (ring buffer full)")
    if losses["map_full"]:
        items.append(f"{losses['map_full']} sockets not timed (tracking map full)")
    if losses.get("transitions_skipped"):
        items.append(f"{losses['transitions_skipped']} kernel state changes not seen (the "
                     f"kernel skipped the program: a BPF program was already running on that CPU)")
    if losses.get("events_unread"):
        items.append(f"{losses['events_unread']} kernel events not read (in the buffer "
                     f"when a capture ended)")
    places = losses.get("places_not_kept") or {}
    for name, what in PLACE_COUNTERS.items():
        if places.get(name):
            items.append(f"{places[name]} {what}")
    if losses["write_errors"]:
        items.append(f"{losses['write_errors']} records not written (disk full or I/O error)")
    if losses["skipped_lines"]:
        items.append(f"{losses['skipped_lines']} damaged lines skipped")
    if losses["unclean_ends"]:
        items.append(f"{losses['unclean_ends']} capture(s) ended without a summary (killed?)")
    for m in losses["missing_parts"]:
        items.append(f"part {escape(m['part'])} of {escape(m['file'])} missing")
    for g in losses["gaps_between_captures"]:
        items.append(f"gap of {_age(g['seconds'])} between captures at {_clock(g['from_ts'])}")
    items.extend(escape(p) for p in losses["problems"])
    if not items:
        return ["Gaps and losses: none."]
    return ["Gaps and losses:"] + [f"  - {i}" for i in items]
