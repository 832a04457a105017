"""The kernel tests' one way to run a tracer (tests/kernel/harness.py):
whatever ends the block (an assertion, a timeout), the tracer and every
process it started are gone afterwards, and what it wrote to stderr goes
with the failure. Checked with a stand-in command (a shell and its
children), so no root and no kernel are needed."""

import signal
import subprocess
import time

import pytest

from tests.kernel.harness import Tracer, children_of, end_tree, tracer_process, wait_until

# A "tracer" that says something on stderr, starts two children (one of
# them stopped, as a traced holder can be) and waits for good.
FAMILY = ["sh", "-c", "echo 'tracer: about to fail' >&2; sleep 300 & "
          "sleep 300 & kill -STOP $!; wait"]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"     # a zombie is gone
    except FileNotFoundError:
        return True


def kids_of(proc) -> list:
    """Its two children, once both are there."""
    return wait_until(lambda: len(children_of(proc.pid)) == 2 and children_of(proc.pid),
                      timeout=30, what="the two children")


def test_a_failing_block_kills_the_tracer_and_its_children_and_says_its_stderr():
    with pytest.raises(AssertionError) as failed:
        with tracer_process([], command=FAMILY, text=True) as proc:
            kids = kids_of(proc)
            time.sleep(0.2)                       # the echo is on the pipe
            assert False, "the test failed here"
    assert proc.returncode == -signal.SIGKILL
    for pid in kids:
        wait_until(lambda: gone(pid), timeout=10, what=f"child {pid} gone")
    notes = "".join(getattr(failed.value, "__notes__", []))
    assert "tracer: about to fail" in notes, notes


def test_a_block_that_leaves_it_running_ends_it_too():
    with tracer_process([], command=FAMILY) as proc:
        kids = kids_of(proc)
    assert proc.returncode == -signal.SIGKILL
    for pid in kids:
        wait_until(lambda: gone(pid), timeout=10, what=f"child {pid} gone")
    assert proc.stdout.closed and proc.stderr.closed


def test_a_tracer_block_that_fails_ends_the_tracer():
    """`with Tracer(...)`: a tracer that never says it started fails the
    start, and is killed rather than left behind (here: a command that
    prints no start record)."""
    t = Tracer([], command=["sh", "-c", "echo 'no bcc here' >&2; exec sleep 300", "sh"],
               start_timeout=1)
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        with t:
            pass
    assert time.monotonic() - started < 60
    assert t.proc.returncode == -signal.SIGKILL
    assert "no bcc here" in "".join(getattr(failed.value, "__notes__", []))


def test_end_tree_leaves_an_ended_process_alone():
    p = subprocess.Popen(["true"])
    p.wait()
    end_tree(p)                     # no error, nothing killed
    assert p.returncode == 0
