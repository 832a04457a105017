"""The kernel side: compile bpf/closewait.bpf.c with bcc, attach it to
sock:inet_sock_set_state, and read what it produces.

bcc is imported here only, and late, so that every other module (and `-r`
replay, and `report`) works without bcc, root or BPF.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from closewait_trace import knobs
from closewait_trace.errors import EXIT_NO_BCC, EXIT_NO_BPF, EXIT_USAGE, UserError
from closewait_trace.kernel import btf, ringreader
from closewait_trace.kernel.events import EntryLayout, EofCapture, EventLayout, TrackedSocket
from closewait_trace.wholewrite import write_all

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEPOINT = "sock/inet_sock_set_state"
# The one tracepoint whose program makes events (and the counts that
# account for them): at the stop, the one to wait for.
EVENTS_TRACEPOINT = "sock:inet_sock_set_state"
# bcc's name for that tracepoint's program (TRACEPOINT_PROBE's function),
# and, where the kernel's BTF gives the socket's fields (KernelFeatures.state),
# the raw tracepoint's (RAW_TRACEPOINT_PROBE's).
EVENTS_PROGRAM = b"tracepoint__" + EVENTS_TRACEPOINT.replace(":", "__").encode()
EVENTS_RAW_PROGRAM = b"raw_tracepoint__" + EVENTS_TRACEPOINT.split(":")[1].encode()
# Where a socket was read to its end: the EOF read's place (a newer
# tracepoint: not in Debian 12's 6.1; in 6.18).
RECV_TRACEPOINT = "sock/sock_recv_length"
BATCH = 8192         # map entries per BPF_MAP_LOOKUP_BATCH call
# What BPF_MAP_LOOKUP_BATCH fails with where the kernel cannot do it (before
# 5.6 the command is unknown: EINVAL; a map type without it: ENOTSUPP, 524):
# the map is then read key by key from then on. Any other failure is this
# read's (a bucket lock the kernel would not wait for: EBUSY, or ETIMEDOUT
# and EDEADLK from the resilient locks of 6.15; ENOMEM): the read is tried
# again, batched, up to BATCH_READ_TRIES times in all, then made key by key
# once. Taken for good, one failure made every later read key by key: at
# 100,000 sockets 0.84-0.93 s a read instead of 0.4-0.5, and 650-700 more
# passes of Python's collector (docs/benchmarks.md).
BATCH_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524, errno.ENOSYS})
BATCH_READ_TRIES = 3
# sip() moves the ring's records to the backlog once they fill this share
# of it (1/16 of 1 MiB: 585 events); less is left for the loop's next poll.
SIP_FILL = 16
# While the loop is away from the ring, a thread sips it this often
# (ringreader.sip_in_background): a 19,000-socket burst fills the 1 MiB
# ring in about 45 ms, so a sip is at most this plus the interpreter's 5 ms
# switch interval late.
SIP_INTERVAL_S = 0.010


@dataclass
class ProbeConfig:
    threshold_ns: int
    max_tracked: int = 262_144
    lports: tuple[int, ...] = ()
    rports: tuple[int, ...] = ()
    family: Optional[int] = None        # socket.AF_INET / AF_INET6 / None
    all_transitions: bool = False
    ringbuf_pages: int = 256            # 1 MiB with 4 KiB pages
    # Where sockets in CLOSE_WAIT were read to their end (features.eof_capture
    # says whether this kernel can): sockets read to EOF and not yet
    # reported or closed, at most, and the stack bytes kept of each.
    eof_capture: bool = True
    max_eof_captures: int = 1024
    eof_stack_bytes: int = 4096
    # Each kind, per CPU per second, at most: a capture costs ~0.8 us in the
    # kernel, and a server whose clients close first reads EOF on every
    # connection (bench/hook_cost.py; docs/benchmarks.md).
    captures_per_s: int = 512
    # ...and per process, so that a busy service closing promptly cannot
    # spend the budget of the one that leaks.
    captures_per_proc_s: int = 32
    max_open_captures: int = 1024      # client sockets whose connect() is kept
    max_exec_tracked: int = 16384      # live processes whose last exec() is known
    # exec()s the loop has not yet taken (LiveTracer.register_new_pythons):
    # one tick's worth; past it they are counted (exec_new_full).
    max_exec_new: int = 1024
    max_py_procs: int = 4096           # CPython processes whose frames captures copy
    # Ring buffer, clock and map read: decided here, once per run, and
    # followed by the kernel program, the tracer's clock and any recording.
    features: "KernelFeatures" = field(default_factory=lambda: detect_features())

    def cflags(self, ringbuf: bool, boot_clock: bool) -> list[str]:
        flags = [f"-DTHRESHOLD_NS={self.threshold_ns}ULL",
                 f"-DMAX_TRACKED={self.max_tracked}",
                 f"-DRINGBUF_PAGES={self.ringbuf_pages}"]
        if ringbuf:
            flags.append("-DUSE_RINGBUF")
        if boot_clock:
            flags.append("-DUSE_BOOT_CLOCK")
        if self.family:
            flags.append(f"-DFILTER_FAMILY={int(self.family)}")
        if self.lports:
            flags.append("-DFILTER_LPORT")
        if self.rports:
            flags.append("-DFILTER_RPORT")
        if self.all_transitions:
            flags.append("-DALL_TRANSITIONS")
        if self.features.netns is not None:
            flags.extend(self.features.netns.cflags())
        if self.features.state is not None:
            flags.extend(self.features.state.cflags())
        if self.features.probe_read_kernel:
            flags.append("-DUSE_PROBE_READ_KERNEL")
        if self.captures_eof or self.captures_open:
            flags += [f"-DMAX_EOF_CAPTURES={self.max_eof_captures}",
                      f"-DMAX_OPEN_CAPTURES={self.max_open_captures}",
                      f"-DMAX_EXEC_TRACKED={self.max_exec_tracked}",
                      f"-DMAX_EXEC_NEW={self.max_exec_new}",
                      f"-DMAX_PY_PROCS={self.max_py_procs}",
                      f"-DEOF_STACK_BYTES={self.eof_stack_bytes}",
                      f"-DCAPTURES_PER_S={self.captures_per_s}",
                      f"-DCAPTURES_PER_PROC_S={self.captures_per_proc_s}"]
        if self.captures_eof:
            flags.append("-DEOF_CAPTURE")
        if self.captures_open:
            flags.append("-DOPEN_CAPTURE")
        return flags

    @property
    def captures_eof(self) -> bool:
        return self.eof_capture and self.features.eof_capture is None

    @property
    def captures_open(self) -> bool:
        return self.why_no_open_capture() is None

    def why_no_open_capture(self) -> Optional[str]:
        """Why connect()s are not captured (None: they are)."""
        if not self.eof_capture:
            return "not captured (--no-eof-stacks)"
        if self.lports:
            # At connect() the local port is not chosen yet: a local-port
            # filter cannot be applied there (and it asks about servers).
            return "not captured with -p (a client's local port is chosen after connect)"
        return self.features.stack_capture


def _tracepoint_name(name) -> str:
    """bcc's key for an attached tracepoint ("category:event"), as text."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def bpf_source() -> Path:
    """The .bpf.c file: inside the installed package, or in the checkout."""
    packaged = resources.files("closewait_trace").joinpath("bpf/closewait.bpf.c")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "bpf" / "closewait.bpf.c"


