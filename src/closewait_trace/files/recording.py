"""Recordings: JSON Lines files written during tracing (the writer; parts.py
reads a capture's files in order, stream.py one file's records).

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
only when it is a regular file we own. The directory itself must be reached
through directories and links no other user can change (open_directory),
and is used through a handle from then on. Recordings are read as untrusted
input, in bounded time and memory (stream.py, parts.py).
"""

from __future__ import annotations

import errno
import gzip
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from closewait_trace import __version__
from closewait_trace.errors import EXIT_FILE, UserError
from closewait_trace.files.parts import (FORMAT, FORMAT_VERSION, STDOUT, kind_of,
                                         numbered_siblings, part_path)
from closewait_trace.files.stream import MAX_LINE_BYTES
from closewait_trace.output import textsafe
from closewait_trace.wholewrite import write_all

FLUSH_S = 0.5


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


def _refuse_symlink(path: str, dir_fd: int) -> None:
    # Said plainly here; O_NOFOLLOW at open() closes the race.
    try:
        st = os.stat(os.path.basename(path), dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path} is a symbolic link; refusing to write through it",
                        EXIT_FILE, "give the real path")


MAX_LINKS = 40           # symbolic links followed in one path, as the kernel allows
_DIR_HINT = ("record into a directory that only root or you own and may write "
             "(such as /root or /var/lib/closewait-trace), or into /tmp itself")


def trusted_owners() -> frozenset:
    """Who may own the directories on the way to a recording: root, us, and
    the user who ran us through sudo (SUDO_UID: only someone who may already
    run commands as root can set a root process's environment)."""
    owners = {0, os.geteuid()}
    sudo_uid = os.environ.get("SUDO_UID", "")
    if sudo_uid.isdigit() and len(sudo_uid) <= 10:
        owners.add(int(sudo_uid))
    return frozenset(owners)


def directory_problem(st: os.stat_result, owners: frozenset) -> Optional[str]:
    """Why another user could change what a name in this directory leads
    to, or None. Its owner can rename or replace anything in it, and so can
    anyone who may write it, unless it is sticky (then only their own
    entries: /tmp)."""
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid not in owners:
        return f"it is owned by uid {st.st_uid}, who could put anything at the names in it"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        who = "other users" if st.st_mode & 0o002 else f"group {st.st_gid}"
        return (f"{who} may write it and it is not sticky, so they could rename or "
                f"replace what is in it")
    return None


