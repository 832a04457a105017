"""CPython 3.12 and 3.13 frames (issue 18 §2), against real interpreters
run in the chroots setup builds (tests/pychroots.py): 3.12's layout table
and 3.13's _Py_DebugOffsets field list checked by offsetof against their
own internal headers; the layout a 3.13 process's debug offsets give
checked against the same headers; real 3.12/3.13 threads read through
/proc; and debug offsets that do not check out (garbage, shifted, absurd)
refused with a reason, never believed, never raising anything else."""

import os
import random
import shutil
import struct
import subprocess
import time

import pytest

from closewait_trace.evidence import pyframes
from closewait_trace.evidence.procimage import ProcessImage
from tests.pychroots import Script, chroot_of, popen

# chroot(2) into the interpreters' chroots, and their processes' memory.
pytestmark = pytest.mark.root


def _offsets(tmp_path, version, exprs: dict) -> dict:
    """{key: value} of C expressions (offsetof/sizeof) compiled against the
    chroot's CPython internal headers."""
    if not shutil.which("gcc"):
        pytest.fail("gcc missing: scripts/setup.sh test installs it")
    root = chroot_of(version)
    v = f"python{version[0]}.{version[1]}"
    # Its pyconfig.h includes <x86_64-linux-gnu/python3.X/pyconfig.h>: that
    # directory alone, not the chroot's libc headers.
    inc = tmp_path / "inc" / "x86_64-linux-gnu"
    inc.mkdir(parents=True)
    (inc / v).symlink_to(f"{root}/usr/include/x86_64-linux-gnu/{v}")
    lines = [f'printf("{k} %zu\\n", (size_t)({e}));' for k, e in exprs.items()]
    src = tmp_path / "off.c"
    src.write_text("#define Py_BUILD_CORE 1\n#include <Python.h>\n"
                   "#include <internal/pycore_runtime.h>\n#include <internal/pycore_interp.h>\n"
                   "#include <internal/pycore_frame.h>\n#include <stddef.h>\n#include <stdio.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    subprocess.run(["gcc", f"-I{root}/usr/include/{v}", f"-I{tmp_path / 'inc'}", str(src),
                    "-o", str(tmp_path / "off")], check=True)
    out = subprocess.run([str(tmp_path / "off")], capture_output=True, text=True, check=True)
    return {k: int(n) for k, n in (line.split() for line in out.stdout.splitlines())}


C_312 = {
    "runtime_interp_head": "offsetof(_PyRuntimeState, interpreters.head)",
    "interp_next": "offsetof(PyInterpreterState, next)",
    "interp_threads_head": "offsetof(PyInterpreterState, threads.head)",
    "tstate_next": "offsetof(PyThreadState, next)",
    "tstate_native_tid": "offsetof(PyThreadState, native_thread_id)",
    "tstate_cframe": "offsetof(PyThreadState, cframe)",
    "cframe_current": "offsetof(_PyCFrame, current_frame)",
    "frame_code": "offsetof(_PyInterpreterFrame, f_code)",
    "frame_previous": "offsetof(_PyInterpreterFrame, previous)",
    "frame_prev_instr": "offsetof(_PyInterpreterFrame, prev_instr)",
    "frame_owner": "offsetof(_PyInterpreterFrame, owner)",
    "code_firstlineno": "offsetof(PyCodeObject, co_firstlineno)",
    "code_filename": "offsetof(PyCodeObject, co_filename)",
    "code_qualname": "offsetof(PyCodeObject, co_qualname)",
    "code_linetable": "offsetof(PyCodeObject, co_linetable)",
    "code_adaptive": "offsetof(PyCodeObject, co_code_adaptive)",
    "unicode_length": "offsetof(PyASCIIObject, length)",
    "unicode_state": "offsetof(PyASCIIObject, state)",
    "ascii_data": "sizeof(PyASCIIObject)",
    "compact_data": "sizeof(PyCompactUnicodeObject)",
    "bytes_size": "offsetof(PyBytesObject, ob_base.ob_size)",
    "bytes_data": "offsetof(PyBytesObject, ob_sval)",
}
# 3.13: the same fields by their 3.13 names (no _PyCFrame: the thread
# state's current_frame; the frame's f_executable and instr_ptr).
C_313 = {**C_312,
         "tstate_cframe": "offsetof(PyThreadState, current_frame)",
         "frame_code": "offsetof(_PyInterpreterFrame, f_executable)",
         "frame_prev_instr": "offsetof(_PyInterpreterFrame, instr_ptr)"}
