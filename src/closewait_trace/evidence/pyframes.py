"""The Python frames (function, file:line) of a CPython holder's threads,
read from its memory: where a Python program waits, in its own terms
("blocked in futex at process_batch (worker.py:120)") rather than inside
the interpreter's C code (_PyEval_EvalFrameDefault+0x112a).

How (what py-spy and austin do, without stopping the process): the
interpreter binary (python3.X or libpython3.X.so) exports `_PyRuntime`;
from it, interpreters -> thread states -> the current frame of each thread
-> its callers. A thread state carries the kernel's thread id
(native_thread_id), which ties it to the thread /proc shows. The frame's
code object gives the names; its last instruction and line table, the line.

Everything read here is another process's memory, and is distrusted:
- reads go through ProcessImage (only mappings we parsed, never a
  user-served file), a fixed number of reads per process (MAX_READS) and
  the batch's time budget;
- every walk is bounded (interpreters, threads, frames) and stops at a
  pointer seen before;
- a code object, a string or a bytes object is believed only when its type
  pointer is the interpreter's own PyCode_Type / PyUnicode_Type /
  PyBytes_Type (found by name in the binary), and its sizes are capped;
- a line table is decoded with every length checked.
A process whose structures do not check out gets no Python frames and a
reason; nothing it holds can make this loop, allocate without bound, or
raise into the caller.

Layouts are those of CPython's own headers, per minor version: 3.11 and
3.12 from LAYOUTS (tests check the tables against Debian 12's and Ubuntu
24.04's headers, by offsetof); 3.13 from the process's own
_Py_DebugOffsets, each value checked before it is believed (debug_layout;
tests check what a real 3.13 gives against Debian 13's headers). Any other
version is said as such, never guessed.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Optional

from closewait_trace.evidence import elfindex, place
from closewait_trace.evidence.procimage import Mapping

# The binary holding the interpreter: python3.11, python3.11d, or
# libpython3.11.so.1.0 (an embedding or --enable-shared build).
INTERPRETER_FILE = re.compile(r"^(?:lib)?python3\.(\d{1,2})[a-z]*(?:\.so(?:\.[\d.]+)?)?$")
ANCHORS = frozenset({b"_PyRuntime", b"PyCode_Type", b"PyUnicode_Type", b"PyBytes_Type",
                     b"PyType_Type", b"Py_Version"})
# The versions whose layout is read from the process's _Py_DebugOffsets
# (debug_layout), not from LAYOUTS.
DEBUG_OFFSETS_VERSIONS = frozenset({(3, 13)})

MAX_INTERPRETER_FILES = 4     # distinct files named like an interpreter, examined per
                              # process (a program maps python3.X and maybe libpython)
MAX_INTERPRETERS = 8          # subinterpreters walked
MAX_THREAD_STATES = 1024      # thread states walked, all interpreters together
MAX_FRAMES = 32               # frames kept per thread (innermost first)
MAX_READS = 4096              # reads of the process's memory, per process and batch
MAX_NAME_CHARS = 200          # of a function or file name
MAX_LINETABLE_BYTES = 64 << 10
MAX_CODE_CACHE = 512          # code objects remembered per process within a batch


NO_CFRAME = -1                # Layout.cframe_current of 3.13: no _PyCFrame indirection
NO_OWNER = -1                 # Layout.frame_owner of 3.11: frames have no C-stack owner
FRAME_OWNED_BY_CSTACK = 3     # 3.12, 3.13 (Include/internal/pycore_frame.h)
KERNEL_NONE = 0xFFFF          # the kernel walk's "no such field" (CW_PY_NONE_OFF)


@dataclass(frozen=True)
class Layout:
    """Offsets (bytes) into CPython's structures for one minor version."""
    runtime_interp_head: int      # _PyRuntimeState.interpreters.head
    interp_next: int              # PyInterpreterState.next
    interp_threads_head: int      # PyInterpreterState.threads.head
    tstate_next: int              # PyThreadState.next
    tstate_native_tid: int        # PyThreadState.native_thread_id
    tstate_cframe: int            # PyThreadState.cframe (3.13: .current_frame)
    cframe_current: int           # _PyCFrame.current_frame; NO_CFRAME (3.13): none,
                                  # tstate_cframe is the current frame itself
    frame_code: int               # _PyInterpreterFrame.f_code (3.13: .f_executable)
    frame_previous: int           # _PyInterpreterFrame.previous
    frame_prev_instr: int         # _PyInterpreterFrame.prev_instr (3.13: .instr_ptr)
    code_firstlineno: int         # PyCodeObject.co_firstlineno (int)
    code_filename: int
    code_qualname: int
    code_linetable: int
    code_adaptive: int            # PyCodeObject.co_code_adaptive (the bytecode)
    unicode_length: int           # PyASCIIObject.length
    unicode_state: int            # PyASCIIObject.state (bit field)
    ascii_data: int               # sizeof(PyASCIIObject): data of a compact ASCII str
    compact_data: int             # sizeof(PyCompactUnicodeObject)
    bytes_size: int               # PyBytesObject.ob_base.ob_size
    bytes_data: int               # PyBytesObject.ob_sval
    frame_owner: int = NO_OWNER   # _PyInterpreterFrame.owner (a char), 3.12 on: frames
                                  # owned by the C stack (FRAME_OWNED_BY_CSTACK) are the
                                  # interpreter's entry shims, skipped


