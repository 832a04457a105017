"""Large writes to pipes arrive whole when the writer is interrupted
(wholewrite.py): under PYTHONUNBUFFERED=1, sys.stdout and its .buffer write
straight to the descriptor, and what a write(2) stopped and continued
while it waited on a full pipe did not take was dropped. Real pipes, real
processes, real signals; the worker's and the terminal's tests failed on
the code before, which wrote through those streams' write()."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from closewait_trace.evidence import worker
from closewait_trace.evidence.worker import GatherFailed, GatherWorker
from tests.unit.fakeproc import FakeProc


@contextlib.contextmanager
def stopped_and_continued(pid: int, every_s: float = 0.003):
    """While inside, the process pid is stopped and continued again and
    again (SIGSTOP, SIGCONT), as a debugger or py-spy attaching does."""
    done = threading.Event()

    def loop():
        while not done.is_set():
            try:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.002)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.fixture
def gatherer(monkeypatch):
    # As in many container images (and where this project is developed):
    # the worker's stdout unbuffered, whatever environment the tests run in.
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    g = GatherWorker(calls_module="tests.unit.blocking_calls")
    yield g
    g.close()


def test_answers_written_while_the_worker_is_stopped_and_continued_arrive_whole(gatherer):
    """The tracer died with "internal error: UnpicklingError" under py-spy
    at 100,000 sockets: the worker's answers lost bytes on the way."""
    assert gatherer.call("holder_states", [], "/nonexistent", deadline_s=30) == {}
    pid = gatherer._proc.pid
    # A reader behind its writer, as the loop is while it writes records:
    # the pipe stays full, and the worker's writes wait on it.
    gatherer.while_waiting = lambda: time.sleep(0.001)
    with stopped_and_continued(pid):
        for seed in range(6):
            answer = gatherer.call("bulk", 1 << 20, seed, deadline_s=20)
            assert answer == random.Random(seed).randbytes(1 << 20), seed
    assert (gatherer._proc.pid, gatherer.failures, gatherer.timeouts) == (pid, 0, 0)


@pytest.mark.parametrize("which", ["garbled", "shape", "kind", "global", "package"])
def test_a_frame_that_is_not_the_workers_fails_the_call_not_the_caller(
        tmp_path, gatherer, which):
    """Whatever made it (bytes lost, a bug): a frame that is not a pickle,
    or a pickle of another shape, or one naming a function outside this
    package, ends that worker and fails the call, as a read that could not
    be made. It was an exception out of the loop ("internal error"); of
    another shape, the call's own answer was the next call's; naming
    os.mkdir, it ran it; naming a function of this package that creates a
    file, it made a root-owned file at the path it gave."""
    marker = tmp_path / "made by a frame"
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("stray_frame", which, str(marker), deadline_s=30)
    assert failed.value.why.startswith(worker.UNREADABLE), failed.value.why
    assert gatherer.failures == 1 and not marker.exists()
    # The next call has a new worker and its own answer.
    proc = FakeProc(tmp_path / "proc")
    proc.process(200, comm="other", state="S")
    assert gatherer.call("holder_states", [200], proc.root, deadline_s=30) == {200: ("S", 0)}


WRITER = r"""
import random
from closewait_trace.output.render import TextRenderer
from closewait_trace.output.terminal import TerminalSink
rng = random.Random(3)
out = TerminalSink(True, TextRenderer())
for i in range(60):
    out.write_lines(['{"n": %d, "pad": "%s"}' % (i, "x" * rng.randint(20_000, 200_000))])
out.flush()
"""


def test_long_lines_written_while_the_tracer_is_stopped_and_continued_arrive_whole():
    """JSON lines longer than a pipe takes at once (a record with many
    holders) to an unbuffered stdout, the writer stopped and continued
    while its reader is behind: every line arrives whole."""
    rng = random.Random(3)
    wanted = [b'{"n": %d, "pad": "%s"}' % (i, b"x" * rng.randint(20_000, 200_000))
              for i in range(60)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    read = bytearray()
    give_up = time.monotonic() + 60
    with stopped_and_continued(writer.pid):
        while time.monotonic() < give_up:
            time.sleep(0.003)               # a reader behind
            chunk = writer.stdout.read1(1 << 20)
            if not chunk:
                break
            read += chunk
    if writer.poll() is None:
        writer.kill()
    assert writer.wait(timeout=60) == 0
    lines = bytes(read).split(b"\n")
    assert lines[-1] == b"" and lines[:-1] == wanted, [len(line) for line in lines[:10]]


def test_a_worker_started_in_a_directory_another_user_writes_imports_nothing_from_it(
        tmp_path, monkeypatch):
    """`python -c` puts its working directory first on sys.path: a tracer
    started in /tmp or a user's home ran that user's closewait_trace/ as
    root in its worker."""
    marker = tmp_path / "imported from the working directory"
    planted = tmp_path / "cwd" / "closewait_trace"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(planted.parent)
    g = GatherWorker(calls_module="tests.unit.blocking_calls")
    try:
        assert g.call("holder_states", [], "/nonexistent", deadline_s=30) == {}
    finally:
        g.close()
    assert not marker.exists()


def test_every_global_an_answer_may_name_is_there():
    """A class renamed or moved would make every answer that holds one
    unreadable: each name the unpickler allows resolves, where it says."""
    import importlib
    for module, name in worker.ANSWER_GLOBALS:
        found = getattr(importlib.import_module(module), name)
        assert module == "socket" or found.__module__ == module, (module, name)
