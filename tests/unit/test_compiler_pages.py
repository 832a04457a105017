"""The compiler's code pages are handed back after the compile
(probe.drop_compiler_pages): only mappings no one can have written, and
what they held reads the same afterwards."""

import ctypes
import hashlib
import mmap
import os

from closewait_trace.kernel import probe

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Rss:                 800 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0000100000-7f0000400000 r-xp 00100000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               3072 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00400000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Size:               1024 kB
Anonymous:           900 kB
7f0000500000-7f0000600000 rw-p 00500000 08:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libbcc.so.0
Anonymous:             0 kB
7f0000700000-7f0000800000 r-xs 00000000 08:01 13 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Anonymous:             0 kB
7f0000800000-7f0000900000 r-xp 00000000 08:01 13 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Anonymous:             0 kB
7f0000900000-7f0000a00000 r--p 00000000 00:00 0 [anon:libLLVM]
Anonymous:             0 kB
"""


def test_only_unwritten_private_mappings_of_the_compiler():
    assert probe.compiler_code_ranges(SMAPS) == [
        (0x7f0000000000, 0x100000),     # read-only data
        (0x7f0000100000, 0x300000),     # code
        (0x7f0000800000, 0x100000),     # libclang-cpp's code
    ]   # not: RELRO (copied pages), .data (writable), libbcc, a shared mapping, no file


def rss_kb(start: int) -> int:
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{start:x}-"):
            for field in lines[i + 1:]:
                if field.startswith("Rss:"):
                    return int(field.split()[1])
    raise AssertionError("mapping not found")


def test_pages_are_dropped_and_read_back_the_same(tmp_path):
    path = tmp_path / "libLLVM-test.so"
    data = os.urandom(8 << 20)
    path.write_bytes(data)
    with open(path, "rb") as f:
        code = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    with open(path, "r+b") as f:
        written = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        written[:4096] = b"x" * 4096      # a private copy of one page: must survive
        assert hashlib.sha256(code[:]).digest() == hashlib.sha256(data).digest()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(written))
        with open("/proc/self/maps") as f:
            starts = [int(l.split("-")[0], 16) for l in f if l.rstrip().endswith(str(path))]
        assert len(starts) == 2 and addr in starts
        (ro_start,) = [s for s in starts if s != addr]
        assert rss_kb(ro_start) >= 8000
        dropped = probe.drop_compiler_pages(names=("libLLVM-test",))
        assert dropped == 8 << 20             # the read-only mapping only
        assert rss_kb(ro_start) < 100
        assert hashlib.sha256(code[:]).digest() == hashlib.sha256(data).digest()
        assert written[:4096] == b"x" * 4096 and written[4096:8192] == data[4096:8192]
    finally:
        code.close()
        written.close()


MAPPED_ALONE = r"""
import sys
from closewait_trace.kernel import probe

BLOCK = (3 << 20) + 5000        # a size no arena or stack has

def blocks():   # anonymous mappings of the block's size (its header, a page)
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if len(fields) == 5 and BLOCK <= end - start <= BLOCK + 8192:
                out.add(fields[0])
    return out

if sys.argv[1] == "fixed":
    assert probe.fix_mmap_threshold()
big = bytearray(8 << 20)        # mapped alone by either threshold, then freed:
del big                         # glibc's own threshold moves up to 8 MiB
before = blocks()
block = bytearray(BLOCK)        # mapped alone only below the threshold
print(len(blocks() - before))
"""


def test_blocks_over_the_fixed_threshold_are_mapped_alone():
    """After the compile the tracer fixes glibc's mmap threshold: a 3 MiB
    block allocated after an 8 MiB one was freed gets a mapping of its own
    (returned whole when freed), where glibc's moving threshold would have
    put it in the heap, whose pages stay resident (issue 20, target 2)."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = [sys.executable, "-c", MAPPED_ALONE]
    fixed = subprocess.run(run + ["fixed"], env=env, capture_output=True, text=True, check=True)
    moving = subprocess.run(run + ["moving"], env=env, capture_output=True, text=True, check=True)
    assert int(fixed.stdout) == 1
    assert int(moving.stdout) == 0
