"""Where in user code a blocked thread is: its program counter symbolized to
function+offset in the right binary, and a best-effort stack.

Reads only /proc and the binaries (through /proc/PID/map_files or
/proc/PID/root, so deleted binaries and containers work); never attaches to
or stops the process. The caller gives the two registers a thread in a system
call shows (PC and SP, from /proc/TID/syscall). The work is split by job:

- procimage:     the process's mappings and memory (/proc/PID/maps, mem)
- elfindex:      symbols and FDE lookup of one ELF file, bounded, in a
                 byte-bounded LRU cache
- unwind_x86_64: CFI stepping, call-site decoding, stack scanning

This module joins them for one stack, chooses the unwinder by architecture,
and spends a per-batch time budget: once it is spent, the remaining frames
are not symbolized and say so, so a slow binary never delays a tick or
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from typing import Optional

from closewait_trace import knobs
from closewait_trace.evidence import elfindex, place, unwind_x86_64
from closewait_trace.sockets import procfs
from closewait_trace.evidence.procimage import Mapping, ProcessImage

# Seconds one batch of diagnoses may spend symbolizing, whatever the number
# of stacks (a warm cache needs milliseconds; a cold one, a few hundred).
BATCH_SECONDS = 2.0
BUDGET_SPENT = "symbolization skipped: budget spent"

UNWINDERS = {"x86_64": unwind_x86_64.unwind}


@dataclass
class Frame:
    pc: int
    module: str = ""
    function: str = ""
    offset: int = 0
    build_id: str = ""
    method: str = "pc"        # pc | cfi | fp | scan
    symbols_from: str = ""    # symtab | debug-file | dynsym | none
    note: str = ""            # why this frame has no symbols, when it is not ordinary
    file: str = ""            # source file and line, from DWARF (places only)
    line: int = 0

    def describe(self) -> str:
        where = f"{self.function}+{self.offset:#x}" if self.function else f"{self.pc:#x}"
        module = os.path.basename(self.module.replace(" (deleted)", "")) or "?"
        return f"{where} ({module})"

    def as_dict(self) -> dict:
        out = {"pc": f"{self.pc:#x}", "function": self.function or None,
               "offset": self.offset, "module": self.module, "build_id": self.build_id or None,
               "method": self.method, "symbols": self.symbols_from or None}
        if self.note:
            out["note"] = self.note
        if self.file and self.line:
            out["file"], out["line"] = self.file, self.line
        return out


class Budget:
    """The time one batch may spend symbolizing (shared by its stacks)."""

    def __init__(self, seconds: float = BATCH_SECONDS):
        self.deadline = time.monotonic() + seconds * knobs.time_scale()
        # One image per process for the batch: its maps are read and parsed
        # once, not once per thread (60,000 mappings cost tens of ms).
        self.images: dict = {}

    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    def image(self, pid: int, proc: str) -> ProcessImage:
        image = self.images.get((pid, proc))
        if image is None:
            image = self.images[(pid, proc)] = ProcessImage(pid, proc)
        return image

    def close(self) -> None:
        for image in self.images.values():
            image.close()
        self.images.clear()


def problems() -> dict:
    """Why modules or frames went without symbols so far, by reason."""
    return dict(elfindex.problems)


class StackSession:
    """Symbolizing one thread's stack: its process image, the module index
    cache and the batch's budget."""

    def __init__(self, image: ProcessImage, budget: Budget, debug_roots=None):
        self.image = image
        self.budget = budget
        self.debug_roots = debug_roots
        self._notes: dict = {}       # mapping start -> why it has no index

    def index_for(self, m: Mapping) -> Optional[elfindex.ModuleIndex]:
        path = self.image.file_of(m)
        if path is None:
            unread = self.image.unreadable_reason(m)
            if unread:
                self._notes[m.start] = unread
                elfindex.note_problem(unread, m.path)
            return None
        if self.budget.spent():
            self._notes[m.start] = BUDGET_SPENT
            return None
        try:
            index, reason = elfindex.load(path, self.budget.deadline, self.debug_roots)
        except elfindex.OutOfTime:
            self._notes[m.start] = BUDGET_SPENT
            return None
        if index is None and reason:
            self._notes[m.start] = f"no symbols: {reason}"
        return index

    def frame(self, pc: int, method: str) -> Frame:
        """Symbolize pc. A caller's frame holds a return address, which can
        lie just past the end of a function whose last instruction is the
        call: such frames are looked up at pc - 1."""
        frame = Frame(pc=pc, method=method)
        lookup = pc if method == "pc" else pc - 1
        m = self.image.mapping(pc)
        if m is None:
            return frame
        frame.module = m.path
        index = self.index_for(m)
        if index is None:
            frame.note = self._notes.get(m.start, "")
            if frame.note == BUDGET_SPENT:
                elfindex.problems[BUDGET_SPENT] += 1
            return frame
        frame.build_id = index.build_id
        frame.symbols_from = index.symbols_from
        vaddr = index.vaddr_of_offset(lookup - m.start + m.offset)
        if vaddr is not None:
            frame.function, frame.offset = index.symbol(vaddr)
            frame.offset += pc - lookup
        return frame

    def add_line(self, frame: Frame) -> None:
        """File and line of a frame, from DWARF: for the one frame that
        names a place (a line table is costly to read; a C library's debug
        file holds tens of MB of DWARF)."""
        m = self.image.mapping(frame.pc)
        index = self.index_for(m) if m else None
        path = self.image.file_of(m) if m else None
        if index is None or path is None or self.budget.spent():
            return
        lookup = frame.pc if frame.method == "pc" else frame.pc - 1
        vaddr = index.vaddr_of_offset(lookup - m.start + m.offset)
        if vaddr is None:
            return
        from closewait_trace.evidence import dwarflines
        found = dwarflines.line_of(path, vaddr, self.budget.deadline, index.build_id,
                                   self.debug_roots)
        if found is not None:
            frame.file, frame.line = found


