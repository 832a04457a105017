"""Recordings: JSON Lines files written during tracing, read back anywhere.

Layout of one file (one "part" of a capture):
  {"type": "header", "format": "closewait-trace-recording", "format_version": 1, ...}
  {"type": "snapshot", ...}      state at the start of the part
  {"type": "start" | "linger" | "closed" | "lost" | "snapshot" | "summary", ...}

Crash safety: records are buffered for at most FLUSH_S and written with one
write(2) per batch, plain or as one complete gzip member (concatenated gzip
members are a valid gzip file), so after kill -9 the file holds every batch
written and at most the last line is cut short. Readers skip damage and count
it. Rotation follows tcpdump's -C/-W: parts FILE, FILE.1, FILE.2, ...; with a
file cap the numbering wraps and the oldest part is replaced. Every part
starts with a header carrying its part number, so a set is read in order.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import socket
import stat
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

from closewait_trace import __version__, textsafe
from closewait_trace.errors import EXIT_FILE, UserError

FORMAT = "closewait-trace-recording"
FORMAT_VERSION = 1
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


def _open_private(path: str, force: bool) -> int:
    """Create path 0600, never through a symlink; an existing file only with force."""
    _refuse_symlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UserError(f"{path} exists", EXIT_FILE, "use --force to overwrite it")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; refusing to write through it",
                            EXIT_FILE, "give the real path")
        raise UserError(f"cannot write {path}: {exc.strerror}", EXIT_FILE,
                        "check the directory exists and is writable")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file", EXIT_FILE, "give a file path")
    os.fchmod(fd, 0o600)        # also when --force reused a laxer file
    return fd


@dataclass
class Recorder:
    """A sink for output records that writes them to a (rotating) recording."""

    path: str
    threshold_ns: int
    filters: dict
    clock_offset_ns: int
    force: bool = False
    compress: bool = False
    max_bytes: Optional[int] = None       # -C: rotate after this many bytes
    max_files: Optional[int] = None       # -W: keep at most this many parts
    mode: str = "closewait"
    snapshot_source: object = None        # callable -> snapshot record
    fd: int = -1
    part: int = 0
    written: int = 0
    write_errors: int = 0
    warned: bool = False
    _buffer: list = field(default_factory=list)
    _first_buffered: float = 0.0
    _broken_line: bool = False
    _records_in_part: int = 0

    def open(self) -> None:
        self.capture_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        _refuse_symlink(self.path)
        if not self.force:
            stale = self._existing_parts()
            if stale:
                raise UserError(f"{stale[0]} exists", EXIT_FILE, "use --force to overwrite it")
        else:
            for p in self._existing_parts():
                if p != self.path and not os.path.islink(p):
                    os.unlink(p)
        self._open_part(first=True)

    def _existing_parts(self) -> list[str]:
        return [p for p in rotated_set(self.path) if os.path.lexists(p)]

    def _open_part(self, first: bool = False) -> None:
        path = part_path(self.path, self.part, self.max_files)
        self.fd = _open_private(path, force=self.force or not first)
        self.written = 0
        self._records_in_part = 0
        self._broken_line = False
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
        if not self._buffer:
            self._first_buffered = time.monotonic()
        self._buffer.append(textsafe.json_dumps(rec, separators=(",", ":")) + "\n")
        if rec.get("type") in ("summary",) or time.monotonic() - self._first_buffered >= FLUSH_S:
            self.flush()

    def poll(self) -> None:
        """Called from the main loop: keeps the 'on disk within a second' promise."""
        if self._buffer and time.monotonic() - self._first_buffered >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if not self._buffer or self.fd < 0:
            return
        lines, self._buffer = self._buffer, []
        # Rotate before a batch, never after a part's opening records, so a
        # part always holds some records even when -C is tiny.
        if self.max_bytes and self.written >= self.max_bytes and self._records_in_part:
            self.rotate()
        if self._write_lines(lines):
            self._records_in_part += len(lines)

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
            # A full disk must not stop the trace: count, warn once, go on.
            self.write_errors += len(lines)
            self._broken_line = not self.compress
            if not self.warned:
                self.warned = True
                print(f"closewait-trace: warning: cannot write {textsafe.escape(self.path)}: "
                      f"{exc.strerror}; tracing goes on, unwritten records are "
                      f"counted in the summary", file=sys.stderr, flush=True)
            return False
        self.written += len(data)
        return True

    def rotate(self) -> None:
        os.close(self.fd)
        self.part += 1
        self._open_part()

    def discard(self) -> None:
        """Start-up failed before anything was traced: remove what we made."""
        self._buffer = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for part in range(self.part + 1):
            try:
                os.unlink(part_path(self.path, part, self.max_files))
            except OSError:
                pass

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------------ reading

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
    """path and its rotated siblings path.1, path.2, ..."""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    pattern = re.compile(re.escape(base) + r"\.(\d+)$")
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    siblings = sorted((int(m.group(1)), os.path.join(directory, n))
                      for n in names for m in [pattern.match(n)] if m)
    return [path] + [p for _, p in siblings]


def _decompress(data: bytes) -> tuple[bytes, bool]:
    """Concatenated gzip members -> bytes; stop at damage (True if damaged)."""
    out = []
    while data:
        if not data.startswith(GZIP_MAGIC):
            return b"".join(out), True
        d = zlib.decompressobj(wbits=31)
        try:
            out.append(d.decompress(data))
        except zlib.error:
            return b"".join(out), True
        if not d.eof:           # cut short (kill -9 mid-write): keep what came out
            return b"".join(out), True
        data = d.unused_data
    return b"".join(out), False


def _lines(path: str) -> tuple[list[bytes], int, bool]:
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory", EXIT_FILE, "give a recording file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", EXIT_FILE, "check the path")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", EXIT_FILE, "check permissions")
    damaged = False
    if data.startswith(GZIP_MAGIC):
        data, damaged = _decompress(data)
    return data.split(b"\n"), len(data), damaged


def read_file(path: str) -> tuple[list[dict], int, list[str]]:
    """One file: its records, how many lines were skipped, and problems seen."""
    lines, size, damaged = _lines(path)
    problems = []
    if size == 0 and not damaged:
        raise UserError(f"{path} is empty", EXIT_FILE,
                        "the recorder may have been stopped before writing anything")
    records, skipped = [], 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
                raise ValueError("not a record")
        except (UnicodeDecodeError, ValueError):
            skipped += 1
            continue
        records.append(rec)
    if not records or records[0].get("type") != "header" or records[0].get("format") != FORMAT:
        if damaged and not records:
            raise UserError(f"{path} is a damaged compressed file with nothing readable",
                            EXIT_FILE, "nothing can be recovered from it")
        raise UserError(f"{path} is not a closewait-trace recording", EXIT_FILE,
                        "record one with: sudo closewait-trace -w FILE")
    version = records[0].get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}; this closewait-trace "
                        f"({__version__}) reads up to {FORMAT_VERSION}", EXIT_FILE,
                        "upgrade closewait-trace to read it")
    if damaged:
        problems.append(f"{path}: compressed data damaged or cut short; read what precedes it")
    return records, skipped, problems


def read(paths: Iterable[str]) -> Recording:
    result = Recording()
    for given in paths:
        parts = []
        for path in (rotated_set(given) if os.path.isfile(given) else [given]):
            records, skipped, problems = read_file(path)
            result.skipped += skipped
            result.problems += problems
            parts.append((records[0].get("capture_id"), records[0].get("part", 0), path, records))
        parts.sort(key=lambda p: p[1])
        numbers = [p[1] for p in parts]
        if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            have = set(numbers)
            gaps = [n for n in range(numbers[0], numbers[-1]) if n not in have]
            result.missing_parts += [(given, n) for n in gaps]
        if numbers and numbers[0] != 0:
            result.problems.append(f"{given}: parts 0-{numbers[0] - 1} were rotated away "
                                   f"(-W cap); the capture starts at part {numbers[0]}")
        for _cid, _part, path, records in parts:
            result.files.append(path)
            result.records.extend(records)
    return result
