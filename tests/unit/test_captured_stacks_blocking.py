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
