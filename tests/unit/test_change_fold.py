"""CHANGE rows folded in the text output (output/changefold.py, through the
terminal sink): a holder of many sockets that is stopped or continued
showed a CHANGE row and a diagnosis line for every socket (5,000 lines for
2,500 sockets, each time). The text shows the first few of each group (the
same holders, states and cause) and one line counting the rest; JSON and
the record stream keep one record per socket, and a replay of the same
records shows the same lines as the live trace."""

import io
import json
import socket

from closewait_trace.evidence import diagnosis
from closewait_trace.kernel.events import Endpoints
from closewait_trace.output import changefold, records, render
from closewait_trace.output.lingerlines import LingerReport
from closewait_trace.output.terminal import TerminalSink
from closewait_trace.sockets import owners
from closewait_trace.sockets.tracker import Lingerer

SHOWN = changefold.CHANGE_ROWS_SHOWN


def lingerer(pid: int, fd: int, rport: int, state: str = "T",
             cause: str = diagnosis.STOPPED, comm: str = "srv") -> Lingerer:
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", rport)
    l = Lingerer(endpoints=ep, enter_ns=1_000_000_000, skaddr=1)
    l.ownership = owners.Ownership(owners.OWNER_FD, holders=(
        owners.Holder(pid, comm, fd, state, 1, 1000, f"{comm} --serve"),))
    l.diagnosis = diagnosis.Diagnosis(cause, f"{cause}: {pid}/{comm} fd {fd}")
    return l


def interleaved(n_a: int = 10, n_b: int = 5) -> list:
    """Sockets of two holders, in the order a batch sorts them (by age):
    the two holders' sockets interleaved."""
    a = [lingerer(42, 10 + i, 40000 + i) for i in range(n_a)]
    b = [lingerer(43, 10 + i, 50000 + i) for i in range(n_b)]
    out = []
    for i in range(max(n_a, n_b)):
        out += a[i:i + 1] + b[i:i + 1]
    return out


def reports(lingerers, update: bool = True) -> list:
    return [LingerReport(l, 1_700_000_000.0 + i * 0.001, 5_000_000_000, update=update)
            for i, l in enumerate(lingerers)]


def live_text(batch_reports, before=(), after=()) -> list[str]:
    """What a live trace's text sink writes for one batch (hold_batch
    around it), with records before and after it."""
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(), stream=out)
    for r in before:
        sink.emit_linger(r)
    sink.hold_batch(True)
    for r in batch_reports:
        sink.emit_linger(r)
    sink.hold_batch(False)
    for r in after:
        sink.emit_linger(r)
    sink.flush()
    return out.getvalue().splitlines()


def change_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if " CHANGE " in line and not line.startswith(" ")]


def test_a_batch_shows_the_first_changes_of_each_holder_and_counts_the_rest():
    lines = live_text(reports(interleaved(10, 5)))
    rows = change_rows(lines)
    assert len(rows) == 2 * SHOWN
    assert sum(":40" in row for row in rows) == SHOWN      # holder 42's first, by rport
    assert sum(":50" in row for row in rows) == SHOWN
    # Each shown row keeps its diagnosis line, as before.
    assert sum("stopped: 42/srv fd" in line for line in lines) == SHOWN
    assert lines[-2:] == [
        f"         +{10 - SHOWN} more alike: [T] stopped, 42/srv",
        f"         +{5 - SHOWN} more alike: [T] stopped, 43/srv"]


def test_a_holder_of_2500_sockets_stopped_is_a_few_lines_not_5000():
    lines = live_text(reports([lingerer(7, 100 + i, 10000 + i) for i in range(2500)]))
    assert len(change_rows(lines)) == SHOWN
    assert len(lines) <= 2 * SHOWN + 2          # a date line, rows, diagnoses, the count
    assert lines[-1] == f"         +{2500 - SHOWN:,} more alike: [T] stopped, 7/srv"


def test_json_keeps_a_line_per_socket():
    out = io.StringIO()
    sink = TerminalSink(True, render.TextRenderer(), stream=out)
    sink.hold_batch(True)
    for r in reports(interleaved(10, 5)):
        sink.emit_linger(r)
    sink.hold_batch(False)
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(recs) == 15 and all(r["update"] is True for r in recs)


