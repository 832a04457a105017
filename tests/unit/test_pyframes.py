"""Python frames read from a CPython process's memory (evidence/pyframes.py):
the 3.11 layout checked against CPython's own headers, the line table
decoder against the interpreter's own answer for every instruction, a real
process (this one) read through /proc, and crafted memory (loops, endless
chains, wrong types, absurd sizes) bounded."""

import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import types

import pytest

from closewait_trace.evidence import pyframes
from closewait_trace.evidence.procimage import ProcessImage

V311 = sys.version_info[:2] == (3, 11)
needs_311 = pytest.mark.skipif(not V311, reason="the interpreter running the tests is not 3.11")

# The C names of each Layout field, for offsetof().
C_FIELDS = {
    "runtime_interp_head": "_PyRuntimeState, interpreters.head",
    "interp_next": "PyInterpreterState, next",
    "interp_threads_head": "PyInterpreterState, threads.head",
    "tstate_next": "PyThreadState, next",
    "tstate_native_tid": "PyThreadState, native_thread_id",
    "tstate_cframe": "PyThreadState, cframe",
    "cframe_current": "_PyCFrame, current_frame",
    "frame_code": "_PyInterpreterFrame, f_code",
    "frame_previous": "_PyInterpreterFrame, previous",
    "frame_prev_instr": "_PyInterpreterFrame, prev_instr",
    "code_firstlineno": "PyCodeObject, co_firstlineno",
    "code_filename": "PyCodeObject, co_filename",
    "code_qualname": "PyCodeObject, co_qualname",
    "code_linetable": "PyCodeObject, co_linetable",
    "code_adaptive": "PyCodeObject, co_code_adaptive",
    "unicode_length": "PyASCIIObject, length",
    "unicode_state": "PyASCIIObject, state",
    "bytes_size": "PyBytesObject, ob_base.ob_size",
    "bytes_data": "PyBytesObject, ob_sval",
}
C_SIZES = {"ascii_data": "PyASCIIObject", "compact_data": "PyCompactUnicodeObject"}
HEADERS = "/usr/include/python3.11"


