"""Defensive reads of /proc.

Processes and file descriptors vanish while we read them: every read here
returns None (or an empty result) on ENOENT, ESRCH, EACCES and friends, so a
race costs a missing row, never a crash. The /proc root is a parameter so the
logic is tested over a fake tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

PROC = "/proc"

# Errors that mean "it went away or we may not look": a missing row.
_GONE = (FileNotFoundError, ProcessLookupError, PermissionError,
         NotADirectoryError, ChildProcessError)


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except _GONE:
        return None
    except OSError:     # e.g. ESRCH surfaces as a plain OSError on some reads
        return None


def read_link(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except _GONE:
        return None
    except OSError:
        return None


def list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except _GONE:
        return []
    except OSError:
        return []


def pids(proc: str = PROC) -> Iterator[int]:
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
    if not link or not link.startswith("socket:["):
        return None
    try:
        return int(link[8:-1])
    except ValueError:
        return None


@dataclass
class ProcessInfo:
    pid: int
    comm: str
    state: str            # one letter, as in ps: R S D T t Z X I ...
    ppid: int
    uid: Optional[int] = None
    cmdline: str = ""
    tracer_pid: int = 0
    threads: int = 1
    extra: dict = field(default_factory=dict)


def parse_stat(text: str) -> Optional[tuple[str, str, int]]:
    """(comm, state, ppid) from /proc/PID/stat; comm may hold spaces and ')'."""
    try:
        open_paren = text.index("(")
        close_paren = text.rindex(")")
        comm = text[open_paren + 1:close_paren]
        rest = text[close_paren + 2:].split()
        return comm, rest[0], int(rest[1])
    except (ValueError, IndexError):
        return None


def parse_status(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def process_info(pid: int, proc: str = PROC) -> Optional[ProcessInfo]:
    stat = read_text(f"{proc}/{pid}/stat")
    parsed = parse_stat(stat) if stat else None
    if not parsed:
        return None
    comm, state, ppid = parsed
    info = ProcessInfo(pid=pid, comm=comm, state=state, ppid=ppid)
    status = read_text(f"{proc}/{pid}/status")
    if status:
        fields = parse_status(status)
        try:
            info.uid = int(fields.get("Uid", "").split()[0])
        except (IndexError, ValueError):
            pass
        try:
            info.tracer_pid = int(fields.get("TracerPid", "0"))
            info.threads = int(fields.get("Threads", "1"))
        except ValueError:
            pass
    cmdline = read_text(f"{proc}/{pid}/cmdline")
    if cmdline:
        info.cmdline = " ".join(part for part in cmdline.split("\0") if part)
    return info
