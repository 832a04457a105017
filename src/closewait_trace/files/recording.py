"""Recordings: JSON Lines files written during tracing, read back anywhere.

Layout of one file (one "part" of a capture):
  {"type": "header", "format": "closewait-trace-recording", "format_version": 1, ...}
  {"type": "snapshot", ...}      state at the start of the part
  {"type": "start" | "linger" | "closed" | "lost" | "snapshot" | "summary", ...}

Crash safety: records are buffered for at most FLUSH_S and written with one
write(2) per batch, plain or as one complete gzip member (concatenated gzip
members are a valid gzip file), so after kill -9 the file holds every batch
written and at most the last line is cut short. Readers skip damage and count
it. Rotation by size (-C, in tcpdump's units) or by time (-G): parts FILE,
FILE.1, FILE.2, ... (tcpdump says FILE1); with a file cap (-W) the numbering
wraps and the oldest part is replaced. Every part starts with a header
carrying its part number and capture id, so a set is read in order and a
file that does not belong to it is recognized. FILE '-' is stdout / stdin.

Files may sit in shared directories (/tmp) where other users plant files at
the names of parts to come: every part is created anew, exclusively, never
through a link, never blocking on a FIFO, and an existing part is replaced
only when it is a regular file we own. Recordings are read as untrusted
input, in bounded time and memory (see the reading section below).
"""

from __future__ import annotations

import errno
import gzip
import itertools
import json
import math
import os
import re
import socket
import stat
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

from closewait_trace import __version__
from closewait_trace.output import schema, textsafe
from closewait_trace.errors import EXIT_FILE, UserError

FORMAT = "closewait-trace-recording"
# One version for the records and the files that carry them (schema.py).
FORMAT_VERSION = schema.SCHEMA_VERSION
FLUSH_S = 0.5
GZIP_MAGIC = b"\x1f\x8b"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def header(part: int, capture_id: str, clock_offset_ns: int, threshold_ns: int,
           filters: dict, mode: str) -> dict:
    return {"type": "header", "format": FORMAT, "format_version": FORMAT_VERSION,
            "tool_version": __version__, "hostname": socket.gethostname(),
            "kernel_release": os.uname().release, "boot_id": _boot_id(),
            "clock_offset_ns": clock_offset_ns, "start_ts": round(time.time(), 6),
            "threshold_s": threshold_ns / 1e9, "filters": filters, "mode": mode,
            "capture_id": capture_id, "part": part}


def part_path(base: str, part: int, max_files: Optional[int]) -> str:
    slot = part % max_files if max_files else part
    return base if slot == 0 else f"{base}.{slot}"


def _refuse_symlink(path: str) -> None:
    # Said plainly here; O_NOFOLLOW at open() closes the race.
    if os.path.islink(path):
        raise UserError(f"{path} is a symbolic link; refusing to write through it",
                        EXIT_FILE, "give the real path")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


class UnsafePart(UserError):
    """A part's name is taken by something we must not write into or remove."""

    def __init__(self, path: str, what: str):
        super().__init__(f"refusing to write {path}: {what}", EXIT_FILE,
                         "someone else may have planted it; remove it or record "
                         "to a private directory")


def _check_replaceable(path: str, dir_fd: Optional[int] = None) -> bool:
    """True if path exists and may be replaced (a regular file we own);
    False if nothing is there; UnsafePart otherwise. With dir_fd, path is
    looked up in that directory (its base name), whatever its name now
    points to."""
    name = os.path.basename(path) if dir_fd is not None else path
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}", EXIT_FILE,
                        "check the directory exists and is writable")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePart(path, f"it is {_kind(st.st_mode)}")
    if st.st_uid != os.geteuid():
        raise UnsafePart(path, f"it is a file owned by uid {st.st_uid}, not by us")
    return True


