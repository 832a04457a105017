"""Defensive reads of /proc, psutil's way.

Processes and file descriptors vanish while we read them, and a tracer run
with fewer capabilities than full root may not look at some of them. The
two are different facts and stay apart all the way up: a process that went
away is `NoSuchProcess` (a missing row, never a crash), one we may not read
is `AccessDenied` (said as such, never mistaken for "holds nothing").

Everything here is read from files a local user controls (process names,
command lines): reads are bounded in size, names may hold any byte, and
bytes that are not UTF-8 are kept (decoded with surrogateescape) for the
renderer to escape. The /proc root is a parameter so the logic is tested
over a fake tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

PROC = "/proc"

# A command line is shown, not parsed: the first 4 KiB say what runs, and a
# process with a 2 MB command line must not make every record 2 MB long.
MAX_CMDLINE = 4096
CMDLINE_TRUNCATED = " [...]"
# stat and status are small (< 2 KiB); a bound still guards a fake tree or
# a future kernel from making one read unbounded.
MAX_SMALL_FILE = 64 * 1024


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    """One handle on the C library for the process: each new one leaves
    ~3.5 KB in reference cycles when dropped, which the owner lookups (run
    with the cyclic collector paused, once per namespace they enter) would
    pile up."""
    return ctypes.CDLL(None, use_errno=True)


class ProcError(Exception):
    """A /proc read that failed; `path` says which."""

    def __init__(self, path: str, err: int = 0):
        super().__init__(f"{path}: {os.strerror(err) if err else 'unreadable'}")
        self.path = path
        self.errno = err


class NoSuchProcess(ProcError):
    """The process (or thread, or fd) went away, or its pid now belongs to
    another process: a missing row."""


class AccessDenied(ProcError):
    """We may not read it (a capability or ptrace access is missing)."""


class ResourceExhausted(ProcError):
    """The tracer itself ran out of file descriptors (EMFILE) or the system
    did (ENFILE): nothing is known about the process, and it must never be
    taken for "gone" or "holds nothing". Callers that walk many processes
    stop the walk and say that /proc could not be read; the forgiving forms
    below raise it too instead of answering None or []."""


_GONE_ERRNOS = {errno.ENOENT, errno.ESRCH, errno.ENOTDIR, errno.ECHILD}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}
EXHAUSTED_ERRNOS = {errno.EMFILE, errno.ENFILE}


# Reads completed so far in this process: the gathering worker reports it
# moving (evidence/worker.py), so that a long but progressing batch (100,000
# sockets) is told from a read that blocks.
progress = 0


def note_progress() -> None:
    global progress
    progress += 1


def _error(path: str, e: OSError) -> ProcError:
    if e.errno in _DENIED_ERRNOS:
        return AccessDenied(path, e.errno)
    if e.errno in EXHAUSTED_ERRNOS:
        return ResourceExhausted(path, e.errno)
    if e.errno in _GONE_ERRNOS:
        return NoSuchProcess(path, e.errno)
    # EIO, EINVAL...: /proc files of a dying process fail in odd ways. No
    # claim either way: callers treat it as missing data.
    return ProcError(path, e.errno or 0)


def read_bytes(path: str, limit: int = MAX_SMALL_FILE, dir_fd: Optional[int] = None) -> bytes:
    """At most limit + 1 bytes of path (so a caller can tell it was cut).
    Raises NoSuchProcess, AccessDenied or ProcError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except OSError as e:
        raise _error(path, e) from None
    try:
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        note_progress()
        return b"".join(chunks)
    except OSError as e:
        raise _error(path, e) from None
    finally:
        os.close(fd)


def decode(raw: bytes) -> str:
    """Bytes from a file a user controls: kept as they are, even when they
    are not UTF-8 (the text renderer escapes them, JSON writes \\udcXX)."""
    return raw.decode("utf-8", "surrogateescape")


