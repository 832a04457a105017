"""Builders of the output records: one JSON-ready dict per event, the same
for --json, for recordings and for the text renderer, so that every output
path shows the same facts. Each record's shape is defined once, in
schema.py; the README's table is checked against it.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Iterable, Optional

from closewait_trace.output import schema
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints, peer_missing
from closewait_trace.output.schema import SCHEMA_VERSION


_tz_cache: dict = {}


def zone_of(ts: float):
    """The local zone (a fixed offset) that wall_time gives ts in. Looking
    it up costs more than the rest of a record; it is cached per hour (a
    DST change shows up within the hour it happens)."""
    hour = int(ts // 3600)
    tz = _tz_cache.get(hour)
    if tz is None:
        tz = _dt.datetime.fromtimestamp(ts).astimezone().tzinfo
        _tz_cache.clear()
        _tz_cache[hour] = tz
    return tz


def wall_time_in(ts: float, tz) -> str:
    return _dt.datetime.fromtimestamp(ts, tz).isoformat(timespec="microseconds")


class WallClock:
    """wall_time's text, with the text up to the second (and the zone's
    offset) made once per second and the microseconds filled in: the same
    rounding as datetime.fromtimestamp (half to even, at the microsecond),
    the same zone (zone_of's per-hour cache). Made whole for each record
    it cost 1.26 us, so 0.49 us (a batch of 100,000 records spans a few
    seconds)."""

    def __init__(self):
        self._whole = None
        self._tz = None
        self._head = ""
        self._tail = ""

    def text(self, ts: float) -> str:
        frac, whole = math.modf(ts)
        us = round(frac * 1e6)
        if us >= 1_000_000:
            whole += 1.0
            us -= 1_000_000
        elif us < 0:
            whole -= 1.0
            us += 1_000_000
        # The zone as for ts (its hour): a new one (the hour, or the cache
        # cleared) makes the head again, as a new second does.
        tz = zone_of(ts)
        if whole != self._whole or tz is not self._tz:
            # The same zone as for ts, at the whole second.
            full = wall_time_in(whole, tz)
            dot = full.index(".")
            self._whole, self._tz, self._head, self._tail = whole, tz, full[:dot + 1], full[dot + 7:]
        return f"{self._head}{us:06d}{self._tail}"


_clock = WallClock()


def wall_time(ts: float) -> str:
    """ts on the wall clock, ISO 8601 with microseconds and the local zone's
    offset (what wall_time_in(ts, zone_of(ts)) gives)."""
    return _clock.text(ts)


def _base(kind: str, ts: float) -> dict:
    # Typed as plain dict: each builder's return annotation names its schema.
    return {"type": kind, "ts": round(ts, 6), "time": wall_time(ts)}


def endpoint_fields(ep: Endpoints) -> schema.Endpoint:
    return {"family": ep.family_name, "laddr": ep.laddr, "lport": ep.lport,
            "raddr": ep.raddr, "rport": ep.rport}


def holder_dicts(holders, facts: Optional[dict] = None) -> list[schema.Holder]:
    """Holders as written, with what the diagnosis learnt of each fd."""
    out = []
    for h in holders:
        d = h.as_dict()
        if facts:
            d.update(facts.get((h.pid, h.fd), ()))
        out.append(d)
    return out


def age_values(age_ns: int, source: str, max_ns: Optional[int]) -> tuple:
    """The values of age_fields, in its order."""
    return (round(age_ns / 1e9, 6), source,
            round(max_ns / 1e9, 6) if max_ns is not None else None, source == "lower_bound")


def age_fields(prefix: str, age_ns: int, source: str, max_ns: Optional[int]) -> dict:
    """`age_*` or `duration_*`: how long, how it was known, the upper bound
    of an estimate (see schema.AgeSource)."""
    seconds, source, max_s, lower_bound = age_values(age_ns, source, max_ns)
    return {f"{prefix}_s": seconds, f"{prefix}_source": source, f"{prefix}_max_s": max_s,
            f"{prefix}_is_lower_bound": lower_bound}


def lingerer_age_max_ns(lingerer, age_ns: int) -> Optional[int]:
    """The upper bound of a lingering socket's age, when it is estimated."""
    source, enter_max = lingerer.age_source, lingerer.enter_max_ns
    if source in ("estimated", "range") and enter_max is not None:
        # age_max = now - earliest possible entry; now = enter + age.
        return max(age_ns, lingerer.enter_ns + age_ns - enter_max)
    return None


def lingerer_age_values(lingerer, age_ns: int) -> tuple:
    """age_values of a lingering socket's age: its record's age fields."""
    return age_values(age_ns, lingerer.age_source, lingerer_age_max_ns(lingerer, age_ns))


def _lingerer_age(lingerer, age_ns: int) -> dict:
    return age_fields("age", age_ns, lingerer.age_source, lingerer_age_max_ns(lingerer, age_ns))


class Shared(dict):
    """A record's part made once and never changed afterwards, carried by
    many records (a listener's part of the records of every socket
    accepted from it; a `code` shared by the sockets with the same
    reasons). Written like any dict; an encoder may keep its JSON by the
    object's identity (lingerlines.LingerJson does: the listener's part was
    a quarter of a linger record's encoding)."""
    __slots__ = ()


# The listener (its namespace, inode and address) -> (row, holders,
# Shared): the listener's part once per listener and owner answer (the
# worker's answer shares one row and one holders tuple among the sockets of
# a listener), not once per socket; taken only for that same row and
# holders, neither changed after the answer is unpickled. One entry a
# listener, its last answer's: the next answer's row and holders are new
# objects, so an older answer's part would never be taken again, and keyed
# by their ids each answer's stayed, holding its tuple of holders (a
# listener of 1,000 forks with a socket a tick: 65 answers' holders, each
# with its process snapshot and entries, until the cap below; review F3).
_listener_parts: dict = {}
LISTENER_PARTS_KEPT = 1024
# And the holders' entries they hold, in all: a listener can have
# thousands of holders (forks of one server, or a user's), and 1,024 such
# parts kept a dict for each, gigabytes for one user's forks.
LISTENER_HOLDERS_KEPT = 65536
_listener_holders_kept = 0
_big_listener_part: tuple = (None, None, None)


def listener_part(own) -> "Shared":
    global _listener_holders_kept, _big_listener_part
    row, holders = own.listener, own.listener_holders
    ep = row.endpoints
    key = (ep.netns, row.inode, ep.family, ep.lport, ep.laddr)
    hit = _listener_parts.get(key)
    if hit is not None and hit[0] is row and hit[1] is holders:
        return hit[2]
    hit = _big_listener_part
    if hit[0] is row and hit[1] is holders:
        return hit[2]
    part = Shared({"local": row.endpoints.local, "accept_queue": row.rx_queue,
                   "backlog": row.tx_queue, "owners": holder_dicts(holders)})
    if own.holders_cut and own.holders_cut[1]:
        part["owners_not_listed"] = own.holders_cut[1]
    if len(holders) > LISTENER_HOLDERS_KEPT // 8:
        # Too many to keep with the others (thousands of processes holding
        # one listener): kept alone, the last such, so that the sockets of
        # that listener share it (lingerlines keeps its JSON by identity)
        # instead of each making and encoding it again (14 ms a record).
        _big_listener_part = (row, holders, part)
        return part
    replaced = _listener_parts.pop(key, None)
    if replaced is not None:
        _listener_holders_kept -= len(replaced[1])
    if (len(_listener_parts) >= LISTENER_PARTS_KEPT
            or _listener_holders_kept + len(holders) > LISTENER_HOLDERS_KEPT):
        _listener_parts.clear()
        _listener_holders_kept = 0
    _listener_parts[key] = (row, holders, part)
    _listener_holders_kept += len(holders)
    return part


def ownership_fields(own, facts: Optional[dict] = None) -> dict:
    if own is None:
        return {"owner_kind": None, "owners": [], "netns": None, "inode": None,
                "unread_bytes": None, "eof_read": None, "listener": None,
                "also_in_netns": []}
    listener = listener_part(own) if own.listener is not None else None
    out = {"owner_kind": own.kind, "owners": holder_dicts(own.holders, facts)}
    if own.holders_cut and own.holders_cut[0]:
        out["owners_not_listed"] = own.holders_cut[0]
    out.update({"netns": own.netns, "inode": own.inode, "unread_bytes": own.unread_bytes,
                "eof_read": own.eof_read,
                "listener": listener, "also_in_netns": list(own.other_netns)})
    return out


def linger(lingerer, ts: float, age_ns: int, update: bool = False) -> schema.LingerRecord:
    """update: the socket was reported before; its holders' state changed and
    this is its new diagnosis."""
    rec = _base("linger", ts)
    rec.update(endpoint_fields(lingerer.endpoints))
    rec.update(_lingerer_age(lingerer, age_ns))
    rec.update({
        "pre_existing": lingerer.before_start,
        "update": update,
        # The kernel's socket address stays inside the tool: written out it
        # would leak a kernel pointer (defeating KASLR) into shareable files.
    })
    diag = lingerer.diagnosis
    rec.update(ownership_fields(lingerer.ownership, diag.holder_facts() if diag else None))
    rec["diagnosis"] = diag.as_dict() if diag else None
    rec["code"] = linger_code(lingerer)
    rec["entered_at"] = entered_at(ts, rec["age_s"])
    return rec


def linger_code(lingerer) -> dict:
    return lingerer.code or code_unknown(CODE_NOT_LOOKED_UP)


def entered_at(ts: float, age_s: float) -> float:
    """Since when, on the wall clock: what an on-call compares with a
    deploy or an alert (the row's TIME is when it was reported)."""
    return round(max(0.0, ts - age_s), 3)


# Why a linger record does not say where its socket was read to its end.
CODE_PRE_EXISTING = "in CLOSE_WAIT before the trace began"
CODE_FOUND_LATE = ("its entry into CLOSE_WAIT was not seen (the kernel skipped the "
                   "program, its map was full, or its hook missed it): found by a rescan")
CODE_ENTRY_UNKNOWN = ("in CLOSE_WAIT before the trace began, or its entry not seen since: "
                      "first found by a rescan in a namespace the start did not read, "
                      "after the kernel missed some")
CODE_NOT_LOOKED_UP = "not looked up"
CODE_SNAPSHOT = ("not known to a snapshot (only a live trace sees the read of EOF and the "
                 "connect())")
CODE_NOT_KEPT = ("read to its end, but the place was not kept (over the capture rate, "
                 "or the capture map was full: see the summary's losses)")


CODE_OPEN_NOT_KEPT = ("no connect() kept for it: over the capture rate, or the capture map "
                      "was full, or it was not connect()ed during the trace (accepted)")


def code_unknown(why: str, opened_why: Optional[str] = "") -> schema.Code:
    """Neither place known, for the same reason (or opened_why for the
    connect())."""
    return {"eof_read": None, "eof_read_unknown": why, "opened": None,
            "opened_unknown": why if opened_why == "" else opened_why}


def code_none_seen(opened_why: Optional[str] = None) -> schema.Code:
    """Traced since it entered CLOSE_WAIT, and no read returned its end."""
    return code_unknown(None, opened_why)


def code_place(capture, ts: float, stack: Optional[list], place: Optional[dict]) -> dict:
    """capture: a kernel.events.EofCapture; stack: its frames as dicts, or
    None when they were not unwound in time; place: the frame to name."""
    frames = list(stack or [])
    return {"ts": round(ts, 6), "pid": capture.pid, "tid": capture.tid, "comm": capture.comm,
            "place": place, "stack": frames, "stack_bytes": len(capture.stack),
            "unwound": stack is not None}


def code_eof_read(capture, ts: float, enter_ns: int, stack: Optional[list],
                  place: Optional[dict]) -> schema.Code:
    """The EOF read's place in a fresh `code` (tests; the tracer sets it on
    the socket's own)."""
    code = code_none_seen()
    code["eof_read"] = dict(code_place(capture, ts, stack, place),
                            after_s=round(max(0, capture.ts_ns - enter_ns) / 1e9, 6))
    return code


def lingering_entry(lingerer, age_ns: int) -> schema.LingeringEntry:
    """A socket still lingering, for snapshots and the summary: what it is,
    how old, who holds it and why, without the evidence (which its linger
    record already carried). Small, because there may be 100,000 of them."""
    own = lingerer.ownership
    entry = endpoint_fields(lingerer.endpoints)
    entry.update(_lingerer_age(lingerer, age_ns))
    entry.update({
        "owner_kind": own.kind if own is not None else None,
        "owners": [{"pid": h.pid, "comm": h.comm, "fd": h.fd, "state": h.state}
                   for h in own.holders] if own is not None else [],
    })
    if own is not None and own.holders_cut and own.holders_cut[0]:
        entry["owners_not_listed"] = own.holders_cut[0]
    entry["diagnosis"] = ({"cause": lingerer.diagnosis.cause,
                           "summary": lingerer.diagnosis.summary}
                          if lingerer.diagnosis else None)
    return entry


def process(ts: float, evidence: dict) -> schema.ProcessRecord:
    """A holder's process-wide evidence: threads, their system calls and
    stacks, user, container, namespace. Written before the linger records of
    the same batch that name the process among their holders."""
    rec = _base("process", ts)
    rec.update(evidence)
    return rec


def closed(c, ts: float) -> schema.ClosedRecord:
    rec = _base("closed", ts)
    rec.update(endpoint_fields(c.endpoints))
    rec.update(age_fields("duration", c.duration_ns, c.duration_source, c.duration_max_ns))
    rec.update({
        "how": c.how,
        "newstate": tcpstates.name(c.newstate),
        "closed_by": None if c.closer is None else {"pid": c.closer[0], "comm": c.closer[1]},
        "cpu_task": {"pid": c.cpu_task[0], "comm": c.cpu_task[1]},
        "pre_existing": c.pre_existing,
        "reported": c.reported,
    })
    return rec


def transition(ev, ts: float) -> schema.TransitionRecord:
    """--all: one TCP state transition. The task is named only where the
    kernel makes that transition in the owning process's own system call;
    elsewhere it ran in softirq on whatever task was on the CPU."""
    rec = _base("transition", ts)
    rec.update(endpoint_fields(ev.endpoints))
    in_process = tcpstates.runs_in_process_context(ev.oldstate, ev.newstate)
    rec.update({
        "oldstate": tcpstates.name(ev.oldstate),
        "newstate": tcpstates.name(ev.newstate),
        # 0 from the kernel means it had not seen this socket before.
        "prev_state_s": round(ev.duration_ns / 1e9, 9) if ev.duration_ns else None,
        "task": {"pid": ev.pid, "comm": ev.comm} if in_process else None,
        # False where the kernel did not give the peer (see events.peer_missing)
        "peer_known": not peer_missing(ev.oldstate, ev.newstate, ev.endpoints),
    })
    return rec


def lost(ts: float, counter: str, delta: int, total: int) -> schema.LostRecord:
    rec = _base("lost", ts)
    rec.update({"counter": counter, "count": delta, "total": total})
    return rec


def histogram_buckets(slots: list[int]) -> list[schema.HistogramBucket]:
    """Kernel log2 slots (microseconds) -> [{from_us, to_us, count}]; slot 0
    holds durations under 1 us, slot i holds [2^(i-1), 2^i) us."""
    out = []
    for i, count in enumerate(slots):
        if not count:
            continue
        low = 0 if i == 0 else 1 << (i - 1)
        out.append({"from_us": low, "to_us": 1 << i if i else 1, "count": count})
    return out


def summary(ts: float, started_ts: float, counters: dict, slots: list[int],
            still_lingering: Iterable[dict], linger_lines: int, closed_lines: int,
            extra: Optional[dict] = None) -> schema.SummaryRecord:
    rec = _base("summary", ts)
    rec.update({
        "traced_s": round(ts - started_ts, 3),
        "counters": dict(counters),
        "histogram_us": histogram_buckets(slots),
        "linger_reported": linger_lines,
        "closed_reported": closed_lines,
        "still_lingering": list(still_lingering),
    })
    if extra:
        rec.update(extra)
    return rec


def snapshot(ts: float, lingering: list[dict], counters: dict,
             slots: list[int]) -> schema.SnapshotRecord:
    rec = _base("snapshot", ts)
    rec.update({"lingering": lingering, "counters": dict(counters),
                "histogram_us": histogram_buckets(slots)})
    return rec


def start(ts: float, threshold_ns: int, filters: dict, pre_existing: int,
          headers: str, transport: str, all_transitions: bool = False) -> schema.StartRecord:
    rec = _base("start", ts)
    rec.update({"schema": SCHEMA_VERSION, "threshold_s": threshold_ns / 1e9,
                "filters": filters, "pre_existing": pre_existing,
                "headers": headers, "transport": transport,
                "all_transitions": all_transitions})
    return rec
