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
