"""Where in user code a blocked thread is: its program counter symbolized to
function+offset in the right binary, and a best-effort stack.

Reads only /proc and the binaries (through /proc/PID/map_files or
/proc/PID/root, so deleted binaries and containers work); never attaches to
or stops the process. The syscall entry gives us two registers, PC and SP
(/proc/PID/syscall). Frames are unwound with the binaries' .eh_frame call
frame information (read with pyelftools) while the rules need only those;
when a rule needs a register we cannot know (the frame pointer of a function
built with frame pointers), the rest of the stack is found by scanning it for
return addresses that follow a call instruction, and those frames say so.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Optional

from closewait_trace import procfs

try:
    from elftools.common.exceptions import ELFError
    from elftools.dwarf.callframe import FDE
    from elftools.elf.elffile import ELFFile
except ImportError:  # pragma: no cover - pyelftools is a dependency
    ELFFile = None

DEBUG_ROOTS = ("/usr/lib/debug",)


def debug_search_path() -> tuple:
    """Where debug files are looked up by build-id: CLOSEWAIT_TRACE_DEBUGINFO
    (colon-separated directories) first, then the distro's /usr/lib/debug."""
    extra = [d for d in os.environ.get("CLOSEWAIT_TRACE_DEBUGINFO", "").split(":") if d]
    return tuple(extra) + DEBUG_ROOTS
RSP, RIP_RA = 7, 16           # x86_64 DWARF register numbers: rsp, return address
MAX_SCAN_BYTES = 16 * 1024


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


@dataclass
class Frame:
    pc: int
    module: str = ""
    function: str = ""
    offset: int = 0
    build_id: str = ""
    method: str = "pc"        # pc | cfi | scan
    symbols_from: str = ""    # symtab | debug-file | dynsym | none

    def describe(self) -> str:
        where = f"{self.function}+{self.offset:#x}" if self.function else f"{self.pc:#x}"
        module = os.path.basename(self.module.replace(" (deleted)", "")) or "?"
        return f"{where} ({module})"

    def as_dict(self) -> dict:
        return {"pc": f"{self.pc:#x}", "function": self.function or None,
                "offset": self.offset, "module": self.module, "build_id": self.build_id or None,
                "method": self.method, "symbols": self.symbols_from or None}


@dataclass
class ElfInfo:
    build_id: str = ""
    loads: list = field(default_factory=list)        # (vaddr, offset, filesz)
    sym_addrs: list = field(default_factory=list)
    syms: list = field(default_factory=list)          # (addr, size, name)
    symbols_from: str = "none"
    fde_starts: list = field(default_factory=list)
    fdes: list = field(default_factory=list)          # (start, end, fde)
    path: str = ""
    # .eh_frame_hdr's sorted table: look an FDE up without parsing them all.
    hdr_locs: list = field(default_factory=list)
    hdr_fde_offsets: list = field(default_factory=list)   # offsets into .eh_frame
    cfi: object = None                                     # pyelftools CallFrameInfo
    _fde_cache: dict = field(default_factory=dict)

    def vaddr_of_offset(self, file_offset: int) -> Optional[int]:
        for vaddr, offset, filesz in self.loads:
            if offset <= file_offset < offset + filesz:
                return file_offset - offset + vaddr
        return None

    def symbol(self, vaddr: int) -> tuple[str, int]:
        """(name, offset) of the function containing vaddr, or ('', 0)."""
        i = bisect.bisect_right(self.sym_addrs, vaddr) - 1
        # Look back a little: symbols can nest or share a start address.
        for addr, size, name in reversed(self.syms[max(0, i - 8):i + 1]):
            if addr <= vaddr and (vaddr < addr + size or size == 0 and addr == self.syms[i][0]):
                return name, vaddr - addr
        return "", 0

    def fde_for(self, vaddr: int):
        if self.hdr_locs:
            i = bisect.bisect_right(self.hdr_locs, vaddr) - 1
            if i < 0:
                return None
            fde = self._fde_cache.get(i)
            if fde is None:
                try:
                    fde = self.cfi._parse_entry_at(self.hdr_fde_offsets[i])
                except Exception:
                    return None
                self._fde_cache[i] = fde
            start = fde.header["initial_location"]
            return fde if start <= vaddr < start + fde.header["address_range"] else None
        i = bisect.bisect_right(self.fde_starts, vaddr) - 1
        if i >= 0:
            start, end, fde = self.fdes[i]
            if start <= vaddr < end:
                return fde
        return None


