"""Linger records' lines built straight from the socket
(output/lingerlines.py): the same bytes as the record's dict encoded
(records.linger, then safe_line(json_dumps) for --json, compact json_dumps
for a recording), with whatever the socket, its holders and its diagnosis
hold; and the sinks that take them write what they wrote from the dict."""

import io
import json
import os
import random
import socket

from closewait_trace.evidence import diagnosis
from closewait_trace.files import recording
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from closewait_trace.output import lingerlines, metrics, records, render, schema, textsafe
from closewait_trace.output.lingerlines import LingerJson, LingerReport, LingerText
from closewait_trace.output.report import build as build_report, render_text as report_text
from closewait_trace.output.sinks import RecordingSink
from closewait_trace.output.terminal import TerminalSink
from closewait_trace.sockets import ages, owners
from closewait_trace.sockets.tracker import Lingerer
from tests.unit import recordfactory
from tests.unit.fakeproc import FakeProc
from tests.unit.test_recording import make_recorder


def plain(rec: dict) -> str:
    return textsafe.safe_line(textsafe.json_dumps(rec, check_circular=False))


def compact(rec: dict) -> str:
    return textsafe.json_dumps(rec, separators=(",", ":"))


# Strings a hostile process can put in its command line or comm: quotes,
# backslashes, controls, DEL, separators, non-ASCII, and JSON's own escapes.
NASTY = ['"', "\\", "\\u0000", '"\\u0000"', "\x00", "\x1b[2J", "\x7f", "\u2028", "\u202e",
         "é", "\U0001f600", "\ud800", ", ", ": ", "}", "{", "plain", "x" * 700]


def lingerer_with_listener(tmp_path, rport: int, comm: str = "serv\x7fer",
                           cmdline=None, tracer_pid: int = 0) -> Lingerer:
    fake = FakeProc(tmp_path)
    fake.process(10, comm=comm, cmdline=cmdline, tracer_pid=tracer_pid,
                 threads={10: ("S", "232 0x4 0x7ff 0x1", "ep_poll")})
    fake.tcp(10, socket.AF_INET, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 800)
    fake.fd(10, 3, 800)
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", rport,
             tcpstates.CLOSE_WAIT, 900 + rport, rx=1)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", rport)
    fake.fd(10, 5, 900 + rport, cloexec=True)
    own = owners.resolve([ep], fake.root)[ep]
    l = Lingerer(endpoints=ep, enter_ns=1_000, skaddr=1)
    l.ownership = own
    l.diagnosis = diagnosis.gather(own, fake.root, machine="x86_64")
    l.code = records.Shared(records.code_unknown("not here", "nor \x7f here"))
    return l


def varied_lingerers(tmp_path, rng: random.Random, n: int) -> list:
    """Lingering sockets with their fields varied: hostile holder strings,
    several holders, no owner answer, no diagnosis, estimated and bounded
    ages, another namespace, a tracer, a plain or missing `code`."""
    out = []
    for i in range(n):
        root = tmp_path / str(i)
        root.mkdir()
        l = lingerer_with_listener(root, 40000 + i, tracer_pid=rng.choice([0, 0, 77]))
        own = l.ownership
        # What /proc gave, replaced: a file cannot hold some of these.
        for h in tuple(own.holders) + tuple(own.listener_holders):
            h.comm, h.cmdline = rng.choice(NASTY), rng.choice(NASTY) + rng.choice(NASTY)
        if rng.random() < 0.3:
            # A second holder process (fork), and a holder with no fd facts.
            h = own.holders[0]
            own.holders = (h, owners.Holder(h.pid + 1, rng.choice(NASTY), 7, "T", h.pid,
                                            rng.choice([None, 0, 2**40]), rng.choice(NASTY)))
        if rng.random() < 0.2:
            own.listener, own.listener_holders = None, ()
        if rng.random() < 0.2:
            own.other_netns = (4026531841, 4026532000)
        own.rx_queue = rng.choice([0, 1, 2, 2**33])
        own.kind = rng.choice([owners.OWNER_FD, owners.OWNER_FD, owners.OWNER_ACCEPT_QUEUE,
                               owners.OWNER_DENIED, owners.OWNER_NONE, "\x7f"])
        own.netns = rng.choice([None, 4026531840, 2**64 - 1])
        if rng.random() < 0.1:
            l.ownership = None
        if rng.random() < 0.1:
            l.diagnosis = None
        l.code = rng.choice([l.code, None, records.code_none_seen(rng.choice(NASTY))])
        l.age_source = rng.choice([ages.TRACED, ages.ESTIMATED, ages.RANGE, ages.LOWER_BOUND])
        l.enter_max_ns = rng.choice([None, 0, 5_000_000_123])
        l.pre_existing = rng.random() < 0.3
        l.found_late = rng.random() < 0.3
        l.enter_ns = rng.randrange(0, 10**13)
        out.append(l)
    return out