LAYOUTS = {
    # CPython 3.11 (Debian 12), x86-64: offsetof() against Include/internal.
    (3, 11): Layout(
        runtime_interp_head=40, interp_next=0, interp_threads_head=16,
        tstate_next=8, tstate_native_tid=160, tstate_cframe=56, cframe_current=8,
        frame_code=32, frame_previous=48, frame_prev_instr=56,
        code_firstlineno=72, code_filename=112, code_qualname=128, code_linetable=136,
        code_adaptive=184, unicode_length=16, unicode_state=32, ascii_data=48,
        compact_data=72, bytes_size=16, bytes_data=32),
    # CPython 3.12 (Ubuntu 24.04's), x86-64: offsetof() against its
    # Include/internal (tests/root/test_pyframes_versions.py, noble's
    # libpython3.12-dev).
    (3, 12): Layout(
        runtime_interp_head=40, interp_next=0, interp_threads_head=72,
        tstate_next=8, tstate_native_tid=144, tstate_cframe=56, cframe_current=0,
        frame_code=0, frame_previous=8, frame_prev_instr=56,
        code_firstlineno=68, code_filename=112, code_qualname=128, code_linetable=136,
        code_adaptive=192, unicode_length=16, unicode_state=32, ascii_data=40,
        compact_data=56, bytes_size=16, bytes_data=32, frame_owner=70),
    # CPython 3.13: none here. Its layout is read from the process itself,
    # from the _Py_DebugOffsets at the start of _PyRuntime (debug_layout).
}

OB_TYPE = 8                   # PyObject.ob_type, every version

# CPython 3.13's _Py_DebugOffsets (Include/internal/pycore_runtime.h), at
# the start of _PyRuntime: the offsets an out-of-process reader needs,
# written by the interpreter's own build. Its fields in order, each a
# uint64 after the 8-byte cookie (the names test_pyframes checks by
# offsetof against trixie's libpython3.13-dev). Another layout of this
# struct (3.14 adds fields) is not this one: only 3.13 is read with it.
DEBUG_COOKIE = b"xdebugpy"
DEBUG_FIELDS_313 = (
    "version", "free_threaded",
    "runtime_state.size", "runtime_state.finalizing", "runtime_state.interpreters_head",
    "interpreter_state.size", "interpreter_state.id", "interpreter_state.next",
    "interpreter_state.threads_head", "interpreter_state.gc",
    "interpreter_state.imports_modules", "interpreter_state.sysdict",
    "interpreter_state.builtins", "interpreter_state.ceval_gil",
    "interpreter_state.gil_runtime_state", "interpreter_state.gil_runtime_state_enabled",
    "interpreter_state.gil_runtime_state_locked", "interpreter_state.gil_runtime_state_holder",
    "thread_state.size", "thread_state.prev", "thread_state.next", "thread_state.interp",
    "thread_state.current_frame", "thread_state.thread_id", "thread_state.native_thread_id",
    "thread_state.datastack_chunk", "thread_state.status",
    "interpreter_frame.size", "interpreter_frame.previous", "interpreter_frame.executable",
    "interpreter_frame.instr_ptr", "interpreter_frame.localsplus", "interpreter_frame.owner",
    "code_object.size", "code_object.filename", "code_object.name", "code_object.qualname",
    "code_object.linetable", "code_object.firstlineno", "code_object.argcount",
    "code_object.localsplusnames", "code_object.localspluskinds",
    "code_object.co_code_adaptive",
    "pyobject.size", "pyobject.ob_type",
    "type_object.size", "type_object.tp_name", "type_object.tp_repr", "type_object.tp_flags",
    "tuple_object.size", "tuple_object.ob_item", "tuple_object.ob_size",
    "list_object.size", "list_object.ob_item", "list_object.ob_size",
    "dict_object.size", "dict_object.ma_keys", "dict_object.ma_values",
    "float_object.size", "float_object.ob_fval",
    "long_object.size", "long_object.lv_tag", "long_object.ob_digit",
    "bytes_object.size", "bytes_object.ob_size", "bytes_object.ob_sval",
    "unicode_object.size", "unicode_object.state", "unicode_object.length",
    "unicode_object.asciiobject_size",
    "gc.size", "gc.collecting",
)
DEBUG_SIZE_313 = 8 + 8 * len(DEBUG_FIELDS_313)
# The largest each structure may say it is (a few times what 3.13 has on
# x86-64), and which offsets must be 8-byte aligned pointers: a value
# outside is not believed.
_DEBUG_MAX_SIZE = {"runtime_state": 1 << 22, "interpreter_state": 1 << 22,
                   "thread_state": 1 << 14, "interpreter_frame": 1 << 9,
                   "code_object": 1 << 11}
