"""Terminal injection (issue 8 §2): a forged process name, command line or
recording string with ESC, OSC 52, CR or newlines reaches every text path
escaped. Written against the interfaces that existed before the fix
(render.TextRenderer, report.build/render_text, the CLI), so each test failed
on the old code (checked with PYTHONPATH=/work/main/src)."""

import json
import re
import subprocess
import sys

from closewait_trace.files import parts, recording
from closewait_trace.output import render, report
from tests.unit import recordfactory

ESC = "\x1b"
# A clipboard write (OSC 52), a screen clear, a bare CR, and a newline that
# forges a whole LINGER line of its own.
EVIL_COMM = "x\x1b]52;c;cm0gLXJmIC8K\x07\x1b[2J\r"
EVIL_CMDLINE = "srv\n12:00:00 LINGER 1.2.3.4:1 5.6.7.8:2 9.9s 1/forged\x9b31m\u202eevil"
EVIL_SUMMARY = "stopped\n12:00:00 LINGER 1.2.3.4:1 5.6.7.8:2 9.9s 1/forged\x1b[31m"
RAW = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def assert_clean(lines):
    text = "\n".join(lines)
    for line in lines:
        assert not RAW.search(line), repr(line)
        assert "\t" not in line, repr(line)
    # Nothing forged a line of its own: a LINGER row starts with the time.
    assert not any(l.lstrip().startswith("12:00:00 LINGER") for l in text.split("\n")), text
    return text


def evil_linger(**over):
    rec = {"type": "linger", "ts": 1_800_000_000.0, "family": "ipv4", "laddr": "127.0.0.1",
           "lport": 5555, "raddr": "127.0.0.1\x1b[2J", "rport": 40000, "age_s": 2.0,
           "age_is_lower_bound": False, "pre_existing": False, "update": False,
           "owner_kind": "fd",
           "owners": [{"pid": 4242, "comm": EVIL_COMM, "fd": 3, "state": "T\x1b",
                       "cmdline": EVIL_CMDLINE}],
           "diagnosis": {"cause": "stopped\x1b[5m", "summary": EVIL_SUMMARY, "evidence": {
               "holders": [{"pid": 4242, "comm": EVIL_COMM, "fd": 3, "state": "T",
                            "ppid": 1, "cmdline": EVIL_CMDLINE, "cloexec": False}]}}}
    rec.update(over)
    return rec


def evil_process():
    return {"type": "process", "ts": 1_800_000_000.0, "pid": 4242, "comm": EVIL_COMM,
            "cmdline": EVIL_CMDLINE,
            "identity": {"user": "u\x1b]0;title\x07", "unit": "evil\n.service",
                         "container": {"runtime": "docker", "id": "\x1b[2J" * 20},
                         "pod_uid": None, "netns": 1},
            "threads": [{"tid": 4242, "state": "S", "syscall": "pause\r", "wchan": "w\x1b",
                         "stack": [{"pc": "0x1", "function": "f\x1b[2J", "offset": 1,
                                    "module": "/lib/\x1b]52;c;AAAA\x07.so", "method": "pc"}]}]}


def test_live_text_rows_escape_process_names_and_summaries():
    r = render.TextRenderer()
    lines = r.render(evil_linger())
    text = assert_clean(lines)
    assert "\\x1b]52;c;" in text                       # shown, escaped
    closed = dict(evil_linger(), type="closed", duration_s=3.0, duration_is_lower_bound=False,
                  how="close", closed_by={"pid": 4242, "comm": EVIL_COMM})
    assert_clean(r.render(closed))


def test_verbose_evidence_escapes_command_lines_and_identity():
    r = render.TextRenderer(verbose=True)
    assert r.render(evil_process()) == []
    text = assert_clean(r.render(evil_linger()))
    assert "srv\\n12:00:00 LINGER" in text and "\\u009b31m" in text and "\\u202e" in text