def reports(lingerers, rng: random.Random) -> list:
    return [LingerReport(l, rng.choice([1_796_594_561.962285, 1_700_000_000.0000005,
                                        1e9 + rng.random(), 0.0, 123.4565]) + rng.random(),
                         rng.randrange(0, 10**14), update=rng.random() < 0.3)
            for l in lingerers]


def test_lines_are_the_bytes_of_the_record_encoded(tmp_path):
    rng = random.Random(20)
    lingerers = varied_lingerers(tmp_path, rng, 60)
    full, small = LingerJson(), LingerJson(compact=True)
    for _ in range(5):
        for report in reports(lingerers, rng):
            rec = records.linger(report.lingerer, report.ts, report.age_ns, report.update)
            assert full.line(report) == plain(rec), rec
            assert small.line(report) == compact(rec), rec
            assert report._record is None       # the dict was not made
    assert "\x7f" not in full.line(report)


CLOCKS = ("clock", "iso", "epoch", "elapsed", "entered")


def hostile_text_fields(lingerers, rng: random.Random) -> None:
    """What the text rows show that varied_lingerers leaves plain: the
    summary and a holder's state, from another user's process."""
    for l in lingerers:
        if l.diagnosis is not None and rng.random() < 0.3:
            l.diagnosis.summary = rng.choice(NASTY) + rng.choice(NASTY)
        if l.ownership is not None and l.ownership.holders and rng.random() < 0.2:
            l.ownership.holders[0].state = rng.choice(NASTY)


def test_text_rows_are_the_records_rows(tmp_path):
    """LingerText gives what the renderer gives the record's dict, in every
    clock (a date line when the day changes: the ts include 1970), with
    --all's narrower columns, for CHANGE and LINGER, without making the
    dict; and through the dict's way with -v, --wide, or an EOF read's
    place, where its rows need the record."""
    rng = random.Random(21)
    lingerers = varied_lingerers(tmp_path, rng, 60)
    hostile_text_fields(lingerers, rng)
    # One process holding it on two fds: one holder process, not "+1".
    two = lingerers[1]
    h = two.ownership.holders[0]
    two.ownership.holders = (h, owners.Holder(h.pid, h.comm, h.fd + 1, h.state, h.ppid,
                                              h.uid, h.cmdline))
    seen = set()
    for clock in CLOCKS:
        for all_transitions in (False, True):
            fast, slow = (render.TextRenderer(time_format=clock) for _ in range(2))
            fast.all_transitions = slow.all_transitions = all_transitions
            text = LingerText(fast)
            for _ in range(3):
                # A time half a microsecond before the next second: the
                # record's, rounded to the microsecond, is in that second.
                edge = [LingerReport(l, 1_796_594_561.9999996, 10**9) for l in lingerers[:3]]
                for report in reports(lingerers, rng) + edge:
                    rec = records.linger(report.lingerer, report.ts, report.age_ns,
                                         report.update)
                    want = slow.render(rec)
                    assert text.lines(report) == want, rec
                    assert report._record is None       # the dict was not made
                    seen.update(line[:10] for line in want if not line.startswith(" "))
    assert any(line[4] == "-" for line in seen)         # a date line was among them
    for wide, verbose in ((True, False), (False, True)):
        fast, slow = (render.TextRenderer(wide=wide, verbose=verbose) for _ in range(2))
        text = LingerText(fast)
        for report in reports(lingerers, rng):
            want = slow.render(records.linger(report.lingerer, report.ts, report.age_ns,
                                              report.update))
            assert text.lines(report) == want and report._record is not None
    # A place known (the read of EOF, the connect() that opened it): a line
    # each, even without -v (a review: the connect()'s was dropped).
    l = lingerers[0]
    read = {"pid": 10, "comm": "c", "ts": 5.0, "place": None}
    opened = {"ts": 5.0, "pid": 10, "tid": 10, "comm": "client", "stack": [],
              "stack_bytes": 0, "unwound": True,
              "place": {"function": "fetch_user", "file": "app.py", "line": 3}}
    for code, said in (({"eof_read": read, "opened": None}, "read EOF"),
                       ({**records.code_none_seen(), "opened": opened,
                         "opened_unknown": None}, "opened by fetch_user (app.py:3)"),
                       ({"eof_read": read, "opened": opened}, "opened by")):
        l.code = code
        report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
        want = render.TextRenderer().render(records.linger(l, report.ts, report.age_ns))
        assert LingerText(render.TextRenderer()).lines(report) == want
        assert report._record is not None and any(said in line for line in want)