def test_linger_rows_are_never_folded_and_end_a_run_of_changes():
    stopped = reports([lingerer(42, 10 + i, 40000 + i) for i in range(6)])
    first = reports([lingerer(44, 10 + i, 60000 + i, state="S", cause=diagnosis.UNKNOWN)
                     for i in range(6)], update=False)
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(), stream=out)
    for r in stopped + first:
        sink.emit_linger(r)
    sink.flush()
    lines = out.getvalue().splitlines()
    assert sum(" LINGER " in line for line in lines) == 6
    more = lines.index("         +3 more alike: [T] stopped, 42/srv")
    assert all(" LINGER " not in line for line in lines[:more])    # before the first LINGER


def test_a_different_state_or_cause_is_a_group_of_its_own():
    batch = ([lingerer(42, 10 + i, 40000 + i) for i in range(5)]
             + [lingerer(42, 20 + i, 41000 + i, state="S", cause=diagnosis.BLOCKED_ELSEWHERE)
                for i in range(5)])
    lines = live_text(reports(batch))
    assert len(change_rows(lines)) == 2 * SHOWN
    assert lines[-2:] == ["         +2 more alike: [T] stopped, 42/srv",
                          "         +2 more alike: [S] blocked_elsewhere, 42/srv"]


def test_each_batch_is_a_run_of_its_own():
    """Stopped, then continued: two batches, each folded on its own."""
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(), stream=out)
    for state, cause in (("T", diagnosis.STOPPED), ("S", diagnosis.BLOCKED_ELSEWHERE)):
        sink.hold_batch(True)
        for r in reports([lingerer(42, 10 + i, 40000 + i, state, cause) for i in range(8)]):
            sink.emit_linger(r)
        sink.hold_batch(False)
    lines = out.getvalue().splitlines()
    assert len(change_rows(lines)) == 2 * SHOWN
    folded = [line for line in lines if "more alike" in line]
    assert folded == ["         +5 more alike: [T] stopped, 42/srv",
                      "         +5 more alike: [S] blocked_elsewhere, 42/srv"]
    # The first batch's count comes before the second batch's rows.
    at = [i for i, line in enumerate(lines) if " CHANGE " in line and not line.startswith(" ")]
    assert at[SHOWN - 1] < lines.index(folded[0]) < at[SHOWN] < lines.index(folded[1])


def test_a_replay_of_the_records_shows_what_the_live_trace_showed():
    """The same records as dicts (what -r reads), emitted one after another
    without a batch, then the replay's own end line: the lines the live
    trace's sink wrote from the sockets."""
    batch = reports(interleaved(10, 5))
    live = live_text(batch)
    out = io.StringIO()
    renderer = render.TextRenderer()
    renderer.replay = render.ReplaySource(paths=["x"])
    sink = TerminalSink(False, renderer, stream=out)
    for r in batch:
        sink.emit(records.linger(r.lingerer, r.ts, r.age_ns, r.update))
    sink.write_line("end")
    assert out.getvalue().splitlines() == live + ["end"]
    # Every CHANGE read is counted as shown, the folded ones too: their
    # lines say them.
    assert renderer.replay.shown == {"CHANGE": 15}


def test_a_hostile_record_is_shown_whole_not_folded():
    rec = records.linger(*(lambda r: (r.lingerer, r.ts, r.age_ns, True))(
        reports([lingerer(42, 10, 40000)])[0]))
    hostile = dict(rec, owners=5)           # not a list: no key can be made
    renderer = render.TextRenderer()
    renderer.replay = render.ReplaySource(paths=["x"])
    assert renderer.change_key(hostile) is None
    out = io.StringIO()
    sink = TerminalSink(False, renderer, stream=out)
    for _ in range(SHOWN + 2):
        sink.emit(dict(hostile))
    sink.flush()
    # Handed to render() each time, as before the fold: counted unshowable
    # there, none folded away.
    assert out.getvalue() == "" and renderer.replay.unshowable == SHOWN + 2