def _index_eh_frame_hdr(elf, info: ElfInfo) -> bool:
    """Read .eh_frame_hdr's binary-search table (initial location -> FDE),
    so that one lookup parses one FDE instead of a whole large .eh_frame
    (seconds for a big binary such as python3). False if it is absent or in
    an encoding we do not read; the caller then parses everything."""
    hdr = elf.get_section_by_name(".eh_frame_hdr")
    eh = elf.get_section_by_name(".eh_frame")
    if hdr is None or eh is None or not elf.has_dwarf_info():
        return False
    data = hdr.data()
    # version 1; eh_frame_ptr: pcrel|sdata4; fde_count: udata4; table: datarel|sdata4
    if len(data) < 12 or data[0] != 1 or data[1] != 0x1B or data[2] != 0x03 or data[3] != 0x3B:
        return False
    count = int.from_bytes(data[8:12], "little")
    table = memoryview(data)[12:12 + 8 * count]
    if len(table) != 8 * count:
        return False
    pairs = table.cast("i")
    base, eh_addr = hdr["sh_addr"], eh["sh_addr"]
    info.hdr_locs = [base + pairs[2 * i] for i in range(count)]
    info.hdr_fde_offsets = [base + pairs[2 * i + 1] - eh_addr for i in range(count)]
    try:
        # pyelftools parses one entry at an offset with _parse_entry_at (not
        # public API; without it we fall back to parsing everything).
        from elftools.dwarf.callframe import CallFrameInfo
        dwarf = elf.get_dwarf_info()
        info.cfi = CallFrameInfo(stream=dwarf.eh_frame_sec.stream, size=dwarf.eh_frame_sec.size,
                                 address=dwarf.eh_frame_sec.address,
                                 base_structs=dwarf.structs, for_eh_frame=True)
    except Exception:
        info.cfi = None
    if not hasattr(info.cfi, "_parse_entry_at"):
        info.hdr_locs, info.hdr_fde_offsets = [], []
        return False
    return True