def open_directory(directory: str, owners: Optional[frozenset] = None) -> int:
    """A handle on the directory a recording goes in, reached from / one
    name at a time, so that no user but root, us, or the user who ran sudo
    decides where it leads: every directory looked in must be owned by one
    of them and writable by nobody else (unless sticky), and a symbolic link
    is followed only when one of them owns it (where another may write, a
    link of theirs could lead into root's directories: --force would then
    delete root's files there). A relative path starts at the working
    directory's path, checked from / too. UserError (exit 7) names the
    first directory or link that fails."""
    owners = trusted_owners() if owners is None else owners
    try:
        path = directory if os.path.isabs(directory) else os.path.join(os.getcwd(), directory)
    except OSError as exc:                 # the working directory was removed
        raise UserError(f"cannot write in {directory}: {exc.strerror}", EXIT_FILE,
                        "give an absolute path") from None
    todo = [n for n in path.split("/") if n and n != "."]
    walked = "/"
    links = 0
    # O_PATH: looking a name up needs search permission only (a user's
    # home may be 0711); the last directory is opened for reading below.
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def named(where: str) -> str:
        # The directory given, then which directory on the way to it.
        return directory if where == os.path.normpath(path) else f"{directory}: {where}"

    def refuse(where: str, why: str) -> UserError:
        return UserError(f"refusing to record in {named(where)}: {why}", EXIT_FILE, _DIR_HINT)

    def cannot(where: str, exc: OSError) -> UserError:
        return UserError(f"cannot write in {named(where)}: {exc.strerror}", EXIT_FILE,
                         "check the directory exists and is writable")

    def checked(fd: int, where: str) -> int:
        problem = directory_problem(os.fstat(fd), owners)
        if problem:
            os.close(fd)
            raise refuse(where, problem)
        return fd

    fd = checked(os.open("/", flags), "/")
    try:
        while todo:
            name = todo.pop(0)
            where = os.path.join(walked, name)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                raise cannot(where, exc) from None
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid not in owners:
                    raise refuse(where, f"it is a symbolic link owned by uid {st.st_uid}")
                links += 1
                if links > MAX_LINKS:
                    raise refuse(where, "too many symbolic links")
                # The directory is one only trusted users may change (checked
                # before looking in it), so the link read is the one stat saw.
                target = os.readlink(name, dir_fd=fd)
                todo[:0] = [n for n in target.split("/") if n and n != "."]
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = checked(os.open("/", flags), "/")
                    walked = "/"
                continue
            try:
                new = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISDIR(st.st_mode):
                    exc = OSError(exc.errno, "it was replaced while being checked")
                raise cannot(where, exc) from None
            os.close(fd)
            fd = -1
            # '..' is the real parent, whatever the path said before it:
            # checked as any other directory.
            walked = os.path.dirname(walked) if name == ".." else where
            fd = checked(new, where)
        try:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise cannot(walked, exc) from None
    finally:
        if fd >= 0:
            os.close(fd)


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
        raise UnsafePart(path, f"it is {kind_of(st.st_mode)}")
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
            raise UnsafePart(path, f"it is {kind_of(st.st_mode)}")
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
    # callable(snapshot record) -> lines written before it at a rotation:
    # the process records of its sockets' holders (RecordingSink).
    snapshot_lines: object = None
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
        # Every part is made in this directory as it is now, through a
        # handle: if someone renames it and puts a link to another directory
        # at its name, later parts still go where the first one went. The
        # handle itself is reached without any link or directory another
        # user could change (open_directory), and everything after (checks,
        # unlinks, creates) goes through it, never through the path again.
        self._dir_fd = open_directory(os.path.dirname(self.path) or ".")
        try:
            _refuse_symlink(self.path, self._dir_fd)
            self._clear_old_parts()
        except BaseException:
            self._close_dir()
            raise
        self._open_part(first=True)

    def _uses_part(self, n: int) -> bool:
        """Whether this recording may ever write part file FILE.n (FILE: 0)."""
        if not (self.max_bytes or self.max_seconds):
            return n == 0                 # no rotation: FILE alone
        return not self.max_files or n < self.max_files

    def _clear_old_parts(self) -> None:
        """Refuse to start where a name this recording will write is taken by
        anything but a regular file of ours (or one of ours without --force);
        with --force, remove our own old parts. Names it will never write
        are no concern of ours: another user's FILE.7 beside a recording
        without rotation, or with -W 2, is left alone, and `report FILE`
        skips it (not the same owner as FILE, or not the same capture id)."""
        base = os.path.basename(self.path)
        stale = []
        for n, name in self._part_names(base):
            if name != os.path.basename(part_path(self.path, n, None)):
                continue                  # FILE.007: not a name we ever write
            used = self._uses_part(n)
            if used:
                # Another user's file, a FIFO, a link: --force would not help.
                if not _check_replaceable(os.path.join(os.path.dirname(self.path), name),
                                          self._dir_fd):
                    continue
            else:
                try:
                    st = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
            stale.append((n, name, used))
        if not self.force:
            # Our own earlier parts at names we will not write stay, untouched.
            taken = [name for n, name, used in stale if used]
            if taken:
                shown = os.path.join(os.path.dirname(self.path), taken[0])
                raise UserError(f"{shown} exists", EXIT_FILE, "use --force to overwrite it")
            return
        for n, name, _used in stale:
            if n:                         # FILE itself is replaced when created
                try:
                    os.unlink(name, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    pass

    def _part_names(self, base: str) -> list:
        """(n, name) of FILE and of the FILE.n now in our directory, listed
        through its handle."""
        try:
            names = os.listdir(self._dir_fd)
        except OSError as exc:
            raise UserError(f"cannot list {os.path.dirname(self.path) or '.'}: {exc.strerror}",
                            EXIT_FILE, "check the directory is readable")
        return [(0, base)] + numbered_siblings(base, names)

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
        lines = [textsafe.json_dumps(r, separators=(",", ":")) + "\n" for r in opening]
        if len(opening) > 1 and self.snapshot_lines is not None:
            # Before the snapshot: a reader names its sockets' holders as it
            # meets them (output/report.py), from what it read before.
            lines[1:1] = self.snapshot_lines(opening[1])
        self._write_lines(lines)

    def __call__(self, rec: dict) -> None:
        self.write(rec)

    def write(self, rec: dict) -> None:
        self.write_line(textsafe.json_dumps(rec, separators=(",", ":")) + "\n", rec.get("type"))

    def write_line(self, line: str, kind: Optional[str]) -> None:
        """One record made into its line as write() makes it (compact JSON,
        ending in a newline; a linger record from output/lingerlines.py);
        kind: its type."""
        if len(line) > MAX_LINE_BYTES:     # ASCII (ensure_ascii): chars == bytes
            # A reader would skip it as damaged: say so now, count it.
            self._write_failed(1, f"a {kind} record of {len(line)} bytes is "
                                  f"longer than the {MAX_LINE_BYTES} a reader accepts")
            return
        if not self._buffer:
            self._first_buffered = time.monotonic()
        self._buffer.append(line)
        if kind == "summary" or time.monotonic() - self._first_buffered >= FLUSH_S:
            self.flush()

    def write_lines(self, lines: list) -> None:
        """Records already made into lines as write() makes them (compact
        JSON, each ending in a newline; --all's transitions, from
        output/transitions.JsonLines(compact=True)), buffered as write()
        buffers them. They are short: no length check."""
        if not lines:
            return
        if not self._buffer:
            self._first_buffered = time.monotonic()
        self._buffer.extend(lines)
        if time.monotonic() - self._first_buffered >= FLUSH_S:
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
            write_all(self.fd, data)
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