# (struct, field, width in bytes): every field the walk reads.
_DEBUG_USED = (
    ("runtime_state", "interpreters_head", 8),
    ("interpreter_state", "next", 8), ("interpreter_state", "threads_head", 8),
    ("thread_state", "next", 8), ("thread_state", "current_frame", 8),
    ("thread_state", "native_thread_id", 8),
    ("interpreter_frame", "previous", 8), ("interpreter_frame", "executable", 8),
    ("interpreter_frame", "instr_ptr", 8), ("interpreter_frame", "owner", 1),
    ("code_object", "filename", 8), ("code_object", "qualname", 8),
    ("code_object", "linetable", 8), ("code_object", "firstlineno", 4),
    ("code_object", "co_code_adaptive", 2),
)

# The code object's fields _code takes from its first co_code_adaptive bytes.
_CODE_PREFIX_FIELDS = (("filename", 8), ("qualname", 8), ("linetable", 8),
                       ("firstlineno", 4))


def debug_layout(raw: bytes, version: tuple) -> Layout:
    """The Layout of a CPython 3.13 process, from the _Py_DebugOffsets its
    _PyRuntime begins with (raw: its first DEBUG_SIZE_313 bytes). Every
    value is the process's to write, so none is believed unchecked: the
    cookie, the version (that of the binary), a default (not free-threaded)
    build, each structure's size bounded, each offset used inside its
    structure, aligned, and the walk's fields distinct; the object headers
    (ob_type, bytes, str) must be the very ones every 3.13 build has.
    Raises Unreadable saying which did not check out."""
    if len(raw) < DEBUG_SIZE_313:
        raise Unreadable("its debug offsets (_PyRuntime) not readable")
    if raw[:8] != DEBUG_COOKIE:
        raise Unreadable("its debug offsets do not check out (no debug cookie in _PyRuntime)")
    values = dict(zip(DEBUG_FIELDS_313, struct.unpack_from(f"<{len(DEBUG_FIELDS_313)}Q",
                                                           raw, 8)))
    said = (values["version"] >> 24 & 0xFF, values["version"] >> 16 & 0xFF)
    if said != version:
        raise Unreadable(f"its debug offsets do not check out (they say CPython "
                         f"{said[0]}.{said[1]}, the binary {version[0]}.{version[1]})")
    if values["free_threaded"]:
        raise Unreadable("a free-threaded build (its layout is not known to this "
                         "closewait-trace)")

    def bad(what: str):
        return Unreadable(f"its debug offsets do not check out ({what})")

    for name, top in _DEBUG_MAX_SIZE.items():
        if not 0 < values[f"{name}.size"] <= top:
            raise bad(f"{name} size {values[f'{name}.size']}")
    for name, field, width in _DEBUG_USED:
        off = values[f"{name}.{field}"]
        if off + width > values[f"{name}.size"] or off % width:
            raise bad(f"{name}.{field} at {off}")
    # A code object is read as its first co_code_adaptive bytes (_code):
    # every field taken from it must lie in that prefix, past the header.
    adaptive = values["code_object.co_code_adaptive"]
    for field, width in _CODE_PREFIX_FIELDS:
        off = values[f"code_object.{field}"]
        if off < OB_TYPE + 8 or off + width > adaptive:
            raise bad(f"code_object.{field} at {off}, outside the code object's "
                      f"first {adaptive} bytes")
    frame = [values[f"interpreter_frame.{f}"] for f in ("previous", "executable", "instr_ptr")]
    tstate = [values[f"thread_state.{f}"] for f in ("next", "current_frame", "native_thread_id")]
    if len(set(frame)) != 3 or len(set(tstate)) != 3:
        raise bad("fields overlap")
    # The kernel's walk keeps its offsets in 16 bits (struct cw_py_proc),
    # 0xFFFF meaning none: a larger one would be cut there, never believed.
    for key in ("interpreter_state.threads_head", "thread_state.next",
                "thread_state.current_frame", "thread_state.native_thread_id",
                "interpreter_frame.previous", "interpreter_frame.executable",
                "interpreter_frame.instr_ptr", "interpreter_frame.owner"):
        if values[key] >= KERNEL_NONE:
            raise bad(f"{key} at {values[key]}, past what the kernel's walk holds")
    # The object headers are CPython's ABI, the same in every 3.13 build.
    fixed = {"pyobject.ob_type": OB_TYPE, "bytes_object.ob_size": 16,
             "bytes_object.ob_sval": 32, "unicode_object.length": 16,
             "unicode_object.state": 32, "unicode_object.asciiobject_size": 40}
    for key, want in fixed.items():
        if values[key] != want:
            raise bad(f"{key} {values[key]}")
    return Layout(
        runtime_interp_head=values["runtime_state.interpreters_head"],
        interp_next=values["interpreter_state.next"],
        interp_threads_head=values["interpreter_state.threads_head"],
        tstate_next=values["thread_state.next"],
        tstate_native_tid=values["thread_state.native_thread_id"],
        tstate_cframe=values["thread_state.current_frame"], cframe_current=NO_CFRAME,
        frame_code=values["interpreter_frame.executable"],
        frame_previous=values["interpreter_frame.previous"],
        frame_prev_instr=values["interpreter_frame.instr_ptr"],
        frame_owner=values["interpreter_frame.owner"],
        code_firstlineno=values["code_object.firstlineno"],
        code_filename=values["code_object.filename"],
        code_qualname=values["code_object.qualname"],
        code_linetable=values["code_object.linetable"],
        code_adaptive=values["code_object.co_code_adaptive"],
        unicode_length=16, unicode_state=32, ascii_data=40,
        # PyCompactUnicodeObject: PyASCIIObject, utf8_length, utf8.
        compact_data=40 + 16, bytes_size=16, bytes_data=32)


