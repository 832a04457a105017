"""The `top` view's model (pure): rows by process, cause, peer and port;
per-minute counts over a sliding window; escaped names; plain text."""

from closewait_trace.output import top


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


def test_names_are_escaped_and_lines_fit_80_columns():
    m = top.TopModel(Clock())
    rows = m.rows([entry(1, comm="\x1b[2Jpwn" + "x" * 200)], "process")
    lines = top.plain_lines(rows, "process", 1.0, 0, 1_800_000_000.0)
    assert "\x1b" not in "".join(lines) and "\\x1b[2Jpwn" in lines[2]
    assert all(len(l) <= 80 for l in lines)
    assert lines[0].endswith("1 socket in CLOSE_WAIT >= 1.0s, by process")
