"""What the symbolizer needs from one ELF file, read with suspicion.

The files read here are whatever a process mapped executable: any local user
can make the root tracer read a file they crafted. So every read is bounded
before it happens (file size, number of sections, section sizes, symbol and
FDE counts, the length of one CFI entry), compressed or NOBITS sections are
never expanded, the parse checks a deadline between steps, and any exception
from pyelftools or from our own reading becomes "no symbols for this module"
with a counted reason: a partial diagnosis, never an error.

pyelftools is used for the ELF header, section and program headers and for
CFI entries; the bulky tables (symbols, .eh_frame_hdr's search table, notes)
are read here with struct from bytes whose size was checked first, because
pyelftools' per-entry parsing is slow and its section iterators trust the
counts the file states.

Parsed modules are kept in an LRU cache bounded in bytes, each entry counted
at what it holds (its objects' sizes, summed; checked against tracemalloc by
the unit tests), so a long-running tracer does not grow with every binary it
has ever seen. A module keeps no parsed CFI: the FDEs a stack needs are
parsed on demand and only their decoded tables are kept, in one LRU shared
by every module (FDE_CACHE_BYTES). pyelftools builds a DWARFStructs (about
125 KB and 2 ms) for every CIE and FDE it parses; those are shared here, one
per byte order, DWARF format and address size (see _shared_structs).
"""

from __future__ import annotations

import bisect
import io
import itertools
import os
import stat as stat_mod
import struct
import sys
import threading
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from closewait_trace import knobs

try:
    from elftools.dwarf import callframe as _callframe
    from elftools.dwarf.callframe import CIE, FDE, CallFrameInfo
    from elftools.dwarf.structs import DWARFStructs
    from elftools.elf.elffile import ELFFile
except ImportError:  # pragma: no cover - pyelftools is a dependency
    ELFFile = None

DEBUG_ROOTS = ("/usr/lib/debug",)


@dataclass(frozen=True)
class Limits:
    """The most the index reads from one file. Real binaries are far below
    each (python3.11: 40 sections, 2,200 dynamic symbols, 10,000 FDEs, a
    410 KB .eh_frame; libc: 2,900 symbols)."""
    file_bytes: int = 4 << 30          # larger files are not parsed at all
    sections: int = 4096
    segments: int = 256
    section_bytes: int = 32 << 20      # any one section we read into memory
    name_table_bytes: int = 1 << 20    # the section name table
    symbols_scanned: int = 2_000_000   # symbol table entries looked at
    functions_kept: int = 250_000      # function symbols kept per module
    fdes: int = 2_000_000              # .eh_frame_hdr table entries / FDEs walked
    # One CIE or FDE. The largest in 400 system libraries is 3,984 bytes;
    # decoding a 16 KiB one takes pyelftools ~0.5 s and ~3.5 MB.
    cfi_entry_bytes: int = 16 << 10
    note_bytes: int = 64 << 10         # a note section searched for the build-id
    name_bytes: int = 1024             # one symbol or section name
    parse_seconds: float = 1.0         # one module's parse, whatever the batch budget


LIMITS = Limits()
CACHE_BYTES = 64 << 20
# Decoded unwind tables kept for reuse, all modules together.
FDE_CACHE_BYTES = 2 << 20
# A file whose parse ran past parse_seconds is tried again after this long.
SLOW_RETRY_SECONDS = 600.0

SHT_SYMTAB, SHT_NOTE, SHT_NOBITS, SHT_DYNSYM = 2, 7, 8, 11
SHF_COMPRESSED = 0x800
STT_FUNC, STT_GNU_IFUNC = 2, 10
PT_LOAD = 1
NT_GNU_BUILD_ID = 3

# Why a module has no symbols, counted per reason for the whole run (shown
# in the summary, and logged with CLOSEWAIT_TRACE_DEBUG=1).
problems: Counter = Counter()


class Refused(Exception):
    """The file breaks one of our limits or is not what it claims to be: its
    module gets no symbols. The message is the counted reason."""


class OutOfTime(Exception):
    """The deadline passed in the middle of a parse. `partial` is the index
    built so far when only the unwind tables were missing (symbols done)."""

    def __init__(self, partial: Optional["ModuleIndex"] = None):
        super().__init__()
        self.partial = partial


