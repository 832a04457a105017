"""A capture whose process's memory blocks costs only its own place
(resolver.captured_stacks over the real gathering worker). The blocking
read here is the interpreter check of a capture's process (its Py_Version,
read through /proc/PID/mem), made to block by a fake /proc whose mem is a
FIFO nobody writes: what a holder's page turned into a never-answering
FUSE server's does (tests/kernel/test_python_registration_live.py meets
that one for real). Before, the batch's whole answer was lost at the
stall: every other process's socket lost its place too."""

import os
import shutil
import sys
import time

import pytest

from closewait_trace.evidence.resolver import ProcResolver
from closewait_trace.evidence.worker import GatherWorker

PYTHON = os.path.realpath(sys.executable)


def fake_python_process(root, pid: int, blocks: bool) -> None:
    """pid maps a copy of this interpreter (its root holds the file, its
    mountinfo says the root is on that file's device); blocks: its mem is
    a FIFO, whose open never returns."""
    base = os.path.join(root, str(pid))
    os.makedirs(os.path.join(base, "root"))
    binary = os.path.join(base, "root", "python3.11")
    shutil.copy(PYTHON, binary)
    st = os.stat(binary)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    with open(os.path.join(base, "maps"), "w") as f:
        f.write(f"00400000-0041f000 r--p 00000000 {dev} {st.st_ino}   /python3.11\n"
                f"00800000-00900000 rw-p 00000000 00:00 0 \n")
    with open(os.path.join(base, "mountinfo"), "w") as f:
        f.write(f"1 0 {os.major(st.st_dev)}:{os.minor(st.st_dev)} / / rw - ext4 /dev/x rw\n")
    if blocks:
        os.mkfifo(os.path.join(base, "mem"))
    else:
        open(os.path.join(base, "mem"), "wb").close()


@pytest.mark.skipif(not os.path.basename(PYTHON).startswith("python3.11"),
                    reason="needs CPython 3.11 (its layout)")
def test_a_capture_whose_memory_blocks_costs_only_its_own_place(tmp_path):
    root = str(tmp_path / "proc")
    fake_python_process(root, 7, blocks=True)
    fake_python_process(root, 8, blocks=False)
    resolver = ProcResolver(root, worker=GatherWorker())
    try:
        # (key, pid, ip, sp, bp, stack, (python status, pairs)): status 0,
        # not copied, makes the worker check whether the process is CPython.
        captures = [(0, 7, 0, 0, 0, b"", (0, ())), (1, 8, 0, 0, 0, b"", (0, ()))]
        started = time.monotonic()
        out = resolver.captured_stacks(captures)
        took = time.monotonic() - started
    finally:
        resolver.worker.close()
    assert 0 not in out                       # its place is not known
    assert out[1] == [] and 1 in out["python"], out
    assert took < 30, took                   # not waiting for the blocked read


class RecordingWorker:
    """A worker whose first call stalls on the capture it reads first (a
    FUSE page its user swapped in stays blocked: the abandoned worker lives
    on, tagged with that user)."""

    def __init__(self, stuck=()):
        self.stuck = set(stuck)
        self.given = []
        self.tags = []

    def stuck_tags(self):
        return set(self.stuck)

    def tag_last_abandoned(self, tag):
        self.tags.append(tag)
        self.stuck.add(tag)

    def call(self, name, captures, proc, **kw):
        from closewait_trace.evidence.worker import TIMED_OUT, GatherFailed
        self.given.append([c[0] for c in captures])
        if len(self.given) == 1:
            raise GatherFailed(TIMED_OUT, [("reading", captures[0][0])])
        return [item for c in captures for item in (("reading", c[0]), ("frames", c[0], []))]


def test_a_user_whose_read_blocked_is_not_read_again_while_it_stays_blocked():
    """The abandoned worker is tagged with the blocked capture's user; while
    it stays blocked, that user's captures are not read at all (each would
    cost another stuck worker, and at MAX_STUCK_WORKERS everyone's memory
    reads stop), the other users' are."""
    w = RecordingWorker()
    resolver = ProcResolver("/proc", worker=w)
    uids = {7: 1000, 8: 2000, 9: 1000}
    out = resolver.captured_stacks([(0, 7, 0, 0, 0, b""), (1, 8, 0, 0, 0, b"")], uids)
    assert w.tags == [1000] and w.given == [[0, 1], [1]]
    assert 0 not in out and out[1] == []
    out = resolver.captured_stacks([(2, 9, 0, 0, 0, b""), (3, 8, 0, 0, 0, b"")], uids)
    assert w.given[-1] == [3] and 2 not in out and out[3] == []
