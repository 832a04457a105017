"""File and line of an address, from a binary's DWARF line table, for the few
frames that name a place (where a socket was read to its end).

The binaries are other people's, so this parses hostile input, and
pyelftools parses whatever it is given in full: so every size is checked
before pyelftools sees it. Only the DWARF sections a line lookup needs are
read, each under elfindex's limits (a section of at most 32 MiB; a
compressed one expanded only up to that, and only when its header's size
agrees), all of them together at most MAX_DWARF_BYTES; .debug_aranges is
used only up to MAX_ARANGES_BYTES (else the units are walked); a unit's
line program header and program are measured from their own length fields
first (MAX_HEADER_BYTES, MAX_PROGRAM_BYTES). One lookup runs under a real
time limit (an interval timer interrupts pyelftools' loops), and a file that
ran out of time or was refused is not tried again for RETRY_SECONDS (the
refusals of a crafted file are paid once, not at every report). Anything
odd gives no line, never an error: the frame keeps its function name.

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
# The DWARF bytes one file may bring in (expanded), all sections together.
MAX_DWARF_BYTES = 48 << 20
# pyelftools parses .debug_aranges whole, into objects (a 30 MiB crafted one
# took 9 s and 349 MB): past this, it is ignored and the units are walked.
MAX_ARANGES_BYTES = 1 << 20
# A unit's line program header (its include directories and file names):
# real ones are a few KB; a crafted one of 24 MiB took 17 s.
MAX_HEADER_BYTES = 256 << 10
# Parsed files kept, by the bytes of their sections: only the frames that
# name a place are looked up, so a few files are hot.
CACHE_BYTES = 64 << 20
# One lookup, at most (whatever the caller's deadline allows beyond it).
SECONDS = 0.5
# A file refused or out of time is not parsed again for this long.
RETRY_SECONDS = 600.0
MAX_REMEMBERED = 1024

_cache: OrderedDict = OrderedDict()    # identity -> (DWARFInfo or None, bytes, line section)
_cache_bytes = 0
_failed: OrderedDict = OrderedDict()   # identity -> (monotonic time, reason)
# Answers by (identity, address): the same place is asked for at every
# report of a leak; () for "no line there".
_found: OrderedDict = OrderedDict()
MAX_FOUND = 4096
# A lookup this slow that finds nothing is remembered as a failure.
SLOW_SECONDS = 0.1


def _remember_found(key, vaddr: int, found) -> None:
    _found[(key, vaddr)] = found
    while len(_found) > MAX_FOUND:
        _found.popitem(last=False)


class _Memory(io.RawIOBase):
    """A read-only stream over bytes or a bytearray, without the copy
    io.BytesIO makes of its initial value."""

    def __init__(self, data):
        super().__init__()
        self.data = data
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.data)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size is None or size < 0 else min(len(self.data), self.pos + size)
        out = bytes(self.data[self.pos:end])
        self.pos = max(self.pos, end)
        return out

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Alarm(BaseException):
    """The lookup's interval timer fired. A BaseException: pyelftools (and
    its construct library) turn any Exception raised mid-parse into their
    own errors, and a handler that swallowed it would end the time limit."""


class _time_limit:
    """Interrupt pure-Python work (pyelftools) after `seconds`, with an
    interval timer: a deadline checked between steps cannot stop a step that
    loops over a crafted table. Only in the main thread (signals), and only
    when no other timer is running; otherwise the step checks remain."""

    def __init__(self, seconds: float):
        self.seconds = max(0.001, seconds)
        self.armed = False

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread() or \
                signal.getitimer(signal.ITIMER_REAL)[0] > 0:
            return self

        def fire(_signum, _frame):
            if self.armed:
                raise _Alarm()
        self.previous = signal.signal(signal.SIGALRM, fire)
        self.armed = True
        # Fires again every 50 ms until disarmed: one that something caught
        # is followed by another.
        signal.setitimer(signal.ITIMER_REAL, self.seconds, 0.05)
        return self

    def __exit__(self, *exc):
        if self.armed:
            import signal
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def _expanded_size(s, r: "elfindex._Reader", little_endian: bool) -> int:
    """What a section takes once read: its size, or for a compressed one
    the size its header claims (checked again when it is expanded)."""
    if not s.flags & elfindex.SHF_COMPRESSED:
        return s.size
    head = r.read(s.offset, min(24, s.size), s.name)
    if len(head) < 24:
        raise Refused(f"{s.name}: compression header truncated")
    return struct.unpack_from("<IIQ" if little_endian else ">IIQ", head)[2]


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
    # Into a buffer of the claimed size, a chunk at a time: the memory is
    # the section's, not twice it (zlib grows its output by reallocating).
    out = bytearray(ch_size)
    view = memoryview(out)
    d = zlib.decompressobj()
    pending, at = raw[24:], 0
    while True:
        chunk = d.decompress(pending, 1 << 20)
        if at + len(chunk) > ch_size:
            raise Refused(f"{s.name}: expands to another size than it says")
        view[at:at + len(chunk)] = chunk
        at += len(chunk)
        pending = d.unconsumed_tail
        if not chunk:           # done, or nothing more to be had from it
            break
    view.release()
    if at != ch_size or not d.eof:
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
        return None, 0, b""
    descriptors = {}
    total = 0
    line_data = b""
    for name, s in found.items():
        r.check_time()
        if s.type == elfindex.SHT_NOBITS:
            continue
        size = _expanded_size(s, r, elf.little_endian)
        if name == ".debug_aranges" and size > MAX_ARANGES_BYTES:
            continue                # the units are walked instead
        # Counted before anything is read or expanded.
        total += size
        if total > MAX_DWARF_BYTES:
            raise Refused(f"DWARF larger than {MAX_DWARF_BYTES >> 20} MiB")
        data = _section_bytes(s, r, elf.little_endian, limits)
        if name == ".debug_line":
            line_data = data
        descriptors[name] = DebugSectionDescriptor(stream=_Memory(data), name=name,
                                                   global_offset=s.offset, size=len(data),
                                                   address=s.addr)
    if ".debug_line" not in descriptors or ".debug_info" not in descriptors:
        return None, 0, b""
    get = descriptors.get
    sections = dict(
        debug_info_sec=get(".debug_info"), debug_aranges_sec=get(".debug_aranges"),
        debug_abbrev_sec=get(".debug_abbrev"), debug_frame_sec=None, eh_frame_sec=None,
        debug_str_sec=get(".debug_str"), debug_loc_sec=None,
        debug_ranges_sec=get(".debug_ranges"), debug_line_sec=get(".debug_line"),
        debug_pubtypes_sec=None, debug_pubnames_sec=None, debug_addr_sec=get(".debug_addr"),
        debug_str_offsets_sec=get(".debug_str_offsets"),
        debug_line_str_sec=get(".debug_line_str"), debug_loclists_sec=None,
        debug_rnglists_sec=get(".debug_rnglists"), debug_sup_sec=None,
        gnu_debugaltlink_sec=None)
    return DWARFInfo(
        config=DwarfConfig(little_endian=elf.little_endian,
                           default_address_size=8 if elf.elfclass == 64 else 4,
                           machine_arch=elf.get_machine_arch()),
        **sections, **_later_sections(DWARFInfo, sections)), total, line_data


_LATER_SECTIONS: dict = {}      # DWARFInfo class -> its later sections' arguments


def _later_sections(cls, named: dict) -> dict:
    """None for each section argument cls requires besides those named
    (pyelftools 0.30 added debug_types_sec, without a default: with
    0.30-0.33 every lookup failed as "malformed DWARF (TypeError)" and no
    holder got a file:line). No line lookup needs those sections."""
    got = _LATER_SECTIONS.get(cls)
    if got is None:
        import inspect
        try:
            params = inspect.signature(cls.__init__).parameters
        except (TypeError, ValueError):
            params = {}
        got = _LATER_SECTIONS[cls] = {
            name: None for name, p in params.items()
            if name.endswith("_sec") and name not in named
            and p.default is inspect.Parameter.empty}
    return got


def _remember_failure(key, reason: str) -> None:
    _failed[key] = (time.monotonic(), reason)
    _failed.move_to_end(key)
    while len(_failed) > MAX_REMEMBERED:
        _failed.popitem(last=False)


def _open_dwarf(path: str, deadline: float, limits: Limits):
    """(identity, DWARFInfo or None, .debug_line bytes), parsed once and
    kept within CACHE_BYTES."""
    global _cache_bytes
    f, st = elfindex._open_regular(path)
    with f:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        failed = _failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < RETRY_SECONDS:
            raise Refused(failed[1].removeprefix("no line: ") + " (not tried again yet)")
        if key in _cache:
            _cache.move_to_end(key)
            dwarf, _size, line_data = _cache[key]
            return key, dwarf, line_data
        dwarf, size, line_data = _dwarf_of(f, st.st_size, deadline, limits)
    if size <= CACHE_BYTES:
        _cache[key] = (dwarf, size, line_data)
        _cache_bytes += size
        while _cache_bytes > CACHE_BYTES and _cache:
            _cache_bytes -= _cache.popitem(last=False)[1][1]
    return key, dwarf, line_data


def _check_program_sizes(line_data: bytes, offset: int, little_endian: bool) -> None:
    """Read a line program's own length fields before pyelftools does: the
    unit (MAX_PROGRAM_BYTES) and its header (MAX_HEADER_BYTES)."""
    order = "<" if little_endian else ">"
    if not 0 <= offset <= len(line_data) - 4:
        raise Refused("line program outside .debug_line")
    unit_length = struct.unpack_from(order + "I", line_data, offset)[0]
    pos, word = offset + 4, 4
    if unit_length == 0xFFFFFFFF:
        if offset + 12 > len(line_data):
            raise Refused("line program truncated")
        unit_length = struct.unpack_from(order + "Q", line_data, offset + 4)[0]
        pos, word = offset + 12, 8
    if unit_length > MAX_PROGRAM_BYTES:
        raise Refused("line program too large")
    if pos + 2 > len(line_data):
        raise Refused("line program truncated")
    version = struct.unpack_from(order + "H", line_data, pos)[0]
    pos += 2 + (2 if version >= 5 else 0)    # v5: address and selector sizes
    if pos + word > len(line_data):
        raise Refused("line program truncated")
    header_length = struct.unpack_from(order + ("I" if word == 4 else "Q"), line_data, pos)[0]
    if header_length > MAX_HEADER_BYTES:
        raise Refused("line program header too large")


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


def _line_in_unit(dwarf, cu, vaddr: int, deadline: float,
                  line_data: bytes) -> Optional[tuple[str, int]]:
    top = cu.get_top_DIE()
    stmt = top.attributes.get("DW_AT_stmt_list")
    if stmt is None or not isinstance(stmt.value, int):
        return None
    _check_program_sizes(line_data, stmt.value, dwarf.config.little_endian)
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
        key = None
        limit = min(SECONDS, deadline - time.monotonic())
        if limit <= 0:
            return None             # the batch's budget is spent: not this file's fault
        started = time.monotonic()
        try:
            with _time_limit(limit):
                key, dwarf, line_data = _open_dwarf(candidate, deadline, limits)
                if dwarf is None:
                    continue
                known = _found.get((key, vaddr))
                if known is not None:
                    return known or None
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
                    found = _line_in_unit(dwarf, cu, vaddr, deadline, line_data)
                    if found is not None:
                        _remember_found(key, vaddr, found)
                        return found
                _remember_found(key, vaddr, ())
                if time.monotonic() - started > SLOW_SECONDS:
                    # Slow and nothing found: a table built to cost just
                    # under the limit at every report is paid once.
                    _remember_failure(key, "no line: slow, and none found")
        except FileNotFoundError:
            continue
        except (OutOfTime, _Alarm):
            key = key or _identity(candidate)
            # Remembered only when it had the whole SECONDS: a lookup cut
            # short by the batch's budget says nothing of the file.
            if key is not None and limit >= SECONDS - 0.01:
                _remember_failure(key, "no line: time limit")
            elfindex.note_problem("no line: time limit", candidate)
            return None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Refused as e:
            key = key or _identity(candidate)
            if key is not None and "not tried again" not in str(e):
                _remember_failure(key, f"no line: {e}")
            elfindex.note_problem(f"no line: {e}", candidate)
        except Exception as e:      # pyelftools raises assorted errors on odd DWARF
            if isinstance(e, OSError) and candidate != path:
                continue
            key = key or _identity(candidate)
            if key is not None:
                _remember_failure(key, f"no line: malformed DWARF ({type(e).__name__})")
            elfindex.note_problem(f"no line: malformed DWARF ({type(e).__name__})", candidate)
    return None


def clear() -> None:
    """Forget every parsed and failed file (tests)."""
    global _cache_bytes
    _cache.clear()
    _failed.clear()
    _found.clear()
    _cache_bytes = 0


def _identity(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