def _read_symbols(elf) -> list:
    out = []
    for name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(name)
        if section is None or not hasattr(section, "iter_symbols"):
            continue
        for sym in section.iter_symbols():
            if sym["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and sym["st_value"] and sym.name:
                out.append((sym["st_value"], sym["st_size"], sym.name))
        if out:
            return sorted(set(out)), "symtab" if name == ".symtab" else "dynsym"
    return [], "none"


def _build_id(elf) -> str:
    for section in elf.iter_sections():
        if section["sh_type"] == "SHT_NOTE":
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
    return ""


_CACHE: dict = {}


def load_elf(path: str, debug_roots=None) -> Optional[ElfInfo]:
    """Parse one binary once (keyed by device, inode and mtime)."""
    if ELFFile is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        return _CACHE[key]
    info = None
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            info = ElfInfo(path=path, build_id=_build_id(elf))
            info.loads = [(seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                          for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            syms, source = _read_symbols(elf)
            if source != "symtab" and info.build_id:
                # Stripped: distros ship the symbol table in a debug file named
                # by build-id (the -dbgsym / -debuginfo packages).
                debug = _debug_file_symbols(info.build_id, debug_roots or debug_search_path())
                if debug:
                    syms, source = debug, "debug-file"
            info.syms, info.symbols_from = syms, source
            info.sym_addrs = [s[0] for s in syms]
            if not _index_eh_frame_hdr(elf, info) and elf.has_dwarf_info():
                dwarf = elf.get_dwarf_info()
                if dwarf.has_EH_CFI():
                    ranges = []
                    for entry in dwarf.EH_CFI_entries():
                        if isinstance(entry, FDE):
                            start = entry.header["initial_location"]
                            ranges.append((start, start + entry.header["address_range"], entry))
                    ranges.sort(key=lambda r: r[0])
                    info.fdes = ranges
                    info.fde_starts = [r[0] for r in ranges]
    except (OSError, ELFError, ValueError, KeyError, AttributeError, TypeError):
        info = info if info and info.loads else None
    _CACHE[key] = info
    return info


def _debug_file_symbols(build_id: str, roots) -> list:
    for root in roots:
        path = os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
        try:
            with open(path, "rb") as f:
                syms, source = _read_symbols(ELFFile(f))
                if source == "symtab":
                    return syms
        except (OSError, ELFError, ValueError):
            continue
    return []


class ProcessImage:
    """One process's address space, as seen through /proc."""

    def __init__(self, pid: int, proc: str = procfs.PROC, debug_roots=None):
        self.pid = pid
        self.proc = proc
        self.debug_roots = debug_roots
        self.maps = parse_maps(procfs.read_text(f"{proc}/{pid}/maps") or "")
        self.starts = [m.start for m in self.maps]
        self._mem = None

    def mapping(self, addr: int) -> Optional[Mapping]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.maps[i].start <= addr < self.maps[i].end:
            return self.maps[i]
        return None

    def _elf_path(self, m: Mapping) -> str:
        # map_files reaches the very file mapped, deleted or in a container.
        via_map_files = f"{self.proc}/{self.pid}/map_files/{m.start:x}-{m.end:x}"
        if os.path.exists(via_map_files):
            return via_map_files
        return f"{self.proc}/{self.pid}/root{m.path.replace(' (deleted)', '')}"

    def elf_for(self, m: Mapping) -> Optional[ElfInfo]:
        if not m.path.startswith("/"):
            return None
        return load_elf(self._elf_path(m), self.debug_roots)

    def frame(self, pc: int, method: str) -> Frame:
        """Symbolize pc. A caller's frame holds a return address, which can
        lie just past the end of a function whose last instruction is the
        call: such frames are looked up at pc - 1."""
        frame = Frame(pc=pc, method=method)
        lookup = pc if method == "pc" else pc - 1
        m = self.mapping(pc)
        if m is None:
            return frame
        frame.module = m.path
        elf = self.elf_for(m)
        if elf is None:
            return frame
        frame.build_id = elf.build_id
        frame.symbols_from = elf.symbols_from
        vaddr = elf.vaddr_of_offset(lookup - m.start + m.offset)
        if vaddr is not None:
            frame.function, frame.offset = elf.symbol(vaddr)
            frame.offset += pc - lookup
        return frame

    def read_word(self, addr: int) -> Optional[int]:
        try:
            if self._mem is None:
                self._mem = open(f"{self.proc}/{self.pid}/mem", "rb", buffering=0)
            self._mem.seek(addr)
            data = self._mem.read(8)
        except (OSError, ValueError, OverflowError):
            return None
        return int.from_bytes(data, "little") if len(data) == 8 else None

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

    # ------------------------------------------------------------ unwinding

    def _cfi_step(self, pc: int, sp: int, is_first: bool):
        """(return address, caller's sp) from the CFI rules at pc, or None
        when the rules need a register we do not have."""
        m = self.mapping(pc)
        elf = self.elf_for(m) if m else None
        if elf is None:
            return None
        # A return address points after the call; look up the call itself.
        lookup = pc if is_first else pc - 1
        vaddr = elf.vaddr_of_offset(lookup - m.start + m.offset)
        fde = elf.fde_for(vaddr) if vaddr is not None else None
        if fde is None:
            return None
        try:
            table = fde.get_decoded().table
        except Exception:       # pyelftools raises assorted errors on odd CFI
            return None
        row = None
        for candidate in table:
            if candidate["pc"] <= vaddr:
                row = candidate
            else:
                break
        if row is None or "cfa" not in row:
            return None
        cfa_rule = row["cfa"]
        if cfa_rule.expr is not None or cfa_rule.reg != RSP:
            return None
        cfa = sp + cfa_rule.offset
        ra_rule = row.get(RIP_RA)
        if ra_rule is None or ra_rule.type != "OFFSET":
            return None
        ra = self.read_word(cfa + ra_rule.arg)
        if ra is None:
            return None
        return ra, cfa

    def _follows_call(self, addr: int) -> bool:
        m = self.mapping(addr)
        if m is None or "x" not in m.perms or not m.path.startswith("/"):
            return False
        before = self.read(addr - 7, 7)
        if len(before) != 7:
            return False
        if before[2] == 0xE8:                       # call rel32
            return True
        for length in (2, 3, 6, 7):                 # call *reg / *mem (ff /2)
            if before[7 - length] == 0xFF and (before[8 - length] >> 3) & 7 == 2:
                return True
        if before[1] == 0x41 and before[2] == 0xFF:  # REX.B call *%r8-15 variants
            return True
        return False

    def unwind(self, pc: int, sp: int, max_frames: int = 16) -> list[Frame]:
        frames = [self.frame(pc, "pc")]
        is_first = True
        while len(frames) < max_frames:
            step = self._cfi_step(pc, sp, is_first)
            if step is None:
                break
            ra, cfa = step
            if ra == 0 or self.mapping(ra) is None:
                return frames
            frames.append(self.frame(ra, "cfi"))
            pc, sp, is_first = ra, cfa, False
        # Scan the rest of the stack for return addresses.
        stack = self.read(sp, MAX_SCAN_BYTES)
        for i in range(0, len(stack) - 7, 8):
            if len(frames) >= max_frames:
                break
            word = int.from_bytes(stack[i:i + 8], "little")
            if word and self._follows_call(word):
                frames.append(self.frame(word, "scan"))
        return frames


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


def user_stack(pid: int, tid: int, proc: str = procfs.PROC, max_frames: int = 16,
               debug_roots=None) -> list[Frame]:
    """The stack of a thread that is in a system call (empty if it is not)."""
    text = procfs.read_text(f"{proc}/{pid}/task/{tid}/syscall")
    if not text:
        return []
    sp, pc = parse_syscall_regs(text)
    if sp is None or pc is None:
        return []
    image = ProcessImage(pid, proc, debug_roots)
    try:
        return image.unwind(pc, sp, max_frames)
    finally:
        image.close()
