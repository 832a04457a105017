"""Linger records' JSON lines built straight from the lingering socket
(issue 20, target 2).

When a holder stops closing, 100,000 sockets can cross the threshold in
one tick, and each linger record was a dict (records.linger, 5-7 us) then
its JSON (11-13 us for 2.5 KB): a third of the loop's time per socket. Most
of a record is the same for every socket of one holder (its command line,
up to 4 KB, in every owners entry; the listener's part). Here the line is
put together from pieces: each holder process's JSON before and after its
fd made once, the listener's part and a shared `code` kept by identity,
the rest formatted in place. No dict is made unless a sink wants one
(LingerReport.record).

The output is byte for byte what the dict gives: safe_line(json_dumps(
records.linger(...))) for --json, json_dumps(..., separators=(",", ":"))
for a recording (tests/unit/test_linger_lines.py compares both, hostile
strings included); records.linger stays the definition, and the values
come from the same helpers (records.age_values, listener_part, linger_code,
entered_at). Anything the pieces do not cover (a NaN, a value of another
type) takes the dict's way.
"""

from __future__ import annotations

import json
import math
from array import array
from typing import Optional

from closewait_trace.output import changefold, records, render, textsafe

_str = json.encoder.encode_basestring_ascii
_float_repr = float.__repr__
_int_repr = int.__repr__
_isfinite = math.isfinite
KEPT_MAX = 1024             # entries per cache; cleared when full
# Characters the caches may hold in all, their keys' command lines
# included; cleared when over. An entry can be large: a command line of
# 4,096 characters, each escaped to six (\\uXXXX), and a listener's part
# has every holder of the listener's; 1,024 of those would be tens of MB.
KEPT_CHARS_MAX = 4 << 20

# A diagnosis line is kept (LingerText) for a summary no longer than this:
# with KEPT_MAX of them, about 1 MB (the comm and states in its key are
# short); a longer one is made each time.
KEPT_SUMMARY_CHARS = 512

# The fields of an owners entry (owners.Holder.as_dict) that every fd of
# one process shares: the key its pieces are kept under
# (tests/unit/test_linger_lines.py checks it against as_dict).
HOLDER_PROCESS_FIELDS = ("pid", "comm", "state", "ppid", "uid", "cmdline", "tracer_pid")
_HOLDER_FIELDS = HOLDER_PROCESS_FIELDS[:2] + ("fd",) + HOLDER_PROCESS_FIELDS[2:]
# The types procfs gives those fields. The pieces are kept by the fields'
# values, and values of other types can be equal and encode otherwise
# (True == 1, 1.0 == 1, a str subclass): such a holder takes the dict's way.
_PLAIN = frozenset({int, str, type(None)})
_HOLDER_KEYS = frozenset(_HOLDER_FIELDS)


class LingerReport:
    """One linger record to write: the socket, the record's time, its age
    then, and whether it is an update. The record's dict is made once, at
    the first sink that asks for it (record()); a sink with emit_linger
    may build its line from the socket instead (LingerJson)."""

    __slots__ = ("lingerer", "ts", "age_ns", "update", "_record")

    def __init__(self, lingerer, ts: float, age_ns: int, update: bool = False):
        self.lingerer, self.ts, self.age_ns, self.update = lingerer, ts, age_ns, update
        self._record: Optional[dict] = None

    def record(self) -> dict:
        if self._record is None:
            self._record = records.linger(self.lingerer, self.ts, self.age_ns, self.update)
        return self._record


class _Fallback(Exception):
    """A value the pieces do not write as the encoder does: the dict's way."""