def kernel_at_least(major: int, minor: int, release: Optional[str] = None) -> bool:
    release = release or os.uname().release
    try:
        parts = release.split("-")[0].split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


# Testing knob, not a user option: force the fallbacks an older kernel takes,
# so that CI exercises them on a new one. A comma-separated list of words:
#   perfbuf / ringbuf      event transport (the ring buffer needs 5.8)
#   monotonic / boottime   kernel clock (bpf_ktime_get_boot_ns needs 5.8)
#   perkey / batch         map read (BPF_MAP_LOOKUP_BATCH needs 5.6)
#   nobtf                  no socket namespaces from BTF (as on a kernel
#                          without /sys/kernel/btf/vmlinux): match by address
#   noeof                  no EOF-read capture (as on a kernel without
#                          sock:sock_recv_length, e.g. 6.1)
#   libbpfring             the ring buffer read through libbpf's callback
#                          per event, as on other architectures than x86-64
#                          (kernel/ringreader.py), not from its mapping
# CLOSEWAIT_TRACE_FORCE=perfbuf,monotonic,perkey,perftp is what a 5.4 kernel gets.
FORCE_ENV = "CLOSEWAIT_TRACE_FORCE"
_FORCE_WORDS = {
    "perfbuf": ("ringbuf", False), "ringbuf": ("ringbuf", True),
    "monotonic": ("boot_clock", False), "boottime": ("boot_clock", True),
    "perkey": ("batch_read", False), "batch": ("batch_read", True),
    "nobtf": ("btf", False),
    # The state changes through the tracepoint's perf event, as on kernels
    # without BTF (before 5.6, sk_protocol is a bitfield: no raw reading).
    "perftp": ("raw_tracepoint", False), "rawtp": ("raw_tracepoint", True),
    "noeof": ("eof", False),
    "libbpfring": ("direct_ring", False),
}


@dataclass(frozen=True)
class KernelFeatures:
    """The kernel facilities the probe uses, decided once per run: the BPF
    program's -D flags, the user-space clock and the map read all follow it."""

    ringbuf: bool        # BPF ring buffer (5.8+), else the per-CPU perf buffer
    boot_clock: bool     # bpf_ktime_get_boot_ns (5.8+), else CLOCK_MONOTONIC
    batch_read: bool     # try BPF_MAP_LOOKUP_BATCH (5.6+), else walk key by key
    forced: tuple = ()   # words taken from CLOSEWAIT_TRACE_FORCE
    # Offsets for reading a socket's network namespace, from the kernel's
    # BTF (kernel/btf.py); None: no usable BTF, sockets are matched to their
    # namespace by address only, and a match in several is said as ambiguous.
    netns: Optional[btf.NetnsOffsets] = None
    # Offsets of the socket's fields the state-change tracepoint copies
    # (kernel/btf.py); given, the program attaches to the raw tracepoint
    # and reads them itself; None: the tracepoint's perf event.
    state: Optional[btf.StateOffsets] = None
    probe_read_kernel: bool = True   # bpf_probe_read_kernel (5.5+)
    # Why the place of an EOF read cannot be captured here; None: it can
    # (sock:sock_recv_length, bpf_task_pt_regs, an x86-64 user stack).
    eof_capture: Optional[str] = "not checked"
    # Why no stack can be captured at all (connect()s); None: it can.
    stack_capture: Optional[str] = "not checked"
    # The ring buffer read from its mapping (kernel/ringreader.py), not
    # through libbpf's callback per event.
    direct_ring: bool = False

    @property
    def transport(self) -> str:
        return "ring buffer" if self.ringbuf else "perf buffer"

    @property
    def clock(self) -> str:
        return "boottime" if self.boot_clock else "monotonic"

    def describe(self) -> str:
        text = f"{self.transport}, {self.clock} clock, " + \
               ("batched map reads" if self.batch_read else "per-key map reads") + \
               (", socket namespaces from BTF" if self.netns is not None
                else ", socket namespaces unknown (no usable BTF): matched by address") + \
               (", state changes from the raw tracepoint" if self.state is not None
                else ", state changes from the tracepoint's perf event") + \
               ", " + self.describe_eof()
        if self.forced:
            text += f" (forced by {FORCE_ENV}={','.join(self.forced)})"
        scale = knobs.time_scale()
        if scale != 1.0:
            text += f" (symbolizer budgets x{scale:g}: {knobs.TIME_SCALE_ENV})"
        reconcile = knobs.reconcile_override()
        if reconcile is not None:
            text += f" (a census every {reconcile:g}s: {knobs.RECONCILE_ENV})"
        return text

    def describe_eof(self) -> str:
        return ("EOF reads located (sock:sock_recv_length)" if self.eof_capture is None
                else f"EOF reads not located: {self.eof_capture}")


def parse_force(text: str) -> dict:
    """{feature: bool} from the CLOSEWAIT_TRACE_FORCE words."""
    chosen: dict = {}
    for word in (w.strip().lower() for w in text.split(",")):
        if not word:
            continue
        if word not in _FORCE_WORDS:
            raise UserError(f"{FORCE_ENV}: unknown word {word!r}", EXIT_USAGE,
                            f"use any of {', '.join(_FORCE_WORDS)}, or unset it")
        name, value = _FORCE_WORDS[word]
        chosen[name] = value
    return chosen


