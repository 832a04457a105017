"""The children of one server read as one line (output/fold.py), the one
definition `snapshot`'s footer, `top` and `report` fold by: by parent pid,
uid and the kernel's exe link, never by a name a process picks."""

import socket

import pytest

from closewait_trace.kernel import tcpstates
from closewait_trace.live import snapshot
from closewait_trace.output import fold, render, textsafe, top
from tests.unit.fakeproc import FakeProc

SOCAT = "/usr/bin/socat"
V4 = socket.AF_INET
CW = tcpstates.CLOSE_WAIT


def linger(rport, pid, comm="socat", age=5.0, cause="stopped", state="T"):
    return {"type": "linger", "rport": rport, "age_s": age, "age_source": "estimated",
            "owners": [{"pid": pid, "comm": comm, "state": state, "fd": 5}],
            "owner_kind": "fd", "listener": None, "diagnosis": {"cause": cause}}


def forks(n, server=100, uid=0, exe=SOCAT, first=1000):
    f = fold.Fold()
    for i in range(n):
        f.add(first + i, server, uid, exe)
    return f


def test_forks_of_one_server_share_a_key_and_other_servers_do_not():
    f = forks(4)
    f.add(2000, 200, 0, SOCAT)          # another socat server's child
    f.add(3000, 100, 1000, SOCAT)       # the same parent, another user (setuid child)
    f.add(4000, 100, 0, "/usr/bin/sleep")   # the same parent, another program
    f.add(5000, 100, 0, "")             # exe not read (another user's, not root)
    f.add(6000, None, 0, SOCAT)         # parent not known
    keys = {f.key(p) for p in (1000, 1001, 1002, 1003)}
    assert keys == {("server", 100, 0, SOCAT)}
    others = [f.key(p) for p in (2000, 3000, 4000, 5000, 6000)]
    assert len(set(others) | keys) == 6
    assert f.key(5000) == ("pid", 5000) and f.key(6000) == ("pid", 6000)
    assert f.key(7) == ("pid", 7)       # never added


def test_a_server_that_holds_copies_folds_with_its_children():
    """A holder whose parent is a holder of the same exe and user (a server
    that kept what its forks inherited) is in its parent's line, climbing
    a bounded number of parents."""
    f = fold.Fold()
    f.add(100, 1, 0, SOCAT)             # a service: its parent is init
    f.add(101, 100, 0, SOCAT)
    f.add(102, 101, 0, SOCAT)           # a grandchild
    assert f.key(100) == f.key(101) == f.key(102) == ("server", 100, 0, SOCAT)
    # Added children first, the server last: keys follow what is known
    # (without 100, 101 is the server of its own child).
    g = fold.Fold()
    g.add(102, 101, 0, SOCAT)
    g.add(101, 100, 0, SOCAT)
    assert g.key(102) == g.key(101) == ("server", 101, 0, SOCAT)
    g.add(100, 1, 0, SOCAT)
    assert g.key(100) == g.key(101) == g.key(102) == ("server", 100, 0, SOCAT)
    # A loop (pids reused between reads of a recording) ends.
    h = fold.Fold()
    h.add(7, 8, 0, SOCAT)
    h.add(8, 7, 0, SOCAT)
    assert {h.key(7)[0], h.key(8)[0]} <= {"server", "pid"}


def test_services_that_init_started_are_not_forks_of_one_server():
    """Under systemd every service's parent is pid 1: two services that
    run one program are not one server's forks (a review found two root
    Python services folded as "(2 processes)"). A server started by init
    still folds with its children."""
    f = fold.Fold()
    f.add(300, 1, 0, "/usr/bin/python3.11")
    f.add(400, 1, 0, "/usr/bin/python3.11")
    assert f.key(300) == ("pid", 300) and f.key(400) == ("pid", 400)
    f.add(401, 400, 0, "/usr/bin/python3.11")
    assert f.key(401) == f.key(400) == ("server", 400, 0, "/usr/bin/python3.11")
    recs = [linger(40000, 300), linger(40001, 400), linger(40002, 401)]
    lines = snapshot.footer_lines(recs, f)
    assert "  300/socat [T]: 1 socket, oldest ~5.0s; stopped" in lines
    assert len(lines) == 4, lines


