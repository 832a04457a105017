"""A real unprivileged user's CPython process against the Python frame
reader (evidence/pyframes.py), read through /proc as the tracer's worker
reads it: what such a process maps may cost the reader a bounded amount of
work, never everyone else's share of a deadline."""

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from closewait_trace.evidence import elfindex, pyframes
from closewait_trace.evidence.procimage import ProcessImage

pytestmark = pytest.mark.kernel

# nobody's python3.11 (Debian's: not PIE, its binary at 0x400000) maps N
# copies of a small ELF file, each named python3.11, below its binary:
# every one comes before the real interpreter in its maps.
DECOYS = """\
import ctypes, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
base, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    fd = os.open(f"{base}/{i}/python3.11", os.O_RDONLY)
    addr = 0x10000 + i * 0x1000
    got = libc.mmap(addr, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE | 0x100000, fd, 0)
    os.close(fd)
    assert got == addr, (got, ctypes.get_errno())
print("ready", flush=True)
time.sleep(300)
"""


def test_a_process_mapping_many_interpreter_named_files_costs_a_bounded_number_of_parses(
        procs):
    """Before: each decoy's ELF file was parsed in turn (1,000 decoys: 1.2 s
    measured here, past the start-up scan's 2 s shared by every user at
    4,000), the real interpreter found after them all."""
    base = tempfile.mkdtemp(dir="/dev/shm")
    try:
        os.chmod(base, 0o755)
        n = 200
        for i in range(n):
            os.mkdir(f"{base}/{i}")
            shutil.copy("/lib/x86_64-linux-gnu/libdl.so.2", f"{base}/{i}/python3.11")
        with open(f"{base}/decoys.py", "w") as f:
            f.write(DECOYS)
        holder = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                   "--clear-groups", "/usr/bin/python3.11",
                                   f"{base}/decoys.py", base, str(n)],
                                  stdout=subprocess.PIPE, text=True)
        procs.append(holder)
        assert holder.stdout.readline().strip() == "ready"
        parsed = []
        real = elfindex.named_symbols

        def counting(path, names, deadline, *a, **kw):
            parsed.append(path)
            return real(path, names, deadline, *a, **kw)

        elfindex.named_symbols = counting
        image = ProcessImage(holder.pid, "/proc")
        try:
            runtime, why = pyframes.find_runtime(image, time.monotonic() + 60)
        finally:
            elfindex.named_symbols = real
            image.close()
        assert len(image.maps) > n
        # A program maps its python3.X and maybe a libpython: 4 is plenty.
        assert len(parsed) <= 4, len(parsed)
        assert runtime is None
        assert why == "interpreter not found among its first 4 files named like one"
    finally:
        shutil.rmtree(base, ignore_errors=True)