def test_text_rows_keep_a_holders_cells_once_and_within_their_bound(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000)
    text = LingerText(render.TextRenderer())
    made = []
    make = text._make_owner
    text._make_owner = lambda *a: made.append(a) or make(*a)
    for i in range(5):
        text.lines(LingerReport(l, 1_796_594_561.5 + i, 2_000_000_000 + i))
    assert len(made) == 1 and len(text._owners) == 1 and len(text._diagnoses) == 1
    h = l.ownership.holders[0]
    for i in range(3 * lingerlines.KEPT_MAX):
        h.comm = f"c{i}"
        l.diagnosis.summary = f"s{i}"
        text.lines(LingerReport(l, 1_796_594_561.5, 2_000_000_000))
        assert len(text._owners) <= lingerlines.KEPT_MAX
        assert len(text._diagnoses) <= lingerlines.KEPT_MAX
    l.diagnosis.summary = "x" * (lingerlines.KEPT_SUMMARY_CHARS + 1)
    before = dict(text._diagnoses)
    text.lines(LingerReport(l, 1_796_594_561.5, 2_000_000_000))
    assert text._diagnoses == before                    # too long to keep: made again


def test_an_evidence_let_go_raises_from_the_text_as_from_the_dict(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000)
    l.diagnosis.written()
    report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
    for make in (report.record, lambda: LingerText(render.TextRenderer()).lines(report)):
        try:
            make()
        except diagnosis.EvidenceWritten:
            continue
        raise AssertionError("no EvidenceWritten")


def test_the_process_pieces_and_shared_parts_are_made_once(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000, cmdline=["x" * 4000])
    lines = LingerJson()
    calls = []
    encode = lines._encode
    lines._encode = lambda v: calls.append(v) or encode(v)
    for i in range(5):
        report = LingerReport(l, 1_796_594_561.5 + i, 2_000_000_000 + i)
        assert lines.line(report) == plain(report.record())
    listener = records.listener_part(l.ownership)
    assert sum(1 for v in calls if v is listener) == 1      # once for five records
    assert sum(1 for v in calls if v is l.code) == 1
    assert len(lines._holders) == 1                         # one holder process
    assert sum(1 for v in calls if v == "x" * 4000) == 0    # a str: not the encoder's


def test_a_nan_takes_the_dicts_way(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000)
    l.code = {"eof_read": float("nan"), "opened": None}
    report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
    rec = records.linger(l, report.ts, report.age_ns)
    assert LingerJson().line(report) == plain(rec)
    assert LingerJson(compact=True).line(report) == compact(rec)
    assert '"eof_read": null' in LingerJson().line(report)