del C_313["cframe_current"]


def test_the_312_layout_is_cpythons_own(tmp_path):
    measured = _offsets(tmp_path, (3, 12), C_312)
    layout = pyframes.LAYOUTS[(3, 12)]
    assert measured == {k: getattr(layout, k) for k in C_312}
    assert set(measured) == set(pyframes.Layout.__dataclass_fields__)


def test_the_313_debug_offsets_fields_are_cpythons_own(tmp_path):
    """DEBUG_FIELDS_313, in order, is 3.13's _Py_DebugOffsets: each field at
    8 + 8 * its index, and nothing after the last."""
    exprs = {f: f"offsetof(_Py_DebugOffsets, {f})" for f in pyframes.DEBUG_FIELDS_313}
    exprs["sizeof"] = "sizeof(_Py_DebugOffsets)"
    exprs["cookie"] = "offsetof(_Py_DebugOffsets, cookie)"
    exprs["runtime_first"] = "offsetof(_PyRuntimeState, debug_offsets)"
    measured = _offsets(tmp_path, (3, 13), exprs)
    assert measured.pop("sizeof") == pyframes.DEBUG_SIZE_313
    assert measured.pop("cookie") == 0 and measured.pop("runtime_first") == 0
    assert measured == {f: 8 + 8 * i for i, f in enumerate(pyframes.DEBUG_FIELDS_313)}


HOLDER = """\
import threading, time
ready = threading.Event()

def waits_here(event):
    ready.set()
    event.wait()                          # WAITS HERE

stop = threading.Event()
t = threading.Thread(target=waits_here, args=(stop,), name="worker")
t.start()
ready.wait()
print("ready", flush=True)
time.sleep(300)
"""


def _holder(procs_list, version):
    script = Script(version, "holder.py", HOLDER)
    proc = popen(script, stdout=subprocess.PIPE, text=True)
    procs_list.append((proc, script))
    assert proc.stdout.readline().strip() == "ready"
    return proc, script


@pytest.fixture
def holders():
    started = []
    yield started
    for proc, script in started:
        proc.kill()
        proc.wait()
        script.remove()


def _tids(pid):
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("version", [(3, 12), (3, 13)])
def test_a_real_threads_frames_are_read_through_proc(holders, version):
    proc, script = _holder(holders, version)
    line = next(i for i, l in enumerate(open(script.host), 1) if "# WAITS HERE" in l)
    image = ProcessImage(proc.pid, "/proc")
    try:
        deadline = time.monotonic() + 10
        runtime, why = pyframes.find_runtime(image, deadline)
        assert runtime is not None, why
        assert runtime.version == version
        found = pyframes.thread_frames(image, deadline, _tids(proc.pid), runtime)
    finally:
        image.close()
    worker = next(fs for tid, fs in found.items() if tid != proc.pid)
    names = [f.function for f in worker]
    assert names[:3] == ["Condition.wait", "Event.wait", "waits_here"], names
    assert names[-1] == "Thread._bootstrap", names
    mine = pyframes.own_frame(worker)
    assert (mine.function, mine.file, mine.line) == ("waits_here", script.path, line)
    main = [f.function for f in found[proc.pid]]
    assert main == ["<module>"], main