def parse_syscall_regs(text: str) -> tuple[Optional[int], Optional[int]]:
    """(sp, pc) from /proc/TID/syscall: 'NR a0 .. a5 SP PC' while in a syscall."""
    parts = text.split()
    if len(parts) >= 9 and parts[0] not in ("running",):
        try:
            return int(parts[-2], 16), int(parts[-1], 16)
        except ValueError:
            return None, None
    if len(parts) == 3 and parts[0] == "-1":
        try:
            return int(parts[1], 16), int(parts[2], 16)
        except ValueError:
            return None, None
    return None, None


def can_unwind(machine: Optional[str] = None) -> bool:
    return (machine or platform.machine()) in UNWINDERS


def user_stack(pid: int, pc: Optional[int], sp: Optional[int], proc: str = procfs.PROC,
               machine: Optional[str] = None, budget: Optional[Budget] = None,
               max_frames: int = 16, debug_roots=None) -> list[Frame]:
    """The stack of a thread of pid stopped in a system call at pc with
    stack pointer sp (empty without them, or on an architecture we do not
    unwind)."""
    unwind = UNWINDERS.get(machine or platform.machine())
    if unwind is None or pc is None or sp is None:
        return []
    with _evidence_of(pid, budget, "stack not unwound") as budget:
        return unwind(StackSession(budget.image(pid, proc), budget, debug_roots), pc, sp,
                      max_frames)
    return []


@contextlib.contextmanager
def _evidence_of(pid: int, budget: Optional[Budget], failure: str):
    """The batch's budget (a new one, closed at the end, when none is given)
    for reading one process's stack. Whatever a crafted binary or a racing
    process makes of the code inside, a stack is evidence, never a reason
    for the tracer to stop: any error is counted as `failure` and
    swallowed, and the caller returns what it has."""
    own_budget = budget is None
    budget = budget or Budget()
    try:
        yield budget
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        elfindex.note_problem(f"{failure} ({type(e).__name__})", f"pid {pid}")
    finally:
        if own_budget:
            budget.close()


class CapturedImage:
    """A process image whose stack is the copy the kernel program took at an
    event, not the live one (which has moved on since): words in the copy
    come from it; code comes from the process's file mappings as read now;
    any other address reads as nothing. The copy is as distrusted as the
    live memory: the unwinder bounds every walk over it."""

    def __init__(self, image: ProcessImage, sp: int, stack: bytes):
        self.image = image
        self.sp = sp
        self.stack = stack

    def mapping(self, addr: int) -> Optional[Mapping]:
        return self.image.mapping(addr)

    def unreadable_reason(self, m: Mapping) -> str:
        return self.image.unreadable_reason(m)

    def file_of(self, m: Mapping) -> Optional[str]:
        return self.image.file_of(m)

    def read(self, addr: int, size: int) -> bytes:
        offset = addr - self.sp
        if 0 <= offset < len(self.stack):
            return self.stack[offset:offset + max(0, size)]
        m = self.image.mapping(addr)
        if m is not None and "x" in m.perms and m.file_backed:
            return self.image.read(addr, size)
        return b""

    def close(self) -> None:
        pass                    # the image is the budget's, closed with it


def captured_stack(pid: int, ip: int, sp: int, bp: int, stack: bytes,
                   proc: str = procfs.PROC, machine: Optional[str] = None,
                   budget: Optional[Budget] = None, max_frames: int = 32,
                   debug_roots=None, lines: bool = True) -> list[Frame]:
    """The stack of a thread of pid as the kernel copied it at an event:
    registers ip, sp and bp, and `stack`, the bytes from sp up. Symbols come
    from the process's mappings as they are now (it still holds the socket,
    so it still runs the same binaries)."""
    if (machine or platform.machine()) != "x86_64" or not ip or not sp:
        return []
    with _evidence_of(pid, budget, "stack not unwound") as budget:
        image = CapturedImage(budget.image(pid, proc), sp, stack)
        session = StackSession(image, budget, debug_roots)
        frames = unwind_x86_64.unwind(session, ip, sp, max_frames, bp=bp or None)
        if lines:
            add_place_line(pid, frames, proc, budget, debug_roots)
        return frames
    return []


def add_place_line(pid: int, frames: list, proc: str = procfs.PROC,
                   budget: Optional[Budget] = None, debug_roots=None) -> None:
    """File and line of the frame that names the place (evidence/place.py),
    from DWARF, with what is left of the budget."""
    named = place.place_index([f.as_dict() for f in frames])
    if named is None:
        return
    with _evidence_of(pid, budget, "no line") as budget:
        StackSession(budget.image(pid, proc), budget, debug_roots).add_line(frames[named])
