"""`closewait-trace snapshot`: every socket in CLOSE_WAIT right now, with its
estimated age, every holder and the diagnosis; then exit.

sock_diag and /proc only: no BPF, no bcc, no kernel headers, so it works
where the live tracer cannot start (and nothing here may import bcc, even
indirectly). The ages come from tcp_info exactly as the live tracer's
start-up does (tracker.seed and ages.py): a snapshot is the live tracer's
first tick without the kernel program. The records are the live tail's
`process` and `linger` records, oldest socket first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from closewait_trace.durations import format_age
from closewait_trace.evidence import gathering
from closewait_trace.output import records
from closewait_trace.sockets import ages, owners, procfs
from closewait_trace.sockets.filters import HolderFilter, SocketFilter
from closewait_trace.sockets.tracker import Lingerer

if TYPE_CHECKING:
    from closewait_trace.evidence.resolver import ProcResolver
    from closewait_trace.output.fold import Fold

# The sockets are read in the gathering worker (gathering.snapshot_candidates)
# and only resolved, diagnosed and shown here; the kernel clock of their
# ages is gathering.now_ns.


@dataclass
class Snapshot:
    lingering: list[Lingerer]              # oldest first, resolved and diagnosed
    process_evidence: list[dict]           # one per holder process looked at
    taken_ns: int                          # kernel clock when the ages were read
    hidden: int = 0                        # not root: holders we may not see
    left: int = 0                          # left CLOSE_WAIT while we looked
    # Holder filter given, but the holder's identity (cgroup, unit) was
    # not read in time: not listed, and said so.
    unchecked: int = 0
    # Network namespaces not read in the time a snapshot gives them
    # (gathering.SNAPSHOT_OTHERS_BUDGET_S), by the real uid of a process in
    # each (-1: not known): their sockets are not listed, and said so.
    unread_namespaces: dict = field(default_factory=dict)
    # Holder processes not read for the cap on a batch (gathering.
    # MAX_PROCESSES_PER_BATCH), and the listed sockets one of whose own
    # holders they are: each such socket says so alone, and only these
    # totals say how much of the picture is missing (notice_lines).
    over_cap: int = 0
    over_cap_sockets: int = 0

    def records(self, ts: Optional[float] = None, at_ns: Optional[int] = None) -> list[dict]:
        """process records, then one linger record per socket, oldest first
        (the order the live tail writes them in)."""
        processes, lingers = self.reports(ts, at_ns)
        return processes + [report.record() for report in lingers]

    def reports(self, ts: Optional[float] = None, at_ns: Optional[int] = None) -> tuple:
        """What records() gives, with each linger record still to be made
        (lingerlines.LingerReport: the JSON sink builds its line from the
        socket)."""
        from closewait_trace.output.lingerlines import LingerReport
        ts = time.time() if ts is None else ts
        at_ns = gathering.now_ns() if at_ns is None else at_ns
        processes = [records.process(ts, ev) for ev in self.process_evidence]
        # Where in the code is seen only by a live trace, at the read or the
        # connect(): said, not left blank (one part shared by every record,
        # encoded once).
        unknown = records.Shared(records.code_unknown(records.CODE_SNAPSHOT))
        for l in self.lingering:
            if l.code is None:
                l.code = unknown
        return processes, [LingerReport(l, ts, l.age_ns(at_ns)) for l in self.lingering]


def take(socket_filter: SocketFilter = SocketFilter(), min_age_ns: int = 0,
         proc: str = procfs.PROC, as_root: Optional[bool] = None,
         stacks: bool = False, holder_filter: HolderFilter = HolderFilter(),
         resolver: Optional[ProcResolver] = None, fd_flags: bool = True) -> Snapshot:
    """The sockets (gathering.snapshot_candidates()), resolved and
    diagnosed in one batch. User stacks only when asked (-v): symbolizing a
    binary the first time costs seconds, and a snapshot is a new process
    every time. With a resolver that has a worker (the CLI's), every read of
    /proc happens there under deadlines; a GatherFailed from the first read means nothing was read.
    fd_flags=False: each holder's close-on-exec is read only where it can
    decide the diagnosis (for an output that does not show it: text
    without -v), one read of /proc per socket less."""
    from closewait_trace.evidence import diagnosis
    from closewait_trace.evidence.resolver import ProcResolver
    from closewait_trace.evidence.worker import GatherFailed
    as_root = os.geteuid() == 0 if as_root is None else as_root
    resolver = resolver or ProcResolver(proc)
    resolver.stacks = stacks
    read = resolver.snapshot_candidates(socket_filter, min_age_ns, fd_flags)
    found, resolved, taken = read.due, read.resolved, read.taken_ns
    cache = diagnosis.Batch(stacks=stacks)
    todo: list[Lingerer] = []
    identities: dict = {}
    hidden = left = unchecked = 0
    for l in sorted(found, key=_oldest_first):
        own = resolved.get(l.endpoints)
        if own is None or own.kind == owners.OWNER_GONE:
            left += 1              # closed between the dump and the lookup
            continue
        if own.kind in (owners.OWNER_NONE, owners.OWNER_DENIED) and not as_root:
            # Its holder is most likely a process of another user, whose fds
            # we may not read: saying "no holder" would be false, and the
            # one-line notice already says that other users' are hidden.
            hidden += 1
            continue
        try:
            wanted = holder_filter.matches_ownership(own, resolver.identity, identities)
        except GatherFailed:
            unchecked += 1         # who it is was not read in time: not claimed
            continue
        if not wanted:
            continue               # not a process the user asked about (--pid, --comm...)
        l.ownership = own
        todo.append(l)
    over = resolver.gather_processes([l.ownership for l in todo], cache)
    for l in todo:
        l.diagnosis = resolver.diagnose(l.ownership, cache)
    cache.close()
    # A socket's own holders, as the live tracer's re-diagnosis counts
    # them (tracer._rediagnose_over_cap): no cause is decided on the
    # threads of a listener's.
    over_sockets = sum(1 for l in todo if any(h.pid in over for h in l.ownership.holders)) \
        if over else 0
    return Snapshot(lingering=todo, process_evidence=diagnosis.process_evidence(cache),
                    taken_ns=taken, hidden=hidden, left=left, unchecked=unchecked,
                    unread_namespaces=dict(read.unread_by_uid),
                    over_cap=len(over), over_cap_sockets=over_sockets)


def _oldest_first(l: Lingerer) -> tuple:
    ep = l.endpoints
    return (l.earliest_enter_ns, ep.family, ep.laddr, ep.lport, ep.raddr, ep.rport)


# ------------------------------------------------------------------- text

def age_text(seconds, source: str = ages.TRACED) -> str:
    """The renderer's marked_age: one way to show an age and its source."""
    from closewait_trace.output.render import marked_age
    return marked_age(seconds, source)


@dataclass
class HolderGroup:
    label: str
    count: int = 0
    oldest_s: float = 0.0
    oldest_source: str = ages.TRACED
    causes: dict = field(default_factory=dict)   # cause -> count


def holder_groups(linger_records: list[dict], folding: Optional[Fold] = None
                  ) -> list[HolderGroup]:
    """The footer: sockets grouped by holder process (a socket held by two
    processes counts for both), the children of one server folded into one
    group (output/fold.py: by parent, user and executable, as `top` and
    `report` fold them; folding: the holders' Fold, none folds nothing),
    then those with no holder we can name; biggest group first. 10,000
    sockets of one process, or of 10,000 forks of one server, are one line."""
    from closewait_trace.output import fold
    from closewait_trace.output.textsafe import escape
    folding = folding if folding is not None else fold.Fold()
    groups: dict[tuple, HolderGroup] = {}
    members: dict[tuple, fold.Members] = {}
    # pid -> its label alone: the sockets of one holder share it (escaped
    # once, not once per socket).
    singles: dict[int, str] = {}
    for rec in linger_records:
        # Names are the processes' own word: escaped like every text field.
        keys = {}
        for o in {o["pid"]: o for o in rec.get("owners") or []}.values():
            pid = o["pid"]
            if pid not in singles:
                singles[pid] = f"{pid}/{escape(o['comm'])} [{escape(o['state'])}]"
            k = folding.key(pid)
            m = members.get(k)
            if m is None:
                m = members[k] = fold.Members()
            m.add(pid, o["comm"])
            # One count per group: a socket two forks of one server hold
            # is one socket of that server.
            keys[("process", k)] = ""
        if not keys:
            if rec.get("owner_kind") == owners.OWNER_ACCEPT_QUEUE:
                listener = rec.get("listener") or {}
                pids = ",".join(f"{o['pid']}/{escape(o['comm'])}"
                                for o in listener.get("owners") or [])
                label = (f"(not accepted) listener {escape(listener.get('local', '?'))}"
                         + (f" held by {pids}" if pids else ""))
                keys = {("listener", listener.get("local")): label}
            else:
                keys = {("none",): "(no holder)"}
        cause = (rec.get("diagnosis") or {}).get("cause") or "-"
        for key, label in keys.items():
            g = groups.get(key)
            if g is None:
                g = groups[key] = HolderGroup(label)
            g.count += 1
            g.causes[cause] = g.causes.get(cause, 0) + 1
            # A range (keepalive) is shown by its upper end: what it may be.
            age = rec["age_s"]
            if rec["age_source"] == ages.RANGE and rec.get("age_max_s") is not None:
                age = rec["age_max_s"]
            if age >= g.oldest_s:
                g.oldest_s, g.oldest_source = age, rec["age_source"]
    named = fold.labels(members, singles.__getitem__, fold.server_exe)
    for key, g in groups.items():
        if key[0] == "process":
            g.label = named[key[1]]
    return sorted(groups.values(), key=lambda g: (-g.count, -g.oldest_s, g.label))


def footer_part(report) -> dict:
    """What holder_groups reads of a linger record (lingerlines.
    LingerReport), made from the socket: its holders' pid, comm and state,
    its owner kind, the listener's part, the cause and the age. The same
    values as the record's (records.linger; tests/unit/test_snapshot.py
    compares them), without the rest of it."""
    l, age_ns = report.lingerer, report.age_ns
    own, diag = l.ownership, l.diagnosis
    age_s, source, age_max_s, _lower = records.lingerer_age_values(l, age_ns)
    return {"owners": [{"pid": h.pid, "comm": h.comm, "state": h.state}
                       for h in (own.holders if own is not None else ())],
            "owner_kind": own.kind if own is not None else None,
            "listener": (records.listener_part(own)
                         if own is not None and own.listener is not None else None),
            "diagnosis": {"cause": diag.cause} if diag is not None else None,
            "age_s": age_s, "age_source": source, "age_max_s": age_max_s}


def footer_lines(linger_records: list[dict], folding: Optional[Fold] = None) -> list[str]:
    if not linger_records:
        return []
    lines = ["", "By holder process:"]
    for g in holder_groups(linger_records, folding):
        causes = ", ".join(f"{cause} {n}" if len(g.causes) > 1 else cause
                           for cause, n in sorted(g.causes.items(), key=lambda c: -c[1]))
        noun = "socket" if g.count == 1 else "sockets"
        lines.append(f"  {g.label}: {g.count} {noun}, oldest "
                     f"{age_text(g.oldest_s, g.oldest_source)}; {causes}")
    from closewait_trace.output import render
    return render.fit_lines(lines)


def title_lines(count: int, min_age_ns: int, filters_text: str, hidden: int = 0,
                unread_namespaces: Optional[dict] = None) -> list[str]:
    """The headline, and a line for hidden: sockets left out because this
    user may not see their holders, counted on stdout too, so that '0
    sockets' never stands for 'none I may show' (issue 19 §6); another for
    the network namespaces not read in time (unread_namespaces: uid ->
    how many), whose sockets are not listed."""
    lines = [title_line(count, min_age_ns, filters_text)]
    if hidden:
        lines.append(f"{hidden} more not listed: held by processes this user may not read "
                     f"(run as root)")
    if unread_namespaces:
        from closewait_trace.output.render import fit_lines
        lines.extend(fit_lines([f"Not listed: sockets in "
                                f"{namespaces_not_read(unread_namespaces)}"]))
    return lines


def namespaces_not_read(by_uid: dict, budget_s: Optional[float] = None) -> str:
    """'N network namespaces not read in 1s (uid 65534: 930, ...)': whose
    they are by real uid (the kernel's word, not a name), most first, the
    first three users named. budget_s: the time they had (default the
    snapshot's, gathering.SNAPSHOT_OTHERS_BUDGET_S)."""
    if budget_s is None:
        from closewait_trace.evidence.gathering import SNAPSHOT_OTHERS_BUDGET_S
        budget_s = SNAPSHOT_OTHERS_BUDGET_S
    total = sum(by_uid.values())
    users = sorted(by_uid.items(), key=lambda item: (-item[1], item[0]))
    named = ", ".join(f"uid {uid}: {n}" if uid >= 0 else f"uid unknown: {n}"
                      for uid, n in users[:3])
    more = f", {len(users) - 3} more users" if len(users) > 3 else ""
    return (f"{total} network namespace{'' if total == 1 else 's'} not read in "
            f"{budget_s:g}s ({named}{more})")


def title_line(count: int, min_age_ns: int, filters_text: str) -> str:
    what = f"{count} socket{'' if count == 1 else 's'} in CLOSE_WAIT"
    if min_age_ns:
        what += f" for >= {format_age(min_age_ns)}"
    if filters_text:
        what += f" ({filters_text})"
    return what + (", oldest first" if count > 1 else "")


def notice_lines(snap: Snapshot, as_root: bool) -> list[str]:
    """For stderr: what this view leaves out."""
    lines = []
    if not as_root:
        hidden = (f"; {snap.hidden} socket(s) whose holder could not be seen are not listed"
                  if snap.hidden else "")
        lines.append("closewait-trace: not root: other users' processes are hidden"
                     f"{hidden}; run as root to see every holder")
    if snap.unchecked:
        lines.append(f"closewait-trace: {snap.unchecked} socket(s) not listed: whether their "
                     "holders match the filter could not be read in time; try again")
    if snap.unread_namespaces:
        # Each user's namespaces had turns: a user's thousands delay the
        # others' by one each turn. What was left is said, with a way in.
        lines.append(f"closewait-trace: {namespaces_not_read(snap.unread_namespaces)}: "
                     "their sockets are not listed; to see one, run the snapshot in it "
                     "(nsenter -t PID -n closewait-trace snapshot)")
    if snap.over_cap:
        # Each such socket says "not read: 256 other processes read first";
        # the totals are said once, with a way to have them read.
        from closewait_trace.evidence.gathering import MAX_PROCESSES_PER_BATCH
        held = (f"{snap.over_cap_sockets} socket(s) held by them are diagnosed without "
                "their evidence" if snap.over_cap_sockets
                else "they hold listeners only, no listed socket")
        lines.append(f"closewait-trace: {snap.over_cap} holder process(es) not read: at most "
                     f"{MAX_PROCESSES_PER_BATCH} are read per snapshot; {held}; to read "
                     "theirs, narrow it with -p/-P or --pid")
    return lines


def run(socket_filter: SocketFilter, holder_filter: HolderFilter, min_age_ns: int,
        as_json: bool, wide: bool, verbose: bool,
        end: Optional[Callable[[], None]] = None) -> None:
    """The `snapshot` subcommand, from the parsed options to the last line.
    end: called once everything is written, the worker ended, and the
    objects built still alive and out of the collector's way: the CLI's
    exit without the interpreter's teardown (cli._quick_exit). Freeing
    them one by one (the records, lines and holders of 10,000 sockets) took
    about 50 ms, for a process that ends the next moment."""
    import gc

    from closewait_trace.evidence import spawn
    from closewait_trace.evidence.worker import GatherWorker
    # Other people's /proc, memory and files are read in a worker that is
    # abandoned at a deadline (evidence/worker.py): a holder never hangs it.
    # Started first, so that its start-up overlaps ours (imports, filters),
    # or taken from the command's entry point, which started it before
    # those (entry.py); as spawn.SNAPSHOT_WORKER says.
    gatherer = GatherWorker(**spawn.SNAPSHOT_WORKER)
    gatherer.start()
    # One pass that keeps every object it makes to the end: the cyclic
    # collector would only walk them again and again (a third of the cost
    # of the records and of their text with 10,000 sockets), finding nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        kept = show(gatherer, socket_filter, holder_filter, min_age_ns, as_json, wide, verbose)
    finally:
        gatherer.close()
    if end is not None:
        end()
    del kept
    if collecting:
        gc.enable()


def show(gatherer, socket_filter: SocketFilter, holder_filter: HolderFilter, min_age_ns: int,
         as_json: bool, wide: bool, verbose: bool) -> tuple:
    """One snapshot taken through the worker and written through the
    terminal sink: title, column header, records, footer; notices on stderr.
    Returns what it built (for run to leave to the exit)."""
    from closewait_trace.errors import EXIT_GATHER, UserError
    from closewait_trace.evidence.resolver import SNAPSHOT_STALL_S, ProcResolver
    from closewait_trace.evidence.worker import NO_WORKER, TIMED_OUT, GatherFailed
    from closewait_trace.live.session import warn_unmatched_holders
    from closewait_trace.output import render
    from closewait_trace.output.terminal import TerminalSink, notice
    as_root = os.geteuid() == 0
    warn_unmatched_holders(holder_filter, "no socket this snapshot shows is theirs")
    resolver = ProcResolver(worker=gatherer)
    try:
        # The holders' close-on-exec flags are shown in JSON and with -v;
        # the text otherwise needs them only where they decide a diagnosis.
        snap = take(socket_filter, min_age_ns, as_root=as_root, stacks=verbose,
                    holder_filter=holder_filter, resolver=resolver,
                    fd_flags=as_json or verbose)
    except GatherFailed as e:
        if e.why.startswith(NO_WORKER):
            raise UserError(f"the sockets and their owners could not be read: {e.why}",
                            EXIT_GATHER, "the reads run in a process of their own: see this "
                            "user's process limit (ulimit -u) and the free memory; try "
                            "again") from None
        if e.why == TIMED_OUT:
            raise UserError(f"the sockets and their owners could not be read ({e.why}: "
                            f"no read completed for {SNAPSHOT_STALL_S:g}s)", EXIT_GATHER,
                            "something on this host answers /proc reads slowly; try again, "
                            "or narrow it with -p/-P") from None
        # The process that reads failed otherwise (it exited, or its answer
        # was unreadable): not a slow read, and not said to be one.
        raise UserError(f"the sockets and their owners could not be read: {e.why}",
                        EXIT_GATHER, "the reads run in a process of their own, which "
                        "failed; try again (CLOSEWAIT_TRACE_DEBUG=1 shows its "
                        "errors)") from None
    finally:
        resolver.close()
    processes, reports = snap.reports()
    # Held and written in large pieces: one process writing everything it
    # has, not a live tail.
    out = TerminalSink(as_json, render.TextRenderer(wide=wide, verbose=verbose), hold=True)
    if not as_json:
        described = "; ".join(t for t in (socket_filter.describe(),
                                          holder_filter.describe() if holder_filter.active
                                          else "") if t)
        out.write_lines(title_lines(len(reports), min_age_ns, described,
                                    hidden=0 if as_root else snap.hidden,
                                    unread_namespaces=snap.unread_namespaces)
                        + ([out.renderer.header()] if reports else []))
    for rec in processes:
        out.emit(rec)
    for report in reports:
        out.emit_linger(report)         # its line or rows made from the socket, no dict
    if not as_json:
        from closewait_trace.output import fold
        folding = fold.of_holders(h for l in snap.lingering for h in l.ownership.holders)
        out.write_lines(footer_lines([footer_part(report) for report in reports], folding))
    out.flush()
    for line in notice_lines(snap, as_root):
        notice(line)
    return snap, reports, out