def readlink(path: str, dir_fd: Optional[int] = None) -> str:
    """Raises NoSuchProcess, AccessDenied or ProcError."""
    try:
        link = os.readlink(path, dir_fd=dir_fd)
        note_progress()
        return link
    except OSError as e:
        raise _error(path, e) from None


def listdir(path: str) -> list[str]:
    """Raises NoSuchProcess, AccessDenied or ProcError."""
    try:
        names = os.listdir(path)
        note_progress()
        return names
    except OSError as e:
        raise _error(path, e) from None


@contextlib.contextmanager
def opened_dir(name: str, dir_fd: Optional[int] = None) -> Iterator[int]:
    """An fd on a /proc directory (name relative to dir_fd when given), for
    the reads relative to it: one path step each instead of one per
    component. Raises NoSuchProcess, AccessDenied, ResourceExhausted or
    ProcError."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise _error(name, e) from None
    try:
        yield fd
    finally:
        os.close(fd)


def listdir_at(name: str, dir_fd: int) -> list[str]:
    """The entries of name, relative to an open /proc/PID handle."""
    with opened_dir(name, dir_fd) as fd:
        try:
            names = os.listdir(fd)
        except OSError as e:
            raise _error(name, e) from None
    note_progress()
    return names


# The forgiving forms, for callers to whom "unreadable" is all that matters
# (a table that may be missing, a namespace link): None or empty on any error.
# list_dir (and so pids()) excepted: out of descriptors, it raises
# ResourceExhausted, because an empty listing of /proc or of a process's
# tasks reads as "every process is gone".

def read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    note_progress()
    return text


def read_link(path: str) -> Optional[str]:
    try:
        link = os.readlink(path)
    except OSError:
        return None
    note_progress()
    return link


def list_dir(path: str) -> list[str]:
    """[] on any error but EMFILE/ENFILE (ResourceExhausted)."""
    try:
        return os.listdir(path)
    except OSError as e:
        if e.errno in EXHAUSTED_ERRNOS:
            raise ResourceExhausted(path, e.errno) from None
        return []


# kcmp(2)'s number where this module knows it (x86_64; the generic table's
# arm64 and riscv64); elsewhere None, and same_fd_table cannot tell.
_KCMP_SYSCALL = {"x86_64": 312, "aarch64": 272, "riscv64": 272}.get(os.uname().machine)
_KCMP_FILE = 2                  # KCMP_FILES: the two tasks' fd tables


def same_fd_table(tid_a: int, tid_b: int) -> Optional[bool]:
    """Whether two tasks (thread ids of this pid namespace, as /proc names
    them) share one fd table: False for a thread that called
    unshare(CLONE_FILES), whose table /proc/PID/fd does not show. One
    system call, where reading the other table to compare costs a readlink
    per fd. None when the kernel cannot say (no kcmp, a task gone, not
    allowed)."""
    if _KCMP_SYSCALL is None:
        return None
    answer = libc().syscall(_KCMP_SYSCALL, tid_a, tid_b, _KCMP_FILE, 0, 0)
    return None if answer < 0 else answer == 0


def pids(proc: str = PROC) -> Iterator[int]:
    """Raises ResourceExhausted when /proc cannot be listed for lack of
    descriptors (never an empty list: that would be "no process at all")."""
    for name in list_dir(proc):
        if name.isdigit():
            yield int(name)


def ns_inode(link: Optional[str]) -> Optional[int]:
    """'net:[4026531840]' -> 4026531840."""
    if not link or "[" not in link:
        return None
    try:
        return int(link[link.index("[") + 1:link.rindex("]")])
    except ValueError:
        return None


def socket_inode(link: Optional[str]) -> Optional[int]:
    """'socket:[12345]' -> 12345; anything else -> None."""
    if not link or not link.startswith("socket:[") or not link.endswith("]"):
        return None
    try:
        return int(link[8:-1])
    except ValueError:
        return None


# ------------------------------------------------------------------ parsing

@dataclass(slots=True, frozen=True)
class Stat:
    """The fields of /proc/PID/stat (or task/TID/stat) we use."""
    comm: str
    state: str            # one letter, as in ps: R S D T t Z X I ...
    ppid: int
    flags: int            # PF_* (PF_EXITING = 0x4)
    start_time: int       # clock ticks after boot: with the pid, names one process


def parse_stat(text: str) -> Optional[Stat]:
    """/proc/PID/stat. The comm sits between the first '(' and the LAST ')'
    and may itself hold spaces, parentheses and newlines; every field after
    it is a number or a state letter, so the last ')' is the end of comm."""
    try:
        open_paren = text.index("(")
        close_paren = text.rindex(")")
        if close_paren < open_paren:
            return None
        comm = text[open_paren + 1:close_paren]
        rest = text[close_paren + 1:].split()
        # rest: state(3) ppid(4) pgrp session tty tpgid flags(9) ... starttime(22)
        return Stat(comm=comm, state=rest[0], ppid=int(rest[1]), flags=int(rest[6]),
                    start_time=int(rest[19]))
    except (ValueError, IndexError):
        return None


def parse_status(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def parse_cmdline(raw: bytes) -> str:
    """NUL-separated arguments, at most MAX_CMDLINE bytes of them, joined
    with spaces; a longer command line ends with ' [...]'."""
    cut = len(raw) > MAX_CMDLINE
    text = decode(raw[:MAX_CMDLINE])
    out = " ".join(part for part in text.split("\0") if part)
    return out + CMDLINE_TRUNCATED if cut else out


@dataclass(slots=True, frozen=True)
class SyscallLine:
    """/proc/TID/syscall: the system call a thread sleeps in, its first
    argument, and its user stack and instruction pointers (what the
    unwinder starts from). number None: not in a system call (running, or
    '-1': between calls), with sp/pc still known for '-1'."""
    number: Optional[int]
    arg0: Optional[int]
    sp: Optional[int]
    pc: Optional[int]


NOT_IN_SYSCALL = SyscallLine(None, None, None, None)


def parse_syscall(text: str) -> SyscallLine:
    """'running' | '-1 SP PC' | 'NR ARG0 .. ARG5 SP PC' (the one parser)."""
    parts = text.split()
    if not parts or parts[0] == "running":
        return NOT_IN_SYSCALL
    try:
        if parts[0] == "-1":
            if len(parts) == 3:
                return SyscallLine(None, None, int(parts[1], 16), int(parts[2], 16))
            return NOT_IN_SYSCALL
        number = int(parts[0])
    except ValueError:
        return NOT_IN_SYSCALL
    if number < 0:
        return NOT_IN_SYSCALL
    try:
        arg0 = int(parts[1], 16) if len(parts) > 1 else None
    except ValueError:
        arg0 = None
    sp = pc = None
    if len(parts) >= 9:
        try:
            sp, pc = int(parts[-2], 16), int(parts[-1], 16)
        except ValueError:
            sp = pc = None
    return SyscallLine(number, arg0, sp, pc)


# ------------------------------------------------------------ one process

@dataclass(slots=True, frozen=True)
class ProcessSnapshot:
    """stat, status and cmdline of one process, read once per batch. The
    pid and start_time together name the process: a later read that finds
    another start_time under the same pid is about another process."""
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    start_time: int
    uid: Optional[int] = None
    tracer_pid: int = 0
    threads: int = 0
    cmdline: str = ""
    # The kernel's /proc/PID/exe link (" (deleted)" included, as the kernel
    # says it), read for the owner lookup's holders only (ProcBatch): what
    # output/fold.py folds the children of one server by. "" when not read,
    # refused (another user's, not root) or none (a kernel thread).
    exe: str = ""

    @property
    def exiting(self) -> bool:
        return bool(self.flags & PF_EXITING)


PF_EXITING = 0x4


def _open_dir(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _error(path, e) from None


def read_process(pid: int, proc: str = PROC, exe: bool = False) -> ProcessSnapshot:
    """stat, status and cmdline, each read once, all through one handle on
    /proc/PID: if the process exits meanwhile the reads fail (ESRCH) rather
    than reach a new process given the same pid. Raises NoSuchProcess or
    AccessDenied (stat and status are world-readable; cmdline can be hidden
    with hidepid, then it is left empty). exe: the exe link too (a readlink
    only: the kernel's path of the running file, no filesystem is asked),
    left "" where it cannot be read."""
    base = f"{proc}/{pid}"
    dfd = _open_dir(base)
    try:
        stat = parse_stat(decode(read_bytes("stat", dir_fd=dfd)))
        if stat is None:
            raise NoSuchProcess(f"{base}/stat")     # empty: a process being reaped
        fields = parse_status(decode(read_bytes("status", dir_fd=dfd)))
        try:
            cmdline = parse_cmdline(read_bytes("cmdline", MAX_CMDLINE, dir_fd=dfd))
        except AccessDenied:
            cmdline = ""
        link = ""
        if exe:
            try:
                link = decode(os.readlink(b"exe", dir_fd=dfd))
            except OSError:
                pass
    finally:
        os.close(dfd)
    return ProcessSnapshot(pid=pid, comm=stat.comm, state=stat.state, ppid=stat.ppid,
                           flags=stat.flags, start_time=stat.start_time,
                           uid=_int_field(fields.get("Uid", ""), None),
                           tracer_pid=_int_field(fields.get("TracerPid", "0"), 0) or 0,
                           threads=_int_field(fields.get("Threads", "0"), 0) or 0,
                           cmdline=cmdline, exe=link)


def _int_field(value: str, default):
    try:
        return int(value.split()[0])
    except (IndexError, ValueError):
        return default


def real_uid(pid: int, proc: str = PROC) -> Optional[int]:
    """A process's real uid, from status: not /proc/PID's owner, which is
    root for a process that made itself non-dumpable. None when it cannot
    be read."""
    try:
        fields = parse_status(decode(read_bytes(f"{proc}/{pid}/status")))
    except ProcError:
        return None
    return _int_field(fields.get("Uid", ""), None)


class ProcBatch:
    """The processes one batch looks at, each read once (gone and denied
    remembered too, so a pid that failed is not retried within the batch)."""

    def __init__(self, proc: str = PROC):
        self.proc = proc
        # pid -> ProcessSnapshot, or (error class, path, errno) of its failed
        # read: not the exception itself, whose traceback holds the frame
        # that holds it (a reference cycle, pinning the batch's frames too,
        # per holder that exits mid-lookup; the owner lookups run with the
        # cyclic collector paused: gathering.WITHOUT_COLLECTOR).
        self._seen: dict[int, object] = {}

    def process(self, pid: int) -> ProcessSnapshot:
        """Raises NoSuchProcess, AccessDenied or ResourceExhausted (not
        remembered: descriptors may be free again at the next try)."""
        got = self._seen.get(pid)
        if got is None:
            try:
                # With the exe link: the holders' (output/fold.py).
                got = read_process(pid, self.proc, exe=True)
            except ResourceExhausted:
                raise
            except ProcError as e:
                got = (type(e), e.path, e.errno)
            self._seen[pid] = got
        if isinstance(got, tuple):
            kind, path, err = got
            raise kind(path, err)
        return got


# ---------------------------------------------------------- compatibility

@dataclass
class ProcessInfo:
    pid: int
    comm: str
    state: str
    ppid: int
    uid: Optional[int] = None
    cmdline: str = ""
    tracer_pid: int = 0


def process_info(pid: int, proc: str = PROC) -> Optional[ProcessInfo]:
    """The few fields a watcher compares from tick to tick; None when the
    process is gone or unreadable."""
    try:
        snap = read_process(pid, proc)
    except ProcError:
        return None
    return ProcessInfo(pid=pid, comm=snap.comm, state=snap.state, ppid=snap.ppid,
                       uid=snap.uid, cmdline=snap.cmdline, tracer_pid=snap.tracer_pid)