@dataclass(frozen=True, slots=True)
class PyFrame:
    function: str
    file: str
    line: Optional[int]       # None: the line table had none for the instruction

    @property
    def own_code(self) -> bool:
        """In the program's own code, not in the interpreter's library
        (the standard library, site- and dist-packages, frozen modules)."""
        return not place.is_python_library(self.file)

    def describe(self) -> str:
        line = f":{self.line}" if self.line else ""
        return f"{self.function} ({os.path.basename(self.file) or '?'}{line})"

    def as_dict(self) -> dict:
        return {"function": self.function, "file": self.file, "line": self.line}


def own_frame(frames: list) -> Optional[PyFrame]:
    """The innermost frame in the program's own code (a thread waiting in
    threading.Event.wait is waiting where its own code called wait), else
    the innermost; None for no frames."""
    return next((f for f in frames if f.own_code), frames[0] if frames else None)


class Unreadable(Exception):
    """The interpreter's structures do not check out: the message says why."""


@dataclass(frozen=True)
class Runtime:
    """Where one process's interpreter lives."""
    version: tuple
    layout: Layout
    runtime: int              # address of _PyRuntime
    code_type: int
    unicode_type: int
    bytes_type: int

    def kernel_walk(self) -> dict:
        """What the kernel program needs to copy a thread's frames at an
        event (struct cw_py_proc in bpf/closewait.bpf.c)."""
        lay = self.layout
        return {"interp_head": self.runtime + lay.runtime_interp_head,
                "interp_threads_head": lay.interp_threads_head,
                "tstate_next": lay.tstate_next, "tstate_native_tid": lay.tstate_native_tid,
                "tstate_cframe": lay.tstate_cframe,
                "cframe_current": KERNEL_NONE if lay.cframe_current == NO_CFRAME
                else lay.cframe_current,
                "frame_code": lay.frame_code, "frame_previous": lay.frame_previous,
                "frame_prev_instr": lay.frame_prev_instr,
                "frame_owner": KERNEL_NONE if lay.frame_owner == NO_OWNER
                else lay.frame_owner}


def find_runtime(image, deadline: float) -> tuple[Optional[Runtime], str]:
    """(Runtime, "") for a CPython process; (None, "") for a process that
    is not one; (None, why) for one whose interpreter cannot be read."""
    seen: set = set()
    for m in image.maps:
        name = os.path.basename(m.path.replace(" (deleted)", ""))
        match = INTERPRETER_FILE.match(name)
        if not match or not m.file_backed or (m.dev, m.inode) in seen:
            continue
        if len(seen) >= MAX_INTERPRETER_FILES:
            # Each is an ELF file parsed: a process mapping thousands of
            # them (copies of any small ELF, named python3.X) would spend
            # the scan's whole deadline, everyone else's share of it.
            return None, (f"interpreter not found among its first {MAX_INTERPRETER_FILES} "
                          f"files named like one")
        seen.add((m.dev, m.inode))
        path = image.file_of(m)
        if path is None:
            return None, f"interpreter {name[:40]} not read ({image.unreadable_reason(m) or 'no file'})"
        found = elfindex.named_symbols(path, ANCHORS, deadline)
        if found is None:
            return None, f"interpreter {name[:40]} not read (its ELF file)"
        loads, symbols = found
        if "_PyRuntime" not in symbols:
            continue                  # e.g. a python3.X that only loads libpython
        bias = _load_bias(image, m, loads)
        if bias is None:
            return None, f"interpreter {name[:40]}: load address not found"
        version = (3, int(match.group(1)))
        if "Py_Version" in symbols:   # 3.11 on: the version the binary says it is
            raw = image.read(bias + symbols["Py_Version"], 8)
            if len(raw) == 8:
                hexversion = struct.unpack("<Q", raw)[0]
                said = (hexversion >> 24 & 0xFF, hexversion >> 16 & 0xFF)
                if said != version:
                    return None, (f"interpreter {name[:40]} says it is CPython "
                                  f"{said[0]}.{said[1]}")
        layout = LAYOUTS.get(version)
        if layout is None and version not in DEBUG_OFFSETS_VERSIONS:
            return None, (f"CPython {version[0]}.{version[1]}: frames not read "
                          f"(its layout is not known to this closewait-trace)")
        if not all(k in symbols for k in ("PyCode_Type", "PyUnicode_Type", "PyBytes_Type",
                                          "PyType_Type")):
            return None, f"interpreter {name[:40]}: type objects not found"
        types_ = {k: bias + symbols[k] for k in ("PyCode_Type", "PyUnicode_Type",
                                                 "PyBytes_Type", "PyType_Type")}
        # The type objects are believed when they are types: each one's
        # ob_type is the interpreter's own PyType_Type.
        for k in ("PyCode_Type", "PyUnicode_Type", "PyBytes_Type"):
            raw = image.read(types_[k] + OB_TYPE, 8)
            if len(raw) != 8 or struct.unpack("<Q", raw)[0] != types_["PyType_Type"]:
                return None, f"interpreter {name[:40]}: its type objects do not check out"
        runtime = bias + symbols["_PyRuntime"]
        if layout is None:
            try:
                layout = debug_layout(image.read(runtime, DEBUG_SIZE_313), version)
            except Unreadable as e:
                return None, (f"CPython {version[0]}.{version[1]}: frames not read, its layout "
                              f"is not known: {e}")
        return Runtime(version, layout, runtime, types_["PyCode_Type"],
                       types_["PyUnicode_Type"], types_["PyBytes_Type"]), ""
    return None, ""


