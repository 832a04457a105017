"""Terminal injection for real (issue 8 §2): an unprivileged holder renames
itself with prctl(PR_SET_NAME) to a string with ESC and a newline that would
forge a LINGER line, puts OSC 52 (clipboard write) in its command line, and
holds a socket in CLOSE_WAIT. The live text output (not --json), -v, the
recording's replay and the report show both escaped. Fails on the old code
(PYTHONPATH=/work/main/src): the raw ESC and a forged LINGER line reach stdout."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.kernel.harness import stretch
from tests.kernel.harness import TRACER, free_port, tracer_process, wait_until

pytestmark = pytest.mark.kernel

# 14 bytes, within the kernel's 15-byte comm: clear the screen, then a
# newline and a line that looks like a report of its own.
EVIL_COMM = b"\x1b[2J\nLINGER 9"
EVIL_ARG = "\x1b]52;c;cm0gLXJmIH4K\x07"

HOLDER = r"""
import ctypes, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15
assert libc.prctl(PR_SET_NAME, ctypes.c_char_p(bytes.fromhex(sys.argv[2])), 0, 0, 0) == 0
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(8)
print("ready", flush=True)
conn, _ = srv.accept()
time.sleep(3600)          # never reads, never closes: CLOSE_WAIT once the peer closes
"""

RAW_CONTROL = [chr(c) for c in range(0x20) if chr(c) not in "\n"] + ["\x7f"]


def assert_escaped(text: str, where: str):
    for ch in RAW_CONTROL:
        assert ch not in text, f"{where}: raw {ch!r} in {text!r}"
    # Only real rows say LINGER after their time: a forged line would start with it.
    assert not any(l.startswith("LINGER") for l in text.splitlines()), f"{where}: {text}"


def test_forged_comm_and_cmdline_are_escaped_in_every_text_path(tmp_path, procs):
    port = free_port()
    holder = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", HOLDER, str(port), EVIL_COMM.hex(), EVIL_ARG],
        stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    with open(f"/proc/{holder.pid}/comm", "rb") as f:
        assert f.read().rstrip(b"\n") == EVIL_COMM      # the kernel kept it as given

    path = tmp_path / "evil.jsonl"
    with tracer_process(["-p", str(port), "-t", "300ms", "-v", "-w", str(path)]) as tracer:
        first = tracer.stdout.readline()
        assert first.startswith(b"Tracing TCP sockets"), first
        import socket
        c = socket.create_connection(("127.0.0.1", port))
        c.close()
        wait_until(lambda: subprocess.run(["ss", "-Htan", "state", "close-wait",
                                           f"( sport = :{port} )"], capture_output=True,
                                          text=True).stdout.strip(), what="CLOSE-WAIT")
        time.sleep(stretch(3.0))     # threshold 0.3 s, ticks of 0.15 s: generous here
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=stretch(20))
        out = (first + tracer.stdout.read()).decode("utf-8", "replace")
        err = tracer.stderr.read().decode("utf-8", "replace")
    assert tracer.returncode == 0, err
    rows = [l for l in out.splitlines() if l[9:16] == "LINGER "]
    assert len(rows) == 1, out
    assert_escaped(out, "live -v")
    assert_escaped(err, "live stderr")
    shown = "\\x1b[2J\\nLINGER 9"
    assert rows[0].endswith(f"{holder.pid}/{shown}"), rows[0]      # the whole name, escaped
    assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in out                    # -v command line
    for args in (["-r", str(path)], ["-r", str(path), "-v"], ["report", str(path)]):
        result = subprocess.run(TRACER + args, capture_output=True, text=True, timeout=stretch(60))
        assert result.returncode == 0, result.stderr
        assert shown in result.stdout, (args, result.stdout)
        assert_escaped(result.stdout, " ".join(args))
    os.kill(holder.pid, signal.SIGKILL)


def test_verbose_says_kernel_headers_before_the_column_header(procs):
    """-v: "kernel headers: ..." comes before the column header, in the one
    stream a terminal shows (old code: after it, on stderr)."""
    seen = []
    with tracer_process(["-v", "-p", str(free_port())], stderr=subprocess.STDOUT,
                        text=True) as tracer:
        for line in tracer.stdout:
            seen.append(line)
            if line.startswith("TIME "):
                break
        time.sleep(stretch(0.5))         # a line printed after the header would be here
        tracer.send_signal(signal.SIGINT)
        rest = tracer.communicate(timeout=stretch(20))[0]
    assert tracer.returncode == 0, seen + [rest]
    assert seen[-1].startswith("TIME "), seen
    headers = [i for i, l in enumerate(seen) if l.startswith("kernel headers: ")]
    assert headers and headers[0] < len(seen) - 1, seen
    assert "kernel headers" not in rest
