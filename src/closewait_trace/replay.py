"""Replay of recordings: the recorded records, filtered, rendered through the
same Output the live tail uses, so a replay prints what the run printed."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from closewait_trace.filters import SocketFilter

# Records the live tail printed; headers and snapshots are for readers only.
SHOWN = ("start", "process", "linger", "closed", "lost", "summary", "transition")
# Records that describe one socket, to which the filters apply.
PER_SOCKET = ("linger", "closed", "transition")


def parse_when(text: str, reference_ts: Optional[float] = None) -> float:
    """'2026-11-27T13:20:00', '13:20', '13:20:05' (on the recording's first
    day) or epoch seconds -> epoch seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
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
                         f"2026-11-27T13:20:00 or epoch seconds)")
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


@dataclass
class ReplayFilter:
    sockets: SocketFilter = SocketFilter()
    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()
    since: Optional[float] = None
    until: Optional[float] = None

    def _pids_comms(self, rec: dict) -> tuple[set, set]:
        people = list(rec.get("owners") or [])
        if rec.get("listener"):
            people += rec["listener"].get("owners") or []
        for key in ("closed_by", "task"):
            if rec.get(key):
                people.append(rec[key])
        return {p.get("pid") for p in people}, {p.get("comm") for p in people}

    def keep(self, rec: dict) -> bool:
        kind = rec.get("type")
        if kind not in SHOWN:
            return False
        if kind not in PER_SOCKET:
            return True
        ts = rec.get("ts", 0)
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts > self.until:
            return False
        if self.sockets.lports and rec.get("lport") not in self.sockets.lports:
            return False
        if self.sockets.rports and rec.get("rport") not in self.sockets.rports:
            return False
        family = self.sockets.as_dict()["family"]
        if family and rec.get("family") != family:
            return False
        if self.pids or self.comms:
            pids, comms = self._pids_comms(rec)
            if self.pids and not pids & set(self.pids):
                return False
            if self.comms and not comms & set(self.comms):
                return False
        return True


def replay(records: Iterable[dict], keep: ReplayFilter) -> Iterator[dict]:
    for rec in records:
        if keep.keep(rec):
            yield rec