def test_holder_process_fields_are_as_dicts_fields_but_the_fd():
    h = owners.Holder(1, "c", 9, "S", 0, 0, "c")
    assert [k for k in h.as_dict() if k != "fd"] == list(lingerlines.HOLDER_PROCESS_FIELDS)
    assert list(h.as_dict())[2] == "fd"


def test_the_sinks_write_from_the_socket_what_they_wrote_from_the_dict(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000)
    got = []
    for update in (False, True):
        report = LingerReport(l, 1_796_594_561.5, 2_000_000_000, update)
        rec = records.linger(l, report.ts, report.age_ns, update)
        out = io.StringIO()
        TerminalSink(True, render.TextRenderer(), stream=out).emit_linger(report)
        assert out.getvalue() == plain(rec) + "\n"
        text = io.StringIO()
        TerminalSink(False, render.TextRenderer(), stream=text).emit_linger(report)
        by_dict = io.StringIO()
        TerminalSink(False, render.TextRenderer(), stream=by_dict).emit(rec)
        assert text.getvalue() == by_dict.getvalue() and text.getvalue()
        quiet = io.StringIO()
        TerminalSink(True, render.TextRenderer(), quiet=True, stream=quiet).emit_linger(report)
        assert quiet.getvalue() == ""
        got.append((report, rec))

    path = str(tmp_path / "r.jsonl")
    sink = RecordingSink(make_recorder(path))
    for report, _rec in got:
        sink.emit_linger(report)
    sink.close()
    path_b = str(tmp_path / "s.jsonl")
    rec_b = make_recorder(path_b)
    for _report, rec in got:
        rec_b.write(rec)
    rec_b.close()
    lines_a = [x for x in open(path).read().splitlines() if '"linger"' in x]
    lines_b = [x for x in open(path_b).read().splitlines() if '"linger"' in x]
    assert lines_a == lines_b == [compact(rec) for _r, rec in got]

    by_report, by_dict = metrics.MetricsSink.__new__(metrics.MetricsSink), \
        metrics.MetricsSink.__new__(metrics.MetricsSink)
    by_report.state, by_dict.state = metrics.MetricsState(), metrics.MetricsState()
    for report, rec in got:
        by_report.emit_linger(report)
        by_dict.emit(rec)
    assert by_report.state.lingered == by_dict.state.lingered == {l.diagnosis.cause: 1}


