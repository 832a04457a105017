"""Where a socket was read to its end: naming the place (evidence/place.py),
unwinding the kernel's copy of the stack without trusting it
(symbolize.CapturedImage, unwind_x86_64.fp_chain), and saying it (records,
render, the schema's upgrade of older recordings). Pure: no root, no kernel."""

from __future__ import annotations

import struct
import time

import pytest

from closewait_trace.evidence import place, unwind_x86_64
from closewait_trace.evidence.procimage import Mapping
from closewait_trace.evidence.symbolize import CapturedImage
from closewait_trace.kernel.events import EofCapture
from closewait_trace.output import records, render, schema
from tests.unit.recordfactory import holder

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def frame(function, module="/srv/app", offset=0x10):
    return {"pc": "0x1000", "function": function, "offset": offset, "module": module,
            "build_id": None, "method": "cfi", "symbols": "symtab"}


# ------------------------------------------------------------- the place

def test_the_place_is_the_programs_own_code_past_the_c_library():
    frames = [frame("read", LIBC), frame("handle_client.isra.0"), frame("main"),
              frame("__libc_start_call_main", LIBC)]
    assert place.place_of(frames)["function"] == "handle_client.isra.0"


def test_go_standard_library_frames_are_machinery_main_and_modules_are_not():
    stack = [frame("runtime/internal/syscall.Syscall6"), frame("syscall.read"),
             frame("internal/poll.(*FD).Read"), frame("net.(*conn).Read"),
             frame("main.handle"), frame("main.main")]
    assert place.place_of(stack)["function"] == "main.handle"
    assert place.place_of([frame("net/http.(*persistConn).readLoop"),
                           frame("github.com/acme/pool.(*Pool).get")])["function"] == \
        "github.com/acme/pool.(*Pool).get"


@pytest.mark.parametrize("name", ["handle_client.isra.0", "serve.part.1", "f.cold",
                                  "reader.constprop.0.isra.0"])
def test_c_compiler_clones_are_not_mistaken_for_go_packages(name):
    assert not place.is_go_std(name)


def test_a_stack_that_is_all_system_code_names_the_caller_of_the_c_library():
    # An installed interpreter: its extension module's function that read.
    sock = "/usr/lib/python3.11/lib-dynload/_socket.cpython-311-x86_64-linux-gnu.so"
    frames = [frame("recv", LIBC), frame("sock_recv", sock),
              frame("_PyEval_EvalFrameDefault", "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0")]
    assert place.place_of(frames)["function"] == "sock_recv"
    frames = [frame("read", LIBC), frame("start_thread", LIBC)]
    assert place.place_of(frames)["function"] == "read"
    assert place.place_of([]) is None
    assert place.place_of(["junk", None]) is None


# ------------------------------------------- the copy, distrusted

class FakeImage:
    """A process image with one code mapping whose every return address
    'follows a call', and memory that records what was asked of it."""

    def __init__(self):
        self.code = Mapping(0x400000, 0x500000, "r-xp", 0, 1, "/srv/app", "08:01")
        self.stack = Mapping(0x7ff000000000, 0x7ff000100000, "rw-p", 0, 0, "[stack]")
        self.reads = []

    def mapping(self, addr):
        for m in (self.code, self.stack):
            if m.start <= addr < m.end:
                return m
        return None

    def unreadable_reason(self, m):
        return ""

    def file_of(self, m):
        return None

    def read(self, addr, size):
        self.reads.append(addr)
        if self.code.start <= addr < self.code.end:
            # e8 xx xx xx xx: a call rel32 ends just before every address.
            return (b"\x90\x90\xe8\x00\x00\x00\x00")[-size:] if size <= 7 else b""
        return b"\xff" * size        # the live stack: must never be used


class Session:
    def __init__(self, image):
        self.image = image

    def index_for(self, m):
        return None                   # no CFI: the frame pointer chain is all there is

    def frame(self, pc, method):
        return (pc, method)


SP = 0x7ff000010000


def words(*values):
    return b"".join(struct.pack("<Q", v) for v in values)