def _runtime_or_none(image, deadline: float) -> Optional[Runtime]:
    """find_runtime's Runtime, or None, whatever the process holds (a bug
    in reading it is never the tracer's end)."""
    try:
        return find_runtime(image, deadline)[0]
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        return None


def _load_bias(image, first: Mapping, loads: list) -> Optional[int]:
    """Address where the file's vaddr 0 is mapped, from one of its mappings
    and the PT_LOAD segment holding that mapping's file offset."""
    for m in image.maps:
        if (m.dev, m.inode) != (first.dev, first.inode):
            continue
        for vaddr, offset, filesz in loads:
            if offset <= m.offset < offset + max(filesz, 1):
                return m.start - (vaddr + m.offset - offset)
    return None


class _Memory:
    """Reads of one process's memory, counted."""

    def __init__(self, image, reads: int = MAX_READS):
        self.image = image
        self.left = reads

    def read(self, addr: int, size: int) -> bytes:
        if self.left <= 0:
            raise Unreadable(f"more than {MAX_READS} reads")
        self.left -= 1
        if not 0 < addr < 1 << 47:
            return b""
        data = self.image.read(addr, size)
        return data if len(data) == size else b""

    def pointer(self, addr: int) -> int:
        raw = self.read(addr, 8)
        return struct.unpack("<Q", raw)[0] if raw else 0


def thread_frames(image, deadline: float, tids: set, runtime: Runtime,
                  clock=None) -> dict[int, list[PyFrame]]:
    """tid -> its Python frames (innermost first) for the wanted tids.
    Raises Unreadable when the interpreter's state does not check out."""
    import time
    now = clock or time.monotonic
    mem = _Memory(image)
    lay = runtime.layout
    out: dict[int, list[PyFrame]] = {}
    codes: dict = {}
    seen_interps: set = set()
    seen_states: set = set()
    interp = mem.pointer(runtime.runtime + lay.runtime_interp_head)
    if not interp:
        raise Unreadable("no interpreter in _PyRuntime")
    while interp and len(seen_interps) < MAX_INTERPRETERS and interp not in seen_interps:
        seen_interps.add(interp)
        tstate = mem.pointer(interp + lay.interp_threads_head)
        while tstate and tstate not in seen_states:
            if len(seen_states) >= MAX_THREAD_STATES:
                raise Unreadable(f"more than {MAX_THREAD_STATES} thread states")
            if now() > deadline:
                return out
            seen_states.add(tstate)
            raw = mem.read(tstate, max(lay.tstate_native_tid, lay.tstate_cframe,
                                       lay.tstate_next) + 8)
            if not raw:
                raise Unreadable("a thread state not readable")
            tid = struct.unpack_from("<Q", raw, lay.tstate_native_tid)[0]
            if tid in tids and tid not in out:
                cframe = struct.unpack_from("<Q", raw, lay.tstate_cframe)[0]
                if lay.cframe_current == NO_CFRAME:
                    frame = cframe            # 3.13: the thread's current frame itself
                else:
                    frame = mem.pointer(cframe + lay.cframe_current) if cframe else 0
                out[tid] = _frames(mem, runtime, frame, codes, deadline, now)
                if len(out) == len(tids):
                    return out
            tstate = struct.unpack_from("<Q", raw, lay.tstate_next)[0]
        interp = mem.pointer(interp + lay.interp_next)
    return out