def _scalar(value) -> str:
    """value as json.dumps writes it inside a dict, for the types records
    hold as plain values; anything else raises _Fallback."""
    kind = type(value)
    if kind is str:
        return _str(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is int:
        return _int_repr(value)
    if kind is float and _isfinite(value):
        return _float_repr(value)
    raise _Fallback


class LingerJson:
    """Linger records as --json writes them (compact=False: ", " and ": ",
    the line through textsafe.safe_line) or as a recording does
    (compact=True: "," and ":", json.dumps' ASCII escaping only)."""

    def __init__(self, compact: bool = False):
        self.compact = compact
        c, s = (":", ",") if compact else (": ", ", ")
        self._c, self._s = c, s
        # For values that are not scalars (evidence, the listener, code,
        # a tracer): the encoder json_dumps uses, made once.
        self._encode = textsafe.encode_function(
            {"separators": (",", ":")} if compact else {"check_circular": False})
        # id(value) -> (value, its JSON): records.Shared parts (a listener's,
        # a shared code), never changed once made. The value is kept so
        # that its id stays its own while in here.
        self._kept: dict = {}
        self._kept_chars = 0        # in both caches (KEPT_CHARS_MAX)
        # The last Shared part too large for _kept, with its JSON: the
        # sockets of one listener are written one after another, and the
        # part of a listener many processes hold (each a command line of up
        # to 4 KB, escaped six times over) was encoded again for each
        # socket. One, so bounded by the largest part.
        self._big: tuple = (None, "")
        # HOLDER_PROCESS_FIELDS' values -> (the entry's JSON up to its fd's
        # value, after it up to the facts).
        self._holders: dict = {}
        self._none_owned = (f'"owner_kind"{c}null{s}"owners"{c}[]{s}"netns"{c}null{s}'
                            f'"inode"{c}null{s}"unread_bytes"{c}null{s}"eof_read"{c}null{s}'
                            f'"listener"{c}null{s}"also_in_netns"{c}[]')

    def line(self, report: LingerReport) -> str:
        """The record's line, without its newline."""
        try:
            text = self._line(report)
        except (_Fallback, ValueError, TypeError):
            # NaN or infinity (json_dumps writes null), or a value of a type
            # the pieces do not write (an unhashable one among a holder's
            # fields): the dict, encoded whole, as it was.
            rec = report.record()
            if self.compact:
                return textsafe.json_dumps(rec, separators=(",", ":"))
            return textsafe.safe_line(textsafe.json_dumps(rec, check_circular=False))
        return text if self.compact else textsafe.safe_line(text)

    def _line(self, report: LingerReport) -> str:
        c, s = self._c, self._s
        l, ts, age_ns = report.lingerer, report.ts, report.age_ns
        ep = l.endpoints
        age_s, source, age_max_s, lower_bound = records.lingerer_age_values(l, age_ns)
        diag = l.diagnosis
        code = records.linger_code(l)
        return (f'{{"type"{c}"linger"{s}"ts"{c}{_scalar(round(ts, 6))}{s}'
                f'"time"{c}{_str(records.wall_time(ts))}{s}'
                f'"family"{c}{_scalar(ep.family_name)}{s}"laddr"{c}{_scalar(ep.laddr)}{s}'
                f'"lport"{c}{_scalar(ep.lport)}{s}"raddr"{c}{_scalar(ep.raddr)}{s}'
                f'"rport"{c}{_scalar(ep.rport)}{s}'
                f'"age_s"{c}{_scalar(age_s)}{s}"age_source"{c}{_scalar(source)}{s}'
                f'"age_max_s"{c}{_scalar(age_max_s)}{s}'
                f'"age_is_lower_bound"{c}{_scalar(lower_bound)}{s}'
                f'"pre_existing"{c}{_scalar(l.before_start)}{s}'
                f'"update"{c}{_scalar(report.update)}{s}'
                f'{self._ownership(l.ownership, diag.holder_facts() if diag else None)}{s}'
                f'"diagnosis"{c}{self._encode(diag.as_dict()) if diag else "null"}{s}'
                f'"code"{c}{self._value(code)}{s}'
                f'"entered_at"{c}{_scalar(records.entered_at(ts, age_s))}}}')

    def _ownership(self, own, facts: Optional[dict]) -> str:
        """records.ownership_fields' items."""
        if own is None:
            return self._none_owned
        if own.holders_cut is not None and own.holders_cut[0]:
            raise _Fallback         # "owners_not_listed" (rare): the dict's way
        c, s = self._c, self._s
        holder = self._holder
        owners = s.join([holder(h, facts) for h in own.holders])
        listener = (self._value(records.listener_part(own)) if own.listener is not None
                    else "null")
        other = own.other_netns
        return (f'"owner_kind"{c}{_scalar(own.kind)}{s}"owners"{c}[{owners}]{s}'
                f'"netns"{c}{_scalar(own.netns)}{s}"inode"{c}{_scalar(own.inode)}{s}'
                f'"unread_bytes"{c}{_scalar(own.unread_bytes)}{s}'
                f'"eof_read"{c}{_scalar(own.eof_read)}{s}"listener"{c}{listener}{s}'
                f'"also_in_netns"{c}{self._encode(list(other)) if other else "[]"}')

    def _holder(self, h, facts: Optional[dict]) -> str:
        """records.holder_dicts' entry for h: its process's pieces (kept),
        its fd, then what the diagnosis learnt of that fd."""
        key = (h.pid, h.comm, h.state, h.ppid, h.uid, h.cmdline, h.tracer_pid)
        if not _PLAIN.issuperset(map(type, key)):
            raise _Fallback
        pieces = self._holders.get(key)
        if pieces is None:
            pieces = self._holder_pieces(h, key)
        head, tail = pieces
        fd_facts = facts.get((h.pid, h.fd)) if facts else None
        if not fd_facts:
            return f"{head}{_scalar(h.fd)}{tail}}}"
        c, s = self._c, self._s
        value = self._value
        if not _HOLDER_KEYS.isdisjoint(fd_facts):
            raise _Fallback             # a fact would replace a field, not follow it
        more = "".join([f"{s}{_str(k)}{c}{value(v)}" for k, v in fd_facts.items()])
        return f"{head}{_scalar(h.fd)}{tail}{more}}}"

    def _holder_pieces(self, h, key: tuple) -> tuple:
        c, s = self._c, self._s
        items = h.as_dict()
        if tuple(items) != _HOLDER_FIELDS:
            raise _Fallback             # as_dict changed: HOLDER_PROCESS_FIELDS must too
        texts = [f"{_str(k)}{c}{self._value(v)}" for k, v in items.items() if k != "fd"]
        pieces = ("{" + s.join(texts[:2]) + f'{s}"fd"{c}', s + s.join(texts[2:]))
        # Its key's command line is no longer than its text.
        if self._room(self._holders, 2 * (len(pieces[0]) + len(pieces[1]))):
            self._holders[key] = pieces
        return pieces

    def _room(self, cache: dict, chars: int) -> bool:
        """Whether an entry of about chars characters is kept in cache:
        not one over an eighth of KEPT_CHARS_MAX (made again each time);
        at KEPT_MAX entries, or past KEPT_CHARS_MAX in both caches, both
        are emptied first (what they held is made again at its next use)."""
        if chars > KEPT_CHARS_MAX // 8:
            return False
        if len(cache) >= KEPT_MAX or self._kept_chars + chars > KEPT_CHARS_MAX:
            self._holders.clear()
            self._kept.clear()
            self._kept_chars = 0
        self._kept_chars += chars
        return True

    def _value(self, value) -> str:
        """Any value: a Shared part from what is kept, a scalar in place,
        the rest through the encoder."""
        if type(value) is records.Shared:
            hit = self._kept.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
            if self._big[0] is value:
                return self._big[1]
            text = self._encode(value)
            # The value is kept alive with it: about as large as its text.
            if self._room(self._kept, 2 * len(text)):
                self._kept[id(value)] = (value, text)
            else:
                self._big = (value, text)
            return text
        try:
            return _scalar(value)
        except _Fallback:
            return self._encode(value)


class LingerText:
    """Linger records' rows as the text table writes them, byte for byte
    what renderer.render(report.record()) gives (render.TextRenderer: the
    same row, age, OWNER and diagnosis functions), made from the socket:
    no record's dict, and the OWNER cell and the diagnosis line made once
    per holder and summary (the sockets of one holder share them), the
    rest in place. `snapshot` of 10,000 sockets built a dict for each
    (29 us on a slow machine) and rendered it (24 us).

    The common row only: with -v, --wide, in a replay, or where a place
    is known (the EOF read's line says how long ago; the connect()'s, where
    it was opened: render.code_places), the record's dict is made and
    rendered as before. tests/unit/test_linger_lines.py
    compares both ways on hostile sockets."""

    def __init__(self, renderer: "render.TextRenderer"):
        self.r = renderer
        # (--all?, pid, comm, state) of a socket's one holder -> (its
        # OWNER cell, the holders' states for its diagnosis line).
        self._owners: dict = {}
        # (holders' states, summary) -> the diagnosis line, checked and fitted.
        self._diagnoses: dict = {}

    def lines(self, report: LingerReport) -> list[str]:
        r = self.r
        l = report.lingerer
        diag = l.diagnosis
        if (r.verbose or r.wide or r.replay is not None
                or render.code_places(records.linger_code(l)) != (None, None)
                or (diag is not None and diag.evidence_let_go)):
            # The dict's way (an evidence let go raises there, as it did).
            return r.render(report.record())
        owner, states = self._owner(l.ownership)
        ts, age_ns = report.ts, report.age_ns
        age_s, source, age_max_s, lower_bound = records.lingerer_age_values(l, age_ns)
        ep = l.endpoints
        age = render.age_cell(age_s, render.source_of(source, lower_bound), age_max_s)
        rows = r.row(round(ts, 6), records.entered_at(ts, age_s), age_s,
                     ep.laddr, ep.lport, ep.raddr, ep.rport, None,
                     "CHANGE" if report.update else "LINGER", age, owner)
        lines = r.finished(rows)            # a date line, the row
        if diag is not None:
            lines += self._diagnosis(states, diag.summary)
        return lines

    def change_key(self, report: LingerReport) -> Optional[bytes]:
        """The CHANGE's group in the text's fold (output/changefold.py), made
        from the socket as r.change_key makes it from its record: the same
        holders, states and cause, one group. Its holders' raw values, a
        pass over them in C where it can (a socket shared by 2,000 forks,
        stopped: 2,500 such sockets in one batch)."""
        l = report.lingerer
        own = l.ownership
        holders = own.holders if own is not None else ()
        cause = l.diagnosis.cause if l.diagnosis is not None else None
        if len(holders) == 1:
            # The common socket, one holder: its fields as the key (a pid,
            # /proc's 16-byte comm, a state letter), no digest to make.
            h = holders[0]
            return (own.kind, cause, h.comm, h.state, h.pid)
        try:
            pids = array("q", [h.pid for h in holders]).tobytes()
        except (TypeError, OverflowError):
            pids = [h.pid for h in holders]
        try:
            return changefold.group_key(own.kind if own is not None else None,
                                        "-" if cause is None else cause,
                                        holders[0].comm if holders else "",
                                        {h.state for h in holders}, pids)
        except (TypeError, ValueError):
            return None             # a value of another type: shown whole

    def change_description(self, report: LingerReport) -> tuple:
        """What its group's line shows: r.change_description's, from the socket."""
        l = report.lingerer
        owner, states = self._owner(l.ownership)
        cause = l.diagnosis.cause if l.diagnosis is not None else None
        return owner, states, "-" if cause is None else textsafe.escape(cause)

    def _owner(self, own) -> tuple:
        holders = own.holders if own is not None else ()
        if len(holders) == 1:
            h = holders[0]
            pid, comm, state = h.pid, h.comm, h.state
            # Kept by value: only values of the types /proc gives (equal
            # values of other types may be written otherwise: True, 1.0).
            if type(pid) is int and type(comm) is str and type(state) is str:
                key = (self.r.all_transitions, pid, comm, state)
                hit = self._owners.get(key)
                if hit is None:
                    hit = self._make_owner(own, holders)
                    if len(self._owners) >= KEPT_MAX:
                        self._owners.clear()
                    self._owners[key] = hit
                return hit
        return self._make_owner(own, holders)

    def _make_owner(self, own, holders) -> tuple:
        first = render.who_is(holders[0].pid, holders[0].comm) if holders else None
        cell = self.r.linger_owner(first, [h.pid for h in holders],
                                   own.kind if own is not None else None)
        return cell, render.holder_states(h.state for h in holders)

    def _diagnosis(self, states: str, summary) -> list[str]:
        keep = type(summary) is str and len(summary) <= KEPT_SUMMARY_CHARS
        hit = self._diagnoses.get((states, summary)) if keep else None
        if hit is None:
            text = render.diagnosis_text(states, summary)
            hit = self.r.finished(self.r.diagnosis_lines(text))
            if keep:
                if len(self._diagnoses) >= KEPT_MAX:
                    self._diagnoses.clear()
                self._diagnoses[(states, summary)] = hit
        return hit