def test_the_313_layout_from_a_process_s_debug_offsets_is_cpythons_own(holders, tmp_path):
    """What debug_layout derives from a real 3.13 process equals offsetof()
    against trixie's libpython3.13-dev headers, field by field."""
    proc, _script = _holder(holders, (3, 13))
    image = ProcessImage(proc.pid, "/proc")
    try:
        runtime, why = pyframes.find_runtime(image, time.monotonic() + 10)
    finally:
        image.close()
    assert runtime is not None, why
    measured = _offsets(tmp_path, (3, 13), C_313)
    assert measured == {k: getattr(runtime.layout, k) for k in C_313}
    assert runtime.layout.cframe_current == pyframes.NO_CFRAME
    walk = runtime.kernel_walk()
    # The kernel's walk: no _PyCFrame, the owner byte where the headers put it.
    assert (walk["cframe_current"], walk["frame_owner"]) == (0xFFFF, measured["frame_owner"])
    assert walk["tstate_cframe"] == measured["tstate_cframe"]


def _good_313_offsets(tmp_path) -> bytes:
    """A real 3.13 process's _Py_DebugOffsets, as bytes."""
    root = chroot_of((3, 13))
    out = subprocess.run(
        ["chroot", root, "python3.13", "-c",
         "import ctypes,sys; a=ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi,"
         f"'_PyRuntime')); sys.stdout.write(ctypes.string_at(a, {pyframes.DEBUG_SIZE_313})"
         ".hex())"], capture_output=True, text=True, check=True, timeout=60)
    return bytes.fromhex(out.stdout)


def _with(raw: bytes, field: str, value: int) -> bytes:
    at = 8 + 8 * pyframes.DEBUG_FIELDS_313.index(field)
    return raw[:at] + struct.pack("<Q", value) + raw[at + 8:]


def test_debug_offsets_that_do_not_check_out_are_refused(tmp_path):
    raw = _good_313_offsets(tmp_path)
    good = pyframes.debug_layout(raw, (3, 13))
    assert good.frame_owner != pyframes.NO_OWNER
    bad = {
        "no cookie": b"ydebugpy" + raw[8:],
        "cut short": raw[:100],
        "another version": _with(raw, "version", 0x030C05F0),
        "free-threaded": _with(raw, "free_threaded", 1),
        "frame size absurd": _with(raw, "interpreter_frame.size", 1 << 40),
        "offset past its struct": _with(raw, "thread_state.native_thread_id", 1 << 20),
        "unaligned pointer": _with(raw, "interpreter_frame.previous", 9),
        "overlapping fields": _with(raw, "interpreter_frame.executable",
                                    good.frame_previous),
        "not CPython's object header": _with(raw, "pyobject.ob_type", 16),
        # Inside a (large) interpreter state, but past the kernel walk's 16 bits.
        "past 16 bits": _with(raw, "interpreter_state.threads_head", 0x10000),
        # The whole struct read one field late (another struct layout).
        "shifted": raw[:8] + raw[16:] + b"\0" * 8,
    }
    for what, data in bad.items():
        with pytest.raises(pyframes.Unreadable) as e:
            pyframes.debug_layout(data, (3, 13))
        assert str(e.value), what
    with pytest.raises(pyframes.Unreadable, match="past what the kernel's walk holds"):
        pyframes.debug_layout(bad["past 16 bits"], (3, 13))
    rng = random.Random(18)
    for _ in range(2000):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(8, len(data))] = rng.randrange(256)
        try:
            layout = pyframes.debug_layout(bytes(data), (3, 13))
        except pyframes.Unreadable:
            continue
        # Believed only within bounds: every offset inside its structure,
        # the kernel walk's within its 16 bits.
        assert all(0 <= getattr(layout, f) < 1 << 22 or getattr(layout, f) == -1
                   for f in pyframes.Layout.__dataclass_fields__)
        walk = pyframes.Runtime((3, 13), layout, 1 << 20, 0, 0, 0).kernel_walk()
        assert all(0 <= v <= 0xFFFF for k, v in walk.items() if k != "interp_head")


