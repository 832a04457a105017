"""Replay of recordings: the recorded records, filtered (with the same
filters as the live tail, sockets/filters.py), streamed from the reader for
the caller to render through the sink the live tail uses, so a replay
prints what the run printed. Nothing is kept per record beyond the
filter's and the renderer's caps: memory does not grow with the recording.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from closewait_trace.files.parts import RecordingReader
from closewait_trace.output.render import ReplaySource
from closewait_trace.output.terminal import notice
from closewait_trace.output.textsafe import escape, json_dumps
from closewait_trace.sockets.filters import HolderFilter, SocketFilter, record_people

# Records the live tail printed; headers and snapshots are for readers only.
SHOWN = ("start", "process", "linger", "closed", "lost", "summary", "transition")
# Records that describe one socket, to which the filters apply.
PER_SOCKET = ("linger", "closed", "transition")
# Bounds of the filter's memory, whatever the recording.
MAX_IDENTITIES = 20_000     # process identities for --cgroup/--container/--unit (latest)
MAX_SHOWN = 100_000         # lingering sockets shown whose CLOSED record is kept


_AGO_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, reference_ts: Optional[float] = None,
               now: Optional[float] = None) -> float:
    """'2026-11-27T13:20:00', '13:20', '13:20:05' (on the recording's first
    day), epoch seconds, or a time ago: '10m', '2h', '1d6h', '90s' (that long
    before now) -> epoch seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if re.fullmatch(r"(\d+[smhd])+", text):
        ago = sum(int(n) * _AGO_UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
        return (time.time() if now is None else now) - ago
    m = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text)
    if m:
        day = _dt.datetime.fromtimestamp(reference_ts or 0).astimezone()
        hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day")
        return day.replace(hour=hour, minute=minute, second=second, microsecond=0).timestamp()
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time (use 13:20, 13:20:05, "
                         f"2026-11-27T13:20:00, epoch seconds, or 10m / 2h / 1d ago)")
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


@dataclass
class ReplayFilter:
    sockets: SocketFilter = SocketFilter()
    holders: HolderFilter = HolderFilter()
    since: Optional[float] = None
    until: Optional[float] = None
    # pid -> identity from the `process` records read so far (a process
    # record precedes the linger records of its batch), for --cgroup,
    # --container and --unit: not the record's identity (kept whole, 20,000
    # of them with a 7 MB list under an extra key each: gigabytes), but
    # whether it passes those filters, as one of two shared stand-ins (below).
    identities: dict = field(default_factory=dict)
    # An identity that passed the identity filters (the first seen, its
    # cgroup only: all the filters read), shared by every pid whose
    # identity passed; the identity filters are a function of the identity
    # alone, so any one that passed stands for all that did.
    _passed: Optional[dict] = None
    # Sockets whose linger record was kept: their CLOSED record is kept too,
    # whoever closed them (a reset names nobody), as the live tail does.
    shown: set = field(default_factory=set)

    def keep(self, rec: dict) -> bool:
        kind = rec.get("type")
        if kind == "process" and self.holders.needs_identity:
            if isinstance(rec.get("identity"), dict):
                pid = rec.get("pid")
                self.identities.pop(pid, None)
                if len(self.identities) >= MAX_IDENTITIES:     # the oldest forgotten
                    del self.identities[next(iter(self.identities))]
                self.identities[pid] = self._stand_in(rec["identity"])
        if kind not in SHOWN:
            return False
        if kind not in PER_SOCKET:
            return True
        ts = rec.get("ts", 0)
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts > self.until:
            return False
        if not self.sockets.matches_record(rec):
            return False
        if self.holders.active:
            key = _socket_key(rec)
            if kind == "closed" and key in self.shown:
                self.shown.discard(key)
                return True
            identities = self.identities if self.holders.needs_identity else None
            if not self.holders.matches(record_people(rec, identities)):
                return False
            if kind == "linger" and len(self.shown) < MAX_SHOWN:
                # Past MAX_SHOWN, a CLOSED record is judged by who closed it.
                self.shown.add(key)
        return True


    def _stand_in(self, ident: dict) -> dict:
        """What is kept of a process's identity: _passed when it passes
        the identity filters (--cgroup, --container, --unit), else
        _FAILED, which passes none of them (no cgroup)."""
        only = HolderFilter(cgroups=self.holders.cgroups, containers=self.holders.containers,
                            units=self.holders.units)
        if not only.matches_person({"identity": ident}):
            return _FAILED
        if self._passed is None:
            self._passed = {"cgroup": ident.get("cgroup")}
        return self._passed


# The stand-in of an identity that fails the identity filters: without a
# cgroup, no container, unit or cgroup filter passes.
_FAILED: dict = {}


def _socket_key(rec: dict) -> tuple:
    return tuple(str(rec.get(k)) for k in ("family", "laddr", "lport", "raddr", "rport"))


