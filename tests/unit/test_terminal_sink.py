"""The terminal sink (output/terminal.py): the banner has one source, the
start record. As text it is rendered on stdout; when stdout carries JSON or
nothing (--json, -q, -w -) the live session has the sink say it on stderr,
and a replay never does (its start records are a past trace's)."""

import io

from closewait_trace.output import records, render
from closewait_trace.output.terminal import TerminalSink

FILTERS = {"lports": [8080], "rports": [], "family": None, "pids": [], "comms": ["java"],
           "cgroups": [], "containers": [], "units": []}


def start_record(threshold_ns=1_500_000_000, filters=FILTERS):
    return records.start(1_700_000_000.0, threshold_ns, filters, 0, "", "ringbuf")


def test_json_live_banner_goes_to_stderr_from_the_start_record(capsys):
    out = io.StringIO()
    sink = TerminalSink(True, render.TextRenderer(), stream=out)
    sink.banner_on_stderr = True
    sink.emit(start_record())
    err = capsys.readouterr().err
    # What the command line printed before, from its own arguments.
    assert err.splitlines() == render.banner(1_500_000_000, "local port 8080; comm java",
                                             at_terminal=False)
    assert out.getvalue().startswith('{"type": "start"')     # the record itself on stdout


def test_quiet_live_banner_goes_to_stderr_and_nothing_to_stdout(capsys):
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(), quiet=True, stream=out)
    sink.banner_on_stderr = True
    sink.emit(start_record(300_000_000, {}))
    assert capsys.readouterr().err == "Tracing TCP sockets lingering in CLOSE_WAIT >= 300ms...\n"
    assert out.getvalue() == ""


def test_text_and_replay_say_no_banner_on_stderr(capsys):
    for as_json in (False, True):       # a replay's sink: banner_on_stderr left off
        out = io.StringIO()
        TerminalSink(as_json, render.TextRenderer(), stream=out).emit(start_record())
        assert capsys.readouterr().err == ""
        assert out.getvalue()