def test_a_long_linger_line_is_refused_by_the_recording_as_a_long_record_is(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000)
    h = l.ownership.holders[0]
    l.ownership.holders = tuple(owners.Holder(h.pid + i, "c", 5, "S", 1, 0, "y" * 4000)
                                for i in range(recording.MAX_LINE_BYTES // 4000 + 1))
    path = str(tmp_path / "r.jsonl")
    recorder = make_recorder(path)
    RecordingSink(recorder).emit_linger(LingerReport(l, 1_796_594_561.5, 2_000_000_000))
    recorder.close()
    assert recorder.write_errors == 1
    assert all(json.loads(x)["type"] != "linger" for x in open(path).read().splitlines())


def test_the_kept_pieces_stay_within_their_bound_whatever_the_command_lines(tmp_path):
    """Every holder a process of its own with a 4,096-character command
    line that escapes to six characters each (\\uXXXX), and a listener
    whose part is larger than the bound: what is kept stays within
    KEPT_CHARS_MAX characters, and every line is still the dict's."""
    l = lingerer_with_listener(tmp_path, 40000)
    h = l.ownership.holders[0]
    lines = LingerJson()
    for i in range(203):
        l.ownership.holders = (owners.Holder(h.pid + i, "c", 5, "S", 1, 0, "\u00e9" * 4096),)
        if i == 200:
            l.ownership.listener_holders = tuple(
                owners.Holder(9000 + j, "l", 3, "S", 1, 0, "\u00e9" * 4096) for j in range(30))
            records._listener_parts.clear()
        report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
        assert lines.line(report) == plain(report.record())
        kept = sum(len(a) + len(b) for a, b in lines._holders.values()) + \
            sum(len(text) for _v, text in lines._kept.values())
        assert kept <= lingerlines.KEPT_CHARS_MAX
        assert lines._kept_chars <= lingerlines.KEPT_CHARS_MAX
    big = records.listener_part(l.ownership)
    assert len(lines._value(big)) > lingerlines.KEPT_CHARS_MAX // 8
    assert id(big) not in lines._kept                   # too large to keep


def test_holder_fields_of_other_types_or_facts_named_as_fields_take_the_dicts_way(tmp_path):
    """The process pieces are kept by the fields' values: a uid True after
    a uid 1 (equal, written otherwise), a list (unhashable), or a fact
    named as a field (it replaces the field in the dict) would have made
    another line than the dict's."""
    l = lingerer_with_listener(tmp_path, 40000)
    h = l.ownership.holders[0]
    lines = LingerJson()
    for uid in (1, True, 1.0, [1], "1"):
        h.uid = uid
        report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
        assert lines.line(report) == plain(report.record()), uid
    h.uid = 0
    l.diagnosis = type("D", (), {"holder_facts": lambda self: {
        (h.pid, h.fd): {"state": "X", "cloexec": True}},
        "as_dict": lambda self: {"cause": "c", "summary": "s", "evidence": {}},
        "cause": "c"})()
    report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
    assert lines.line(report) == plain(report.record())


def test_a_socket_and_listener_duped_without_end_are_listed_in_part_and_counted(tmp_path):
    """A user's process can dup() its listener (or the socket) tens of
    thousands of times: every fd was a holder, and every record of every
    socket accepted from it listed them all (950 KB a line for 8,192,
    encoded again for each). Listed: the lowest FDS_LISTED_PER_PROCESS of
    one process; the rest counted, in the dict and the lines alike."""
    fake = FakeProc(tmp_path)
    fake.process(10, comm="dup")
    fake.tcp(10, socket.AF_INET, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 800)
    for fd in range(3, 3 + 3000):
        fake.fd(10, fd, 800)
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=1)
    for fd in range(4000, 4010):
        fake.fd(10, fd, 900)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)
    own = owners.resolve([ep], fake.root)[ep]
    listed = owners.FDS_LISTED_PER_PROCESS
    assert [h.fd for h in own.listener_holders] == list(range(3, 3 + listed))
    assert [h.fd for h in own.holders] == list(range(4000, 4000 + listed))
    assert own.holders_cut == (10 - listed, 3000 - listed)
    l = Lingerer(endpoints=ep, enter_ns=1_000, skaddr=1)
    l.ownership = own
    l.diagnosis = diagnosis.gather(own, fake.root, machine="x86_64")
    report = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
    rec = records.linger(l, report.ts, report.age_ns)
    assert rec["owners_not_listed"] == 10 - listed
    assert rec["listener"]["owners_not_listed"] == 3000 - listed
    assert list(rec).index("owners_not_listed") == list(rec).index("owners") + 1
    line = LingerJson().line(report)
    assert line == plain(rec) and LingerJson(compact=True).line(report) == compact(rec)
    assert len(line) < 8_000
    # One process holds it, however many fds: not a leak between processes.
    assert l.diagnosis.cause != diagnosis.LEAKED
    text = render.TextRenderer(verbose=True).render(rec)
    assert "and 6 more fds on it, not listed" in "\n".join(text)
    # Still lingering at exit, at a snapshot, in a report: counted there too.
    entry = records.lingering_entry(l, 2_000_000_000)
    assert entry["owners_not_listed"] == 10 - listed
    assert schema.problem(recordfactory.snapshot(lingering=[entry])) is None
    summary = recordfactory.summary(still_lingering=[entry])
    assert schema.problem(summary) is None
    said = [line for line in render.summary_lines(summary) if "fd 4000" in line]
    # Its one process named once (not its first 3 fds as 3 holders), and
    # the other 3 fds listed and 6 not listed counted as fds.
    assert len(said) == 1 and said[0].endswith("fd 4000 [S] and 9 more fds"), said
    rep = build_report([recordfactory.header(), recordfactory.snapshot(lingering=[entry]),
                        summary])
    assert rep["still_lingering"][0]["owners_not_listed"] == 10 - listed
    said = report_text(rep)
    # Right under its holders (the last listed is fd 4003).
    assert said[said.index("      and 6 more fds on it, not listed") - 1].endswith(
        "10/dup fd 4003"), said