def test_transition_lost_and_summary_escape():
    r = render.TextRenderer()
    assert_clean(r.render({"type": "start", "ts": 1_800_000_000.0, "threshold_s": 1.0,
                           "filters": {}, "all_transitions": True}))
    assert_clean(r.render({"type": "transition", "ts": 1_800_000_000.0, "family": "ipv4",
                           "laddr": "1.2.3.4", "lport": 1, "raddr": "5.6.7.8", "rport": 2,
                           "oldstate": "ESTABLISHED\x1b[2J", "newstate": "CLOSE_WAIT",
                           "prev_state_s": 1.0, "task": {"pid": 1, "comm": EVIL_COMM}}))
    assert_clean(r.render({"type": "lost", "ts": 1.0, "counter": "x\x1b[2J\nforged",
                           "count": 1, "total": 1}))
    entry = {k: v for k, v in evil_linger().items() if k not in ("type", "ts")}
    summary = {"type": "summary", "ts": 1_800_000_010.0, "traced_s": 10.0,
               "counters": {"cw_enter": 1}, "histogram_us": [], "linger_reported": 1,
               "closed_reported": 0, "still_lingering": [entry]}
    assert_clean(r.render(summary))


def write_recording(path, records):
    header = {"type": "header", "format": recording.FORMAT, "format_version": 2,
              "tool_version": "0\x1b[2J", "hostname": "host\x1b]0;pwned\x07\nforged",
              "kernel_release": "6\x1b", "capture_id": "cap\r", "part": 0,
              "start_ts": 1_800_000_000.0, "threshold_s": 1.0, "filters": {}}
    start = {"type": "start", "ts": 1_800_000_000.0, "threshold_s": 1.0, "filters": {},
             "headers": "h\x1b[2J", "transport": "ring\rbuffer", "all_transitions": False}
    with open(path, "w") as f:
        for rec in [header, start] + records:
            f.write(json.dumps(recordfactory.complete(rec)) + "\n")


def test_report_text_escapes_everything_from_the_recording(tmp_path):
    path = tmp_path / "evil.jsonl"
    closed = dict(evil_linger(), type="closed", ts=1_800_000_005.0, duration_s=5.0,
                  duration_is_lower_bound=False, how="close",
                  closed_by={"pid": 4242, "comm": EVIL_COMM})
    write_recording(path, [evil_process(), evil_linger(), closed,
                           dict(evil_linger(), rport=40001, ts=1_800_000_006.0)])
    rep = report.build(parts.read([str(path)]))
    assert_clean(report.render_text(rep))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "closewait_trace", *args],
                          capture_output=True, text=True, timeout=60)


def test_replay_and_report_through_the_cli_escape(tmp_path):
    path = tmp_path / "evil.jsonl"
    write_recording(path, [evil_process(), evil_linger()])
    for args in (["-r", str(path)], ["-r", str(path), "-v"], ["report", str(path)]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert_clean(result.stdout.splitlines())
        assert_clean(result.stderr.splitlines())


def test_warnings_quoting_file_names_are_escaped(tmp_path):
    # A file name is shown in warnings and errors: it may hold anything.
    name = tmp_path / "cw\x1b]0;t\x07.jsonl"
    name.write_text("not a recording\n")
    result = run_cli("report", str(name))
    assert result.returncode == 7
    assert ESC not in result.stderr and "\\x1b" in result.stderr


def test_json_never_carries_nan(tmp_path):
    """A recording holding NaN/Infinity (Python's json reads them) must not
    make --json or report --json write them: they are not JSON."""
    path = tmp_path / "nan.jsonl"
    write_recording(path, [])
    with open(path, "a") as f:
        f.write('{"type": "lost", "ts": 1800000001.0, "counter": "events_lost", '
                '"count": NaN, "total": Infinity}\n')
    for args in (["-r", str(path), "--json"], ["report", "--json", str(path)]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "NaN" not in result.stdout and "Infinity" not in result.stdout, result.stdout
        for line in result.stdout.splitlines():
            json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_recorder_writes_no_nan(tmp_path):
    """Recordings are JSON too: a non-finite number becomes null there."""
    r = recording.Recorder(path=str(tmp_path / "r.jsonl"), threshold_ns=10**9, filters=recordfactory.NO_FILTERS,
                           clock_offset_ns=0, snapshot_source=None)
    r.open()
    r.write({"type": "lost", "ts": 1.0, "counter": "events_lost", "count": float("nan"),
             "total": float("inf")})
    r.close()
    text = (tmp_path / "r.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text.splitlines()[-1])["count"] is None