def replay(records: Iterable[dict], keep: ReplayFilter, source: Optional[ReplaySource] = None,
           headers: bool = False) -> Iterator[dict]:
    """The records to show, one at a time as they are read: those the
    filter keeps, and each file's header with headers=True (the text
    replay says where each file starts). source sees every record read,
    shown or not, for the banner and the summary."""
    for rec in records:
        if source is not None:
            source.saw(rec)
        if keep.keep(rec) or (headers and rec.get("type") == "header"):
            yield rec


@dataclass
class Replay:
    """A replay of recordings, ready to stream: the reader (its headers
    checked), the filter, and what the banner and the summary say."""
    reader: RecordingReader
    keep: ReplayFilter
    source: ReplaySource

    @classmethod
    def open(cls, paths: list, sockets: SocketFilter = SocketFilter(),
             holders: HolderFilter = HolderFilter(), since: Optional[str] = None,
             until: Optional[str] = None) -> "Replay":
        reader = RecordingReader(paths)
        first_ts = reader.first_header.get("start_ts")
        keep = ReplayFilter(sockets=sockets, holders=holders,
                            since=parse_when(since, first_ts) if since else None,
                            until=parse_when(until, first_ts) if until else None)
        # The banner names the file, the capture and the filters; the summary
        # counts what was shown after them (a replay must not pass for a trace).
        described = "; ".join(x for x in (
            sockets.describe(), holders.describe() if holders.active else "",
            f"since {since}" if since else "", f"until {until}" if until else "") if x)
        entries = dataclasses.replace(keep, since=None, until=None)
        source = ReplaySource(paths=list(paths), filters=described,
                              keep_entry=lambda e: entries.keep(dict(e, type="linger")))
        # The banner gives the capture's span: its end is read from the tail of
        # the last part (standard input cannot be read twice: the start only).
        source.end_ts = reader.end_ts()
        return cls(reader, keep, source)

    def records(self, headers: bool = False,
                on_wait: Optional[Callable[[], None]] = None) -> Iterator[dict]:
        """The records to show as they are read; on_wait is called before
        the reader waits for more input (a pipe): the caller flushes what
        it has shown, so a replay of a live pipe shows records as they come."""
        self.reader.on_wait = on_wait
        return replay(self.reader, self.keep, self.source, headers)


def show(path: str, sockets: SocketFilter, holders: HolderFilter, since: Optional[str],
         until: Optional[str], out) -> None:
    """-r: records streamed from the reader to the terminal sink `out`
    (output/terminal.py), one at a time: memory is bounded by the reader's
    line cap and the renderer's and filter's caps, never by the size of
    the recording."""
    session = Replay.open([path], sockets, holders, since, until)
    out.renderer.replay = session.source
    try:
        for r in session.records(headers=not out.as_json, on_wait=out.flush):
            out.emit(r)
    finally:
        # Whatever ends it (Ctrl-C too): what the sink holds is written,
        # the line of a run of CHANGE rows it was folding among it.
        out.flush()
    if not out.as_json:
        for line in out.renderer.replay_end():
            out.write_line(line)
    out.flush()
    warn_damage(session.reader)


def warn_damage(reader: RecordingReader) -> None:
    """What the reader skipped or found wrong, on stderr, after the output."""
    if reader.skipped:
        notice(f"closewait-trace: warning: skipped {reader.skipped} damaged line(s); "
               f"the rest was read")
    for problem in reader.problems:
        # Problems quote file names and content: escaped like all text.
        notice(f"closewait-trace: warning: {escape(problem)}")


class WindowError(ValueError):
    """--since is after --until: a usage error (cli.py says it as one)."""


def window_of(since: Optional[str], until: Optional[str], first_ts) -> dict:
    """--since/--until as epoch seconds (a time of day is on the first
    capture's day, as in a replay)."""
    window = {"since": parse_when(since, first_ts) if since else None,
              "until": parse_when(until, first_ts) if until else None}
    if None not in window.values() and window["since"] > window["until"]:
        raise WindowError(f"--since {since} is after --until {until}")
    return window


def write_report(paths: list, by: list, since: Optional[str], until: Optional[str],
                 as_json: bool, top: int, out) -> None:
    """`report`: the recordings streamed from the reader into the report,
    whose state is bounded (report.MAX_*) whatever their size, then the
    report through the terminal sink `out`."""
    from closewait_trace.output import report
    reader = RecordingReader(paths)
    window = window_of(since, until, reader.first_header.get("start_ts"))
    rep = report.build(reader, source=reader, by=list(dict.fromkeys(by)), **window)
    if as_json:
        out.write_lines([json_dumps(rep)])
    else:
        out.write_lines(report.render_text(rep, top=top))
    out.flush()
    warn_damage(reader)