def test_the_groups_a_run_keeps_are_bounded_and_nothing_is_left_uncounted():
    fold = changefold.ChangeFold(shown=1, max_groups=100)
    shown = folded = 0
    described = []
    for i in range(5000):
        key = changefold.group_key("fd", "stopped", "x", {"T"}, [i % 1000])
        if fold.admit(key, lambda i=i: described.append(i) or (f"{i % 1000}/x", "T", "stopped")):
            shown += 1
        else:
            folded += 1
    assert len(fold._groups) == 100
    assert described == list(range(100))        # once a group, for those kept
    lines = fold.close()
    # The 100 groups kept fold 4 of their 5 each; every other is shown whole.
    assert len(lines) == 100 and folded == 400 and shown == 4600
    assert lines[0] == "         +4 more alike: [T] stopped, 0/x"
    assert not fold.open and fold.close() == []


def test_the_folded_line_escapes_what_a_recording_holds():
    renderer = render.TextRenderer()
    rec = records.linger(*(lambda r: (r.lingerer, r.ts, r.age_ns, True))(
        reports([lingerer(42, 10, 40000, comm="e\x1b[2Jvil")])[0]))
    rec["diagnosis"]["cause"] = "x\x1b]0;pwned\x07"
    out = io.StringIO()
    sink = TerminalSink(False, renderer, stream=out)
    for _ in range(SHOWN + 1):
        sink.emit(dict(rec))
    sink.flush()
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "+1 more alike: [T] x\\x1b]0;pwned\\x07, 42/e\\x1b[2Jvil" in text


def test_a_group_is_small_whatever_its_record_holds():
    """A socket held by thousands of forks lists every one, and a record
    read from elsewhere may hold megabytes: a group keeps a 16-byte digest
    and the columns its line shows, so MAX_GROUPS of them stay small; an
    OWNER cell cut keeps its end, the " +N" that says more processes hold
    the sockets (--wide does not fit the cell)."""
    key = changefold.group_key("fd", "c" * 1_000_000, "o" * 1_000_000, {"S" * 10_000},
                               list(range(100_000)))
    assert len(key) == 16
    fold = changefold.ChangeFold(shown=0)
    fold.admit(key, lambda: ("4000000/" + "\\x1b" * 100 + " +2", "S" * 10_000, "c" * 10**6))
    [line] = fold.close()
    # Its columns at most (the sink fits it to 80, as every line).
    assert len(line) <= 9 + 30 + changefold.STATES_COLUMNS + changefold.CAUSE_COLUMNS \
        + changefold.OWNER_COLUMNS and line.endswith(" +2"), line
    # One group per holders, states, cause, kind and first command.
    k = changefold.group_key
    assert k("fd", "stopped", "a", {"S"}, [1, 2]) != k("fd", "stopped", "a", {"S"}, [12])
    assert k("fd", "stopped", "a", {"S"}, [1, 2]) != k("fd", "stopped", "a", {"S"}, [1, 3])
    assert k("fd", "stopped", "a", {"S"}, [1]) == k("fd", "stopped", "a", {"S"}, [1])
    assert k("fd", "stopped", "a", {"S"}, [1]) != k("fd", "stopped", "a", {"T"}, [1])
    assert k("fd", "stopped", "a", {"S", "T"}, [1]) != k("fd", "stopped", "a", {"ST"}, [1])
    assert k("fd", "stopped", "a", {"S"}, [1]) != k("fd", "stopped", "b", {"S"}, [1])
    assert k("fd", "stopped", "a", {"S"}, [1]) != k("fd", "leaked", "a", {"S"}, [1])
    assert k("fd", "stopped", "a", {"S"}, b"\1\0") != k("fd", "stopped", "a", {"S"}, b"\2\0")


