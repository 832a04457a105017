"""--all's batches reach a pipe whole even when signals arrive while the
write blocks (a reader behind, Ctrl-C): CPython 3.11's buffered writer cut
data out of the middle of a large write interrupted by a handled signal,
and a reader met a line with the start of another line in it (and a JSON
reader died on it, leaving the tracer blocked on a full pipe)."""

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
