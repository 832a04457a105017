"""The memory bounds in the tests measure the work under test, not the
pytest process that runs them (CI failure: a 150 MB bound on reading a
recording failed at 163 MB in a full run, passed alone: the child's
ru_maxrss had started from pytest's own peak)."""

import pathlib
import re

from tests.unit import memprobe

BALLAST_MB = 300


def test_a_fresh_child_does_not_inherit_the_parents_peak():
    ballast = bytearray(BALLAST_MB << 20)
    for i in range(0, len(ballast), 4096):      # touched: resident in this process
        ballast[i] = 1
    # Written, not only allocated: bytes(n) is calloc'ed pages the child
    # never touches, which add nothing to its RSS (the peak was then the
    # bare interpreter's 10.0-10.2 MiB, and this test failed now and then).
    out, peak_mib, traced_mib = memprobe.run("print(len(b'x' * (10 << 20)))", traced=True)
    assert out.stdout.split() == [str(10 << 20)]
    # The child allocated 10 MiB: its figures say so, whatever this process holds.
    assert 10 <= traced_mib < 20, traced_mib
    assert 15 <= peak_mib < BALLAST_MB / 3, peak_mib
    del ballast


def test_no_test_measures_memory_with_ru_maxrss():
    """ru_maxrss of RUSAGE_SELF in a child carries the forking process's peak
    across exec, and RUSAGE_CHILDREN is the largest of all children so far:
    both depend on what ran before. Tests use memprobe (VmHWM, tracemalloc)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    found = []
    for path in root.rglob("*.py"):
        if path.name in ("memprobe.py", "test_memprobe.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.ru_maxrss\b", line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(root)}:{n}")
    assert found == [], found