def debug_search_path() -> tuple:
    """Where debug files are looked up by build-id: CLOSEWAIT_TRACE_DEBUGINFO
    (colon-separated directories) first, then the distro's /usr/lib/debug."""
    extra = [d for d in os.environ.get("CLOSEWAIT_TRACE_DEBUGINFO", "").split(":") if d]
    return tuple(extra) + DEBUG_ROOTS


def note_problem(reason: str, path: str) -> None:
    problems[reason] += 1
    if os.environ.get("CLOSEWAIT_TRACE_DEBUG"):
        # ascii(): the path comes from a user's process; never raw to a terminal.
        print(f"closewait-trace: symbolizer: {ascii(path)}: {reason}", file=sys.stderr)


# ------------------------------------------------------------------ the index

_serials = itertools.count()


@dataclass
class ModuleIndex:
    """Symbols and unwind tables of one ELF file (kept compact: arrays, and
    the raw .eh_frame bytes, parsed one FDE at a time on demand; the decoded
    tables live in FDE_CACHE, not here, so this entry never grows after it
    is cached)."""
    path: str = ""
    build_id: str = ""
    loads: list = field(default_factory=list)          # (vaddr, offset, filesz)
    symbols_from: str = "none"                         # symtab | debug-file | dynsym | none
    sym_addrs: array = field(default_factory=lambda: array("Q"))
    sym_sizes: array = field(default_factory=lambda: array("Q"))
    sym_names: list = field(default_factory=list)
    # FDE lookup: initial locations (sorted) and the FDE's offset in .eh_frame.
    fde_locs: array = field(default_factory=lambda: array("q"))
    fde_offsets: array = field(default_factory=lambda: array("q"))
    eh_frame: bytes = field(default=b"", repr=False)
    eh_frame_addr: int = 0
    little_endian: bool = True
    address_size: int = 8
    # This module's key in FDE_CACHE (never reused, unlike id()).
    serial: int = field(default_factory=lambda: next(_serials), repr=False)

    def vaddr_of_offset(self, file_offset: int) -> Optional[int]:
        for vaddr, offset, filesz in self.loads:
            if offset <= file_offset < offset + filesz:
                return file_offset - offset + vaddr
        return None

    def symbol(self, vaddr: int) -> tuple[str, int]:
        """(name, offset) of the function containing vaddr, or ('', 0)."""
        i = bisect.bisect_right(self.sym_addrs, vaddr) - 1
        if i < 0:
            return "", 0
        # Look back a little: symbols can nest or share a start address.
        for j in range(i, max(-1, i - 9), -1):
            addr, size = self.sym_addrs[j], self.sym_sizes[j]
            if addr <= vaddr and (vaddr < addr + size or size == 0 and addr == self.sym_addrs[i]):
                return self.sym_names[j], vaddr - addr
        return "", 0

    def fde_for(self, vaddr: int) -> Optional["UnwindEntry"]:
        """The FDE covering vaddr (an UnwindEntry: .header's initial_location
        and address_range, .get_decoded().table as pyelftools decodes it), or
        None (also when it is malformed)."""
        i = bisect.bisect_right(self.fde_locs, vaddr) - 1
        if i < 0:
            return None
        key = (self.serial, i)
        entry = FDE_CACHE.get(key)
        if entry is None:
            entry = self._unwind_entry(i)
            FDE_CACHE.put(key, entry)
        if entry is MALFORMED:
            return None
        start = entry.header["initial_location"]
        return entry if start <= vaddr < start + entry.header["address_range"] else None

    def _unwind_entry(self, i: int) -> "UnwindEntry":
        """Parse and decode FDE i, keeping only what unwinding reads: its
        range and decoded table (not pyelftools' FDE, CIE and instructions)."""
        try:
            fde = parse_fde(self.eh_frame, self.fde_offsets[i], self.eh_frame_addr,
                            self.little_endian, self.address_size)
        except Refused as e:
            note_problem(f"bad FDE: {e}", self.path)
            return MALFORMED
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:   # pyelftools raises assorted errors on odd CFI
            note_problem(f"malformed FDE ({type(e).__name__})", self.path)
            return MALFORMED
        header = {k: fde.header[k] for k in ("length", "initial_location", "address_range")}
        try:
            return UnwindEntry(header, fde.get_decoded(), "")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:   # decoded by the caller before: it sees the error then
            return UnwindEntry(header, None, f"CFI not decoded ({type(e).__name__})")

    def size_estimate(self) -> int:
        """Bytes this entry holds: the sizes of its objects, summed (within
        a few percent of what tracemalloc sees: tests/bounds/test_elfindex_memory.py).
        It is the same for as long as the entry is cached."""
        g = sys.getsizeof
        return (g(self) + MODULE_OVERHEAD + g(self.path) + g(self.build_id)
                + g(self.loads) + sum(g(t) + sum(map(g, t)) for t in self.loads)
                + g(self.sym_addrs) + g(self.sym_sizes) + g(self.sym_names)
                + sum(map(g, self.sym_names))
                + g(self.fde_locs) + g(self.fde_offsets) + g(self.eh_frame))