def test_every_holding_process_is_listed_however_many_fds_each_has(tmp_path):
    """Which processes hold a socket decides its diagnosis (a leak between
    processes, a worker that holds its server's listener), its watch and
    who closed it: each is listed, with at most FDS_LISTED_PER_PROCESS of
    its fds. A prefork server's 100 workers all hold its listener; the one
    with the highest pid holds an accepted socket without close-on-exec,
    as accept() leaves it: it holds the listener too, so the socket was
    not inherited (with only the lowest 64 of the listener's holders
    listed, it was said to be)."""
    fake = FakeProc(tmp_path)
    fake.process(10, comm="master")
    fake.tcp(10, socket.AF_INET, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 800)
    fake.fd(10, 3, 800)
    for pid in range(11, 111):
        fake.process(pid, ppid=10, comm="worker",
                     threads={pid: ("S", "232 0x4 0x7ff 0x1", "ep_poll")}).fd(pid, 3, 800)
    fake.tcp(110, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=1)
    for fd in range(7, 17):
        fake.fd(110, fd, 900)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)
    own = owners.resolve([ep], fake.root)[ep]
    assert [h.pid for h in own.listener_holders] == list(range(10, 111))
    assert [(h.pid, h.fd) for h in own.holders] == [(110, fd) for fd in range(7, 11)]
    assert own.holders_cut == (6, 0)
    got = diagnosis.gather(own, fake.root, machine="x86_64")
    assert got.cause == diagnosis.IGNORING_EOF, got.summary
    # Forks holding it: the leak names processes, one name each whatever
    # its fds ("and N more" counts processes), and says the fds its record
    # does not list apart (they were once "more" beside the processes).
    for pid in range(11, 20):
        fake.fd(pid, 9, 900)
    own = owners.resolve([ep], fake.root)[ep]
    got = diagnosis.gather(own, fake.root, machine="x86_64")
    assert got.cause == diagnosis.LEAKED
    assert got.summary.startswith("held by 10 processes: ")
    assert got.summary.endswith(f" and {10 - diagnosis.MAX_NAMED} more (6 more fds not listed)"), \
        got.summary


def test_a_listener_part_too_large_to_keep_is_encoded_once_for_its_sockets(tmp_path):
    """64 holders whose command lines are 4 KB of characters JSON escapes
    six times over make a part past an eighth of KEPT_CHARS_MAX:
    not kept with the others, it was encoded again for every record of
    every socket accepted from that listener (12 ms each for the largest).
    The last such part is kept by itself."""
    l = lingerer_with_listener(tmp_path, 40000)
    own = l.ownership
    nasty = "\x01" * 4096
    own.listener_holders = tuple(owners.Holder(20 + i, "w", 3, "S", 1, 1000, nasty)
                                 for i in range(64))
    full = LingerJson()
    encoded = []
    encode = full._encode
    full._encode = lambda value: encoded.append(type(value)) or encode(value)
    first = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
    assert full.line(first) == plain(first.record())
    assert len(full.line(first)) > lingerlines.KEPT_CHARS_MAX // 8
    shared = encoded.count(records.Shared)
    for i in range(5):
        report = LingerReport(l, 1_796_594_562.5 + i, 2_000_000_000)
        assert full.line(report) == plain(report.record())
    assert encoded.count(records.Shared) == shared


