"""The files of a capture (the part set): how parts are named, found,
opened without trusting what sits at their names, checked by their headers
and read in order as one stream of records (RecordingReader). One file's
bytes become records in stream.py; recording.py writes them.

Rotated parts are FILE, FILE.1, FILE.2, ... and every part starts with a
header carrying its part number and capture id, so a set is read in order
and a file that does not belong to it is recognized. FILE '-' is stdout /
stdin.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from closewait_trace import __version__
from closewait_trace.errors import EXIT_FILE, UserError
from closewait_trace.files.stream import (BARREN_BYTES, BARREN_LINES, GZIP_MAGIC, FileState,
                                          decoded_chunks, parse_line, records_of)
from closewait_trace.output import schema

FORMAT = "closewait-trace-recording"
# One version for the records and the files that carry them (schema.py).
FORMAT_VERSION = schema.SCHEMA_VERSION
STDOUT = "-"          # -w - / -r -: standard output / standard input
MAX_PART = 2**31 - 1                 # a header's part number above this is damage
MAX_LISTED = 20                      # skipped files / missing parts named one by one
TAIL_BYTES = 256 * 1024              # end of a recording searched for its last time
TAIL_BUDGET_RATIO = 128              # a gzip's end: decoded bytes per byte of the file, at most


def part_path(base: str, part: int, max_files: Optional[int]) -> str:
    slot = part % max_files if max_files else part
    return base if slot == 0 else f"{base}.{slot}"


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


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


def numbered_siblings(base: str, names: Iterable[str]) -> list[tuple[int, str]]:
    """(n, name) of the names base.N among names, by number."""
    pattern = re.compile(re.escape(base) + r"\.(\d{1,18})$")
    return sorted((int(m.group(1)), n) for n in names for m in [pattern.match(n)] if m)


def rotated_set(path: str) -> list[str]:
    """path and its rotated siblings path.1, path.2, ... (by number)"""
    directory = os.path.dirname(path) or "."
    # Scanned, not listed: a shared directory may hold any number of other
    # users' files, and only the names that match are kept (os.listdir
    # held them all: 200,000 names of 250 characters, +61 MB).
    try:
        with os.scandir(directory) as entries:
            siblings = numbered_siblings(os.path.basename(path), (e.name for e in entries))
    except OSError:
        siblings = []
    return [path] + [os.path.join(directory, n) for _, n in siblings]


def _name(path: str) -> str:
    return "standard input" if path == STDOUT else path


def _not_regular(path: str, mode: int) -> UserError:
    if stat.S_ISDIR(mode):
        return UserError(f"{path} is a directory", EXIT_FILE, "give a recording file")
    return UserError(f"{path} is {kind_of(mode)}, not a recording file", EXIT_FILE,
                     "give a regular file (to read a pipe: ... | closewait-trace -r -)")


# Where the packaged service records (packaging/systemd/closewait-trace.service).
SERVICE_RECORDING_DIR = "/var/lib/closewait-trace"


def _no_such_file(path: str) -> UserError:
    """A recording that is not there, with what to do next: the service's
    own directory means the service has not recorded on this host (the
    README's incident command names it; a newcomer was told only to check
    the path)."""
    if os.path.dirname(os.path.abspath(path)) == SERVICE_RECORDING_DIR:
        return UserError(f"{path}: no such file (the service has not recorded here)",
                         EXIT_FILE, "record now: closewait-trace -w incident.jsonl.gz")
    return UserError(f"{path}: no such file", EXIT_FILE, "check the path")


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
        raise _no_such_file(path) from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if sibling:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _no_such_file(path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link", EXIT_FILE, "give the real path")
        raise _unreadable(path, exc) from None
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


def _unreadable(path: str, exc: OSError) -> UserError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        # The tracer writes its recordings private (0600, root's): the
        # user who reads one is most often not the one who wrote it.
        return UserError(f"cannot read {path}: {exc.strerror}", EXIT_FILE,
                         "recordings are written private to root (mode 0600): read it as "
                         "root, or have root make a copy you may read")
    return UserError(f"cannot read {path}: {exc.strerror}", EXIT_FILE, "check permissions")


_HINTS = {"is not": "record one as root: closewait-trace -w FILE",
          "has format version": "upgrade closewait-trace to read it",
          "has a damaged": "nothing can be read from it without a valid header"}


def _identity(header: dict) -> tuple:
    """What tells a part's header from another's once the header itself is
    let go: a file whose header no longer says this was replaced. (Not a
    hash of it all: a header may be megabytes, read twice.)"""
    return tuple(header.get(k) for k in ("part", "capture_id", "start_ts", "format_version",
                                         "boot_id", "hostname"))


@dataclass
class _Part:
    """One file of a set, planned. Of its header only what the plan uses is
    kept (its part number, capture id, start time, and what tells that the
    file was not replaced before it is read): a header may be 8 MiB of lists,
    and every part of a set is planned before the first is read. The
    header itself is read again when the part is (standard input's is kept:
    it cannot be read twice)."""
    path: str
    number: int
    capture_id: str
    start_ts: object              # the report's and the replay's time of day reference
    identity: tuple               # _identity(header)
    ident: tuple                  # (st_dev, st_ino, st_uid) when probed
    sibling: bool
    records: Optional[Iterable[dict]] = None   # standard input: read once, kept
    state: Optional[FileState] = None
    fd: int = -1
    header: Optional[dict] = None               # standard input's, kept until read


def _probe(path: str, sibling: bool) -> _Part:
    """Open a file and read as far as its header; UserError if it cannot be
    a recording. Files are closed again (one open file at a time, whatever
    the number of parts), except standard input, which is kept."""
    fd, st = _open_for_reading(path, sibling)
    state = FileState()
    records = records_of(decoded_chunks(fd, state), state)
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
    part = _Part(path, first.get("part", 0), first.get("capture_id", ""),
                 first.get("start_ts"), _identity(first),
                 (st.st_dev, st.st_ino, st.st_uid), sibling)
    if path == STDOUT:
        part.records, part.state = records, state
        part.fd = fd
        part.header = first
    return part


@dataclass
class _Plan:
    """One given path's parts, before the sets are compared."""
    parts: list
    refused: list                 # (path, why) of siblings that do not join, MAX_LISTED at most
    refused_more: int = 0         # and how many more


