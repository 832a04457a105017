"""`closewait-trace top`: the live view for a pile-up, in the manner of
top(1) and bcc's tcptop: one row per holder process, the forks of one
server folded into one row (output/fold.py, as `snapshot` and `report`
fold them) (or cause, remote peer, local port, container), how many sockets it keeps in CLOSE_WAIT now, the oldest, and
how many started lingering and closed in the last minute; refreshed every
tick, biggest first.

TopModel is pure (records and lingering entries in, rows out) and tested
without a kernel; TopSink (live/session.py wires it into the live loop) shows the
rows with rich on a terminal, or as plain text blocks when stdout is not a
terminal. Every name is a process's own word: escaped (textsafe) before it
reaches either, and given to rich as Text, never as markup.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Optional

from closewait_trace.durations import format_age
from closewait_trace.output import fold, textsafe
from closewait_trace.output.render import SOURCE_MARK, first_of_each_process
from closewait_trace.output.report import EPHEMERAL, peer_key, side_of
from closewait_trace.sockets import identity

GROUPINGS = ("process", "cause", "peer", "port", "container")
WINDOW_S = 60.0                 # "per minute": events in the last minute
MAX_EVENTS = 100_000            # remembered for the per-minute columns (oldest dropped)
MAX_SOCKETS = 100_000           # sockets remembered from LINGER to CLOSED
MAX_ROWS = 200                  # rows built per refresh (the terminal shows fewer)
MAX_PROCESSES = 20_000          # holders' containers remembered (the oldest forgotten)
MAX_PLACE = 64                  # columns of a container / cgroup label
NOT_KNOWN = "(cgroup not known)"
AGE_SOURCES = tuple(SOURCE_MARK)       # traced, estimated, lower_bound, range


def place_of(ident) -> str:
    """A holder's container from its identity (what a `process` record
    carries: the cgroup path as the kernel gave it in /proc/PID/cgroup):
    the container (with its pod), the pod or the systemd unit where root's
    tools made them (identity.attribute), else the cgroup path itself,
    whose names whoever made the cgroup chose: escaped, and cut in the
    middle to MAX_PLACE columns (both ends say the most)."""
    path = ident.get("cgroup") if isinstance(ident, dict) else None
    if not isinstance(path, str) or not path:
        return NOT_KNOWN
    found = identity.attribute(path)
    container, pod, unit = found["container"], found["pod_uid"], found["unit"]
    if container:
        label = f"{container.get('runtime')} {str(container.get('id'))[:12]}"
        if pod:
            label += f" (pod {str(pod)[:8]})"
    elif pod:
        label = f"pod {pod}"
    elif unit:
        # A unit's own cgroups below it (a user's user@UID.service, a
        # service with Delegate=yes) are named by whoever it delegates to:
        # said after it, as the path they are.
        label = unit
        at = path.find("/" + unit + "/")
        if at >= 0:
            label += ":" + path[at + len(unit) + 1:]
    else:
        label = path
    return textsafe.cut_middle(textsafe.escape(label), MAX_PLACE)


def keys_of(entry: dict, places: Optional[dict] = None) -> dict:
    """The row a lingering socket (a linger record or a lingering entry)
    belongs to, under each grouping. places: pid -> its container label
    (place_of), from the `process` records. By process, the first holder's
    own label; rows_of folds it with the other forks of its server (by
    "holder": its pid and comm) when the model's fold says so."""
    owners = [o for o in entry.get("owners") or [] if isinstance(o, dict)]
    if owners:
        o = owners[0]
        process = f"{o.get('pid')}/{textsafe.escape(o.get('comm', '?'))}"
        # +N: the other processes that hold it, as the OWNER column's
        # (render._linger); an entry is one fd, and a process's dup()s are
        # not more holders (nor another row).
        others = len(first_of_each_process(owners, len(owners))[0]) - 1
        if others:
            process += f" +{others}"
        holder = (o.get("pid"), o.get("comm", "?"))
        place = (places or {}).get(o.get("pid"), NOT_KNOWN)
    elif entry.get("owner_kind") == "accept_queue":
        process = place = "(not accepted)"
        holder = None
    else:
        process = place = "(no holder)"
        holder = None
    diagnosis = entry.get("diagnosis") if isinstance(entry.get("diagnosis"), dict) else {}
    cause = textsafe.escape(diagnosis.get("cause") or "(not yet known)")
    info = {"raddr": textsafe.escape(entry.get("raddr")), "rport": entry.get("rport"),
            "side": side_of(entry)}
    port = EPHEMERAL if info["side"] == "client" else str(entry.get("lport"))
    return {"process": process, "cause": cause, "peer": peer_key(info), "port": port,
            "container": place, "holder": holder}


