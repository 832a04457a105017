"""How long the bounded ELF index takes on crafted files and real binaries,
and how much its cache holds against its byte cap.

    .venv/bin/python bench/symbolizer.py [N_LIBRARIES]

Prints a markdown table (docs/benchmarks.md, "Symbolizer"). No root needed.
"""

import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests import hostile_elf  # noqa: E402

from closewait_trace.evidence import elfindex  # noqa: E402


def timed(path, runs=5, limits=elfindex.LIMITS):
    """Median wall and CPU milliseconds of a cold parse, and its result."""
    walls, cpus, result = [], [], None
    for _ in range(runs):
        elfindex.CACHE.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        result = elfindex.load(path, limits=limits)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return f"{statistics.median(walls) * 1000:.1f} / {statistics.median(cpus) * 1000:.1f} ms", result


def main():
    if sys.argv[1:2] == ["--cache"]:
        cache_figure(int(sys.argv[2]))
        return
    n_libs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    d = tempfile.mkdtemp()
    files = hostile_elf.craft_all(d)
    print("| file | cold parse, wall / CPU | result |")
    print("|---|---:|---|")
    for name, path in files.items():
        ms, (index, reason) = timed(path)
        print(f"| crafted: {name} | {ms} | {reason or 'indexed, bad FDEs skipped'} |")
    base = os.path.join(d, "base")
    uncut = elfindex.Limits(parse_seconds=600)
    for functions, fdes, limits in ((240_000, 0, elfindex.LIMITS), (240_000, 0, uncut),
                                    (0, 200_000, elfindex.LIMITS)):
        path = hostile_elf.within_limits(base, os.path.join(d, f"within_{functions}_{fdes}"),
                                         functions, fdes)
        ms, (index, reason) = timed(path, runs=1, limits=limits)
        # VmHWM of a fresh interpreter (ru_maxrss would carry this process's over exec).
        code = ("import sys; from closewait_trace.evidence import elfindex; "
                f"elfindex.load(sys.argv[1], limits=elfindex.Limits(parse_seconds={limits.parse_seconds})); "
                "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
                "if l.startswith('VmHWM')) >> 10)")
        rss = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                             text=True).stdout.strip()
        what = (f"{len(index.sym_names)} functions kept, ~{index.size_estimate() >> 20} MiB entry"
                if index is not None and functions else reason)
        print(f"| crafted within limits: {functions} functions, {fdes} FDEs, no .eh_frame_hdr, "
              f"{limits.parse_seconds:g} s allowed ({os.path.getsize(path) >> 20} MiB) | {ms} | "
              f"{what}; parse peak RSS {rss} MiB |")
    for path in ("/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                 "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"):
        if os.path.exists(path):
            ms, (index, _) = timed(path)
            print(f"| {path} ({os.path.getsize(path) >> 10} KiB) | {ms} | "
                  f"{len(index.sym_names)} functions ({index.symbols_from}), "
                  f"{len(index.fde_locs)} FDEs, entry ~{index.size_estimate() >> 10} KiB |")
    # The cache in a fresh interpreter, so the memory figure is its own.
    print()
    print(subprocess.run([sys.executable, __file__, "--cache", str(n_libs)], capture_output=True,
                         text=True, check=True).stdout.strip())


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1]) / 1024


def cache_figure(n_libs: int) -> None:
    """Every shared library on the machine through one cache."""
    libs = sorted(set(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")))[:n_libs]
    before = rss_mb()
    started = time.perf_counter()
    parsed = sum(elfindex.load(lib)[0] is not None for lib in libs)
    took = time.perf_counter() - started
    print(f"{len(libs)} library paths ({parsed} indexed) through one cache in {took:.1f} s: "
          f"it keeps {len(elfindex.CACHE)} entries, ~{elfindex.CACHE.bytes / 2**20:.0f} MiB "
          f"estimated (cap {elfindex.CACHE.max_bytes >> 20} MiB); process RSS "
          f"{before:.0f} -> {rss_mb():.0f} MiB")

if __name__ == "__main__":
    main()