def _create_private(path: str, replace: bool, dir_fd: Optional[int] = None) -> int:
    """Create path 0600 as a new file and return a blocking, append-only fd.

    Never opened in place: an existing part is replaced only when it is a
    regular file we own (unlinked, then created anew); O_EXCL|O_NOFOLLOW make
    the creation fail, rather than follow or reuse, whatever appears at the
    name in between, and O_NONBLOCK keeps a FIFO from blocking us in open().
    """
    name = os.path.basename(path) if dir_fd is not None else path
    if replace and _check_replaceable(path, dir_fd):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise UserError(f"cannot replace {path}: {exc.strerror}", EXIT_FILE,
                            "check the directory is writable")
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK
             | os.O_CLOEXEC | os.O_APPEND | os.O_NOCTTY)
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        if not replace:
            raise UserError(f"{path} exists", EXIT_FILE, "use --force to overwrite it")
        # Something took the name between unlink and create: never reuse it.
        raise UnsafePart(path, "its name was taken by someone else while we replaced it")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; refusing to write through it",
                            EXIT_FILE, "give the real path")
        raise UserError(f"cannot write {path}: {exc.strerror}", EXIT_FILE,
                        "check the directory exists and is writable")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):         # O_EXCL made it; checked anyway
            raise UnsafePart(path, f"it is {_kind(st.st_mode)}")
        os.set_blocking(fd, True)
        os.fchmod(fd, 0o600)     # a umask can only remove bits; keep it exactly 0600
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_stdout() -> int:
    """-w -: the recording goes to standard output (a pipe to ssh, gzip, tee)."""
    try:
        return os.dup(sys.stdout.fileno())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot write the recording to standard output: {exc}", EXIT_FILE,
                        "give a file name to -w")


STDOUT = "-"          # -w - / -r -: standard output / standard input