def age_of(entry: dict) -> tuple:
    """The age a row counts and its source (ages.py: traced, estimated,
    lower_bound, range): a keepalive range's upper end, what it may be;
    any other age as given."""
    source = entry.get("age_source")
    if source not in AGE_SOURCES:
        source = "traced"
    if source == "range" and entry.get("age_max_s") is not None:
        return entry["age_max_s"], source
    if source == "range":           # no upper end: its lower end is all there is
        source = "lower_bound"
    return entry.get("age_s") or 0.0, source


def socket_key(rec: dict) -> tuple:
    return (rec.get("netns"), rec.get("laddr"), rec.get("lport"), rec.get("raddr"),
            rec.get("rport"))


@dataclass
class Row:
    key: str
    sockets: int = 0
    oldest_s: float = 0.0
    oldest_source: str = "traced"   # how the oldest's age is known (age_of)
    new_per_min: int = 0
    closed_per_min: int = 0
    causes: Optional[collections.Counter] = None


class TopModel:
    """What the view shows, from the tracer's records and its lingering
    sockets at each tick."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.entered: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.closed: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.keys_by_socket: dict = {}
        self.places: dict = {}          # pid -> container label (place_of)
        self.places_version = 0         # bumped when a pid's label changes
        # What the kernel says of each holder (parent, uid, exe), given by
        # the sink from the tracer's holders (TopSink): which fold by process.
        # Past MAX_PROCESSES the sink makes it again from the holders still
        # lingering (forgetting the oldest could split a fold still there).
        self.folding = fold.Fold()
        self.lost = 0

    def on_record(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind == "process" and isinstance(rec.get("pid"), int):
            # Written before the linger records of its batch: the cgroup
            # the batch read, not read again here.
            pid = rec["pid"]
            place = place_of(rec.get("identity"))
            if self.places.pop(pid, None) != place:
                self.places_version += 1
            if len(self.places) >= MAX_PROCESSES:
                del self.places[next(iter(self.places))]
                self.places_version += 1
            self.places[pid] = place
        elif kind == "linger" and not rec.get("update"):
            keys = keys_of(rec, self.places)
            # A socket already in CLOSE_WAIT when the trace began is not a
            # new one: counted, the first minute read as a leak rate of
            # every old socket at once.
            if not rec.get("pre_existing"):
                self.entered.append((self.clock(), keys))
            if len(self.keys_by_socket) < MAX_SOCKETS:
                self.keys_by_socket[socket_key(rec)] = keys
        elif kind == "closed" and rec.get("reported"):
            keys = self.keys_by_socket.pop(socket_key(rec), None)
            if keys is not None:
                self.closed.append((self.clock(), keys))
        elif kind == "lost":
            count = rec.get("count")
            self.lost += count if isinstance(count, int) else 0

    def _recent(self, events: collections.deque, now: float) -> collections.deque:
        while events and events[0][0] < now - WINDOW_S:
            events.popleft()
        return events

    def rows(self, lingering: list[dict], grouping: str) -> list[Row]:
        """Rows from lingering entries (snapshot entries, linger records)."""
        return self.rows_of([(keys_of(entry, self.places), *age_of(entry))
                             for entry in lingering], grouping)

    def rows_of(self, lingering, grouping: str) -> list[Row]:
        """Rows from (keys_of's keys, age in seconds, its source) of each
        lingering socket (TopSink keeps the keys of a socket between
        refreshes). The oldest keeps its source: an age estimated from
        tcp_info is shown as one (`~`), never as a timed one.

        By process, the forks of one server are one row (the first
        holder's fold key in self.folding; fold.labels names it), and that
        is the default: an on-call
        with 10,000 PostgreSQL backends in CLOSE_WAIT first needs to see
        which server leaks and how much, and 10,000 rows of one socket each
        would show 20 of them and hide that (a single process reads as
        before)."""
        now = self.clock()
        rows: dict[str, Row] = {}
        folding = self.folding if grouping == "process" else None
        members: dict = {}          # fold key -> fold.Members, by process
        fold_of: dict = {}          # a process row's key -> its fold key
        singles: dict = {}          # pid -> its own row's key

        def row_of(keys: dict) -> Row:
            key = keys[grouping]
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(key, causes=collections.Counter())
                holder = keys.get("holder") if folding is not None else None
                if holder is not None:
                    fkey = folding.key(holder[0])
                    if fkey[0] == "server":
                        m = members.get(fkey)
                        if m is None:
                            m = members[fkey] = fold.Members()
                        m.add(*holder)
                        fold_of[key] = fkey
                        singles.setdefault(holder[0], key)
            return row

        for keys, age, source in lingering:
            row = row_of(keys)
            row.sockets += 1
            if age > row.oldest_s or row.sockets == 1:
                row.oldest_s, row.oldest_source = age, source
            row.causes[keys["cause"]] += 1
        for events, field in ((self._recent(self.entered, now), "new_per_min"),
                              (self._recent(self.closed, now), "closed_per_min")):
            for _ts, keys in events:
                row = row_of(keys)
                setattr(row, field, getattr(row, field) + 1)
        if fold_of:
            # The rows of the processes of one fold, when there are more
            # than one, become one row; a single process keeps its rows
            # exactly as before. Work by rows (processes), not sockets.
            several = {k for k, m in members.items() if len(m.pids) > 1}
            named = fold.labels({k: members[k] for k in several}, singles.__getitem__,
                                fold.server_exe, KEY_COLUMNS)
            merged: dict = {}
            for key, fkey in fold_of.items():
                if fkey not in several:
                    continue
                part = rows.pop(key)
                row = merged.get(fkey)
                if row is None:
                    row = merged[fkey] = Row(named[fkey], causes=collections.Counter())
                if part.sockets and (not row.sockets or part.oldest_s > row.oldest_s):
                    row.oldest_s, row.oldest_source = part.oldest_s, part.oldest_source
                row.sockets += part.sockets
                row.new_per_min += part.new_per_min
                row.closed_per_min += part.closed_per_min
                row.causes.update(part.causes)
            for row in merged.values():
                rows[row.key] = row
        ordered = sorted(rows.values(), key=lambda r: (-r.sockets, -r.new_per_min,
                                                       -r.oldest_s, r.key))
        return ordered[:MAX_ROWS]


COLUMNS = ("SOCKETS", "OLDEST", "NEW/MIN", "CLOSED/MIN")
KEY_COLUMNS = 80 - 38           # what plain_lines leaves the key of an 80-column line
TITLES = {"process": "PROCESS", "cause": "CAUSE", "peer": "REMOTE PEER", "port": "LOCAL PORT",
          "container": "CONTAINER / UNIT / CGROUP"}


def cells(row: Row, grouping: str, key_columns: Optional[int] = None) -> list[str]:
    """A row as strings: the counts, then the key (and, by process, its
    causes), already escaped; the key fitted to key_columns when given,
    its name cut and its causes kept (they were cut first: "[stoppe…")."""
    key = row.key
    causes = ""
    if grouping != "cause" and row.causes:
        # The two most common, and how many more: a third cause left out
        # unsaid read as if every socket there had one of the two (a
        # newcomer's report: 2 of 10 by peer were stopped).
        more = len(row.causes) - 2
        causes = (" [" + ", ".join(c for c, _n in row.causes.most_common(2))
                  + (f", +{more}" if more > 0 else "") + "]")
    if key_columns is not None:
        room = key_columns - textsafe.width_of_escaped(causes)
        key = (_fit_name(key, room) + causes if room >= 8
               else textsafe.cut(key + causes, key_columns))
    else:
        key += causes
    oldest = (SOURCE_MARK.get(row.oldest_source, "") + format_age(int(row.oldest_s * 1e9))
              if row.sockets else "-")
    return [str(row.sockets), oldest,
            str(row.new_per_min), str(row.closed_per_min), key]


def _fit_name(name: str, columns: int) -> str:
    """A row's name cut to columns: the executable's directory first
    ("socat […in/socat] (5 processes)": the program, its file and the count
    stay), else its middle (its start and end say more than its middle)."""
    over = textsafe.width_of_escaped(name) - columns
    if over <= 0:
        return name
    start, end = name.find(" ["), name.find("]")
    if 0 <= start < end:
        path = name[start + 2:end]
        keep = max(1, textsafe.width_of_escaped(path) - over)
        short = name[:start + 2] + textsafe.cut_left(path, keep) + name[end:]
        if textsafe.width_of_escaped(short) <= columns:
            return short
    return textsafe.cut_middle(name, columns)


def headline(rows: list[Row], grouping: str, threshold_s: float, lost: int) -> str:
    total = sum(r.sockets for r in rows)
    text = (f"{total} socket{'' if total == 1 else 's'} in CLOSE_WAIT >= "
            f"{format_age(int(threshold_s * 1e9))}, by {grouping}")
    if lost:
        text += f"; {lost} events lost"
    return text


def plain_lines(rows: list[Row], grouping: str, threshold_s: float, lost: int,
                wall_ts: float, limit: int = 20) -> list[str]:
    """The view as text, for a pipe or a file: one block per refresh."""
    stamp = time.strftime("%H:%M:%S", time.localtime(wall_ts))
    out = [f"--- {stamp} {headline(rows, grouping, threshold_s, lost)}",
           f"{'SOCKETS':>7} {'OLDEST':>9} {'NEW/MIN':>7} {'CLOSED/MIN':>10} {TITLES[grouping]}"]
    for row in rows[:limit]:
        c = cells(row, grouping, KEY_COLUMNS)
        out.append(textsafe.cut(f"{c[0]:>7} {c[1]:>9} {c[2]:>7} {c[3]:>10} {c[4]}", 80))
    if len(rows) > limit:
        out.append(f"... {len(rows) - limit} more rows")
    return out
