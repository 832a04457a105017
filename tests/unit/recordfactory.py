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
