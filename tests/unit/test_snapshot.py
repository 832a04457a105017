"""`closewait-trace snapshot` without root or BPF: the pure parts (footer,
notices), the batch over a crafted /proc tree, one table read per
namespace, and a real run with bcc made unimportable."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from closewait_trace.live import snapshot
from closewait_trace.sockets import ages
from closewait_trace.sockets import owners, procnet
from closewait_trace.kernel import tcpstates
from closewait_trace.sockets.filters import SocketFilter
from tests.unit.fakeproc import FakeProc

V4 = socket.AF_INET
CW, LISTEN = tcpstates.CLOSE_WAIT, tcpstates.LISTEN


@pytest.fixture
def fake(tmp_path):
    f = FakeProc(tmp_path)
    f.process(10, comm="server").process(11, comm="worker", state="T", ppid=10)
    f.tcp(10, V4, "127.0.0.1", 5555, "0.0.0.0", 0, LISTEN, 800)
    f.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40001, CW, 901, rx=1)
    f.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40002, CW, 902, rx=1)
    f.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40003, CW, 0, rx=1)     # never accepted
    f.tcp(10, V4, "127.0.0.1", 6000, "127.0.0.1", 40004, CW, 904, rx=1)   # nobody we can see
    f.fd(10, 3, 800).fd(10, 4, 901).fd(11, 5, 902)
    return f


def test_every_close_wait_socket_with_its_holder_and_diagnosis(fake):
    snap = snapshot.take(proc=fake.root, as_root=True)
    by_rport = {l.endpoints.rport: l for l in snap.lingering}
    assert set(by_rport) == {40001, 40002, 40003, 40004}
    assert [h.pid for h in by_rport[40001].ownership.holders] == [10]
    assert by_rport[40002].diagnosis.cause == "stopped"
    assert by_rport[40003].ownership.kind == owners.OWNER_ACCEPT_QUEUE
    assert by_rport[40003].ownership.listener.inode == 800
    assert by_rport[40004].ownership.kind == owners.OWNER_NONE
    # /proc's tables carry no tcp_info: the age is only "at least 0"
    assert {l.age_source for l in snap.lingering} == {ages.LOWER_BOUND}
    recs = snap.records(ts=100.0, at_ns=snap.taken_ns)
    assert [r["type"] for r in recs[:2]] == ["process", "process"]
    lingers = [r for r in recs if r["type"] == "linger"]
    assert len(lingers) == 4 and all(r["age_is_lower_bound"] for r in lingers)
    json.dumps(recs)


def test_a_crafted_table_with_a_port_over_sixteen_bits_is_still_answered(tmp_path):
    """A /proc/PID/net/tcp line whose port is 0x12345 (a crafted tree; the
    kernel's are 16 bits): the owner lookup's port filter (sockdiag.
    port_pairs) raised struct.error on it, and the snapshot failed; the
    socket is answered as before, with its holder."""
    f = FakeProc(tmp_path)
    f.process(10, comm="server")
    f.tcp(10, V4, "127.0.0.1", 0x12345, "127.0.0.1", 40001, CW, 901)
    f.fd(10, 4, 901)
    from closewait_trace.evidence import gathering
    read = gathering.snapshot_candidates(SocketFilter(), 0, proc=f.root)
    [(ep, own)] = read.resolved.items()
    assert ep.lport == 0x12345 and own.kind == owners.OWNER_FD
    assert [h.pid for h in own.holders] == [10]


def test_without_root_a_socket_whose_holder_is_unseen_is_hidden_and_said(fake):
    snap = snapshot.take(proc=fake.root, as_root=False)
    assert {l.endpoints.rport for l in snap.lingering} == {40001, 40002, 40003}
    assert snap.hidden == 1
    (line,) = snapshot.notice_lines(snap, as_root=False)
    assert "not root" in line and "other users' processes are hidden" in line and "1 socket" in line
    assert snapshot.notice_lines(snap, as_root=True) == []


def test_namespaces_not_read_in_time_are_said_on_both_outputs():
    """A snapshot reads other namespaces than its own for a budget
    (gathering.SNAPSHOT_OTHERS_BUDGET_S): those it left are said under the
    headline and on stderr, by real uid, most first, three users named."""
    snap = snapshot.Snapshot(lingering=[], process_evidence=[], taken_ns=0,
                             unread_namespaces={65534: 930, 0: 2, 1000: 5, 1001: 1, -1: 1})
    (notice,) = snapshot.notice_lines(snap, as_root=True)
    assert notice.startswith("closewait-trace: 939 network namespaces not read in 1s "
                             "(uid 65534: 930, uid 1000: 5, uid 0: 2, 2 more users): "
                             "their sockets are not listed")
    lines = snapshot.title_lines(0, 0, "", unread_namespaces=snap.unread_namespaces)
    assert lines[0] == "0 sockets in CLOSE_WAIT"
    assert " ".join(" ".join(lines[1:]).split()) == ("Not listed: sockets in 939 network namespaces not read "
                                   "in 1s (uid 65534: 930, uid 1000: 5, uid 0: 2, 2 more users)")
    assert all(len(line) <= 80 for line in lines)
    one = snapshot.title_lines(3, 0, "", unread_namespaces={-1: 1})
    assert one[1] == "Not listed: sockets in 1 network namespace not read in 1s (uid unknown: 1)"
    assert snapshot.title_lines(3, 0, "") == ["3 sockets in CLOSE_WAIT, oldest first"]


def test_a_namespace_cut_short_or_left_is_counted_not_listed_in_part(monkeypatch):
    """snapshot_candidates over owners.read_by_turns' answer: the sockets of
    the namespaces read whole are listed (and their rows answer the owner
    lookup); a namespace whose dump the budget cut short is not listed in
    part but counted with those it left, by uid; one whose read failed (its
    process gone) is neither."""
    from closewait_trace.evidence import gathering
    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets.tcprow import TcpRow

    def row(netns, rport, state=CW):
        return TcpRow(Endpoints(V4, "127.0.0.1", 5555, "127.0.0.1", rport, netns), state,
                      0, 0, 0, 1000 + rport)

    answer = owners.RescanRead(
        rows=[row(1, 40001), row(1, 0, LISTEN), row(2, 40002), row(7, 40007)],
        dumped={1, 2}, tried=[2, 6, 7], unread=[8, 9],
        uid_of={2: 0, 6: 1000, 7: 1000, 8: 1000, 9: 65534}, cut=7)
    asked, remembered = [], {}
    monkeypatch.setattr(procnet, "is_procfs", lambda proc: True)
    monkeypatch.setattr(owners, "read_by_turns",
                        lambda states, proc, budget_s: asked.append(budget_s) or answer)
    monkeypatch.setattr(procnet, "remember_rows",
                        lambda proc, netns, states, rows: remembered.update({netns: rows}))
    monkeypatch.setattr(owners, "resolve", lambda wanted, proc, fd_flags: {})
    read = gathering.snapshot_candidates(SocketFilter(), 0, "/proc")
    assert asked == [gathering.SNAPSHOT_OTHERS_BUDGET_S]
    assert sorted(l.endpoints.rport for l in read.due) == [40001, 40002]
    assert {netns: len(rows) for netns, rows in remembered.items()} == {1: 2, 2: 1}
    assert read.unread_by_uid == {1000: 2, 65534: 1}


def test_filters_apply(fake):
    snap = snapshot.take(SocketFilter(lports=(6000,)), proc=fake.root, as_root=True)
    assert [l.endpoints.rport for l in snap.lingering] == [40004]
    snap = snapshot.take(SocketFilter(family=socket.AF_INET6), proc=fake.root, as_root=True)
    assert snap.lingering == []


def test_min_age_leaves_out_sockets_of_unknown_age(fake):
    assert snapshot.take(min_age_ns=1, proc=fake.root, as_root=True).lingering == []


def test_a_socket_gone_before_the_lookup_is_left_out(fake, monkeypatch):
    real = owners.resolve

    def resolve_after_one_closed(wanted, proc, **kwargs):
        result = real(wanted, proc, **kwargs)
        for ep in result:
            if ep.rport == 40001:
                result[ep] = owners.Ownership(kind=owners.OWNER_GONE)
        return result

    monkeypatch.setattr(owners, "resolve", resolve_after_one_closed)
    snap = snapshot.take(proc=fake.root, as_root=True)
    assert 40001 not in {l.endpoints.rport for l in snap.lingering} and snap.left == 1


def test_one_table_read_per_namespace_inside_the_block(fake, monkeypatch):
    reads = []
    real = procnet._read_rows

    def counting(pid, proc, states, times=True):
        reads.append(sorted(states))
        return real(pid, proc, states, times)

    monkeypatch.setattr(procnet, "_read_rows", counting)
    with procnet.one_read_per_namespace():
        both = procnet.tcp_rows(10, fake.root, states=[CW, LISTEN])
        only_cw = procnet.tcp_rows(11, fake.root, states=[CW])     # same namespace
        assert only_cw == [r for r in both if r.state == CW] and len(only_cw) == 4
        procnet.tcp_rows(10, fake.root, states=[CW, LISTEN, tcpstates.ESTABLISHED])
    assert reads == [[CW, LISTEN], [tcpstates.ESTABLISHED, CW, LISTEN]]
    procnet.tcp_rows(10, fake.root, states=[CW])
    procnet.tcp_rows(10, fake.root, states=[CW])
    assert len(reads) == 4            # outside the block nothing is reused


def test_snapshot_reads_each_namespace_once(fake, monkeypatch):
    reads = []
    real = procnet._read_rows
    monkeypatch.setattr(procnet, "_read_rows",
                        lambda pid, proc, states: reads.append(pid) or real(pid, proc, states))
    snapshot.take(proc=fake.root, as_root=True)
    assert len(reads) == 1


def rec(rport, age, source, owners_=(), kind="fd", listener=None, cause="leaked"):
    return {"type": "linger", "rport": rport, "age_s": age, "age_source": source,
            "owners": [{"pid": p, "comm": c, "state": "S", "fd": 3} for p, c in owners_],
            "owner_kind": kind, "listener": listener, "diagnosis": {"cause": cause}}


def test_footer_groups_by_holder_process_biggest_first():
    recs = [rec(1, 5.0, "estimated", [(7, "java")]),
            rec(2, 9.0, "estimated", [(7, "java")], cause="stopped"),
            rec(3, 7.0, "lower_bound", [(7, "java"), (8, "child")]),
            rec(4, 2.0, "estimated", kind="accept_queue",
                listener={"local": "0.0.0.0:80", "owners": [{"pid": 9, "comm": "nginx"}]}),
            rec(5, 1.0, "estimated", kind="none")]
    groups = snapshot.holder_groups(recs)
    assert [(g.label, g.count) for g in groups] == [
        ("7/java [S]", 3), ("8/child [S]", 1),
        ("(not accepted) listener 0.0.0.0:80 held by 9/nginx", 1), ("(no holder)", 1)]
    assert groups[0].oldest_s == 9.0 and groups[0].causes == {"leaked": 2, "stopped": 1}
    text = snapshot.footer_lines(recs)
    assert text[1] == "By holder process:"
    assert text[2] == "  7/java [S]: 3 sockets, oldest ~9.0s; leaked 2, stopped 1"
    assert text[3] == "  8/child [S]: 1 socket, oldest >=7.0s; leaked"
    assert snapshot.footer_lines([]) == []


def test_title_line():
    assert snapshot.title_line(0, 0, "") == "0 sockets in CLOSE_WAIT"
    assert snapshot.title_line(3, 2_000_000_000, "local port 80") == \
        "3 sockets in CLOSE_WAIT for >= 2.0s (local port 80), oldest first"


BLOCK_BCC = r"""
import importlib.abc, sys
class NoBcc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bcc" or name.startswith("bcc."):
            raise ImportError("bcc is blocked by the test")
sys.meta_path.insert(0, NoBcc())
sys.argv = ["closewait-trace"] + sys.argv[1:]
import os
def no_bcc():
    assert not any(m == "bcc" or m.startswith("bcc.") for m in sys.modules)
# The snapshot ends without the interpreter's teardown (os._exit): checked there.
quick_exit = os._exit
def checked_exit(code):
    no_bcc()
    sys.stderr.write("checked: no bcc\n")
    quick_exit(code)
os._exit = checked_exit
from closewait_trace.cli import main
try:
    main()
finally:
    no_bcc()
"""


def test_snapshot_works_with_bcc_unimportable():
    """A real socket in CLOSE_WAIT held by this test process, seen by a
    snapshot that cannot import bcc (as where the live tracer cannot run)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    held, _ = srv.accept()
    client_port = client.getsockname()[1]
    client.close()
    closed_at = time.monotonic()
    try:
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", BLOCK_BCC, "snapshot", "--json", "-p", str(port)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        assert "checked: no bcc" in out.stderr
        lingers = [r for r in map(json.loads, out.stdout.splitlines()) if r["type"] == "linger"]
        assert len(lingers) == 1
        (l,) = lingers
        assert (l["lport"], l["raddr"], l["rport"]) == (port, "127.0.0.1", client_port)
        assert [o["pid"] for o in l["owners"]] == [os.getpid()]
        assert l["age_source"] == "estimated"
        assert 0.3 < l["age_s"] <= time.monotonic() - closed_at + 0.05
        # and the import hook really blocks: the live tracer cannot start
        # (exit 4, bcc missing; 3 before that when not root)
        live = subprocess.run([sys.executable, "-c", BLOCK_BCC, "-t", "1s"],
                              capture_output=True, text=True, timeout=60)
        assert live.returncode == (4 if os.geteuid() == 0 else 3), live.stderr
    finally:
        held.close()
        srv.close()


@pytest.mark.parametrize("args, needle", [
    (["-4", "-6"], "-4 and -6 exclude each other"),
    (["-t", "soon"], "--min-age"),
    (["-p", "70000"], "not a port number"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot"] + args,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_min_age_zero_is_accepted():
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "-t", "0",
                          "-p", "1", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == ""


def test_footer_escapes_process_names_and_listener_addresses():
    """The footer's holder labels are processes' own words (red-team finding:
    an OSC sequence and a newline in a comm reached root's terminal raw)."""
    from closewait_trace.live import snapshot
    from tests.unit import recordfactory as rf
    evil = "\x1b]0;PWN\x07\n\udcff\u202e"
    held = rf.linger(owners=[rf.holder(pid=6856, comm=evil, state="S\x1b")])
    queued = rf.linger(owners=[], owner_kind="accept_queue", rport=40001,
                       listener={"local": "127.0.0.1:1\x1b[2J", "accept_queue": 1, "backlog": 8,
                                 "owners": [rf.holder(pid=7, comm=evil)]})
    text = "\n".join(snapshot.footer_lines([held, queued]))
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\udcff" not in text
    assert text.count("\n") == len(snapshot.footer_lines([held, queued])) - 1
    assert "6856/\\x1b]0;PWN\\x07\\n" in text


def test_a_holder_whose_identity_is_not_read_in_time_is_counted_and_said(fake):
    """With a holder filter, a holder whose cgroup could not be read before
    the worker's deadline is neither listed as matching nor silently
    dropped: counted, and said on stderr."""
    from closewait_trace.evidence.resolver import ProcResolver
    from closewait_trace.evidence.worker import GatherFailed, TIMED_OUT
    from closewait_trace.sockets.filters import HolderFilter

    class SlowIdentities(ProcResolver):
        def identity(self, pid, uid):
            raise GatherFailed(TIMED_OUT)

    snap = snapshot.take(proc=fake.root, as_root=True, resolver=SlowIdentities(fake.root),
                         holder_filter=HolderFilter(units=("x.service",)))
    assert snap.lingering == [] and snap.unchecked == 3     # the three with holders
    assert any("3 socket(s) not listed" in line
               for line in snapshot.notice_lines(snap, as_root=True))


@pytest.mark.parametrize("why, slow", [
    ("timed out", True),
    ("worker exited", False),
    ("worker answer unreadable (UnpicklingError)", False)])
def test_a_failed_read_is_called_slow_only_when_it_was(monkeypatch, why, slow):
    """Every failure of the reading process was said as "no read completed
    for 10s" with "something on this host answers /proc reads slowly":
    false when it exited or its answer was unreadable."""
    from closewait_trace.errors import EXIT_GATHER, UserError
    from closewait_trace.evidence.worker import TIMED_OUT, GatherFailed
    from closewait_trace.sockets.filters import HolderFilter
    assert TIMED_OUT == "timed out"

    class NoWorker:
        def close(self):
            pass

    def failing_take(*args, **kwargs):
        raise GatherFailed(why)

    monkeypatch.setattr(snapshot, "take", failing_take)
    with pytest.raises(UserError) as failed:
        snapshot.show(NoWorker(), SocketFilter(), HolderFilter(), 0, False, False, False)
    line = failed.value.one_line()
    assert why in line and failed.value.exit_code == EXIT_GATHER
    assert ("no read completed" in line) == slow and ("slowly" in line) == slow, line


def test_holders_left_for_the_cap_are_counted_in_one_notice(tmp_path, monkeypatch):
    """More holder processes than a batch reads (gathering.
    MAX_PROCESSES_PER_BATCH, 2 here): each socket of one left unread says
    "not read: ... read first", and one notice gives the totals (before:
    none, so 10,000 lines never said how much of the picture was missing).
    Pids 100-103 hold a socket each, pid 100 a second fd on its own
    (dup: one process), and 100 and 103 share one more: 102 and 103 are
    left, three sockets have a holder among them."""
    from closewait_trace.evidence import gathering
    from closewait_trace.evidence.resolver import NOT_READ_OVER_CAP, ProcResolver
    from tests.unit.test_resolver_cap import ACCEPT4, InProcessWorker
    monkeypatch.setattr(gathering, "MAX_PROCESSES_PER_BATCH", 2)
    f = FakeProc(tmp_path)
    for pid in range(100, 104):
        f.process(pid, uid=0, threads={pid: ACCEPT4})
    for i in range(5):
        f.tcp(100, V4, "127.0.0.1", 5000, "127.0.0.1", 30000 + i, CW, 7000 + i)
    for i in range(4):
        f.fd(100 + i, 4, 7000 + i)
    f.fd(100, 5, 7000).fd(100, 6, 7004).fd(103, 6, 7004)
    resolver = ProcResolver(f.root, worker=InProcessWorker(), stacks=False)
    snap = snapshot.take(proc=f.root, as_root=True, resolver=resolver)
    unread = {r["pid"] for r in snap.process_evidence
              if r.get("unreadable") == NOT_READ_OVER_CAP}
    assert unread == {102, 103}
    assert sum(NOT_READ_OVER_CAP in l.diagnosis.summary for l in snap.lingering) == 2
    (line,) = snapshot.notice_lines(snap, as_root=True)
    assert line.startswith("closewait-trace: 2 holder process(es) not read: at most 2 are "
                           "read per snapshot; 3 socket(s) held by them "), line
    assert "-p/-P or --pid" in line
    # Without a cap reached, nothing is said.
    monkeypatch.setattr(gathering, "MAX_PROCESSES_PER_BATCH", 4)
    again = snapshot.take(proc=f.root, as_root=True, resolver=resolver)
    assert snapshot.notice_lines(again, as_root=True) == []


def test_the_footers_part_of_a_socket_is_its_records(tmp_path):
    """footer_part: the values holder_groups reads, made from the socket,
    are the record's own (records.linger), and the footer made from them
    is the footer made from the records, hostile names included."""
    import random

    from closewait_trace.output import fold, records
    from tests.unit.test_linger_lines import reports, varied_lingerers
    rng = random.Random(22)
    lingerers = varied_lingerers(tmp_path, rng, 80)
    made = reports(lingerers, rng)
    recs = [records.linger(r.lingerer, r.ts, r.age_ns, r.update) for r in made]
    parts = [snapshot.footer_part(r) for r in made]
    for rec, part in zip(recs, parts):
        want = {k: rec[k] for k in part}
        want["owners"] = [{k: o[k] for k in ("pid", "comm", "state")} for o in rec["owners"]]
        want["diagnosis"] = rec["diagnosis"] and {"cause": rec["diagnosis"]["cause"]}
        assert part == want
    folding = fold.of_holders(h for l in lingerers if l.ownership is not None
                              for h in l.ownership.holders)
    assert snapshot.footer_lines(parts, folding) == snapshot.footer_lines(recs, folding)
    assert len(snapshot.footer_lines(parts, folding)) > 3