@dataclass
class Recorder:
    """A sink for output records that writes them to a (rotating) recording.

    A part that cannot be created safely (a FIFO, symlink, directory or
    another user's file planted at its name in a shared directory) stops the
    recording, not the trace: one warning line at once, the records from then
    on are counted as write errors (as for a full disk), and `stopped` holds
    the error that the command line turns into exit code 7 at the end.
    """

    path: str
    threshold_ns: int
    filters: dict
    clock_offset_ns: int
    force: bool = False
    compress: bool = False
    max_bytes: Optional[int] = None       # -C: rotate after this many bytes
    max_files: Optional[int] = None       # -W: keep at most this many parts
    max_seconds: Optional[float] = None   # -G: rotate after this many seconds
    mode: str = "closewait"
    snapshot_source: object = None        # callable -> snapshot record
    fd: int = -1
    part: int = 0
    written: int = 0
    write_errors: int = 0
    warned: bool = False
    stopped: Optional[UserError] = None
    _buffer: list = field(default_factory=list)
    _first_buffered: float = 0.0
    _broken_line: bool = False
    _records_in_part: int = 0
    _part_started: float = 0.0
    _created: list = field(default_factory=list)    # (path, st_dev, st_ino) we made
    _dir_fd: Optional[int] = None                    # the directory the parts go in

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            fd, self._dir_fd = self._dir_fd, None
            os.close(fd)

    def open(self) -> None:
        self.capture_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        if self.path == STDOUT:
            self.fd = _open_stdout()
            self._start_part(first=True)
            return
        _refuse_symlink(self.path)
        # Every part is made in this directory as it is now, through a
        # handle: if someone renames it and puts a link to another directory
        # at its name, later parts still go where the first one went.
        directory = os.path.dirname(self.path) or "."
        try:
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UserError(f"cannot write in {directory}: {exc.strerror}", EXIT_FILE,
                            "check the directory exists and is writable")
        stale = self._existing_parts()
        for p in stale:
            _check_replaceable(p, self._dir_fd)   # another user's file: --force would not help
        if stale and not self.force:
            raise UserError(f"{stale[0]} exists", EXIT_FILE, "use --force to overwrite it")
        for p in stale:
            if p != self.path:
                try:
                    os.unlink(os.path.basename(p), dir_fd=self._dir_fd)
                except FileNotFoundError:
                    pass
        self._open_part(first=True)

    def _existing_parts(self) -> list[str]:
        return [p for p in rotated_set(self.path) if os.path.lexists(p)]

    def _open_part(self, first: bool = False) -> None:
        path = part_path(self.path, self.part, self.max_files)
        self.fd = _create_private(path, replace=self.force or not first, dir_fd=self._dir_fd)
        st = os.fstat(self.fd)
        self._created.append((path, st.st_dev, st.st_ino))
        self._start_part(first)

    def _start_part(self, first: bool) -> None:
        self.written = 0
        self._records_in_part = 0
        self._broken_line = False
        self._part_started = time.monotonic()
        # Every part opens with a header, and (after the first) with the state
        # at that moment, so each part can be read on its own.
        opening = [header(self.part, self.capture_id, self.clock_offset_ns,
                          self.threshold_ns, self.filters, self.mode)]
        if not first and self.snapshot_source is not None:
            opening.append(self.snapshot_source())
        self._write_lines([textsafe.json_dumps(r, separators=(",", ":")) + "\n" for r in opening])

    def __call__(self, rec: dict) -> None:
        self.write(rec)

    def write(self, rec: dict) -> None:
        line = textsafe.json_dumps(rec, separators=(",", ":")) + "\n"
        if len(line) > MAX_LINE_BYTES:     # ASCII (ensure_ascii): chars == bytes
            # A reader would skip it as damaged: say so now, count it.
            self._write_failed(1, f"a {rec.get('type')} record of {len(line)} bytes is "
                                  f"longer than the {MAX_LINE_BYTES} a reader accepts")
            return
        if not self._buffer:
            self._first_buffered = time.monotonic()
        self._buffer.append(line)
        if rec.get("type") in ("summary",) or time.monotonic() - self._first_buffered >= FLUSH_S:
            self.flush()

    def poll(self) -> None:
        """Called from the main loop: keeps the 'on disk within a second' promise."""
        if self._buffer and time.monotonic() - self._first_buffered >= FLUSH_S:
            self.flush()

    def _rotation_due(self) -> bool:
        if not self._records_in_part or self.path == STDOUT:
            return False
        if self.max_bytes and self.written >= self.max_bytes:
            return True
        return bool(self.max_seconds) and \
            time.monotonic() - self._part_started >= self.max_seconds

    def flush(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        # Rotate before a batch, never after a part's opening records, so a
        # part always holds some records even when -C or -G is tiny.
        if self.fd >= 0 and self._rotation_due():
            self.rotate()
        if self.fd < 0:
            self.write_errors += len(lines)     # stopped (or closed): counted
            return
        if self._write_lines(lines):
            self._records_in_part += len(lines)

    def _write_failed(self, count: int, why: str) -> None:
        # A full disk must not stop the trace: count, warn once, go on.
        self.write_errors += count
        if not self.warned:
            self.warned = True
            print(f"closewait-trace: warning: cannot write {textsafe.escape(self.path)}: "
                  f"{textsafe.escape(why)}; tracing "
                  f"goes on, unwritten records are counted in the summary",
                  file=sys.stderr, flush=True)

    def _write_lines(self, lines: list[str]) -> bool:
        text = "".join(lines)
        if self._broken_line:
            text = "\n" + text      # end the line a failed write cut short
        data = text.encode()
        if self.compress:
            data = gzip.compress(data, compresslevel=6, mtime=0)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            self._broken_line = False
        except OSError as exc:
            self._broken_line = not self.compress
            self._write_failed(len(lines), exc.strerror or str(exc))
            return False
        self.written += len(data)
        return True

    def rotate(self) -> None:
        fd, self.fd = self.fd, -1         # never closed twice, whatever happens next
        os.close(fd)
        self.part += 1
        try:
            self._open_part()
        except UserError as err:
            self._stop(err)

    def _stop(self, err: UserError) -> None:
        self.stopped = UserError(f"the recording stopped at part {self.part}: {err.message}",
                                 EXIT_FILE, err.hint)
        # The line names a file another user may have planted: it passes the
        # same last check as every other line we print.
        print(textsafe.safe_line(f"{self.stopped.one_line()}; tracing goes on, unwritten "
                                 f"records are counted in the summary"),
              file=sys.stderr, flush=True)

    def discard(self) -> None:
        """Start-up failed before anything was traced: remove what we made
        (only files we created, still the same inode)."""
        self._buffer = []
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        for path, dev, ino in self._created:
            name = os.path.basename(path) if self._dir_fd is not None else path
            try:
                st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(name, dir_fd=self._dir_fd)
            except OSError:
                pass
        self._created = []
        self._close_dir()

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        self._close_dir()


# ------------------------------------------------------------------ reading
#
# A recording may come from another host or sit in a shared directory: it is
# read as untrusted input. Only regular files (or a pipe on standard input),
# in chunks, never whole; no line held beyond MAX_LINE_BYTES; a file stops
# being read after BARREN_LINES lines or BARREN_BYTES (decompressed) bytes
# without a single usable record, so a gzip of gigabytes of newlines or one
# endless line costs a bounded amount of work; every parsed line passes one
# gate, _accept(), and a line it refuses is skipped and counted as damaged.

MAX_LINE_BYTES = 8 * 1024 * 1024     # longer lines are skipped, never held whole
READ_CHUNK = 1024 * 1024             # bytes per read(2), and per inflate step
BARREN_LINES = 100_000               # lines in a row with nothing usable: stop
BARREN_BYTES = 256 * 1024 * 1024     # bytes in a row with nothing usable: stop
MAX_PART = 2**31 - 1                 # a header's part number above this is damage
MAX_LISTED = 20                      # skipped files / missing parts named one by one
TAIL_BYTES = 256 * 1024              # end of a recording searched for its last time


@dataclass
class Recording:
    """Everything read from one or more recordings."""

    records: list[dict] = field(default_factory=list)   # in order, headers included
    files: list[str] = field(default_factory=list)
    skipped: int = 0                  # damaged or unreadable lines
    problems: list[str] = field(default_factory=list)
    missing_parts: list[tuple[str, int]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("type") == kind]


def rotated_set(path: str) -> list[str]:
    """path and its rotated siblings path.1, path.2, ... (by number)"""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    pattern = re.compile(re.escape(base) + r"\.(\d{1,18})$")
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    siblings = sorted((int(m.group(1)), os.path.join(directory, n))
                      for n in names for m in [pattern.match(n)] if m)
    return [path] + [p for _, p in siblings]


def _name(path: str) -> str:
    return "standard input" if path == STDOUT else path


def _not_regular(path: str, mode: int) -> UserError:
    if stat.S_ISDIR(mode):
        return UserError(f"{path} is a directory", EXIT_FILE, "give a recording file")
    return UserError(f"{path} is {_kind(mode)}, not a recording file", EXIT_FILE,
                     "give a regular file (to read a pipe: ... | closewait-trace -r -)")


def _open_for_reading(path: str, sibling: bool = False) -> tuple[int, os.stat_result]:
    """A regular file opened without blocking (a FIFO planted or given cannot
    hang us, a device is never opened: stat first, fstat after), or standard
    input for '-'. A rotated sibling is never read through a symlink."""
    if path == STDOUT:
        try:
            fd = os.dup(sys.stdin.fileno())
        except (OSError, ValueError):
            raise UserError("standard input is closed", EXIT_FILE,
                            "pipe a recording into it: zcat cw.jsonl.gz | closewait-trace -r -")
        st = os.fstat(fd)
        if os.isatty(fd) or stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise UserError("standard input is a terminal, not a recording", EXIT_FILE,
                            "pipe a recording into it: zcat cw.jsonl.gz | closewait-trace -r -")
        return fd, st
    try:
        st = os.lstat(path) if sibling else os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", EXIT_FILE, "check the path")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", EXIT_FILE, "check permissions")
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if sibling:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", EXIT_FILE, "check the path")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link", EXIT_FILE, "give the real path")
        raise UserError(f"cannot read {path}: {exc.strerror}", EXIT_FILE, "check permissions")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):             # swapped between stat and open
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    kind = _kernel_filesystem(fd)
    if kind:
        # /proc/kmsg, tracefs' trace_pipe and their kin call themselves
        # regular files; reading one would block, or take its messages from
        # whoever else reads them.
        os.close(fd)
        raise UserError(f"{_name(path)} is a kernel interface on {kind}, not a recording",
                        EXIT_FILE, "give a recording file")
    # Left non-blocking all the same: a file on disk reads the same either way.
    return fd, st