def test_live_wide_keeps_the_count_of_other_holders_in_the_line():
    """--wide: the OWNER cell is not fitted, and a cut from its end lost the
    " +1" that says a second process holds the sockets (a review)."""
    batch = [lingerer(42, 10 + i, 40000 + i, comm="\x1b" * 15) for i in range(6)]
    for l in batch:
        h = l.ownership.holders[0]
        l.ownership.holders = (h, owners.Holder(43, "child", 7, "S", 42, 1000, "c"))
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(wide=True), stream=out)
    sink.hold_batch(True)
    for r in reports(batch):
        sink.emit_linger(r)
    sink.hold_batch(False)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("         +3 more alike: [ST] stopped, 42/") and last.endswith(" +1")


def test_a_replay_ended_by_ctrl_c_still_writes_the_runs_line(tmp_path, monkeypatch):
    """-r stopped with Ctrl-C in a run of CHANGE records: the rows shown
    and the line counting those read since (the loop left without it: a
    review found 127,680 records read and neither shown nor counted)."""
    from closewait_trace.files import recording, replay
    from closewait_trace.sockets.filters import HolderFilter, SocketFilter
    from tests.unit import recordfactory
    path = tmp_path / "cw.jsonl"
    r = recording.Recorder(path=str(path), threshold_ns=10**9,
                           filters=recordfactory.NO_FILTERS, clock_offset_ns=0)
    r.open()
    r.write(recordfactory.start())
    for rep in reports(interleaved(10, 0)):
        r.write(records.linger(rep.lingerer, rep.ts, rep.age_ns, True))
    r.close()
    real = replay.Replay.records

    def interrupted(self, *a, **kw):
        for n, rec in enumerate(real(self, *a, **kw)):
            if n == 2 + 8:              # header and start, then 8 CHANGEs
                raise KeyboardInterrupt
            yield rec
    monkeypatch.setattr(replay.Replay, "records", interrupted)
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(), stream=out)
    try:
        replay.show(str(path), SocketFilter(), HolderFilter(), None, None, sink)
    except KeyboardInterrupt:
        pass
    lines = out.getvalue().splitlines()
    assert len(change_rows(lines)) == SHOWN
    assert lines[-1] == f"         +{8 - SHOWN} more alike: [T] stopped, 42/srv"


def test_a_run_over_midnight_writes_its_line_before_the_next_days_date_line():
    """A replay's CHANGE records of one holder, 23:59:58 then 00:00:02: the
    line counting the first day's is written under its rows, before the
    date line of the next day (it came after that date line, a review)."""
    import datetime
    before = datetime.datetime(2024, 10, 3, 23, 59, 58).timestamp()
    recs = []
    for i, l in enumerate(lingerer(42, 10 + i, 40000 + i) for i in range(10)):
        recs.append(records.linger(l, before + (0 if i < 5 else 4), 5_000_000_000, True))
    out = io.StringIO()
    renderer = render.TextRenderer()
    renderer.clock.started(before - 60)
    sink = TerminalSink(False, renderer, stream=out)
    for rec in recs:
        sink.emit(rec)
    sink.flush()
    lines = out.getvalue().splitlines()
    date = lines.index("2024-10-04 Friday")
    assert lines[date - 1] == "         +2 more alike: [T] stopped, 42/srv"
    assert lines[-1] == "         +2 more alike: [T] stopped, 42/srv"
    assert len(change_rows(lines[:date])) == len(change_rows(lines[date:])) == SHOWN


def test_changes_at_odd_times_are_shown_or_folded_without_raising():
    """A record's time from elsewhere: NaN, infinities, huge, negative,
    text, missing. Each CHANGE is shown or counted, nothing raises."""
    rec = records.linger(*(lambda r: (r.lingerer, r.ts, r.age_ns, True))(
        reports([lingerer(42, 10, 40000)])[0]))
    renderer = render.TextRenderer()
    renderer.replay = render.ReplaySource(paths=["x"])
    out = io.StringIO()
    sink = TerminalSink(False, renderer, stream=out)
    odd = [float("nan"), float("inf"), float("-inf"), 1e300, -5.0, "1700000000", None, 2**70]
    for ts in odd * 4:
        sink.emit(dict(rec, ts=ts))
    sink.flush()
    assert renderer.replay.shown.get("CHANGE", 0) + renderer.replay.unshowable == len(odd) * 4