def test_a_holder_whose_listed_fds_close_during_the_lookup_still_holds_it(tmp_path, monkeypatch):
    """The pid-reuse check looks for any of the process's links still
    there: with only its lowest 4 fds looked at, a holder that closed those
    while its other 6 hold the socket was "no process holds a file
    descriptor on it" (and held_now said not held)."""
    fake = FakeProc(tmp_path)
    fake.process(10, comm="srv")
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=1)
    real = owners._still_linked

    def closing_the_lowest(fd_dir, matched):
        for fd in range(3, 7):
            link = tmp_path / "10" / "fd" / str(fd)
            if os.path.lexists(link):
                os.unlink(link)
        return real(fd_dir, matched)

    monkeypatch.setattr(owners, "_still_linked", closing_the_lowest)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)
    for fd_flags in (True, False):
        for fd in range(3, 13):
            if not os.path.lexists(tmp_path / "10" / "fd" / str(fd)):
                fake.fd(10, fd, 900)
        own = owners.resolve([ep], fake.root, fd_flags=fd_flags)[ep]
        assert own.kind == owners.OWNER_FD and {h.pid for h in own.holders} == {10}
    for fd in range(3, 7):
        fake.fd(10, fd, 900)
    assert owners.held_now([900], fake.root) == [True]


def test_a_listener_duped_and_a_socket_in_its_queue(tmp_path):
    """Only the listener's fds left out: the line is made from its pieces,
    byte for byte the dict's; a socket never accepted counts them in its
    summary, and the report with the holders it does not show."""
    from closewait_trace.output import report

    fake = FakeProc(tmp_path)
    fake.process(10, comm="dup")
    fake.tcp(10, socket.AF_INET, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 800, rx=1)
    for fd in range(3, 13):
        fake.fd(10, fd, 800)
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=1)
    fake.fd(10, 20, 900)
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40001,
             tcpstates.CLOSE_WAIT, 0, rx=1)                  # in the accept queue
    accepted = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)
    queued = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40001)
    found = owners.resolve([accepted, queued], fake.root)
    own = found[accepted]
    assert own.holders_cut == (0, 6)
    l = Lingerer(endpoints=accepted, enter_ns=1_000, skaddr=1)
    l.ownership = own
    l.diagnosis = diagnosis.gather(own, fake.root, machine="x86_64")
    full, small = LingerJson(), LingerJson(compact=True)
    for i in range(2):
        report_ = LingerReport(l, 1_796_594_561.5 + i, 2_000_000_000)
        rec = report_.record()
        assert rec["listener"]["owners_not_listed"] == 6 and "owners_not_listed" not in rec
        assert full.line(report_) == plain(rec) and small.line(report_) == compact(rec)
    never = diagnosis.gather(found[queued], fake.root, machine="x86_64")
    assert never.cause == diagnosis.NEVER_ACCEPTED
    # The one process holding the listener, once (its fds are no more
    # processes: the record counts them, owners_not_listed).
    assert never.summary.endswith(", held by 10/dup [S]"), never.summary
    q = Lingerer(endpoints=queued, enter_ns=1_000, skaddr=2)
    q.ownership, q.diagnosis = found[queued], never
    rep = report.build([records.linger(q, 1_796_594_561.5, 2_000_000_000)], by=["cause"])
    assert rep["losses"]["folded"]["holder_fds"] == 6


def test_a_listener_part_of_more_holders_than_are_kept_is_made_once_for_its_sockets(tmp_path):
    """Past LISTENER_HOLDERS_KEPT // 8 holders (thousands of processes
    holding one listener) a part was made again, and encoded again, for
    every record of its sockets (14 ms each): the last such is kept alone."""
    l = lingerer_with_listener(tmp_path, 40000)
    own = l.ownership
    many = records.LISTENER_HOLDERS_KEPT // 8 + 1
    own.listener_holders = tuple(owners.Holder(20 + i, "w", 3, "S", 1, 1000, "worker")
                                 for i in range(many))
    part = records.listener_part(own)
    assert records.listener_part(own) is part
    full = LingerJson()
    first = LingerReport(l, 1_796_594_561.5, 2_000_000_000)
    assert full.line(first) == plain(first.record())
    assert full._big[0] is part
