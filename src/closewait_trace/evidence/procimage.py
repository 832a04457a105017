"""One process's address space as /proc shows it: its mappings and reads of
its memory. The only place that opens /proc/PID/maps and /proc/PID/mem.

Never attaches to or stops the process; a process that exits or remaps
while we look simply gives fewer answers (empty reads), never an error.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Optional

from closewait_trace.sockets import procfs


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


def parse_maps(text: str) -> list[Mapping]:
    maps = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            maps.append(Mapping(start, end, parts[1], int(parts[2], 16), int(parts[4]),
                                parts[5].strip() if len(parts) > 5 else ""))
        except ValueError:
            continue
    return maps


class ProcessImage:
    """Mappings and memory of one process, read through /proc."""

    def __init__(self, pid: int, proc: str = procfs.PROC):
        self.pid = pid
        self.proc = proc
        self.maps = parse_maps(procfs.read_text(f"{proc}/{pid}/maps") or "")
        self.starts = [m.start for m in self.maps]
        self._mem = None

    def mapping(self, addr: int) -> Optional[Mapping]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.maps[i].start <= addr < self.maps[i].end:
            return self.maps[i]
        return None

    def file_of(self, m: Mapping) -> Optional[str]:
        """A path that opens the very file mapped: map_files works for a
        deleted file or one in a container; otherwise the path as seen from
        the process's root. None for anonymous and special mappings."""
        if not m.path.startswith("/"):
            return None
        via_map_files = f"{self.proc}/{self.pid}/map_files/{m.start:x}-{m.end:x}"
        if os.path.exists(via_map_files):
            return via_map_files
        return f"{self.proc}/{self.pid}/root{m.path.replace(' (deleted)', '')}"

    def read(self, addr: int, size: int) -> bytes:
        try:
            if self._mem is None:
                self._mem = open(f"{self.proc}/{self.pid}/mem", "rb", buffering=0)
            self._mem.seek(addr)
            return self._mem.read(size) or b""
        except (OSError, ValueError, OverflowError):
            return b""

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None
