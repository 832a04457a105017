"""The live loop's edges against the real kernel: "ready" means attached,
SIGHUP, a reader that goes away, and the holder filters."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.kernel.harness import stretch
from tests.kernel.harness import (HOLDING_SERVER, TRACER, Tracer, connect_and_close, tracer_process,
                                  free_port, start_holding_server)

pytestmark = pytest.mark.kernel


def wait_for_banner(proc, timeout=60.0) -> str:
    """Read stderr until the banner's first line; return it."""
    deadline = time.monotonic() + stretch(timeout)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"tracer exited before its banner: {proc.wait()}")
        if line.startswith("Tracing TCP sockets"):
            return line
    raise AssertionError("no banner")


@pytest.mark.parametrize("mode", ["json", "quiet-write", "all"])
def test_connections_right_after_the_banner_are_all_counted(tmp_path, procs, mode):
    """Issue 9 §3: the banner (stderr, with --json or -q) was printed before
    the kernel program was compiled and attached: a burst right after it
    was counted as 0."""
    port = free_port()
    server = start_holding_server(port)
    procs.append(server)
    recording = tmp_path / "cw.jsonl"
    args = {"json": ["--json"], "quiet-write": ["-q", "-w", str(recording)],
            "all": ["--json", "--all"]}[mode]
    with tracer_process(["-p", str(port), "-t", "5s"] + args, text=True) as proc:
        # stderr is a pipe here, as a service's journal is: the banner says
        # what is traced, not "Ctrl-C to end" (nobody is at a terminal).
        assert "Ctrl-C" not in wait_for_banner(proc)
        connect_and_close(port, 23)
        # Long enough for a tracer that printed its banner early to have
        # attached since: then it runs, and counts what it missed as 0.
        time.sleep(stretch(3))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=stretch(30))
    assert proc.returncode == 0, err
    if mode == "quiet-write":
        assert out == ""
        # A service's stop still says how the trace ended, in its journal.
        assert "Summary after" in err and "23 entered CLOSE_WAIT" in err.replace("\n  ", " "), err
        lines = recording.read_text().splitlines()
    else:
        lines = out.splitlines()
    summary = [r for r in map(json.loads, lines) if r["type"] == "summary"]
    assert len(summary) == 1
    assert summary[0]["counters"]["cw_enter"] == 23, summary[0]["counters"]


def test_sighup_ends_with_a_summary_also_in_the_recording(tmp_path, procs):
    port = free_port()
    server = start_holding_server(port)
    procs.append(server)
    recording = tmp_path / "cw.jsonl"
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-w", str(recording)]).start()
    procs.append(tracer)
    connect_and_close(port, 2)
    tracer.wait_for(lambda r: r["type"] == "linger", count=2)
    summary = tracer.stop(sig=signal.SIGHUP)     # exit 0, one summary, no traceback
    assert len(summary["still_lingering"]) == 2
    recorded = [json.loads(l) for l in recording.read_text().splitlines()]
    assert recorded[-1]["type"] == "summary"
    assert recorded[-1]["counters"]["cw_enter"] == 2


@pytest.mark.parametrize("json_mode", [False, True])
def test_head_1_ends_the_trace(procs, json_mode):
    """`closewait-trace | head -1` returned only when the tracer next printed
    (never, on a quiet machine): it now notices the closed pipe."""
    port = free_port()
    cmd = " ".join(TRACER + ["-p", str(port)] + (["--json"] if json_mode else []))
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", cmd + ' | head -1; echo "rc=${PIPESTATUS[0]}" >&2'],
                            capture_output=True, text=True, timeout=stretch(90))
    took = time.monotonic() - started
    assert result.stdout.count("\n") == 1
    first = result.stdout.strip()
    if json_mode:
        assert json.loads(first)["type"] == "start"
    else:
        assert first.startswith("Tracing TCP sockets")
    assert result.stderr.strip().splitlines()[-1] == "rc=0", result.stderr
    assert "Traceback" not in result.stderr
    assert took < stretch(60)


RENAMED_SERVER = ("import ctypes, sys; ctypes.CDLL(None).prctl(15, sys.argv.pop(1).encode(), 0, 0, 0)\n"
                  + HOLDING_SERVER)


def start_named_server(port, comm):
    p = subprocess.Popen([sys.executable, "-c", RENAMED_SERVER, comm, "4", str(port)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("how", ["pid", "comm"])
def test_live_holder_filter(procs, how):
    port_a, port_b = free_port(), free_port()
    keep = start_named_server(port_a, "cwkeeper")
    procs.append(keep)
    other = start_named_server(port_b, "cwother")
    procs.append(other)
    wanted = ["--pid", str(keep.pid)] if how == "pid" else ["--comm", "cwkeeper"]
    tracer = Tracer(["-p", f"{port_a},{port_b}", "-t", "300ms"] + wanted).start()
    procs.append(tracer)
    connect_and_close(port_a, 3)
    connect_and_close(port_b, 4)
    tracer.wait_for(lambda r: r["type"] == "linger", count=3)
    tracer.settle(1.5)
    lingers = tracer.of("linger")
    assert len(lingers) == 3
    assert all(r["lport"] == port_a and r["owners"][0]["pid"] == keep.pid
               and r["owners"][0]["comm"] == "cwkeeper" for r in lingers)
    summary = tracer.stop()
    assert summary["counters"]["cw_enter"] == 7          # the kernel still counts all
    assert {s["lport"] for s in summary["still_lingering"]} == {port_a}
    assert len(summary["still_lingering"]) == 3
