"""Postmortem report over recordings (pure): who left sockets in CLOSE_WAIT,
how many, for how long; by port and by peer; the duration histogram; a
timeline of lingering sockets; what was still lingering at the end; and every
gap or loss in the capture."""

from __future__ import annotations

import datetime as _dt
from collections import defaultdict
from dataclasses import dataclass

from closewait_trace.durations import format_age
from closewait_trace.events import join_host_port
from closewait_trace.recording import Recording
from closewait_trace.render import histogram_lines


def _key(rec: dict) -> tuple:
    return (rec.get("family"), rec.get("laddr"), rec.get("lport"),
            rec.get("raddr"), rec.get("rport"))


@dataclass
class Linger:
    rec: dict                   # the linger record (owners, diagnosis)
    entered: float              # wall time it entered CLOSE_WAIT (or a lower bound)
    duration: float = 0.0       # seconds in CLOSE_WAIT (so far, when still open)
    closed: bool = False
    lower_bound: bool = False


@dataclass
class Group:
    count: int = 0
    total_s: float = 0.0
    longest_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.longest_s = max(self.longest_s, seconds)

    def as_dict(self) -> dict:
        return {"count": self.count, "total_s": round(self.total_s, 3),
                "longest_s": round(self.longest_s, 3)}


def _merge_slots(into: dict, buckets: list[dict]) -> None:
    for b in buckets or []:
        into[(b["from_us"], b["to_us"])] = into.get((b["from_us"], b["to_us"]), 0) + b["count"]