def test_the_311_layout_is_cpythons_own(tmp_path):
    """Every offset of the 3.11 table, compiled against Debian's
    libpython3.11-dev internal headers (installed by setup.sh for the tests)."""
    if not (shutil.which("gcc") and os.path.exists(f"{HEADERS}/internal/pycore_frame.h")):
        if os.environ.get("CI") == "true":
            pytest.fail("gcc or libpython3.11-dev missing: scripts/setup.sh test installs them")
        pytest.skip("gcc or CPython 3.11's internal headers not installed")
    lines = [f'printf("{k} %zu\\n", offsetof({v}));' for k, v in C_FIELDS.items()]
    lines += [f'printf("{k} %zu\\n", sizeof({v}));' for k, v in C_SIZES.items()]
    src = tmp_path / "off.c"
    src.write_text("#define Py_BUILD_CORE 1\n#include <Python.h>\n"
                   "#include <internal/pycore_runtime.h>\n#include <internal/pycore_interp.h>\n"
                   "#include <internal/pycore_frame.h>\n#include <stddef.h>\n#include <stdio.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    subprocess.run(["gcc", f"-I{HEADERS}", str(src), "-o", str(tmp_path / "off")], check=True)
    out = subprocess.run([str(tmp_path / "off")], capture_output=True, text=True, check=True)
    measured = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    layout = pyframes.LAYOUTS[(3, 11)]
    assert measured == {k: getattr(layout, k) for k in [*C_FIELDS, *C_SIZES]}
    # (frame_owner: 3.11's frames have no C-stack owner, NO_OWNER.)
    assert set(measured) | {"frame_owner"} == set(pyframes.Layout.__dataclass_fields__)
    assert layout.frame_owner == pyframes.NO_OWNER


def _code_objects(module):
    todo = [v.__code__ for v in vars(module).values() if hasattr(v, "__code__")]
    for cls in (v for v in vars(module).values() if isinstance(v, type)):
        todo += [f.__code__ for f in vars(cls).values() if hasattr(f, "__code__")]
    seen = []
    while todo:
        code = todo.pop()
        seen.append(code)
        todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return seen


@needs_311
def test_line_table_decoder_agrees_with_the_interpreter_on_every_instruction():
    import email.message
    import json.decoder
    import threading as th
    checked = 0
    for module in (th, json.decoder, email.message, pyframes):
        for code in _code_objects(module):
            for start, end, line in code.co_lines():
                for byte in range(start, end, 2):
                    assert pyframes.line_of(code.co_linetable, code.co_firstlineno,
                                            byte // 2) == line, (code, byte)
                    checked += 1
    assert checked > 20_000


def test_line_table_decoder_on_garbage_is_bounded_and_never_raises():
    import random
    rng = random.Random(7)
    for size in (1, 2, 3, 7, 64, 4096):
        for _ in range(300):
            table = bytes(rng.getrandbits(8) for _ in range(size))
            got = pyframes.line_of(table, rng.randrange(-5, 10**6), rng.randrange(0, 10**4))
            assert got is None or (isinstance(got, int) and 0 < got < 1 << 31)
    # A varint that never ends, and one past 64 bits.
    assert pyframes.line_of(bytes([0xF0]) + b"\x7f" * 100, 1, 0) is None
    assert pyframes.line_of(bytes([0xE8]) + b"\x40" * 30, 1, 0) is None


def _blocked_here(ready, release):
    ready.set()
    release.wait(30)                  # THE LINE


@needs_311
def test_this_process_read_through_proc_gives_a_threads_frames():
    """The real thing on a real interpreter: this test process, read through
    /proc/self/mem as the tracer reads a holder."""
    ready, release = threading.Event(), threading.Event()
    t = threading.Thread(target=_blocked_here, args=(ready, release))
    t.start()
    try:
        assert ready.wait(10)
        time.sleep(0.05)
        image = ProcessImage(os.getpid())
        frames, why, walk = pyframes.read_process(image, time.monotonic() + 5, {t.native_id})
        image.close()
    finally:
        release.set()
        t.join()
    assert why == "" and walk["tstate_native_tid"] == 160
    names = [f.function for f in frames[t.native_id]]
    assert names[:3] == ["Condition.wait", "Event.wait", "_blocked_here"], names
    mine = pyframes.own_frame(frames[t.native_id])
    assert mine.function == "_blocked_here" and mine.file == __file__
    with open(__file__) as f:
        assert mine.line == next(i for i, line in enumerate(f, 1) if "# THE LINE" in line)


def test_a_process_that_is_not_python_has_no_frames_and_no_reason():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        image = ProcessImage(proc.pid)
        assert pyframes.read_process(image, time.monotonic() + 5, {proc.pid}) == ({}, "", None)
        image.close()
    finally:
        proc.kill()
        proc.wait()


@needs_311
def test_an_interpreter_whose_name_and_version_disagree_is_not_read(tmp_path):
    """python3.11 copied as python3.99: the binary's Py_Version decides, and
    a disagreement is said, never guessed over."""
    fake = tmp_path / "python3.99"
    shutil.copy(os.path.realpath(sys.executable), fake)
    proc = subprocess.Popen([str(fake), "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        image = ProcessImage(proc.pid)
        frames, why, walk = pyframes.read_process(image, time.monotonic() + 5, {proc.pid})
        image.close()
    finally:
        proc.kill()
        proc.wait()
    assert frames == {} and walk is None and why == "interpreter python3.99 says it is CPython 3.11"


# ------------------------------------------------------------ crafted memory

LAY = pyframes.LAYOUTS[(3, 11)]
CODE_T, STR_T, BYTES_T = 0x10_0000, 0x20_0000, 0x30_0000


class FakeImage:
    """Memory as a dict of address -> bytes blocks: what a holder can put
    anywhere in its own address space."""

    def __init__(self):
        self.blocks = {}
        self.reads = 0
        self.pid = 1

    def put(self, addr, data):
        self.blocks[addr] = bytes(data)

    def read(self, addr, size):
        self.reads += 1
        for start, data in self.blocks.items():
            if start <= addr < start + len(data):
                return data[addr - start:addr - start + size]
        return b""


def _struct(size, **fields):
    buf = bytearray(size)
    for off, (fmt, value) in fields.items():
        struct.pack_into(fmt, buf, int(off[1:]), value)
    return buf


def _str(image, addr, text, length=None):
    head = _struct(LAY.ascii_data, **{f"o{pyframes.OB_TYPE}": ("<Q", STR_T),
                                      f"o{LAY.unicode_length}": ("<q", length or len(text)),
                                      f"o{LAY.unicode_state}": ("<I", 1 << 2 | 1 << 5 | 1 << 6)})
    image.put(addr, head + text.encode())


def _code(image, addr, name="f", filename="/srv/app.py", code_type=CODE_T):
    _str(image, addr + 0x1000, name)
    _str(image, addr + 0x2000, filename)
    table = bytes([0x80 | 13 << 3 | 7, 2 * 5])      # no-column form: line +5, 8 units
    image.put(addr + 0x3000, _struct(LAY.bytes_data, **{
        f"o{pyframes.OB_TYPE}": ("<Q", BYTES_T), f"o{LAY.bytes_size}": ("<q", 2)}) + table)
    image.put(addr, _struct(LAY.code_adaptive + 16, **{
        f"o{pyframes.OB_TYPE}": ("<Q", code_type), f"o{LAY.code_firstlineno}": ("<i", 10),
        f"o{LAY.code_qualname}": ("<Q", addr + 0x1000),
        f"o{LAY.code_filename}": ("<Q", addr + 0x2000),
        f"o{LAY.code_linetable}": ("<Q", addr + 0x3000)}))


def _frame(image, addr, code, previous):
    image.put(addr, _struct(72, **{f"o{LAY.frame_code}": ("<Q", code),
                                   f"o{LAY.frame_previous}": ("<Q", previous),
                                   f"o{LAY.frame_prev_instr}": ("<Q", code + LAY.code_adaptive)}))


def _process(image, first_frame, tid=42, tstate_next=0, tstate=0x50_0000):
    runtime = 0x40_0000
    interp, cframe = 0x41_0000, 0x42_0000
    image.put(runtime, _struct(64, **{f"o{LAY.runtime_interp_head}": ("<Q", interp)}))
    image.put(interp, _struct(32, **{f"o{LAY.interp_threads_head}": ("<Q", tstate)}))
    image.put(tstate, _struct(LAY.tstate_native_tid + 8, **{
        f"o{LAY.tstate_next}": ("<Q", tstate_next), f"o{LAY.tstate_cframe}": ("<Q", cframe),
        f"o{LAY.tstate_native_tid}": ("<Q", tid)}))
    image.put(cframe, _struct(16, **{f"o{LAY.cframe_current}": ("<Q", first_frame)}))
    return pyframes.Runtime((3, 11), LAY, runtime, CODE_T, STR_T, BYTES_T)


def _walk(image, runtime, tids=frozenset({42})):
    return pyframes.thread_frames(image, time.monotonic() + 5, set(tids), runtime)


def test_crafted_frames_read_right():
    image = FakeImage()
    _code(image, 0x60_0000, "handle", "/srv/app.py")
    _frame(image, 0x70_0000, 0x60_0000, 0)
    frames = _walk(image, _process(image, 0x70_0000))
    assert frames == {42: [pyframes.PyFrame("handle", "/srv/app.py", 15)]}


def test_a_frame_chain_that_loops_or_never_ends_is_cut():
    image = FakeImage()
    _code(image, 0x60_0000)
    _frame(image, 0x70_0000, 0x60_0000, 0x70_0000)          # its own caller
    assert len(_walk(image, _process(image, 0x70_0000))[42]) == 1
    image = FakeImage()
    _code(image, 0x60_0000)
    for i in range(10_000):                                 # 10,000 distinct frames
        _frame(image, 0x100_0000 + 128 * i, 0x60_0000, 0x100_0000 + 128 * (i + 1))
    image.reads = 0
    assert len(_walk(image, _process(image, 0x100_0000))[42]) == pyframes.MAX_FRAMES
    assert image.reads < 3 * pyframes.MAX_FRAMES + 20       # the code object read once


def test_thread_states_that_loop_or_never_end_are_bounded():
    image = FakeImage()
    _code(image, 0x60_0000)
    _frame(image, 0x70_0000, 0x60_0000, 0)
    # A thread state whose next is itself: walked once, the wanted tid absent.
    runtime = _process(image, 0x70_0000, tid=7, tstate_next=0x50_0000)
    assert _walk(image, runtime) == {}
    # 100,000 distinct states: refused past MAX_THREAD_STATES, not walked on.
    image = FakeImage()
    for i in range(pyframes.MAX_THREAD_STATES + 10):
        image.put(0x200_0000 + 256 * i, _struct(LAY.tstate_native_tid + 8, **{
            f"o{LAY.tstate_next}": ("<Q", 0x200_0000 + 256 * (i + 1)),
            f"o{LAY.tstate_native_tid}": ("<Q", 1)}))
    runtime = _process(image, 0, tid=1, tstate=0x300_0000, tstate_next=0x200_0000)
    with pytest.raises(pyframes.Unreadable, match="more than 1024 thread states"):
        _walk(image, runtime, tids={42})


def test_objects_of_the_wrong_type_or_absurd_size_are_not_believed():
    image = FakeImage()
    _code(image, 0x60_0000, code_type=0xBAD)                # not a code object
    _frame(image, 0x70_0000, 0x60_0000, 0)
    assert _walk(image, _process(image, 0x70_0000)) == {42: []}
    image = FakeImage()
    _code(image, 0x60_0000)
    _str(image, 0x60_1000, "x" * 10, length=1 << 60)        # a name claiming 2^60 chars
    _frame(image, 0x70_0000, 0x60_0000, 0)
    # Cut to what was put there: the name is not believed, nor the frame.
    assert _walk(image, _process(image, 0x70_0000)) == {42: []}
    image = FakeImage()
    _code(image, 0x60_0000)
    image.put(0x60_3000, _struct(LAY.bytes_data, **{            # a line table of 2^40 bytes
        f"o{pyframes.OB_TYPE}": ("<Q", BYTES_T), f"o{LAY.bytes_size}": ("<q", 1 << 40)}))
    _frame(image, 0x70_0000, 0x60_0000, 0)
    [frame] = _walk(image, _process(image, 0x70_0000))[42]
    assert frame.line is None and image.reads < 20


def test_reads_per_process_are_capped():
    """200 threads of 32 frames each would take 6,400 reads: stopped at
    MAX_READS, said."""
    image = FakeImage()
    for i in range(40):
        _code(image, 0x1000_0000 + 0x10000 * i, f"f{i}")
    for i in range(200 * 32):
        nxt = 0 if i % 32 == 31 else 0x100_0000 + 128 * (i + 1)
        _frame(image, 0x100_0000 + 128 * i, 0x1000_0000 + 0x10000 * (i % 40), nxt)
    runtime = _process(image, 0, tid=10_000, tstate=0x300_0000, tstate_next=0x400_0000)
    for t in range(200):
        cframe = 0x500_0000 + 64 * t
        image.put(cframe, _struct(16, **{f"o{LAY.cframe_current}": ("<Q", 0x100_0000 + 128 * 32 * t)}))
        image.put(0x400_0000 + 256 * t, _struct(LAY.tstate_native_tid + 8, **{
            f"o{LAY.tstate_next}": ("<Q", 0x400_0000 + 256 * (t + 1) if t < 199 else 0),
            f"o{LAY.tstate_cframe}": ("<Q", cframe), f"o{LAY.tstate_native_tid}": ("<Q", t + 1)}))
    image.reads = 0
    with pytest.raises(pyframes.Unreadable, match="more than 4096 reads"):
        _walk(image, runtime, tids=set(range(1, 201)))
    assert image.reads == pyframes.MAX_READS


# ------------------------------------------------ frames the kernel copied

def test_a_capture_s_frames_are_resolved_and_cut_at_the_first_that_does_not_check_out(
        monkeypatch):
    image = FakeImage()
    _code(image, 0x60_0000, "Api.handle", "/srv/app.py")
    _code(image, 0x61_0000, "<module>", "/srv/app.py")
    runtime = _process(image, 0)
    monkeypatch.setattr(pyframes, "find_runtime", lambda image, deadline: (runtime, ""))
    instr = 0x60_0000 + LAY.code_adaptive + 2 * 3       # instruction 3: line 15
    deadline = time.monotonic() + 5
    frames, why = pyframes.resolve_capture(image, deadline, pyframes.PY_COPIED,
                                           ((0x60_0000, instr), (0x61_0000, 0)))
    assert why == "" and frames == [
        {"function": "Api.handle", "file": "/srv/app.py", "line": 15},
        {"function": "<module>", "file": "/srv/app.py", "line": None}]
    # A code object freed or overwritten since: nothing from it on, said.
    assert pyframes.resolve_capture(image, deadline, pyframes.PY_COPIED,
                                    ((0xDEAD_0000, 0), (0x60_0000, instr))) == (
        [], "its frames do not check out now (a code object freed or overwritten since "
            "the read)")
    # Pairs past MAX_FRAMES are not looked at.
    many = ((0x60_0000, instr),) * 1000
    image.reads = 0
    frames, _ = pyframes.resolve_capture(image, deadline, pyframes.PY_COPIED, many)
    assert len(frames) == pyframes.MAX_FRAMES and image.reads < 20
    # What the kernel said instead of frames.
    assert pyframes.resolve_capture(image, deadline, pyframes.PY_NO_THREAD, ()) == (
        [], pyframes.CAPTURE_STATUS[pyframes.PY_NO_THREAD])
    assert pyframes.resolve_capture(image, deadline, pyframes.PY_NONE, ()) == (
        [], pyframes.NOT_YET_KNOWN)
    monkeypatch.setattr(pyframes, "find_runtime", lambda image, deadline: (None, ""))
    assert pyframes.resolve_capture(image, deadline, pyframes.PY_NONE, ()) == ([], "")


def test_the_place_is_the_first_python_frame_in_the_program_s_own_code():
    from closewait_trace.evidence import place
    frames = [{"function": "socket.recv_into", "file": "/usr/lib/python3.11/socket.py",
               "line": 705},
              {"function": "Session.get", "file":
               "/usr/lib/python3/dist-packages/requests/sessions.py", "line": 600},
              {"function": "fetch_user", "file": "/srv/app/client.py", "line": 41},
              {"function": "<module>", "file": "/srv/app/client.py", "line": 50}]
    where = place.python_place(frames)
    assert (where["function"], where["file"], where["line"], where["method"]) == (
        "fetch_user", "/srv/app/client.py", 41, "python")
    assert place.python_place(frames[:1])["function"] == "socket.recv_into"
    assert place.python_place([]) is None
    from closewait_trace.output import render
    assert render.describe_place(where) == "fetch_user (client.py:41)"


def test_a_capture_s_python_frames_fit_80_columns_and_are_escaped():
    from closewait_trace.output import render
    rec = {"ts": 10.0, "code": {"eof_read": {
        "ts": 9.0, "pid": 1, "tid": 1, "comm": "python3", "after_s": 0.1, "stack_bytes": 4096,
        "unwound": True, "stack": [], "place": None,
        "python": [{"function": "handle\x1b[31m" + "x" * 100, "file": "/srv/" + "d/" * 60
                    + "app.py", "line": 12}]}}}
    lines = render.code_lines(rec, verbose=True)
    py = [l for l in lines if l.lstrip().startswith("py ")]
    assert len(py) == 1 and py[0].endswith("app.py:12)") and "\x1b" not in py[0]
    assert all(len(l) <= 80 for l in lines), lines