def test_c_stack_entry_frames_are_skipped_and_an_endless_run_of_them_is_bounded():
    """3.12/3.13: frames the C stack owns (FRAME_OWNED_BY_CSTACK; 3.13's
    f_executable there is None, not a code object) are stepped over, not
    an end of the chain; a holder's endless chain of them is cut."""
    import dataclasses
    from tests.unit import test_pyframes as t
    lay = dataclasses.replace(t.LAY, cframe_current=pyframes.NO_CFRAME, frame_owner=70)

    def frame(image, addr, code, previous, owner=0):
        image.put(addr, t._struct(80, **{f"o{lay.frame_code}": ("<Q", code),
                                         f"o{lay.frame_previous}": ("<Q", previous),
                                         f"o{lay.frame_prev_instr}": ("<Q", code + lay.code_adaptive),
                                         f"o{lay.frame_owner}": ("<B", owner)}))

    def process(image, first):
        runtime, interp, tstate = 0x40_0000, 0x41_0000, 0x50_0000
        image.put(runtime, t._struct(64, **{f"o{lay.runtime_interp_head}": ("<Q", interp)}))
        image.put(interp, t._struct(32, **{f"o{lay.interp_threads_head}": ("<Q", tstate)}))
        image.put(tstate, t._struct(lay.tstate_native_tid + 8, **{
            f"o{lay.tstate_cframe}": ("<Q", first), f"o{lay.tstate_native_tid}": ("<Q", 42)}))
        return pyframes.Runtime((3, 13), lay, runtime, t.CODE_T, t.STR_T, t.BYTES_T)

    image = t.FakeImage()
    t._code(image, 0x60_0000, "handle")
    t._code(image, 0x68_0000, "main")
    none_object = 0x66_0000                          # not a code object
    frame(image, 0x70_0000, 0x60_0000, 0x71_0000)
    frame(image, 0x71_0000, none_object, 0x72_0000, owner=pyframes.FRAME_OWNED_BY_CSTACK)
    frame(image, 0x72_0000, 0x68_0000, 0)
    found = pyframes.thread_frames(image, time.monotonic() + 5, {42}, process(image, 0x70_0000))
    assert [f.function for f in found[42]] == ["handle", "main"]
    # 10,000 entry frames in a row, then a real one: cut, and read within bounds.
    image = t.FakeImage()
    t._code(image, 0x60_0000, "handle")
    for i in range(10_000):
        frame(image, 0x100_0000 + 128 * i, none_object, 0x100_0000 + 128 * (i + 1),
              owner=pyframes.FRAME_OWNED_BY_CSTACK)
    frame(image, 0x100_0000 + 128 * 10_000, 0x60_0000, 0)
    image.reads = 0
    found = pyframes.thread_frames(image, time.monotonic() + 5, {42}, process(image, 0x100_0000))
    assert found[42] == []
    assert image.reads <= 2 * pyframes.MAX_FRAMES + 10


def test_code_object_fields_past_what_is_read_of_it_are_refused_not_raised(tmp_path):
    """A code object is read as its first co_code_adaptive bytes: a 3.13
    holder whose debug offsets put co_filename past them (its code_object
    size raised to make room) is refused with a reason. Before, the layout
    was believed and each frame's read raised struct.error, said as
    "Python frames not read (error)" and counted as the tracer's problem."""
    raw = _good_313_offsets(tmp_path)
    good = pyframes.debug_layout(raw, (3, 13))
    for field in ("filename", "qualname", "linetable", "firstlineno"):
        forged = _with(_with(raw, "code_object.size", 2048), f"code_object.{field}", 1024)
        with pytest.raises(pyframes.Unreadable, match=f"code_object.{field} at 1024, outside"):
            pyframes.debug_layout(forged, (3, 13))
    # Inside the object header (its type pointer): not a field either.
    with pytest.raises(pyframes.Unreadable, match="code_object.qualname at 8"):
        pyframes.debug_layout(_with(raw, "code_object.qualname", 8), (3, 13))
    # And the reader never raises on such a layout, whoever made it.
    import dataclasses
    from tests.unit import test_pyframes as t
    image = t.FakeImage()
    t._code(image, 0x60_0000, "handle")
    runtime = pyframes.Runtime((3, 13), dataclasses.replace(t.LAY, code_filename=1024),
                               0x40_0000, t.CODE_T, t.STR_T, t.BYTES_T)
    assert pyframes._code(pyframes._Memory(image), runtime, 0x60_0000) is None
    assert good.code_filename + 8 <= good.code_adaptive
