"""The `top` view's model (pure): rows by process, cause, peer and port;
per-minute counts over a sliding window; escaped names; plain text."""

import pytest

from closewait_trace.output import textsafe, top


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def entry(pid, comm="socat", cause="stopped", lport=5555, rport=40000, raddr="127.0.0.1",
          age=2.0, **kw):
    e = {"laddr": "127.0.0.1", "lport": lport, "raddr": raddr, "rport": rport, "netns": 1,
         "age_s": age, "age_source": "traced", "owner_kind": "fd",
         "owners": [{"pid": pid, "comm": comm, "fd": 5, "state": "T"}],
         "diagnosis": {"cause": cause, "summary": cause}}
    e.update(kw)
    return e


def test_rows_by_process_and_cause_biggest_first():
    m = top.TopModel(Clock())
    lingering = [entry(1, rport=40000 + i) for i in range(3)] + [entry(2, comm="java",
                                                                       cause="leaked", age=9.0)]
    by_process = m.rows(lingering, "process")
    assert [(r.key, r.sockets) for r in by_process] == [("1/socat", 3), ("2/java", 1)]
    assert by_process[1].oldest_s == 9.0
    assert top.cells(by_process[0], "process")[-1] == "1/socat [stopped]"
    assert [(r.key, r.sockets) for r in m.rows(lingering, "cause")] == [("stopped", 3),
                                                                         ("leaked", 1)]


def test_a_rows_causes_past_the_two_named_are_counted():
    """A peer's row named its two most common causes and left a third
    unsaid, as if every socket there had one of the two (a newcomer's
    report: 2 of 10 were stopped)."""
    m = top.TopModel(Clock())
    causes = ["ignoring_eof"] * 6 + ["leaked"] * 2 + ["stopped"] * 2
    lingering = [entry(1, cause=c, rport=40000 + i) for i, c in enumerate(causes)]
    [row] = m.rows(lingering, "peer")
    assert top.cells(row, "peer")[-1].endswith(" [ignoring_eof, leaked, +1]") or \
        top.cells(row, "peer")[-1].endswith(" [ignoring_eof, stopped, +1]")
    [row] = m.rows(lingering[:8], "peer")
    assert top.cells(row, "peer")[-1].endswith(" [ignoring_eof, leaked]")


def test_a_process_with_two_fds_on_its_socket_is_not_a_second_holder():
    """By process, `+N` is the other processes that hold the socket: a
    process that dup()ed it was "7/socat +1", a row of its own apart from
    its other sockets' "7/socat"."""
    def fd(pid, n):
        return {"pid": pid, "comm": "socat", "fd": n, "state": "T"}

    assert top.keys_of(entry(7, owners=[fd(7, 5), fd(7, 6)]))["process"] == "7/socat"
    assert top.keys_of(entry(7, owners=[fd(7, 5), fd(7, 6), fd(8, 5)]))["process"] \
        == "7/socat +1"
    m = top.TopModel(Clock())
    rows = m.rows([entry(7, rport=40000), entry(7, rport=40001, owners=[fd(7, 5), fd(7, 6)])],
                  "process")
    assert [(r.key, r.sockets) for r in rows] == [("7/socat", 2)]


def test_new_and_closed_per_minute_over_a_sliding_window():
    clock = Clock()
    m = top.TopModel(clock)
    for i in range(4):
        m.on_record(dict(entry(1, rport=40000 + i), type="linger", update=False))
    m.on_record(dict(entry(1, rport=40000), type="closed", reported=True))
    m.on_record(dict(entry(1, rport=40001), type="linger", update=True))   # a CHANGE: not new
    [row] = m.rows([entry(1, rport=40000 + i) for i in (1, 2, 3)], "process")
    assert (row.sockets, row.new_per_min, row.closed_per_min) == (3, 4, 1)
    clock.t += top.WINDOW_S + 1
    [row] = m.rows([entry(1, rport=40000 + i) for i in (1, 2, 3)], "process")
    assert (row.new_per_min, row.closed_per_min) == (0, 0)


