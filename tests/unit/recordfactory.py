"""Complete records for tests that write recordings by hand: readers skip
records that do not match the schema (schema.py), so a test record must be
whole. Keyword arguments replace fields."""

NO_FILTERS = {"lports": [], "rports": [], "family": None}


def holder(pid=42, comm="srv", fd=3, state="S", **kw):
    h = {"pid": pid, "comm": comm, "fd": fd, "state": state, "ppid": 1, "uid": 0,
         "cmdline": comm, "tracer_pid": 0}
    h.update(kw)
    return h


def start(ts=1000.0, **kw):
    rec = {"type": "start", "ts": ts, "time": "", "schema": 2, "threshold_s": 1.0,
           "filters": dict(NO_FILTERS), "pre_existing": 0, "headers": "",
           "transport": "ring buffer", "all_transitions": False}
    rec.update(kw)
    return rec


def linger(ts=1001.0, owners=None, cause="stopped", summary="stopped", **kw):
    owners = [holder()] if owners is None else owners
    rec = {"type": "linger", "ts": ts, "time": "", "family": "ipv4", "laddr": "127.0.0.1",
           "lport": 80, "raddr": "10.0.0.1", "rport": 40000,
           "age_s": 2.0, "age_source": "traced", "age_max_s": None,
           "age_is_lower_bound": False, "pre_existing": False, "update": False,
           "owner_kind": "fd", "owners": owners, "netns": None, "inode": None,
           "unread_bytes": 0, "eof_read": False, "listener": None, "also_in_netns": [],
           "diagnosis": {"cause": cause, "summary": summary, "evidence": {
               "holders": [{"pid": o["pid"], "fd": o["fd"]} for o in owners]}}}
    rec.update(kw)
    return rec


def closed(ts=1010.0, duration=12.0, **kw):
    rec = {"type": "closed", "ts": ts, "time": "", "family": "ipv4", "laddr": "127.0.0.1",
           "lport": 80, "raddr": "10.0.0.1", "rport": 40000,
           "duration_s": duration, "duration_source": "traced", "duration_max_s": None,
           "duration_is_lower_bound": False, "how": "close", "newstate": "LAST_ACK",
           "closed_by": {"pid": 42, "comm": "srv"}, "cpu_task": {"pid": 42, "comm": "srv"},
           "pre_existing": False, "reported": True}
    rec.update(kw)
    return rec


def snapshot(ts=1000.0, lingering=(), **kw):
    rec = {"type": "snapshot", "ts": ts, "time": "", "lingering": list(lingering),
           "counters": {}, "histogram_us": []}
    rec.update(kw)
    return rec


def summary(ts=1010.0, counters=None, **kw):
    rec = {"type": "summary", "ts": ts, "time": "", "traced_s": ts - 1000.0,
           "counters": dict(counters or {}), "histogram_us": [], "linger_reported": 0,
           "closed_reported": 0, "still_lingering": []}
    rec.update(kw)
    return rec


def process(pid=42, comm="srv", **kw):
    rec = {"type": "process", "ts": 1000.0, "time": "", "pid": pid, "comm": comm,
           "state": "S", "ppid": 1, "cmdline": comm, "exiting": False, "threads": [],
           "threads_total": 1, "identity": {}}
    rec.update(kw)
    return rec


def header(part=0, capture_id="cap", **kw):
    rec = {"type": "header", "format": "closewait-trace-recording", "format_version": 2,
           "tool_version": "0", "hostname": "h", "kernel_release": "6", "boot_id": "",
           "clock_offset_ns": 0, "start_ts": 1000.0, "threshold_s": 1.0,
           "filters": dict(NO_FILTERS), "mode": "closewait", "capture_id": capture_id,
           "part": part}
    rec.update(kw)
    return rec


_THREAD = {"tid": 1, "state": "S", "wchan": "", "syscall": None, "syscall_fd": None,
           "syscall_fd_target": None, "stack": []}
_FRAME = {"pc": "0x0", "function": None, "offset": None, "module": None, "build_id": None,
          "method": "pc", "symbols": None}
_BUILDERS = {"linger": linger, "closed": closed, "start": start, "snapshot": snapshot,
             "process": process, "header": header}


def complete(rec: dict) -> dict:
    """A hand-written (often hostile) record made whole: every field it
    lacks takes the factory's value, nested holders, threads and frames
    too; what it has is kept as it is."""
    kind = rec.get("type")
    build = _BUILDERS.get(kind)
    if build is None:
        return rec
    out = build()
    if kind == "linger" and "owners" in rec:
        out["diagnosis"]["evidence"]["holders"] = [
            {"pid": o.get("pid", 0), "fd": o.get("fd", 0)} for o in rec["owners"]
            if isinstance(o, dict)]
    if kind == "header" and rec.get("filters") == {}:
        rec = dict(rec, filters=dict(NO_FILTERS))
    if kind == "start" and rec.get("filters") == {}:
        rec = dict(rec, filters=dict(NO_FILTERS))
    out.update(rec)
    if isinstance(out.get("owners"), list):
        out["owners"] = [dict(holder(), **o) if isinstance(o, dict) else o
                         for o in out["owners"]]
    if isinstance(out.get("diagnosis"), dict):
        out["diagnosis"] = dict({"evidence": {}}, **out["diagnosis"])
        ev = out["diagnosis"]["evidence"]
        if isinstance(ev, dict) and isinstance(ev.get("holders"), list):
            ev["holders"] = [{"pid": h.get("pid"), "fd": h.get("fd")} if isinstance(h, dict)
                             else h for h in ev["holders"]]
    if kind == "process" and isinstance(out.get("threads"), list):
        out["threads"] = [dict(dict(_THREAD, **t), stack=[dict(_FRAME, **f)
                                                           for f in t.get("stack", [])])
                          if isinstance(t, dict) else t for t in out["threads"]]
    return out
