"""Usage errors are one line; a reader that goes away (`| head -1`) ends
every command quietly with exit 0."""

import os
import subprocess
import sys

import pytest

from closewait_trace import errors
from closewait_trace.files import recording
from closewait_trace.output.render import TextRenderer
from closewait_trace.output.terminal import TerminalSink
from tests.unit import recordfactory


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "closewait_trace", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,needle,helper", [
    (["-4", "-6"], "exclude each other", "closewait-trace --help"),
    (["--no-such-option"], "No such option", "closewait-trace --help"),
    (["-t", "banana"], "not a duration", "closewait-trace --help"),
    (["--container", "xyz"], "not a container id", "closewait-trace --help"),
    (["--since", "13:00"], "with -r FILE", "closewait-trace --help"),
    (["report"], "Missing argument", "closewait-trace report --help"),
    # live-only options with -r were silently ignored (a replay "with -t 5s"
    # showed everything)
    (["-r", "x.jsonl", "-t", "5s"], "-t applies to a live trace", "closewait-trace --help"),
    (["-r", "x.jsonl", "-q"], "-q applies to a live trace", "closewait-trace --help"),
    (["-r", "x.jsonl", "--all"], "--all applies to a live trace", "closewait-trace --help"),
    (["report", "--top", "0", "x"], "--top", "closewait-trace report --help"),
])
def test_usage_errors_are_one_line_with_the_hint(args, needle, helper):
    result = run_cli(*args)
    assert result.returncode == errors.EXIT_USAGE
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("closewait-trace: ") and needle in line
    assert line.endswith(f"see '{helper}'")


def make_recording(path, n=3000):
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS,
                           clock_offset_ns=0)
    r.open()
    r.write(recordfactory.start())
    for i in range(n):
        r.write(recordfactory.linger(ts=1001.0 + i, rport=1000 + i, owners=[
            recordfactory.holder(pid=100 + i % 400, comm=f"srv{i % 400}")]))
    r.close()
    return path


@pytest.mark.parametrize("command", [["report", "--top", "1000"], ["report", "--json"], ["-r"],
                                     ["--json", "-r"]])
def test_closed_pipe_ends_quietly_with_exit_0(tmp_path, command):
    path = make_recording(tmp_path / "cw.jsonl")
    args = command[:-1] + [command[-1]] if command[0] == "report" else command
    cmd = " ".join([sys.executable, "-m", "closewait_trace", *args, str(path)])
    result = subprocess.run(["bash", "-c", cmd + " | head -1; echo \"rc=${PIPESTATUS[0]}\" >&2"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.count("\n") == 1
    assert result.stderr.strip() == "rc=0", result.stderr


def test_output_notices_a_closed_pipe_without_writing():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    gone = []
    out = TerminalSink(False, TextRenderer(), on_reader_gone=lambda: gone.append(1), stream=stream)
    out.tick()
    assert gone == [] and not out.closed          # a reader is there
    os.close(read_end)
    out.tick()
    assert gone == [1] and out.closed
    out.emit({"type": "lost", "counter": "events_lost", "count": 1, "total": 1})
    out.flush()                                   # nothing raised, nothing more called
    assert gone == [1]
    stream.close()


def test_quiet_output_never_looks_at_stdout():
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w")
    gone = []
    out = TerminalSink(False, TextRenderer(), quiet=True, on_reader_gone=lambda: gone.append(1),
                     stream=stream)
    out.tick()
    assert gone == []
    stream.close()


@pytest.mark.parametrize("as_json,compressed", [(False, False), (True, False), (False, True)])
def test_replay_of_a_pipe_shows_each_record_as_it_arrives(as_json, compressed):
    """`... | closewait-trace -r -` streams: what was read is shown before
    the replay waits for more input, not when 8 KiB of output have piled up
    or the pipe closes (the writer here has not finished)."""
    import select
    import time
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "closewait_trace", "-r", "-"]
                            + (["--json"] if as_json else []), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        recs = [recordfactory.header(), recordfactory.start(),
                recordfactory.linger(ts=1001.0, rport=43210)]
        data = "".join(textsafe_json(r) + "\n" for r in recs).encode()
        if compressed:          # as `-w - -z` writes it: one gzip member per batch
            import gzip
            data = gzip.compress(data, mtime=0)
        proc.stdin.write(data)
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 20
        while b"43210" not in seen and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
        assert b"43210" in seen, f"nothing shown while the pipe stays open: {seen!r}"
        assert proc.poll() is None          # still reading: the pipe is open
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0


def textsafe_json(rec):
    from closewait_trace.output import textsafe
    return textsafe.json_dumps(rec, separators=(",", ":"))