def test_a_client_leak_is_one_row_by_remote_service_and_ephemeral_port():
    m = top.TopModel(Clock())
    lingering = [entry(7, comm="python3", lport=45000 + i, rport=5432, raddr="10.0.0.9")
                 for i in range(5)]
    assert [(r.key, r.sockets) for r in m.rows(lingering, "peer")] == [("10.0.0.9:5432", 5)]
    assert [(r.key, r.sockets) for r in m.rows(lingering, "port")] == [("(ephemeral)", 5)]


def test_a_keepalive_range_counts_by_what_it_may_be():
    m = top.TopModel(Clock())
    [row] = m.rows([entry(1, age=0.9, age_source="range", age_max_s=24.0)], "process")
    assert row.oldest_s == 24.0


@pytest.mark.parametrize("fields, shown", [
    ({"age": 9.0, "age_source": "traced"}, "9.0s"),
    ({"age": 9.0, "age_source": "estimated"}, "~9.0s"),
    ({"age": 9.0, "age_source": "lower_bound"}, ">=9.0s"),
    ({"age": 0.9, "age_source": "range", "age_max_s": 24.0}, "<=24.0s"),
    ({"age": 9.0, "age_source": "range"}, ">=9.0s"),          # no upper end
    ({"age": 9.0, "age_source": "\x1b[2J"}, "9.0s"),           # not a source
])
def test_the_oldest_age_is_shown_with_how_it_is_known(fields, shown):
    """A socket in CLOSE_WAIT before the trace began has an age estimated
    from tcp_info: OLDEST marks it as the linger line does (`~`), never as
    an age the kernel timed."""
    m = top.TopModel(Clock())
    rows = m.rows([entry(1, rport=40001, age=2.0), entry(1, rport=40002, **fields)],
                  "process")
    assert top.cells(rows[0], "process")[1] == shown
    line = top.plain_lines(rows, "process", 1.0, 0, 1_800_000_000.0)[2]
    assert line.split()[1] == shown and len(line) <= 80


def test_names_are_escaped_and_lines_fit_80_columns():
    m = top.TopModel(Clock())
    rows = m.rows([entry(1, comm="\x1b[2Jpwn" + "x" * 200)], "process")
    lines = top.plain_lines(rows, "process", 1.0, 0, 1_800_000_000.0)
    assert "\x1b" not in "".join(lines) and "\\x1b[2Jpwn" in lines[2]
    assert all(len(l) <= 80 for l in lines)
    assert lines[0].endswith("1 socket in CLOSE_WAIT >= 1.0s, by process")


def process_record(pid, cgroup):
    return {"type": "process", "pid": pid, "comm": "x",
            "identity": {"cgroup": cgroup, "container": None, "unit": None}}


CID = "ab" * 32
POD = "1234abcd-0000-4000-8000-00000000beef"


@pytest.mark.parametrize("cgroup,label", [
    (f"/system.slice/docker-{CID}.scope", "docker " + CID[:12]),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
     f"containerd {CID[:12]} (pod {POD[:8]})"),
    (f"/kubepods/burstable/pod{POD}", f"pod {POD}"),
    ("/system.slice/nginx.service", "nginx.service"),
    ("/system.slice/system-getty.slice/getty@tty1.service", "getty@tty1.service"),
    ("/user.slice/user-1000.slice/session-3.scope", "/user.slice/user-1000.slice/session-3.scope"),
    ("/lab-batch", "/lab-batch"),
    (None, top.NOT_KNOWN),
])
def test_container_label_from_the_cgroup_path(cgroup, label):
    assert top.place_of({"cgroup": cgroup}) == label


def test_a_container_named_by_a_user_is_its_cgroup_path_escaped_and_bounded():
    # Below user@1000.service the user names cgroups: a docker-looking
    # scope there is not a container, and its name is hostile.
    claimed = (f"/user.slice/user-1000.slice/user@1000.service/docker-{CID}.scope/"
               "\x1b[2J" + "y" * 300)
    label = top.place_of({"cgroup": claimed})
    assert not label.startswith("docker ")
    assert label.startswith("user@1000.service:/docker-") and "\x1b" not in label
    assert textsafe.width_of_escaped(label) <= top.MAX_PLACE
    assert label.endswith("y")            # cut in the middle: the leaf still shows
    # The identity's own container field (a recording's, or a forged one) is
    # not believed: only the path decides.
    forged = {"cgroup": "/lab", "container": {"runtime": "docker", "id": CID}}
    assert top.place_of(forged) == "/lab"