def detect_features(release: Optional[str] = None, environ=None) -> KernelFeatures:
    environ = os.environ if environ is None else environ
    text = environ.get(FORCE_ENV, "")
    forced = parse_force(text)
    at_5_8 = kernel_at_least(5, 8, release)
    netns, state = btf_offsets() if forced.get("btf", True) else (None, None)
    return KernelFeatures(
        ringbuf=forced.get("ringbuf", at_5_8),
        boot_clock=forced.get("boot_clock", at_5_8),
        batch_read=forced.get("batch_read", True),
        direct_ring=forced.get("direct_ring", ringreader.available()),
        forced=tuple(w.strip().lower() for w in text.split(",") if w.strip()),
        netns=netns,
        state=state if forced.get("raw_tracepoint", True) else None,
        probe_read_kernel=kernel_at_least(5, 5, release),
        eof_capture=("off (forced by " + FORCE_ENV + ")" if forced.get("eof") is False
                     else eof_capture_unavailable(release)),
        stack_capture=("off (forced by " + FORCE_ENV + ")" if forced.get("eof") is False
                       else stack_capture_unavailable(release)))


def stack_capture_unavailable(release: Optional[str] = None, machine: Optional[str] = None,
                              btf_path: str = "/sys/kernel/btf/vmlinux") -> Optional[str]:
    """Why the program cannot copy a task's user registers and stack here
    (None: it can): bpf_task_pt_regs (5.15) with the kernel's BTF, and an
    x86-64 stack this tool unwinds."""
    machine = machine or os.uname().machine
    if machine != "x86_64":
        return f"unwinding {machine} stacks is not supported (x86-64 only)"
    if not kernel_at_least(5, 15, release):
        return "needs Linux 5.15 or later (bpf_task_pt_regs)"
    if not os.path.exists(btf_path):
        return f"no kernel BTF ({btf_path})"
    return None


def eof_capture_unavailable(release: Optional[str] = None, machine: Optional[str] = None,
                            tracefs_dirs=TRACEFS_CANDIDATES,
                            btf_path: str = "/sys/kernel/btf/vmlinux") -> Optional[str]:
    """Why this kernel cannot locate EOF reads (None: it can). The program
    needs the sock:sock_recv_length tracepoint (not in 6.1; in 6.18), the
    user registers of the reading task (bpf_task_pt_regs, 5.15, with the
    kernel's BTF) and a user stack this tool unwinds (x86-64). Decided by
    what the kernel has, not by its version, but for bpf_task_pt_regs."""
    why = stack_capture_unavailable(release, machine, btf_path)
    if why is not None:
        return why
    for root in tracefs_dirs:
        if os.path.isdir(os.path.join(root, "events", RECV_TRACEPOINT)):
            return None
    if any(os.path.isdir(os.path.join(root, "events")) for root in tracefs_dirs):
        return "this kernel has no sock:sock_recv_length tracepoint (newer kernels have it)"
    return None     # tracefs not mounted yet: start() mounts it and checks again


@functools.lru_cache(maxsize=1)
def btf_offsets() -> tuple[Optional[btf.NetnsOffsets], Optional[btf.StateOffsets]]:
    """The running kernel's offsets, parsed once per process (about 50 ms;
    3 ms once the answers are in the cache: btf.offsets_cached)."""
    return btf.offsets_cached()


def ensure_tracefs() -> str:
    """bcc finds tracepoints through tracefs, which minimal systems may not
    have mounted; mounting it is what `mount -t tracefs` at boot would do."""
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    target = TRACEFS_CANDIDATES[0]
    libc = ctypes.CDLL(None, use_errno=True)
    if os.path.isdir(target) and libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) == 0:
        return target
    raise UserError("tracefs is not mounted and could not be mounted", EXIT_NO_BPF,
                    "run: mount -t tracefs tracefs /sys/kernel/tracing")


def check_tracepoint(tracefs: str) -> None:
    if not os.path.isdir(os.path.join(tracefs, "events", TRACEPOINT)):
        raise UserError(f"this kernel has no {TRACEPOINT.replace('/', ':')} tracepoint "
                        f"(needs Linux 4.16 or later)", EXIT_NO_BPF,
                        "run closewait-trace on a newer kernel, or use the Vagrant VM in vagrant/")


class ProgramRefused(UserError):
    """The kernel refused to load or attach the program. `kernel_error` is
    bcc's own words for it: the layers above may know a better reason to
    give (sockets/capabilities.explain_refusal: the perf events restriction),
    which the kernel layer does not decide."""

    def __init__(self, kernel_error: str, details: str):
        super().__init__(f"the kernel program did not load: {details}", EXIT_NO_BPF,
                         "run with -v for details; check that the kernel has BPF and "
                         "that you are root")
        self.kernel_error = kernel_error


_NO_BCC_HINT = ("run the README's setup (apt-get install python3-bpfcc, "
                "and a virtualenv made with --system-site-packages on /usr/bin/python3)")


def bcc_missing() -> None:
    """UserError when bcc's Python binding is not installed for this
    interpreter (without importing it: import_bcc() loads its libraries)."""
    import importlib.util
    try:
        found = importlib.util.find_spec("bcc") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError("bcc's Python binding is not importable by this interpreter",
                        EXIT_NO_BCC, _NO_BCC_HINT)


def import_bcc():
    try:
        from bcc import BPF
    except ImportError:
        raise UserError("bcc's Python binding is not importable by this interpreter",
                        EXIT_NO_BCC, _NO_BCC_HINT)
    except OSError as exc:
        # bcc loads libbcc, LLVM and clang with ctypes: a low address-space
        # limit (ulimit -v) or a broken library fails here, not at import.
        raise UserError(f"bcc's libraries could not be loaded: {exc}", EXIT_NO_BCC,
                        "check `ulimit -v` (bcc maps LLVM: allow at least 1 GiB) "
                        "and that libbpfcc is installed")
    return BPF


class _StderrToFile:
    """bcc prints clang's diagnostics on fd 2; keep them for one clear line."""

    def __enter__(self):
        self.saved = os.dup(2)
        self.tmp = tempfile.TemporaryFile()
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        self.text = self.tmp.read().decode("utf-8", "replace")
        self.tmp.close()
        return False


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    lines = [l for l in text.splitlines() if l.strip()]
    return lines[-1].strip() if lines else "no detail"


# The compiler's libraries: used to compile the program, not to run it.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
MADV_DONTNEED = 4


