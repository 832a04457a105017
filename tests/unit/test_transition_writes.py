"""--all's batches reach a pipe whole even when signals arrive while the
write blocks (a reader behind, Ctrl-C): CPython 3.11's buffered writer cut
data out of the middle of a large write interrupted by a handled signal,
and a reader met a line with the start of another line in it (and a JSON
reader died on it, leaving the tracer blocked on a full pipe)."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time

CHILD = r"""
import signal, sys
sys.path[:0] = [{root!r}, {src!r}]
from closewait_trace.output.terminal import TerminalSink as Output
from closewait_trace.output import render
from tests.unit.test_transition_golden import rows_of
import fcntl
import json
stops = []
signal.signal(signal.SIGINT, lambda *a: stops.append(1))
data = json.load(open({data!r}))
rows = rows_of(data) * 40                  # 4,800 rows a batch, ~1.6 MB
out = Output(True, render.TextRenderer())
for _ in range({batches}):
    out.emit_transitions(rows, data["offset_ns"])
out.flush()
signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent may still be sending
"""


def test_signals_during_blocked_writes_lose_nothing(tmp_path):
    from tests.unit import transition_golden as golden
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    batches = 12
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=root, src=os.path.join(root, "src"),
                                            data=golden.DATA, batches=batches)],
        stdout=subprocess.PIPE)
    done = threading.Event()

    def interrupt():
        while not done.wait(0.02):
            try:
                child.send_signal(signal.SIGINT)
            except ProcessLookupError:
                return
    lines = 0
    try:
        for line in child.stdout:           # a slow reader: the pipe stays full
            json.loads(line)                 # a cut line does not parse
            lines += 1
            if lines == 1:                  # the handler is in place: interrupt
                threading.Thread(target=interrupt, daemon=True).start()
            if lines % 2000 == 0:
                time.sleep(0.01)
    finally:
        done.set()
        if child.poll() is None and lines < batches * 120 * 40:
            child.kill()                    # a cut line ended the reading: do not wait on it
        child.wait()
    assert child.returncode == 0
    assert lines == batches * 120 * 40


def _golden():
    from tests.unit import transition_golden as golden
    from tests.unit.test_transition_golden import rows_of
    with open(golden.DATA) as f:
        data = json.load(f)
    return rows_of(data), data["offset_ns"]


def _written(stream, rows, offset_ns):
    from closewait_trace.output import render
    from closewait_trace.output.terminal import TerminalSink
    sink = TerminalSink(True, render.TextRenderer(), stream=stream)
    sink.emit_transitions(rows, offset_ns)
    sink.flush()


def test_all_output_into_a_pipe_gets_a_wider_pipe_and_the_same_bytes():
    """A saturating --all blocked on its stdout pipe (64 KiB, about 200 JSON
    lines) a quarter of the time, waiting for its reader to be scheduled;
    the first batch of lines widens the pipe, and what it carries is what a
    stream without a file (the golden path) gets."""
    import io
    rows, offset_ns = _golden()
    expected = io.StringIO()
    _written(expected, rows, offset_ns)
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < 1 << 20
        with os.fdopen(w, "w", closefd=False) as out:
            _written(out, rows, offset_ns)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 1 << 20     # Linux's pipe-max-size
        got = b""
        os.set_blocking(r, False)
        while chunk := _read_some(r):
            got += chunk
        assert got.decode() == expected.getvalue()
        assert got.count(b"\n") == len(rows)
    finally:
        os.close(r)
        os.close(w)


def _read_some(fd):
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_all_output_to_a_file_is_left_alone(tmp_path):
    """Not a pipe (a file here; a terminal, a socket): nothing to widen, and
    no error."""
    rows, offset_ns = _golden()
    path = tmp_path / "out"
    with open(path, "w") as out:
        _written(out, rows, offset_ns)
    assert path.read_text().count("\n") == len(rows)
