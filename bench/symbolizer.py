"""How long the bounded ELF index takes on crafted files and real binaries,
and how much its cache holds against its byte cap.

    .venv/bin/python bench/symbolizer.py [N_LIBRARIES]
    .venv/bin/python bench/symbolizer.py --history [N_BINARIES [CACHE_MIB]]

Prints a markdown table (docs/benchmarks.md, "Symbolizer"). No root needed.

--history (docs/benchmarks.md, "Memory with history") compiles N distinct
small holder binaries (default 1,000; each with a different number of
functions) and sends each through the path the tracer takes for a new
holder: elfindex.load into the process-wide cache, a symbol lookup, an FDE
lookup, its decoded table and one CFI step (unwind_x86_64.cfi_step). It
prints VmRSS (after gc) at checkpoints, then what one cached module really
holds (tracemalloc) against its size_estimate().
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
    if sys.argv[1:2] == ["--history"]:
        if len(sys.argv) > 3:     # a smaller cache cap, in MiB: RSS once it evicts
            elfindex.CACHE.max_bytes = int(float(sys.argv[3]) * 2**20)
        history(int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
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

# ------------------------------------------------------------------ --history

HOLDER = r"""
#include <unistd.h>
%(functions)s
__attribute__((noinline)) void hold_socket_forever(int fd) {
    for (;;) pause();
}
int main(int argc, char **argv) {
    volatile long x = argc;
%(calls)s
    hold_socket_forever(3);
    return (int)x;
}
"""


def build_holders(d: str, n: int) -> list:
    """n distinct small binaries in d (reused if already there): binary i has
    i %% 40 + 1 extra functions and its own constants."""
    paths, jobs = [], []
    for i in range(n):
        k = i % 40 + 1
        funcs = "\n".join(
            f"__attribute__((noinline)) long f{j}_{i}(long a) {{ return a * {i + 3} + {j}; }}"
            for j in range(k))
        calls = "\n".join(f"    x += f{j}_{i}(x);" for j in range(k))
        src, out = os.path.join(d, f"h{i}.c"), os.path.join(d, f"holder{i}")
        paths.append(out)
        if not os.path.exists(out):
            with open(src, "w") as f:
                f.write(HOLDER % {"functions": funcs, "calls": calls})
            jobs.append(["gcc", "-O1", "-fomit-frame-pointer", "-o", out, src])
    running = []
    for job in jobs:
        running.append(subprocess.Popen(job))
        if len(running) >= (os.cpu_count() or 2) * 2:
            running.pop(0).wait()
    for p in running:
        p.wait()
    return paths


class _Image:
    """Just enough of procimage.ProcessImage for cfi_step: the binary mapped
    at its file offsets, and a stack of zeros."""

    def __init__(self, path):
        from closewait_trace.evidence.procimage import Mapping
        self.m = Mapping(0, 1 << 40, "r-xp", 0, 1, path)

    def mapping(self, addr):
        return self.m

    def read(self, addr, n):
        return bytes(n)


class _Session:
    def __init__(self, path, index):
        self.image, self.index = _Image(path), index

    def index_for(self, m):
        return self.index


failed: dict = __import__("collections").Counter()


def touch(path) -> None:
    """What the tracer does with a new holder binary: symbolize and take a
    CFI step at four PCs in it (a stack's frames in the holder: the blocking
    function, main, and two callees)."""
    from closewait_trace.evidence import unwind_x86_64
    index, reason = elfindex.load(path)
    if index is None:
        failed[reason] += 1
        return
    session = _Session(path, index)
    names = [n for n in ("hold_socket_forever", "main") if n in index.sym_names]
    names += [n for n in index.sym_names if n[:1] == "f" and n[1:2].isdigit()][:2]
    for name in names:
        addr = index.sym_addrs[index.sym_names.index(name)]
        assert index.symbol(addr + 1)[0] == name
        fde = index.fde_for(addr)
        assert fde is not None and fde.get_decoded().table
        offset = next(o + addr - v for v, o, z in index.loads if v <= addr < v + z)
        assert unwind_x86_64.cfi_step(session, offset, 0x7000_0000, True) is not None


def history(n: int) -> None:
    import gc
    import tracemalloc
    d = os.path.join(tempfile.gettempdir(), "closewait-trace-holders")
    os.makedirs(d, exist_ok=True)
    started = time.perf_counter()
    paths = build_holders(d, n)
    print(f"{n} holder binaries in {d} ({time.perf_counter() - started:.0f} s to build; "
          f"{min(map(os.path.getsize, paths)) >> 10}-{max(map(os.path.getsize, paths)) >> 10} KiB)")
    checkpoints = {1, 100, 200, 500, 1000, n}
    gc.collect()
    print("| holders seen | VmRSS after gc | cache entries | cache bytes (accounted) |")
    print("|---:|---:|---:|---:|")
    print(f"| 0 | {rss_mb():.1f} MiB | 0 | 0 |")
    started = time.perf_counter()
    for i, path in enumerate(paths, 1):
        touch(path)
        if i in checkpoints:
            gc.collect()
            print(f"| {i} | {rss_mb():.1f} MiB | {len(elfindex.CACHE)} | "
                  f"{elfindex.CACHE.bytes / 2**20:.1f} MiB |")
    print(f"({time.perf_counter() - started:.1f} s for {n} holders; not indexed: "
          f"{dict(failed) or 'none'})")
    # One module's real cost: traced bytes that stay after load + lookups.
    print()
    print("| holder | module: size_estimate() | decoded FDEs: accounted | held (tracemalloc) "
          "| held / accounted |")
    print("|---|---:|---:|---:|---:|")
    for path in paths[:1] + paths[39:40] + [sys.executable]:
        elfindex.CACHE.clear()
        touch(paths[-1]) if path != paths[-1] else None       # warm every code path
        elfindex.CACHE.clear()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        if path == sys.executable:
            elfindex.load(path)               # the module alone
        else:
            touch(path)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        index, _ = elfindex.load(path)
        est, fdes = index.size_estimate(), getattr(elfindex, "FDE_CACHE", None)
        fde_bytes = fdes.bytes if fdes is not None else 0
        print(f"| {os.path.basename(path)} ({os.path.getsize(path) >> 10} KiB) | "
              f"{est / 1024:.1f} KiB | {fde_bytes / 1024:.1f} KiB | {held / 1024:.1f} KiB | "
              f"{held / (est + fde_bytes):.2f} |")


if __name__ == "__main__":
    main()