def compiler_code_ranges(smaps: str, names=COMPILER_LIBRARIES) -> list[tuple[int, int]]:
    """(start, length) of the mappings of these libraries that no one can
    have written: not writable, and no page of theirs copied on write
    (Anonymous: 0 kB; a RELRO segment, written at relocation then made
    read-only, has such pages and is left alone). Dropping the pages of
    these loses nothing: they are the file's, read again if ever touched."""
    out: list[tuple[int, int]] = []
    current = None
    for line in smaps.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = None
            path = head[5].strip() if len(head) > 5 else ""
            base = path.rsplit("/", 1)[-1]
            perms = head[1]
            if (path.startswith("/") and base.startswith(names) and "w" not in perms
                    and perms.endswith("p")):
                lo, _, hi = head[0].partition("-")
                current = (int(lo, 16), int(hi, 16) - int(lo, 16))
        elif current is not None and line.startswith("Anonymous:"):
            if line.split()[1] == "0":
                out.append(current)
            current = None
    return out


def drop_compiler_pages(names=COMPILER_LIBRARIES, smaps_path: str = "/proc/self/smaps") -> int:
    """Unmap the resident pages of the compiler's code and read-only data
    (about 85 MB of libLLVM and libclang-cpp after a compile, counted in
    the tracer's RSS for as long as it runs). Returns the bytes advised."""
    try:
        with open(smaps_path) as f:
            ranges = compiler_code_ranges(f.read(), names)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return 0
    done = 0
    for start, length in ranges:
        if libc.madvise(start, length, MADV_DONTNEED) == 0:
            done += length
    return done


# glibc's M_MMAP_THRESHOLD (mallopt), and the value the tracer fixes it at.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 10


def fix_mmap_threshold() -> bool:
    """Blocks of MMAP_THRESHOLD_BYTES or more are mapped on their own and
    unmapped when freed, from now on. glibc's own threshold moves up to the
    size of the largest mapped block freed (up to 32 MiB), after which a
    flood's multi-megabyte buffers (a worker's answer, a map read) came from
    the heap and their pages stayed resident among the sockets' objects:
    fixed, the peak RSS with 100,000 lingering was 175-176 MB instead of
    178-180, steady 167 instead of 177-180 (docs/benchmarks.md)."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    except (OSError, AttributeError):
        return False


def _release_compiler_memory() -> None:
    """bcc compiles in-process with LLVM and frees most of that memory
    afterwards, but glibc keeps freed heap pages; hand them back so the
    tracer's resident size is what it uses, not what clang once needed.
    The compiler's own code pages go too (drop_compiler_pages)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    drop_compiler_pages()
    fix_mmap_threshold()


CLONE_FS = 0x00000200