def _frames(mem: _Memory, runtime: Runtime, frame: int, codes: dict, deadline: float,
            now) -> list[PyFrame]:
    lay = runtime.layout
    out: list[PyFrame] = []
    seen: set = set()
    span = max(lay.frame_code, lay.frame_previous, lay.frame_prev_instr, lay.frame_owner) + 8
    while (frame and len(out) < MAX_FRAMES and len(seen) < 2 * MAX_FRAMES
           and frame not in seen and now() <= deadline):
        seen.add(frame)
        raw = mem.read(frame, span)
        if not raw:
            break
        code, previous, prev_instr = (struct.unpack_from("<Q", raw, off)[0] for off in
                                      (lay.frame_code, lay.frame_previous, lay.frame_prev_instr))
        if lay.frame_owner != NO_OWNER and raw[lay.frame_owner] == FRAME_OWNED_BY_CSTACK:
            frame = previous          # the interpreter's entry shim (3.13: f_executable None)
            continue
        info = codes.get(code)
        if info is None:
            info = _code(mem, runtime, code)
            if len(codes) < MAX_CODE_CACHE:
                codes[code] = info
        if info is None:
            break                     # not a code object: the chain is not believed past it
        name, filename, firstlineno, linetable = info
        first_instr = code + lay.code_adaptive
        lasti = (prev_instr - first_instr) // 2 if prev_instr >= first_instr else -1
        out.append(PyFrame(name, filename, line_of(linetable, firstlineno, lasti)))
        frame = previous
    return out


def _code(mem: _Memory, runtime: Runtime, code: int) -> Optional[tuple]:
    lay = runtime.layout
    raw = mem.read(code, lay.code_adaptive)
    # (A layout whose fields lie past what is read is refused by
    # debug_layout; checked here too: never a struct.error for a caller.)
    if (len(raw) < OB_TYPE + 8 or max(lay.code_filename, lay.code_qualname,
                                      lay.code_linetable, lay.code_firstlineno - 4) + 8
            > len(raw) or struct.unpack_from("<Q", raw, OB_TYPE)[0] != runtime.code_type):
        return None
    firstlineno = struct.unpack_from("<i", raw, lay.code_firstlineno)[0]
    filename = _string(mem, runtime, struct.unpack_from("<Q", raw, lay.code_filename)[0])
    name = _string(mem, runtime, struct.unpack_from("<Q", raw, lay.code_qualname)[0])
    table = _bytes(mem, runtime, struct.unpack_from("<Q", raw, lay.code_linetable)[0])
    if name is None or filename is None:
        return None
    return name, filename, firstlineno, table


def _string(mem: _Memory, runtime: Runtime, addr: int) -> Optional[str]:
    """A compact str object's text, cut to MAX_NAME_CHARS; None if addr is
    not a str of this interpreter."""
    lay = runtime.layout
    raw = mem.read(addr, lay.unicode_state + 4)
    if not raw or struct.unpack_from("<Q", raw, OB_TYPE)[0] != runtime.unicode_type:
        return None
    length = struct.unpack_from("<q", raw, lay.unicode_length)[0]
    state = struct.unpack_from("<I", raw, lay.unicode_state)[0]
    kind, compact, ascii_ = state >> 2 & 7, state >> 5 & 1, state >> 6 & 1
    if length < 0 or not compact or kind not in (1, 2, 4):
        return None
    chars = min(length, MAX_NAME_CHARS)
    if ascii_:
        data = mem.read(addr + lay.ascii_data, chars)
        codec = "latin-1"
    else:
        data = mem.read(addr + lay.compact_data, chars * kind)
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
    if len(data) != chars * (1 if ascii_ else kind):
        return None
    text = data.decode(codec, "replace")
    return text + ("..." if length > chars else "")


def _bytes(mem: _Memory, runtime: Runtime, addr: int) -> bytes:
    lay = runtime.layout
    raw = mem.read(addr, lay.bytes_data)
    if not raw or struct.unpack_from("<Q", raw, OB_TYPE)[0] != runtime.bytes_type:
        return b""
    size = struct.unpack_from("<q", raw, lay.bytes_size)[0]
    if not 0 < size <= MAX_LINETABLE_BYTES:
        return b""
    return mem.read(addr + lay.bytes_data, size)


def line_of(table: bytes, firstlineno: int, lasti: int) -> Optional[int]:
    """The line of the instruction at index lasti (code units) from a 3.11
    location table (CPython's Objects/locations.md): entries of a first
    byte 1cccclll (code c, length l+1 code units) and varint operands.
    None when lasti is not covered or the entry has no line."""
    if lasti < 0 or not table:
        return None
    pos, addr, line, size = 0, 0, firstlineno, len(table)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while pos < size and shift < 64:
            b = table[pos]
            pos += 1
            value |= (b & 63) << shift
            shift += 6
            if not b & 64:
                return value
        raise ValueError("cut varint")

    def svarint() -> int:
        v = varint()
        return -(v >> 1) if v & 1 else v >> 1

    try:
        while pos < size:
            first = table[pos]
            pos += 1
            if not first & 0x80:
                return None           # not at an entry's start: a damaged table
            kind, length = first >> 3 & 15, (first & 7) + 1
            has_line = True
            if kind == 15:            # no location
                has_line = False
            elif kind == 14:          # long form
                line += svarint()
                varint(), varint(), varint()
            elif kind == 13:          # no column
                line += svarint()
            elif kind >= 10:          # one line form: line delta kind-10, two column bytes
                line += kind - 10
                pos += 2
            else:                     # short form: same line, one column byte
                pos += 1
            if addr <= lasti < addr + length:
                return line if has_line and 0 < line < 1 << 31 else None
            addr += length
    except ValueError:
        return None
    return None