def build(rec: Recording, timeline_buckets: int = 40) -> dict:
    captures = []            # (capture_id, first_ts, last_ts, clean_end)
    lingers: dict[tuple, Linger] = {}
    finished: list[Linger] = []
    histogram: dict = {}
    losses = []
    current_capture = None
    capture_hist = None       # the latest histogram seen in this capture
    last_ts = None
    end_state = {}
    write_errors = 0

    ended_lingering: list[Linger] = []     # still open when their capture ended

    def close_capture(clean: bool):
        nonlocal capture_hist
        for l in lingers.values():
            if last_ts is not None:
                l.duration = max(l.duration, last_ts - l.entered)
            ended_lingering.append(l)
        lingers.clear()
        if current_capture is not None:
            captures.append({"capture_id": current_capture["id"],
                             "hostname": current_capture["hostname"],
                             "start_ts": current_capture["start"], "end_ts": last_ts,
                             "clean_end": clean})
            _merge_slots(histogram, capture_hist)
        capture_hist = None

    clean = False
    for r in rec.records:
        kind = r.get("type")
        ts = r.get("ts", r.get("start_ts"))
        if kind == "header":
            if current_capture is None or r.get("capture_id") != current_capture["id"]:
                close_capture(clean)
                clean = False
                current_capture = {"id": r.get("capture_id"), "start": r.get("start_ts"),
                                   "hostname": r.get("hostname")}
            continue
        if ts is not None:
            last_ts = ts
        if kind == "linger":
            age = r.get("age_s", 0.0)
            l = Linger(rec=r, entered=r["ts"] - age, duration=age,
                       lower_bound=bool(r.get("age_is_lower_bound")))
            lingers[_key(r)] = l
        elif kind == "closed":
            l = lingers.pop(_key(r), None)
            if l is None:
                l = Linger(rec=r, entered=r["ts"] - r["duration_s"])
            l.duration = r["duration_s"]
            l.closed = True
            l.lower_bound = bool(r.get("duration_is_lower_bound"))
            finished.append(l)
        elif kind == "lost":
            losses.append({"ts": r["ts"], "what": r["counter"], "count": r["count"]})
        elif kind in ("snapshot", "summary"):
            capture_hist = r.get("histogram_us")
            end_state = {_key(s): s for s in r.get("still_lingering", r.get("lingering", []))}
            for k, s in end_state.items():
                if k in lingers:
                    lingers[k].duration = s.get("age_s", lingers[k].duration)
                elif ts is not None:
                    # Known only from the state: its linger record is in a
                    # part rotated away, or it was never reported.
                    lingers[k] = Linger(rec=s, entered=ts - s.get("age_s", 0.0),
                                        duration=s.get("age_s", 0.0),
                                        lower_bound=bool(s.get("age_is_lower_bound")))
            if kind == "summary":
                clean = True
                write_errors += r.get("write_errors", 0) or 0
    close_capture(clean)

    still = ended_lingering
    everything = finished + still

    by_process: dict = defaultdict(Group)
    by_port: dict = defaultdict(Group)
    by_peer: dict = defaultdict(Group)
    for l in everything:
        owners = l.rec.get("owners") or []
        names = {(o["pid"], o["comm"]) for o in owners}
        if not names and l.rec.get("listener"):
            names = {(o["pid"], o["comm"] + " (not accepting)")
                     for o in l.rec["listener"].get("owners") or []}
        for pid, comm in names or {(None, "(unknown)")}:
            by_process[(pid, comm)].add(l.duration)
        by_port[l.rec.get("lport")].add(l.duration)
        by_peer[l.rec.get("raddr")].add(l.duration)

    timeline = _timeline(everything, captures, timeline_buckets)
    gaps = []
    for a, b in zip(captures, captures[1:]):
        if a["end_ts"] and b["start_ts"] and b["start_ts"] > a["end_ts"]:
            gaps.append({"from_ts": a["end_ts"], "to_ts": b["start_ts"],
                         "seconds": round(b["start_ts"] - a["end_ts"], 3)})

    def table(groups, label):
        rows = sorted(groups.items(), key=lambda kv: (-kv[1].total_s, str(kv[0])))
        return [dict({label: k} if not isinstance(k, tuple) else {"pid": k[0], "comm": k[1]},
                     **g.as_dict()) for k, g in rows]

    return {
        "type": "report",
        "files": rec.files,
        "captures": captures,
        "sockets": len(everything),
        "by_process": table(by_process, "process"),
        "by_local_port": table(by_port, "lport"),
        "by_remote_peer": table(by_peer, "raddr"),
        "histogram_us": [{"from_us": k[0], "to_us": k[1], "count": v}
                         for k, v in sorted(histogram.items())],
        "timeline": timeline,
        "still_lingering": [dict(l.rec, age_s=round(l.duration, 3)) for l in
                            sorted(still, key=lambda l: l.entered)],
        "losses": {
            "lost_records": losses,
            "events_lost": sum(x["count"] for x in losses if x["what"] == "events_lost"),
            "map_full": sum(x["count"] for x in losses if x["what"] == "map_full"),
            "write_errors": write_errors,
            "skipped_lines": rec.skipped,
            "unclean_ends": sum(1 for c in captures if not c["clean_end"]),
            "missing_parts": [{"file": f, "part": p} for f, p in rec.missing_parts],
            "gaps_between_captures": gaps,
            "problems": rec.problems,
        },
    }


def _timeline(socks: list[Linger], captures: list[dict], buckets: int) -> list[dict]:
    starts = [c["start_ts"] for c in captures if c["start_ts"]]
    ends = [c["end_ts"] for c in captures if c["end_ts"]]
    if not starts or not ends:
        return []
    t0, t1 = min(starts), max(ends)
    if t1 <= t0:
        return []
    step = (t1 - t0) / buckets
    out = []
    for i in range(buckets):
        at = t0 + (i + 0.5) * step
        n = sum(1 for l in socks if l.entered <= at < l.entered + l.duration
                or (not l.closed and l.entered <= at))
        out.append({"ts": round(at, 3), "lingering": n})
    return out


def _clock(ts) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "?"