# statfs f_type of the kernel's pseudo filesystems (linux/magic.h).
_KERNEL_FILESYSTEMS = {0x9fa0: "procfs", 0x62656572: "sysfs", 0x74726163: "tracefs",
                       0x64626720: "debugfs", 0x73636673: "securityfs",
                       0x63677270: "cgroup2", 0x27e0eb: "cgroup", 0x62656570: "configfs",
                       0xcafe4a11: "bpffs", 0x6165676c: "pstore", 0xde5e81e4: "efivarfs",
                       0x1cd1: "devpts", 0x42494e4d: "binfmt_misc"}


def _kernel_filesystem(fd: int) -> str:
    """The pseudo filesystem fd is on ("procfs"...), or ""."""
    import ctypes
    buf = ctypes.create_string_buffer(256)          # struct statfs: 120 bytes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return ""
    return _KERNEL_FILESYSTEMS.get(ctypes.c_long.from_buffer(buf).value, "")


@dataclass
class _PartState:
    """What reading one file found besides its records."""
    raw_bytes: int = 0           # bytes read from the file
    skipped: int = 0             # damaged lines (bad JSON, refused, too long)
    damaged_gzip: bool = False   # compressed data damaged or cut short
    barren: str = ""             # why reading stopped early, if it did
    read_error: str = ""         # read(2) failed (EIO...): what came before is kept


