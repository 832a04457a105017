"""Text rendering of output records (pure). The default layout fits 80
columns for IPv4; --wide widens the address columns for IPv6."""

from __future__ import annotations

import datetime as _dt

from closewait_trace.durations import format_age

COUNTER_TEXT = {
    "events_lost": "events lost: the ring buffer was full",
    "map_full": "sockets not timed: the tracking map was full",
}


def banner(threshold_ns: int, filters_text: str = "") -> list[str]:
    lines = [f"Tracing TCP sockets lingering in CLOSE_WAIT >= "
             f"{format_age(threshold_ns)}... Ctrl-C to end."]
    if filters_text:
        lines.append(f"Only: {filters_text}")
    return lines


class TextRenderer:
    def __init__(self, wide: bool = False, verbose: bool = False):
        self.addr_width = 47 if wide else 21
        self.verbose = verbose
        self.event_width = 6      # 9 with --all, for OLD>NEW (e.g. SYNS>SYNR)
        self.processes: dict = {}  # pid -> latest process record, for -v

    def header(self) -> str:
        w = self.addr_width
        return (f"{'TIME':<8} {'EVENT':<{self.event_width}} {'LOCAL':<{w}} {'REMOTE':<{w}} "
                f"{'AGE':>8} {'OWNER' if self.event_width == 6 else 'OWNER/TASK'}")

    def _owner_width(self) -> int:
        # 80 columns minus TIME, EVENT, two addresses and AGE (">=12m03s").
        return max(8, 80 - (8 + 1 + 6 + 1 + 2 * (self.addr_width + 1) + 8 + 1))

    def _row(self, rec: dict, event: str, age: str, owner: str) -> str:
        w = self.addr_width
        clock = _dt.datetime.fromtimestamp(rec["ts"]).strftime("%H:%M:%S")
        local = _hostport(rec["laddr"], rec["lport"])
        remote = _hostport(rec["raddr"], rec["rport"])
        if rec.get("peer_known") is False:
            remote = PEER_NOT_GIVEN         # not 0.0.0.0:0 as if that were the peer
        line = (f"{clock:<8} {event:<{self.event_width}} {local:<{w}} {remote:<{w}} {age:>8} ")
        return line + owner[:max(8, 80 - len(line))]

    def render(self, rec: dict) -> list[str]:
        kind = rec.get("type")
        if kind == "start":
            from closewait_trace.filters import SocketFilter
            self.event_width = 9 if rec.get("all_transitions") else 6
            threshold_ns = int(round(rec["threshold_s"] * 1e9))
            return banner(threshold_ns, SocketFilter.from_dict(rec.get("filters")).describe()) + [self.header()]
        if kind == "linger":
            return self._linger(rec)
        if kind == "closed":
            return self._closed(rec)
        if kind == "process":
            self.processes[rec["pid"]] = rec    # shown through the linger lines (-v)
            return []
        if kind == "transition":
            return [self._transition(rec)]
        if kind == "lost":
            what = COUNTER_TEXT.get(rec["counter"], rec["counter"])
            return [f"WARNING: {rec['count']} {what} (total {rec['total']})"]
        if kind == "summary":
            return summary_lines(rec)
        return []

    def _linger(self, rec: dict) -> list[str]:
        age = format_age(int(rec["age_s"] * 1e9))
        if rec.get("age_is_lower_bound"):
            age = ">=" + age
        owners = rec.get("owners") or []
        if owners:
            first = owners[0]
            owner = f"{first['pid']}/{first['comm']}"
            if len({o['pid'] for o in owners}) > 1:
                owner = f"+{len({o['pid'] for o in owners}) - 1} " + owner
        elif rec.get("owner_kind") == "accept_queue":
            owner = "(not accepted)"
        else:
            owner = "-"
        lines = [self._row(rec, "CHANGE" if rec.get("update") else "LINGER", age, owner)]
        diagnosis = rec.get("diagnosis")
        if diagnosis:
            # The holders' states lead the line: [T] stopped, [S] sleeping...
            states = "".join(sorted({o["state"] for o in owners}))
            prefix = f"[{states}] " if states else ""
            lines.append(("         " + prefix + diagnosis["summary"])[:80 if not self.verbose else None])
        if self.verbose:
            lines.extend(evidence_lines(rec, self.processes))
        return lines

    def _transition(self, rec: dict) -> str:
        prev = rec.get("prev_state_s")
        age = "?" if prev is None else format_age(int(prev * 1e9))
        task = rec.get("task")
        who = f"{task['pid']}/{task['comm']}" if task else "-"
        change = f"{_SHORT.get(rec['oldstate'], rec['oldstate'])}>{_SHORT.get(rec['newstate'], rec['newstate'])}"
        return self._row(rec, change, age, who)

    def _closed(self, rec: dict) -> list[str]:
        age = format_age(int(rec["duration_s"] * 1e9))
        if rec.get("duration_is_lower_bound"):
            age = ">=" + age
        by = rec.get("closed_by")
        event = {"close": "CLOSED", "abort": "ABORT", "reset": "RESET"}.get(rec["how"], "GONE")
        owner = f"{by['pid']}/{by['comm']}" if by else "-"
        return [self._row(rec, event, age, owner)]