def test_rows_by_container_from_the_process_records():
    m = top.TopModel(Clock())
    m.on_record(process_record(1, f"/system.slice/docker-{CID}.scope"))
    m.on_record(process_record(2, f"/system.slice/docker-{CID}.scope"))
    m.on_record(process_record(3, "/system.slice/nginx.service"))
    lingering = ([entry(1, rport=40000 + i) for i in range(3)] + [entry(2, rport=41000)]
                 + [entry(3, rport=42000 + i) for i in range(2)] + [entry(4, rport=43000)]
                 + [dict(entry(5, rport=44000), owners=[], owner_kind="accept_queue")])
    rows = m.rows(lingering, "container")
    assert [(r.key, r.sockets) for r in rows] == [
        ("docker " + CID[:12], 4), ("nginx.service", 2), ("(cgroup not known)", 1),
        ("(not accepted)", 1)]
    # A pid's latest record counts (a process moved, or a pid reused).
    m.on_record(process_record(3, f"/system.slice/docker-{CID}.scope"))
    assert m.rows(lingering, "container")[0].sockets == 6
    lines = top.plain_lines(rows, "container", 1.0, 0, 1_800_000_000.0)
    assert lines[1].endswith("CONTAINER / UNIT / CGROUP")
    assert "docker " + CID[:12] + " [stopped]" in lines[2]


def test_the_containers_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(top, "MAX_PROCESSES", 3)
    m = top.TopModel(Clock())
    for pid in range(10):
        m.on_record(process_record(pid, f"/c{pid}"))
    assert list(m.places) == [7, 8, 9]


def test_the_new_per_minute_by_container():
    m = top.TopModel(Clock())
    m.on_record(process_record(1, "/lab"))
    m.on_record(dict(entry(1), type="linger", update=False))
    [row] = m.rows([], "container")
    assert (row.key, row.new_per_min, row.sockets) == ("/lab", 1, 0)


# ---------------------------------------------------------------- the sink's cache

def test_the_sink_works_out_a_sockets_row_once_until_it_changes(monkeypatch):
    """5,000 sockets in one process: the keys of each are worked out once,
    not at every refresh (bench/top_scale.py); again when its diagnosis,
    holders or a holder's container changed. Rows as from full entries."""
    import io
    import socket as so
    from types import SimpleNamespace as NS

    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.output import sinks, topview
    from closewait_trace.sockets.tracker import Lingerer

    def lingerer(i, pid, cause, enter_ns):
        own = NS(kind="fd", holders=[NS(pid=pid, comm="python3", fd=5 + i, state="S")],
                 holders_cut=None)
        return Lingerer(Endpoints(so.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 40000 + i),
                        enter_ns=enter_ns, skaddr=None, reported=True, ownership=own,
                        diagnosis=NS(cause=cause, summary=cause))

    ls = [lingerer(i, 7, "leaked", 1_000_000_000 * i) for i in range(50)]
    ls.append(lingerer(99, 8, "stopped", 0))
    view = sinks.TickView(wall_ts=1_800_000_000.0, now_ns=100_000_000_000, threshold_ns=1,
                          counters={}, histogram=[], histogram_sum_ns=None,
                          lingering=lambda: ls)
    calls = []
    real = top.keys_of
    monkeypatch.setattr(top, "keys_of", lambda *a: calls.append(1) or real(*a))
    sink = topview.TopSink("process", stream=io.StringIO())
    sink.emit({"type": "process", "pid": 7, "identity": {"cgroup": "/a"}})
    sink.emit({"type": "process", "pid": 8, "identity": {"cgroup": "/b"}})
    for _ in range(3):
        sink.tick(view)
    assert len(calls) == 51
    want = sink.model.rows(sinks.lingering_entries(view), "process")
    got = sink.model.rows_of(sink._lingering(view), "process")
    assert [(r.key, r.sockets, round(r.oldest_s, 3)) for r in got] == \
        [(r.key, r.sockets, round(r.oldest_s, 3)) for r in want] == \
        [("7/python3", 50, 100.0), ("8/python3", 1, 100.0)]
    # The oldest is socket 0's (entered at 0): timed, shown as timed; once
    # its age is an estimate from tcp_info, shown as one.
    assert sink.stream.getvalue().splitlines()[2].split()[1] == "1m40s"
    ls[0].age_source = "estimated"
    assert top.cells(sink.model.rows_of(sink._lingering(view), "process")[0],
                     "process")[1] == "~1m40s"
    ls[0].age_source = "traced"
    calls.clear()
    ls[0].diagnosis = NS(cause="stopped", summary="stopped")
    sink.grouping = "cause"
    sink.tick(view)
    assert len(calls) == 1
    assert [(r.key, r.sockets) for r in sink.model.rows_of(sink._lingering(view), "cause")] \
        == [("leaked", 49), ("stopped", 2)]
    calls.clear()
    sink.emit({"type": "process", "pid": 8, "identity": {"cgroup": "/b"}})   # the same place
    sink.tick(view)
    assert calls == []
    sink.emit({"type": "process", "pid": 8, "identity": {"cgroup": "/c"}})   # moved
    sink.grouping = "container"
    sink.tick(view)
    assert len(calls) == 51
    assert [(r.key, r.sockets) for r in sink.model.rows_of(sink._lingering(view), "container")] \
        == [("/a", 50), ("/c", 1)]
    del ls[10:]
    sink.tick(view)
    assert len(sink._keys) == 10                    # the sockets gone are forgotten
    assert "--- " in sink.stream.getvalue()