# The instance's attribute dict (not in getsizeof of a dataclass instance).
MODULE_OVERHEAD = 400


class UnwindEntry:
    """One FDE as unwinding uses it: .header (initial_location,
    address_range, length) and .get_decoded(), pyelftools'
    DecodedCallFrameTable (raises if the FDE's CFI could not be decoded)."""

    __slots__ = ("header", "_decoded", "_error")

    def __init__(self, header: dict, decoded, error: str):
        self.header, self._decoded, self._error = header, decoded, error

    def get_decoded(self):
        if self._decoded is None:
            raise ValueError(self._error)
        return self._decoded

    def size_estimate(self) -> int:
        """Bytes held: this object, its header, and the decoded table's rows
        and rules (each rule object counted once: rows share them)."""
        g = sys.getsizeof
        n = g(self) + g(self.header) + sum(map(g, self.header.values())) + g(self._error)
        dec = self._decoded
        if dec is None:
            return n
        n += g(dec) + g(dec.table) + g(dec.reg_order)
        seen = set()
        for row in dec.table:
            n += g(row)
            for value in row.values():
                if id(value) in seen:
                    continue
                seen.add(id(value))
                if isinstance(value, int):
                    n += g(value)
                else:                 # a CFARule or RegisterRule: object + its values
                    n += RULE_BYTES
                    extra = getattr(value, "expr", None) or getattr(value, "arg", None)
                    if isinstance(extra, (list, bytes)):
                        n += g(extra) + 32 * len(extra)
        return n


# A CFARule or RegisterRule object with its (inline) attribute values, as
# tracemalloc sees it on CPython 3.11.
RULE_BYTES = 112
MALFORMED = UnwindEntry({}, None, "malformed FDE")