def _pread(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError:
        return b""


def _inflated_tail(fd: int, size: int) -> tuple[Optional[bytes], bool]:
    """The last TAIL_BYTES a gzip file decodes to, and whether they are cut
    from more; (None, True) past the budget. A gzip cannot be read from its
    end, and the reading's stop rules need each line parsed, which this is
    meant to avoid: so a budget of decoded bytes, TAIL_BUDGET_RATIO times
    the file's size (at least BARREN_BYTES), far above what records
    compress to and far below a bomb's ratio (deflate: about 1000:1); and a
    stretch of whitespace-only chunks of BARREN_LINES lines, where reading
    stops too (nothing past it is read: the end is before it)."""
    budget = max(BARREN_BYTES, TAIL_BUDGET_RATIO * size)
    state = FileState()
    tail, decoded, blank_lines, cut = b"", 0, 0, False
    for chunk in decoded_chunks(fd, state):
        decoded += len(chunk)
        if decoded > budget:
            return None, True
        if not chunk.strip():
            blank_lines += chunk.count(b"\n")
            if blank_lines > BARREN_LINES:
                break
            # Kept as one newline: it may end the line before it.
            chunk = b"\n" if b"\n" in chunk else b" "
        else:
            lead = chunk[:len(chunk) - len(chunk.lstrip())].count(b"\n")
            if blank_lines + lead > BARREN_LINES:
                break
            blank_lines = chunk[len(chunk.rstrip()):].count(b"\n")
        joined = tail + chunk
        cut = cut or len(joined) > TAIL_BYTES
        tail = joined[-TAIL_BYTES:]
    return tail, cut


class RecordingReader:
    """Streams the records of one or more recordings, in order, headers
    included: `for rec in RecordingReader(paths)`. Each path is a capture's
    first file (its rotated parts FILE.N are found and ordered by the part
    number in their headers), a single part, or '-' for standard input.
    A file named more than once, or pulled in by another path given, is
    read once (_read_once).

    Construction checks every file's header and raises UserError (exit 7)
    when a given file cannot be read; rotated siblings that do not belong
    are skipped and said in `problems`. `skipped`, `problems` and `files`
    are complete once the iteration has ended.
    """

    def __init__(self, paths: Iterable[str]):
        # Called before a read that would wait for more input (standard
        # input from a pipe), e.g. to flush what was shown so far.
        self.on_wait: Optional[Callable[[], None]] = None
        self.files: list[str] = []
        self.skipped = 0
        self.problems: list[str] = []
        self.missing_parts: list[tuple[str, int]] = []
        paths = list(paths)
        if paths.count(STDOUT) > 1:
            raise UserError("standard input ('-') can be read only once", EXIT_FILE,
                            "give '-' once")
        # A sibling refused from a set but named on the command line is read
        # as given: "skipped" would be false.
        given_names = {os.path.normpath(g) for g in paths}
        self._sets = self._read_once([(given, self._plan(given, given_names))
                                      for given in paths])

    def _read_once(self, planned: list) -> list:
        """Each file (by device and inode of the file opened) read once,
        however many times it is named: `report FILE*` (the README's form)
        names FILE.N that FILE already pulls in, and a file may be named
        again, through a symlink or a hard link. A given path whose parts all
        belong to a larger set (FILE.N beside FILE), or to an earlier one as
        large (the same file twice), is not read on its own, and nothing is
        said of it: its parts are read in their place in the capture, and
        nothing was wrong with naming it. Otherwise a part already read is
        left out of a later set. Only what is said of the sets read is kept."""
        owner: dict = {}                        # file -> index of the largest set holding it
        for i, (_given, plan) in enumerate(planned):
            for p in plan.parts:
                j = owner.get(p.ident[:2])
                if j is None or len(planned[j][1].parts) < len(plan.parts):
                    owner[p.ident[:2]] = i
        seen: set = set()
        sets = []
        for i, (given, plan) in enumerate(planned):
            if all(owner[p.ident[:2]] != i for p in plan.parts):
                self._drop(plan.parts)
                continue
            kept = [p for p in plan.parts if p.ident[:2] not in seen]
            self._drop([p for p in plan.parts if p.ident[:2] in seen])
            seen.update(p.ident[:2] for p in kept)
            self._note(given, plan)
            if kept:
                sets.append((given, kept))
        return sets

    @staticmethod
    def _drop(dropped: list) -> None:
        for p in dropped:
            if p.records is not None:               # standard input, kept open
                p.records.close()
                os.close(p.fd)
                p.records = None

    def _plan(self, given: str, given_names: set) -> "_Plan":
        first = _probe(given, sibling=False)
        parts = [first]
        refused: list = []
        more = 0

        def refuse(path: str, why: str) -> None:
            # The first MAX_LISTED said, the rest counted: a shared
            # directory may hold any number of planted FILE.N.
            nonlocal more
            if os.path.normpath(path) in given_names:
                return
            if len(refused) < MAX_LISTED:
                refused.append((path, why))
            else:
                more += 1
        if given != STDOUT:
            for path in rotated_set(given)[1:]:
                why = self._sibling_problem(path, first)
                if isinstance(why, str):
                    refuse(path, why)
                else:
                    parts.append(why)
        parts.sort(key=lambda p: p.number)
        unique = []
        by_file = {}
        for p in parts:
            if p.ident[:2] in by_file:          # a hard link among the siblings
                continue
            if unique and unique[-1].number == p.number:
                refuse(p.path, f"part {p.number} again (also in {unique[-1].path})")
                continue
            unique.append(p)
            by_file[p.ident[:2]] = p
        return _Plan(unique, refused, more)

    def _note(self, given: str, plan: "_Plan") -> None:
        """What planning found, for a set that is read."""
        self.problems.extend(f"skipped {path}: {why}" for path, why in plan.refused)
        if plan.refused_more:
            self.problems.append(f"skipped {plan.refused_more} more file(s) "
                                 f"beside {given} that are not parts of its capture")
        self._note_gaps(given, [p.number for p in plan.parts])

    @staticmethod
    def _sibling_problem(path: str, first: _Part):
        """A rotated part joins only as a regular file (no symlink) with the
        same owner as the given file, and a header of the same capture."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return f"it is {kind_of(st.st_mode)}"
        if st.st_uid != first.ident[2]:
            return (f"owned by uid {st.st_uid}, not by uid {first.ident[2]} "
                    f"like {first.path} (planted by someone else?)")
        try:
            part = _probe(path, sibling=True)
        except UserError as err:
            return err.message.replace(path + " ", "", 1)
        if part.capture_id != first.capture_id:
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
        return a.capture_id == b.capture_id and \
            a.ident[2] == b.ident[2]

    @property
    def first_header(self) -> dict:
        """What is kept of the header of the first file read (checked at
        construction): its part, capture_id and start_ts."""
        first = self._sets[0][1][0]
        return {"part": first.number, "capture_id": first.capture_id,
                "start_ts": first.start_ts}

    def end_ts(self) -> Optional[float]:
        """The `ts` of the last record of the last part, found without
        parsing the rest, in bounded work: a plain file's last TAIL_BYTES
        are read from its end; a gzip one's decoded bytes pass through
        keeping only their last TAIL_BYTES (_inflated_tail), within a
        budget. The tail's lines are parsed from the end. None for standard
        input (read once), past the budget, or when the tail holds no
        usable time: the banner then gives the start only."""
        part = self._sets[-1][1][-1]
        if part.path == STDOUT:
            return None
        try:
            fd, st = _open_for_reading(part.path, part.sibling)
        except UserError:
            return None
        try:
            if _pread(fd, len(GZIP_MAGIC), 0) == GZIP_MAGIC:
                tail, cut = _inflated_tail(fd, st.st_size)
            else:
                # Plain: seek to the end, whatever the size of the file.
                offset = max(0, st.st_size - TAIL_BYTES)
                tail, cut = _pread(fd, st.st_size - offset, offset), offset > 0
        finally:
            os.close(fd)
        if tail is None:
            return None
        lines = tail.split(b"\n")
        for raw in reversed(lines[1:] if cut else lines):     # the first may be cut
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
            state.on_wait = self.on_wait
            part.records = None
            first, part.header = part.header, None
        else:
            state = FileState(on_wait=self.on_wait)
            try:
                fd, st = _open_for_reading(part.path, part.sibling)
            except UserError as err:
                self.problems.append(f"skipped {err.message} (it was there a moment ago)")
                return
            records = records_of(decoded_chunks(fd, state), state)
            first = next(iter(records), None)
            if (st.st_dev, st.st_ino, st.st_uid) != part.ident or first is None \
                    or _identity(first) != part.identity:
                records.close()
                os.close(fd)
                self.problems.append(f"skipped {part.path}: it was replaced while being read")
                return
        # The version records are read by: the file's header's, then that of
        # each header met later (recordings concatenated by cat, or gzip
        # members of several), checked like the first. After one that
        # cannot start a recording (a newer version, damaged, not ours),
        # nothing is read until the next good one: those records are
        # counted apart (not damaged: of a version this reader does not
        # read) and said.
        reading = {"version": first["format_version"], "unread": None}
        unread: list = []                         # [problem, records], MAX_LISTED at most
        unread_more = [0, 0]                      # sections and records past those

        def usable(rec: dict):
            if rec.get("type") == "header":
                problem = _header_problem(rec)
                if problem is None:
                    reading.update(version=rec["format_version"], unread=None)
                    return rec
                section = reading["unread"]
                if section is None or section is unread_more or section[0] != problem:
                    if len(unread) < MAX_LISTED:
                        reading["unread"] = section = [problem, 0]
                        unread.append(section)
                    else:
                        reading["unread"] = section = unread_more
                        unread_more[0] += 1
                section[1] += 1                   # the header's line, then its records'
                return False
            if reading["unread"] is not None:
                reading["unread"][1] += 1
                return False
            # Older versions are brought to the current shape; a record
            # that does not match its schema (damaged, hostile) is skipped
            # and counted like a damaged line, never shown. Judged inside
            # the stream, so such records count toward its barren stop.
            rec = schema.upgrade(rec, reading["version"])
            return rec if schema.problem(rec) is None else None

        state.usable = usable
        try:
            self.files.append(_name(part.path))
            yield first
            yield from records
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
            for problem, lines in unread:
                self.problems.append(f"{name}: skipped {lines} line(s) from a header in the "
                                     f"middle of the file on: it {problem}")
            if unread_more[0]:
                self.problems.append(f"{name}: skipped {unread_more[1]} line(s) from "
                                     f"{unread_more[0]} more such header(s) on")
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

