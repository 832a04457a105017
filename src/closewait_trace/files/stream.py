"""One recording file read as a stream of records, in bounded memory and
time (the reader stream; parts.py puts the files of a capture in order).

A recording may come from another host or sit in a shared directory: it is
read as untrusted input. In chunks, never whole; no line held beyond
MAX_LINE_BYTES; a file stops being read after BARREN_LINES lines or
BARREN_BYTES (decompressed) bytes without a single usable record, so a gzip
of gigabytes of newlines or one endless line costs a bounded amount of work;
every parsed line passes one gate, _accept(), then the schema of its file's
version (FileState.usable), and a line either refuses is skipped, counted as
damaged, and counts toward the stop.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import select
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from closewait_trace.output import schema

GZIP_MAGIC = b"\x1f\x8b"
MAX_LINE_BYTES = 8 * 1024 * 1024     # longer lines are skipped, never held whole
READ_CHUNK = 1024 * 1024             # bytes per read(2), and per inflate step
BARREN_LINES = 100_000               # lines in a row with nothing usable: stop
BARREN_BYTES = 256 * 1024 * 1024     # bytes in a row with nothing usable: stop
# Objects and arrays a line may open ('{' and '[', in strings too), counted
# before it is parsed: a line of 8 MiB can hold 2.8 million empty objects,
# 242 MB once parsed, and a header and two lines alive at once took `report`
# and `-r` to 637 MB (a review, 2026-12-07); 500,000 empty ones take about
# 45 MB. The tool's own densest lines (a list of holders, compact: 38 bytes
# each) open one for every 38 bytes or more, about 220,000 in 8 MiB; only
# strings full of them (a user naming their own processes "{{{{") can make a
# line it wrote go over, and that line is then skipped as damaged.
MAX_CONTAINERS = 500_000


@dataclass
class FileState:
    """What reading one file found besides its records."""
    raw_bytes: int = 0           # bytes read from the file
    skipped: int = 0             # damaged lines (bad JSON, refused, too long)
    damaged_gzip: bool = False   # compressed data damaged or cut short
    barren: str = ""             # why reading stopped early, if it did
    read_error: str = ""         # read(2) failed (EIO...): what came before is kept
    # Called before a read that would wait (a pipe with nothing in it yet):
    # what was made of the records so far can be shown before we wait.
    on_wait: Optional[Callable[[], None]] = None
    # The record to give for a parsed one, or None when it is of no use
    # (the schema of its file's version rejects it): set by the part set
    # once the header says the version. A record it refuses is skipped and
    # counted here, like a line that does not parse, and counts toward the
    # barren stop: a stream of objects with a type but no valid shape is
    # nothing usable either. False: not usable, and not damaged (a record
    # of a version this reader does not read): the caller counts and says
    # it; it counts toward the stop all the same.
    usable: Optional[Callable[[dict], object]] = None


def _would_wait(fd: int) -> bool:
    try:
        return not select.select([fd], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _read_chunks(fd: int, state: FileState) -> Iterable[bytes]:
    while True:
        if state.on_wait is not None and _would_wait(fd):
            state.on_wait()
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


class _RawFile(io.RawIOBase):
    """The file's bytes for gzip.GzipFile, through _read_chunks (counted,
    read errors kept in the state, on_wait before a read that would wait),
    starting with those already read to look for the magic."""

    def __init__(self, head: bytes, chunks: Iterator[bytes]):
        self._pending = memoryview(head)
        self._chunks = chunks

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._pending:
            self._pending = memoryview(next(self._chunks, b""))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def decoded_chunks(fd: int, state: FileState) -> Iterable[bytes]:
    """The file's bytes, gunzipped when it starts with gzip's magic: the
    standard library's reader (concatenated members, CRC and length
    checked), asked for at most READ_CHUNK decoded bytes at a time, so a
    member that inflates to gigabytes costs one READ_CHUNK in memory. What
    came out before damage (a cut member, bytes that are not a member) is
    kept, and the damage noted."""
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
    with gzip.GzipFile(fileobj=_RawFile(head, raw), mode="rb") as unzipped:
        while True:
            try:
                out = unzipped.read1(READ_CHUNK)   # read() loses a read cut by damage
            except (OSError, EOFError, zlib.error):
                # BadGzipFile (an OSError): not a member where one should
                # start, or a wrong CRC; EOFError: cut short (kill -9
                # mid-write).
                state.damaged_gzip = True
                return
            if not out:
                return
            yield out


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
    the file is: parts.RecordingReader._stream.)"""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("type"), str):
        return "no record type"
    return None


def parse_line(raw: bytes) -> Optional[dict]:
    """One line -> a record, or None if it is damaged or refused."""
    if raw.count(b"{") + raw.count(b"[") > MAX_CONTAINERS:
        return None
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


def records_of(chunks: Iterable[bytes], state: FileState) -> Iterable[dict]:
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
        if rec is not None and state.usable is not None:
            rec = state.usable(rec)
            if rec is False:
                return None
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