class FDECache:
    """Decoded unwind tables by (module serial, FDE index), least recently
    used evicted first past max_bytes (each counted at its size_estimate).
    Shared by every module, so the tables a module's stacks needed do not
    live (and count) as long as the module does."""

    def __init__(self, max_bytes: int = FDE_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict = OrderedDict()     # key -> (entry, size)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key) -> Optional[UnwindEntry]:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key, entry: UnwindEntry) -> None:
        size = 64 if entry is MALFORMED else entry.size_estimate()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return                # used once, not kept
            self._entries[key] = (entry, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


FDE_CACHE = FDECache()


_structs_cache: dict = {}


def _shared_structs(little_endian=True, dwarf_format=32, address_size=4, dwarf_version=2):
    """pyelftools' CallFrameInfo builds a new DWARFStructs for every entry
    it parses (about 125 KB and 2 ms each), and each parsed CIE and FDE
    keeps its own. They are immutable once built: one per combination
    (at most a handful; anything unusual is built as before, not kept)."""
    key = (bool(little_endian), dwarf_format, address_size, dwarf_version)
    hit = _structs_cache.get(key)
    if hit is None:
        hit = DWARFStructs(little_endian=little_endian, dwarf_format=dwarf_format,
                           address_size=address_size, dwarf_version=dwarf_version)
        if dwarf_format in (32, 64) and address_size in (4, 8) and dwarf_version in (2, 3, 4, 5):
            _structs_cache[key] = hit
    return hit


if ELFFile is not None:
    # CallFrameInfo._parse_entry_at looks DWARFStructs up in its module.
    _callframe.DWARFStructs = _shared_structs


def parse_fde(eh_frame: bytes, offset: int, address: int, little_endian: bool,
              address_size: int):
    """Parse the FDE at offset, after checking by hand what pyelftools would
    follow blindly: lengths inside the section, and a CIE pointer that lands
    on a real CIE (not on a zero terminator, not on this FDE itself), so its
    parse cannot recurse or run off the end."""
    _entry_end(eh_frame, offset, little_endian)
    if _u32(eh_frame, offset + 4, little_endian) == 0:
        raise Refused("a CIE where an FDE was expected")
    cie = offset + 4 - _u32(eh_frame, offset + 4, little_endian)
    if cie < 0 or cie == offset:
        raise Refused("FDE's CIE pointer is out of range")
    _entry_end(eh_frame, cie, little_endian)
    if _u32(eh_frame, cie + 4, little_endian) != 0:
        raise Refused("FDE's CIE pointer does not land on a CIE")
    # pyelftools handles CIE augmentations starting with 'z' (and armcc);
    # any other string trips an assert inside it: refuse it here instead.
    aug = eh_frame[cie + 9:cie + 9 + 16].split(b"\0", 1)[0]
    if aug and not aug.startswith(b"z"):
        raise Refused("CIE augmentation we do not read")
    # Both entries were checked to end inside the section; BytesIO shares
    # the bytes object's buffer rather than copying it.
    structs = _shared_structs(little_endian=little_endian, dwarf_format=32,
                              address_size=address_size)
    cfi = CallFrameInfo(stream=io.BytesIO(eh_frame), size=len(eh_frame), address=address,
                        base_structs=structs, for_eh_frame=True)
    fde = cfi._parse_entry_at(offset)      # one entry, not the whole section
    if not isinstance(fde, FDE) or not isinstance(fde.cie, CIE):
        raise Refused("not an FDE")
    return fde


def _u32(data: bytes, offset: int, little_endian: bool) -> int:
    if offset < 0 or offset + 4 > len(data):
        raise Refused("CFI entry out of range")
    return struct.unpack_from("<I" if little_endian else ">I", data, offset)[0]


def _entry_end(eh_frame: bytes, offset: int, little_endian: bool) -> int:
    """End of the CIE/FDE at offset, checked: non-zero, 32-bit, inside the
    section and no longer than one real entry can be."""
    length = _u32(eh_frame, offset, little_endian)
    if length == 0:
        raise Refused("CFI entry is a zero terminator")
    if length == 0xFFFFFFFF or length > LIMITS.cfi_entry_bytes:
        raise Refused("CFI entry too long")
    end = offset + 4 + length
    if end > len(eh_frame):
        raise Refused("CFI entry runs past the section")
    return end


# ------------------------------------------------------------------ parsing

def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class _Reader:
    """Bounded reads from one open file, with the deadline checked."""

    def __init__(self, f, size: int, deadline: float, limits: Limits):
        self.f, self.size, self.deadline, self.limits = f, size, deadline, limits

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime()

    def read(self, offset: int, length: int, what: str) -> bytes:
        if length > self.limits.section_bytes:
            raise Refused(f"{what} larger than {_size(self.limits.section_bytes)}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Refused(f"{what} runs past the end of the file")
        self.f.seek(offset)
        data = self.f.read(length)
        if len(data) != length:
            raise Refused(f"{what} truncated")
        return data


@dataclass
class _Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


def _sections(elf, r: _Reader) -> list[_Section]:
    """Every section header, after checking the count the file claims (a
    section 0 may claim 2^32 of them) against our limit and the file size."""
    count = elf.num_sections()
    entsize = elf["e_shentsize"]
    if count == 0:
        return []
    if count > r.limits.sections:
        raise Refused(f"more than {r.limits.sections} sections")
    if entsize < elf.structs.Elf_Shdr.sizeof() or elf["e_shoff"] + count * entsize > r.size:
        raise Refused("section header table outside the file")
    headers = []
    for i in range(count):
        if i % 256 == 0:
            r.check_time()
        headers.append(elf._get_section_header(i))
    strndx = elf.get_shstrndx()
    names = b""
    if 0 < strndx < count:
        h = headers[strndx]
        if h["sh_size"] > r.limits.name_table_bytes:
            raise Refused(f"section name table larger than {_size(r.limits.name_table_bytes)}")
        names = _plain_section_data(h, r, "section name table")
    out = []
    for i, h in enumerate(headers):
        out.append(_Section(i, _cstring(names, h["sh_name"], r.limits.name_bytes),
                            _num(h["sh_type"]), h["sh_flags"], h["sh_addr"], h["sh_offset"],
                            h["sh_size"], h["sh_link"], h["sh_entsize"]))
    return out


_SHT_NUM = {"SHT_SYMTAB": SHT_SYMTAB, "SHT_NOTE": SHT_NOTE, "SHT_NOBITS": SHT_NOBITS,
            "SHT_DYNSYM": SHT_DYNSYM}


def _num(sh_type) -> int:
    """pyelftools gives known section types as names."""
    return sh_type if isinstance(sh_type, int) else _SHT_NUM.get(sh_type, -1)


def _plain_section_data(h, r: _Reader, what: str) -> bytes:
    # Compressed sections are never expanded (a 1 MB zlib bomb claims GBs)
    # and NOBITS sections have no bytes in the file (pyelftools would
    # allocate sh_size zeros).
    if h["sh_flags"] & SHF_COMPRESSED:
        raise Refused(f"{what} is compressed")
    if _num(h["sh_type"]) == SHT_NOBITS:
        return b""
    return r.read(h["sh_offset"], h["sh_size"], what)


def _data(s: _Section, r: _Reader) -> bytes:
    return _plain_section_data({"sh_flags": s.flags, "sh_type": s.type,
                                "sh_offset": s.offset, "sh_size": s.size}, r, s.name or "section")


def _cstring(table: bytes, offset: int, cap: int) -> str:
    if offset >= len(table):
        return ""
    end = table.find(b"\0", offset, offset + cap)
    return table[offset:end if end >= 0 else offset + cap].decode("utf-8", "replace")


def _by_name(sections: list[_Section], name: str) -> Optional[_Section]:
    for s in sections:
        if s.name == name:
            return s
    return None


def _build_id(sections: list[_Section], r: _Reader, little_endian: bool) -> str:
    order = "<" if little_endian else ">"
    for s in sections:
        if s.type != SHT_NOTE or s.size > r.limits.note_bytes or s.flags & SHF_COMPRESSED:
            continue
        data = r.read(s.offset, s.size, "note section")
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from(order + "III", data, pos)
            name_at = pos + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            end = desc_at + (descsz + 3) // 4 * 4
            if end > len(data):
                break
            if ntype == NT_GNU_BUILD_ID and data[name_at:name_at + namesz].rstrip(b"\0") == b"GNU" \
                    and 0 < descsz <= 64:
                return data[desc_at:desc_at + descsz].hex()
            pos = end
    return ""


def _loads(elf, r: _Reader) -> list:
    count = elf.num_segments()
    if count > r.limits.segments:
        raise Refused(f"more than {r.limits.segments} program headers")
    if count and (elf["e_phentsize"] < elf.structs.Elf_Phdr.sizeof()
                  or elf["e_phoff"] + count * elf["e_phentsize"] > r.size):
        raise Refused("program header table outside the file")
    out = []
    for i in range(count):
        h = elf._get_segment_header(i)
        if h["p_type"] in ("PT_LOAD", PT_LOAD):
            out.append((h["p_vaddr"], h["p_offset"], h["p_filesz"]))
    return out


def _symbols(elf, sections: list[_Section], r: _Reader) -> tuple[list, str]:
    """Function symbols (addr, size, name), sorted, from .symtab, else .dynsym.
    The inner loop is the hot path of a cold parse (a large .symtab has
    hundreds of thousands of entries): struct unpacks only the fields used,
    names stay bytes until the survivors are known."""
    order = "<" if elf.little_endian else ">"
    if elf.elfclass == 64:     # st_name, st_info, (st_other, st_shndx), st_value, st_size
        fmt, entsize, fields = order + "IB3xQQ", 24, (0, 1, 2, 3)
    else:                      # st_name, st_value, st_size, st_info, (st_other, st_shndx)
        fmt, entsize, fields = order + "IIIB3x", 16, (0, 3, 1, 2)
    wanted = (STT_FUNC, STT_GNU_IFUNC)
    cap = r.limits.name_bytes
    for kind, label in ((SHT_SYMTAB, "symtab"), (SHT_DYNSYM, "dynsym")):
        table = next((s for s in sections if s.type == kind), None)
        if table is None or table.size == 0:
            continue
        if table.size // entsize > r.limits.symbols_scanned:
            raise Refused(f"more than {r.limits.symbols_scanned} symbols")
        if not 0 < table.link < len(sections):
            continue
        names = _data(sections[table.link], r)
        find = names.find
        out = []
        usable = table.size - table.size % entsize
        chunk = 4096 * entsize
        for start in range(0, usable, chunk):
            r.check_time()
            data = r.read(table.offset + start, min(chunk, usable - start), "symbol table")
            if fields == (0, 1, 2, 3):
                entries = struct.iter_unpack(fmt, data)
            else:
                entries = ((e[0], e[3], e[1], e[2]) for e in struct.iter_unpack(fmt, data))
            for name, info, value, size in entries:
                if value and name and info & 0xF in wanted:
                    end = find(b"\0", name, name + cap)
                    text = names[name:end if end >= 0 else name + cap]
                    if text:
                        out.append((value, size, text))
            if len(out) > 2 * r.limits.functions_kept:
                raise Refused(f"more than {r.limits.functions_kept} function symbols")
        if out:
            r.check_time()
            unique = set(out)
            del out                       # one copy at a time: this is the peak
            if len(unique) > r.limits.functions_kept:
                raise Refused(f"more than {r.limits.functions_kept} function symbols")
            ordered = sorted(unique)
            del unique
            r.check_time()
            return [(a, z, n.decode("utf-8", "replace")) for a, z, n in ordered], label
    return [], "none"


def _index_fdes(info: ModuleIndex, sections: list[_Section], r: _Reader) -> None:
    """The FDE search table: from .eh_frame_hdr when it is there in the
    encoding every toolchain writes, else by walking .eh_frame's entries
    (lengths only, bounded), parsing each FDE just for its address range."""
    eh = _by_name(sections, ".eh_frame")
    if eh is None or eh.size == 0:
        return
    info.eh_frame = _data(eh, r)
    info.eh_frame_addr = eh.addr
    hdr = _by_name(sections, ".eh_frame_hdr")
    data = _data(hdr, r) if hdr is not None else b""
    # version 1; eh_frame_ptr: pcrel|sdata4; fde_count: udata4; table: datarel|sdata4
    order = "<" if info.little_endian else ">"
    if len(data) >= 12 and data[:4] == bytes((1, 0x1B, 0x03, 0x3B)):
        count = struct.unpack_from(order + "I", data, 8)[0]
        if count > r.limits.fdes:
            raise Refused(f"more than {r.limits.fdes} FDEs")
        if 12 + 8 * count <= len(data):
            pairs = array("i", data[12:12 + 8 * count])
            if order == ">" and sys.byteorder == "little" or order == "<" and sys.byteorder == "big":
                pairs.byteswap()
            base, eh_addr = hdr.addr, eh.addr
            r.check_time()
            info.fde_locs = array("q", (base + x for x in pairs[0::2]))
            info.fde_offsets = array("q", (base + x - eh_addr for x in pairs[1::2]))
            return
    locs, offsets = array("q"), array("q")     # compact: up to 2,000,000 of them
    offset, walked, bad = 0, 0, ""
    while offset + 8 <= len(info.eh_frame):
        length = _u32(info.eh_frame, offset, info.little_endian)
        if length == 0:
            break                             # terminator
        if length == 0xFFFFFFFF or length > LIMITS.cfi_entry_bytes:
            raise Refused("CFI entry too long")
        walked += 1
        if walked > r.limits.fdes:
            raise Refused(f"more than {r.limits.fdes} FDEs")
        if walked % 256 == 0:
            r.check_time()
        if _u32(info.eh_frame, offset + 4, info.little_endian) != 0:    # an FDE
            try:
                fde = parse_fde(info.eh_frame, offset, eh.addr, info.little_endian,
                                info.address_size)
                locs.append(fde.header["initial_location"])
                offsets.append(offset)
            except Refused as e:
                bad = bad or str(e)           # one bad FDE: its function is not unwound
            except (KeyboardInterrupt, SystemExit, OutOfTime):
                raise
            except BaseException as e:
                bad = bad or f"malformed FDE ({type(e).__name__})"
        offset += 4 + length
    if bad:
        note_problem(f"FDEs skipped: {bad}", info.path)
    r.check_time()
    order = sorted(range(len(locs)), key=locs.__getitem__)
    info.fde_locs = array("q", (locs[i] for i in order))
    info.fde_offsets = array("q", (offsets[i] for i in order))


def _open_regular(path: str):
    """Open without blocking or following into anything but a regular file
    (a path under /proc/PID/root can be swapped for a FIFO or a device)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise Refused("not a regular file")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def parse(f, size: int, path: str, deadline: float, debug_roots=(),
          limits: Limits = LIMITS) -> ModuleIndex:
    """Index one open ELF file. Raises Refused, OutOfTime, or whatever
    pyelftools raises; the caller turns each into "no symbols"."""
    if size > limits.file_bytes:
        raise Refused(f"file larger than {_size(limits.file_bytes)}")
    r = _Reader(f, size, deadline, limits)
    elf = ELFFile(f)
    info = ModuleIndex(path=path, little_endian=elf.little_endian,
                       address_size=8 if elf.elfclass == 64 else 4)
    sections = _sections(elf, r)
    info.build_id = _build_id(sections, r, elf.little_endian)
    info.loads = _loads(elf, r)
    syms, source = _symbols(elf, sections, r)
    if source != "symtab" and info.build_id:
        # Stripped: distros ship the symbol table in a debug file named by
        # build-id (the -dbgsym / -debuginfo packages).
        debug = _debug_file_symbols(info.build_id, debug_roots, deadline, limits)
        if debug:
            syms, source = debug, "debug-file"
    info.symbols_from = source
    r.check_time()
    info.sym_addrs = array("Q", (s[0] for s in syms))
    info.sym_sizes = array("Q", (s[1] for s in syms))
    info.sym_names = [s[2] for s in syms]
    try:
        _index_fdes(info, sections, r)
    except OutOfTime:
        # Symbols are done; without the unwind table, stacks fall back to scanning.
        info.fde_locs, info.fde_offsets, info.eh_frame = array("q"), array("q"), b""
        raise OutOfTime(partial=info)
    return info


def _debug_file_symbols(build_id: str, roots, deadline: float, limits: Limits) -> list:
    for root in roots:
        path = os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
        try:
            f, st = _open_regular(path)
        except (OSError, Refused):
            continue
        with f:
            try:
                elf = ELFFile(f)
                r = _Reader(f, st.st_size, deadline, limits)
                syms, source = _symbols(elf, _sections(elf, r), r)
            except OutOfTime:
                raise
            except Exception as e:
                note_problem(f"debug file unreadable: {_reason(e)}", path)
                continue
            if source == "symtab":
                return syms
    return []


def _reason(e: BaseException) -> str:
    if isinstance(e, Refused):
        return str(e)
    return f"malformed ELF ({type(e).__name__})"


# ------------------------------------------------------------------ cache

class IndexCache:
    """Parsed modules by file identity, least recently used evicted first
    once the bytes they hold (ModuleIndex.size_estimate: their objects'
    sizes, summed) pass the cap. A module that could not be parsed
    is remembered too (small, with its reason), so a crafted file costs its
    parse once."""

    FAILED_BYTES = 256

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict = OrderedDict()    # key -> (index, reason, size, expires)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key):
        """(index or None, reason) if key is known, else None."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[3] is not None and time.monotonic() > hit[3]:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return hit[0], hit[1]

    def put(self, key, index: Optional[ModuleIndex], reason: str = "",
            retry_after: Optional[float] = None) -> None:
        """retry_after: seconds after which a failed module is tried again
        (a parse that ran out of time may have been slow only because the
        machine was busy)."""
        size = index.size_estimate() if index is not None else self.FAILED_BYTES
        self._drop(key)
        if size > self.max_bytes:
            return                    # used once, not kept
        expires = None if retry_after is None else time.monotonic() + retry_after
        self._entries[key] = (index, reason, size, expires)
        self.bytes += size
        while self.bytes > self.max_bytes and self._entries:
            _, (_, _, evicted, _) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def _drop(self, key) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[2]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
        FDE_CACHE.clear()


CACHE = IndexCache()


def load(path: str, deadline: Optional[float] = None, debug_roots=None,
         cache: Optional[IndexCache] = None,
         limits: Limits = LIMITS) -> tuple[Optional[ModuleIndex], str]:
    """(index, "") for the file at path, parsed once per file identity
    (device, inode, mtime, size); (None, reason) when it breaks a limit or is
    malformed (counted in `problems`), (None, "") when it is simply not an
    ELF file or cannot be opened.

    Raises OutOfTime when the caller's deadline passes first: the module is
    then not remembered, so a later batch with time left parses it."""
    if ELFFile is None:
        return None, ""
    cache = CACHE if cache is None else cache
    now = time.monotonic()
    batch_deadline = now + 3600 if deadline is None else deadline
    if now > batch_deadline:
        raise OutOfTime()
    try:
        f, st = _open_regular(path)
    except (OSError, Refused):
        return None, ""
    with f:
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        hit = cache.get(key)
        if hit is not None:
            return hit
        own_seconds = limits.parse_seconds * knobs.time_scale()
        own_deadline = min(batch_deadline, now + own_seconds)
        index, reason, retry_after = None, "", None
        try:
            index = parse(f, st.st_size, path, own_deadline,
                          debug_search_path() if debug_roots is None else debug_roots, limits)
        except OutOfTime as e:
            if own_deadline >= batch_deadline:
                raise                 # the batch ran out: try again next batch
            index = e.partial
            reason = f"parse took more than {own_seconds:g}s"
            if index is not None:
                reason = f"unwind table walk took more than {own_seconds:g}s"
            retry_after = SLOW_RETRY_SECONDS
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:    # AssertionError, RecursionError, MemoryError, ...
            reason = "" if _not_elf(e) else _reason(e)
        if reason:
            note_problem(reason, path)
        cache.put(key, index, reason, retry_after)
        return index, reason


def _not_elf(e: BaseException) -> bool:
    """A file without the ELF magic (a JIT's memfd, a data file mapped
    executable) is ordinary, not a problem to count."""
    return type(e).__name__ == "ELFError" and "Magic number" in str(e)


# ------------------------------------------------------------ named symbols

# Symbols looked up by name (a language runtime's anchors: CPython's
# _PyRuntime), per file identity: (loads, {name: vaddr}) or None. Small:
# a handful of names per file, a few hundred files at most.
_NAMED_CACHE: OrderedDict = OrderedDict()
NAMED_CACHE_ENTRIES = 256


def named_symbols(path: str, names: frozenset, deadline: float,
                  limits: Limits = LIMITS) -> Optional[tuple[list, dict]]:
    """(PT_LOAD segments as (vaddr, offset, filesz), {name: vaddr}) for the
    names (bytes) found in the file's .dynsym, else its .symtab, any symbol
    type; None when the file cannot be read or breaks a limit. Bounded as
    parse() is (sizes checked before reading, the deadline)."""
    if ELFFile is None:
        return None
    try:
        f, st = _open_regular(path)
    except (OSError, Refused):
        return None
    with f:
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, names)
        if key in _NAMED_CACHE:
            _NAMED_CACHE.move_to_end(key)
            return _NAMED_CACHE[key]
        try:
            if st.st_size > limits.file_bytes:
                raise Refused(f"file larger than {_size(limits.file_bytes)}")
            r = _Reader(f, st.st_size, deadline, limits)
            elf = ELFFile(f)
            found = (_loads(elf, r), _find_names(elf, _sections(elf, r), r, names))
        except OutOfTime:
            return None                   # not remembered: tried again with time
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:        # a crafted file: remembered as unreadable
            if not _not_elf(e):
                note_problem(_reason(e), path)
            found = None
        _NAMED_CACHE[key] = found
        while len(_NAMED_CACHE) > NAMED_CACHE_ENTRIES:
            _NAMED_CACHE.popitem(last=False)
        return found


def _find_names(elf, sections: list[_Section], r: _Reader, names: frozenset) -> dict:
    order = "<" if elf.little_endian else ">"
    if elf.elfclass == 64:
        fmt, entsize, value_at = order + "I4xQ8x", 24, 1
    else:
        fmt, entsize, value_at = order + "II8x", 16, 1
    longest = max(map(len, names), default=0) + 1
    for kind in (SHT_DYNSYM, SHT_SYMTAB):
        table = next((s for s in sections if s.type == kind), None)
        if table is None or table.size == 0 or not 0 < table.link < len(sections):
            continue
        if table.size // entsize > r.limits.symbols_scanned:
            raise Refused(f"more than {r.limits.symbols_scanned} symbols")
        strings = _data(sections[table.link], r)
        out: dict = {}
        usable = table.size - table.size % entsize
        chunk = 4096 * entsize
        for start in range(0, usable, chunk):
            r.check_time()
            data = r.read(table.offset + start, min(chunk, usable - start), "symbol table")
            for entry in struct.iter_unpack(fmt, data):
                name_at, value = entry[0], entry[value_at]
                if not value or not name_at:
                    continue
                end = strings.find(b"\0", name_at, name_at + longest)
                if end > name_at and strings[name_at:end] in names:
                    out.setdefault(strings[name_at:end].decode(), value)
        if out:
            return out
    return {}