def render_text(rep: dict, top: int = 15) -> list[str]:
    lines = []
    caps = rep["captures"]
    lines.append(f"closewait-trace report: {len(rep['files'])} file(s), {len(caps)} capture(s), "
                 f"{rep['sockets']} socket(s) lingered in CLOSE_WAIT")
    for c in caps:
        end = "" if c["clean_end"] else "  (no clean end: killed or crashed)"
        lines.append(f"  {c['hostname']}: {_clock(c['start_ts'])} -> {_clock(c['end_ts'])}{end}")

    def section(title, rows, label):
        lines.append("")
        lines.append(title)
        lines.append(f"  {label:<32} {'COUNT':>6} {'TOTAL':>9} {'LONGEST':>9}")
        for row in rows[:top]:
            name = (f"{row['pid']}/{row['comm']}" if "pid" in row
                    else str(row.get("lport", row.get("raddr"))))
            lines.append(f"  {name[:32]:<32} {row['count']:>6} "
                         f"{format_age(int(row['total_s'] * 1e9)):>9} "
                         f"{format_age(int(row['longest_s'] * 1e9)):>9}")
        if len(rows) > top:
            lines.append(f"  ... {len(rows) - top} more (see --json)")

    section("By process (the holders that never closed):", rep["by_process"], "PID/COMMAND")
    section("By local port:", rep["by_local_port"], "PORT")
    section("By remote peer:", rep["by_remote_peer"], "PEER")
    lines.append("")
    lines.append("Time in CLOSE_WAIT, every socket the kernel timed (log2 histogram):")
    lines.extend(histogram_lines(rep["histogram_us"]))
    lines.append("")
    lines.append("Sockets lingering over time:")
    lines.extend(_timeline_lines(rep["timeline"]))
    lines.append("")
    still = rep["still_lingering"]
    lines.append(f"Still lingering at the end of the capture: {len(still)}")
    for s in still[:top]:
        owners = ", ".join(f"{o['pid']}/{o['comm']} fd {o['fd']}" for o in s.get("owners") or [])
        if not owners and s.get("owner_kind") == "accept_queue":
            owners = "(not accepted)"
        why = (s.get("diagnosis") or {}).get("summary", "")
        lines.append(f"  {join_host_port(s['laddr'], s['lport'])} <- "
                     f"{join_host_port(s['raddr'], s['rport'])} "
                     f"{format_age(int(s['age_s'] * 1e9))} {owners or '-'}")
        if why:
            lines.append(f"      {why}")
    if len(still) > top:
        lines.append(f"  ... {len(still) - top} more (see --json)")
    lines.append("")
    lines.extend(_loss_lines(rep["losses"]))
    return lines


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
    first = _dt.datetime.fromtimestamp(points[0]["ts"]).strftime("%H:%M:%S")
    last = _dt.datetime.fromtimestamp(points[-1]["ts"]).strftime("%H:%M:%S")
    rows.append(f"         {first}{last:>{max(1, len(points) - len(first))}}")
    return rows


def _loss_lines(losses: dict) -> list[str]:
    items = []
    if losses["events_lost"]:
        items.append(f"{losses['events_lost']} kernel events lost (ring buffer full)")
    if losses["map_full"]:
        items.append(f"{losses['map_full']} sockets not timed (tracking map full)")
    if losses["write_errors"]:
        items.append(f"{losses['write_errors']} records not written (disk full or I/O error)")
    if losses["skipped_lines"]:
        items.append(f"{losses['skipped_lines']} damaged lines skipped")
    if losses["unclean_ends"]:
        items.append(f"{losses['unclean_ends']} capture(s) ended without a summary (killed?)")
    for m in losses["missing_parts"]:
        items.append(f"part {m['part']} of {m['file']} missing")
    for g in losses["gaps_between_captures"]:
        items.append(f"gap of {format_age(int(g['seconds'] * 1e9))} between captures at "
                     f"{_clock(g['from_ts'])}")
    items.extend(losses["problems"])
    if not items:
        return ["Gaps and losses: none."]
    return ["Gaps and losses:"] + [f"  - {i}" for i in items]