def _read_chunks(fd: int, state: _PartState) -> Iterable[bytes]:
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            state.read_error = "it would block: a kernel interface, not a file on disk"
            return
        except OSError as exc:
            state.read_error = exc.strerror or str(exc)
            return
        if not chunk:
            return
        state.raw_bytes += len(chunk)
        yield chunk


def _decoded_chunks(fd: int, state: _PartState) -> Iterable[bytes]:
    """The file's bytes, gunzipped when it starts with gzip's magic
    (concatenated members, each inflated at most READ_CHUNK at a time)."""
    raw = _read_chunks(fd, state)
    head = b""
    for chunk in raw:
        head += chunk
        if len(head) >= len(GZIP_MAGIC):
            break
    if not head.startswith(GZIP_MAGIC):
        if head:
            yield head
            yield from raw
        return
    member = None        # the member being inflated; None between members
    between = b""        # bytes seen between members (the next magic)
    for data in itertools.chain([head], raw):
        while data:
            if member is None:
                between += data
                data = b""
                if len(between) < len(GZIP_MAGIC):
                    break
                if not between.startswith(GZIP_MAGIC):
                    state.damaged_gzip = True
                    return
                member = zlib.decompressobj(wbits=31)
                data, between = between, b""
            try:
                out = member.decompress(data, READ_CHUNK)
                while True:
                    if out:
                        yield out
                    if member.eof or not member.unconsumed_tail:
                        break
                    out = member.decompress(member.unconsumed_tail, READ_CHUNK)
            except zlib.error:
                state.damaged_gzip = True
                return
            if member.eof:
                # What follows the member is in unused_data. When the call
                # that ended it was cut by READ_CHUNK, zlib leaves the same
                # bytes in unconsumed_tail too: taking both read every later
                # member twice, then four times... (a few repeated members
                # of long lines made minutes and gigabytes).
                data, member = member.unused_data, None
            else:
                data = b""
    if between or (member is not None and not member.eof):
        state.damaged_gzip = True    # cut short (kill -9 mid-write): keep what came out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):       # 1e999 parses as inf
        raise ValueError(f"{text} is out of range")
    return value


def _accept(rec) -> Optional[str]:
    """The one gate every parsed line passes: None to keep it, else why not.
    (The per-type schema check comes after the header says which version
    the file is: RecordingReader._stream.)"""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("type"), str):
        return "no record type"
    return None


def parse_line(raw: bytes) -> Optional[dict]:
    """One line -> a record, or None if it is damaged or refused."""
    try:
        rec = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                         parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None      # ValueError covers JSONDecodeError and 5000-digit integers
    if _accept(rec) is not None:
        return None
    # Strings cut to the schema's cap (schema.MAX_TEXT, marked) before
    # anything keeps or compares them: a record costs what its shape says.
    return schema.cap(rec)