def test_the_copy_serves_the_stack_and_nothing_else_of_the_live_memory():
    real = FakeImage()
    image = CapturedImage(real, SP, words(1, 2, 3))
    assert image.read(SP + 8, 8) == words(2)
    assert image.read(SP + 16, 64) == words(3)          # cut at the copy's end
    assert image.read(SP + 24, 8) == b""                # past it: not the live stack
    assert image.read(SP - 8, 8) == b""
    assert image.read(0x400010, 7)[-5] == 0xE8          # code: from the file mapping
    assert all(not (real.stack.start <= a < real.stack.end) for a in real.reads)


def test_a_frame_pointer_chain_is_followed_upwards_only():
    # [bp] -> caller's bp, [bp + 8] -> return address; three good links,
    # then a link that points back down (a loop): the walk ends there.
    stack = bytearray(256)
    def put(off, value):
        stack[off:off + 8] = struct.pack("<Q", value)
    put(0x10, SP + 0x40); put(0x18, 0x400100)
    put(0x40, SP + 0x80); put(0x48, 0x400200)
    put(0x80, SP + 0x10); put(0x88, 0x400300)           # back to the first: a loop
    image = CapturedImage(FakeImage(), SP, bytes(stack))
    chain = unwind_x86_64.fp_chain(Session(image), SP + 0x10, SP, room=64)
    assert chain == [0x400100, 0x400200, 0x400300]


@pytest.mark.parametrize("bp", [SP - 16, SP + 3, 0, 1 << 63, SP + (1 << 40)])
def test_absurd_frame_pointers_give_no_frames(bp):
    image = CapturedImage(FakeImage(), SP, bytes(4096))
    assert unwind_x86_64.fp_chain(Session(image), bp, SP, room=64) == []


def test_a_self_referencing_chain_over_the_whole_copy_ends_within_its_bound():
    # Every word points at the next link 16 bytes up and at code: the walk
    # is as long as the copy allows and no longer than room.
    stack = b"".join(words(SP + i + 16, 0x400100) for i in range(0, 4096, 16))
    image = CapturedImage(FakeImage(), SP, stack)
    started = time.monotonic()
    chain = unwind_x86_64.fp_chain(Session(image), SP, SP, room=16)
    assert len(chain) == 16
    assert time.monotonic() - started < 5


def test_the_unwinder_falls_back_to_the_chain_and_labels_the_frames():
    stack = bytearray(64)
    stack[0x10:0x20] = words(SP + 0x30, 0x400100)
    stack[0x30:0x40] = words(0, 0x400200)
    image = CapturedImage(FakeImage(), SP, bytes(stack))
    frames = unwind_x86_64.unwind(Session(image), 0x400050, SP, 16, bp=SP + 0x10)
    assert frames == [(0x400050, "pc"), (0x400100, "fp"), (0x400200, "fp")]


# ------------------------------------------------- records and text

def capture(**kw):
    values = dict(ts_ns=5_000_000_000, pid=4312, tid=4313, comm="api", ip=0x400050,
                  sp=SP, bp=0, stack=bytes(512))
    values.update(kw)
    return EofCapture(**values)


def linger_with(code, check=True):
    rec = {"type": "linger", "ts": 1000.0, "time": "x", "family": "ipv4",
           "laddr": "127.0.0.1", "lport": 80, "raddr": "127.0.0.1", "rport": 5555,
           "age_s": 3.0, "age_source": "traced", "age_max_s": None,
           "age_is_lower_bound": False, "pre_existing": False, "update": False,
           "owner_kind": "holders", "owners": [], "netns": None, "inode": None,
           "unread_bytes": 0, "eof_read": True, "listener": None, "also_in_netns": [],
           "diagnosis": {"cause": "unknown", "summary": "something", "evidence": {}},
           "code": code}
    if check:
        assert schema.problem(rec) is None, schema.problem(rec)
    return rec


def test_an_eof_read_is_a_valid_record_and_one_line_that_names_the_place():
    stack = [frame("read", LIBC), frame("handle_client", offset=0x1f)]
    code = records.code_eof_read(capture(), 997.6, 4_900_000_000, stack,
                                 place.place_of(stack))
    rec = linger_with(code)
    lines = render.code_lines(rec, verbose=False)
    assert lines == ["         read EOF in handle_client (app) 2.4s ago, never closed"]
    verbose = render.code_lines(rec, verbose=True)
    assert "by 4312/api thread 4313, 100ms after the peer closed" in " ".join(verbose)
    assert any("handle_client+0x1f (app) [cfi]" in l for l in verbose)
    assert all(len(l) <= 80 for l in verbose)


