"""File and line of an address, from a binary's DWARF line table, for the few
frames that name a place (where a socket was read to its end).

The binaries are other people's, so this parses hostile input: only the
DWARF sections, each read under elfindex's limits (a section of at most 32
MiB; a compressed one expanded only up to that, and only when its header's
size agrees), the compilation unit found through .debug_aranges when the
file has it, one unit's line program decoded (at most MAX_PROGRAM_BYTES of
it), the deadline checked between steps. Anything odd gives no line, never
an error: the frame keeps its function name.

Sources: the file itself (Go binaries, C built with -g), or the debug file
named by its build-id (Debian's -dbgsym packages install them under
/usr/lib/debug/.build-id).
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections import OrderedDict
from typing import Optional

from closewait_trace.evidence import elfindex
from closewait_trace.evidence.elfindex import LIMITS, Limits, OutOfTime, Refused

try:
    from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DWARFInfo, DwarfConfig
    from elftools.elf.elffile import ELFFile
except ImportError:  # pragma: no cover - pyelftools is a dependency
    DWARFInfo = None

# The sections pyelftools needs to find a unit and decode its line program.
SECTIONS = (".debug_info", ".debug_abbrev", ".debug_line", ".debug_line_str", ".debug_str",
            ".debug_aranges", ".debug_str_offsets", ".debug_addr", ".debug_ranges",
            ".debug_rnglists")
ELFCOMPRESS_ZLIB = 1
# One unit's line program, at most: the largest in Debian's libc6-dbg is
# under 200 KB; decoding 1 MB in pyelftools takes about a second.
MAX_PROGRAM_BYTES = 1 << 20
# Units walked when the file has no .debug_aranges (Go's have none).
MAX_UNITS = 4096
# Parsed files kept (their sections' bytes): a handful, since only the
# frames that name a place are looked up.
CACHE_FILES = 4
SECONDS = 1.0

_cache: OrderedDict = OrderedDict()    # (dev, ino, size, mtime) -> DWARFInfo or None


def _section_bytes(s, r: "elfindex._Reader", little_endian: bool, limits: Limits) -> bytes:
    raw = r.read(s.offset, s.size, s.name)
    if not s.flags & elfindex.SHF_COMPRESSED:
        return raw
    # Elf64_Chdr: type, reserved, uncompressed size, alignment.
    if len(raw) < 24:
        raise Refused(f"{s.name}: compression header truncated")
    ch_type, _reserved, ch_size = struct.unpack_from("<IIQ" if little_endian else ">IIQ", raw)
    if ch_type != ELFCOMPRESS_ZLIB:
        raise Refused(f"{s.name}: unknown compression {ch_type}")
    if ch_size > limits.section_bytes:
        raise Refused(f"{s.name} expands past {limits.section_bytes >> 20} MiB")
    out = zlib.decompressobj().decompress(raw[24:], limits.section_bytes + 1)
    if len(out) != ch_size:
        raise Refused(f"{s.name}: expands to another size than it says")
    return out


def _dwarf_of(f, size: int, deadline: float, limits: Limits):
    """A DWARFInfo over the DWARF sections' bytes (bounded), or None when
    the file has no line table."""
    if size > limits.file_bytes:
        raise Refused("file too large")
    r = elfindex._Reader(f, size, deadline, limits)
    elf = ELFFile(f)
    found = {s.name: s for s in elfindex._sections(elf, r) if s.name in SECTIONS}
    if ".debug_line" not in found or ".debug_info" not in found:
        return None
    descriptors = {}
    for name, s in found.items():
        r.check_time()
        if s.type == elfindex.SHT_NOBITS:
            continue
        data = _section_bytes(s, r, elf.little_endian, limits)
        descriptors[name] = DebugSectionDescriptor(stream=io.BytesIO(data), name=name,
                                                   global_offset=s.offset, size=len(data),
                                                   address=s.addr)
    if ".debug_line" not in descriptors or ".debug_info" not in descriptors:
        return None
    get = descriptors.get
    return DWARFInfo(
        config=DwarfConfig(little_endian=elf.little_endian,
                           default_address_size=8 if elf.elfclass == 64 else 4,
                           machine_arch=elf.get_machine_arch()),
        debug_info_sec=get(".debug_info"), debug_aranges_sec=get(".debug_aranges"),
        debug_abbrev_sec=get(".debug_abbrev"), debug_frame_sec=None, eh_frame_sec=None,
        debug_str_sec=get(".debug_str"), debug_loc_sec=None,
        debug_ranges_sec=get(".debug_ranges"), debug_line_sec=get(".debug_line"),
        debug_pubtypes_sec=None, debug_pubnames_sec=None, debug_addr_sec=get(".debug_addr"),
        debug_str_offsets_sec=get(".debug_str_offsets"),
        debug_line_str_sec=get(".debug_line_str"), debug_loclists_sec=None,
        debug_rnglists_sec=get(".debug_rnglists"), debug_sup_sec=None,
        gnu_debugaltlink_sec=None)


def _open_dwarf(path: str, deadline: float, limits: Limits):
    f, st = elfindex._open_regular(path)
    with f:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        dwarf = _dwarf_of(f, st.st_size, deadline, limits)
    _cache[key] = dwarf
    while len(_cache) > CACHE_FILES:
        _cache.popitem(last=False)
    return dwarf


def _unit_offsets(dwarf, vaddr: int, deadline: float):
    """Offsets of the units that may hold vaddr: the one .debug_aranges
    names, else every unit (bounded)."""
    try:
        aranges = dwarf.get_aranges()
    except Exception:
        aranges = None
    if aranges is not None:
        offset = aranges.cu_offset_at_addr(vaddr)
        return [offset] if offset is not None else []
    return None


def _line_in_unit(dwarf, cu, vaddr: int, deadline: float) -> Optional[tuple[str, int]]:
    program = dwarf.line_program_for_CU(cu)
    if program is None:
        return None
    header = program.header
    if program.program_end_offset - program.program_start_offset > MAX_PROGRAM_BYTES:
        raise Refused("line program too large")
    best = None
    previous = None
    for entry in program.get_entries():
        state = entry.state
        if state is None:
            continue
        if previous is not None and not previous.end_sequence \
                and previous.address <= vaddr < state.address:
            best = previous
            break
        previous = None if state.end_sequence else state
    if best is None:
        return None
    if time.monotonic() > deadline:
        raise OutOfTime()
    files = header.file_entry
    index = best.file - (0 if header.version >= 5 else 1)
    if not 0 <= index < len(files):
        return None
    name = files[index].name
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return str(name)[:elfindex.LIMITS.name_bytes], int(best.line)


def line_of(path: str, vaddr: int, deadline: Optional[float] = None, build_id: str = "",
            debug_roots=None, limits: Limits = LIMITS) -> Optional[tuple[str, int]]:
    """(file, line) of vaddr (an address in the file's own terms, as
    ModuleIndex.vaddr_of_offset gives), from the file's line table or its
    debug file's; None when neither has one or it is refused."""
    if DWARFInfo is None:
        return None
    deadline = deadline if deadline is not None else time.monotonic() + SECONDS
    candidates = [path]
    if build_id:
        roots = elfindex.debug_search_path() if debug_roots is None else debug_roots
        candidates += [os.path.join(root, ".build-id", build_id[:2], build_id[2:] + ".debug")
                       for root in roots]
    for candidate in candidates:
        try:
            dwarf = _open_dwarf(candidate, deadline, limits)
            if dwarf is None:
                continue
            offsets = _unit_offsets(dwarf, vaddr, deadline)
            if offsets is None:
                units = []
                for i, cu in enumerate(dwarf.iter_CUs()):
                    if i >= MAX_UNITS or time.monotonic() > deadline:
                        break
                    units.append(cu)
            else:
                units = [dwarf.get_CU_at(o) for o in offsets]
            for cu in units:
                if time.monotonic() > deadline:
                    raise OutOfTime()
                found = _line_in_unit(dwarf, cu, vaddr, deadline)
                if found is not None:
                    return found
        except FileNotFoundError:
            continue
        except OutOfTime:
            elfindex.note_problem("no line: time budget spent", candidate)
            return None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Refused as e:
            elfindex.note_problem(f"no line: {e}", candidate)
        except Exception as e:      # pyelftools raises assorted errors on odd DWARF
            if isinstance(e, OSError) and candidate != path:
                continue
            elfindex.note_problem(f"no line: malformed DWARF ({type(e).__name__})", candidate)
    return None
