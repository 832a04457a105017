"""How long the bounded ELF index takes on crafted files and real binaries,
and how much its cache holds against its byte cap.

    .venv/bin/python bench/symbolizer.py [N_LIBRARIES]

Prints a markdown table (docs/benchmarks.md, "Symbolizer"). No root needed.
"""

import glob
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import hostile_elf  # noqa: E402

from closewait_trace import elfindex  # noqa: E402


def timed(path, runs=5):
    times, result = [], None
    for _ in range(runs):
        elfindex.CACHE.clear()
        started = time.perf_counter()
        result = elfindex.load(path)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, result


def main():
    n_libs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    d = tempfile.mkdtemp()
    files = hostile_elf.craft_all(d)
    print("| file | median parse | result |")
    print("|---|---:|---|")
    for name, path in files.items():
        ms, (index, reason) = timed(path)
        print(f"| crafted: {name} | {ms:.1f} ms | {reason or 'indexed, bad FDEs skipped'} |")
    for path in ("/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                 "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"):
        if os.path.exists(path):
            ms, (index, _) = timed(path)
            print(f"| {path} ({os.path.getsize(path) >> 10} KiB) | {ms:.1f} ms | "
                  f"{len(index.sym_names)} functions ({index.symbols_from}), "
                  f"{len(index.fde_locs)} FDEs, entry ~{index.size_estimate() >> 10} KiB |")
    # Cache: every shared library on the machine through one cache.
    elfindex.CACHE.clear()
    libs = sorted(set(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")))[:n_libs]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    parsed = 0
    for lib in libs:
        index, _ = elfindex.load(lib)
        parsed += index is not None
    took = time.perf_counter() - started
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print()
    print(f"{len(libs)} libraries ({parsed} indexed) through one cache in {took:.1f} s: "
          f"cache holds {len(elfindex.CACHE)} entries, ~{elfindex.CACHE.bytes >> 20} MiB "
          f"estimated (cap {elfindex.CACHE.max_bytes >> 20} MiB); process max RSS "
          f"{rss0 >> 10} -> {rss1 >> 10} MiB")


if __name__ == "__main__":
    main()