def test_lines_that_read_alike_but_for_their_count_say_whose_they_are():
    """A review: nobody's processes running socat (or a binary a mount
    namespace of theirs shows at /usr/bin/socat) read 'socat
    [/usr/bin/socat] (7 processes)' next to root's '(6 processes)': both
    now say their server's pid, which nobody chooses."""
    f = forks(6, server=100)
    for pid in range(2000, 2007):
        f.add(pid, 200, 65534, SOCAT)
    recs = [linger(40000 + i, 1000 + i) for i in range(6)]
    recs += [linger(41000 + i, 2000 + i) for i in range(7)]
    lines = [line.strip() for line in snapshot.footer_lines(recs, f)]
    assert lines[2].startswith(f"socat [{SOCAT}] (7 processes of 200): 7 sockets"), lines
    assert lines[3].startswith(f"socat [{SOCAT}] (6 processes of 100): 6 sockets"), lines
    # One server's children of one program as two users: their user too.
    g = forks(2, server=100)
    g.add(3000, 100, 1000, SOCAT)
    g.add(3001, 100, 1000, SOCAT)
    recs = [linger(40000, 1000), linger(40001, 1001), linger(40002, 3000),
            linger(40003, 3001)]
    text = " ".join(snapshot.footer_lines(recs, g))
    assert "(2 processes of 100, uid 0)" in text and "(2 processes of 100, uid 1000)" in text


def test_a_user_cannot_fold_into_roots_server_by_name():
    """A user's process named like root's server's children, even running
    the same binary, has another parent and uid: its own line."""
    recs = [linger(40000 + i, 1000 + i) for i in range(5)] + [linger(41000, 9999)]
    f = forks(5)
    f.add(9999, 8888, 1000, SOCAT)      # bob's own socat, comm "socat" too
    lines = snapshot.footer_lines(recs, f)
    assert lines[2] == f"  socat [{SOCAT}] (5 processes): 5 sockets, oldest ~5.0s; stopped"
    assert lines[3] == "  9999/socat [T]: 1 socket, oldest ~5.0s; stopped"
    assert len(lines) == 4


def test_footer_folds_forks_into_one_line_a_single_process_as_before():
    recs = [linger(40000 + i, 1000 + i, age=1.0 + i) for i in range(100)]
    recs.append(linger(50000, 77, comm="java", cause="leaked", state="S"))
    lines = snapshot.footer_lines(recs, forks(100))
    assert lines == ["", "By holder process:",
                     f"  socat [{SOCAT}] (100 processes): 100 sockets, oldest ~1m40s; stopped",
                     "  77/java [S]: 1 socket, oldest ~5.0s; leaked"]
    # Without what the kernel says of them, nothing folds: as before.
    assert len(snapshot.footer_lines(recs)) == 2 + 101


def test_a_socket_two_forks_hold_counts_once_for_their_server():
    rec = linger(40000, 1000)
    rec["owners"].append({"pid": 1001, "comm": "socat", "state": "T", "fd": 6})
    lines = snapshot.footer_lines([rec, linger(40001, 1002)], forks(3))
    assert lines[2] == f"  socat [{SOCAT}] (3 processes): 2 sockets, oldest ~5.0s; stopped"


def test_two_servers_of_one_program_say_their_parent():
    f = forks(2, server=100)
    for pid in (2000, 2001):
        f.add(pid, 200, 0, SOCAT)
    recs = [linger(1, 1000), linger(2, 1001), linger(3, 2000), linger(4, 2001)]
    text = " ".join(line.strip() for line in snapshot.footer_lines(recs, f))
    for parent in (100, 200):
        assert (f"socat [{SOCAT}] (2 processes of {parent}): 2 sockets, oldest ~5.0s;"
                f" stopped") in text


@pytest.mark.parametrize("exe", [
    "/tmp/\x1b]0;PWN\x07\n/" + "a" * 300 + "/socat",
    "/srv/" + "\u4e2d" * 200 + " with spaces " * 20,
    "/x/\u202e\udcff" + "b" * 5000])
def test_hostile_names_are_escaped_and_lines_fit_80_columns(exe):
    evil = "\x1b[2J\u202e\n" + "w" * 15
    recs = [linger(40000 + i, 1000 + i, comm=evil) for i in range(3)]
    lines = snapshot.footer_lines(recs, forks(3, exe=exe))
    text = "\n".join(lines)
    for raw in ("\x1b", "\x07", "\u202e", "\udcff"):
        assert raw not in text
    assert text.count("\n") == len(lines) - 1
    assert all(textsafe.width_of_escaped(line) <= render.LINE for line in lines)
    # The exe path cut (both ends kept), not wrapped over many lines.
    assert len(lines) <= 4 and "(3" in lines[2]
    label = fold.folded_label(evil, exe, 3)
    assert textsafe.width_of_escaped(label) <= 80