def _libc():
    """The C library, for unshare() and mount() with their argument types."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = (ctypes.c_int,)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p)
    return libc


def _unshare_this_thread(flags: int) -> Optional[str]:
    """unshare(flags) for the calling thread, never the main thread (what
    it changes there is the process's, for as long as it runs). None when
    done, else why not."""
    import threading
    if threading.current_thread() is threading.main_thread():
        return "not in the main thread"
    try:
        libc = _libc()
    except (OSError, AttributeError) as exc:
        return str(exc)
    if libc.unshare(flags) != 0:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    return None


def own_working_directory() -> bool:
    """Give the calling thread a working directory of its own (not the
    main thread: it is the process's), so that a chdir() in it (bcc's
    compile, into the kernel header tree) moves only it. Unprivileged;
    False where it is refused (a seccomp filter) or in the main thread."""
    return _unshare_this_thread(CLONE_FS) is None


def _wait_either(a, b, step: float = 0.05) -> bool:
    """Wait until either event is set; True if `a` is."""
    while not (a.is_set() or b.is_set()):
        a.wait(step)
    return a.is_set()


# bcc 0.26 reads all of /proc/kallsyms at every compile (about 120,000
# symbols into a hash table, then freed: 0.09 s here, a quarter of the
# compile) for one answer: whether the kernel has bpf_probe_read_kernel
# (BFrontendAction::DoMiscWorkAround; if not, it defines that name as
# bpf_probe_read). The compile's thread can be given its own mount
# namespace in which /proc/kallsyms is a one-line file with that answer.
CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MNT_DETACH = 0x2
MS_REC = 0x4000
MS_PRIVATE = 0x40000
KALLSYMS = "/proc/kallsyms"


def kallsyms_stand_in_text(probe_read_kernel: bool) -> bytes:
    """What bcc is to find in /proc/kallsyms: bpf_probe_read_kernel if the
    kernel has it (any address but 0, which bcc skips), else nothing; the
    program chooses its own read helper (USE_PROBE_READ_KERNEL) either way."""
    return b"ffffffff81000000 T bpf_probe_read_kernel\n" if probe_read_kernel else b""


def stand_in_kallsyms(probe_read_kernel: bool) -> Optional[str]:
    """In the calling thread only (never the main thread: what it changes
    lasts as long as the thread): a mount namespace of its own, every mount
    in it private (nothing done in it reaches the system's), and over
    /proc/kallsyms a file of one line
    (kallsyms_stand_in_text). Unsharing the mount namespace also gives the
    thread a working directory of its own (CLONE_FS), so bcc's chdir() into
    the header tree no longer moves the rest of the process. Returns why it
    could not (no CAP_SYS_ADMIN, a seccomp filter, no /proc: bcc then reads
    the real file, as before), None when done."""
    why = _unshare_this_thread(CLONE_NEWNS)
    if why is not None:
        return why
    libc = _libc()
    # From here the thread is in its own namespace: a failure below leaves
    # bcc the real file, in a namespace that dies with the thread.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"private mounts: {os.strerror(ctypes.get_errno())}"
    # The file: on a tmpfs mounted for it (over /tmp, in this namespace only),
    # bound over /proc/kallsyms, then the tmpfs detached (the bind keeps
    # the file). Not a memfd: its mount is in no namespace, and the kernel
    # refuses to bind it (EINVAL).
    scratch = next((d for d in ("/tmp", "/run", "/mnt") if os.path.isdir(d)), None)
    if scratch is None:
        return "no directory to mount a tmpfs on"
    if libc.mount(b"cw-kallsyms", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  b"size=64k,mode=0700") != 0:
        return f"tmpfs: {os.strerror(ctypes.get_errno())}"
    try:
        path = os.path.join(scratch, "kallsyms")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        try:
            write_all(fd, kallsyms_stand_in_text(probe_read_kernel))
        finally:
            os.close(fd)
        if libc.mount(path.encode(), KALLSYMS.encode(), None, MS_BIND, None) != 0:
            return f"bind mount: {os.strerror(ctypes.get_errno())}"
    except OSError as exc:
        return str(exc)
    finally:
        libc.umount2(scratch.encode(), MNT_DETACH)
    return None


@dataclass
class KernelProbe:
    config: ProbeConfig
    bpf: object = None
    compile_s: float = 0.0
    map_read: str = ""                  # how the last read was made: "batched" or "per-key"
    # errno -> failed tries of a batched read, whatever the errno; the reads
    # made key by key (the summary's tracer_cost says both); whether the
    # kernel said it cannot read in batches (BATCH_UNSUPPORTED): every
    # read key by key since.
    batch_read_failures: dict = field(default_factory=dict)
    per_key_reads: int = 0
    batch_unsupported: bool = False
    _layout: object = None
    buffer_lost: int = 0      # records the perf buffer's lost callback reported
    received: int = 0         # records handed to the callback
    _ring: object = None      # ringreader.RingReader when the mapping is read directly
    _detaching: Optional[list] = None     # threads detaching the tracepoints (detach())
    _on_batch: object = None
    _loading: object = None       # the thread of load_in_background(), until start()
    _loaded: object = None        # its threading.Event: compiled and attached (or failed)
    # Why bcc read the real /proc/kallsyms in this load (stand_in_kallsyms); None: it did not.
    kallsyms_read: Optional[str] = "not loaded"
    _load_error: Optional[BaseException] = None
    # True while whoever took a copy of the quiet tracepoints keeps it
    # (hand_over_quiet); None: nobody did.
    _quiet_held: Optional[Callable[[], bool]] = None

    @property
    def features(self) -> KernelFeatures:
        return self.config.features

    @property
    def ringbuf(self) -> bool:
        return self.features.ringbuf

    @property
    def boot_clock(self) -> bool:
        return self.features.boot_clock

    @property
    def transport(self) -> str:
        return self.features.transport

    def load_in_background(self, own_cwd_only: bool = False) -> bool:
        """Compile, load and attach the program in a thread, while the
        caller does its own start-up (imports, the gathering worker):
        compiling is clang and LLVM in C, which leave the interpreter free
        (about 0.25 s of the start's 0.45 s). start() waits for it; close()
        too, and then unloads it. bcc's compile chdir()s into the kernel
        header tree until it ends: the thread first takes a working
        directory of its own (unshare(CLONE_FS)), and then that moves only
        the thread. Where it cannot (a seccomp filter), it moves the whole
        process: with own_cwd_only the load is then not started (False;
        the caller opens its relative paths and calls again without it),
        otherwise the caller must have opened every path relative to its
        directory before calling this. True: the load is under way (or
        done)."""
        if self.bpf is not None or self._loading is not None:
            return True
        import threading
        self._loaded = threading.Event()
        own_cwd = threading.Event()
        self._loading = threading.Thread(target=self._load_catching,
                                         args=(own_cwd_only, own_cwd),
                                         name="bpf-load", daemon=True)
        self._loading.start()
        if not own_cwd_only:
            return True
        _wait_either(own_cwd, self._loaded)
        if own_cwd.is_set():
            return True
        # Ended without loading (no working directory of its own).
        self._loading.join()
        self._loading = None
        return False

    def _load_catching(self, own_cwd_only: bool = False, own_cwd=None) -> None:
        try:
            isolated = own_working_directory()
            # Only in this thread (its namespace ends with it): bcc's compile
            # then skips reading all of /proc/kallsyms (0.09 s).
            self.kallsyms_read = stand_in_kallsyms(self.features.probe_read_kernel)
            if isolated and own_cwd is not None:
                own_cwd.set()
            elif own_cwd_only:
                return                      # not loaded: the caller loads later
            self._load()
        except BaseException as exc:        # raised again by start(), in the caller
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        # After start() was told: giving back the compiler's memory (10-15
        # ms) overlaps the start-up's snapshot instead of preceding it.
        _release_compiler_memory()

    def _wait_loaded(self) -> None:
        """The program compiled and attached (the error of the background
        load, if it failed); a load not started is done here."""
        loading, self._loading = self._loading, None
        if loading is None:
            if self.bpf is None and self._load_error is None:
                self._load()
                _release_compiler_memory()
        else:
            self._loaded.wait()
        err, self._load_error = self._load_error, None
        if err is not None:
            raise err

    def _load(self) -> None:
        BPF = import_bcc()
        tracefs = ensure_tracefs()
        check_tracepoint(tracefs)
        if self.config.captures_eof and not os.path.isdir(
                os.path.join(tracefs, "events", RECV_TRACEPOINT)):
            import dataclasses
            self.config.features = dataclasses.replace(
                self.features, eof_capture=eof_capture_unavailable(tracefs_dirs=(tracefs,)))
        started = time.monotonic()
        source = str(bpf_source())
        with _StderrToFile() as captured:
            try:
                self.bpf = BPF(src_file=source.encode(),
                               cflags=self.config.cflags(self.ringbuf, self.boot_clock))
            except Exception as exc:       # bcc raises bare Exception
                err = exc
            else:
                err = None
        if err is not None:
            raise ProgramRefused(str(err), _first_error(captured.text + chr(10) + str(err)))
        self.compile_s = time.monotonic() - started

    def start(self, on_event: Callable[[tuple], bool],
              on_batch: Optional[Callable[[list], bool]] = None) -> None:
        """Events reach on_event one raw row at a time (events.EventLayout)
        or, when given and the ring buffer can be read directly, on_batch a
        list of rows at a time; either returns True to end the poll."""
        self._wait_loaded()
        self._set_port_filter("cw_lports", self.config.lports)
        self._set_port_filter("cw_rports", self.config.rports)
        layout = EventLayout(self._table("cw_event_layout").Leaf)
        unpack_from = layout.unpack_from
        string_at = ctypes.string_at
        size = layout.size
        table = self._table("cw_events")
        self._on_batch = on_batch
        if self.ringbuf and on_batch is not None and self.features.direct_ring:
            # The mapping read directly, a batch at a time (no callback per
            # event); libbpf's reader elsewhere (ringreader's docstring).
            self._ring = ringreader.RingReader(table.map_fd, table.max_entries, unpack_from,
                                               record=layout.struct)
            if not self.config.all_transitions:         # as sip() says
                # The backlog's cap: every tracked socket's CLOSED event at
                # once (max_tracked records; 29 MiB at the default 262,144).
                backlog_cap = self.config.max_tracked * ((size + ringreader.HEADER + 7) & ~7)
                self._ring.sip_in_background(self._ring.size // SIP_FILL, backlog_cap,
                                             SIP_INTERVAL_S)
            return

        # The callback must not refer to the events table: bcc keeps the
        # callback in that table, and the cycle would outlive cleanup(); the
        # perf table's __del__ would then run on a closed map and print a
        # traceback at every exit.
        def deliver(_cpu, data, _size):
            # A true return from on_event ends this poll early (-1 tells
            # libbpf to stop consuming; this event is already taken), so a
            # flood can neither starve the tick nor delay Ctrl-C. The event
            # is handed over as a raw row (events.EventLayout).
            self.received += 1
            return -1 if on_event(unpack_from(string_at(data, size))) else 0

        if self.ringbuf:
            table.open_ring_buffer(deliver)
        else:
            table.open_perf_buffer(deliver, page_cnt=self.config.ringbuf_pages,
                                   lost_cb=self._perf_lost)

    def _perf_lost(self, count: int) -> None:
        # bcc calls this with a CPU's PERF_RECORD_LOST count: what that CPU's
        # buffer dropped, reported once the buffer has room again.
        self.buffer_lost += count

    def _table(self, name: str):
        # bcc takes map names as bytes; a str works but is deprecated (a
        # DeprecationWarning from every lookup).
        return self.bpf[name.encode()]

    def _set_port_filter(self, name: str, ports) -> None:
        if not ports:
            return
        table = self._table(name)
        for port in ports:
            table[table.Key(port)] = table.Leaf(1)

    def poll(self, timeout_ms: int, limit: int = 4096) -> None:
        ring = self._ring
        if ring is not None:
            ring.present()
            try:
                rows = ring.read(limit)
                if not rows and timeout_ms:
                    ring.wait(timeout_ms)
                    rows = ring.read(limit)
            finally:
                ring.away()         # what follows (the rows' lines, a tick) is other work
            if rows:
                self.received += len(rows)
                self._on_batch(rows)
            return
        if self.ringbuf:
            self.bpf.ring_buffer_poll(timeout_ms)
        else:
            self.bpf.perf_buffer_poll(timeout_ms)

    def sip(self) -> bool:
        """Keep the ring buffer from filling while the loop is busy (the
        departures' tick, a long write): once it is SIP_FILL full, its
        records move to the reader's backlog (raw, read first by the next
        polls), up to a record per socket it may track. The loop calls
        this between the steps of long work; a thread does it too while
        the loop is away from the ring (SIP_INTERVAL_S), for a step that
        does not return soon (a blocked write). True when this probe keeps
        a backlog: the default mode read from the mapping. Not with --all:
        its ring is 16 MiB, and a saturating workload would only turn the
        kernel's drops into memory and into events left unread at the
        exit."""
        ring = self._ring
        if ring is None or self.config.all_transitions:
            return False
        ring.sip_when_full()            # the policy start() gave it
        return True

    def backlog_bytes(self) -> int:
        """Bytes of events sip() took out of the ring and the loop has not
        read yet (0: none, or this probe keeps no backlog). What is still in
        the ring itself is read within the grace of a departed socket; a
        backlog may take tens of seconds. (Not the ring's fill: under a
        saturating --all it is never empty.)"""
        ring = self._ring
        return 0 if ring is None else ring.backlog_bytes

    def tracked(self) -> list[TrackedSocket]:
        """Every entry, decoded (start-up; small maps)."""
        entries, endpoints_of = self.tracked_entries()
        return [TrackedSocket(skaddr=k, enter_ns=v, endpoints=endpoints_of(k))
                for k, v in entries.items()]

    def tracked_entries(self):
        """({socket address: CLOSE_WAIT entry time}, endpoints_of(address)).

        Reads the map in fixed-size batches into buffers reused from tick to
        tick; only entry times are decoded up front, endpoints on demand (for
        sockets new to user space), so a tick costs little per socket."""
        table = self._table("cw_tracking")
        if self._layout is None:
            self._layout = EntryLayout(table.Leaf)
            self._keys = (ctypes.c_uint64 * BATCH)()
            self._values = (ctypes.c_uint8 * (BATCH * self._layout.size))()
        raw = bytearray()
        keys: list[int] = []
        batched = False
        if self.features.batch_read and not self.batch_unsupported:
            for _try in range(BATCH_READ_TRIES):
                try:
                    self._read_batches(table.map_fd, keys, raw)
                    batched = True
                    break
                except OSError as e:
                    keys, raw = [], bytearray()    # what a failed try got: not all
                    self.batch_read_failures[e.errno] = self.batch_read_failures.get(e.errno, 0) + 1
                    if e.errno in BATCH_UNSUPPORTED:
                        self.batch_unsupported = True
                        break
        self.map_read = "batched" if batched else "per-key"
        if not batched:
            self.per_key_reads += 1
            for k, v in table.items():
                keys.append(k.value)
                raw += bytes(v)
        layout = self._layout
        times = layout.enter_ns_all(raw, len(keys))
        entries: dict = {}
        index: dict = {}
        # Built a batch at a time, the ring looked at between: at 100,000
        # entries the two dicts, built whole, were most of a 155 ms stretch
        # without a look in a burst of departures (10 processes exiting on
        # 2 CPUs, the loop getting a fraction of one).
        for start in range(0, len(keys), BATCH):
            block = keys[start:start + BATCH]
            entries.update(zip(block, times[start:start + BATCH]))
            index.update(zip(block, range(start, start + len(block))))
            self.sip()
        return entries, lambda k: layout.endpoints(raw, index[k])

    def _read_batches(self, fd: int, keys: list, raw: bytearray) -> None:
        from bcc.libbcc import lib
        token = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        first = True
        size = self._layout.size
        while True:
            count.value = BATCH
            res = lib.bpf_lookup_batch(fd, None if first else ctypes.byref(token),
                                       ctypes.byref(token), self._keys, self._values,
                                       ctypes.byref(count))
            err = ctypes.get_errno()
            n = count.value
            if n:
                keys.extend(self._keys[:n])
                raw += bytes(memoryview(self._values)[:n * size])
            # 100,000 entries take 13 calls, 0.2-0.7 s under load: the ring
            # is looked at between them (a burst of departures).
            self.sip()
            if res != 0:
                if err == errno.ENOENT:
                    return
                raise OSError(err, os.strerror(err))
            first = False

    def counters(self) -> dict[str, int]:
        per_cpu = self._table("cw_counters")[0]
        fields = [name for name, _ in per_cpu[0]._fields_ if not name.startswith("_")]
        totals = {name: sum(getattr(c, name) for c in per_cpu) for name in fields}
        totals.pop("hist_sum_ns", None)       # a sum of durations, not a count
        # The same lost record can be counted twice: by the program, when
        # bpf_perf_event_output fails (it reports -ENOSPC on recent kernels),
        # and by the buffer's lost callback, later. Old kernels' output
        # helper fails silently and only the callback counts. Either count
        # alone is never too high, so the larger is the best lower bound.
        totals["events_lost"] = max(totals["events_lost"], self.buffer_lost)
        totals.pop("submitted", None)         # for unread(), not a count of sockets
        skipped = self.transitions_skipped()
        if skipped is not None:
            totals["transitions_skipped"] = skipped
        return totals

    def transitions_skipped(self) -> Optional[int]:
        """State changes the events program never saw: the kernel does not
        run a BPF program on a CPU already running it (the raw tracepoint's;
        through the tracepoint's perf event, already running any program,
        ours or anyone's): the state change came in an interrupt while it
        ran there. It counts the run it skipped, per program
        (recursion_misses in the program fd's fdinfo, Linux 5.12+). Such a
        change is lost before the program could count it; None where the
        kernel does not say."""
        funcs = getattr(self.bpf, "funcs", None) or {}
        program = funcs.get(EVENTS_RAW_PROGRAM) or funcs.get(EVENTS_PROGRAM)
        if program is None:
            return None
        try:
            with open(f"/proc/self/fdinfo/{program.fd}") as f:
                for line in f:
                    if line.startswith("recursion_misses:"):
                        return int(line.split(":", 1)[1])
        except (OSError, ValueError):
            pass
        return None

    def unread(self) -> int:
        """Events the buffer took that were never read: at exit, what the
        final drain left behind (a loss to count, not to hide)."""
        per_cpu = self._table("cw_counters")[0]
        submitted = int(sum(c.submitted for c in per_cpu))
        kernel_lost = int(sum(c.events_lost for c in per_cpu))
        # Old kernels' perf output helper returns 0 for a record it drops:
        # then the record is in `submitted` and only the lost callback knows.
        silently_lost = max(0, self.buffer_lost - kernel_lost)
        return max(0, submitted - self.received - silently_lost)

    def eof_capture_keys(self) -> list[int]:
        """The sockets the kernel holds a capture for (at most
        max_eof_captures: the map's size)."""
        if not self.config.captures_eof or self.bpf is None:
            return []
        return [k.value for k in self._table("cw_eof").keys()]

    def open_capture_keys(self) -> list[int]:
        """The sockets the kernel holds a connect() capture for (at most
        max_open_captures)."""
        if not self.config.captures_open or self.bpf is None:
            return []
        return [k.value for k in self._table("cw_open").keys()]

    def forget_entry(self, skaddr: int, enter_ns: int) -> bool:
        """Delete the socket's tracking entry if it is still the one that
        entered CLOSE_WAIT at enter_ns: the socket left unseen (the kernel
        skipped the program at its exit) and the entry would stay until the
        address is reused, filling the map. Its EOF capture goes with it.
        False when the entry is gone or is another socket's now."""
        if self.bpf is None:
            return False
        table = self._table("cw_tracking")
        key = table.Key(skaddr)
        try:
            if table[key].enter_ns != enter_ns:
                return False
            del table[key]
        except KeyError:
            return False
        self.take_eof_capture(skaddr)
        return True

    def still_tracked(self, entries: list[tuple[int, int]]) -> list[bool]:
        """For each (socket address, entry time): whether the map still has
        that entry, i.e. the socket has not left CLOSE_WAIT (its exit
        deletes it before the kernel stores the new state). One lookup
        each: only for what the events waiting cannot tell yet."""
        if self.bpf is None:
            return [False] * len(entries)
        table = self._table("cw_tracking")
        out = []
        for skaddr, enter_ns in entries:
            try:
                out.append(table[table.Key(skaddr)].enter_ns == enter_ns)
            except KeyError:
                out.append(False)
        return out

    def take_eof_capture(self, skaddr: int) -> Optional[EofCapture]:
        """Where the socket was read to its end, if it was (and the kernel
        could say): taken out of the kernel's map, which frees its slot; the
        socket's tracking entry keeps it from being captured again."""
        if not self.config.captures_eof or self.bpf is None:
            return None
        return self._take("cw_eof", skaddr)

    def take_open_capture(self, skaddr: int) -> Optional[EofCapture]:
        """Where the socket was connect()ed, if the kernel kept it: taken
        out of its map (freeing the slot)."""
        if not self.config.captures_open or self.bpf is None:
            return None
        return self._take("cw_open", skaddr)

    def _take(self, name: str, skaddr: int) -> Optional[EofCapture]:
        table = self._table(name)
        key = table.Key(skaddr)
        try:
            leaf = table[key]
        except KeyError:
            return None
        capture = EofCapture.from_leaf(leaf)
        try:
            del table[key]
        except KeyError:
            pass            # the socket went meanwhile: the kernel deleted it
        return capture

    def register_python(self, pid: int, walk: dict) -> bool:
        """Let captures in process pid copy its Python frames: walk is
        pyframes.Runtime.kernel_walk() (the address of the interpreters'
        head and the layout's offsets). False when the kernel's map is full
        or captures are off. The kernel forgets the process when it exits
        or exec()s."""
        if self.bpf is None or not (self.config.captures_eof or self.config.captures_open):
            return False
        table = self._table("cw_py")
        # Only the kernel's fields (a walk also says whose process it is).
        # (spare: the struct's padding, named, left zero.)
        leaf = table.Leaf(**{name: walk[name] for name, _type in table.Leaf._fields_
                             if name != "spare"})
        try:
            table[table.Key(pid)] = leaf
        except Exception:               # full: E2BIG from the map update
            return False
        return True

    def unregister_python(self, pid: int) -> None:
        """Forget process pid's Python walk (gone already: nothing to do)."""
        if self.bpf is None or not (self.config.captures_eof or self.config.captures_open):
            return
        table = self._table("cw_py")
        try:
            del table[table.Key(pid)]
        except KeyError:
            pass

    def python_registered(self) -> set:
        """The pids the kernel holds a Python walk for."""
        if self.bpf is None or not (self.config.captures_eof or self.config.captures_open):
            return set()
        return {k.value for k in self._table("cw_py").keys()}

    def take_execs(self, before_ns: int) -> list[tuple[int, int]]:
        """(pid, exec time in the kernel's clock) of the processes that
        exec()ed since the last call and before before_ns, taken out of the
        kernel's map (at most max_exec_new are kept there: the kernel counts
        those it had no room for); later ones are left for the next call
        (a shell that runs `exec python3` exec()s twice within a few ms).
        One system call when there are none."""
        if self.bpf is None or not (self.config.captures_eof or self.config.captures_open):
            return []
        table = self._table("cw_exec_new")
        taken = []
        for key in list(table.keys()):
            try:
                when = int(table[key].value)
                if when < before_ns:
                    del table[key]
                    taken.append((int(key.value), when))
            except KeyError:
                continue            # only the kernel adds: never
        return taken

    def exec_since(self, pid: int, ts_ns: int) -> Optional[bool]:
        """Whether process pid exec()ed another program after ts_ns (kernel
        clock): True, False, or None when the kernel could not remember
        every exec (its map was full)."""
        if self.bpf is None or not (self.config.captures_eof or self.config.captures_open):
            return None
        table = self._table("cw_exec_ns")
        try:
            return int(table[table.Key(pid)].value) > ts_ns
        except KeyError:
            per_cpu = self._table("cw_counters")[0]
            return None if sum(c.exec_map_full for c in per_cpu) else False

    def eof_read_without_capture(self, skaddr: int) -> bool:
        """Whether the kernel saw the socket read to its end without keeping
        the place (over the rate, or the capture map full): its tracking
        entry has the EOF read's time."""
        if not self.config.captures_eof or self.bpf is None:
            return False
        table = self._table("cw_tracking")
        try:
            return bool(table[table.Key(skaddr)].eof_ns)
        except KeyError:
            return False

    def histogram(self) -> list[int]:
        table = self._table("cw_hist")
        return [int(sum(table[i])) for i in range(64)]

    def histogram_sum_ns(self) -> int:
        """Exact sum, in ns, of every CLOSE_WAIT duration the kernel timed
        (every socket counted in histogram()); for a Prometheus _sum."""
        per_cpu = self._table("cw_counters")[0]
        return int(sum(c.hist_sum_ns for c in per_cpu))

    def detach(self, events_only: bool = False) -> None:
        """Stop the kernel's events (the end of a trace): the tracepoints
        are detached, all at once, in threads, while the caller drains what
        the buffer holds; close() waits for them. Each detach waits for the
        kernel's RCU grace periods (tracepoint_synchronize_unregister):
        20-60 ms each here under load, 150 ms for the four in a row."""
        ring = self._ring
        if ring is not None:
            ring.stop_sipping()     # as the loop's sip() at the stop: drained or counted
        if self.bpf is None or self._detaching is not None:
            return
        # Marked first: a stop signal's handler may call this while the
        # main thread is in it (a second Ctrl-C); the fds are then taken
        # once, never closed twice.
        self._detaching = []
        import threading
        from bcc.libbcc import lib
        fds = getattr(self.bpf, "tracepoint_fds", None)
        if not isinstance(fds, dict):
            fds = {}
        names = [n for n in fds if not events_only or _tracepoint_name(n) == EVENTS_TRACEPOINT]
        # Closed here, not again by bcc's cleanup(): the perf events, and the
        # raw tracepoint (only the events program's, when it is one), whose
        # fd is the attachment.
        taken = [(lib.bpf_close_perf_event_fd, fds.pop(n)) for n in names]
        raw = getattr(self.bpf, "raw_tracepoint_fds", None)
        if isinstance(raw, dict):
            taken += [(os.close, raw.pop(n)) for n in list(raw)]
        for close, fd in taken:
            t = threading.Thread(target=close, args=(fd,), daemon=True)
            self._detaching.append(t)
            t.start()

    def wait_detached(self) -> None:
        """Until detach() has ended: no event can be made after this."""
        for t in self._detaching or ():
            t.join()

    def hand_over_quiet(self, adopt: Callable[[list], Optional[Callable[[], bool]]]) -> bool:
        """Give a copy of the tracepoints that make no events (EOF reads,
        exec and exit tracking) to adopt (the gathering worker's, at the
        start): at the exit, release_for_exit() closes ours at no cost while
        that holder still runs, and the holder's end (it is killed next)
        waits for their detach's grace periods, not the tracer's. adopt
        returns a check, true while the holder keeps them, or None."""
        fds = getattr(self.bpf, "tracepoint_fds", None)
        if not isinstance(fds, dict):
            return False
        quiet = [fd for name, fd in fds.items() if _tracepoint_name(name) != EVENTS_TRACEPOINT]
        held = adopt(quiet) if quiet else None
        self._quiet_held = held
        return held is not None

    def release_for_exit(self) -> None:
        """close() for a process about to end (os._exit): the tracepoints
        detached (no event after this) and the ring's mapping let go, but
        the program, its maps and bcc's compiled module are left to the
        kernel's and the process's end rather than freed one by one."""
        if self._loading is not None:
            self.close()
            return
        self.detach(events_only=self._quiet_held is not None)   # done at the stop, as a rule
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self.wait_detached()
        # The tracepoints that make no events, if detach(events_only=True)
        # left them: ours closed at no cost while the worker that took a
        # copy at the start still runs (its end detaches them); otherwise
        # closed here, in parallel.
        fds = getattr(self.bpf, "tracepoint_fds", None)
        if isinstance(fds, dict) and fds:
            rest = list(fds.values())
            fds.clear()
            held = self._quiet_held
            if held is not None and held():
                for fd in rest:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            else:
                import threading
                from bcc.libbcc import lib
                closing = [threading.Thread(target=lib.bpf_close_perf_event_fd, args=(fd,),
                                            daemon=True) for fd in rest]
                for t in closing:
                    t.start()
                for t in closing:
                    t.join()

    def close(self) -> None:
        if self._loading is not None:
            # Loading still (a start-up that failed elsewhere, or Ctrl-C):
            # clang cannot be interrupted; what it loads is unloaded below.
            self._loading.join()
            self._loading = None
            self._load_error = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self.wait_detached()
        if self.bpf is None:
            return
        if not self.ringbuf:
            # Free the per-CPU perf readers while the map is still open (bcc's
            # cleanup() only drops its reference, and the table's __del__
            # would run later, on a closed map).
            table = self._table("cw_events")
            for cpu in range(os.cpu_count() or 1):
                del table[cpu]          # no-op for a CPU without a reader
            del table
        self.bpf.cleanup()
        self.bpf = None

