"""`closewait-trace snapshot`'s output, byte for byte: text and --json over
a crafted /proc tree (tests/unit/snapshot_calls.py gives its rows tcp_info
times and fixes the clocks), through the CLI with its gathering worker, and
through snapshot.take without one. Both must equal the files in
tests/unit/data/, written by the code before the snapshot was made faster:
a speed-up may change how the output is made, never what it says.

To rewrite them after a deliberate change of the output:
CLOSEWAIT_TEST_WRITE_GOLDEN=1 pytest tests/unit/test_snapshot_output.py
"""

import functools
import io
import os
import socket
import time

import pytest
from click.testing import CliRunner

from closewait_trace import cli
from closewait_trace.evidence import gathering, worker
from closewait_trace.live import snapshot
from closewait_trace.output import render, textsafe
from closewait_trace.kernel import tcpstates
from closewait_trace.sockets import procnet
from tests.unit import snapshot_calls
from tests.unit.fakeproc import FakeProc

V4, V6 = socket.AF_INET, socket.AF_INET6
CW, LISTEN = tcpstates.CLOSE_WAIT, tcpstates.LISTEN
DATA = os.path.join(os.path.dirname(__file__), "data")
TS = 1_790_000_000.123456           # the wall clock of the records
WRITE = os.environ.get("CLOSEWAIT_TEST_WRITE_GOLDEN") == "1"


def scene(root) -> FakeProc:
    """Every kind of holder and age a snapshot shows: one process holding
    many sockets, a stopped one, a traced one, a socket shared by two
    processes (one inheriting it without close-on-exec), a never accepted
    socket, one nobody holds, IPv6, and names that need escaping."""
    f = FakeProc(root)
    f.process(10, comm="server", cmdline=["/usr/sbin/server", "--port", "5555"], uid=0,
              threads={10: ("S", "0 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f00", "anon_pipe_read")})
    f.fd(10, 0, target="pipe:[27790391]")
    f.process(11, comm="worker", state="T", ppid=10, uid=0)
    f.process(12, comm="evil\x1b[2J\u202e", ppid=10, uid=0,
              cmdline=["evil\nforged line", "\u4e2d\u6587\u4e2d\u6587" * 30])
    f.process(13, comm="\u4e2d\u6587\u540d\u5b57\u4e2d\u6587\u540d", ppid=12, uid=0)
    f.process(14, comm="traced", tracer_pid=10, uid=0)
    f.process(15, comm="py", uid=0,
              threads={15: ("S", "7 0x3 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f00", "do_sys_poll"),
                       16: ("R", "running", "0")})
    f.tcp(10, V4, "0.0.0.0", 5555, "0.0.0.0", 0, LISTEN, 800)
    f.fd(10, 3, 800, cloexec=True)
    inode = 1000
    for i in range(40):                         # the big holder
        f.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000 + i, CW, inode, rx=i % 3)
        f.fd(10, 10 + i, inode, cloexec=i % 2 == 0)
        inode += 1
    f.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 41000, CW, inode, rx=1)
    f.fd(11, 5, inode)                          # stopped
    inode += 1
    f.tcp(10, V4, "127.0.0.1", 5555, "10.1.2.3", 41001, CW, inode, rx=1)
    f.fd(10, 60, inode, cloexec=True).fd(12, 4, inode).fd(13, 4, inode)   # shared
    inode += 1
    f.tcp(10, V4, "127.0.0.1", 5555, "10.1.2.4", 41002, CW, inode, rx=1)
    f.fd(13, 5, inode)          # inherited from the server's listener port, no cloexec
    inode += 1
    f.tcp(10, V4, "127.0.0.1", 5555, "10.1.2.5", 41003, CW, 0, rx=1)     # never accepted
    f.tcp(10, V4, "127.0.0.1", 6000, "10.1.2.6", 41004, CW, 7777, rx=1)  # nobody holds it
    f.tcp(10, V6, "2001:db8::1", 443, "2001:db8:ffff:ffff:ffff:ffff:ffff:1", 41005, CW,
          inode, rx=5)
    f.fd(14, 9, inode)                          # traced
    inode += 1
    f.tcp(10, V6, "::ffff:127.0.0.1", 8080, "::ffff:127.0.0.1", 41006, CW, inode, rx=1)
    f.fd(15, 3, inode)
    return f


@pytest.fixture
def fixed(tmp_path, monkeypatch):
    """The scene, with the clocks fixed and the time zone UTC."""
    f = scene(tmp_path / "proc")
    monkeypatch.setenv(snapshot_calls.FAKE_PROC_ENV, f.root)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(gathering, "now_ns", lambda: snapshot_calls.TAKEN_NS)
    monkeypatch.setattr(time, "time", lambda: TS)
    monkeypatch.setattr(os, "geteuid", lambda: 0)          # as root: nothing hidden
    monkeypatch.setattr(worker, "GatherWorker", functools.partial(
        worker.GatherWorker, calls_module="tests.unit.snapshot_calls"))
    yield f
    monkeypatch.undo()
    time.tzset()


def golden(name: str, text: str) -> None:
    path = os.path.join(DATA, name)
    if WRITE:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    with open(path, encoding="utf-8", newline="") as fh:
        assert text == fh.read(), f"{name}: the output changed"


ARGS = [[], ["-p", "5555"], ["-P", "41005,41006"], ["-4", "--wide"]]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: "_".join(a) or "all")
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_cli_output_is_byte_identical(fixed, args, as_json):
    result = CliRunner().invoke(cli.main_group, ["snapshot"] + (["--json"] if as_json else [])
                                + args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    name = "snapshot_" + ("_".join(a.strip("-").replace(",", "_") for a in args) or "all")
    golden(name + (".jsonl" if as_json else ".txt"), result.output)


def test_the_same_without_a_worker(fixed, monkeypatch):
    """snapshot.take reading the tree itself (no worker) writes the same."""
    monkeypatch.setattr(procnet, "_read_rows", snapshot_calls.rows_with_tcp_info(
        procnet._read_rows))
    snap = snapshot.take(proc=fixed.root, as_root=True)
    recs = snap.records()
    lines = [textsafe.json_dumps(r, check_circular=False) for r in recs]
    golden("snapshot_all.jsonl", "".join(line + "\n" for line in lines))
    renderer = render.TextRenderer()
    lingers = [r for r in recs if r["type"] == "linger"]
    out = io.StringIO()
    for line in (snapshot.title_lines(len(lingers), 0, "") + [renderer.header()]
                 + [l for r in recs for l in renderer.render(r)]
                 + snapshot.footer_lines(lingers)):
        out.write(textsafe.safe_line(line) + "\n")
    golden("snapshot_all.txt", out.getvalue())