def test_snapshot_reads_the_exe_link_and_folds(tmp_path):
    """From /proc to the footer: the owner lookup reads each holder's exe
    link (procfs.ProcBatch), and the footer folds what it says."""
    fake = FakeProc(tmp_path)
    fake.process(100, comm="socat", ppid=1, uid=0, exe=SOCAT)
    for i in range(6):
        pid = 1000 + i
        fake.process(pid, comm="socat", state="T", ppid=100, uid=0, exe=SOCAT)
        fake.tcp(pid, V4, "127.0.0.1", 5555, "127.0.0.1", 40000 + i, CW, 900 + i, rx=1)
        fake.fd(pid, 5, 900 + i)
    # bob's process: same comm, same exe path, not root's server's child
    fake.process(3000, comm="socat", state="T", ppid=2999, uid=1000, exe=SOCAT)
    fake.tcp(3000, V4, "127.0.0.1", 5555, "127.0.0.1", 41000, CW, 990, rx=1)
    fake.fd(3000, 5, 990)
    snap = snapshot.take(proc=fake.root, as_root=True)
    holders = [h for l in snap.lingering for h in l.ownership.holders]
    assert {h.process.exe for h in holders} == {SOCAT}
    lingers = [r for r in snap.records(ts=1.0, at_ns=snap.taken_ns) if r["type"] == "linger"]
    lines = snapshot.footer_lines(lingers, fold.of_holders(holders))
    assert len(lines) == 4
    assert lines[2].startswith(f"  socat [{SOCAT}] (6 processes): 6 sockets, oldest")
    assert lines[3].startswith("  3000/socat [T]: 1 socket, oldest")


# ---------------------------------------------------------------- top

def _top_sink(lingerers):
    import io

    from closewait_trace.output import sinks, topview
    view = sinks.TickView(wall_ts=1_800_000_000.0, now_ns=100_000_000_000, threshold_ns=1,
                          counters={}, histogram=[], histogram_sum_ns=None,
                          lingering=lambda: lingerers)
    return topview.TopSink("process", stream=io.StringIO()), view


def _lingerer(i, pid, ppid, uid, exe, comm="postgres", cause="leaked"):
    import socket as so
    from types import SimpleNamespace as NS

    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets.tracker import Lingerer
    holder = NS(pid=pid, comm=comm, fd=5, state="S", ppid=ppid, uid=uid,
                process=NS(exe=exe))
    return Lingerer(Endpoints(so.AF_INET, "127.0.0.1", 5432, "127.0.0.1", 40000 + i),
                    enter_ns=1_000_000 * i, skaddr=None, reported=True,
                    ownership=NS(kind="fd", holders=[holder], holders_cut=None),
                    diagnosis=NS(cause=cause, summary=cause))


PG = "/usr/lib/postgresql/15/bin/postgres"


def test_top_folds_a_servers_backends_into_one_row_by_default():
    """1,000 backends of one postmaster: one row by process (the default),
    not 1,000; a user's own "postgres" (same binary, its own parent and
    uid) is its own row, as is a single process."""
    ls = [_lingerer(i, 2000 + i, 1500, 107, PG) for i in range(1000)]
    ls.append(_lingerer(1000, 9000, 8999, 1000, PG))        # bob's postgres
    ls.append(_lingerer(1001, 77, 1, 0, "/usr/bin/java", comm="java", cause="stopped"))
    sink, view = _top_sink(ls)
    assert sink.grouping == "process"
    sink.tick(view)
    rows = sink.model.rows_of(sink._lingering(view), "process")
    # The path cut in the middle to the key's column: the count is never
    # what is cut off.
    folded = "postgres [/usr/li…stgres] (1000 processes)"
    assert [(r.key, r.sockets) for r in rows] == [
        (folded, 1000), ("9000/postgres", 1), ("77/java", 1)]
    assert top.cells(rows[0], "process")[-1] == folded + " [leaked]"
    text = sink.stream.getvalue().splitlines()
    assert len(text) == 2 + 3 and all(textsafe.width(line) <= 80 for line in text)
    # In the text's 80 columns with its cause: the executable's path gives.
    assert text[2].endswith(" postgres […gres] (1000 processes) [leaked]"), text[2]
    # Other groupings are as they were.
    assert [(r.key, r.sockets) for r in sink.model.rows_of(sink._lingering(view), "cause")] \
        == [("leaked", 1001), ("stopped", 1)]