def pid_namespace(proc: str, pid: int) -> Optional[dict]:
    """The process's pid namespace (and program) as the kernel program names it
    (bpf_get_ns_current_pid_tgid: the nsfs device, kernel encoding, and
    inode), for the walk: at an event the kernel compares the interpreter's
    thread ids with the reading thread's id in that namespace. None when
    it cannot be read (the process is gone)."""
    try:
        st = os.stat(f"{proc}/{pid}/ns/pid")
        exe = os.readlink(f"{proc}/{pid}/exe")          # the kernel's path: no file read
    except OSError:
        return None
    # exe: the program, to tell an exec() since the read when the kernel's
    # map of them was full (LiveTracer._same_process).
    return {"pidns_dev": os.major(st.st_dev) << 20 | os.minor(st.st_dev),
            "pidns_ino": st.st_ino, "exe": exe}


def native_ids(proc: str, pid: int, tids) -> dict:
    """The interpreter's id of each thread (its native_thread_id: the id in
    the process's own pid namespace, NSpid's last) -> /proc's tid. A thread
    whose status cannot be read keeps its tid (the same outside
    containers)."""
    from closewait_trace.sockets import procfs
    out = {}
    for tid in tids:
        native = tid
        try:
            spec = procfs.parse_status(procfs.decode(procfs.read_bytes(
                f"{proc}/{pid}/task/{tid}/status"))).get("NSpid", "").split()
            native = int(spec[-1]) if spec else tid
        except (procfs.ProcError, ValueError):
            pass
        out[native] = tid
    return out


def read_process(image, deadline: float, tids: set) -> tuple[dict, str, Optional[dict]]:
    """(tid -> frames, why not, the kernel's walk) for one process: ({}, "",
    None) when it is not a CPython process; ({}, reason, ...) when its
    frames could not be read. The walk (Runtime.kernel_walk) lets later
    captures in it copy their frames. Never raises for what the process
    holds."""
    walk = None
    try:
        runtime, why = find_runtime(image, deadline)
        if runtime is None:
            return {}, why, None
        namespace = pid_namespace(image.proc, image.pid)
        walk = {**runtime.kernel_walk(), **namespace} if namespace else None
        # The interpreter knows its threads by their ids in its own pid
        # namespace (a container's): /proc's ids are the tracer's.
        native = native_ids(image.proc, image.pid, tids)
        found = thread_frames(image, deadline, set(native), runtime)
        return {native[n]: frames for n, frames in found.items()}, "", walk
    except Unreadable as e:
        return {}, f"Python frames not read: {e}", walk
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:            # a bug here is never the tracer's end
        elfindex.note_problem(f"Python frames ({type(e).__name__})", f"pid {image.pid}")
        return {}, f"Python frames not read ({type(e).__name__})", walk


# What the kernel program said of a capture's Python frames (cw_eof.py_status).
PY_NONE, PY_COPIED, PY_NO_THREAD, PY_UNREADABLE = 0, 1, 2, 3
CAPTURE_STATUS = {
    PY_NO_THREAD: "its thread state was not among the interpreter's first 64",
    PY_UNREADABLE: "the interpreter's state could not be read at the event",
}


NOT_YET_KNOWN = ("not copied: the process was not yet known to be CPython when it read "
                 "(it is now: its next reads are)")
# The same, when the tracer could not register it since (the kernel's map
# full with other users' processes, or its pid names another process now).
NOT_YET_KNOWN_UNREGISTERED = ("not copied: the process was not yet known to be CPython when "
                              "it read (nor are its next reads: it could not be registered)")


def resolve_capture(image, deadline: float, status: int, pairs: tuple) -> tuple[list, str]:
    """(PyFrame dicts, why not) for a capture of the kernel's: its frames
    resolved; or why there are none, for a CPython process ("" for any
    other)."""
    if status == PY_COPIED:
        found, why = captured_frames(image, deadline, tuple(pairs))
        return [f.as_dict() for f in found], why
    if status in CAPTURE_STATUS:
        return [], CAPTURE_STATUS[status]
    return [], NOT_YET_KNOWN if _runtime_or_none(image, deadline) is not None else ""


def captured_frames(image, deadline: float, pairs: tuple) -> tuple[list, str]:
    """The Python frames a capture copied, as (code object, last
    instruction) pairs, resolved now against the process's memory: each
    code object is believed only if it still is one of this interpreter's
    (a function's code lives as long as the function; one freed since is
    not named). ([PyFrame], why not) ."""
    try:
        runtime, why = find_runtime(image, deadline)
        if runtime is None:
            return [], why or "not a CPython process now"
        import time
        mem = _Memory(image)
        out: list[PyFrame] = []
        codes: dict = {}
        for code, instr in pairs[:MAX_FRAMES]:
            if time.monotonic() > deadline:
                break
            info = codes.get(code)
            if code not in codes:
                info = codes[code] = _code(mem, runtime, code)
            if info is None:            # not a code object now: nothing past it is believed
                return out, ("" if out else "its frames do not check out now (a code object "
                             "freed or overwritten since the read)")
            name, filename, firstlineno, table = info
            first = code + runtime.layout.code_adaptive
            lasti = (instr - first) // 2 if instr >= first else -1
            out.append(PyFrame(name, filename, line_of(table, firstlineno, lasti)))
        return out, ""
    except Unreadable as e:
        return [], f"Python frames not read: {e}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        elfindex.note_problem(f"Python frames ({type(e).__name__})", f"pid {image.pid}")
        return [], f"Python frames not read ({type(e).__name__})"


