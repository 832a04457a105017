"""How long the bounded ELF index takes on crafted files and real binaries,
and how much its cache holds against its byte cap.

    .venv/bin/python bench/symbolizer.py [N_LIBRARIES]

Prints a markdown table (docs/benchmarks.md, "Symbolizer"). No root needed.
"""

import glob
import struct
import os
import resource
import statistics
import subprocess
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


def within_limits(base, directory, functions, fdes):
    """The costliest file the limits let through: a .symtab of `functions`
    distinct function symbols, and an .eh_frame of `fdes` FDEs without an
    .eh_frame_hdr (so the index walks them all)."""
    data = bytearray(open(base, "rb").read())
    symtab = next(s for s in hostile_elf.sections(data) if s["type"] == hostile_elf.SHT_SYMTAB)
    strtab = hostile_elf.sections(data)[symtab["link"]]
    names = bytearray(b"\0")
    syms = bytearray(bytes(24))
    for i in range(functions):
        syms += struct.pack("<IBBHQQ", len(names), 0x12, 0, 1, 0x1000 + 16 * i, 16)
        names += b"function_%07d\0" % i
    strtab["offset"], strtab["size"] = len(data), len(names)
    data += names
    symtab["offset"], symtab["size"] = len(data), len(syms)
    data += syms
    hostile_elf.put_header(data, strtab)
    hostile_elf.put_header(data, symtab)
    cie = struct.pack("<I", 0) + b"\x01zR\x00\x01\x78\x10\x01\x1b\x0c\x07\x08\x90\x01"
    cie = struct.pack("<I", len(cie) + 2) + cie + b"\0\0"
    eh = bytearray(cie)
    for i in range(fdes):
        at = len(eh)
        eh += struct.pack("<IIiIB3x", 16, at + 4, 0x1000 + 16 * i - (at + 8), 16, 0)
    eh += bytes(4)
    section = hostile_elf.section(data, ".eh_frame")
    section["offset"], section["size"] = len(data), len(eh)
    data += eh
    hostile_elf.put_header(data, section)
    hdr = hostile_elf.section(data, ".eh_frame_hdr")
    data[hdr["offset"]] = 9
    path = os.path.join(directory, f"within_limits_{functions}_{fdes}")
    open(path, "wb").write(data)
    return path


def main():
    if sys.argv[1:2] == ["--cache"]:
        cache_figure(int(sys.argv[2]))
        return
    n_libs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    d = tempfile.mkdtemp()
    files = hostile_elf.craft_all(d)
    print("| file | median parse | result |")
    print("|---|---:|---|")
    for name, path in files.items():
        ms, (index, reason) = timed(path)
        print(f"| crafted: {name} | {ms:.1f} ms | {reason or 'indexed, bad FDEs skipped'} |")
    base = os.path.join(d, "base")
    for functions, fdes in ((240_000, 0), (0, 200_000)):
        path = within_limits(base, d, functions, fdes)
        ms, (index, reason) = timed(path, runs=1)
        code = ("import resource, sys; from closewait_trace import elfindex; "
                "elfindex.load(sys.argv[1]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)")
        rss = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                             text=True).stdout.strip()
        what = (f"{len(index.sym_names)} functions kept, ~{index.size_estimate() >> 20} MiB entry"
                if index is not None and functions else reason)
        print(f"| crafted within limits: {functions} functions, {fdes} FDEs, no .eh_frame_hdr "
              f"({os.path.getsize(path) >> 20} MiB) | {ms:.0f} ms | {what}; parse peak RSS {rss} MiB |")
    for path in ("/usr/bin/python3.11", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                 "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"):
        if os.path.exists(path):
            ms, (index, _) = timed(path)
            print(f"| {path} ({os.path.getsize(path) >> 10} KiB) | {ms:.1f} ms | "
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