def _records_of(chunks: Iterable[bytes], state: _PartState) -> Iterable[dict]:
    """Split into lines without ever holding more than MAX_LINE_BYTES of one;
    parse each; count what is skipped; give up on long barren stretches.

    A line that spans reads is kept as a list of its pieces (slices of the
    READ_CHUNK reads) and joined once, at its end: no buffer grows by
    realloc, so what a line costs does not depend on how the allocator
    moves a growing buffer around. A line found longer than MAX_LINE_BYTES
    drops its pieces at once and the rest of it is passed over, holding
    nothing but the read in hand: skipping a line of any length holds at
    most MAX_LINE_BYTES + READ_CHUNK bytes of it."""
    pieces: list = []
    held = 0
    too_long = False
    barren_lines = barren_bytes = 0

    def judge(line: Optional[bytes]) -> Optional[dict]:
        if line is None:
            state.skipped += 1
            return None
        if not line.strip():
            return None
        rec = parse_line(line)
        if rec is None:
            state.skipped += 1
        return rec

    for chunk in chunks:
        barren_bytes += len(chunk)
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                if not too_long and start < len(chunk):
                    held += len(chunk) - start
                    if held > MAX_LINE_BYTES:
                        too_long, pieces, held = True, [], 0
                    else:
                        pieces.append(chunk[start:] if start else chunk)
                break
            if too_long:
                line, too_long = None, False
            elif pieces:
                line = None
                if held + nl - start <= MAX_LINE_BYTES:
                    pieces.append(chunk[start:nl])
                    line = b"".join(pieces)
                pieces, held = [], 0
            else:
                line = chunk[start:nl] if nl - start <= MAX_LINE_BYTES else None
            start = nl + 1
            rec = judge(line)
            if rec is not None:
                barren_lines = barren_bytes = 0
                yield rec
                continue
            barren_lines += 1
            if barren_lines > BARREN_LINES:
                state.barren = f"{barren_lines} lines in a row with nothing usable"
                return
        if barren_bytes > BARREN_BYTES:
            state.barren = f"{barren_bytes >> 20} MiB in a row with nothing usable"
            return
    if too_long:
        state.skipped += 1
    elif pieces:
        rec = judge(b"".join(pieces))     # a last line without newline (cut short?)
        if rec is not None:
            yield rec


def _header_problem(rec: Optional[dict]) -> Optional[str]:
    """Why the first record of a file cannot start a recording, or None."""
    if rec is None or rec.get("type") != "header" or rec.get("format") != FORMAT:
        return "is not a closewait-trace recording"
    version = rec.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        shown = ascii(version)[:40]
        return (f"has a damaged header: format_version is {shown}, "
                f"where a whole number is expected")
    if version > FORMAT_VERSION:
        return (f"has format version {version}; this closewait-trace "
                f"({__version__}) reads up to {FORMAT_VERSION}")
    part = rec.get("part", 0)
    if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part <= MAX_PART:
        return f"has a damaged header: part is {ascii(part)[:40]}"
    if not isinstance(rec.get("capture_id", ""), str):
        return "has a damaged header: capture_id is not a string"
    bad = schema.problem(rec)
    if bad:
        return f"has a damaged header ({bad})"
    return None


_HINTS = {"is not": "record one with: sudo closewait-trace -w FILE",
          "has format version": "upgrade closewait-trace to read it",
          "has a damaged": "nothing can be read from it without a valid header"}


@dataclass
class _Part:
    path: str
    header: dict
    ident: tuple                  # (st_dev, st_ino, st_uid) when probed
    sibling: bool
    records: Optional[Iterable[dict]] = None   # standard input: read once, kept
    state: Optional[_PartState] = None
    fd: int = -1

    @property
    def number(self) -> int:
        return self.header.get("part", 0)