# --all, kernels before 6.15: the accepted socket's first transition comes
# without the peer's address (the README's --all section explains it).
PEER_NOT_GIVEN = "(no peer <6.15)"


def evidence_lines(rec: dict, processes: dict) -> list[str]:
    """-v: who holds it, where they live, and where each thread waits (the
    last two from the holder's `process` record)."""
    out = []
    diagnosis = rec.get("diagnosis") or {}
    evidence = diagnosis.get("evidence") or {}
    holders = evidence.get("holders") or rec.get("owners") or []
    for h in holders:
        process = processes.get(h["pid"]) or {}
        ident = process.get("identity") or {}
        where = ", ".join(x for x in (
            f"user {ident['user']}" if ident.get("user") else "",
            f"{ident['container']['runtime']} {ident['container']['id'][:12]}"
            if ident.get("container") else "",
            f"pod {ident['pod_uid']}" if ident.get("pod_uid") else "",
            ident.get("unit") or "",
            f"netns {ident['netns']}" if ident.get("netns") else "") if x)
        cloexec = {True: " cloexec", False: " no-cloexec"}.get(h.get("cloexec"), "")
        out.append(f"         holder {h['pid']}/{h['comm']} fd {h['fd']}{cloexec} "
                   f"[{h['state']}] ppid {h.get('ppid')}: {h.get('cmdline') or h['comm']}")
        if where:
            out.append(f"           {where}")
        for t in process.get("threads") or []:
            call = t.get("syscall") or ("running" if t.get("state") == "R" else "-")
            out.append(f"           thread {t['tid']} [{t['state']}] {call} "
                       f"wchan {t.get('wchan') or '-'}")
            for f in (t.get("stack") or [])[:8]:
                name = f"{f['function']}+{f['offset']:#x}" if f.get("function") else f["pc"]
                module = (f.get("module") or "?").rsplit("/", 1)[-1]
                out.append(f"             {name} ({module}) [{f['method']}]")
    listener = rec.get("listener")
    if listener and rec.get("owner_kind") == "accept_queue":
        out.append(f"         listener {listener['local']} queue "
                   f"{listener['accept_queue']}/{listener['backlog']}")
    return out


# --all: short state names so that OLD>NEW stays narrow.
_SHORT = {"ESTABLISHED": "EST", "SYN_SENT": "SYNS", "SYN_RECV": "SYNR", "FIN_WAIT1": "FW1",
          "FIN_WAIT2": "FW2", "TIME_WAIT": "TW", "CLOSE": "CLO", "CLOSE_WAIT": "CW",
          "LAST_ACK": "LA", "LISTEN": "LIS", "CLOSING": "CLG", "NEW_SYN_RECV": "NSR"}


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def histogram_lines(buckets: list[dict], width: int = 30) -> list[str]:
    if not buckets:
        return ["  (no socket left CLOSE_WAIT while tracing)"]
    peak = max(b["count"] for b in buckets)
    lines = [f"  {'usecs':>21} : {'count':<8} distribution"]
    for b in buckets:
        bar = "*" * max(1, round(b["count"] * width / peak))
        lines.append(f"  {b['from_us']:>10} -> {b['to_us'] - 1:<8} : {b['count']:<8} |{bar:<{width}}|")
    return lines


def summary_lines(rec: dict) -> list[str]:
    c = rec["counters"]
    lines = [
        "",
        f"Summary after {format_age(int(rec['traced_s'] * 1e9))}: "
        f"{c.get('cw_enter', 0)} entered CLOSE_WAIT, {c.get('cw_exit', 0)} left it "
        f"(timed), {rec['linger_reported']} reported lingering, "
        f"{rec['closed_reported']} closed after lingering.",
    ]
    problems = []
    if c.get("events_lost"):
        problems.append(f"{c['events_lost']} events lost (ring buffer full)")
    if c.get("map_full"):
        problems.append(f"{c['map_full']} sockets not timed (tracking map full)")
    if c.get("exit_untracked"):
        problems.append(f"{c['exit_untracked']} left CLOSE_WAIT untimed "
                        f"(already in it at start, or not tracked)")
    if rec.get("write_errors"):
        problems.append(f"{rec['write_errors']} records could not be written")
    lines.append("Losses: " + ("; ".join(problems) if problems else "none."))
    lines.append("Time in CLOSE_WAIT (log2 histogram):")
    lines.extend(histogram_lines(rec["histogram_us"]))
    still = rec.get("still_lingering") or []
    lines.append(f"Still lingering at exit: {len(still)}")
    for s in still[:50]:
        owners = ", ".join(f"{o['pid']}/{o['comm']} fd {o['fd']} [{o['state']}]"
                           for o in s.get("owners") or []) or (
            "(not accepted)" if s.get("owner_kind") == "accept_queue" else "-")
        age = (">=" if s.get("age_is_lower_bound") else "") + format_age(int(s["age_s"] * 1e9))
        lines.append(f"  {_hostport(s['laddr'], s['lport'])} <- "
                     f"{_hostport(s['raddr'], s['rport'])} {age} {owners}")
    if len(still) > 50:
        lines.append(f"  ... and {len(still) - 50} more (see --json)")
    return lines