def test_a_reader_that_no_longer_holds_the_socket_is_not_said_to_never_close_it():
    """A server reads EOF and closes its copy; a child that inherited the
    fd keeps the socket in CLOSE_WAIT. The line says who read EOF and that
    it no longer holds the socket, not "never closed" (the server did
    close; the leak is the inheritance, which the diagnosis names)."""
    code = records.code_eof_read(capture(), 997.6, 4_900_000_000, [], None)
    code["eof_read"]["not_unwound"] = "4312 does not hold the socket now: its place is not read"
    rec = linger_with(code, check=False)
    rec["owners"] = [holder(pid=5000, comm="sleep", fd=4)]
    assert schema.problem(rec) is None, schema.problem(rec)
    assert render.code_lines(rec, verbose=False) == [
        "         read EOF 2.4s ago by 4312/api, which no longer holds it"]
    verbose = " ".join(render.code_lines(rec, verbose=True))
    assert "never closed" not in verbose
    assert "place not read: 4312 does not hold the socket now" in verbose
    # The reader among the holders: it read EOF and never closed, as before.
    stack = [frame("handle_client")]
    rec["code"] = records.code_eof_read(capture(), 997.6, 4_900_000_000, stack, stack[0])
    rec["owners"] = [holder(pid=4312, comm="api", fd=4)]
    assert render.code_lines(rec, verbose=False) == [
        "         read EOF in handle_client (app) 2.4s ago, never closed"]


def test_the_line_is_not_repeated_under_a_diagnosis_that_says_it():
    stack = [frame("handle_client", offset=0x1f)]
    rec = linger_with(records.code_eof_read(capture(), 999.0, 0, stack, stack[0]))
    shown = "[S] read EOF in handle_client (app) and never closed: 4312/api fd 4"
    assert render.code_lines(rec, verbose=False, shown=shown) == []


def test_a_hostile_comm_and_function_reach_the_terminal_escaped():
    evil = "\x1b]0;pwned\x07"
    stack = [frame(evil)]
    rec = linger_with(records.code_eof_read(capture(comm="a\x1bb"), 999.0, 0, stack, stack[0]))
    for line in render.code_lines(rec, verbose=True):
        assert "\x1b" not in line and "\x07" not in line


def test_the_place_is_named_as_the_source_names_it():
    assert render.describe_place(frame("handle_client.isra.0")) == "handle_client (app)"
    assert render.describe_place(frame("f.constprop.0.isra.0")) == "f (app)"
    assert render.describe_place(frame("main.handle")) == "main.handle (app)"
    assert render.describe_place({"pc": "0x7f00", "module": None}) == "0x7f00 (?)"


def test_unknown_and_none_seen_are_said_apart_with_v():
    unknown = render.code_lines(linger_with(records.code_unknown(records.CODE_PRE_EXISTING)),
                                verbose=True)
    # (A server's socket: no connect() line, it was accepted.)
    assert unknown == ["         EOF read: place not known: in CLOSE_WAIT before the trace "
                       "began"]
    none = render.code_lines(linger_with(records.code_none_seen()), verbose=True)
    assert none == ["         EOF read: none seen since the peer closed"]
    assert render.code_lines(linger_with(records.code_none_seen()), verbose=False) == []


def test_older_recordings_are_read_with_the_place_said_unknown():
    rec = linger_with(None, check=False)
    del rec["code"]
    upgraded = schema.upgrade(rec, 2)
    assert schema.problem(upgraded) is None
    assert upgraded["code"] == {"eof_read": None,
                                "eof_read_unknown": schema.CODE_NOT_RECORDED}


def test_an_opener_is_one_line_and_the_reports_lead_when_nothing_read_eof():
    from closewait_trace.output import report
    stack = [frame("connect", LIBC), frame("fetch_user")]
    code = records.code_none_seen()
    code["opened"] = records.code_place(capture(), 990.0, stack, place.place_of(stack))
    rec = linger_with(code)
    lines = render.code_lines(rec, verbose=False)
    assert lines == ["         opened by fetch_user (app) (connect by 4312/api)"]
    assert any("fetch_user+0x10 (app) [cfi]" in l for l in render.code_lines(rec, True))
    assert report.code_key(rec) == "opened by fetch_user (app) in /srv/app"