def _probe(path: str, sibling: bool) -> _Part:
    """Open a file and read as far as its header; UserError if it cannot be
    a recording. Files are closed again (one open file at a time, whatever
    the number of parts), except standard input, which is kept."""
    fd, st = _open_for_reading(path, sibling)
    state = _PartState()
    records = _records_of(_decoded_chunks(fd, state), state)
    try:
        first = next(iter(records), None)
    except BaseException:
        os.close(fd)
        raise
    problem = _header_problem(first)
    if path != STDOUT or problem:
        records.close()
        os.close(fd)
    if problem:
        name = _name(path)
        if first is None and state.read_error:
            raise UserError(f"cannot read {name}: {state.read_error}", EXIT_FILE,
                            "check the file and the device it is on")
        if state.raw_bytes == 0:
            raise UserError(f"{name} is empty", EXIT_FILE,
                            "the recorder may have been stopped before writing anything")
        if first is None and state.damaged_gzip:
            raise UserError(f"{name} is a damaged compressed file with nothing readable",
                            EXIT_FILE, "nothing can be recovered from it")
        hint = next(h for k, h in _HINTS.items() if problem.startswith(k))
        raise UserError(f"{name} {problem}", EXIT_FILE, hint)
    part = _Part(path, first, (st.st_dev, st.st_ino, st.st_uid), sibling)
    if path == STDOUT:
        part.records, part.state = records, state
        part.fd = fd
    return part