def test_sockets_older_than_the_trace_are_not_new():
    """A newcomer's first minute of `top` showed NEW/MIN 79 for a client
    whose real rate was 21: every socket already lingering at start counted
    as new. They still count as held, and as closed when they close."""
    clock = Clock()
    m = top.TopModel(clock)
    for i in range(5):
        m.on_record(dict(entry(1, rport=40000 + i), type="linger", update=False,
                         pre_existing=True))
    m.on_record(dict(entry(1, rport=40010), type="linger", update=False, pre_existing=False))
    m.on_record(dict(entry(1, rport=40000), type="closed", reported=True))
    [row] = m.rows([entry(1, rport=40000 + i) for i in (1, 2, 3, 4, 10)], "process")
    assert (row.sockets, row.new_per_min, row.closed_per_min) == (5, 1, 1)


class _Shown:
    """rich's Live, as far as TopSink._draw uses it: what it was given."""

    def __init__(self):
        self.renderable = None

    def update(self, renderable, refresh=False):
        self.renderable = renderable


def test_the_terminal_view_keeps_its_counts_whole_at_80_columns():
    """In an 80-column terminal rich shrank every column to fit, the counts
    too: "SOCKE…", an oldest age of "~1m2…", while the key kept padding (a
    newcomer's report). The counts are kept whole; the key gets the rest,
    its name cut and its causes kept."""
    import io
    from rich.console import Console
    from closewait_trace.output import topview
    sink = topview.TopSink("process", stream=io.StringIO())
    sink._console = Console(file=io.StringIO(), width=80, color_system=None,
                            force_terminal=False)
    sink._live = _Shown()
    m = top.TopModel(Clock())
    lingering = ([entry(1, comm="socat-with-a-much-longer-name", rport=40000 + i,
                        cause=c, age=5000.0)
                  for i, c in enumerate(["stopped", "leaked", "ignoring_eof", "stopped"])]
                 + [entry(2, comm="python3", cause="ignoring_eof", age=62.0)])
    sink._draw(m.rows(lingering, "process"))
    out = io.StringIO()
    Console(file=out, width=80, color_system=None, force_terminal=False).print(
        sink._live.renderable)
    lines = out.getvalue().splitlines()
    assert max(len(l) for l in lines) <= 80
    header = next(l for l in lines if "SOCKETS" in l)
    assert all(name in header for name in top.COLUMNS)
    row = next(l for l in lines if "socat" in l)
    assert " 1h23m " in row and row.rstrip().endswith("[stopped, leaked, +1]"), row