def test_top_counts_new_sockets_of_a_fold_in_its_row():
    """NEW/MIN of the folded row: the linger records (whose owners say no
    parent) land in the row of the server the holders fold into."""
    ls = [_lingerer(i, 2000 + i, 1500, 107, PG) for i in range(3)]
    sink, view = _top_sink(ls)
    for i in range(3):
        sink.emit({"type": "linger", "laddr": "127.0.0.1", "lport": 5432,
                   "raddr": "127.0.0.1", "rport": 40000 + i, "netns": 1, "age_s": 1.0,
                   "age_source": "traced", "owner_kind": "fd", "pre_existing": False,
                   "owners": [{"pid": 2000 + i, "comm": "postgres", "fd": 5, "state": "S"}],
                   "diagnosis": {"cause": "leaked", "summary": ""}})
    sink.tick(view)
    rows = sink.model.rows_of(sink._lingering(view), "process")
    assert [(r.key, r.sockets, r.new_per_min) for r in rows] == [
        (fold.folded_label("postgres", PG, 3, top.KEY_COLUMNS), 3, 3)]


def test_top_fold_is_bounded_and_forgets_the_oldest():
    f = fold.Fold(limit=100)
    for pid in range(1000, 2000):
        f.add(pid, 100, 0, SOCAT)
    assert len(f._facts) == 100 and f.key(1000) == ("pid", 1000)
    assert f.key(1999) == ("server", 100, 0, SOCAT)


# ---------------------------------------------------------------- report

def _report(recs):
    from closewait_trace.output import report
    return report.build(recs, by=["program"])


def test_report_never_folds_a_users_process_into_roots_server_by_name():
    """The report folded by comm and exe path: bob's own socat (same binary,
    same name) landed in root's server's row. Now by the same fold as the
    footer and top: parent, uid, exe."""
    from tests.unit.test_report_groups import header, linger, process
    recs = [header()]
    for i, pid in enumerate(range(1000, 1004)):
        recs += [process(pid, ppid=100, uid=0), linger(i, pid)]
    recs += [process(9999, ppid=8888, uid=1000), linger(9, 9999)]
    rows = {r["program"]: (r["processes"], r["count"]) for r in _report(recs)["by_program"]}
    assert rows == {f"socat [{SOCAT}] (server 100)": (4, 4),
                    f"socat [{SOCAT}] (pid 9999)": (1, 1)}


def test_report_folds_holders_without_a_process_record_under_their_parent():
    """More than 256 holders in a batch: the rest have no process record;
    their owners' parent and uid still fold them (their comm standing in
    for the exe), never with another parent's or user's processes."""
    from tests.unit.test_report_groups import header, linger
    recs = [header()]
    for i in range(300):
        rec = linger(i, 2000 + i, comm="postgres")
        rec["owners"][0].update(ppid=1500, uid=107)
        recs.append(rec)
    rec = linger(400, 9000, comm="postgres")
    rec["owners"][0].update(ppid=1500, uid=1000)       # another user
    recs.append(rec)
    rows = [(r["program"], r["processes"], r["count"]) for r in _report(recs)["by_program"]]
    # 64: the report counts at most MAX_PIDS processes a row (and says so).
    assert rows == [("postgres [program unknown] (server 1500)", 64, 300),
                    ("postgres [program unknown] (pid 9000)", 1, 1)]


@pytest.mark.parametrize("exe", ["/tmp/\x1b]0;PWN\x07\n/" + "a" * 300 + "/x",
                                 "/srv/" + "\u4e2d" * 200, "/x/\u202e\udcff" + "b" * 5000])
def test_top_escapes_hostile_names_and_keeps_the_count_in_80_columns(exe):
    evil = "\x1b[2J\u202e\nxxxxxxxx"
    ls = [_lingerer(i, 2000 + i, 1500, 1000, exe, comm=evil) for i in range(3)]
    sink, view = _top_sink(ls)
    sink.tick(view)
    text = sink.stream.getvalue()
    for raw in ("\x1b", "\x07", "\u202e", "\udcff"):
        assert raw not in text
    lines = text.splitlines()
    assert len(lines) == 3 and all(textsafe.width_of_escaped(line) <= 80 for line in lines)
    assert "(3 processes)" in lines[2]