class RecordingReader:
    """Streams the records of one or more recordings, in order, headers
    included: `for rec in RecordingReader(paths)`. Each path is a capture's
    first file (its rotated parts FILE.N are found and ordered by the part
    number in their headers), a single part, or '-' for standard input.

    Construction checks every file's header and raises UserError (exit 7)
    when a given file cannot be read; rotated siblings that do not belong
    are skipped and said in `problems`. `skipped`, `problems` and `files`
    are complete once the iteration has ended.
    """

    def __init__(self, paths: Iterable[str]):
        self.files: list[str] = []
        self.skipped = 0
        self.problems: list[str] = []
        self.missing_parts: list[tuple[str, int]] = []
        paths = list(paths)
        if paths.count(STDOUT) > 1:
            raise UserError("standard input ('-') can be read only once", EXIT_FILE,
                            "give '-' once")
        self._sets = [(given, self._plan(given)) for given in paths]

    def _plan(self, given: str) -> list[_Part]:
        first = _probe(given, sibling=False)
        parts = [first]
        refused = []
        if given != STDOUT:
            for path in rotated_set(given)[1:]:
                why = self._sibling_problem(path, first)
                if isinstance(why, str):
                    refused.append(f"{path}: {why}")
                else:
                    parts.append(why)
        parts.sort(key=lambda p: p.number)
        unique = []
        for p in parts:
            if unique and unique[-1].number == p.number:
                refused.append(f"{p.path}: part {p.number} again (also in {unique[-1].path})")
                continue
            unique.append(p)
        for line in refused[:MAX_LISTED]:
            self.problems.append(f"skipped {line}")
        if len(refused) > MAX_LISTED:
            self.problems.append(f"skipped {len(refused) - MAX_LISTED} more file(s) "
                                 f"beside {given} that are not parts of its capture")
        self._note_gaps(given, [p.number for p in unique])
        return unique

    @staticmethod
    def _sibling_problem(path: str, first: _Part):
        """A rotated part joins only as a regular file (no symlink) with the
        same owner as the given file, and a header of the same capture."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return f"it is {_kind(st.st_mode)}"
        if st.st_uid != first.ident[2]:
            return (f"owned by uid {st.st_uid}, not by uid {first.ident[2]} "
                    f"like {first.path} (planted by someone else?)")
        try:
            part = _probe(path, sibling=True)
        except UserError as err:
            return err.message.replace(path + " ", "", 1)
        if part.header.get("capture_id") != first.header.get("capture_id"):
            return "its header belongs to another capture (capture id differs)"
        return part

    def _note_gaps(self, given: str, numbers: list[int]) -> None:
        """numbers: sorted, distinct, each at most MAX_PART: work is linear
        in how many there are, never in how far apart they are."""
        missing = 0
        for a, b in zip(numbers, numbers[1:]):
            for n in range(a + 1, min(b, a + 1 + MAX_LISTED)):
                if len(self.missing_parts) < MAX_LISTED:
                    self.missing_parts.append((given, n))
            missing += b - a - 1
        if missing > len(self.missing_parts):
            self.problems.append(f"{given}: {missing} part(s) missing in all, "
                                 f"the first {len(self.missing_parts)} are listed")
        if numbers and numbers[0] != 0:
            m = re.fullmatch(r"(.+)\.(\d{1,18})", given)
            if m and self._same_capture_first(m.group(1), given):
                self.problems.append(f"{given} is part {numbers[0]} of a capture; "
                                     f"read {m.group(1)} for all its parts")
            else:
                self.problems.append(f"{_name(given)}: parts 0-{numbers[0] - 1} were rotated "
                                     f"away (-W cap) or removed; the capture starts at "
                                     f"part {numbers[0]}")

    @staticmethod
    def _same_capture_first(base: str, given: str) -> bool:
        try:
            a, b = _probe(base, sibling=True), _probe(given, sibling=False)
        except UserError:
            return False
        return a.header.get("capture_id") == b.header.get("capture_id") and \
            a.ident[2] == b.ident[2]

    @property
    def first_header(self) -> dict:
        """The header of the first file given (checked at construction)."""
        return self._sets[0][1][0].header

    def end_ts(self) -> Optional[float]:
        """The `ts` of the last record of the last part, found without
        parsing the rest: the decoded bytes pass through keeping only their
        last TAIL_BYTES, whose lines are parsed from the end (zlib's work
        and a bounded parse). None for standard input (read once) or when
        the tail holds no usable time."""
        part = self._sets[-1][1][-1]
        if part.path == STDOUT:
            return None
        state = _PartState()
        try:
            fd, _st = _open_for_reading(part.path, part.sibling)
        except UserError:
            return None
        tail = b""
        try:
            for chunk in _decoded_chunks(fd, state):
                tail = (tail + chunk)[-TAIL_BYTES:]
        finally:
            os.close(fd)
        for raw in reversed(tail.split(b"\n")[1:] if len(tail) == TAIL_BYTES
                            else tail.split(b"\n")):
            rec = parse_line(raw) if raw.strip() else None
            if rec is not None and schema.problem(rec) is None:
                ts = rec.get("ts")
                if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                    return ts
        return None

    def __iter__(self):
        for _given, parts in self._sets:
            for part in parts:
                yield from self._stream(part)

    def _stream(self, part: _Part):
        if part.records is not None:                 # standard input
            state, records, fd = part.state, part.records, part.fd
            part.records = None
            first = part.header
        else:
            state = _PartState()
            try:
                fd, st = _open_for_reading(part.path, part.sibling)
            except UserError as err:
                self.problems.append(f"skipped {err.message} (it was there a moment ago)")
                return
            records = _records_of(_decoded_chunks(fd, state), state)
            first = next(iter(records), None)
            if (st.st_dev, st.st_ino, st.st_uid) != part.ident or first != part.header:
                records.close()
                os.close(fd)
                self.problems.append(f"skipped {part.path}: it was replaced while being read")
                return
        version = first["format_version"]
        try:
            self.files.append(_name(part.path))
            yield first
            for rec in records:
                # Older versions are brought to the current shape; a record
                # that does not match its schema (damaged, hostile) is
                # skipped and counted like a damaged line, never shown.
                rec = schema.upgrade(rec, version)
                if schema.problem(rec) is None:
                    yield rec
                else:
                    state.skipped += 1
        finally:
            records.close()
            os.close(fd)
            self.skipped += state.skipped
            name = _name(part.path)
            if state.damaged_gzip:
                self.problems.append(f"{name}: compressed data damaged or cut short; "
                                     f"read what precedes it")
            if state.read_error:
                self.problems.append(f"{name}: read error ({state.read_error}); "
                                     f"read what precedes it")
            if state.barren:
                self.problems.append(f"{name}: stopped reading after {state.barren} "
                                     f"(damaged, or not a recording past this point)")


def read(paths: Iterable[str]) -> Recording:
    """Everything at once, for callers that need a list (report.build).
    Memory grows with the valid records read; RecordingReader streams."""
    reader = RecordingReader(paths)
    records = list(reader)
    return Recording(records=records, files=reader.files, skipped=reader.skipped,
                     problems=reader.problems, missing_parts=reader.missing_parts)