def python_processes(proc: str, deadline: float, limit: int) -> dict[int, dict]:
    """pid -> walk of scan_python_processes, all at once (no process
    skipped)."""
    return {pid: walk for kind, pid, walk in scan_python_processes(proc, deadline, limit)
            if kind == "walk"}


# A scan of new processes (only_pids) gives each at most this fraction of
# its time: one process's binary costs the others at most that.
NEW_PROCESS_SHARES = 4


def scan_python_processes(proc: str, deadline: float, limit: int, skip_uids=(),
                          skip_pids=(), only_pids=None):
    """The running processes whose program is a CPython interpreter
    (/proc/PID/exe named python3.X), at most limit, until deadline, with
    what the kernel needs to copy their frames: registered at start so that
    their first EOF read already carries Python frames. (Programs embedding
    libpython are found when they first hold a lingering socket: diagnosis
    reads their maps.)

    Yields ("reading", pid, uid) before each process's maps, file and memory
    are read, then ("walk", pid, walk) if it is CPython: a read that blocks
    (a page of the process's turned into a FUSE file's since its maps were
    read) leaves the caller what came before and whose process it was,
    which the next scan skips (skip_uids; skip_pids: those already found).

    Each walk also says whose process it is ("uid") and which ("start_time",
    /proc/PID/stat's): the tracer registers it only if that pid still names
    that process, and shares the kernel's map fairly among users. The
    processes are read one user's after another's in turn (round robin by
    uid, a subordinate uid as its user's: sockets/subids.py), so that one
    user's thousands of processes cannot spend the whole deadline, nor the
    limit, before another user's first is read; a user skipped (skip_uids)
    is skipped under every uid of theirs.
    only_pids: these processes only (those that exec()ed since the tracer
    last looked), not every process in proc."""
    import time
    from closewait_trace.evidence.procimage import ProcessImage
    from closewait_trace.sockets import procfs
    skip_uids, skip_pids = frozenset(skip_uids), frozenset(skip_pids)
    if only_pids is not None:
        names = [str(int(pid)) for pid in only_pids]
    else:
        try:
            names = os.listdir(proc)
        except OSError:
            return
    # In turns by user: a subordinate uid as its user's (sockets/subids.py).
    from closewait_trace.sockets import subids
    user_of = subids.shares().user_of
    skip_users = {user_of(uid) for uid in skip_uids}
    by_user: dict[int, list[tuple[int, int]]] = {}
    unchecked: list[int] = []           # only_pids not looked at in time
    for name in names:
        if not name.isdigit() or int(name) in skip_pids:
            continue
        if time.monotonic() > deadline:
            unchecked.append(int(name))
            continue
        try:
            exe = os.readlink(f"{proc}/{name}/exe")      # the kernel's path: no file read
        except OSError:
            continue
        if not INTERPRETER_FILE.match(os.path.basename(exe.replace(" (deleted)", ""))):
            continue
        uid = procfs.real_uid(int(name), proc)
        user = user_of(uid)
        if uid is not None and user not in skip_users:
            by_user.setdefault(user, []).append((uid, int(name)))
    queues = [list(reversed(pids)) for _user, pids in sorted(by_user.items())]
    share = max(0.0, deadline - time.monotonic()) / NEW_PROCESS_SHARES
    found = 0
    while queues and found < limit and time.monotonic() <= deadline:
        for queue in queues:
            if found >= limit or time.monotonic() > deadline:
                break
            uid, pid = queue.pop()
            try:
                stat = procfs.parse_stat(procfs.decode(
                    procfs.read_bytes(f"{proc}/{pid}/stat")))
            except procfs.ProcError:
                continue
            if stat is None:
                continue
            yield ("reading", pid, uid)
            image = ProcessImage(pid, proc)
            try:
                # A new process (only_pids) gets a share of the scan's time
                # at most: a user's program named python3.X whose symbol
                # table takes the whole deadline to search, exec()ed at
                # every tick, kept every other user's new processes from
                # being read, scan after scan (a review).
                runtime = _runtime_or_none(
                    image, deadline if only_pids is None
                    else min(deadline, time.monotonic() + share))
            finally:
                image.close()
            namespace = pid_namespace(proc, pid)
            if runtime is not None and namespace:
                found += 1
                yield ("walk", pid, {**runtime.kernel_walk(), **namespace, "uid": uid,
                                     "start_time": stat.start_time})
        queues = [q for q in queues if q]
    if only_pids is not None:
        # Those not read (the limit, the deadline): the caller's to ask again.
        yield ("left", 0, unchecked + [pid for queue in queues for _uid, pid in queue])