def test_top_keeps_a_single_process_rows_as_before_and_merges_a_folds():
    """A single process, its exe known: its rows as before ("7/java" and
    "7/java +1" for a socket it shares). Two forks of one server: their
    rows merged, oldest and causes of both."""
    from types import SimpleNamespace as NS
    ls = [_lingerer(0, 7, 1, 0, "/usr/bin/java", comm="java"),
          _lingerer(1, 7, 1, 0, "/usr/bin/java", comm="java"),
          _lingerer(2, 2001, 1500, 107, PG, cause="stopped"),
          _lingerer(3, 2002, 1500, 107, PG)]
    other = NS(pid=8, comm="sh", fd=9, state="S", ppid=7, uid=0, process=NS(exe="/bin/sh"))
    ls[1].ownership.holders.append(other)
    sink, view = _top_sink(ls)
    sink.tick(view)
    rows = sink.model.rows_of(sink._lingering(view), "process")
    got = {r.key: (r.sockets, round(r.oldest_s, 3), dict(r.causes)) for r in rows}
    assert got == {fold.folded_label("postgres", PG, 2, top.KEY_COLUMNS):
                   (2, 99.998, {"stopped": 1, "leaked": 1}),
                   "7/java": (1, 100.0, {"leaked": 1}),
                   "7/java +1": (1, 99.999, {"leaked": 1})}


def test_top_remakes_its_fold_from_the_lingering_past_its_bound(monkeypatch):
    """Past MAX_PROCESSES holder processes seen, top's fold is made again
    from the holders lingering now: a fold still there stays one row."""
    monkeypatch.setattr(top, "MAX_PROCESSES", 10)
    ls = [_lingerer(i, 2000 + i, 1500, 107, PG) for i in range(5)]
    sink, view = _top_sink(ls)
    sink.tick(view)
    for i in range(20):               # 20 other processes come and go
        sink.model.folding.add(5000 + i, 1, 0, "/bin/x")
    sink._keys.clear()
    ls.append(_lingerer(99, 2999, 1500, 107, PG))
    sink.tick(view)
    assert len(sink.model.folding) == 6
    rows = sink.model.rows_of(sink._lingering(view), "process")
    assert [(r.key, r.sockets) for r in rows] == [
        (fold.folded_label("postgres", PG, 6, top.KEY_COLUMNS), 6)]


def test_report_takes_the_holders_own_parent_and_user_over_an_old_record():
    """A review: a recording's process record for pid 5000 (root's rootd,
    a fork of 100) and, an hour later, sockets held by another process
    that had pid 5000 (its owner entry: parent 7777, uid 65534, no process
    record of its own): the report counted them in root's row."""
    from tests.unit.test_report_groups import header, linger, process
    rootd = "/usr/sbin/rootd"
    recs = [header()]
    for i, pid in enumerate((5000, 5001)):
        recs += [process(pid, comm="rootd", exe=rootd, ppid=100, uid=0),
                 linger(i, pid, comm="rootd")]
    for i in range(5):
        rec = linger(10 + i, 5000, comm="rootd", ts=3600.0 + i)
        rec["owners"][0].update(ppid=7777, uid=65534)
        recs.append(rec)
    rows = {r["program"]: (r["processes"], r["count"]) for r in _report(recs)["by_program"]}
    assert rows[max(rows, key=lambda k: rows[k][1])] == (1, 5), rows
    assert sum(count for _, count in rows.values()) == 7
    assert all(count != 7 for _, count in rows.values()), rows


def test_report_text_says_a_capped_process_count_is_a_lower_bound():
    """The JSON said processes_at_least; the text showed '(64 processes)'
    for 300 (a review)."""
    from closewait_trace.output import report
    from tests.unit.test_report_groups import header, linger
    recs = [header()]
    for i in range(300):
        rec = linger(i, 2000 + i, comm="postgres")
        rec["owners"][0].update(ppid=1500, uid=107)
        recs.append(rec)
    text = " ".join(report.render_text(report.build(recs, by=["program"])))
    assert "(64+ processes)" in text, text


def test_report_does_not_climb_through_listeners_that_hold_nothing():
    """A review: the recording has process records of the listening
    servers too (5432 and 6267, both nobody's, both children of init); the
    report climbed from their forks through them to pid 1 and made one row
    of two servers (11 processes), where snapshot said 4 and 7."""
    from tests.unit.test_report_groups import header, linger, process
    recs = [header(), process(5432, ppid=1, uid=65534), process(6267, ppid=1, uid=65534)]
    n = 0
    for server, forks_ in ((5432, range(7000, 7004)), (6267, range(8000, 8007))):
        for pid in forks_:
            recs += [process(pid, ppid=server, uid=65534), linger(n, pid)]
            n += 1
    rows = sorted((r["processes"], r["count"]) for r in _report(recs)["by_program"])
    assert rows == [(4, 4), (7, 7)], rows
