"""The kernel side: compile bpf/closewait.bpf.c with bcc, attach it to
sock:inet_sock_set_state, and read what it produces.

bcc is imported here only, and late, so that every other module (and `-r`
replay, and `report`) works without bcc, root or BPF.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from closewait_trace.errors import EXIT_NO_BCC, EXIT_NO_BPF, UserError
from closewait_trace.events import EntryLayout, KernelEvent, TrackedSocket, decode_event

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEPOINT = "sock/inet_sock_set_state"
BATCH = 8192         # map entries per BPF_MAP_LOOKUP_BATCH call


@dataclass
class ProbeConfig:
    threshold_ns: int
    max_tracked: int = 262_144
    lports: tuple[int, ...] = ()
    rports: tuple[int, ...] = ()
    family: Optional[int] = None        # socket.AF_INET / AF_INET6 / None
    all_transitions: bool = False
    ringbuf_pages: int = 256            # 1 MiB with 4 KiB pages

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
        return flags


def bpf_source() -> Path:
    """The .bpf.c file: inside the installed package, or in the checkout."""
    packaged = resources.files("closewait_trace").joinpath("bpf/closewait.bpf.c")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "bpf" / "closewait.bpf.c"


def kernel_at_least(major: int, minor: int, release: Optional[str] = None) -> bool:
    release = release or os.uname().release
    try:
        parts = release.split("-")[0].split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


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


def import_bcc():
    try:
        from bcc import BPF
    except ImportError:
        raise UserError("bcc's Python binding is not importable by this interpreter",
                        EXIT_NO_BCC,
                        "run the README's setup (apt-get install python3-bpfcc, "
                        "and a virtualenv made with --system-site-packages on /usr/bin/python3)")
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


def _release_compiler_memory() -> None:
    """bcc compiles in-process with LLVM and frees most of that memory
    afterwards, but glibc keeps freed heap pages; hand them back so the
    tracer's resident size is what it uses, not what clang once needed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class KernelProbe:
    config: ProbeConfig
    ringbuf: bool = field(default_factory=lambda: kernel_at_least(5, 8))
    boot_clock: bool = field(default_factory=lambda: kernel_at_least(5, 8))
    bpf: object = None
    compile_s: float = 0.0
    _layout: object = None

    @property
    def transport(self) -> str:
        return "ring buffer" if self.ringbuf else "perf buffer"

    def start(self, on_event: Callable[[KernelEvent], None]) -> None:
        BPF = import_bcc()
        check_tracepoint(ensure_tracefs())
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
            raise UserError(f"the kernel program did not load: "
                            f"{_first_error(captured.text + chr(10) + str(err))}",
                            EXIT_NO_BPF, "run with -v for details; check that the kernel "
                            "has BPF and that you are root")
        self.compile_s = time.monotonic() - started
        _release_compiler_memory()
        self._set_port_filter("cw_lports", self.config.lports)
        self._set_port_filter("cw_rports", self.config.rports)
        table = self.bpf["cw_events"]

        def deliver(_cpu, data, _size):
            # A true return from on_event ends this poll early (-1 tells
            # libbpf to stop consuming; this event is already taken), so a
            # flood can neither starve the tick nor delay Ctrl-C.
            return -1 if on_event(decode_event(table.event(data))) else 0

        if self.ringbuf:
            table.open_ring_buffer(deliver)
        else:
            table.open_perf_buffer(deliver, page_cnt=self.config.ringbuf_pages,
                                   lost_cb=self._perf_lost)
        self._perf_lost_count = 0

    def _perf_lost(self, count: int) -> None:
        self._perf_lost_count += count

    def _set_port_filter(self, name: str, ports) -> None:
        if not ports:
            return
        table = self.bpf[name]
        for port in ports:
            table[table.Key(port)] = table.Leaf(1)

    def poll(self, timeout_ms: int) -> None:
        if self.ringbuf:
            self.bpf.ring_buffer_poll(timeout_ms)
        else:
            self.bpf.perf_buffer_poll(timeout_ms)

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
        table = self.bpf["cw_tracking"]
        if self._layout is None:
            self._layout = EntryLayout(table.Leaf)
            self._keys = (ctypes.c_uint64 * BATCH)()
            self._values = (ctypes.c_uint8 * (BATCH * self._layout.size))()
        raw = bytearray()
        keys: list[int] = []
        try:
            self._read_batches(table.map_fd, keys, raw)
        except OSError:
            # BPF_MAP_LOOKUP_BATCH needs Linux 5.6: walk the map instead.
            keys, raw = [], bytearray()
            for k, v in table.items():
                keys.append(k.value)
                raw += bytes(v)
        layout = self._layout
        entries = {k: layout.enter_ns(raw, i) for i, k in enumerate(keys)}
        index = {k: i for i, k in enumerate(keys)}
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
            if res != 0:
                if err == errno.ENOENT:
                    return
                raise OSError(err, os.strerror(err))
            first = False

    def counters(self) -> dict[str, int]:
        per_cpu = self.bpf["cw_counters"][0]
        fields = [name for name, _ in per_cpu[0]._fields_ if not name.startswith("_")]
        totals = {name: sum(getattr(c, name) for c in per_cpu) for name in fields}
        totals["events_lost"] += getattr(self, "_perf_lost_count", 0)
        return totals

    def histogram(self) -> list[int]:
        table = self.bpf["cw_hist"]
        return [int(sum(table[i])) for i in range(64)]

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