class CountingStream(io.StringIO):
    """A stream that counts its writes (each a write(2) where stdout is
    unbuffered: PYTHONUNBUFFERED=1)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_a_holding_sink_writes_the_same_in_few_writes(monkeypatch):
    """snapshot's sink holds its lines and writes them in pieces of about
    HOLD_CHARS: the same text as line by line, 20,000 lines in 4 writes."""
    from closewait_trace.output import terminal
    monkeypatch.setattr(terminal, "HOLD_CHARS", 100_000)
    lines = [f"line {i:05} \x1b[2J" for i in range(20_000)]    # escaped on the way out
    plain, held = CountingStream(), CountingStream()
    TerminalSink(False, render.TextRenderer(), stream=plain).write_lines(lines)
    sink = TerminalSink(False, render.TextRenderer(), stream=held, hold=True)
    for i in range(0, len(lines), 7):
        sink.write_lines(lines[i:i + 7])
    assert held.getvalue() == plain.getvalue()[:len(held.getvalue())]
    sink.flush()
    assert held.getvalue() == plain.getvalue()
    assert "\x1b" not in held.getvalue()
    assert plain.writes == 20_000
    assert len(plain.getvalue()) == 20_000 * 19          # "line 00000 \\x1b[2J\n"
    assert held.writes == 4              # 3 of 100,000 characters or just over, the flush


def test_a_holding_sink_stops_quietly_when_the_reader_is_gone(monkeypatch):
    """`snapshot | head -1`: the held lines' write fails (EPIPE), output
    ends, nothing more is written, flush() raises nothing."""
    class Gone(CountingStream):
        def write(self, text):
            super().write(text)
            raise BrokenPipeError

    out = Gone()
    sink = TerminalSink(False, render.TextRenderer(), stream=out, hold=True)
    monkeypatch.setattr(sink, "_reader_gone", lambda: setattr(sink, "closed", True))
    sink.write_lines(["a", "b"])
    assert out.writes == 0
    sink.flush()
    assert sink.closed and out.writes == 1
    sink.write_lines(["c"])
    sink.flush()
    assert out.writes == 1


def test_a_batch_is_written_in_blocks_the_same_bytes_in_the_same_order(monkeypatch):
    """A live trace's batch of records (hold_batch): the lines a line-by-line
    sink writes, in as many writes as BATCH_CHARS makes, and --all's
    transitions written meanwhile come after the lines before them."""
    from closewait_trace.output import terminal
    monkeypatch.setattr(terminal, "BATCH_CHARS", 100_000)
    lines = [f"line {i:05} \x1b[2J" for i in range(20_000)]
    plain, held = CountingStream(), CountingStream()
    TerminalSink(False, render.TextRenderer(), stream=plain).write_lines(lines)
    sink = TerminalSink(False, render.TextRenderer(), stream=held)
    sink.hold_batch(True)
    for line in lines:
        sink.write_lines([line])
    sink.hold_batch(False)
    assert held.getvalue() == plain.getvalue()
    assert held.writes == 4              # three blocks of 100,000 characters, the rest
    # After the batch, line by line again.
    sink.write_lines(["after"])
    assert held.writes == 5 and held.getvalue().endswith("after\n")
    # Transitions (written whole, not through the held lines) keep their place.
    out2 = CountingStream()
    sink = TerminalSink(False, render.TextRenderer(), stream=out2)
    sink._lines = type("Lines", (), {"lines": lambda self, rows, off: "RAW\n"})()
    sink.hold_batch(True)
    sink.write_lines(["first"])
    sink.emit_transitions([object()], 0)
    sink.write_lines(["second"])
    sink.hold_batch(False)
    assert out2.getvalue() == "first\nRAW\nsecond\n"


def test_a_batch_into_a_pipe_widens_it_and_writes_the_same_bytes():
    """A live trace's batch of linger lines (100,000 of 2.3 KB at once when
    a holder stops closing) into a 64 KiB pipe blocked the loop 0.27-0.50 s
    at 100,000 sockets, waiting for its reader to be scheduled at each
    64 KiB; with the pipe widened as for --all's transitions, 0.09 s
    (docs/benchmarks.md). The bytes are the same either way."""
    import fcntl
    import os
    lines = [f'{{"type": "linger", "n": {i}}}' for i in range(300)]
    expected = io.StringIO()
    TerminalSink(True, render.TextRenderer(), stream=expected).write_lines(lines)
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < 1 << 20
        with os.fdopen(w, "w", closefd=False) as out:
            sink = TerminalSink(True, render.TextRenderer(), stream=out)
            sink.hold_batch(True)
            assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 1 << 20    # Linux's pipe-max-size
            for line in lines:
                sink.write_lines([line])
            sink.hold_batch(False)
        os.set_blocking(r, False)
        assert os.read(r, 1 << 20).decode() == expected.getvalue()
    finally:
        os.close(r)
        os.close(w)


def test_a_quiet_sink_leaves_stdout_as_it_is():
    """-q: stdout is not the sink's to widen (with -w - it carries the
    recording)."""
    import fcntl
    import os
    r, w = os.pipe()
    try:
        before = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        with os.fdopen(w, "w", closefd=False) as out:
            sink = TerminalSink(True, render.TextRenderer(), quiet=True, stream=out)
            sink.hold_batch(True)
            sink.write_lines(["x"])
            sink.hold_batch(False)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == before
    finally:
        os.close(r)
        os.close(w)


def test_a_snapshot_sink_stays_held_through_a_batch():
    out = CountingStream()
    sink = TerminalSink(False, render.TextRenderer(), stream=out, hold=True)
    sink.hold_batch(True)
    sink.write_lines(["a"])
    sink.hold_batch(False)
    assert out.getvalue() == ""          # held until its flush, as before
    sink.flush()
    assert out.getvalue() == "a\n"


def _summary_naming_long_holders() -> dict:
    from closewait_trace.output import records
    rec = records.summary(10.0, 0.0, {"cw_enter": 1, "cw_exit": 0, "events_lost": 0,
                                      "map_full": 0, "exit_untracked": 0}, [0] * 64, [], 1, 0)
    rec["still_lingering"] = [{
        "family": 2, "laddr": "192.168.100.200", "lport": 54321, "raddr": "10.200.100.123",
        "rport": 65000, "age_s": 5000.0, "age_source": "traced", "owner_kind": "fd",
        "owners": [{"pid": 123456 + i, "comm": f"a-long-command-{i}", "fd": 1234, "state": "S"}
                   for i in range(3)]}]
    return rec


def test_the_summary_on_stderr_and_at_tops_exit_fits_80_columns(capsys):
    """The service's summary (quiet: on stderr, for the journal) and top's
    at its exit were written unfitted: a still-lingering line naming three
    holders was 150 columns (the text renderer's is fitted)."""
    from closewait_trace.output import topview
    rec = _summary_naming_long_holders()
    sink = TerminalSink(False, render.TextRenderer(), quiet=True, stream=io.StringIO())
    sink.emit(rec)
    err = capsys.readouterr().err
    assert "123458/a-long-command-2" in err.replace("\n", "").replace("  ", " ") or \
        "a-long-command-2" in err
    assert max(len(line) for line in err.splitlines()) <= 80
    out = io.StringIO()
    top = topview.TopSink("process", stream=out)
    top.emit(rec)
    top.close()
    assert "a-long-command-2" in out.getvalue()
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80