@pytest.mark.parametrize("module", ["/usr/bin/python3.11", "/usr/local/bin/python3",
                                    "/opt/py/lib/libpython3.12.so.1.0", "/usr/bin/python3.13t"])
def test_a_cpython_read_without_python_frames_is_said_to_be_in_the_interpreter(module):
    """A Python server started after the trace, at its first reads: no
    Python frames, its place the interpreter's own C code. The line says so
    (an address in python3.11 reads like a bug in Python), in the text, the
    report's row and the diagnosis; -v keeps the C frame and says why."""
    from closewait_trace.output import report
    stack = [frame("recv", LIBC), dict(frame(None, module, None), pc="0x5fe546",
                                       symbols="none")]
    code = records.code_eof_read(capture(comm="python3"), 997.6, 4_900_000_000, stack,
                                 place.place_of(stack))
    code["eof_read"]["python_not_read"] = "not copied: the process was not yet known"
    rec = linger_with(code)
    name = module.rsplit("/", 1)[-1]
    want = f"{name} (Python frames not read)"
    assert render.describe_found(code["eof_read"]) == want
    [line] = render.code_lines(rec, verbose=False)
    assert line.startswith(f"         read EOF in {want} 2.4s ago") and len(line) <= 80
    verbose = " ".join(render.code_lines(rec, verbose=True))
    assert "0x5fe546" in verbose and "not yet known" in verbose
    assert report.code_key(rec) == f"{want} in {module}"
    # With its Python frames, or with a C extension's (not the interpreter's)
    # place, the frame is named as before.
    code["eof_read"]["python"] = [{"function": "handle", "file": "/srv/app.py", "line": 3}]
    assert render.describe_found(code["eof_read"]) == f"0x5fe546 ({name})"
    del code["eof_read"]["python"]
    code["eof_read"]["place"] = dict(code["eof_read"]["place"], module="/srv/_ext.so",
                                     function="ext_recv")
    assert render.describe_found(code["eof_read"]) == "ext_recv (_ext.so)"


def test_captures_are_unwound_a_process_at_a_time_and_only_for_holders():
    """One process's 300 sockets must not push another's one socket past the
    batch's cap: the order given to the worker takes each process in turn.
    A capture whose pid holds no fd on the socket is not unwound at all."""
    from types import SimpleNamespace
    from closewait_trace.kernel.probe import ProbeConfig
    from closewait_trace.sockets.filters import SocketFilter
    from closewait_trace.live.tracer import LiveTracer
    from closewait_trace.sockets.tracker import Lingerer
    from tests.unit.fakeprobe import FakeClock, FakeProbe, endpoints

    class Resolver:
        worker = None
        given = None

        def captured_stacks(self, captures, uids=None):
            self.given = [c[1] for c in captures]
            return {c[0]: [frame("handle")] for c in captures}

    clock = FakeClock()
    resolver = Resolver()
    tracer = LiveTracer(config=ProbeConfig(threshold_ns=1), socket_filter=SocketFilter(),
                        probe=FakeProbe(clock), resolver=resolver, clock=clock)
    captures, owners = {}, {}
    for i in range(301):
        pid = 100 if i < 300 else 200
        l = Lingerer(endpoints=endpoints(40000 + i), enter_ns=0, skaddr=i + 1)
        captures[(id(l), "eof_read")] = (l, capture(pid=pid))
        owners[id(l)] = SimpleNamespace(holders=[SimpleNamespace(pid=pid)])
    stranger = Lingerer(endpoints=endpoints(50000), enter_ns=0, skaddr=999)
    captures[(id(stranger), "eof_read")] = (stranger, capture(pid=300))
    owners[id(stranger)] = SimpleNamespace(holders=[SimpleNamespace(pid=100)])
    tracer.locate_places(captures, owners)
    assert resolver.given[:2] == [100, 200]
    assert 300 not in resolver.given
    read = stranger.code["eof_read"]
    assert not read["unwound"] and "does not hold" in read["not_unwound"]
